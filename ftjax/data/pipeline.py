"""Train / val / test pipelines for any TFDS image-classification dataset.

``load_dataset(name, ...)`` returns an :class:`ImageDataset`, whose iterators
yield per-process NumPy batches (the trainer shards them onto the mesh):

* Splits: 'val' is the dataset's ``validation`` split when it has one, else a
  fixed (seed ``SPLIT_SEED``, independent of the run seed) stratified
  ``val_fraction`` part of ``train``; 'test' is ``test`` (never sampled), or the
  TFDS split named by ``test_split`` (e.g. ``validation`` where ``test`` has no
  labels; 'val' then comes from ``train``). A 'test' split with unlabelled
  examples (label -1) is an error.
* Sampling: stratified per class; for class c a permutation of its train indices
  seeded by ``(seed, c)`` keeps the first ``ceil(rate / 100 * n_c)`` (at least 1),
  so for one seed the 15% subset lies inside the 30% subset.
* Validation (``val_source``): ``"sampled"`` (the default) applies the same rate to
  'val' (low-data runs also get low-data validation), with the fixed seed
  ``SPLIT_SEED`` so that 'val' is the same for every run seed; ``"full"`` keeps the
  whole held-out part (Co-Tuning / Bi-Tuning protocol: a fixed 20% of train), the
  same for every rate and seed. Train is sampled from the rest in both modes, so
  the two never overlap.
* Per host: each process reads ``tfds.even_splits(split, process_count)``
  [process_index] of the TFDS split and keeps the selected examples in it.
* Train stream: epoch e visits this process's examples in a permutation seeded by
  ``(seed, e)``; augmentation randomness is keyed by ``(seed, e, example index)``.
  The stream is a pure function of (config, seed, step), so ``start_step=s``
  resumes exactly where an uninterrupted run would be at step s.

Example:
  >>> ds = load_dataset("fashion_mnist", data_dir="/tmp/tfds", sampling_rate=15,
  ...                   image_size=32)
  >>> batch = next(ds.train_batches(batch_size=64))
  >>> batch["image"].shape, batch["label"].shape
  ((64, 32, 32, 3), (64,))
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ftjax.core.io import save_npy
from ftjax.data import augment
from ftjax.data.sampling import (SPLIT_SEED, _class_permutation, check_sampling_rate, check_val_source,  # noqa: F401
                                 class_keep_count, select_val, stratified_sample, stratified_split)
from ftjax.data import offline

# TF only feeds the host pipeline; leave accelerators to JAX.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; nothing to hide then.
  pass

SPLITS = ("train", "val", "test")
_THREADS_ENV = "FTJAX_TF_DATA_THREADS"
_CACHE_DIRNAME = "ftjax_cache"


def _num_threads() -> int:
  """tf.data thread-pool size: modest by default (hosts share CPUs with JAX)."""
  if _THREADS_ENV in os.environ:
    return max(1, int(os.environ[_THREADS_ENV]))
  return max(1, min(8, os.cpu_count() or 1))


def _data_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = _num_threads()
  options.threading.max_intra_op_parallelism = 1
  return options


# ----------------------------------------------------------------------------
# TFDS access.
# ----------------------------------------------------------------------------


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split(":")[0].split("/")[0]
    close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown dataset {name!r}{hint}") from None


def _feature_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """(image key, label key): the supervised keys when they are an Image and a
  ClassLabel, else the first top-level Image and ClassLabel features."""
  features = builder.info.features
  keys = builder.info.supervised_keys
  if (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)
      and isinstance(features[keys[0]], tfds.features.Image)
      and isinstance(features[keys[1]], tfds.features.ClassLabel)):
    return keys
  image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
  label_key = next((k for k, f in features.items()
                    if isinstance(f, tfds.features.ClassLabel)), None)
  if image_key is None or label_key is None:
    raise ValueError(
        f"dataset {builder.name!r} is not image classification: needs a top-level Image and "
        f"ClassLabel feature, has {dict((k, type(f).__name__) for k, f in features.items())}")
  return image_key, label_key


def _in_order_read_config() -> tfds.ReadConfig:
  # cycle_length=1: shards are read one after the other, so the n-th example read
  # is example n of the split (the default interleaves 16 shards).
  return tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False)


def _cached_labels(builder: tfds.core.DatasetBuilder, split: str, label_key: str) -> np.ndarray:
  """Label column of a TFDS split in storage order, cached as .npy."""
  cache_dir = os.path.join(builder._data_dir_root, _CACHE_DIRNAME, builder.info.full_name)  # pylint: disable=protected-access
  path = os.path.join(cache_dir, f"{split}_{label_key}.npy")
  expected = builder.info.splits[split].num_examples
  if os.path.exists(path):
    labels = np.load(path)
    if len(labels) == expected:
      return labels
  ds = builder.as_dataset(
      split=split, shuffle_files=False, read_config=_in_order_read_config(),
      decoders=tfds.decode.PartialDecoding({label_key: True}))
  ds = ds.map(lambda ex: ex[label_key]).batch(8192)
  labels = np.concatenate([np.asarray(b) for b in ds.as_numpy_iterator()] or
                          [np.zeros([0], np.int64)]).astype(np.int64)
  if len(labels) != expected:
    raise RuntimeError(f"read {len(labels)} labels from {builder.name}/{split}, expected {expected}")
  try:
    save_npy(path, labels)  # atomic: several processes may build the cache at once
  except OSError:  # read-only data_dir: the cache is only a speed-up
    pass
  return labels


@dataclasses.dataclass(frozen=True)
class _Split:
  """Selected examples of one logical split ('train'/'val'/'test')."""
  tfds_split: str       # TFDS split read ('train', 'validation', 'test')
  indices: np.ndarray   # sorted selected example indices within tfds_split
  labels: np.ndarray    # their labels


# ----------------------------------------------------------------------------
# Dataset object.
# ----------------------------------------------------------------------------


class ImageDataset:
  """Train / val / test pipelines of one TFDS dataset for one process.

  Attributes:
    name: TFDS name.
    num_classes: number of classes.
    class_names: class names from the ClassLabel feature.
    num_examples: global sizes of 'train' (after sampling), 'val', 'test'.
    image_size: output side of every image.
  """

  def __init__(self, *, builder: tfds.core.DatasetBuilder, image_key: str, label_key: str,
               splits: dict[str, _Split], seed: int, image_size: int, resize_size: int,
               crop_scale: tuple[float, float] = (0.08, 1.0),
               process_index: int, process_count: int, num_shards: int = 0,
               classes: Sequence[int] | None = None):
    self._builder = builder
    self._image_key = image_key
    self._label_key = label_key
    self._splits = splits
    self._seed = int(seed)
    self._resize_size = resize_size
    self.resize_size = resize_size
    self.crop_scale = tuple(crop_scale)
    self._process_index = process_index
    self._process_count = process_count
    # Data shards: each global train batch is num_shards equal slices, slice s
    # drawn from TFDS even split s of num_shards; a process owns a contiguous run
    # of num_shards / process_count shards. The stream depends on num_shards,
    # not on the process count, so 1, 2 or 4 processes give the same batches.
    self.num_shards = int(num_shards or process_count)
    if self.num_shards % process_count:
      raise ValueError(f"dataset.num_shards={self.num_shards} must be a multiple of the process "
                       f"count {process_count}")
    self._shards_per_process = self.num_shards // process_count
    self._cache = {}
    label_feature = builder.info.features[label_key]
    self.name: str = builder.name
    self.num_classes: int = int(label_feature.num_classes)
    self.class_names: list[str] = list(label_feature.names)
    # A class subset: TFDS label classes[i] is read as label i (others are never selected).
    self.classes: tuple[int, ...] | None = None if classes is None else tuple(int(c) for c in classes)
    self._label_map = None
    if self.classes is not None:
      label_map = np.full(self.num_classes, -1, np.int32)
      label_map[list(self.classes)] = np.arange(len(self.classes), dtype=np.int32)
      self._label_map = tf.constant(label_map)
      self.class_names = [self.class_names[c] for c in self.classes]
      self.num_classes = len(self.classes)
    self.num_examples: dict[str, int] = {
        k: 0 if s is None else len(s.indices) for k, s in splits.items()}
    self.image_size: int = image_size

  def __repr__(self) -> str:
    return (f"ImageDataset({self.name!r}, num_classes={self.num_classes}, "
            f"num_examples={self.num_examples}, image_size={self.image_size}, "
            f"process={self._process_index}/{self._process_count})")

  # -- per-process bookkeeping ------------------------------------------------

  def _split(self, split: str) -> _Split:
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    s = self._splits[split]
    if s is None:
      raise ValueError(f"dataset {self.name!r} has no {split!r} split")
    return s

  def _shard_range(self, tfds_split: str, shard: int) -> tuple[int, int]:
    """[start, end) of ``tfds.even_splits(tfds_split, n=num_shards)[shard]``."""
    sub = tfds.even_splits(tfds_split, n=self.num_shards)[shard]
    (inst,) = sub.to_absolute(self._builder.info.splits)
    start = 0 if inst.from_ is None else int(inst.from_)
    end = self._builder.info.splits[tfds_split].num_examples if inst.to is None else int(inst.to)
    return start, end

  def _process_shards(self, process_index: int) -> range:
    k = self._shards_per_process
    return range(process_index * k, (process_index + 1) * k)

  def _host_range(self, tfds_split: str, process_index: int) -> tuple[int, int]:
    """[start, end) of the TFDS examples a process reads: the union of its shards."""
    shards = self._process_shards(process_index)
    return (self._shard_range(tfds_split, shards[0])[0],
            self._shard_range(tfds_split, shards[-1])[1])

  def _host_positions(self, split: str, process_index: int) -> np.ndarray:
    """Positions (into the split's selection) that belong to a process."""
    s = self._split(split)
    start, end = self._host_range(s.tfds_split, process_index)
    return np.flatnonzero((s.indices >= start) & (s.indices < end))

  def _host_counts(self, split: str) -> list[int]:
    return [len(self._host_positions(split, p)) for p in range(self._process_count)]

  def _local_batch_size(self, batch_size: int) -> int:
    if batch_size <= 0 or batch_size % self._process_count:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                       f"process_count={self._process_count}")
    return batch_size // self._process_count

  def _shard_batch_size(self, batch_size: int) -> int:
    if batch_size <= 0 or batch_size % self.num_shards:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                       f"dataset.num_shards={self.num_shards}")
    return batch_size // self.num_shards

  def _shard_counts(self, split: str) -> list[int]:
    s = self._split(split)
    counts = []
    for shard in range(self.num_shards):
      start, end = self._shard_range(s.tfds_split, shard)
      counts.append(int(np.count_nonzero((s.indices >= start) & (s.indices < end))))
    return counts

  def labels(self, split: str) -> np.ndarray:
    """int32 labels of this process's examples of ``split``, in eval order."""
    s = self._split(split)
    return s.labels[self._host_positions(split, self._process_index)].astype(np.int32)

  def example_indices(self, split: str) -> np.ndarray:
    """int64 indices (into the TFDS split read, see ``tfds_split``) of this process's
    examples of ``split``, in eval order (ascending)."""
    s = self._split(split)
    return s.indices[self._host_positions(split, self._process_index)]

  def tfds_split(self, split: str) -> str:
    """Name of the TFDS split that ``split`` is read from ('val' -> 'validation' or 'train')."""
    return self._split(split).tfds_split

  def steps_per_epoch(self, batch_size: int) -> int:
    """Train steps per epoch at global ``batch_size`` (every process agrees).

    Each shard drops its remainder; the epoch ends when the shard with the
    fewest selected examples runs out of whole slices.
    """
    self._local_batch_size(batch_size)
    return min(self._shard_counts("train")) // self._shard_batch_size(batch_size)

  # -- reading ------------------------------------------------------------------

  def _selected(self, *splits: str) -> tf.data.Dataset:
    """(encoded image, int32 label, int64 index) of this process's examples of
    ``splits`` (all read from the same TFDS split), in storage order."""
    tfds_split = self._split(splits[0]).tfds_split
    start, end = self._host_range(tfds_split, self._process_index)
    keep = np.zeros(end - start, bool)
    for split in splits:
      assert self._split(split).tfds_split == tfds_split
      keep[self.example_indices(split) - start] = True
    keep = tf.constant(keep)
    sub = f"{tfds_split}[{start}:{end}]"
    ds = self._builder.as_dataset(
        split=sub, shuffle_files=False, read_config=_in_order_read_config(),
        decoders={self._image_key: tfds.decode.SkipDecoding()})
    ds = ds.enumerate(start=start)
    ds = ds.filter(lambda i, ex: tf.gather(keep, i - start))
    label_map = self._label_map

    def label_of(ex):
      label = tf.cast(ex[self._label_key], tf.int32)
      return label if label_map is None else tf.gather(label_map, label)

    return ds.map(lambda i, ex: (ex[self._image_key], label_of(ex), i))

  def _encoded(self, split: str) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """This process's selected examples of a split, still encoded, held in memory.

    Read once: the train stream gathers from it every epoch and 'val' is evaluated
    repeatedly; 'train' and a 'val' carved out of the TFDS 'train' split are read
    in one pass. ('test', read once at the end, streams instead.)

    Returns:
      ``(encoded [n] string, labels [n] int32, example indices [n] int64)``.
    """
    if split not in self._cache:
      tfds_split = self._split(split).tfds_split
      group = [g for g in ("train", "val") if self._splits[g].tfds_split == tfds_split]
      group = group if split in group else [split]
      encoded, labels, indices = [], [], []
      # Batched: per-element NumPy conversion costs more than the read itself.
      for e, l, i in self._selected(*group).batch(1024).as_numpy_iterator():
        encoded.extend(e)
        labels.append(l)
        indices.append(i)
      encoded = np.array(encoded, dtype=object)
      labels = np.concatenate(labels) if labels else np.zeros([0], np.int32)
      indices = np.concatenate(indices) if indices else np.zeros([0], np.int64)
      for g in group:
        rows = np.isin(indices, self.example_indices(g))
        if not (np.array_equal(indices[rows], self.example_indices(g)) and
                np.array_equal(labels[rows], self.labels(g))):
          raise RuntimeError(f"{self.name}/{g}: examples read do not match the selection")
        self._cache[g] = (tf.constant(list(encoded[rows]), tf.string),
                          tf.constant(labels[rows], tf.int32),
                          tf.constant(indices[rows], tf.int64))
    return self._cache[split]

  # -- iterators ----------------------------------------------------------------

  def train_batches(self, *, batch_size: int, start_step: int = 0, views: int = 1,
                    view_crop_scales: tuple[tuple[float, float], tuple[float, float]] | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Infinite augmented train batches of this process, from global step ``start_step``.

    Args:
      batch_size: global batch size; each process yields ``batch_size //
        process_count`` examples.
      start_step: first step to yield; skipping is arithmetic (whole epochs) plus
        a cheap skip over example positions (no decoding).
      views: 1, or 2 for a second, independently augmented view of every image
        under ``"image_key"`` (contrastive methods: Bi-Tuning's key encoder). Its
        augmentation seed is ``fold_in(key, 1)`` of the first view's key, so
        ``"image"`` is the same with either setting.
      view_crop_scales: with ``views=2``, the random-resized-crop area ranges of
        the first and the second view (default: the dataset's ``crop_scale`` for
        both). Eq. 7 of data reuse uses a mild crop for the weak view.

    Yields:
      ``{"image": float32 [b, S, S, 3] in [0, 255], "label": int32 [b]}``, plus
      ``"image_key"`` (same shape as ``"image"``) when ``views=2``.
    """
    if views not in (1, 2):
      raise ValueError(f"views must be 1 or 2, got {views}")
    if view_crop_scales is not None:
      if views != 2 or len(view_crop_scales) != 2 or not all(
          len(sc) == 2 and 0 < sc[0] <= sc[1] <= 1 for sc in view_crop_scales):
        raise ValueError("view_crop_scales must be two (low, high) area ranges with 0 < low <= high <= 1, "
                         f"for views=2; got {view_crop_scales} with views={views}")
      first_scale, second_scale = (tuple(float(v) for v in sc) for sc in view_crop_scales)
    else:
      first_scale = second_scale = self.crop_scale
    local = self._local_batch_size(batch_size)
    steps = self.steps_per_epoch(batch_size)
    if steps == 0:
      raise ValueError(
          f"batch_size={batch_size} exceeds the train examples: {min(self._shard_counts('train'))} "
          f"on the smallest of {self.num_shards} data shard(s), each giving "
          f"{self._shard_batch_size(batch_size)} per batch")
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}")
    start_epoch, step_in_epoch = divmod(int(start_step), steps)
    encoded, labels, indices = self._encoded("train")
    slice_size = self._shard_batch_size(batch_size)
    host_indices = indices.numpy()
    shard_positions = []
    for shard in self._process_shards(self._process_index):
      lo, hi = self._shard_range(self._split("train").tfds_split, shard)
      shard_positions.append(tf.constant(np.flatnonzero((host_indices >= lo) & (host_indices < hi)), tf.int64))
    seed = self._seed
    image_size = self.image_size

    def epoch_positions(epoch):
      # Reshuffle each shard for epoch e: argsort of stateless uniforms keyed by
      # (seed, e); batch i of the epoch is slice i of each of this process's shards.
      key = tf.stack([tf.constant(seed, tf.int64), epoch])
      slices = []
      for positions in shard_positions:
        keys = tf.random.stateless_uniform(tf.shape(positions), seed=key)
        order = tf.argsort(keys, stable=True)[:steps * slice_size]
        slices.append(tf.reshape(tf.gather(positions, order), [steps, slice_size]))
      order = tf.reshape(tf.stack(slices, axis=1), [-1])   # [steps, shards, slice] step-major
      return tf.data.Dataset.from_tensor_slices(order).map(lambda pos: (epoch, pos))

    def load(epoch, pos):
      index = tf.gather(indices, pos)
      key = tf.random.experimental.stateless_fold_in(
          tf.stack([tf.constant(seed, tf.int64), epoch]), index)
      decoded = augment.decode_rgb(tf.gather(encoded, pos))
      image = augment.train_transform(decoded, seed=key, image_size=image_size, scale=first_scale)
      example = {"image": image, "label": tf.gather(labels, pos)}
      if views == 2:
        example["image_key"] = augment.train_transform(
            decoded, seed=tf.random.experimental.stateless_fold_in(key, 1), image_size=image_size,
            scale=second_scale)
      return example

    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_positions)
    ds = ds.skip(step_in_epoch * local)  # positions only: cheap
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from ds.with_options(_data_options()).as_numpy_iterator()

  def eval_batches(self, split: str, *, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's part of ``split`` with the eval transform.

    Every process yields the same number of batches (that of the largest shard);
    the last ones are padded: ``"mask"`` is 1.0 for real examples, 0.0 for padding
    (zero image, label 0).

    Args:
      split: 'train', 'val' or 'test'.
      batch_size: global batch size (divided by process_count).

    Yields:
      ``{"image": float32 [b, S, S, 3], "label": int32 [b], "mask": float32 [b]}``.
    """
    self._split(split)
    local = self._local_batch_size(batch_size)
    num_batches = max(math.ceil(c / local) for c in self._host_counts(split))
    image_size, resize_size = self.image_size, self._resize_size

    def load(encoded, label, index):
      del index
      image = augment.eval_transform(augment.decode_rgb(encoded), image_size=image_size,
                                     resize_size=resize_size)
      return {"image": image, "label": label}

    if split == "test":
      ds = self._selected(split)
    else:
      ds = tf.data.Dataset.from_tensor_slices(self._encoded(split))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(local)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_data_options())
    emitted = 0
    for batch in ds.as_numpy_iterator():
      yield _pad_batch(batch, local)
      emitted += 1
    empty = {"image": np.zeros([0, image_size, image_size, 3], np.float32),
             "label": np.zeros([0], np.int32)}
    for _ in range(num_batches - emitted):
      yield _pad_batch(empty, local)


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  n = len(batch["label"])
  pad = size - n
  if pad == 0:  # full batch: no copy
    return {"image": batch["image"], "label": batch["label"].astype(np.int32),
            "mask": np.ones([n], np.float32)}
  return {
      "image": np.pad(batch["image"].astype(np.float32), [(0, pad), (0, 0), (0, 0), (0, 0)]),
      "label": np.pad(batch["label"].astype(np.int32), [(0, pad)]),
      "mask": np.concatenate([np.ones([n], np.float32), np.zeros([pad], np.float32)]),
  }


def prefetch_to_device(batches: Iterator[Any], *, put: Callable[[Any], Any], size: int = 2
                       ) -> Iterator[Any]:
  """Yields ``put(batch)`` for each batch, keeping ``size`` batches already put ahead.

  Until now the trainer put each host batch on the device right before its step, so
  the copy waited for the step before and the step waited for the copy. ``put`` (e.g.
  :func:`ftjax.train.sharding.global_batch` over the run's mesh, or ``jax.device_put``)
  starts an asynchronous host-to-device copy; calling it on the next ``size`` batches
  before the current one is consumed lets those copies (and the host pipeline's next
  batches) overlap the running step: a double buffer for ``size=2``. Batches come out
  in order and unchanged.

  Args:
    batches: host batches (e.g. :meth:`ImageDataset.train_batches`).
    put: host batch -> device batch (must not block until the copy is done).
    size: batches in flight (>= 1).

  Example:
    >>> import jax
    >>> out = list(prefetch_to_device(iter([np.zeros(2), np.ones(2)]), put=jax.device_put))
    >>> [float(b.sum()) for b in out]
    [0.0, 2.0]
  """
  if size < 1:
    raise ValueError(f"prefetch size must be >= 1, got {size}")
  queue: collections.deque = collections.deque()
  iterator = iter(batches)
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# ----------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------


def load_dataset(name: str, *, data_dir: str | None = None, sampling_rate: float = 100.0,
                 seed: int = 0, val_fraction: float = 0.2, image_size: int = 224,
                 resize_size: int | None = None, process_index: int = 0,
                 process_count: int = 1, crop_scale: tuple[float, float] = (0.08, 1.0),
                 num_shards: int = 0, classes: Sequence[int] | None = None,
                 train_indices: Sequence[int] | None = None,
                 test_split: str = "test", val_source: str = "sampled") -> ImageDataset:
  """Builds the train / val / test pipelines of a TFDS image-classification dataset.

  Offline-buildable datasets (``fashion_mnist``) are prepared on first use; other
  datasets must already be prepared in ``data_dir`` (nothing downloads here).

  Args:
    name: TFDS name (``"cub2011"``, ``"fashion_mnist"``, ``"cifar10:3.0.2"``, ...).
    data_dir: TFDS data directory (default: TFDS's default).
    sampling_rate: percent of each class's train examples kept, in (0, 100] (and of
      val's with ``val_source="sampled"``).
    seed: run seed: train sampling, epoch shuffles, augmentation.
    val_fraction: val part of 'train' when the dataset has no validation split
      (or ``test_split`` is that split): per class ``round(val_fraction * n_c)``,
      fixed (seed ``SPLIT_SEED``); train is sampled from the rest.
    image_size: output side S.
    resize_size: eval shorter side before the center crop (default round(S/0.875)).
    process_index: this process (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).
    crop_scale: area range of the training random-resized crop (torchvision's
      default (0.08, 1); small source images such as Fashion-MNIST's 28 px do
      better with a milder range).
    num_shards: data shards per global batch (0 = ``process_count``). The train
      stream depends on it and not on the process count: fix it (e.g. to the
      largest process count you will use) to get the same batches from 1, 2 or
      4 processes. Must be a multiple of ``process_count``.
    classes: a class subset (TFDS label ids): every split keeps only these
      classes, relabelled ``0 .. len(classes) - 1`` in the given order
      (``num_classes`` and ``class_names`` follow); ``sampling_rate`` applies
      within the subset (per class, the same examples as without ``classes``).
    train_indices: restrict 'train' to these example indices of the TFDS train
      split (e.g. the images of selected pre-training units); each must be in
      the train part (not val, and of a kept class). ``sampling_rate`` then
      applies within them.
    test_split: the TFDS split evaluated as 'test' (never sampled). When it is
      the dataset's ``validation`` split (the Visual Decathlon's ``test`` split has
      no labels), 'val' is the stratified ``val_fraction`` part of ``train``.
    val_source: ``"sampled"``: 'val' is the held-out part (the dataset's
      validation split, else the ``val_fraction`` part of train) sampled at
      ``sampling_rate`` (seed ``SPLIT_SEED``; the realistic low-data setting);
      ``"full"``: the whole held-out part, the same for every rate and seed (the
      Co-Tuning / Bi-Tuning protocol, papers/co-tuning.txt Sec. 5). See
      :func:`ftjax.data.sampling.select_val`.

  Returns:
    The :class:`ImageDataset`.

  Raises:
    ValueError: unknown dataset, bad sampling rate / sizes / process, no image or
      label feature, dataset not prepared, unknown ``test_split``, a 'test' split
      with unlabelled examples, unknown ``val_source``.
  """
  check_sampling_rate(sampling_rate)
  check_val_source(val_source)
  if not (len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1):
    raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {tuple(crop_scale)}")
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  resize_size = augment.default_resize_size(image_size) if resize_size is None else resize_size
  if resize_size < image_size:
    raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count})")
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    offline.prepare_offline(name, data_dir=data_dir)
    builder = _builder(name, data_dir)
  if not builder.is_prepared():
    raise ValueError(f"dataset {name!r} is not prepared in {builder.data_dir}; prepare it "
                     f"beforehand (e.g. `tfds build {name} --data_dir=...`): nothing "
                     "downloads at run time")
  image_key, label_key = _feature_keys(builder)
  available = set(builder.info.splits.keys())
  if "train" not in available:
    raise ValueError(f"dataset {name!r} has no 'train' split (has {sorted(available)})")
  if test_split == "train" or (test_split != "test" and test_split not in available):
    raise ValueError(f"test_split={test_split!r}: dataset {name!r} has splits "
                     f"{sorted(available)}; name one other than 'train'")

  num_classes = int(builder.info.features[label_key].num_classes)
  relabel = _check_classes(classes, num_classes)
  train_labels = _cached_labels(builder, "train", label_key)
  if "validation" in available and test_split != "validation":
    val_split = "validation"
    val_labels = _cached_labels(builder, val_split, label_key)
    train_pool, val_pool = np.arange(len(train_labels)), np.arange(len(val_labels))
  else:
    val_split, val_labels = "train", train_labels
    train_pool, val_pool = stratified_split(train_labels, val_fraction, SPLIT_SEED)
  if relabel is not None:
    train_pool = train_pool[relabel[train_labels[train_pool]] >= 0]
    val_pool = val_pool[relabel[val_labels[val_pool]] >= 0]
  if train_indices is not None:
    train_pool = _check_train_indices(train_indices, train_pool, len(train_labels))
  train_idx = stratified_sample(train_labels, train_pool, sampling_rate, seed)
  val_idx = select_val(val_labels, val_pool, sampling_rate=sampling_rate, val_source=val_source)

  def split_labels(labels: np.ndarray) -> np.ndarray:
    return labels if relabel is None else relabel[labels].astype(labels.dtype)

  splits = {
      "train": _Split("train", train_idx, split_labels(train_labels[train_idx])),
      "val": _Split(val_split, val_idx, split_labels(val_labels[val_idx])),
      "test": None,
  }
  if test_split in available:
    test_labels = _cached_labels(builder, test_split, label_key)
    unlabelled = int(np.sum(test_labels < 0))
    if unlabelled:
      others = sorted(available - {"train", test_split})
      raise ValueError(
          f"dataset {name!r}: {unlabelled} of {len(test_labels)} examples of its "
          f"{test_split!r} split have no label (label -1), so test accuracy would be "
          f"meaningless; evaluate a labelled split instead with test_split= (config: "
          f"dataset.test_split) one of {others}")
    test_idx = np.arange(len(test_labels))
    if relabel is not None:
      test_idx = test_idx[relabel[test_labels] >= 0]
    splits["test"] = _Split(test_split, test_idx, split_labels(test_labels[test_idx]))
  dataset = ImageDataset(builder=builder, image_key=image_key, label_key=label_key,
                         splits=splits, seed=seed, image_size=image_size,
                         resize_size=resize_size, process_index=process_index,
                         process_count=process_count, crop_scale=crop_scale,
                         num_shards=num_shards, classes=None if relabel is None else classes)
  return dataset


def _check_classes(classes: Sequence[int] | None, num_classes: int) -> np.ndarray | None:
  """``old label -> new label`` (-1 = dropped) for a class subset, or None for all classes."""
  if classes is None:
    return None
  ids = list(classes)
  if not ids:
    raise ValueError("classes must name at least one class (or be None for all)")
  for c in ids:
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
      raise ValueError(f"classes must be integer class ids, got {c!r}")
    if not 0 <= c < num_classes:
      raise ValueError(f"class id {c} in classes is out of range [0, {num_classes})")
  repeated = sorted({int(c) for c in ids if ids.count(c) > 1})
  if repeated:
    raise ValueError(f"classes repeats class id(s) {repeated}")
  relabel = np.full(num_classes, -1, np.int64)
  relabel[ids] = np.arange(len(ids))
  return relabel


def _check_train_indices(train_indices: Sequence[int], train_pool: np.ndarray,
                         num_train: int) -> np.ndarray:
  """The sorted, validated ``train_indices`` (a subset of ``train_pool``)."""
  chosen = np.asarray(train_indices)
  if chosen.ndim != 1 or chosen.size == 0 or not np.issubdtype(chosen.dtype, np.integer):
    raise ValueError(f"train_indices must be a non-empty 1-D list of integer example indices, got "
                     f"shape {chosen.shape} dtype {chosen.dtype}")
  chosen = np.unique(chosen.astype(np.int64))
  if len(chosen) != len(train_indices):
    raise ValueError("train_indices holds repeated indices")
  if chosen[0] < 0 or chosen[-1] >= num_train:
    raise ValueError(f"train_indices out of range [0, {num_train}): found [{chosen[0]}, {chosen[-1]}]")
  outside = np.setdiff1d(chosen, train_pool)
  if outside.size:
    raise ValueError(f"{outside.size} train_indices are not in the train part of the split (they are "
                     f"in 'val' or of a class not in classes), e.g. {outside[:5].tolist()}")
  return chosen

"""Pooled penultimate features of a dataset under a (pretrained) model, cached on disk.

The selection units of the UOT data-reuse paper are means of "512-dim features
from the penultimate layer of a pre-trained ResNet18": here the ``features``
output of an :class:`ftjax.models.ImageClassifier` (the globally average-pooled
backbone output that the heads read).

Example:
  >>> ds = ftjax.data.load_dataset("fashion_mnist", image_size=32)
  >>> feats, labels = extract_features(
  ...     model=model, variables=variables, batches=ds.eval_batches("train", batch_size=256),
  ...     cache_path="/tmp/fm_train.npz", cache_key="resnet_tiny/seed0/fashion_mnist/train/32",
  ...     total=math.ceil(ds.num_examples["train"] / 256))
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

_CACHE_FORMAT = 1


def _forward_features(model: Any):
  @jax.jit
  def forward(variables, images):
    return model.apply(variables, images, train=False, outputs=("features",))["features"]
  return forward


def load_cached_features(cache_path: str, cache_key: str) -> tuple[np.ndarray, np.ndarray] | None:
  """``(features, labels)`` from ``cache_path`` if it exists and was written for ``cache_key``."""
  if not os.path.exists(cache_path):
    return None
  try:
    with np.load(cache_path, allow_pickle=False) as data:
      if (str(data["cache_key"]) != cache_key or int(data["format"]) != _CACHE_FORMAT):
        return None
      return data["features"].astype(np.float32), data["labels"].astype(np.int64)
  except (OSError, KeyError, ValueError):  # unreadable or foreign file: recompute
    return None


def _save_atomic(cache_path: str, *, features: np.ndarray, labels: np.ndarray, cache_key: str) -> None:
  directory = os.path.dirname(os.path.abspath(cache_path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(cache_path), suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, features=features, labels=labels, cache_key=np.array(cache_key),
               format=np.array(_CACHE_FORMAT))
    os.replace(tmp, cache_path)  # readers never see half a file
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def extract_features(*, model: Any, variables: Any, batches: Iterable[dict[str, np.ndarray]],
                     cache_path: str | None = None, cache_key: str | None = None,
                     total: int | None = None, progress: bool = True,
                     description: str = "features") -> tuple[np.ndarray, np.ndarray]:
  """Pooled ``features`` of every example in ``batches`` (eval mode, jitted).

  Args:
    model: a Linen module with a ``features`` output (``ImageClassifier``,
      e.g. ``models.pretrained(...).model``).
    variables: its variables (``params`` and ``batch_stats``).
    batches: dicts with ``"image"`` ``[b, S, S, 3]`` raw pixels, ``"label"`` ``[b]``
      and optionally ``"mask"`` ``[b]`` (0 = padding, dropped), e.g.
      ``dataset.eval_batches(split, batch_size=...)``. Not consumed on a cache hit.
    cache_path: an ``.npz`` to reuse / write (atomically: tmp file + ``os.replace``).
    cache_key: what the features depend on (weights, dataset, split, image size, ...),
      built by the caller; the cache is reused only when the stored key is equal.
      Required with ``cache_path``.
    total: number of batches, for the progress bar.
    progress: show a tqdm progress bar.
    description: progress bar label.

  Returns:
    ``(features float32 [N, D], labels int64 [N])`` in the order of ``batches``.

  Raises:
    ValueError: ``cache_path`` without ``cache_key``, no examples, or non-finite
      features (NaN/inf: broken weights or inputs), naming the first bad row.
  """
  if cache_path is not None:
    if not cache_key:
      raise ValueError("extract_features: cache_path needs a cache_key describing the weights, "
                       "dataset, split and image size")
    cached = load_cached_features(cache_path, cache_key)
    if cached is not None:
      return cached
  forward = _forward_features(model)
  chunks, label_chunks = [], []
  iterator = batches
  bar = None
  if progress:
    from tqdm.auto import tqdm
    iterator = bar = tqdm(batches, total=total, desc=description, unit="batch", dynamic_ncols=True)
  try:
    for batch in iterator:
      feats = np.asarray(forward(variables, batch["image"]), np.float32)
      labels = np.asarray(batch["label"], np.int64)
      if "mask" in batch:
        keep = np.asarray(batch["mask"]) > 0
        feats, labels = feats[keep], labels[keep]
      chunks.append(feats)
      label_chunks.append(labels)
  finally:
    if bar is not None:
      bar.close()
  if not chunks or sum(len(c) for c in chunks) == 0:
    raise ValueError("extract_features: the batches hold no examples")
  features = np.concatenate(chunks)
  labels = np.concatenate(label_chunks)
  finite = np.isfinite(features).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise ValueError(f"extract_features: {bad.size} of {len(features)} feature rows contain NaN/inf "
                     f"(first: row {bad[0]}); check the model weights and the input images")
  if cache_path is not None:
    _save_atomic(cache_path, features=features, labels=labels, cache_key=cache_key)
  return features, labels

"""Pooled penultimate features of a dataset under a (pretrained) model, cached on disk.

The selection units of the UOT data-reuse paper are means of "512-dim features
from the penultimate layer of a pre-trained ResNet18": here the ``features``
output of an :class:`ftjax.models.ImageClassifier` (the globally average-pooled
backbone output that the heads read).

Example:
  >>> import tempfile
  >>> from ftjax import models
  >>> model = models.create_model("resnet_tiny", num_classes=10)
  >>> variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  >>> batches = [{"image": np.zeros((4, 32, 32, 3), np.float32), "label": np.arange(4),
  ...             "mask": np.array([1, 1, 1, 0])}]   # e.g. ds.eval_batches("train", batch_size=4)
  >>> feats, labels = extract_features(
  ...     model=model, variables=variables, batches=batches,
  ...     cache_path=tempfile.mkdtemp() + "/train.npz", cache_key="resnet_tiny/seed0/demo/train/32")
  >>> feats.shape, labels.tolist()   # the padding row is dropped
  ((3, 16), [0, 1, 2])
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from ftjax.core.batches import collect
from ftjax.core.io import save_npz

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
      features, labels = data["features"], data["labels"]
      # Files from before the content hash was stored have none; they are read as they are.
      recorded = str(data["content_sha256"]) if "content_sha256" in data.files else None
  except Exception:  # noqa: BLE001 - unreadable (a damaged zip raises several kinds) or foreign: recompute
    logging.warning("feature cache %s is unreadable; extracting the features again", cache_path)
    return None
  if recorded is not None and recorded != _content_sha256(features, labels):
    logging.warning("feature cache %s does not match its content hash; extracting the features again",
                    cache_path)
    return None
  return features.astype(np.float32), labels.astype(np.int64)


def _content_sha256(features: np.ndarray, labels: np.ndarray) -> str:
  digest = hashlib.sha256()
  for array in (features, labels):
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _save_atomic(cache_path: str, *, features: np.ndarray, labels: np.ndarray, cache_key: str) -> None:
  save_npz(cache_path, features=features, labels=labels, cache_key=np.array(cache_key),
           format=np.array(_CACHE_FORMAT),
           content_sha256=np.array(_content_sha256(features, labels)))  # readers never see half a file


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
  try:
    out, labels = collect(lambda batch, i: {"features": np.asarray(forward(variables, batch["image"]), np.float32)},
                          batches, total=total, progress=progress, description=description)
  except ValueError:
    out, labels = {}, np.zeros((0,), np.int64)
  if len(labels) == 0:
    raise ValueError("extract_features: the batches hold no examples")
  features, labels = out["features"], labels.astype(np.int64)
  finite = np.isfinite(features).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise ValueError(f"extract_features: {bad.size} of {len(features)} feature rows contain NaN/inf "
                     f"(first: row {bad[0]}); check the model weights and the input images")
  if cache_path is not None:
    _save_atomic(cache_path, features=features, labels=labels, cache_key=cache_key)
  return features, labels

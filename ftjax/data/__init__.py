"""TFDS image-classification pipelines: sampling, splits, augmentation, offline data.

TensorFlow and TFDS are imported when a pipeline name is first used (``data.load_dataset``,
``data.prepare_offline``...), not by ``import ftjax.data``: :mod:`ftjax.data.sampling`
(NumPy index selection) works without them.

Example:
  >>> from ftjax import data
  >>> data.prepare_offline("fashion_mnist", data_dir="/tmp/tfds")
  >>> ds = data.load_dataset("fashion_mnist", data_dir="/tmp/tfds", sampling_rate=15,
  ...                        seed=0, image_size=32)
  >>> batch = next(ds.train_batches(batch_size=64))
"""

import importlib

from ftjax.data.sampling import SPLIT_SEED, stratified_sample, stratified_split

# name -> module that defines it (imported on first use: these modules import TensorFlow).
_LAZY = {
    "default_resize_size": "ftjax.data.augment",
    "eval_transform": "ftjax.data.augment",
    "train_transform": "ftjax.data.augment",
    "offline_names": "ftjax.data.offline",
    "prepare_offline": "ftjax.data.offline",
    "ImageDataset": "ftjax.data.pipeline",
    "load_dataset": "ftjax.data.pipeline",
}


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'ftjax.data' has no attribute {name!r}")


__all__ = [
    "ImageDataset",
    "SPLIT_SEED",
    "default_resize_size",
    "eval_transform",
    "load_dataset",
    "offline_names",
    "prepare_offline",
    "stratified_sample",
    "stratified_split",
    "train_transform",
]

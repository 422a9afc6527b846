"""TFDS image-classification pipelines: sampling, splits, augmentation, offline data.

Example:
  >>> from ftjax import data
  >>> data.prepare_offline("fashion_mnist", data_dir="/tmp/tfds")
  >>> ds = data.load_dataset("fashion_mnist", data_dir="/tmp/tfds", sampling_rate=15,
  ...                        seed=0, image_size=32)
  >>> batch = next(ds.train_batches(batch_size=64))
"""

from ftjax.data.augment import default_resize_size
from ftjax.data.augment import eval_transform
from ftjax.data.augment import train_transform
from ftjax.data.offline import offline_names
from ftjax.data.offline import prepare_offline
from ftjax.data.pipeline import ImageDataset
from ftjax.data.pipeline import SPLIT_SEED
from ftjax.data.pipeline import load_dataset
from ftjax.data.pipeline import stratified_sample
from ftjax.data.pipeline import stratified_split

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

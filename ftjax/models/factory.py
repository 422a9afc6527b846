"""Models by name: :func:`create_model`, their names and their blocks."""

from __future__ import annotations

from typing import Any

from ftjax.models.efficientnet_lite import EFFICIENTNET_SPECS, LITE_MEAN, LITE_STD, EfficientNetBackbone
from ftjax.models.layers import ImageClassifier, compute_dtype
from ftjax.models.resnet import IMAGENET_MEAN, IMAGENET_STD, RESNET_SPECS, ResNetBackbone

MODEL_NAMES = tuple(RESNET_SPECS) + tuple(EFFICIENTNET_SPECS)


def _check_name(name: str) -> None:
  if name not in MODEL_NAMES:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")


def create_model(
    name: str,
    *,
    num_classes: int,
    keep_source_head: bool = False,
    num_source_classes: int = 1000,
    projection_dim: int = 0,
    dtype: Any = "float32",
) -> ImageClassifier:
  """Builds an :class:`~ftjax.models.layers.ImageClassifier` by name.

  Args:
    name: one of ``resnet18``, ``resnet26``, ``resnet50``, ``resnet_tiny``,
      ``efficientnet_lite0``, ``efficientnet_tiny``.
    num_classes: width of the target ``head``.
    keep_source_head: also build ``source_head`` (the pretrained classifier).
    num_source_classes: width of ``source_head``.
    projection_dim: width of the Bi-Tuning ``projector`` (output ``projection``);
      0 = none, and the parameters are exactly those of a model without it.
    dtype: computation dtype, ``"float32"`` or ``"bfloat16"`` (or the jnp dtype):
      convolutions and activations run in it; parameters, BatchNorm statistics,
      pooled features, heads and logits stay float32 (mixed precision).

  Returns:
    An unbound Linen module; input is NHWC raw pixels in ``[0, 255]``.
  """
  _check_name(name)
  if num_classes < 1 or num_source_classes < 1:
    raise ValueError(
        f"num_classes and num_source_classes must be >= 1, got {num_classes}, {num_source_classes}")
  if projection_dim < 0:
    raise ValueError(f"projection_dim must be >= 0 (0 = no projector), got {projection_dim}")
  dtype = compute_dtype(dtype)
  if name in RESNET_SPECS:
    backbone, mean, std = ResNetBackbone(RESNET_SPECS[name]), IMAGENET_MEAN, IMAGENET_STD
  else:
    backbone, mean, std = EfficientNetBackbone(EFFICIENTNET_SPECS[name]), LITE_MEAN, LITE_STD
  return ImageClassifier(
      backbone=backbone,
      num_classes=num_classes,
      model_name=name,
      mean=mean,
      std=std,
      keep_source_head=keep_source_head,
      num_source_classes=num_source_classes,
      projection_dim=int(projection_dim),
      dtype=dtype,
  )


def num_features(name: str) -> int:
  """Width of the pooled ``features`` output of model ``name``."""
  _check_name(name)
  spec = RESNET_SPECS.get(name) or EFFICIENTNET_SPECS[name]
  return spec.num_features


def block_prefixes(name: str) -> list[str]:
  """Ordered parameter-path prefixes of the backbone's blocks, input to output.

  What counts as a block: the stem (``stem_conv`` + ``stem_bn``) is block 0; then
  every residual block (ResNet ``stage{s}_block{b}``) or MBConv block
  (EfficientNet ``blocks_i``); EfficientNet's ``head_conv`` + ``head_bn`` is the
  last block. Together they cover every backbone parameter exactly once, so
  "fine-tune the last k blocks" is ``prefixes[-k:]``. ``head``/``source_head``
  are not blocks.

  A prefix is a regular expression; a parameter with "/"-joined path ``p``
  belongs to it iff ``re.match(f"(?:{prefix})/", p)`` (the trailing "/" keeps
  ``blocks_1`` from matching ``blocks_10``).

  Example:
    >>> block_prefixes("efficientnet_lite0")[-1]
    'backbone/head_conv|backbone/head_bn'
  """
  _check_name(name)
  stem = "backbone/stem_conv|backbone/stem_bn"
  if name in RESNET_SPECS:
    return [stem] + [f"backbone/{b}" for b in RESNET_SPECS[name].block_names()]
  blocks = [f"backbone/{b}" for b in EFFICIENTNET_SPECS[name].block_names()]
  return [stem] + blocks + ["backbone/head_conv|backbone/head_bn"]

"""Building blocks shared by ftjax's Linen models.

Mixed precision: an :class:`ImageClassifier` built with ``dtype=jnp.bfloat16`` runs its
backbone in bfloat16 (the normalised input is cast once; every :class:`Conv` computes in
its input's dtype with the float32 kernel cast to it) while parameters and BatchNorm
statistics stay float32, :class:`BatchNorm` normalises in float32 and returns its input's
dtype, and the pooled ``features`` (so every head, logit and loss) are float32.

:class:`Conv` stores its parameters exactly like ``flax.linen.Conv`` (``kernel``
HWIO, optional ``bias``) but calls :func:`ftjax.ops.conv.conv2d`, so the
convolution implementation can change without touching checkpoints or
parameter-path rules; :class:`BatchNorm` keeps ``flax.linen.BatchNorm``'s variables
and runs training mode through :func:`ftjax.ops.batch_norm.batch_norm_train`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.ops.batch_norm import batch_norm_train
from ftjax.ops.conv import conv2d
from ftjax.ops.geometry import Padding

# He-normal, fan-out: torchvision's ResNet conv initialisation.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Classifier heads: LeCun-normal kernel, zero bias (flax's Dense default, written
# out so the registry can initialise a head on its own with the same rule).
head_kernel_init = nn.initializers.lecun_normal()


class Conv(nn.Module):
  """2-D convolution on NHWC input with an HWIO ``kernel`` (``flax.linen.Conv`` layout).

  Attributes:
    features: output channels.
    kernel_size: ``(kh, kw)``.
    strides: ``(sh, sw)``.
    padding: ``"SAME"`` (TensorFlow semantics), ``"VALID"`` or explicit
      ``((top, bottom), (left, right))`` (torch-style symmetric padding is
      ``((p, p), (p, p))``).
    feature_group_count: ``in_channels`` for a depthwise convolution.
    use_bias: add a ``bias`` parameter.
    kernel_init: initialiser of the HWIO kernel.
    impl: :func:`~ftjax.ops.conv.conv2d` implementation (``"auto"`` picks per
      platform and shape; does not change the parameters).

  Example:
    >>> y, _ = Conv(8, (3, 3), padding=((1, 1), (1, 1))).init_with_output(
    ...     jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    >>> y.shape
    (1, 16, 16, 8)
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = "SAME"
  feature_group_count: int = 1
  use_bias: bool = False
  kernel_init: nn.initializers.Initializer = conv_kernel_init
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_channels = x.shape[-1]
    if in_channels % self.feature_group_count:
      raise ValueError(
          f"input channels {in_channels} not divisible by feature_group_count "
          f"{self.feature_group_count}")
    kernel_shape = (*self.kernel_size, in_channels // self.feature_group_count, self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
    y = conv2d(
        x,
        kernel.astype(x.dtype),
        strides=tuple(self.strides),
        padding=self.padding,
        feature_group_count=self.feature_group_count,
        impl=self.impl,
    )
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


class BatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` over the last axis, two passes each way in training mode.

  Training mode runs :func:`ftjax.ops.batch_norm.batch_norm_train` (a hand-written
  gradient). Same variables (``params/scale``, ``params/bias``, ``batch_stats/mean``,
  ``batch_stats/var``), initialisation, defaults, statistics and running-average rule
  as flax (``ra = momentum * ra + (1 - momentum) * batch_statistic``, not updated while
  initialising), so checkpoints, patches and parameter-path rules see no difference.

  Attributes:
    use_running_average: normalise by the running statistics; may instead be given
      at call time (exactly one of the two).
    momentum: running-average decay.
    epsilon: added to the variance.
  """

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    channels = (x.shape[-1],)
    scale = self.param("scale", nn.initializers.ones, channels, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, channels, jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), channels)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), channels)
    # Statistics and the normalisation arithmetic in float32 (a bfloat16 variance of
    # E[x^2] - E[x]^2 would cancel badly); the output goes back to the input's dtype, so a
    # bfloat16 network stays bfloat16 between layers.
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if use_running_average:
      y = (x.astype(compute_dtype) - ra_mean.value) * (scale * jax.lax.rsqrt(ra_var.value + self.epsilon)) + bias
      return y.astype(x.dtype)
    y, mean, var = batch_norm_train(x, scale=scale, bias=bias, epsilon=self.epsilon)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(var)
    return y.astype(x.dtype)


_BN_NAME = re.compile(r"(^|_)bn\d*$")


def batch_norm(name: str, *, train: bool, epsilon: float) -> BatchNorm:
  """BatchNorm with torch-equivalent momentum (flax 0.9 = torch 0.1).

  Every BatchNorm module name ends in ``bn`` plus an optional digit (``stem_bn``,
  ``bn1``), so path rules can select them with ``bn\\d*$``.
  """
  if not _BN_NAME.search(name):
    raise ValueError(f"BatchNorm module names must match {_BN_NAME.pattern!r}; got {name!r}")
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon, name=name)


def bn_layer(epsilon: float) -> BatchNorm:
  """BatchNorm as :func:`batch_norm` for a module's ``setup`` (named by its attribute; the mode is
  given per call: ``use_running_average=not train``)."""
  return BatchNorm(use_running_average=None, momentum=0.9, epsilon=epsilon)


def symmetric_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """torch ``padding=k // 2`` as explicit pairs (NOT "SAME": equal on both sides at stride 2)."""
  p = kernel_size // 2
  return ((p, p), (p, p))


def normalize_pixels(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """``(images - mean) / std`` per channel, ``images`` NHWC raw pixels."""
  mean_a = jnp.asarray(mean, images.dtype)
  std_a = jnp.asarray(std, images.dtype)
  return (images - mean_a) / std_a


OUTPUT_NAMES = ("features", "logits", "source_logits", "feature_maps", "projection")

# config.compute_dtype -> the dtype the backbone computes in (parameters stay float32).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: Any) -> Any:
  """The jnp dtype of a ``compute_dtype`` name (``"float32"`` or ``"bfloat16"``; a dtype passes through).

  Raises:
    ValueError: any other name.

  Example:
    >>> compute_dtype("bfloat16")
    <class 'jax.numpy.bfloat16'>
  """
  if isinstance(name, str):
    if name not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype must be one of {', '.join(map(repr, COMPUTE_DTYPES))}, got {name!r}")
    return COMPUTE_DTYPES[name]
  dtype = jnp.dtype(name)
  for known in COMPUTE_DTYPES.values():
    if dtype == jnp.dtype(known):
      return known
  raise ValueError(f"compute_dtype must be float32 or bfloat16, got {dtype}")


class ImageClassifier(nn.Module):
  """A backbone plus a target ``head`` and an optional pretrained ``source_head``.

  Called as ``model.apply(variables, images, train=..., outputs=(...), mutable=...)``
  and returns a dict with exactly the requested outputs:

  * ``features``: globally average-pooled backbone output ``[B, D]``;
  * ``logits``: target head ``[B, num_classes]``;
  * ``source_logits``: the kept pretrained head ``[B, num_source_classes]``
    (only with ``keep_source_head=True``);
  * ``feature_maps``: dict block name -> NHWC output of that block;
  * ``projection``: Bi-Tuning's projector, ``normalise(Dense(features))``
    ``[B, projection_dim]`` (only with ``projection_dim > 0``; parameters under
    ``projector``).

  Only the requested heads run; initialise with ``outputs=model.all_outputs`` to
  create every parameter.

  Attributes:
    backbone: a module ``(x, *, train) -> (features [B, D], feature_maps dict)``.
    num_classes: target classes.
    model_name: used in error messages.
    mean: per-channel pixel mean subtracted from the raw ``[0, 255]`` input.
    std: per-channel pixel std the input is divided by.
    keep_source_head: build ``source_head``.
    num_source_classes: width of ``source_head``.
    projection_dim: width of the ``projector`` (0 = no projector, no parameters).
    min_image_size: smallest accepted height/width.
    dtype: computation dtype of the backbone (``jnp.float32`` or ``jnp.bfloat16``);
      parameters are float32 either way and the pooled ``features``, heads and
      projection are float32.
  """

  backbone: nn.Module
  num_classes: int
  model_name: str
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  keep_source_head: bool = False
  num_source_classes: int = 1000
  projection_dim: int = 0
  min_image_size: int = 32
  dtype: Any = jnp.float32

  @property
  def all_outputs(self) -> tuple[str, ...]:
    """Every output this model can produce (init with these to get all parameters)."""
    return tuple(n for n in OUTPUT_NAMES if (n != "source_logits" or self.keep_source_head)
                 and (n != "projection" or self.projection_dim > 0))

  def _check_inputs(self, images: jax.Array, outputs: Sequence[str]) -> None:
    if isinstance(outputs, str):
      raise ValueError(f"outputs must be a sequence of names, got the string {outputs!r}")
    for name in outputs:
      if name not in OUTPUT_NAMES:
        raise ValueError(f"unknown output {name!r}; known: {', '.join(OUTPUT_NAMES)}")
      if name == "source_logits" and not self.keep_source_head:
        raise ValueError(
            f"output 'source_logits' requested but {self.model_name} was created with "
            "keep_source_head=False")
      if name == "projection" and self.projection_dim <= 0:
        raise ValueError(
            f"output 'projection' requested but {self.model_name} was created with "
            "projection_dim=0 (no projector)")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be NHWC with 3 channels, got shape {tuple(images.shape)}")
    size = min(images.shape[1], images.shape[2])
    if size < self.min_image_size:
      raise ValueError(
          f"image size {size} is too small for {self.model_name}; minimum {self.min_image_size}")

  @nn.compact
  def __call__(
      self, images: jax.Array, *, train: bool, outputs: Sequence[str] = ("logits",)
  ) -> dict[str, jax.Array]:
    self._check_inputs(images, outputs)
    x = normalize_pixels(images, self.mean, self.std).astype(compute_dtype(self.dtype))
    features, feature_maps = self.backbone(x, train=train)
    return classifier_outputs(outputs, features=features, feature_maps=feature_maps,
                              num_classes=self.num_classes, num_source_classes=self.num_source_classes,
                              projection_dim=self.projection_dim)


def classifier_outputs(outputs: Sequence[str], *, features: jax.Array, feature_maps: dict[str, jax.Array],
                       num_classes: int, num_source_classes: int, projection_dim: int = 0,
                       extra: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """The named outputs of a classifier on pooled ``features`` (called inside a compact ``__call__``:
  the heads ``head``, ``source_head`` and ``projector`` become the caller's submodules).

  ``extra`` holds further outputs the caller computed (SpotTune's ``policy``).
  """
  result = {}
  for name in outputs:
    if name == "features":
      result[name] = features
    elif name == "feature_maps":
      result[name] = feature_maps
    elif name == "logits":
      result[name] = nn.Dense(num_classes, kernel_init=head_kernel_init, name="head")(features)
    elif name == "source_logits":
      result[name] = nn.Dense(num_source_classes, kernel_init=head_kernel_init, name="source_head")(features)
    elif name == "projection" and projection_dim:
      z = nn.Dense(projection_dim, kernel_init=head_kernel_init, name="projector")(features)
      result[name] = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-24))
    elif extra is not None and name in extra:
      result[name] = extra[name]
  return result


class BlockwiseBackbone:
  """``__call__`` of a backbone made of ``stem``, named blocks and ``head`` (mixed into the Linen
  backbones): ``(pooled features, {block name: output, head_map: head output})``."""

  head_map = ""  # the feature-map name of the head's output ("": the head adds no map)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = self.stem(x, train=train)
    feature_maps = {}
    for name in self.spec.block_names():
      x = self.block(name, x, train=train)
      feature_maps[name] = x
    x = self.head(x, train=train)
    if self.head_map:
      feature_maps[self.head_map] = x
    # Pooled in float32: the heads, their logits and every loss stay float32 under bfloat16.
    return jnp.mean(x, axis=(1, 2), dtype=jnp.float32), feature_maps

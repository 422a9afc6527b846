"""EfficientNet-Lite (Lite0 and a test-sized variant).

Lite differs from EfficientNet-B0 in: no squeeze-excitation, ReLU6 instead of
swish, fixed stem (32) and head (1280) widths. Convolutions use TensorFlow "SAME"
padding (asymmetric at stride 2: the extra row/column goes at the end), which is
what lax "SAME" does; BatchNorm epsilon is 1e-3.

Parameter paths under ``backbone``: ``stem_conv``, ``stem_bn``, ``blocks_0`` ...
``blocks_{n-1}`` each with ``expand_conv``/``expand_bn`` (absent when the
expansion is 1), ``depthwise_conv``/``depthwise_bn``, ``project_conv``/``project_bn``;
then ``head_conv``/``head_bn``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from ftjax.models.layers import BlockwiseBackbone, Conv, batch_norm, bn_layer

LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)


@dataclasses.dataclass(frozen=True)
class MBConvSpec:
  """One inverted-residual block: depthwise ``kernel``, ``stride``, ``expansion``, output channels."""

  kernel: int
  stride: int
  expansion: int
  out_channels: int


@dataclasses.dataclass(frozen=True)
class EfficientNetSpec:
  """Architecture of an EfficientNet-Lite."""

  stem_channels: int
  blocks: tuple[MBConvSpec, ...]
  head_channels: int
  bn_epsilon: float = 1e-3

  @property
  def num_features(self) -> int:
    return self.head_channels

  def block_names(self) -> list[str]:
    return [f"blocks_{i}" for i in range(len(self.blocks))]


def _blocks(*rows: tuple[int, int, int, int]) -> tuple[MBConvSpec, ...]:
  return tuple(MBConvSpec(*row) for row in rows)


EFFICIENTNET_SPECS = {
    # Channel counts read from the efficientnet-lite0 checkpoint (16 blocks).
    "efficientnet_lite0": EfficientNetSpec(
        stem_channels=32,
        blocks=_blocks(
            (3, 1, 1, 16),
            (3, 2, 6, 24), (3, 1, 6, 24),
            (5, 2, 6, 40), (5, 1, 6, 40),
            (3, 2, 6, 80), (3, 1, 6, 80), (3, 1, 6, 80),
            (5, 1, 6, 112), (5, 1, 6, 112), (5, 1, 6, 112),
            (5, 2, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192),
            (3, 1, 6, 320),
        ),
        head_channels=1280,
    ),
    # Test-sized: expansion-1 residual block, a 5x5 stride-2 block, a residual
    # expanded block, then a channel-changing one.
    "efficientnet_tiny": EfficientNetSpec(
        stem_channels=8,
        blocks=_blocks((3, 1, 1, 8), (5, 2, 4, 16), (3, 1, 4, 16), (3, 1, 2, 24)),
        head_channels=32,
    ),
}


class MBConv(nn.Module):
  """Inverted residual block without squeeze-excitation; residual iff stride 1 and in == out."""

  spec: MBConvSpec
  bn_epsilon: float

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    spec, eps = self.spec, self.bn_epsilon
    in_channels = x.shape[-1]
    mid = in_channels * spec.expansion
    y = x
    if spec.expansion != 1:
      y = Conv(mid, (1, 1), padding="VALID", name="expand_conv")(y)
      y = nn.relu6(batch_norm("expand_bn", train=train, epsilon=eps)(y))
    y = Conv(
        mid, (spec.kernel, spec.kernel), (spec.stride, spec.stride), "SAME",
        feature_group_count=mid, name="depthwise_conv",
    )(y)
    y = nn.relu6(batch_norm("depthwise_bn", train=train, epsilon=eps)(y))
    y = Conv(spec.out_channels, (1, 1), padding="VALID", name="project_conv")(y)
    y = batch_norm("project_bn", train=train, epsilon=eps)(y)
    if spec.stride == 1 and in_channels == spec.out_channels:
      y = y + x
    return y


class EfficientNetBackbone(BlockwiseBackbone, nn.Module):
  """EfficientNet-Lite up to the globally average-pooled features.

  Returns ``(features [B, head_channels], feature_maps)`` where ``feature_maps``
  maps ``blocks_i`` and ``head_conv`` to their NHWC outputs. Its parts
  (:meth:`stem`, :meth:`block`, :meth:`head`) are callable one by one (SpotTune
  wraps them); only the parts that are called get parameters.
  """

  spec: EfficientNetSpec
  head_map = "head_conv"

  def setup(self):
    spec, eps = self.spec, self.spec.bn_epsilon
    self.stem_conv = Conv(spec.stem_channels, (3, 3), (2, 2), "SAME")
    self.stem_bn = bn_layer(eps)
    self.blocks = {f"blocks_{i}": MBConv(block, eps, name=f"blocks_{i}") for i, block in enumerate(spec.blocks)}
    self.head_conv = Conv(spec.head_channels, (1, 1), padding="VALID")
    self.head_bn = bn_layer(eps)

  def stem(self, x: jax.Array, *, train: bool) -> jax.Array:
    return nn.relu6(self.stem_bn(self.stem_conv(x), use_running_average=not train))

  def block(self, name: str, x: jax.Array, *, train: bool) -> jax.Array:
    return self.blocks[name](x, train=train)

  def head(self, x: jax.Array, *, train: bool) -> jax.Array:
    return nn.relu6(self.head_bn(self.head_conv(x), use_running_average=not train))

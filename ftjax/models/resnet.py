"""ResNets in the torchvision layout (and the Visual Decathlon ResNet-26).

Parameter paths under ``backbone``: ``stem_conv``, ``stem_bn``, then
``stage{s}_block{b}`` (s from 1, b from 0) holding ``conv1``/``bn1``,
``conv2``/``bn2`` (``conv3``/``bn3`` for bottlenecks) and, where the shortcut
changes shape, ``downsample_conv``/``downsample_bn``.

Padding is explicit and symmetric like torch (``((p, p), (p, p))``), never
"SAME": at stride 2, TF "SAME" pads asymmetrically and would not reproduce
torchvision's numbers.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from ftjax.models.layers import BlockwiseBackbone, Conv, batch_norm, bn_layer, symmetric_padding
from ftjax.ops.pool import max_pool

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """Architecture of a ResNet.

  Attributes:
    block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1-3x3-1x1, 4x expansion,
      stride on the 3x3 conv as in torchvision).
    stage_sizes: blocks per stage.
    widths: base width per stage (bottleneck output is 4x this).
    strides: stride of each stage's first block.
    stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool) or ``"small"`` (3x3/1 conv, no pool).
    stem_width: stem output channels.
    bn_epsilon: BatchNorm epsilon (torch default 1e-5).
  """

  block: str
  stage_sizes: tuple[int, ...]
  widths: tuple[int, ...]
  strides: tuple[int, ...]
  stem: str
  stem_width: int
  bn_epsilon: float = 1e-5

  @property
  def expansion(self) -> int:
    return 4 if self.block == "bottleneck" else 1

  @property
  def num_features(self) -> int:
    return self.widths[-1] * self.expansion

  def block_names(self) -> list[str]:
    return [f"stage{s + 1}_block{b}" for s, n in enumerate(self.stage_sizes) for b in range(n)]


RESNET_SPECS = {
    "resnet18": ResNetSpec("basic", (2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2), "imagenet", 64),
    # Visual Decathlon ResNet-26 (Rebuffi et al. 2017, used by SpotTune): 3x3/1 stem
    # to 32 channels, 3 stages x 4 basic blocks with 64/128/256 channels, stride 2 each.
    "resnet26": ResNetSpec("basic", (4, 4, 4), (64, 128, 256), (2, 2, 2), "small", 32),
    "resnet50": ResNetSpec("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2), "imagenet", 64),
    # Test-sized: 2 stages of 1 basic block, 8/16 channels.
    "resnet_tiny": ResNetSpec("basic", (1, 1), (8, 16), (1, 2), "small", 8),
}


class ResidualBlock(nn.Module):
  """Basic or bottleneck residual block (post-activation, torchvision v1.5)."""

  width: int
  stride: int
  bottleneck: bool
  bn_epsilon: float

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    eps = self.bn_epsilon
    out_channels = self.width * (4 if self.bottleneck else 1)
    stride = (self.stride, self.stride)
    if self.bottleneck:
      y = Conv(self.width, (1, 1), padding="VALID", name="conv1")(x)
      y = nn.relu(batch_norm("bn1", train=train, epsilon=eps)(y))
      y = Conv(self.width, (3, 3), stride, symmetric_padding(3), name="conv2")(y)
      y = nn.relu(batch_norm("bn2", train=train, epsilon=eps)(y))
      y = Conv(out_channels, (1, 1), padding="VALID", name="conv3")(y)
      y = batch_norm("bn3", train=train, epsilon=eps)(y)
    else:
      y = Conv(self.width, (3, 3), stride, symmetric_padding(3), name="conv1")(x)
      y = nn.relu(batch_norm("bn1", train=train, epsilon=eps)(y))
      y = Conv(self.width, (3, 3), padding=symmetric_padding(3), name="conv2")(y)
      y = batch_norm("bn2", train=train, epsilon=eps)(y)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_channels:
      shortcut = Conv(out_channels, (1, 1), stride, "VALID", name="downsample_conv")(x)
      shortcut = batch_norm("downsample_bn", train=train, epsilon=eps)(shortcut)
    return nn.relu(y + shortcut)


class ResNetBackbone(BlockwiseBackbone, nn.Module):
  """ResNet up to the globally average-pooled features.

  Returns ``(features [B, num_features], feature_maps)`` where ``feature_maps``
  maps every block name (``stage1_block0``, ...) to its NHWC output. Its parts
  (:meth:`stem`, :meth:`block`, :meth:`head`) are callable one by one, so a
  model that routes between blocks (SpotTune) wraps this backbone instead of
  re-implementing it; only the parts that are called get parameters.
  """

  spec: ResNetSpec

  def setup(self):
    spec = self.spec
    if spec.stem == "imagenet":
      self.stem_conv = Conv(spec.stem_width, (7, 7), (2, 2), symmetric_padding(7))
    else:
      self.stem_conv = Conv(spec.stem_width, (3, 3), padding=symmetric_padding(3))
    self.stem_bn = bn_layer(spec.bn_epsilon)
    blocks = {}
    for s, (n, width, stride) in enumerate(zip(spec.stage_sizes, spec.widths, spec.strides)):
      for b in range(n):
        name = f"stage{s + 1}_block{b}"
        blocks[name] = ResidualBlock(width, stride if b == 0 else 1, spec.block == "bottleneck",
                                     spec.bn_epsilon, name=name)
    self.blocks = blocks

  def stem(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.stem_bn(self.stem_conv(x), use_running_average=not train)
    if self.spec.stem == "imagenet":
      # torch MaxPool2d(3, 2, padding=1) pads with -inf, as max_pool does (fast kernels on
      # CPU). ReLU and max commute, so pooling first gives the same outputs and gradients
      # (a window's first maximum is the same unless all its inputs are <= 0, where the
      # ReLU's gradient is 0) and the ReLU and its gradient run on a 4x smaller map.
      return nn.relu(max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1))))
    return nn.relu(x)

  def block(self, name: str, x: jax.Array, *, train: bool) -> jax.Array:
    return self.blocks[name](x, train=train)

  def head(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train
    return x

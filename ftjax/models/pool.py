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

``impl="native"`` computes the same gradient in one pass with a CPU kernel
(``ftjax/native/max_pool.cc``, built by ``scripts/build_native.sh``; float32).
``impl="auto"`` uses it on CPU when built and ``reduce_window`` otherwise. The
shifted formulation is no longer chosen automatically: jitted inside ResNet-18
(b4, 48 px) it gave the stem 40-75% wrong gradients against float64, while it
matches flax on isolated pools (cause not found;
``tests/test_conv.py::test_resnet18_step_gradients_match_float64``); ``FTJAX_CONV_IMPL=xla`` (or
:func:`ftjax.models.conv.conv_impl` ``("xla")``) forces ``reduce_window``, as for the
convolutions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import flax.linen as nn

from ftjax.models import conv as conv_lib
from ftjax.models import native

POOL_IMPLS = ("auto", "xla", "shifted", "native")

LIBRARY = native.KernelLibrary("libftjax_max_pool.so", "FTJAX_MAX_POOL_LIBRARY",
                               {"ftjax_max_pool_backward": "FtjaxMaxPoolBackward"})


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


# The native gradient: g -> dx is linear in g (a scatter to each window's first
# maximum); its own derivatives come from the shifted formulation's, which computes
# the same function in XLA ops (slower, but only reached by second-order gradients).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _native_backward(x, y, g, window, strides, pads):
  reason = LIBRARY.unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"native max-pool gradient unavailable: {reason}")
  (kh, kw), (sh, sw), ((pt, _), (pl, _)) = window, strides, pads
  return jax.ffi.ffi_call(
      "ftjax_max_pool_backward", jax.ShapeDtypeStruct(x.shape, x.dtype),
      vmap_method="sequential")(
          x, g, window_h=np.int64(kh), window_w=np.int64(kw), stride_h=np.int64(sh),
          stride_w=np.int64(sw), pad_top=np.int64(pt), pad_left=np.int64(pl))


def _native_backward_fwd(x, y, g, window, strides, pads):
  return _native_backward(x, y, g, window, strides, pads), (x, y, g)


def _native_backward_bwd(window, strides, pads, residuals, ct):
  x, y, g = residuals
  _, vjp = jax.vjp(lambda x, y, g: _max_pool_shifted_bwd(window, strides, pads, (x, y), g)[0],
                   x, y, g)
  return vjp(ct)


_native_backward.defvjp(_native_backward_fwd, _native_backward_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_native(x, window, strides, pads):
  return _forward(x, window, strides, pads)


def _max_pool_native_bwd(window, strides, pads, residuals, g):
  x, y = residuals
  return (_native_backward(x, y, g, window, strides, pads),)


_max_pool_native.defvjp(_max_pool_shifted_fwd, _max_pool_native_bwd)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int] | None = None,
             padding: conv_lib.Padding = "VALID", *, impl: str = "auto") -> jax.Array:
  """NHWC max pooling, padded with -inf (as ``flax.linen.max_pool`` and torch's MaxPool2d).

  Args:
    x: ``[batch, height, width, channels]``.
    window: pooling window ``(kh, kw)``.
    strides: ``(sh, sw)`` (default ``(1, 1)``).
    padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``.
    impl: ``"auto"`` (``"native"`` on CPU for float32 when built, else
      ``reduce_window``), ``"xla"``, ``"shifted"`` or ``"native"``.

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
    if jax.default_backend() != "cpu" or conv_lib.forced_impl() == "xla":
      impl = "xla"
    elif x.dtype == jnp.float32 and LIBRARY.available():
      impl = "native"
    else:
      # Not "shifted": jitted inside ResNet-18 it gave wrong stem gradients
      # (test_resnet18_step_gradients_match_float64); the cause is not found yet.
      impl = "xla"
  if impl == "xla":
    return nn.max_pool(x, window, strides, padding=pads)
  if impl == "native":
    if x.dtype != jnp.float32:
      raise TypeError(f"the native max-pool gradient is float32 only; got {x.dtype}")
    return _max_pool_native(x, window, strides, pads)
  return _max_pool_shifted(x, window, strides, pads)

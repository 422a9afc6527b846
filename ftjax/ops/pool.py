"""Max pooling behind the models' stems, with fast kernels on CPU.

``flax.linen.max_pool`` lowers to ``lax.reduce_window``; its gradient is XLA's
``select_and_scatter``, which XLA:CPU runs slowly. :func:`max_pool` replaces the
gradient (``jax.custom_vjp``) and, with the native kernels, the forward pass too.

``impl="shifted"`` writes the gradient in XLA ops: each of the k² taps gets the
cotangent where it holds its window's first maximum, and the input is split into
stride phases so that every tap lands on a phase by a unit-stride shift (no strided
scatter). ResNet-18's 3x3/2 stem pool on 32x56x56x64, forward + gradient: 89.8 ms with
XLA's gradient, 37.9 ms with this one (``experiments/bench/conv_formulations.py``,
``experiments/bench/README.md``).

``impl="native"`` runs the forward pass and the gradient as CPU kernels
(``ftjax/ops/max_pool.cc``, built by ``scripts/build_native.sh``; float32), one
pass over the input each, on all cores. Same pool, jitted alone: forward 3.7 ms with
``reduce_window`` -> 1.1 ms, gradient 8.0 ms shifted -> 4.2-4.6 ms native. ``impl="auto"``
uses the kernels on CPU when built, else the shifted gradient, and ``reduce_window``
elsewhere; ``FTJAX_CONV_IMPL=xla`` (or :func:`ftjax.ops.conv.conv_impl` ``("xla")``)
forces ``reduce_window``, as for the convolutions.

Ties follow XLA's ``select_and_scatter`` with ``>=`` (what JAX's ``reduce_window`` max
gradient uses): the cotangent of a window goes to its first maximum in row-major window
order, so gradients equal ``flax.linen.max_pool``'s exactly, ties included. Both
gradients find each window's maximum from the input alone; until 2026-11-27 the
shifted one compared against the forward pass's output, which under jit can differ in
rounding from the taps it re-reads (see :func:`_shifted_gradient`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import flax.linen as nn

from ftjax.ops import conv as conv_lib
from ftjax.ops import geometry
from ftjax.ops import native

POOL_IMPLS = ("auto", "xla", "shifted", "native")

LIBRARY = native.KernelLibrary("libftjax_max_pool.so", "FTJAX_MAX_POOL_LIBRARY", {
    "ftjax_max_pool_forward": "FtjaxMaxPoolForward",
    "ftjax_max_pool_backward": "FtjaxMaxPoolBackward",
})


def _native_attrs(window, strides, pads) -> dict:
  (kh, kw), (sh, sw), ((pt, _), (pl, _)) = window, strides, pads
  return dict(window_h=np.int64(kh), window_w=np.int64(kw), stride_h=np.int64(sh),
              stride_w=np.int64(sw), pad_top=np.int64(pt), pad_left=np.int64(pl))


def _require_library() -> None:
  reason = LIBRARY.unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"native max-pool kernels unavailable: {reason}")


def _native_forward(x, window, strides, pads):
  _require_library()
  out_hw = geometry.output_hw(x.shape[1:3], window, strides, pads)
  return jax.ffi.ffi_call(
      "ftjax_max_pool_forward",
      jax.ShapeDtypeStruct((x.shape[0], *out_hw, x.shape[3]), x.dtype),
      vmap_method="sequential")(x, **_native_attrs(window, strides, pads))


def _pad_neg_inf(x, pads):
  return lax.pad(x, jnp.array(-jnp.inf, x.dtype),
                 ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def _shift(a, axis, offset, length):
  """``out[m] = a[m - offset]`` along ``axis`` for m in [0, length), zero outside ``a``."""
  cfg = [(0, 0, 0)] * a.ndim
  cfg[axis] = (offset, length - a.shape[axis] - offset, 0)
  return lax.pad(a, jnp.zeros((), a.dtype), cfg)


def _shifted_gradient(x, g, window, strides, pads):
  """dx of max pooling for cotangent ``g``, in XLA ops (see the module docstring)."""
  (kh, kw), (sh, sw) = window, strides
  (h, w), (oh, ow) = x.shape[1:3], g.shape[1:3]
  xp = _pad_neg_inf(x, pads)
  taps = [geometry.tap(xp, i, j, strides, (oh, ow)) for i in range(kh) for j in range(kw)]
  # The window maxima are recomputed from these taps, not taken from the forward pass:
  # under jit XLA may evaluate the pool's input twice with different rounding (once
  # fused into reduce_window, once into the taps), and then no tap equals the
  # forward's maximum (ResNet-18: 40-75% wrong stem gradients,
  # test_resnet18_step_gradients_match_float64).
  y = functools.reduce(jnp.maximum, taps)
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
  return dx.reshape(x.shape[0], mh * sh, mw * sw, x.shape[3])[:, :h, :w]


# The native gradient: g -> dx is linear in g (a scatter to each window's first
# maximum, which depends only on x); its own derivatives are those of the shifted
# formulation, which computes the same function in XLA ops.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _native_gradient(x, g, window, strides, pads):
  _require_library()
  return jax.ffi.ffi_call(
      "ftjax_max_pool_backward", jax.ShapeDtypeStruct(x.shape, x.dtype),
      vmap_method="sequential")(x, g, **_native_attrs(window, strides, pads))


def _native_gradient_fwd(x, g, window, strides, pads):
  return _native_gradient(x, g, window, strides, pads), (x, g)


def _native_gradient_bwd(window, strides, pads, residuals, ct):
  x, g = residuals
  return jax.vjp(lambda x, g: _shifted_gradient(x, g, window, strides, pads), x, g)[1](ct)


_native_gradient.defvjp(_native_gradient_fwd, _native_gradient_bwd)

_GRADIENTS = {"shifted": _shifted_gradient, "native": _native_gradient}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, pads, impl):
  if impl == "native":
    return _native_forward(x, window, strides, pads)
  return nn.max_pool(x, window, strides, padding=pads)


def _max_pool_fwd(x, window, strides, pads, impl):
  return _max_pool(x, window, strides, pads, impl), x


def _max_pool_bwd(window, strides, pads, impl, x, g):
  return (_GRADIENTS[impl](x, g, window, strides, pads),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int] | None = None,
             padding: geometry.Padding = "VALID", *, impl: str = "auto") -> jax.Array:
  """NHWC max pooling, padded with -inf (as ``flax.linen.max_pool`` and torch's MaxPool2d).

  Args:
    x: ``[batch, height, width, channels]``.
    window: pooling window ``(kh, kw)``.
    strides: ``(sh, sw)`` (default ``(1, 1)``).
    padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``.
    impl: ``"auto"`` (on CPU ``"native"`` for float32 when built, else ``"shifted"``;
      ``reduce_window`` elsewhere), ``"xla"``, ``"shifted"`` or ``"native"``.

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
  pads = geometry.resolve_padding(padding, x.shape[1:3], window, strides)
  if any(max(pair) >= k for pair, k in zip(pads, window)):
    raise ValueError(f"max_pool padding {pads} must be smaller than the window {window}: "
                     "a window of padding only has no maximum")
  out_hw = geometry.output_hw(x.shape[1:3], window, strides, pads)
  if min(out_hw) < 1:
    raise ValueError(f"max_pool output would be empty: input {x.shape[1:3]}, window {window}, "
                     f"strides {strides}, padding {pads}")
  if impl == "auto":
    if jax.default_backend() != "cpu" or conv_lib.forced_impl() == "xla":
      impl = "xla"
    elif x.dtype == jnp.float32 and LIBRARY.available():
      impl = "native"
    else:
      impl = "shifted"
  if impl == "xla":
    return nn.max_pool(x, window, strides, padding=pads)
  if impl == "native" and x.dtype != jnp.float32:
    raise TypeError(f"the native max-pool kernels are float32 only; got {x.dtype}")
  return _max_pool(x, window, strides, pads, impl)

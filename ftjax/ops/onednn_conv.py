"""Convolutions on CPU through oneDNN, called from XLA as FFI custom calls.

oneDNN is the library behind PyTorch's CPU convolutions. On the shapes of ResNet and
EfficientNet fine-tuning steps it runs a convolution's forward pass and both
gradients at 180-210 GFLOP/s where XLA:CPU's own convolutions reach 70-160 on the
same machine (``experiments/bench/README.md``). The kernels live in
``ftjax/ops/onednn_conv.cc``; ``pip install .`` (or ``scripts/build_native.sh`` in a
source checkout) compiles them against the pip-installed oneDNN pinned in
:mod:`ftjax.ops.build_kernels` into ``ftjax/ops/_build/``. Without that library
:func:`available` is False and :mod:`ftjax.ops.conv` keeps its XLA-based formulations.

:func:`conv2d_onednn` is differentiable to any order in reverse mode
(``jax.custom_vjp``: the input gradient is oneDNN's backward-data convolution, the
kernel gradient its backward-weights one, and their derivatives are again these
three), float32 only, and batched under ``jax.vmap`` one element at a time. A
gradient computes only what is needed (no input gradient for an image batch) and
takes both gradients from one call when both are: then the kernel gradient depends on
the last read of the kernel, and XLA no longer copies every donated kernel at the start
of a training step so that the optimizer's in-place update cannot overwrite it early.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.ops import native
from ftjax.ops.geometry import Pads, output_hw

LIBRARY = native.KernelLibrary("libftjax_onednn_conv.so", "FTJAX_ONEDNN_LIBRARY", {
    "ftjax_onednn_conv_forward": "FtjaxOnednnConvForward",
    "ftjax_onednn_conv_backward_data": "FtjaxOnednnConvBackwardData",
    "ftjax_onednn_conv_backward_weights": "FtjaxOnednnConvBackwardWeights",
    "ftjax_onednn_conv_backward": "FtjaxOnednnConvBackward",
}, preload=native.load_onednn)


def library_path() -> pathlib.Path:
  """Where the compiled handlers are looked for (``FTJAX_ONEDNN_LIBRARY`` overrides)."""
  return LIBRARY.path()


def available() -> bool:
  """Whether the oneDNN convolutions are built and loadable (CPU only)."""
  return LIBRARY.available()


def unavailable_reason() -> str | None:
  """None when :func:`available`, else what is missing."""
  return LIBRARY.unavailable_reason()


def _attrs(strides, pads, groups) -> dict:
  (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
  return dict(stride_h=np.int64(sh), stride_w=np.int64(sw), pad_top=np.int64(pt),
              pad_bottom=np.int64(pb), pad_left=np.int64(pl), pad_right=np.int64(pr),
              groups=np.int64(groups))


def _call(target: str, out_shape, *operands, strides, pads, groups):
  """One FFI call; ``out_shape`` is a shape, or a list of shapes for several results."""
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"oneDNN convolutions unavailable: {reason}")
  result = (jax.ShapeDtypeStruct(out_shape, jnp.float32) if isinstance(out_shape, tuple)
            else [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in out_shape])
  return jax.ffi.ffi_call(target, result, vmap_method="sequential")(
      *operands, **_attrs(strides, pads, groups))


# The three convolutions are bilinear, and each one's derivatives are the other two,
# so every order of reverse-mode derivative runs on oneDNN:
#   y  = forward(x, k)            dx = backward_data(dy, k)    dk = backward_weights(x, dy)
#   dx = backward_data(dy, k)     ddy = forward(ct, k)         dk = backward_weights(ct, dy)
#   dk = backward_weights(x, dy)  dx = backward_data(dy, ct)   ddy = forward(x, ct)
# The forward's VJP asks only for the gradients of perturbed operands (an image batch
# needs no input gradient) and takes both from one call, `_backward`, when both are
# needed; see FtjaxOnednnConvBackward in onednn_conv.cc for why one call.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _forward(x, kernel, strides, pads, groups):
  out_hw = output_hw(x.shape[1:3], kernel.shape[:2], strides, pads)
  return _call("ftjax_onednn_conv_forward", (x.shape[0], *out_hw, kernel.shape[3]),
               x, kernel, strides=strides, pads=pads, groups=groups)


def _forward_fwd(x, kernel, strides, pads, groups):
  # symbolic_zeros=True: operands arrive as CustomVJPPrimal(value, perturbed). What the
  # backward pass needs to know statically (which gradients, the shapes) rides in the
  # residuals' tree structure as the one dict key; an array is kept only if a gradient
  # reads it (a frozen kernel's layer keeps no input alive for the backward pass).
  need_x, need_kernel = x.perturbed, kernel.perturbed
  y = _forward(x.value, kernel.value, strides, pads, groups)
  key = (need_x, need_kernel, x.value.shape, kernel.value.shape)
  return y, {key: (x.value if need_kernel else None, kernel.value if need_x else None)}


def _forward_bwd(strides, pads, groups, residuals, ct):
  [((need_x, need_kernel, x_shape, kernel_shape), (x, kernel))] = residuals.items()
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    return None, None
  ct = ct.astype(jnp.float32)
  if need_x and need_kernel:
    return _backward(x, ct, kernel, strides, pads, groups)
  if need_x:
    return _backward_data(ct, kernel, x_shape[1:3], strides, pads, groups), None
  if need_kernel:
    return None, _backward_weights(x, ct, kernel_shape, strides, pads, groups)
  return None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _backward(x, dy, kernel, strides, pads, groups):
  """``(backward_data(dy, kernel), backward_weights(x, dy))`` in one FFI call."""
  dx, dkernel = _call("ftjax_onednn_conv_backward", [x.shape, kernel.shape], x, dy, kernel,
                      strides=strides, pads=pads, groups=groups)
  return dx, dkernel


def _backward_fwd(x, dy, kernel, strides, pads, groups):
  return _backward(x, dy, kernel, strides, pads, groups), (x, dy, kernel)


def _backward_bwd(strides, pads, groups, residuals, cts):
  x, dy, kernel = residuals
  ct_dx, ct_dkernel = (ct.astype(jnp.float32) for ct in cts)
  return (_backward_data(dy, ct_dkernel, x.shape[1:3], strides, pads, groups),
          _forward(ct_dx, kernel, strides, pads, groups)
          + _forward(x, ct_dkernel, strides, pads, groups),
          _backward_weights(ct_dx, dy, kernel.shape, strides, pads, groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _backward_data(dy, kernel, in_hw, strides, pads, groups):
  out_shape = (dy.shape[0], *in_hw, kernel.shape[2] * groups)
  return _call("ftjax_onednn_conv_backward_data", out_shape, dy, kernel,
               strides=strides, pads=pads, groups=groups)


def _backward_data_fwd(dy, kernel, in_hw, strides, pads, groups):
  return _backward_data(dy, kernel, in_hw, strides, pads, groups), (dy, kernel)


def _backward_data_bwd(in_hw, strides, pads, groups, residuals, ct):
  dy, kernel = residuals
  ct = ct.astype(jnp.float32)
  return (_forward(ct, kernel, strides, pads, groups),
          _backward_weights(ct, dy, kernel.shape, strides, pads, groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _backward_weights(x, dy, kernel_shape, strides, pads, groups):
  return _call("ftjax_onednn_conv_backward_weights", tuple(kernel_shape), x, dy,
               strides=strides, pads=pads, groups=groups)


def _backward_weights_fwd(x, dy, kernel_shape, strides, pads, groups):
  return _backward_weights(x, dy, kernel_shape, strides, pads, groups), (x, dy)


def _backward_weights_bwd(kernel_shape, strides, pads, groups, residuals, ct):
  x, dy = residuals
  ct = ct.astype(jnp.float32)
  return (_backward_data(dy, ct, x.shape[1:3], strides, pads, groups),
          _forward(x, ct, strides, pads, groups))


_forward.defvjp(_forward_fwd, _forward_bwd, symbolic_zeros=True)
_backward.defvjp(_backward_fwd, _backward_bwd)
_backward_data.defvjp(_backward_data_fwd, _backward_data_bwd)
_backward_weights.defvjp(_backward_weights_fwd, _backward_weights_bwd)


def conv2d_onednn(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int],
                  pads: Pads, feature_group_count: int = 1) -> jax.Array:
  """NHWC x HWIO float32 convolution run by oneDNN (forward and gradients).

  Args:
    x: ``[batch, height, width, in_channels]`` float32.
    kernel: ``[kh, kw, in_channels // feature_group_count, out_channels]`` float32.
    strides: spatial strides.
    pads: explicit ``((top, bottom), (left, right))`` padding.
    feature_group_count: groups (``in_channels`` for a depthwise convolution).

  Returns:
    ``[batch, out_height, out_width, out_channels]``, equal to
    ``lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=("NHWC",
    "HWIO", "NHWC"), feature_group_count=...)`` up to float rounding.

  Example::

    y = conv2d_onednn(x, kernel, strides=(1, 1), pads=((1, 1), (1, 1)))
  """
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise TypeError(
        f"conv2d_onednn is float32 only; got {x.dtype} input and {kernel.dtype} kernel")
  strides = tuple(int(s) for s in strides)
  pads = tuple(tuple(int(p) for p in pair) for pair in pads)
  return _forward(x, kernel, strides, pads, int(feature_group_count))

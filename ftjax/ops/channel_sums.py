"""Per-channel sums for BatchNorm in one pass over the activation (CPU kernels).

Training-mode BatchNorm needs two per-channel sums forward (``x`` and ``x^2``) and two
backward (``dy`` and ``dy * (x - mean)``). XLA:CPU reads the activation once per sum;
the FFI kernels in ``ftjax/ops/channel_sums.cc`` read it once for both, on all
cores. Whole training steps, kernels vs XLA's sums in one process taking turns:
EfficientNet-Lite0 b32/96 time ratio 0.901, ResNet-18 b32/112 0.971, b64/64 0.990
(``experiments/bench/README.md``). :mod:`ftjax.ops.batch_norm` calls
:func:`moments` and :func:`centred_sums`; they run the kernels on CPU for float32
when the library is built (``scripts/build_native.sh``) and ``jnp.sum`` otherwise,
or everywhere under ``FTJAX_CONV_IMPL=xla`` / ``conv_impl("xla")``.

Their derivatives are written in JAX
(``jax.custom_vjp``), so reverse mode of any order works.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.ops import conv as conv_lib
from ftjax.ops import native

LIBRARY = native.KernelLibrary("libftjax_channel_sums.so", "FTJAX_CHANNEL_SUMS_LIBRARY", {
    "ftjax_channel_moments": "FtjaxChannelMoments",
    "ftjax_channel_centred_sums": "FtjaxChannelCentredSums",
})


def available() -> bool:
  """Whether the kernels are built and loadable (``LIBRARY.path()``)."""
  return LIBRARY.available()


def unavailable_reason() -> str | None:
  """None when :func:`available`, else what is missing."""
  return LIBRARY.unavailable_reason()


def _use_kernels(*arrays: jax.Array) -> bool:
  return (jax.default_backend() == "cpu" and conv_lib.forced_impl() != "xla"
          and all(a.dtype == jnp.float32 for a in arrays) and available())


def _sum_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def _call(target: str, channels: int, *operands):
  out = jax.ShapeDtypeStruct((channels,), jnp.float32)
  return jax.ffi.ffi_call(target, (out, out), vmap_method="sequential")(*operands)


@jax.custom_vjp
def _moments_kernel(x):
  return _call("ftjax_channel_moments", x.shape[-1], x)


def _moments_fwd(x):
  return _moments_kernel(x), x


def _moments_bwd(x, cotangents):
  g_sum, g_sum_sq = cotangents
  return (g_sum + 2.0 * x * g_sum_sq,)


_moments_kernel.defvjp(_moments_fwd, _moments_bwd)


@jax.custom_vjp
def _centred_sums_kernel(dy, x, mean):
  return _call("ftjax_channel_centred_sums", x.shape[-1], dy, x, mean)


def _centred_sums_fwd(dy, x, mean):
  return _centred_sums_kernel(dy, x, mean), (dy, x, mean)


def _centred_sums_bwd(residuals, cotangents):
  dy, x, mean = residuals
  g_sum, g_centred = cotangents
  return (g_sum + (x - mean) * g_centred, dy * g_centred,
          -jnp.sum(dy, _sum_axes(dy)) * g_centred)


_centred_sums_kernel.defvjp(_centred_sums_fwd, _centred_sums_bwd)


def _check(x: jax.Array, *same_shape: jax.Array) -> None:
  if x.ndim < 2:
    raise ValueError(f"expected an activation [..., C] of rank >= 2; got shape {x.shape}")
  for a in same_shape:
    if a.shape != x.shape:
      raise ValueError(f"shapes differ: {a.shape} vs {x.shape}")


def moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sum(x), sum(x**2))`` over all axes but the last, each ``[C]``.

  Example:
    >>> s, s2 = moments(jnp.arange(6.0).reshape(3, 2))
    >>> s, s2
    (Array([6., 9.], dtype=float32), Array([20., 35.], dtype=float32))
  """
  _check(x)
  if _use_kernels(x):
    return _moments_kernel(x)
  axes = _sum_axes(x)
  return jnp.sum(x, axes), jnp.sum(x * x, axes)


def centred_sums(*, dy: jax.Array, x: jax.Array, mean: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """``(sum(dy), sum(dy * (x - mean)))`` over all axes but the last, each ``[C]``.

  Args:
    dy: cotangent of a BatchNorm output, ``x``'s shape.
    x: the BatchNorm input ``[..., C]``.
    mean: ``[C]``.
  """
  _check(x, dy)
  if mean.shape != x.shape[-1:]:
    raise ValueError(f"mean must have shape ({x.shape[-1]},); got {mean.shape}")
  if _use_kernels(dy, x, mean):
    return _centred_sums_kernel(dy, x, mean)
  axes = _sum_axes(x)
  return jnp.sum(dy, axes), jnp.sum(dy * (x - mean), axes)

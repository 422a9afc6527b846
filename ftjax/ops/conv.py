"""2-D convolution behind every conv layer of ftjax's models.

The models call :func:`conv2d` instead of ``lax.conv_general_dilated`` so that the
implementation can be chosen by platform and shape without touching the parameter
layout (kernels stay HWIO, exactly as ``flax.linen.Conv`` stores them).

Why: XLA:CPU runs convolutions well below the machine's matmul peak (measured, see
``experiments/bench/README.md``): 3x3 convs at 70-160 GFLOP/s where oneDNN reaches
180-210, convolutions on tiny spatial maps (a 3x3 kernel on a 2x2 map with 512
channels) and their gradients at a few GFLOP/s, depthwise convolutions at under 1.

Implementations:

* ``"onednn"``: oneDNN (the library behind PyTorch's CPU convolutions) through XLA
  FFI custom calls, forward and both gradients (:mod:`ftjax.ops.onednn_conv`);
  float32 on CPU, any strides, padding and groups. Needs the kernels built by
  ``scripts/build_native.sh`` (``scripts/setup.sh`` does it).
* ``"xla"``: ``lax.conv_general_dilated`` (always used on GPU/TPU under ``"auto"``).
* ``"matmul"``: pad, gather the ``kh * kw`` shifted (strided) views, concatenate them
  along channels and multiply by the kernel reshaped to ``[kh * kw * cin, cout]``.
  A 1x1 convolution is just a (strided) reshape + matmul. Dense convolutions only
  (``feature_group_count == 1``).
* ``"shifted"``: depthwise convolutions (``feature_group_count == in_channels`` and
  ``out_channels == in_channels``) as ``sum_ij shift_ij(x) * w_ij`` with a
  ``jax.custom_vjp``: the weight gradient is one variadic reduction (an output per
  tap), the input gradient a correlation of the cotangent per stride phase.
* ``"auto"``: on GPU/TPU ``"xla"``; on CPU ``"onednn"`` for float32 when it is
  built, otherwise (and for other dtypes) the fastest of the XLA-based formulations
  for the static shapes (see the constants below for the rule).

Mixed precision (bfloat16 activations, :func:`ftjax.models.create_model`'s ``dtype``):
the oneDNN kernels are float32 only, so on CPU a bfloat16 convolution takes the
XLA-based formulations ("matmul", "shifted", "xla"; a forced ``"onednn"`` falls back
to ``"xla"``) rather than being cast to float32 around the kernel: the step then runs
the arithmetic GPUs and TPUs run. "matmul" and "shifted" accumulate bfloat16 products
in float32 and round the output to bfloat16, as XLA's GPU convolutions do.

``FTJAX_CONV_IMPL=xla`` (environment, read at trace time) or the
:func:`conv_impl` context manager forces one implementation wherever ``"auto"`` is
requested, e.g. to compare against XLA.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from ftjax.ops import onednn_conv
from ftjax.ops.geometry import Padding, output_hw, pad_hw, resolve_padding, tap

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
IMPLS = ("auto", "xla", "matmul", "shifted", "onednn")

# Without oneDNN (or for dtypes other than float32), on CPU a dense conv uses
# "matmul" when it is 1x1, and otherwise while its patch matrix takes at most
# MATMUL_MAX_PATCH_BYTES -- except, on CPUs with AVX-512, for
# stride-1 convs with more than SMALL_IN_CHANNELS inputs on output maps of more than
# SMALL_MAP_POSITIONS positions, which keep XLA's own convolution (YNNPACK). Measured
# (forward + both gradients, experiments/bench/conv_formulations.py, README there):
# on an AVX-512 AMD EPYC (Zen 4) XLA beats patch extraction + matmul there (3x3, 64
# channels, 32x28x28: 40.5 ms vs 76.4 ms) while on tiny maps it is far slower (3x3,
# 512 channels, 64x2x2: 548 ms vs 14.7 ms); on the AVX2 machine of earlier
# measurements XLA lost on large maps too (32x28x28: 89.2 ms vs 68.1 ms; 32x56x56:
# 703 ms vs 262 ms).
SMALL_MAP_POSITIONS = 7 * 7
# With oneDNN, depthwise convs on output maps of fewer positions stay "shifted":
# 5x5 on 32x3x3x1152 took 7.0 ms in oneDNN vs 4.6 shifted, while from 6x6 up oneDNN
# wins (32x6x6x480 3x3: 0.9 vs 2.1 ms; conv_formulations bench, README there).
ONEDNN_DEPTHWISE_MIN_POSITIONS = 4 * 4
SMALL_IN_CHANNELS = 16
MATMUL_MAX_PATCH_BYTES = 512 * 2**20
# The "shifted" depthwise weight gradient reduces over the batch first when the
# output map has at least this many positions (see _depthwise_shifted_bwd).
DEPTHWISE_BATCH_FIRST_POSITIONS = 24 * 24

_forced_impl: str | None = None


@contextlib.contextmanager
def conv_impl(impl: str) -> Iterator[None]:
  """Forces ``impl`` for every ``conv2d(..., impl="auto")`` traced inside.

  Example::

    with conv_impl("xla"):
      logits = jax.jit(model.apply)(variables, images)  # traced with XLA convs
  """
  global _forced_impl
  _check_impl(impl)
  previous, _forced_impl = _forced_impl, impl
  try:
    yield
  finally:
    _forced_impl = previous


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; expected one of {IMPLS}")


# --------------------------------------------------------------------------- matmul


def _conv_matmul(x, kernel, strides, pads):
  """Dense conv as patch extraction + one matmul (autodiff gives matmul gradients)."""
  kh, kw, cin, cout = kernel.shape
  out_hw = output_hw(x.shape[1:3], (kh, kw), strides, pads)
  xp = pad_hw(x, pads)
  taps = [tap(xp, i, j, strides, out_hw) for i in range(kh) for j in range(kw)]
  # Tap order (i, j, cin) matches kernel.reshape(kh * kw * cin, cout).
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  n = x.shape[0]
  # Low-precision operands accumulate in float32 (as XLA's and cuDNN's convolutions do).
  accumulate = None if x.dtype == jnp.float32 else jnp.promote_types(x.dtype, jnp.float32)
  y = jnp.dot(patches.reshape(n * out_hw[0] * out_hw[1], kh * kw * cin),
              kernel.reshape(kh * kw * cin, cout), preferred_element_type=accumulate)
  return y.astype(x.dtype).reshape(n, *out_hw, cout)


# -------------------------------------------------------------------------- shifted


def _depthwise_forward(x, w, strides, pads):
  """``y = sum_ij tap_ij(pad(x)) * w[i, j]`` with ``w`` of shape ``[kh, kw, c]``."""
  kh, kw, _ = w.shape
  out_hw = output_hw(x.shape[1:3], (kh, kw), strides, pads)
  xp = pad_hw(x, pads)
  # bfloat16 taps are summed in float32 (one fused loop, no float32 copy of x).
  acc = jnp.promote_types(jnp.result_type(x, w), jnp.float32)
  y = None
  for i in range(kh):
    for j in range(kw):
      term = tap(xp, i, j, strides, out_hw).astype(acc) * w[i, j].astype(acc)
      y = term if y is None else y + term
  return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifted(x, w, strides, pads):
  return _depthwise_forward(x, w, strides, pads)


def _depthwise_shifted_fwd(x, w, strides, pads):
  return _depthwise_forward(x, w, strides, pads), (x, w)


def _depthwise_shifted_bwd(strides, pads, residuals, g):
  x, w = residuals
  kh, kw, _ = w.shape
  (sh, sw), (h, wd) = strides, x.shape[1:3]
  out_hw = g.shape[1:3]
  # Weight gradient: dw[i, j] = sum_nhw tap_ij(xp) * g for every tap, computed as
  # one variadic reduction (one output per tap) over the 4-D products. XLA:CPU emits
  # it as a single pass over x and g; separate per-tap reductions of sliced operands
  # measured 2-6x slower (weight-gradient table in experiments/bench/README.md).
  xp = pad_hw(x, pads)
  # Low-precision inputs accumulate in float32 (as jnp.sum does).
  acc_dtype = jnp.promote_types(g.dtype, jnp.float32)
  products = [(tap(xp, i, j, strides, out_hw) * g).astype(acc_dtype)
              for i in range(kh) for j in range(kw)]
  zeros = [jnp.zeros((), acc_dtype)] * len(products)

  def add(acc, val):
    return [a + v for a, v in zip(acc, val)]

  if out_hw[0] * out_hw[1] >= DEPTHWISE_BATCH_FIRST_POSITIONS:
    # Large maps: reduce over the batch first (a reduction over the major axis),
    # then over the much smaller [out_h, out_w, c] partial sums (measured 1.5-2.4x
    # faster at 48x48; slower below 24x24).
    partial = lax.reduce(products, zeros, add, (0,))
    sums = [p.sum((0, 1)) for p in partial]
  else:
    sums = lax.reduce(products, zeros, add, (0, 1, 2))
  dw = jnp.stack(sums).reshape(w.shape).astype(w.dtype)
  # Input gradient: every output position scattered g * w[i, j] back to the input
  # it read. Stride 1: a depthwise correlation of g with the flipped kernel.
  if (sh, sw) == (1, 1):
    gp = lax.pad(g, jnp.zeros((), g.dtype), (
        (0, 0, 0), (kh - 1 - pads[0][0], h - out_hw[0] + pads[0][0], 0),
        (kw - 1 - pads[1][0], wd - out_hw[1] + pads[1][0], 0), (0, 0, 0)))
    return _depthwise_forward(gp, w[::-1, ::-1], (1, 1), ((0, 0), (0, 0))), dw
  return _depthwise_strided_input_grad(g, w, (sh, sw), pads, (h, wd)), dw


def _depthwise_strided_input_grad(g, w, strides, pads, in_hw):
  """dx of a strided depthwise conv, one stride phase at a time.

  Padded input row ``u = a + s * t`` (phase ``a = u mod s``) is read only by the
  kernel rows ``i = a + s * m``, at output row ``q = t - m``. So each phase is a
  stride-1 correlation of ``g`` with that phase's taps -- ``k^2`` multiply-adds per
  output position in total, where correlating the stride-dilated ``g`` costs
  ``s^2`` times more (mostly on zeros). The phases are interleaved back by
  interior-padding each and summing (one fused pass; negative pads crop).
  """
  kh, kw, _ = w.shape
  (sh, sw), (h, wd), out_hw = strides, in_hw, g.shape[1:3]
  padded_hw = (h + pads[0][0] + pads[0][1], wd + pads[1][0] + pads[1][1])
  # Rows (columns) per phase: enough to cover the padded input.
  rows = tuple(-(-size // s) for size, s in zip(padded_hw, strides))
  zero = jnp.zeros((), g.dtype)
  acc = jnp.promote_types(jnp.result_type(g, w), jnp.float32)  # bfloat16 taps summed in float32
  dx = None
  for a in range(sh):
    taps_i = range(a, kh, sh)
    for b in range(sw):
      taps_j = range(b, kw, sw)
      if not taps_i or not taps_j:
        continue  # no kernel tap reads this phase: its gradient is zero
      mi, mj = len(taps_i), len(taps_j)
      # g[t - m] for t in [0, rows): mi - 1 zero rows above, crop/pad below.
      gp = lax.pad(g, zero, ((0, 0, 0), (mi - 1, rows[0] - out_hw[0], 0),
                             (mj - 1, rows[1] - out_hw[1], 0), (0, 0, 0)))
      phase = None
      for m, i in enumerate(taps_i):
        for l, j in enumerate(taps_j):
          shifted = lax.slice(gp, (0, mi - 1 - m, mj - 1 - l, 0),
                              (gp.shape[0], mi - 1 - m + rows[0], mj - 1 - l + rows[1], gp.shape[3]))
          term = shifted.astype(acc) * w[i, j].astype(acc)
          phase = term if phase is None else phase + term
      phase = phase.astype(g.dtype)
      # Phase row t is input row a + s * t - pad_lo.
      low_h, low_w = a - pads[0][0], b - pads[1][0]
      placed = lax.pad(phase, zero, (
          (0, 0, 0), (low_h, h - (low_h + sh * (rows[0] - 1) + 1), sh - 1),
          (low_w, wd - (low_w + sw * (rows[1] - 1) + 1), sw - 1), (0, 0, 0)))
      dx = placed if dx is None else dx + placed
  return dx  # phase (0, 0) always holds tap (0, 0), so dx is set


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


# ------------------------------------------------------------------------- dispatch


def _is_depthwise(x, kernel, feature_group_count) -> bool:
  cin = x.shape[-1]
  return feature_group_count == cin and kernel.shape[2] == 1 and kernel.shape[3] == cin


def _onednn_dtypes(x, kernel) -> bool:
  return x.dtype == jnp.float32 and kernel.dtype == jnp.float32


def forced_impl() -> str:
  """The implementation forced by :func:`conv_impl` or ``FTJAX_CONV_IMPL`` ("auto" if none)."""
  if _forced_impl is not None and _forced_impl != "auto":
    return _forced_impl
  forced = os.environ.get("FTJAX_CONV_IMPL", "auto") or "auto"
  _check_impl(forced)
  return forced


@functools.cache
def _host_has_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether the CPU's ``flags`` line in ``cpuinfo`` lists ``avx512f`` (False if unreadable)."""
  try:
    with open(cpuinfo, encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return "avx512f" in line.split(":", 1)[-1].split()
  except OSError:
    pass
  return False


def _auto_impl(x, kernel, feature_group_count, out_hw, strides=(1, 1)) -> str:
  forced = forced_impl()
  if forced != "auto":
    # A forced formulation that cannot express this conv falls back to XLA.
    if forced == "shifted" and not _is_depthwise(x, kernel, feature_group_count):
      return "xla"
    if forced == "matmul" and feature_group_count != 1:
      return "xla"
    if forced == "onednn" and not _onednn_dtypes(x, kernel):
      return "xla"
    return forced
  if jax.default_backend() != "cpu":
    return "xla"
  depthwise = _is_depthwise(x, kernel, feature_group_count) and x.shape[-1] > 1
  tiny_depthwise = depthwise and out_hw[0] * out_hw[1] < ONEDNN_DEPTHWISE_MIN_POSITIONS
  if _onednn_dtypes(x, kernel) and onednn_conv.available() and not tiny_depthwise:
    return "onednn"
  if depthwise:
    return "shifted"
  if feature_group_count != 1:
    return "xla"
  kh, kw = kernel.shape[:2]
  if kh == kw == 1:  # a (strided) reshape + matmul; no patch matrix
    return "matmul"
  stem = x.shape[-1] <= SMALL_IN_CHANNELS
  small_map = out_hw[0] * out_hw[1] <= SMALL_MAP_POSITIONS
  if not (stem or small_map or tuple(strides) != (1, 1)) and _host_has_avx512():
    return "xla"
  patch_bytes = (x.shape[0] * out_hw[0] * out_hw[1] * kh * kw * x.shape[-1]
                 * jnp.dtype(x.dtype).itemsize)
  return "matmul" if patch_bytes <= MATMUL_MAX_PATCH_BYTES else "xla"


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: tuple[int, int] = (1, 1),
    padding: Padding = "SAME",
    feature_group_count: int = 1,
    impl: str = "auto",
) -> jax.Array:
  """NHWC x HWIO convolution.

  Args:
    x: input ``[batch, height, width, in_channels]``.
    kernel: ``[kh, kw, in_channels // feature_group_count, out_channels]``.
    strides: spatial strides.
    padding: ``"SAME"`` (TensorFlow semantics: the extra pad goes at the end),
      ``"VALID"``, or explicit ``((top, bottom), (left, right))``.
    feature_group_count: ``in_channels`` for a depthwise convolution.
    impl: ``"auto"`` (fastest for platform and shape), ``"onednn"`` (CPU, float32),
      ``"xla"``, ``"matmul"`` (dense only) or ``"shifted"`` (depthwise only).

  Returns:
    ``[batch, out_height, out_width, out_channels]``.

  Example::

    y = conv2d(x, kernel, strides=(2, 2), padding="SAME")                 # dense
    y = conv2d(x, dw_kernel, padding="SAME", feature_group_count=x.shape[-1])
  """
  _check_impl(impl)
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(
        f"conv2d expects NHWC input and HWIO kernel; got shapes {x.shape} and {kernel.shape}")
  if x.shape[-1] != kernel.shape[2] * feature_group_count:
    raise ValueError(
        f"in_channels {x.shape[-1]} != kernel in_channels {kernel.shape[2]} x "
        f"feature_group_count {feature_group_count}")
  strides = tuple(int(s) for s in strides)
  pads = resolve_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
  out_hw = output_hw(x.shape[1:3], kernel.shape[:2], strides, pads)
  if min(out_hw) < 1:
    raise ValueError(
        f"conv2d output would be empty: input {x.shape[1:3]}, kernel {kernel.shape[:2]}, "
        f"strides {strides}, padding {pads}")
  if impl == "auto":
    impl = _auto_impl(x, kernel, feature_group_count, out_hw, strides)
  if impl == "matmul":
    if feature_group_count != 1:
      raise ValueError(
          f"impl='matmul' supports feature_group_count=1 only; got {feature_group_count}")
    return _conv_matmul(x, kernel, strides, pads)
  if impl == "onednn":
    return onednn_conv.conv2d_onednn(
        x, kernel, strides=strides, pads=pads, feature_group_count=feature_group_count)
  if impl == "shifted":
    if not _is_depthwise(x, kernel, feature_group_count):
      raise ValueError(
          f"impl='shifted' supports depthwise convs only (feature_group_count == "
          f"in_channels == out_channels); got feature_group_count={feature_group_count}, "
          f"kernel {kernel.shape}")
    y = _depthwise_shifted(x, kernel[:, :, 0, :], strides, pads)
    return y
  return lax.conv_general_dilated(
      x,
      kernel,
      window_strides=strides,
      padding=pads,
      dimension_numbers=_DIMENSION_NUMBERS,
      feature_group_count=feature_group_count,
  )

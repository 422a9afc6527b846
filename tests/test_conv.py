"""Every conv formulation equals ``lax.conv_general_dilated`` (forward and both gradients)."""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ftjax.ops import conv as conv_lib
from ftjax.ops import native
from ftjax.ops import onednn_conv
from ftjax.ops.conv import conv2d

SYMMETRIC = "symmetric"  # explicit ((k // 2, k // 2), (k // 2, k // 2)), as ResNet uses


def _padding(name, k):
  return ((k // 2, k // 2), (k // 2, k // 2)) if name == SYMMETRIC else name


def _reference(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
      precision=lax.Precision.HIGHEST)


def _assert_matches_reference(impl, *, k, stride, padding, depthwise, hw, channels=3,
                              out_channels=4, batch=2, seed=0):
  """Forward, d/dx and d/dkernel (vjp with a random cotangent) of ``impl`` vs lax."""
  rng = np.random.default_rng(seed)
  h, w = hw
  x = jnp.asarray(rng.normal(size=(batch, h, w, channels)), jnp.float32)
  groups = channels if depthwise else 1
  cout = channels if depthwise else out_channels
  kernel = jnp.asarray(rng.normal(size=(k, k, channels // groups, cout)), jnp.float32)
  padding = _padding(padding, k)
  strides = (stride, stride)

  def forward_and_grads(conv):
    def run(a, b, cotangent):
      y, vjp = jax.vjp(conv, a, b)
      return (y, *vjp(cotangent))
    return jax.jit(run)

  out_shape = jax.eval_shape(
      lambda a, b: _reference(a, b, strides, padding, groups), x, kernel).shape
  cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  want = forward_and_grads(lambda a, b: _reference(a, b, strides, padding, groups))(
      x, kernel, cotangent)
  got = forward_and_grads(
      lambda a, b: conv2d(a, b, strides=strides, padding=padding, feature_group_count=groups,
                          impl=impl))(x, kernel, cotangent)
  names = ("output", "grad x", "grad kernel")
  for name, a, b in zip(names, want, got):
    assert a.shape == b.shape, f"{name}: shape {b.shape} != {a.shape}"
    scale = float(np.abs(np.asarray(a)).max()) + 1e-6
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4 * scale,
                               err_msg=f"{impl} {name}")


# Fast subset: kernel 1/3/5/7, stride 1/2, SAME/VALID/symmetric, odd and even maps,
# tiny maps (1x1, 2x2, 3x3) and non-square maps, each formulation.
FAST_CASES = [
    # (k, stride, padding, hw)
    (1, 1, "SAME", (5, 5)),
    (1, 2, "VALID", (6, 7)),
    (3, 1, "SAME", (6, 6)),
    (3, 2, "SAME", (7, 7)),     # TF SAME, symmetric pads
    (3, 2, "SAME", (8, 8)),     # TF SAME, extra pad at the end
    (3, 2, SYMMETRIC, (8, 7)),
    (3, 1, "VALID", (5, 6)),
    (3, 1, "SAME", (1, 1)),     # tiny maps: the kernel is larger than the input
    (3, 1, "SAME", (2, 2)),
    (3, 2, SYMMETRIC, (3, 3)),
    (5, 1, "SAME", (3, 3)),
    (5, 2, "SAME", (9, 9)),
    (5, 2, "SAME", (10, 10)),
    (7, 2, SYMMETRIC, (9, 10)),  # ResNet stem
    (7, 1, "VALID", (7, 8)),
]


@pytest.mark.parametrize("k,stride,padding,hw", FAST_CASES)
def test_matmul_matches_lax_dense(k, stride, padding, hw):
  _assert_matches_reference("matmul", k=k, stride=stride, padding=padding, depthwise=False, hw=hw)


@pytest.mark.parametrize("k,stride,padding,hw", FAST_CASES)
def test_shifted_matches_lax_depthwise(k, stride, padding, hw):
  _assert_matches_reference("shifted", k=k, stride=stride, padding=padding, depthwise=True,
                            hw=hw, channels=5)


def test_onednn_kernels_are_built():
  # scripts/setup.sh builds them; without them CPU convs fall back to XLA formulations.
  assert onednn_conv.available(), onednn_conv.unavailable_reason()


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("k,stride,padding,hw", FAST_CASES)
def test_onednn_matches_lax(k, stride, padding, hw, depthwise):
  _assert_matches_reference("onednn", k=k, stride=stride, padding=padding,
                            depthwise=depthwise, hw=hw, channels=5 if depthwise else 3)


@pytest.mark.parametrize("k,stride,padding,hw,channels,out_channels,groups", [
    (3, 1, "SAME", (6, 6), 8, 12, 2),          # grouped
    (3, 2, ((0, 2), (1, 0)), (7, 6), 6, 6, 3),  # grouped, asymmetric pads
    (1, 2, "SAME", (5, 5), 4, 8, 4),           # depthwise with channel multiplier 2
    (3, 2, ((0, 2), (1, 0)), (7, 6), 3, 4, 1),  # dense, asymmetric pads
])
def test_onednn_grouped_and_asymmetric_match_lax(k, stride, padding, hw, channels,
                                                 out_channels, groups):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, *hw, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, channels // groups, out_channels)), jnp.float32)
  strides = (stride, stride)

  def loss(conv, a, b):
    y = conv(a, b)
    return jnp.sum(jnp.sin(y)), y

  ref = lambda a, b: _reference(a, b, strides, padding, groups)
  mine = lambda a, b: conv2d(a, b, strides=strides, padding=padding,
                             feature_group_count=groups, impl="onednn")
  (_, y0), g0 = jax.value_and_grad(lambda a, b: loss(ref, a, b), (0, 1), has_aux=True)(x, kernel)
  (_, y1), g1 = jax.jit(jax.value_and_grad(lambda a, b: loss(mine, a, b), (0, 1),
                                           has_aux=True))(x, kernel)
  for a, b in zip((y0, *g0), (y1, *g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max()))



# oneDNN 2.6's jit_1x1 backward-weights of a strided, unpadded 1x1 conv on NHWC input
# with fewer input channels than its channel block (8 under AVX2) writes past its
# per-thread workspace (uxlfoundation/oneDNN#6035): with 2 threads the kernel gradient
# of an 8x8x4 map came out wrong in about half the runs, with one thread a 16x16x4
# map corrupted the heap. onednn_conv.cc routes exactly that case to the stride-1
# kernel gradient on the subsampled input (RtusOverflows there).
FEW_CHANNEL_STRIDED_1X1 = [
    # (batch, hw, in_channels, out_channels, stride)
    (1, (8, 8), 4, 4, 2),     # the flaky test_auto_matches_lax[1-2-SAME-hw0-False]
    (2, (16, 16), 7, 16, 2),
    (2, (9, 12), 2, 8, 3),
    (2, (16, 16), 8, 8, 2),   # a full block under AVX2: oneDNN's own path there
]


@pytest.mark.parametrize("batch,hw,channels,out_channels,stride", FEW_CHANNEL_STRIDED_1X1)
def test_onednn_strided_1x1_kernel_gradient_is_right_every_time(batch, hw, channels,
                                                                out_channels, stride):
  # Each run must match: the old race left ~half the runs wrong, so 20 repetitions
  # of each gradient call (kernel only, and both gradients in one call) pass by
  # chance with probability ~1e-12.
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(batch, *hw, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(1, 1, channels, out_channels)), jnp.float32)
  strides, pads = (stride, stride), ((0, 0), (0, 0))
  out_hw = tuple(-(-n // stride) for n in hw)
  cotangent = jnp.asarray(rng.normal(size=(batch, *out_hw, out_channels)), jnp.float32)
  want = jax.vjp(lambda a, b: _reference(a, b, strides, pads, 1), x, kernel)[1](cotangent)
  conv = lambda a, b: conv2d(a, b, strides=strides, padding=pads, impl="onednn")
  kernel_only = jax.jit(lambda a, b, t: jax.vjp(lambda b: conv(a, b), b)[1](t)[0])
  both = jax.jit(lambda a, b, t: jax.vjp(conv, a, b)[1](t))
  scale = float(jnp.abs(want[1]).max())
  for _ in range(20):
    dx, dkernel = both(x, kernel, cotangent)
    np.testing.assert_allclose(kernel_only(x, kernel, cotangent), want[1], rtol=1e-4,
                               atol=1e-4 * scale)
    np.testing.assert_allclose(dkernel, want[1], rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(dx, want[0], rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(want[0]).max()))


_ONE_THREAD_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from ftjax.ops import onednn_conv
rng = np.random.default_rng(0)
for n, h, c, o in [(1, 16, 4, 4), (2, 16, 4, 4), (1, 8, 4, 4), (2, 16, 7, 16)]:
  x = rng.normal(size=(n, h, h, c)).astype(np.float32)
  ct = rng.normal(size=(n, h // 2, h // 2, o)).astype(np.float32)
  f = jax.jit(lambda x, k, ct: jax.vjp(lambda k: onednn_conv.conv2d_onednn(
      x, k, strides=(2, 2), pads=((0, 0), (0, 0))), k)[1](ct)[0])
  want = np.einsum("nhwc,nhwo->co", x[:, ::2, ::2].astype(np.float64), ct)
  for _ in range(5):
    got = np.asarray(f(x, jnp.zeros((1, 1, c, o), jnp.float32), ct))[0, 0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
print("ok")
"""


def test_onednn_strided_1x1_kernel_gradient_one_thread_in_bounds(monkeypatch):
  # With one oneDNN thread the overflow ran past the end of the scratchpad instead
  # ("free(): invalid next size", a crash): run it in a fresh process, where
  # OMP_NUM_THREADS=1 takes effect.
  from conftest import run_python
  monkeypatch.setenv("OMP_NUM_THREADS", "1")
  result = run_python(["-c", _ONE_THREAD_SCRIPT])
  assert result.stdout.strip().endswith("ok"), result.stdout

def test_onednn_second_order_and_vmap_match_lax():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)

  def grad_norm(impl):
    # Every derivative of the custom VJPs (data, weights, and their transposes).
    def loss(a, k):
      return jnp.sum(jnp.sin(conv2d(a, k, strides=(2, 2), impl=impl)))
    def outer(a, k):
      ga, gk = jax.grad(loss, (0, 1))(a, k)
      return jnp.sum(ga ** 2) + jnp.sum(gk ** 2)
    return jax.jit(jax.grad(outer, (0, 1)))(x[0], kernel)

  for a, b in zip(grad_norm("xla"), grad_norm("onednn")):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max()))
  batched = jax.jit(jax.vmap(lambda a: conv2d(a, kernel, impl="onednn")))(x)
  np.testing.assert_allclose(
      batched, jax.vmap(lambda a: _reference(a, kernel, (1, 1), "SAME", 1))(x),
      rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wrt", [(0,), (1,), (0, 1)])
def test_onednn_gradients_call_only_what_is_needed(wrt):
  """An image batch needs no input gradient; both gradients come from one call."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)

  def grads(impl):
    def loss(a, k):
      return jnp.sum(jnp.sin(conv2d(a, k, strides=(2, 2), impl=impl)))
    return jax.jit(jax.grad(loss, wrt))

  for a, b in zip(grads("xla")(x, kernel), grads("onednn")(x, kernel)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max()))
  hlo = grads("onednn").lower(x, kernel).compile().as_text()
  calls = set(re.findall(r'custom_call_target="(ftjax_onednn_conv_\w+)"', hlo))
  want = {(0,): {"forward", "backward_data"}, (1,): {"forward", "backward_weights"},
          (0, 1): {"forward", "backward"}}[wrt]
  assert calls == {f"ftjax_onednn_conv_{name}" for name in want}, calls


def test_onednn_training_step_does_not_copy_donated_kernels():
  """Both gradients in one call order the last read of a kernel before its update.

  With two calls XLA cannot tell whether backward-data reads a donated kernel before
  the optimizer overwrites it in place, and copies every kernel at the step's start.
  """
  rng = np.random.default_rng(8)
  images = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  params = {name: jnp.asarray(rng.normal(size=shape), jnp.float32)
            for name, shape in (("k1", (3, 3, 3, 8)), ("k2", (3, 3, 8, 8)))}

  def step(params, images, impl="onednn"):
    def loss(p):
      h = jax.nn.relu(conv2d(images, p["k1"], impl=impl))
      return jnp.sum(conv2d(h, p["k2"], strides=(2, 2), impl=impl) ** 2)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))

  hlo = jax.jit(step, donate_argnums=0).lower(params, images).compile().as_text()
  assert "ftjax_onednn_conv_backward\"" in hlo
  copied = re.findall(r"= f32\[[\d,]+\]\{[\d,]+\} copy\(", hlo)
  assert not copied, copied
  want = jax.jit(lambda p, x: step(p, x, impl="xla"))(params, images)
  got = jax.jit(step, donate_argnums=0)(dict(params), images)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(want[name]).max()))


def test_onednn_errors_are_clear(monkeypatch):
  x = jnp.zeros((1, 4, 4, 4), jnp.float16)
  kernel = jnp.zeros((3, 3, 4, 4), jnp.float16)
  with pytest.raises(TypeError, match="float32 only"):
    conv2d(x, kernel, impl="onednn")
  # Shapes the kernels do not agree with are refused by the C++ handler itself.
  call = jax.ffi.ffi_call("ftjax_onednn_conv_forward",
                          jax.ShapeDtypeStruct((1, 3, 3, 4), jnp.float32))
  with pytest.raises(Exception, match="output size does not match"):
    call(x.astype(jnp.float32), kernel.astype(jnp.float32), stride_h=np.int64(1),
         stride_w=np.int64(1), pad_top=np.int64(1), pad_bottom=np.int64(1),
         pad_left=np.int64(1), pad_right=np.int64(1), groups=np.int64(1))
  both = jax.ffi.ffi_call("ftjax_onednn_conv_backward",
                          [jax.ShapeDtypeStruct((1, 5, 5, 4), jnp.float32),
                           jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32)])
  with pytest.raises(Exception, match="input gradient shape differs"):
    both(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 4, 4, 4)), jnp.zeros((3, 3, 4, 4)),
         stride_h=np.int64(1), stride_w=np.int64(1), pad_top=np.int64(1),
         pad_bottom=np.int64(1), pad_left=np.int64(1), pad_right=np.int64(1),
         groups=np.int64(1))
  # A missing library names the file and the build command.
  monkeypatch.setenv("FTJAX_ONEDNN_LIBRARY", "/nonexistent/libftjax_onednn_conv.so")
  fresh = native.KernelLibrary(onednn_conv.LIBRARY.name, onednn_conv.LIBRARY.env_var,
                              onednn_conv.LIBRARY.targets)
  reason = fresh.unavailable_reason()
  assert "/nonexistent/libftjax_onednn_conv.so" in reason and "build_native.sh" in reason
  monkeypatch.setattr(onednn_conv, "LIBRARY", fresh)
  assert not onednn_conv.available()
  with pytest.raises(RuntimeError, match="build_native.sh"):
    conv2d(x.astype(jnp.float32), kernel.astype(jnp.float32), impl="onednn")


def test_auto_uses_onednn_for_float32_on_cpu(monkeypatch):
  x = jnp.zeros((2, 4, 4, 8))
  for kernel, groups in ((jnp.zeros((3, 3, 8, 8)), 1), (jnp.zeros((3, 3, 1, 8)), 8),
                         (jnp.zeros((3, 3, 4, 8)), 2), (jnp.zeros((1, 1, 8, 8)), 1)):
    assert conv_lib._auto_impl(x, kernel, groups, (4, 4)) == "onednn"
  # Depthwise convs on tiny output maps stay "shifted" (faster there).
  assert conv_lib._auto_impl(jnp.zeros((2, 3, 3, 8)), jnp.zeros((5, 5, 1, 8)), 8,
                             (3, 3)) == "shifted"
  assert conv_lib._auto_impl(jnp.zeros((2, 3, 3, 8)), jnp.zeros((3, 3, 8, 8)), 1,
                             (3, 3)) == "onednn"
  # Other dtypes keep the XLA-based rules; so does a host without the kernels.
  assert conv_lib._auto_impl(x.astype(jnp.bfloat16), jnp.zeros((3, 3, 1, 8), jnp.bfloat16),
                             8, (4, 4)) == "shifted"
  monkeypatch.setenv("FTJAX_CONV_IMPL", "onednn")
  assert conv_lib._auto_impl(x.astype(jnp.bfloat16), jnp.zeros((3, 3, 8, 8), jnp.bfloat16),
                             1, (4, 4)) == "xla"
  monkeypatch.delenv("FTJAX_CONV_IMPL")
  monkeypatch.setattr(onednn_conv, "available", lambda: False)
  assert conv_lib._auto_impl(x, jnp.zeros((3, 3, 1, 8)), 8, (4, 4)) == "shifted"


@pytest.mark.parametrize("k,stride,padding,hw", [
    (3, 1, "SAME", (24, 24)),   # exactly DEPTHWISE_BATCH_FIRST_POSITIONS outputs
    (5, 2, "SAME", (50, 49)),   # 25x25 outputs, odd TF SAME pads
    (3, 1, "SAME", (23, 25)),   # 575 outputs: the single-reduction path
])
def test_shifted_large_maps_match_lax(k, stride, padding, hw):
  # The weight gradient switches to a batch-first reduction on large output maps.
  _assert_matches_reference("shifted", k=k, stride=stride, padding=padding, depthwise=True,
                            hw=hw, channels=3, batch=2)


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("k,stride,padding,hw", [
    (1, 2, "SAME", (8, 8)), (3, 1, "SAME", (2, 2)), (5, 2, "SAME", (12, 12)),
    (3, 1, SYMMETRIC, (80, 80)),   # a large map: "auto" may pick XLA here
])
def test_auto_matches_lax(k, stride, padding, hw, depthwise):
  _assert_matches_reference("auto", k=k, stride=stride, padding=padding, depthwise=depthwise,
                            hw=hw, channels=4, batch=1)


def test_explicit_asymmetric_padding_and_grouped_fallback():
  # Asymmetric explicit pads go through every formulation; a grouped (non-depthwise)
  # conv under "auto" falls back to XLA and still matches.
  _assert_matches_reference("matmul", k=3, stride=2, padding=((0, 2), (1, 0)), depthwise=False,
                            hw=(7, 6))
  _assert_matches_reference("shifted", k=3, stride=2, padding=((0, 2), (1, 0)), depthwise=True,
                            hw=(7, 6))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 6)), jnp.float32)
  np.testing.assert_allclose(
      conv2d(x, kernel, feature_group_count=2),
      _reference(x, kernel, (1, 1), "SAME", 2), rtol=1e-5, atol=1e-5)


def test_same_padding_follows_tensorflow_numpy():
  # Independent of lax: TF "SAME" with stride 2 on an even map pads 0 before and 1
  # after (out = ceil(in / stride)); a direct NumPy loop re-derives the output.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 6, 6, 2)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
  xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  want = np.zeros((1, 3, 3, 3), np.float32)
  for r, c in itertools.product(range(3), range(3)):
    patch = xp[0, 2 * r:2 * r + 3, 2 * c:2 * c + 3, :]
    want[0, r, c] = np.einsum("hwi,hwio->o", patch, kernel)
  for impl in ("xla", "matmul", "auto"):
    got = conv2d(jnp.asarray(x), jnp.asarray(kernel), strides=(2, 2), padding="SAME", impl=impl)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=impl)
  dw_kernel = rng.normal(size=(3, 3, 1, 2)).astype(np.float32)
  want_dw = np.zeros((1, 3, 3, 2), np.float32)
  for r, c in itertools.product(range(3), range(3)):
    want_dw[0, r, c] = np.einsum("hwc,hwc->c", xp[0, 2 * r:2 * r + 3, 2 * c:2 * c + 3, :],
                                 dw_kernel[:, :, 0, :])
  got = conv2d(jnp.asarray(x), jnp.asarray(dw_kernel), strides=(2, 2), padding="SAME",
               feature_group_count=2, impl="shifted")
  np.testing.assert_allclose(np.asarray(got), want_dw, rtol=1e-5, atol=1e-5)


def test_jit_and_second_order_gradients_of_shifted():
  # The custom VJP's backward is itself differentiable (e.g. for meta-gradients).
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 5, 5, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 3)), jnp.float32)

  def grad_norm(impl):
    def loss(k):
      return jnp.sum(jnp.sin(conv2d(x, k, strides=(2, 2), feature_group_count=3, impl=impl)))
    return jax.jit(jax.grad(lambda k: jnp.sum(jax.grad(loss)(k) ** 2)))(kernel)

  np.testing.assert_allclose(grad_norm("shifted"), grad_norm("xla"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("avx512", [True, False])
def test_auto_dispatch_choices_on_cpu(monkeypatch, avx512):
  # The rules for hosts without the oneDNN kernels (and for non-float32 dtypes).
  assert jax.default_backend() == "cpu"
  monkeypatch.setattr(onednn_conv, "available", lambda: False)
  monkeypatch.setattr(conv_lib, "_host_has_avx512", lambda: avx512)
  x_small = jnp.zeros((2, 4, 4, 8))
  x_big = jnp.zeros((2, 128, 128, 8))
  dense3 = jnp.zeros((3, 3, 8, 8))
  dense1 = jnp.zeros((1, 1, 8, 8))
  depthwise = jnp.zeros((3, 3, 1, 8))
  grouped = jnp.zeros((3, 3, 4, 8))
  assert conv_lib._auto_impl(x_small, depthwise, 8, (4, 4)) == "shifted"
  assert conv_lib._auto_impl(x_big, dense1, 1, (128, 128)) == "matmul"
  assert conv_lib._auto_impl(x_small, dense3, 1, (4, 4)) == "matmul"
  assert conv_lib._auto_impl(x_small, grouped, 2, (4, 4)) == "xla"
  # Stride-1 3x3 convs with many channels: matmul up to SMALL_MAP_POSITIONS output
  # positions, above that XLA on AVX-512 hosts (matmul otherwise); strided ones and
  # stems stay matmul on large maps too.
  kernel = jnp.zeros((3, 3, 64, 64))
  assert conv_lib._auto_impl(jnp.zeros((2, 7, 7, 64)), kernel, 1, (7, 7)) == "matmul"
  assert conv_lib._auto_impl(jnp.zeros((2, 8, 8, 64)), kernel, 1, (8, 8)) == (
      "xla" if avx512 else "matmul")
  assert conv_lib._auto_impl(jnp.zeros((2, 56, 56, 64)), kernel, 1, (28, 28), (2, 2)) == "matmul"
  assert conv_lib._auto_impl(jnp.zeros((2, 56, 56, 3)), jnp.zeros((3, 3, 3, 64)), 1,
                             (56, 56)) == "matmul"
  # A strided conv uses matmul while the patch matrix fits the cap, then XLA.
  patch_bytes_per_image = 28 * 28 * 9 * 64 * 4
  fits = conv_lib.MATMUL_MAX_PATCH_BYTES // patch_bytes_per_image
  assert conv_lib._auto_impl(jnp.zeros((fits, 56, 56, 64)), kernel, 1, (28, 28), (2, 2)) == "matmul"
  assert conv_lib._auto_impl(jnp.zeros((fits + 1, 56, 56, 64)), kernel, 1, (28, 28),
                             (2, 2)) == "xla"


def test_avx512_detection_parses_the_flags_line(tmp_path):
  def detect(text):
    path = tmp_path / f"cpuinfo{len(text)}"
    path.write_text(text)
    return conv_lib._host_has_avx512.__wrapped__(str(path))

  zen4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
  avx2 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"
  # avx512bw alone (no foundation flag) and "avx512f" in another line do not count.
  partial = "model name\t: avx512f-ish\nflags\t\t: avx2 avx512bw avx512_vnni\n"
  assert detect(zen4) is True
  assert detect(avx2) is False
  assert detect(partial) is False
  assert conv_lib._host_has_avx512.__wrapped__(str(tmp_path / "missing")) is False


def test_forcing_xla_by_context_and_environment(monkeypatch):
  monkeypatch.setattr(onednn_conv, "available", lambda: False)
  x = jnp.zeros((1, 4, 4, 8))
  depthwise = jnp.zeros((3, 3, 1, 8))
  with conv_lib.conv_impl("xla"):
    assert conv_lib._auto_impl(x, depthwise, 8, (4, 4)) == "xla"
  assert conv_lib._auto_impl(x, depthwise, 8, (4, 4)) == "shifted"
  monkeypatch.setenv("FTJAX_CONV_IMPL", "xla")
  assert conv_lib._auto_impl(x, depthwise, 8, (4, 4)) == "xla"
  # A forced formulation that cannot express the conv falls back to XLA.
  monkeypatch.setenv("FTJAX_CONV_IMPL", "shifted")
  assert conv_lib._auto_impl(x, jnp.zeros((3, 3, 8, 8)), 1, (4, 4)) == "xla"
  monkeypatch.setenv("FTJAX_CONV_IMPL", "bogus")
  with pytest.raises(ValueError, match="bogus"):
    conv2d(x, depthwise, feature_group_count=8)


def test_bad_arguments_raise_clear_errors():
  x = jnp.zeros((1, 4, 4, 4))
  dense = jnp.zeros((3, 3, 4, 4))
  depthwise = jnp.zeros((3, 3, 1, 4))
  with pytest.raises(ValueError, match="unknown conv impl 'fast'"):
    conv2d(x, dense, impl="fast")
  with pytest.raises(ValueError, match="unknown padding 'FULL'"):
    conv2d(x, dense, padding="FULL")
  with pytest.raises(ValueError, match="non-negative"):
    conv2d(x, dense, padding=((-1, 1), (1, 1)))
  with pytest.raises(ValueError, match="matmul"):
    conv2d(x, depthwise, feature_group_count=4, impl="matmul")
  with pytest.raises(ValueError, match="shifted"):
    conv2d(x, dense, impl="shifted")
  with pytest.raises(ValueError, match="in_channels 4"):
    conv2d(x, jnp.zeros((3, 3, 2, 4)))
  with pytest.raises(ValueError, match="empty"):
    conv2d(x, jnp.zeros((7, 7, 4, 4)), padding="VALID")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["matmul", "shifted", "onednn"])
def test_full_grid_matches_lax(impl):
  kinds = {"matmul": (False,), "shifted": (True,), "onednn": (False, True)}[impl]
  for k, stride, padding, size, depthwise in itertools.product(
      (1, 3, 5, 7), (1, 2), ("SAME", "VALID", SYMMETRIC), (1, 2, 3, 6, 7, 14), kinds):
    if padding == "VALID" and size < k:
      continue
    _assert_matches_reference(impl, k=k, stride=stride, padding=padding,
                              depthwise=depthwise, hw=(size, size + 1), channels=8,
                              out_channels=16)


# --------------------------------------------------------------------------- max pool

from ftjax.ops import pool as pool_lib  # noqa: E402


@pytest.mark.parametrize("window,stride,padding,hw", [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (9, 8)),   # the ResNet stem pool, odd and even sizes
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (8, 7)),
    ((2, 2), (2, 2), "VALID", (7, 6)),
    ((3, 3), (1, 1), "SAME", (5, 6)),
    ((3, 2), (2, 1), ((1, 0), (0, 1)), (7, 5)),
])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("impl,channels", [("shifted", 3), ("native", 3), ("native", 37)])
def test_max_pool_matches_flax_with_ties(window, stride, padding, hw, ties, impl, channels):
  import flax.linen as nn
  rng = np.random.default_rng(0)
  # 37 channels: the native kernels' SIMD loops with a remainder.
  x = rng.normal(size=(2, *hw, channels)).astype(np.float32)
  if ties:  # after a ReLU: many windows hold several equal maxima (zeros)
    x = np.maximum(np.round(x), 0.0)
  x = jnp.asarray(x)
  pads = padding if isinstance(padding, str) else padding
  ref = lambda v: nn.max_pool(v, window, stride, padding=pads)
  got = jax.jit(lambda v: pool_lib.max_pool(v, window, stride, padding=pads, impl=impl))
  y, vjp = jax.vjp(got, x)
  y_ref, vjp_ref = jax.vjp(ref, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  # The cotangent of a window goes to the same (first) maximum as XLA's select_and_scatter.
  np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["native", "shifted"])
def test_relu_after_max_pool_equals_relu_before(impl):
  """ResNet's stem pools before its ReLU: same outputs and gradients as torch's order."""
  import flax.linen as nn
  rng = np.random.default_rng(4)
  # Rounded: exact ties, and windows that are all <= 0 (where the two orders route the
  # cotangent to different inputs, with a zero ReLU gradient in both).
  z = jnp.asarray(np.round(rng.normal(size=(2, 9, 8, 5)) * 2) - 1.0, jnp.float32)
  pool_first = lambda v: nn.relu(pool_lib.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1)),
                                                   impl=impl))
  relu_first = lambda v: nn.max_pool(nn.relu(v), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  y, vjp = jax.vjp(jax.jit(pool_first), z)
  y_ref, vjp_ref = jax.vjp(relu_first, z)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  # Routed to the same inputs; where windows overlap, the sums may differ in order.
  np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]),
                             rtol=1e-6, atol=1e-6)


def test_max_pool_native_kernel_is_built():
  # Built by scripts/setup.sh; without it "auto" would silently fall back to "shifted".
  assert pool_lib.LIBRARY.available(), pool_lib.LIBRARY.unavailable_reason()


def test_max_pool_native_second_order_matches_flax():
  import flax.linen as nn
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 6, 3)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 3, 3)), jnp.float32)

  def penalty(pool):
    grad = jax.grad(lambda v: jnp.sum(jnp.sin(pool(v)) * w))
    return lambda v: jnp.sum(grad(v) ** 2 * v)

  got = jax.grad(penalty(lambda v: pool_lib.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1)),
                                                     impl="native")))(x)
  want = jax.grad(penalty(lambda v: nn.max_pool(v, (3, 3), (2, 2), padding=((1, 1), (1, 1)))))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_max_pool_dispatch_and_errors(monkeypatch):
  x = jnp.ones((1, 6, 6, 2))
  # Squared, so that the gradient needs the forward's output.
  text = jax.jit(jax.grad(lambda v: (pool_lib.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1)))
                                     ** 2).sum())).lower(x).as_text()
  assert "select_and_scatter" not in text  # CPU auto: the native kernels
  assert "ftjax_max_pool_backward" in text and "ftjax_max_pool_forward" in text
  with pytest.raises(TypeError, match="float32 only"):
    pool_lib.max_pool(x.astype(jnp.bfloat16), (2, 2), impl="native")
  # The C++ handler checks shapes too (g that does not fit x).
  with pytest.raises(Exception, match="does not fit"):
    pool_lib._native_gradient(  # pylint: disable=protected-access
        x, jnp.ones((1, 9, 9, 2)), (2, 2), (1, 1), ((0, 0), (0, 0))).block_until_ready()
  with pytest.raises(Exception, match="g must have x's batch and channel sizes"):
    pool_lib._native_gradient(  # pylint: disable=protected-access
        x, jnp.ones((1, 5, 5, 3)), (2, 2), (1, 1), ((0, 0), (0, 0))).block_until_ready()
  with pytest.raises(Exception, match="padding must be smaller than the window"):
    pool_lib._native_forward(  # pylint: disable=protected-access
        x, (2, 2), (1, 1), ((2, 0), (0, 0))).block_until_ready()
  monkeypatch.setattr(pool_lib.LIBRARY, "available", lambda: False)
  text = jax.jit(jax.grad(lambda v: pool_lib.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))).sum())
                 ).lower(x).as_text()
  assert "select_and_scatter" not in text and "ftjax_max_pool_backward" not in text  # shifted
  monkeypatch.undo()
  monkeypatch.setenv("FTJAX_CONV_IMPL", "xla")
  text = jax.jit(jax.grad(lambda v: pool_lib.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))).sum())
                 ).lower(x).as_text()
  assert "select_and_scatter" in text
  with pytest.raises(ValueError, match="unknown pool impl"):
    pool_lib.max_pool(x, (2, 2), impl="fast")
  with pytest.raises(ValueError, match="NHWC"):
    pool_lib.max_pool(x[0], (2, 2))
  with pytest.raises(ValueError, match="smaller than the window"):
    pool_lib.max_pool(x, (2, 2), padding=((2, 0), (0, 0)))
  with pytest.raises(ValueError, match="empty"):
    pool_lib.max_pool(x, (7, 7))


@pytest.mark.parametrize("pool_impl", ["native", "shifted"])
def test_resnet18_step_gradients_match_float64(pool_impl, monkeypatch):
  """The whole CPU fast path (oneDNN convs, BatchNorm, a max-pool gradient), jitted in
  float32, against the same model differentiated eagerly in float64 with XLA's convs
  and XLA's max-pool gradient.

  This caught the shifted max-pool gradient comparing taps against the forward pass's
  output: under jit the stem got 40-75% wrong gradients on this input (2026-11-27).
  """
  from ftjax.models import resnet
  monkeypatch.setattr(resnet, "max_pool", functools.partial(_pool_with_impl, impl=pool_impl))
  from ftjax import models
  import optax

  model = models.create_model("resnet18", num_classes=5)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (4, 48, 48, 3)).astype(np.float32)
  labels = rng.integers(0, 5, 4).astype(np.int32)

  def grads(dtype, jit):
    cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
    params, stats = cast(variables["params"]), cast(variables["batch_stats"])

    def loss(p):
      out, _ = model.apply({"params": p, "batch_stats": stats}, jnp.asarray(images, dtype),
                           train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean()

    return jax.tree.leaves((jax.jit(jax.grad(loss)) if jit else jax.grad(loss))(params))

  with jax.enable_x64(True):
    want = grads(jnp.float64, jit=False)
  got = grads(jnp.float32, jit=True)
  for g, w in zip(got, want):
    scale = float(np.max(np.abs(w)))
    if scale > 1e-6:  # leaves whose gradient is zero up to rounding carry no signal
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-4 * scale)


def _pool_with_impl(*args, impl, **kwargs):
  # The float64 reference uses XLA's own gradient (select_and_scatter).
  if args[0].dtype != jnp.float32:
    impl = "xla"
  return pool_lib.max_pool(*args, impl=impl, **kwargs)

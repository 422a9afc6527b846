r"""Per-shape timings of the convolution and pooling formulations of ``ftjax.models``.

  .venv/bin/python -m experiments.bench.conv_formulations            # the models' shapes
  .venv/bin/python -m experiments.bench.conv_formulations --repeats 9

Each row times one jitted function that returns the input and weight gradients of
``sum(op(x, w) * g)`` (a forward pass plus both backward products, as in a training
step), for every formulation that can express the op; the formulations are run
interleaved (round robin) so that machine load affects them alike. ``auto`` names what
:func:`ftjax.ops.conv.conv2d` picks for the shape on this platform, so a row whose
fastest column is not the ``auto`` choice shows a rule to revisit (``onednn`` for
float32 when built, else ``SMALL_MAP_POSITIONS`` / ``SMALL_IN_CHANNELS`` /
``MATMUL_MAX_PATCH_BYTES``). The shapes are the convolutions of
ResNet-18 at batch 32 / 112 px and batch 64 / 64 px, the stem max pool, and the
depthwise convolutions of EfficientNet-Lite0 at batch 32 / 96 px (the issue-9 cases).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import host_memory
from ftjax.ops import conv as conv_lib
from ftjax.ops import onednn_conv
from ftjax.ops import pool as pool_lib

# (label, batch, map size, in channels, out channels, kernel, stride); depthwise when
# out channels is None.
SHAPES = (
    ("r18/112 stem 7x7/2", 32, 112, 3, 64, 7, 2),
    ("r18/112 layer1 3x3", 32, 28, 64, 64, 3, 1),
    ("r18/112 layer2 3x3/2", 32, 28, 64, 128, 3, 2),
    ("r18/112 layer2 3x3", 32, 14, 128, 128, 3, 1),
    ("r18/112 layer3 3x3", 32, 7, 256, 256, 3, 1),
    ("r18/112 layer4 3x3", 32, 4, 512, 512, 3, 1),
    ("r18/64 layer1 3x3", 64, 16, 64, 64, 3, 1),
    ("r18/64 layer2 3x3", 64, 8, 128, 128, 3, 1),
    ("r18/224 layer1 3x3", 32, 56, 64, 64, 3, 1),
    ("lite0/96 dw 3x3 s1 (stage 1)", 32, 48, 32, None, 3, 1),
    ("lite0/96 dw 3x3 s2 (stage 2)", 32, 48, 96, None, 3, 2),
    ("lite0/96 dw 3x3 s1 (stage 2)", 32, 24, 144, None, 3, 1),
    ("lite0/96 dw 5x5 s2 (stage 3)", 32, 24, 144, None, 5, 2),
    ("lite0/96 dw 5x5 s1 (stage 3)", 32, 12, 240, None, 5, 1),
    ("lite0/96 dw 3x3 s1 (stage 4)", 32, 6, 480, None, 3, 1),
    ("lite0/96 dw 5x5 s1 (stage 6)", 32, 3, 1152, None, 5, 1),
)
POOLS = (("r18/112 stem max pool 3x3/2", 32, 56, 64), ("r18/64 stem max pool 3x3/2", 64, 32, 64))


def _grad_fn(op):
  def loss(x, w, g):
    return jnp.sum(op(x, w) * g)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _time_interleaved(fns: dict, args: dict, repeats: int) -> dict[str, float]:
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args[name]))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per formulation (median)")
  args = parser.parse_args()
  host_memory.retain_freed_host_memory()  # as the training scripts do
  rng = np.random.default_rng(0)
  print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"median of {args.repeats}, ms per forward + both gradients")
  onednn = onednn_conv.available()
  if not onednn:
    print(f"(no onednn column: {onednn_conv.unavailable_reason()})")
  print("| op | shape (N, HxW, Cin -> Cout, k/s) | xla | matmul | shifted | onednn | auto picks |")
  print("|---|---|---|---|---|---|---|")
  for label, n, hw, cin, cout, k, s in SHAPES:
    depthwise = cout is None
    x = jnp.asarray(rng.normal(size=(n, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 1 if depthwise else cin, cin if depthwise else cout)),
                    jnp.float32) * 0.1
    groups = cin if depthwise else 1
    pads = ((k // 2, k // 2), (k // 2, k // 2))
    y = conv_lib.conv2d(x, w, strides=(s, s), padding=pads, feature_group_count=groups, impl="xla")
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    impls = (("xla", "shifted") if depthwise else ("xla", "matmul")) + (
        ("onednn",) if onednn else ())
    fns = {impl: _grad_fn(lambda x, w, impl=impl: conv_lib.conv2d(
        x, w, strides=(s, s), padding=pads, feature_group_count=groups, impl=impl)) for impl in impls}
    ms = _time_interleaved(fns, {impl: (x, w, g) for impl in impls}, args.repeats)
    auto = conv_lib._auto_impl(x, w, groups, y.shape[1:3], (s, s))  # pylint: disable=protected-access
    cells = [f"{ms[i]:.1f}" if i in ms else "" for i in ("xla", "matmul", "shifted", "onednn")]
    shape = f"{n}, {hw}x{hw}, {cin} -> {cin if depthwise else cout}, {k}/{s}"
    print(f"| {label} | {shape} | " + " | ".join(cells) + f" | {auto} |", flush=True)
  for label, n, hw, c in POOLS:
    x = jax.nn.relu(jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32))
    g = jnp.asarray(rng.normal(size=(n, hw // 2, hw // 2, c)), jnp.float32)
    fns = {impl: _grad_fn(lambda x, w, impl=impl: pool_lib.max_pool(
        x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=impl) * w) for impl in ("xla", "shifted")}
    ms = _time_interleaved(fns, {i: (x, jnp.ones(()), g) for i in fns}, args.repeats)
    print(f"| {label} | {n}, {hw}x{hw}, {c} | {ms['xla']:.1f} |  | {ms['shifted']:.1f} |  | "
          f"{'shifted' if jax.default_backend() == 'cpu' else 'xla'} |", flush=True)


if __name__ == "__main__":
  main()

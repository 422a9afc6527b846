"""Training-step throughput on one accelerator: ftjax against PyTorch, float32 and bfloat16.

For ResNet-50 and EfficientNet-Lite0 at 224 px on synthetic in-memory batches (random
pixels and labels, already on the device), one training step is: forward in train mode
(BatchNorm batch statistics), softmax cross-entropy, backward, SGD with momentum 0.9.

* ftjax: :func:`ftjax.models.create_model` with ``dtype="float32"`` or ``"bfloat16"``
  (mixed precision: parameters and optimizer state float32, convolutions and
  activations bfloat16, BatchNorm statistics and the loss float32), one ``jax.jit`` with
  the state donated.
* PyTorch: the reference modules of :mod:`ftjax.testing.torch_models` in
  ``channels_last``; bfloat16 as ``torch.autocast`` (parameters float32), and
  ``torch.compile`` for the bfloat16 ResNet-50 (on CUDA; eager elsewhere). Float32 on
  both sides may use TF32 tensor cores for convolutions and matmuls (JAX's default
  precision on GPU; ``torch.backends.*.allow_tf32 = True`` here).
* Lite0 with 3 seeds: the same step ``jax.vmap``-ed over a stacked state (a leading
  seed axis on parameters, statistics, optimizer state and batch) as one program,
  against the three seeds' states stepped one after another with the single-seed
  step.

Printed per case: images/s (median step time over ``--steps`` timed steps after
``--warmup`` untimed ones), the ftjax/PyTorch ratio, and the fraction of the chip's
peak FLOP/s: training FLOPs per image from XLA's cost analysis of the step written with
``lax`` convolutions (``conv_impl("xla")``; custom calls are invisible to the cost
analysis), times images/s, over :data:`PEAK_FLOPS` for the device kind (bfloat16
peak for bfloat16, TF32 peak for float32 on NVIDIA; dense, no sparsity).

Needs JAX, Flax, Optax and (for the PyTorch columns) torch; not TensorFlow, TFDS or
ml_collections (this module imports only :mod:`ftjax.models`, :mod:`ftjax.losses` and
:mod:`ftjax.ops`). On one GPU the whole default run takes a few minutes (budget: 6).

Usage::

  python -m experiments.bench.accelerator                 # on the accelerator
  python -m experiments.bench.accelerator --quick         # CPU smoke run: batch 2, 96 px, 2 steps
  python -m experiments.bench.accelerator --models resnet50 --dtypes bfloat16 --no-torch
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax.losses import softmax_cross_entropy
from ftjax.models import create_model
from ftjax.ops import conv as conv_lib

NUM_CLASSES = 1000
MODELS = ("resnet50", "efficientnet_lite0")
DTYPES = ("float32", "bfloat16")
VMAP_SEEDS = 3

# Peak dense FLOP/s per device kind: (bfloat16, float32 as the frameworks run it by
# default). NVIDIA: vendor datasheets, tensor cores, no sparsity; float32 = TF32
# (what cuDNN/cuBLAS use for float32 convolutions under JAX's default precision and
# torch's allow_tf32). TPU: bfloat16 MXU peak for both (JAX's default precision runs
# float32 matmuls and convolutions as bfloat16 passes). Matched as lower-case
# substrings of ``jax.devices()[0].device_kind``, first match wins.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("h200", 989e12, 494e12),
    ("h100 pcie", 756e12, 378e12),
    ("h100", 989e12, 494e12),          # SXM
    ("a100", 312e12, 156e12),
    ("l4", 121e12, 60e12),
    ("a10g", 70e12, 35e12),
    ("tpu v6", 918e12, 918e12),        # Trillium
    ("tpu v5 lite", 197e12, 197e12),   # v5e
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5p", 459e12, 459e12),
    ("tpu v5", 459e12, 459e12),
    ("tpu v4", 275e12, 275e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The table's peak FLOP/s of ``device_kind`` for ``dtype`` (None: unknown device, e.g. a CPU).

  Example:
    >>> peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")
    989000000000000.0
    >>> peak_flops("cpu", "float32") is None
    True
  """
  kind = device_kind.lower()
  for key, bf16, f32 in PEAK_FLOPS:
    if key in kind:
      return bf16 if dtype == "bfloat16" else f32
  return None


class Result(NamedTuple):
  name: str
  dtype: str
  framework: str
  images_per_s: float
  flops_per_image: float | None = None
  note: str = ""


def _median_rate(step: Callable[[], None], *, batch: int, warmup: int, steps: int) -> float:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return batch / statistics.median(times)


def _flops(lowered) -> float | None:
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


# ----------------------------------------------------------------------------- JAX


def _jax_parts(name: str, dtype: str, batch: int, size: int):
  """``(train_step, initial state, images, labels)`` of one model and computation dtype."""
  model = create_model(name, num_classes=NUM_CLASSES, dtype=dtype)
  optimizer = optax.sgd(0.01, momentum=0.9)

  def init(key):
    variables = model.init(key, jnp.zeros((1, size, size, 3), jnp.float32), train=False, outputs=("logits",))
    return variables["params"], variables["batch_stats"], optimizer.init(variables["params"])

  def train_step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                     outputs=("logits",), mutable=["batch_stats"])
      return softmax_cross_entropy(logits=outputs["logits"], labels=labels), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(0, 255, (batch, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
  return train_step, init, images, labels


def jax_case(name: str, dtype: str, batch: int, size: int, *, warmup: int, steps: int) -> Result:
  train_step, init, images, labels = _jax_parts(name, dtype, batch, size)
  state = jax.jit(init)(jax.random.key(0))
  for leaf in jax.tree.leaves(state):   # mixed precision keeps every variable float32
    assert leaf.dtype == jnp.float32, leaf.dtype
  with conv_lib.conv_impl("xla"):
    flops = _flops(jax.jit(train_step).lower(state, images, labels))
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, images, labels).compile()
  holder = [state]

  def step():
    holder[0], loss = compiled(holder[0], images, labels)
    loss.block_until_ready()

  rate = _median_rate(step, batch=batch, warmup=warmup, steps=steps)
  return Result(name, dtype, "ftjax", rate, None if flops is None else flops / batch)


def jax_vmapped_seeds(name: str, dtype: str, batch: int, size: int, *, warmup: int, steps: int,
                      seeds: int = VMAP_SEEDS) -> tuple[Result, Result]:
  """``seeds`` seeds as one vmapped program, and the same seeds stepped one after another."""
  train_step, init, images, labels = _jax_parts(name, dtype, batch, size)
  keys = jax.random.split(jax.random.key(0), seeds)
  stacked = jax.jit(jax.vmap(init))(keys)
  rng = np.random.default_rng(1)
  seed_images = jnp.asarray(rng.uniform(0, 255, (seeds, *images.shape)), jnp.float32)
  seed_labels = jnp.asarray(rng.integers(0, NUM_CLASSES, (seeds, batch)), jnp.int32)
  vmapped = jax.jit(jax.vmap(train_step), donate_argnums=0).lower(stacked, seed_images, seed_labels).compile()
  holder = [stacked]

  def vmapped_step():
    holder[0], loss = vmapped(holder[0], seed_images, seed_labels)
    loss.block_until_ready()

  vmapped_rate = _median_rate(vmapped_step, batch=seeds * batch, warmup=warmup, steps=steps)
  del holder
  states = [jax.jit(init)(k) for k in keys]
  single = jax.jit(train_step, donate_argnums=0).lower(states[0], images, labels).compile()

  def serial_step():
    loss = None
    for i in range(seeds):
      states[i], loss = single(states[i], seed_images[i], seed_labels[i])
    loss.block_until_ready()

  serial_rate = _median_rate(serial_step, batch=seeds * batch, warmup=warmup, steps=steps)
  return (Result(name, dtype, f"ftjax {seeds} seeds vmapped", vmapped_rate),
          Result(name, dtype, f"ftjax {seeds} seeds serial", serial_rate))


# ----------------------------------------------------------------------------- PyTorch


def torch_case(name: str, dtype: str, batch: int, size: int, *, warmup: int, steps: int,
               compile_model: bool) -> Result:
  """One PyTorch training step (channels_last; bfloat16 as autocast), timed like the JAX one."""
  import torch

  from ftjax.testing import torch_models

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  torch.manual_seed(0)
  if name.startswith("efficientnet"):
    model = torch_models.TorchEfficientNetLite0(num_classes=NUM_CLASSES)
  else:
    model = torch_models.TorchResNet(name, num_classes=NUM_CLASSES)
  mean, std = model.mean, model.std
  model = model.to(device=device, memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  pixels = torch.rand(batch, 3, size, size, device=device) * 255
  images = torch_models.normalize_pixels(pixels, mean, std).contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
  forward = model
  note = "eager"
  if compile_model:
    forward = torch.compile(model)
    note = "torch.compile"
  autocast = dtype == "bfloat16"

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
      logits = forward(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()

  rate = _median_rate(step, batch=batch, warmup=warmup, steps=steps)
  return Result(name, dtype, "torch", rate, note=note)


# ----------------------------------------------------------------------------- main


def format_rows(results: list[Result], device_kind: str) -> list[str]:
  torch_rates = {(r.name, r.dtype): r for r in results if r.framework == "torch"}
  flops = {(r.name, r.dtype): r.flops_per_image for r in results if r.flops_per_image}
  rows = [f"| model | dtype | run | images/s | ftjax/torch | GFLOP/image | % of peak ({device_kind}) |",
          "|---|---|---|---:|---:|---:|---:|"]
  for r in results:
    ratio = ""
    if r.framework == "ftjax" and (r.name, r.dtype) in torch_rates:
      ratio = f"{r.images_per_s / torch_rates[r.name, r.dtype].images_per_s:.2f}"
    per_image = flops.get((r.name, r.dtype))
    peak = peak_flops(device_kind, r.dtype)
    fraction = f"{100 * per_image * r.images_per_s / peak:.1f}" if per_image and peak else "n/a"
    run = r.framework + (f" ({r.note})" if r.note else "")
    gflop = f"{per_image / 1e9:.2f}" if per_image else ""
    rows.append(f"| {r.name} | {r.dtype} | {run} | {r.images_per_s:.1f} | {ratio} | {gflop} | {fraction} |")
  return rows


def main(argv: list[str] | None = None) -> list[Result]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="a CPU smoke run: batch 2 at 96 px, 1 warm-up and 2 timed steps")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--dtypes", default=",".join(DTYPES))
  parser.add_argument("--batch", type=int, default=0, help="0: 128 (--quick: 2)")
  parser.add_argument("--size", type=int, default=0, help="0: 224 (--quick: 96)")
  parser.add_argument("--warmup", type=int, default=0, help="0: 3 (--quick: 1)")
  parser.add_argument("--steps", type=int, default=0, help="0: 20 (--quick: 2)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
  parser.add_argument("--no-vmap", action="store_true", help="skip the vmapped-seeds comparison")
  args = parser.parse_args(argv)
  batch = args.batch or (2 if args.quick else 128)
  size = args.size or (96 if args.quick else 224)
  warmup = args.warmup or (1 if args.quick else 3)
  steps = args.steps or (2 if args.quick else 20)
  names = [n for n in args.models.split(",") if n]
  dtypes = [d for d in args.dtypes.split(",") if d]
  for d in dtypes:
    if d not in DTYPES:
      parser.error(f"--dtypes: unknown dtype {d!r}; known: {', '.join(DTYPES)}")
  for n in names:
    if n not in MODELS:
      parser.error(f"--models: unknown model {n!r}; known: {', '.join(MODELS)}")
  device = jax.devices()[0]
  device_kind = device.device_kind
  have_torch = not args.no_torch
  if have_torch:
    try:
      import torch  # noqa: F401
    except ImportError:
      print("PyTorch is not installed: ftjax columns only", file=sys.stderr)
      have_torch = False
  print(f"device: {device_kind} ({device.platform}), batch {batch}, {size} px, "
        f"{warmup} warm-up + {steps} timed steps", flush=True)
  start = time.perf_counter()
  results: list[Result] = []

  def run(label: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    out = fn()
    out = (out,) if isinstance(out, Result) else out
    results.extend(out)
    for r in out:
      print(f"  {label}: {r.framework} {r.images_per_s:.1f} images/s "
            f"({time.perf_counter() - t0:.0f} s, {time.perf_counter() - start:.0f} s total)", flush=True)

  for name in names:
    for dtype in dtypes:
      run(f"{name} {dtype}", lambda: jax_case(name, dtype, batch, size, warmup=warmup, steps=steps))
      if have_torch:
        compile_model = (name == "resnet50" and dtype == "bfloat16" and device.platform == "gpu")
        run(f"{name} {dtype}", lambda: torch_case(name, dtype, batch, size, warmup=warmup, steps=steps,
                                                  compile_model=compile_model))
  if not args.no_vmap and "efficientnet_lite0" in names:
    dtype = "bfloat16" if "bfloat16" in dtypes else dtypes[0]
    run(f"efficientnet_lite0 {dtype}",
        lambda: jax_vmapped_seeds("efficientnet_lite0", dtype, batch, size, warmup=warmup, steps=steps))
  print()
  print("\n".join(format_rows(results, device_kind)))
  print(f"\ntotal {time.perf_counter() - start:.0f} s")
  return results


if __name__ == "__main__":
  main()

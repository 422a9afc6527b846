"""Training-step throughput of ftjax models against PyTorch eager (channels_last).

One training step = forward in train mode (BatchNorm batch statistics), softmax
cross-entropy, backward, SGD with momentum 0.9. The JAX step is one ``jax.jit``
with the state donated; its FLOPs come from XLA's cost analysis of the compiled
step. The PyTorch step uses the reference modules of ``ftjax.testing.torch_models``
in ``channels_last`` with ``torch.optim.SGD(momentum=0.9)`` and
``torch.set_num_threads(os.cpu_count())``, in its own process (see
:func:`TorchWorker`). Both are timed in the same run and take turns: after
``--warmup`` untimed steps each, ``--rounds`` rounds of ``--steps`` JAX steps then
``--steps`` PyTorch steps, so a slow spell of a shared machine falls on both. The
table gives the median over all timed steps of each, and the range of the per-round
ratios. Both run with freed host memory retained (``ftjax.host_memory``;
``--default-malloc`` turns that off), which stops XLA:CPU from page-faulting its
large buffers in again on every step.

Usage::

  python -m experiments.bench.step_throughput --model resnet18 --batch 32 --size 112
  python -m experiments.bench.step_throughput --cases issue9        # the table
  FTJAX_CONV_IMPL=xla python -m experiments.bench.step_throughput --cases issue9
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import host_memory
from ftjax.models import create_model
from ftjax.ops import conv as conv_lib

NUM_CLASSES = 1000

# (model, batch, size): the three cases of issue 9, then the default fine-tuning sizes.
CASES = {
    "issue9": (
        ("resnet18", 32, 112),
        ("resnet18", 64, 64),
        ("efficientnet_lite0", 32, 96),
        ("resnet50", 32, 224),
        ("efficientnet_lite0", 32, 224),
    ),
    "issue9-small": (
        ("resnet18", 32, 112),
        ("resnet18", 64, 64),
        ("efficientnet_lite0", 32, 96),
    ),
}


@dataclasses.dataclass
class Result:
  model: str
  batch: int
  size: int
  jax_step_s: float
  gflop: float | None
  torch_step_s: float | None
  load: float
  round_ratios: tuple[float, ...] = ()  # JAX / PyTorch images/s, one per round

  @property
  def jax_images_per_s(self) -> float:
    return self.batch / self.jax_step_s

  @property
  def torch_images_per_s(self) -> float | None:
    return None if self.torch_step_s is None else self.batch / self.torch_step_s


def _step_times(step: Callable[[], None], steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def _flops(stage) -> float | None:
  analysis = stage.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def build_jax_step(name: str, batch: int, size: int) -> tuple[Callable[[], None], float | None]:
  """A compiled training step (called as ``step()``, blocks until done) and its FLOPs."""
  model = create_model(name, num_classes=NUM_CLASSES)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(0, 255, (batch, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
  variables = jax.jit(lambda k, x: model.init(k, x, train=False, outputs=("logits",)))(
      jax.random.key(0), images[:1])
  optimizer = optax.sgd(0.01, momentum=0.9)
  state = (variables["params"], variables["batch_stats"],
           optimizer.init(variables["params"]))

  def train_step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      outputs, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          outputs=("logits",), mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(outputs["logits"], labels)
      return loss.mean(), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  compiled = jax.jit(train_step, donate_argnums=0).lower(state, images, labels).compile()
  # FLOPs of the same step written with lax convolutions: XLA's cost analysis does
  # not see inside custom calls (oneDNN) and counts im2col's padding taps.
  with conv_lib.conv_impl("xla"):
    flops = _flops(jax.jit(lambda *args: train_step(*args)).lower(state, images, labels))
  holder = [state]

  def step():
    holder[0], loss = compiled(holder[0], images, labels)
    loss.block_until_ready()

  return step, flops


def build_torch_step(name: str, batch: int, size: int) -> Callable[[], None]:
  """One eager PyTorch training step, channels_last (raises ImportError without torch)."""
  import torch

  from ftjax.testing import torch_models

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  if name.startswith("efficientnet"):
    model = torch_models.TorchEfficientNetLite0(num_classes=NUM_CLASSES)
  else:
    model = torch_models.TorchResNet(name, num_classes=NUM_CLASSES)
  model = model.to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  pixels = torch.rand(batch, 3, size, size) * 255
  images = torch_models.normalize_pixels(pixels, model.mean, model.std)
  images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, NUM_CLASSES, (batch,))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()

  return step


_TORCH_TIMES = "torch_times="


class TorchWorker:
  """The PyTorch step of one case, in its own interpreter, run on request.

  PyTorch and ftjax's oneDNN kernels both use GNU OpenMP, which reads its settings
  once per process: ftjax loads it with a passive wait policy (see
  ``ftjax.ops.onednn_conv``), under which PyTorch's eager step is 5-40% slower
  than with its default. A separate process times PyTorch as its users run it, and
  staying alive between requests lets the two steps take turns.
  """

  def __init__(self, name: str, batch: int, size: int, *, default_malloc: bool):
    cmd = [sys.executable, "-m", "experiments.bench.step_throughput", "--torch-worker",
           "--model", name, "--batch", str(batch), "--size", str(size)]
    if default_malloc:
      cmd.append("--default-malloc")
    self._cmd = " ".join(cmd)
    # stderr to a file: a pipe nobody reads would stall a chatty worker once full.
    self._stderr = tempfile.TemporaryFile("w+")
    self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._stderr, text=True)
    self.available = self._reply() != "unavailable"

  def _reply(self) -> str:
    for line in self._proc.stdout:
      if line.startswith(_TORCH_TIMES):
        return line[len(_TORCH_TIMES):].strip()
    self._proc.wait()
    self._stderr.seek(0)
    raise RuntimeError(f"PyTorch worker failed ({self._cmd}):\n{self._stderr.read()[-3000:]}")

  def step_times(self, steps: int) -> list[float]:
    """Seconds of each of ``steps`` consecutive steps (0 steps: just a round trip)."""
    self._proc.stdin.write(f"{steps}\n")
    self._proc.stdin.flush()
    reply = self._reply()
    return [float(t) for t in reply.split(",")] if reply else []

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      self._proc.wait(timeout=60)
    self._stderr.close()

  def __enter__(self) -> "TorchWorker":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _serve_torch_steps(name: str, batch: int, size: int) -> None:
  """``--torch-worker``: build the step, then run ``N`` steps per line read from stdin."""
  try:
    step = build_torch_step(name, batch, size)
  except ImportError:
    print(f"{_TORCH_TIMES}unavailable", flush=True)
    return
  print(_TORCH_TIMES, flush=True)  # ready
  for line in sys.stdin:
    times = _step_times(step, int(line))
    print(_TORCH_TIMES + ",".join(repr(t) for t in times), flush=True)


def run_case(name: str, batch: int, size: int, *, warmup: int, steps: int, rounds: int = 3,
             torch_too: bool, default_malloc: bool = False) -> Result:
  """Times both steps, taking turns: ``rounds`` x (``steps`` JAX, ``steps`` PyTorch)."""
  jax_step, flops = build_jax_step(name, batch, size)
  jax_times, torch_times, ratios = [], [], []
  with contextlib.ExitStack() as stack:
    worker = None
    if torch_too:
      worker = stack.enter_context(TorchWorker(name, batch, size, default_malloc=default_malloc))
      if not worker.available:
        worker = None
    _step_times(jax_step, warmup)
    if worker:
      worker.step_times(warmup)
    for _ in range(rounds):
      jax_round = _step_times(jax_step, steps)
      jax_times += jax_round
      if worker:
        torch_round = worker.step_times(steps)
        torch_times += torch_round
        ratios.append(statistics.median(torch_round) / statistics.median(jax_round))
  return Result(name, batch, size, statistics.median(jax_times),
                None if flops is None else flops / 1e9,
                statistics.median(torch_times) if torch_times else None,
                os.getloadavg()[0], tuple(ratios))


def format_row(r: Result) -> str:
  gflops = "n/a" if r.gflop is None else f"{r.gflop / r.jax_step_s:7.1f}"
  torch_ips = "n/a" if r.torch_images_per_s is None else f"{r.torch_images_per_s:8.1f}"
  ratio = ("n/a" if r.torch_images_per_s is None
           else f"{r.jax_images_per_s / r.torch_images_per_s:5.2f}x")
  spread = (f"{min(r.round_ratios):.2f}-{max(r.round_ratios):.2f}" if r.round_ratios
            else "n/a")
  return (f"| {r.model:18s} | {r.batch:5d} | {r.size:4d} | {r.jax_images_per_s:8.1f} | "
          f"{gflops:>7s} | {torch_ips:>10s} | {ratio:>6s} | {spread:>12s} | {r.load:4.1f} |")


HEADER = ("| model              | batch | size | jax im/s | GFLOP/s | torch im/s | ratio  "
          "| round ratios | load |\n"
          "|--------------------|-------|------|----------|---------|------------|--------"
          "|--------------|------|")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=112)
  parser.add_argument("--cases", choices=sorted(CASES), default=None,
                      help="run a named set of (model, batch, size) cases instead")
  parser.add_argument("--steps", type=int, default=15, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3,
                      help="rounds of --steps JAX then --steps PyTorch steps (median of all)")
  parser.add_argument("--warmup", type=int, default=10,
                      help="untimed steps first (the retained heap settles within ~10)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch step")
  parser.add_argument("--conv-impl", default="auto", choices=conv_lib.IMPLS,
                      help="force one conv formulation (default: auto dispatch)")
  parser.add_argument("--default-malloc", action="store_true",
                      help="leave glibc's malloc as it is instead of "
                           "host_memory.retain_freed_host_memory() (applies to both steps)")
  parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  # Before anything runs: worker threads that already own a malloc arena keep it.
  retained = False if args.default_malloc else host_memory.retain_freed_host_memory()
  if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
    raise ValueError("--steps and --rounds must be >= 1 and --warmup >= 0; got "
                     f"{args.steps}, {args.rounds}, {args.warmup}")
  if args.torch_worker:
    _serve_torch_steps(args.model, args.batch, args.size)
    return
  cases = CASES[args.cases] if args.cases else ((args.model, args.batch, args.size),)
  print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"conv impl {args.conv_impl!r} (FTJAX_CONV_IMPL={os.environ.get('FTJAX_CONV_IMPL')}), "
        f"{args.rounds} rounds of {args.steps} steps each (JAX then PyTorch), freed host memory "
        f"{'retained' if retained else 'returned to the OS (default malloc)'}", flush=True)
  print(HEADER, flush=True)
  with conv_lib.conv_impl(args.conv_impl):
    for name, batch, size in cases:
      result = run_case(name, batch, size, warmup=args.warmup, steps=args.steps,
                        rounds=args.rounds, torch_too=not args.no_torch,
                        default_malloc=args.default_malloc)
      print(format_row(result), flush=True)


if __name__ == "__main__":
  main()

"""Training-step cost of a method relative to vanilla fine-tuning.

Both steps are the trainer's own, built by the run setup
(:func:`ftjax.train.setup.init_training`: the config baseline's parameter
groups, the partitioned SGD-momentum optimizer, the jitted step with the state
donated and the frozen source model as its third argument), on the same model,
batch and image size, with random weights and random images: the cost of a
step does not depend on the values. The methods are built from the same
``losses`` dictionaries the configs use and prepared with
:meth:`ftjax.methods.Method.prepare` on an in-memory
:class:`~ftjax.methods.RunContext`; what ``prepare`` would compute from data
is given up front as a stand-in of the right shape (Co-Tuning's relationship:
random; DELTA's channel weights: uniform). DELTA and LwF run the frozen source
model inside the step, so their cost includes its forward pass; Bi-Tuning's
includes the momentum key encoder's forward pass on a second view and the
queue updates, and the run prints its queue memory (and that of K = 32 keys
per class for 200 classes at 1280 dimensions). Timings: median of ``--steps``
steps after ``--warmup`` untimed ones, the methods interleaved round-robin so
that load changes on a shared machine hit them alike.

Usage::

  python -m experiments.bench.method_step_cost                        # every method, Lite0 64 px
  python -m experiments.bench.method_step_cost --methods co_tuning
  python -m experiments.bench.method_step_cost --methods co_tuning --size 224 --batch 32
  python -m experiments.bench.method_step_cost --methods bi_tuning
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import methods
from ftjax.methods import RunContext
from ftjax.methods import bi_tuning as bi_methods
from ftjax.methods import regularizers as reg_methods
from ftjax.models import create_model
from ftjax.train import setup
from ftjax.train import sharding as shd
from ftjax.train import step as step_lib
from ftjax.train.config import default_config

NUM_SOURCE = 1000


CE = {"ce": {"weight": 1.0}}
BSS = {"weight": 0.001, "k": 1}
BI_TUNING = {"weight": 1.0, "keys_per_class": 8, "temperature": 0.07, "momentum": 0.999,
             "projection_dim": 128}
METHODS = ("finetune", "co_tuning", "bi_tuning", "l2_sp", "delta", "bss", "lwf", "co_tuning_bss_l2sp")


def _random_relationship(num_target: int, num_source: int) -> np.ndarray:
  rel = np.random.default_rng(0).random((num_target, num_source)).astype(np.float32)
  return rel / rel.sum(axis=1, keepdims=True)


def method_losses(name: str, num_classes: int) -> dict[str, dict[str, Any]]:
  """The ``losses`` section of a method, as in experiments/configs."""
  rel = _random_relationship(num_classes, NUM_SOURCE)
  losses = {
      "finetune": dict(CE),
      "co_tuning": {**CE, "co_tuning": {"weight": 2.3, "relationship": rel}},
      "bi_tuning": {**CE, "bi_tuning": dict(BI_TUNING)},
      "l2_sp": {**CE, "l2_sp": {"alpha": 0.01, "beta": 0.01}},
      "delta": {**CE, "delta": {"weight": 0.01}},
      "bss": {**CE, "bss": dict(BSS)},
      "lwf": {**CE, "lwf": {"weight": 1.0, "temperature": 3.0}},
      "co_tuning_bss_l2sp": {**CE, "co_tuning": {"weight": 2.3, "relationship": rel},
                             "bss": dict(BSS), "l2_sp": {}},
  }
  if name not in losses:
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
  return losses[name]


def _stand_in(method: Any, model: Any) -> Any:
  """The method with what its ``prepare`` would compute from data given up front (DELTA's
  channel weights: uniform); ``prepare`` then only binds the model."""
  if isinstance(method, reg_methods.Delta) and method.attention and method.channel_weights is None:
    shapes = dict(reg_methods.feature_map_order(model))
    weights = {k: np.full(shapes[k][-1], 1.0 / shapes[k][-1], np.float32)
               for k in method.resolved_layers(model)}
    return dataclasses.replace(method, channel_weights=weights)
  return method


def build_step(name: str, *, model_name: str, batch: int, size: int, num_classes: int
               ) -> Callable[[], None]:
  """A zero-argument callable running one training step of method ``name`` (the trainer's step)."""
  ms = methods.build_methods(method_losses(name, num_classes))
  needed = step_lib.required_outputs(ms)
  model = create_model(model_name, num_classes=num_classes, num_source_classes=NUM_SOURCE,
                       keep_source_head="source_logits" in needed, **setup.model_options(ms))
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, batch).astype(np.int32)
  variables = jax.jit(lambda k, x: model.init(k, x, train=False, outputs=model.all_outputs))(
      jax.random.key(0, impl="rbg"), jnp.asarray(images[:1]))
  variables = dict(variables)

  config = default_config()
  config.model, config.pretrained = model_name, ""
  rules, groups, bn_mode = setup.resolve_rules(config, variables, methods=ms)
  views = max(m.views for m in ms)
  context = RunContext(model=model, variables=variables, bn_mode=bn_mode, views=views,
                       batch_size=batch, model_name=model_name, image_size=size)
  ms = [_stand_in(m, model).prepare(context) for m in ms]
  training = setup.init_training(
      model=model, variables=variables, methods=ms, rules=rules, groups=groups, bn_mode=bn_mode,
      num_classes=num_classes, schedule=optax.constant_schedule(0.01), momentum=0.9,
      method_rng=jax.random.PRNGKey(0), state_rng=jax.random.PRNGKey(0))
  host_batch = {"image": images, "label": labels}
  if views > 1:  # Bi-Tuning's key encoder's view
    host_batch["image_key"] = rng.uniform(0, 255, images.shape).astype(np.float32)
  device_batch = shd.global_batch(host_batch, training.mesh)
  holder = [training.state]

  def run() -> None:
    holder[0], metrics = training.train_step(holder[0], device_batch, training.source)
    metrics["loss"].block_until_ready()

  return run


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=METHODS,
                      help="methods compared with finetune")
  parser.add_argument("--model", default="efficientnet_lite0")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=15, help="timed steps per method (median)")
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    raise ValueError(f"--steps must be >= 1 and --warmup >= 0; got {args.steps}, {args.warmup}")

  names = ["finetune"] + [m for m in args.methods if m != "finetune"]
  steps = {n: build_step(n, model_name=args.model, batch=args.batch, size=args.size,
                         num_classes=args.num_classes) for n in names}
  for run in steps.values():
    for _ in range(args.warmup + 1):  # the first call compiles
      run()
  times: dict[str, list[float]] = {n: [] for n in names}
  for _ in range(args.steps):
    for n, run in steps.items():
      start = time.perf_counter()
      run()
      times[n].append(time.perf_counter() - start)
  base = statistics.median(times["finetune"])
  print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs; {args.model} "
        f"batch {args.batch} at {args.size} px, {args.num_classes} target classes; median of "
        f"{args.steps} steps; load average {os.getloadavg()[0]:.1f}")
  print(f"{'method':<16} {'step ms':>9} {'images/s':>9} {'x finetune':>11}")
  for n in names:
    t = statistics.median(times[n])
    print(f"{n:<16} {1e3 * t:9.1f} {args.batch / t:9.1f} {t / base:11.3f}")
  if "bi_tuning" in names:
    bt = BI_TUNING
    model = create_model(args.model, num_classes=args.num_classes)
    feature_dim = int(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                                     jnp.zeros((1, args.size, args.size, 3)))["params"]["head"]["kernel"].shape[0])
    here = bi_methods.queue_nbytes(num_classes=args.num_classes, keys_per_class=bt["keys_per_class"],
                                   feature_dim=feature_dim, projection_dim=bt["projection_dim"])
    big = bi_methods.queue_nbytes(num_classes=200, keys_per_class=32, feature_dim=1280,
                                  projection_dim=bt["projection_dim"])
    print(f"bi_tuning queues: {here:,} bytes here ({args.num_classes} classes x K={bt['keys_per_class']} "
          f"x ({feature_dim}+1 + {bt['projection_dim']})); 200 classes x K=32 x (1280+1 + 128): "
          f"{big:,} bytes ({big / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()

"""Training-step time and optimizer-state memory of model patches vs full fine-tuning.

Each row builds the trainer's own step through the run setup
(:func:`ftjax.train.setup.init_training`: jitted, state donated, frozen groups
masked out of the backward pass) with the methods and parameter rules of
``config.baseline = "patch"`` (or ``finetune``; :func:`ftjax.train.setup.resolve_rules`),
the partitioned SGD-momentum optimizer, random weights and random images.
Optimizer-state memory = bytes of every array in ``opt_state`` (frozen groups
hold none). Timings: median of ``--steps`` steps, rows interleaved round-robin.

Usage::

  python -m experiments.bench.patch_cost                       # Lite0, batch 32, 64 px
  python -m experiments.bench.patch_cost --size 224 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import methods
from ftjax.methods import RunContext
from ftjax.models import create_model
from ftjax.train import setup
from ftjax.train import sharding as shd
from ftjax.train.config import default_config

ROWS = {
    "finetune (all)": {"baseline": "finetune"},
    "last layer": {"baseline": "patch", "selection": "head"},
    "S/B + last layer": {"baseline": "patch", "selection": "scale_bias"},
    "DW + last layer": {"baseline": "patch", "selection": "depthwise"},
}


def build(row: dict, *, model_name: str, batch: int, size: int, num_classes: int):
  config = default_config()
  config.model, config.baseline = model_name, row["baseline"]
  if "selection" in row:
    config.patch.selection = row["selection"]
  ms = methods.build_methods(methods.config_losses(config))   # ce (+ patch)
  model = create_model(model_name, num_classes=num_classes)
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, batch).astype(np.int32)
  variables = dict(jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0, impl="rbg"),
                                                                       jnp.asarray(images[:1])))
  rules, groups, bn_mode = setup.resolve_rules(config, variables, methods=ms)
  context = RunContext(model=model, variables=variables, bn_mode=bn_mode, batch_size=batch,
                       model_name=model_name, image_size=size)
  ms = [m.prepare(context) for m in ms]
  training = setup.init_training(
      model=model, variables=variables, methods=ms, rules=rules, groups=groups, bn_mode=bn_mode,
      num_classes=num_classes, schedule=lambda s: 0.01, momentum=0.9, weight_decay=5e-4,
      method_rng=jax.random.PRNGKey(0), state_rng=jax.random.PRNGKey(0))
  opt_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(training.state.opt_state) if hasattr(x, "nbytes"))
  trainable = sum(n for g, n in training.sizes.items() if g not in training.frozen)
  device_batch = shd.global_batch({"image": images, "label": labels}, training.mesh)
  holder = [training.state]

  def run():
    holder[0], metrics = training.train_step(holder[0], device_batch, training.source)
    metrics["loss"].block_until_ready()

  return run, opt_bytes, trainable


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="efficientnet_lite0")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args(argv)
  built = {name: build(row, model_name=args.model, batch=args.batch, size=args.size,
                       num_classes=args.num_classes) for name, row in ROWS.items()}
  for run, _, _ in built.values():
    run(), run()   # compile + one warm-up
  times = {name: [] for name in built}
  for _ in range(args.steps):
    for name, (run, _, _) in built.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  base_t = statistics.median(times["finetune (all)"])
  base_m = built["finetune (all)"][1]
  print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs; {args.model} batch "
        f"{args.batch} at {args.size} px; median of {args.steps} steps; load {os.getloadavg()[0]:.1f}")
  print(f"{'rows':<18} {'trainable':>10} {'step ms':>9} {'x finetune':>10} {'opt state MB':>13} {'x finetune':>10}")
  for name, (_, opt_bytes, trainable) in built.items():
    t = statistics.median(times[name])
    print(f"{name:<18} {trainable:>10,} {1e3 * t:9.1f} {t / base_t:10.3f} {opt_bytes / 2**20:13.2f} "
          f"{opt_bytes / base_m:10.3f}")


if __name__ == "__main__":
  main()

"""Training-step time and optimizer-state memory of model patches vs full fine-tuning.

Each row builds the library's train step (:func:`ftjax.train.step.make_train_step`,
jitted, state donated) with the parameter rules of ``config.baseline = "patch"``
(or ``finetune``), the partitioned SGD-momentum optimizer of
:func:`ftjax.train.optim.make_optimizer`, random weights and random images.
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

from ftjax import patches
from ftjax.methods.finetune import CrossEntropy
from ftjax.models import create_model
from ftjax.train import optim
from ftjax.train import step as step_lib
from ftjax.train.config import default_config
from ftjax.train.loop import resolve_rules
from ftjax.train.state import TrainState

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
  model = create_model(model_name, num_classes=num_classes)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(0, 255, (batch, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
  variables = dict(jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0, impl="rbg"), images[:1]))
  rules, groups, bn_mode = resolve_rules(config, variables)
  label_tree = patches.path_labels(variables["params"], rules)
  tx = optim.make_optimizer(labels=label_tree, groups=groups, schedule=lambda s: 0.01, momentum=0.9,
                            weight_decay=5e-4)
  frozen = {n for n, g in groups.items() if g.frozen}
  mask = jax.tree.map(lambda l: l in frozen, label_tree) if frozen else None
  opt_state = tx.init(variables["params"])
  opt_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(opt_state) if hasattr(x, "nbytes"))
  trainable = sum(n for g, n in patches.group_sizes(variables["params"], label_tree).items() if g not in frozen)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"], opt_state=opt_state, method_state={"ce": ()},
                     rng=jax.random.PRNGKey(0))
  fn = jax.jit(step_lib.make_train_step(model=model, optimizer=tx, components=[CrossEntropy()],
                                        train_bn=bn_mode == "train", frozen_mask=mask), donate_argnums=0)
  holder = [state]

  def run():
    holder[0], metrics = fn(holder[0], {"image": images, "label": labels})
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

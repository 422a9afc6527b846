"""SpotTune's cost: training step vs. vanilla fine-tuning, and inference vs. the plain model.

Training: both steps come from the library's step factory
(:func:`ftjax.train.step.make_train_step`, jitted, state donated) with the
library's partitioned optimizer, on the same base model, batch and image size:
fine-tuning trains the plain model; SpotTune trains the wrapper (frozen copies
frozen, trainable copies, policy network and head trained; straight-through
Gumbel routing, both copies of every routed block computed) with the ``ce`` and
``spottune`` components. The paper reports 1.47x; the goal is at most 1.5x.

Inference: jitted ``train=False`` forward of the plain model vs. SpotTune with
deterministic (argmax) routing (policy network + both copies of each routed
block, mixed per image), and with a static mask (``all_finetuned``: one copy
per block, no policy: a Global-k model after pruning).

Random weights and images (the cost does not depend on the values). Timings:
median of ``--steps`` calls after ``--warmup`` untimed ones, the variants
interleaved round-robin so that load changes hit them alike.

Usage::

  python -m experiments.bench.spottune_cost                                 # resnet26, 64 px, batch 32
  python -m experiments.bench.spottune_cost --first_routed_block 4            # Visual Decathlon protocol
  python -m experiments.bench.spottune_cost --model efficientnet_lite0 --size 64
  python -m experiments.bench.spottune_cost --model resnet_tiny --size 32 --batch 8 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import patches
from ftjax.methods import build_components
from ftjax.models import create_model
from ftjax.models import spottune as st
from ftjax.train import optim
from ftjax.train import step as step_lib
from ftjax.train.state import TrainState

NUM_CLASSES = 10


def _init(model, size: int, **kwargs):
  key = jax.random.key(0, impl="rbg")
  return jax.tree.map(np.asarray, dict(jax.jit(lambda k: model.init(
      k, jnp.zeros((1, size, size, 3)), train=False, outputs=model.all_outputs, **kwargs))(key)))


def _train_step(model, variables, rules, groups, losses, batch) -> Callable[[], None]:
  params = variables["params"]
  labels = patches.path_labels(params, rules)
  group_configs = {n: optim.GroupConfig.from_mapping(g) for n, g in groups.items()}
  tx = optim.make_optimizer(labels=labels, groups=group_configs, schedule=optax.constant_schedule(1e-3),
                            weight_decay=1e-4)
  components = build_components(losses)
  frozen = {n for n, g in group_configs.items() if g.frozen}
  frozen_mask = jax.tree.map(lambda label: label in frozen, labels) if frozen else None
  step = jax.jit(step_lib.make_train_step(model=model, optimizer=tx, components=components,
                                          frozen_mask=frozen_mask), donate_argnums=(0,))
  holder = {"state": TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params), method_state={c.name: c.init_state(variables=variables, rng=None)
                                               for c in components},
      rng=jax.random.PRNGKey(0))}

  def run() -> None:
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  return run


def _forward(model, variables, images, **kwargs) -> Callable[[], None]:
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False, outputs=("logits",), **kwargs)["logits"])

  def run() -> None:
    jax.block_until_ready(fn(variables, images))

  return run


def _time(runs: dict[str, Callable[[], None]], *, steps: int, warmup: int) -> dict[str, float]:
  for run in runs.values():
    for _ in range(warmup):
      run()
  times: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(steps):
    for name, run in runs.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="resnet26")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--policy_depth", type=int, default=3)
  parser.add_argument("--policy_width", type=int, default=64)
  parser.add_argument("--policy_image_size", type=int, default=64)
  parser.add_argument("--first_routed_block", type=int, default=0,
                      help="stem and blocks before it frozen and unrouted (Visual Decathlon ResNet-26: 4)")
  args = parser.parse_args(argv)

  plain = create_model(args.model, num_classes=NUM_CLASSES)
  plain_vars = _init(plain, args.size)
  spot = st.create_spottune_model(args.model, num_classes=NUM_CLASSES, policy_depth=args.policy_depth,
                                  policy_width=args.policy_width, policy_image_size=args.policy_image_size,
                                  first_routed_block=args.first_routed_block)
  spot_vars = st.spottune_variables_from_pretrained(spot, plain_vars, rng=jax.random.key(1))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(0, 255, (args.batch, args.size, args.size, 3)).astype(np.float32))
  batch = {"image": images, "label": jnp.asarray(rng.integers(0, NUM_CLASSES, args.batch).astype(np.int32))}

  finetune_rules = [("head/.*", "head"), ("backbone/.*", "backbone")]
  train = _time({
      "finetune": _train_step(plain, plain_vars, finetune_rules, {"head": {"lr_mult": 10.0}, "backbone": {}},
                              {"ce": {"weight": 1.0}}, batch),
      "spottune": _train_step(spot, spot_vars, st.spottune_rules(), st.spottune_groups(),
                              {"ce": {"weight": 1.0}, "spottune": {}}, batch),
  }, steps=args.steps, warmup=args.warmup)
  infer = _time({
      "plain": _forward(plain, plain_vars, images),
      "spottune_argmax": _forward(spot, spot_vars, images, routing="argmax"),
      "spottune_static_mask": _forward(spot, spot_vars, images, routing="all_finetuned"),
  }, steps=args.steps, warmup=args.warmup)

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); model {args.model}, "
        f"{args.size} px, batch {args.batch}, {len(spot.routed_blocks)} routed blocks "
        f"(first {args.first_routed_block} frozen), policy ResNet "
        f"depth {args.policy_depth} width {args.policy_width} at {args.policy_image_size or args.size} px; "
        f"median of {args.steps}")
  print("| what | ms | relative |")
  print("|---|---|---|")
  print(f"| train step, fine-tuning | {1e3 * train['finetune']:.2f} | 1.00x |")
  ratio = train["spottune"] / train["finetune"]
  print(f"| train step, SpotTune | {1e3 * train['spottune']:.2f} | {ratio:.2f}x (paper 1.47x, goal <= 1.5x) |")
  print(f"| inference, plain model | {1e3 * infer['plain']:.2f} | 1.00x |")
  for name in ("spottune_argmax", "spottune_static_mask"):
    print(f"| inference, {name} | {1e3 * infer[name]:.2f} | {infer[name] / infer['plain']:.2f}x |")
  return {"train_ratio": ratio, **{f"train_{k}": v for k, v in train.items()},
          **{f"infer_{k}": v for k, v in infer.items()}}


if __name__ == "__main__":
  main()

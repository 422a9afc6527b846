"""SpotTune's cost: training step vs. vanilla fine-tuning, and inference vs. the plain model.

Training: both steps are the trainer's own, built by the run setup
(:func:`ftjax.train.setup.init_training`: jitted, state donated, the library's
partitioned optimizer over the rules of :func:`ftjax.train.setup.resolve_rules`),
on the same base model, batch and image size: fine-tuning trains the plain model
with the ``ce`` method; SpotTune trains the wrapper that the ``spottune``
method's ``wrap_model`` builds around it (frozen copies frozen, trainable
copies, policy network and head trained; straight-through Gumbel routing, both
copies of every routed block computed) with the ``ce`` and ``spottune``
methods. The paper reports 1.47x; the goal is at most 1.5x.

Inference: jitted ``train=False`` forward of the plain model vs. SpotTune with
deterministic (argmax) routing (policy network + both copies of each routed
block, mixed per image), and with a static mask (``all_finetuned``: one copy
per block, no policy: a Global-k model after pruning).

Forward FLOPs per image (XLA's ``cost_analysis`` of the jitted forward, traced
with the XLA formulations: ftjax's CPU kernels are custom calls that XLA does not
count) for the plain model, SpotTune's policy network alone and the two SpotTune
forwards: they say how much of the time ratio the protocol itself asks for (the
policy's size is the paper's, whatever the backbone; every routed block has two
copies).

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

from ftjax.methods import RunContext, build_methods
from ftjax.methods.spottune.model import PolicyNetwork
from ftjax.models import create_model
from ftjax.ops.conv import conv_impl
from ftjax.train import setup
from ftjax.train import sharding as shd
from ftjax.train.config import default_config

NUM_CLASSES = 10


def _init(model, size: int, **kwargs):
  key = jax.random.key(0, impl="rbg")
  return jax.tree.map(np.asarray, dict(jax.jit(lambda k: model.init(
      k, jnp.zeros((1, size, size, 3)), train=False, outputs=model.all_outputs, **kwargs))(key)))


def _train_step(model, variables, losses, batch, *, size: int) -> tuple[Callable[[], None], object, object]:
  """The trainer's step of ``losses`` over ``model`` (wrapped by the methods); returns a callable
  running one step, and the (wrapped) model and variables."""
  methods = build_methods(losses)
  for i, m in enumerate(methods):
    model, variables = m.wrap_model(model=model, variables=variables, rng=jax.random.key(1 + i))
  config = default_config()
  config.model, config.pretrained, config.head_lr_mult = model.model_name, "", 10.0
  rules, groups, bn_mode = setup.resolve_rules(config, variables, methods=methods)
  context = RunContext(model=model, variables=variables, bn_mode=bn_mode, batch_size=len(batch["label"]),
                       model_name=model.model_name, image_size=size)
  methods = [m.prepare(context) for m in methods]
  training = setup.init_training(
      model=model, variables=variables, methods=methods, rules=rules, groups=groups, bn_mode=bn_mode,
      num_classes=NUM_CLASSES, schedule=optax.constant_schedule(1e-3), weight_decay=1e-4,
      method_rng=jax.random.PRNGKey(1), state_rng=jax.random.PRNGKey(0))
  device_batch = shd.global_batch(batch, training.mesh)
  holder = {"state": training.state}

  def run() -> None:
    holder["state"], metrics = training.train_step(holder["state"], device_batch, training.source)
    jax.block_until_ready(metrics["loss"])

  return run, model, variables


def _forward(model, variables, images, **kwargs) -> Callable[[], None]:
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False, outputs=("logits",), **kwargs)["logits"])

  def run() -> None:
    jax.block_until_ready(fn(variables, images))

  return run


def _forward_gflop(fn: Callable, *args) -> float:
  """GFLOP of one call of ``fn(*args)`` as XLA counts it, traced with XLA convolutions."""
  with conv_impl("xla"):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / 1e9


def _forward_flops(plain, plain_vars, spot, spot_vars, images, *, policy: dict) -> dict[str, float]:
  """Forward GFLOP per image of the plain model, the policy network alone and SpotTune's forwards."""
  one = images[:1]

  def forward(model, **kwargs):
    return lambda v, x: model.apply(v, x, train=False, outputs=("logits",), **kwargs)["logits"]

  net = PolicyNetwork(len(spot.routed_blocks), policy["policy_depth"], policy["policy_width"],
                      policy["policy_image_size"])
  policy_vars = {k: v["policy"] for k, v in spot_vars.items() if "policy" in v}
  return {
      "plain": _forward_gflop(forward(plain), plain_vars, one),
      "policy": _forward_gflop(lambda v, x: net.apply(v, x, train=False), policy_vars, one),
      "spottune_argmax": _forward_gflop(forward(spot, routing="argmax"), spot_vars, one),
      "spottune_static_mask": _forward_gflop(forward(spot, routing="all_finetuned"), spot_vars, one),
  }


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
  rng = np.random.default_rng(0)
  host_images = rng.uniform(0, 255, (args.batch, args.size, args.size, 3)).astype(np.float32)
  batch = {"image": host_images, "label": rng.integers(0, NUM_CLASSES, args.batch).astype(np.int32)}
  images = jnp.asarray(host_images)

  spottune = {"policy_depth": args.policy_depth, "policy_width": args.policy_width,
              "policy_image_size": args.policy_image_size, "first_routed_block": args.first_routed_block}
  finetune_step, _, _ = _train_step(plain, plain_vars, {"ce": {"weight": 1.0}}, batch, size=args.size)
  spottune_step, spot, spot_vars = _train_step(plain, plain_vars, {"ce": {"weight": 1.0}, "spottune": spottune},
                                               batch, size=args.size)
  train = _time({"finetune": finetune_step, "spottune": spottune_step}, steps=args.steps, warmup=args.warmup)
  infer = _time({
      "plain": _forward(plain, plain_vars, images),
      "spottune_argmax": _forward(spot, spot_vars, images, routing="argmax"),
      "spottune_static_mask": _forward(spot, spot_vars, images, routing="all_finetuned"),
  }, steps=args.steps, warmup=args.warmup)

  flops = _forward_flops(plain, plain_vars, spot, spot_vars, images, policy=spottune)

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
  print()
  print("| forward, per image | GFLOP | relative to the plain model |")
  print("|---|---|---|")
  for name, label in (("plain", "plain model"), ("policy", "policy network alone"),
                      ("spottune_argmax", "SpotTune, argmax routing (policy + both copies)"),
                      ("spottune_static_mask", "SpotTune, static mask (one copy, no policy)")):
    print(f"| {label} | {flops[name]:.4f} | {flops[name] / flops['plain']:.2f}x |")
  return {"train_ratio": ratio, **{f"train_{k}": v for k, v in train.items()},
          **{f"infer_{k}": v for k, v in infer.items()}, **{f"gflop_{k}": v for k, v in flops.items()}}


if __name__ == "__main__":
  main()

"""The optimizer's weight decay modes against torch.optim.SGD, and their config plumbing.

Reference: ``torch.optim.SGD`` (momentum 0.9, ``dampening=0``, coupled ``weight_decay``:
the decay is added to the gradient before the momentum buffer), with param groups for
the lr multipliers and per-group decay and a ``LambdaLR`` for the schedule: the
optimizer of TLlib and of the official Co-Tuning and SpotTune code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from ftjax.core import paths
from ftjax.core.errors import ConfigError
from ftjax.train import optim

BASE_LR = 0.05
WD = 0.1          # large: coupled and decoupled decay differ far beyond float rounding
SB_WD = 0.3       # the "sb" group's own decay
HEAD_MULT = 10.0
STEPS = 5


def _params():
  rng = np.random.default_rng(0)
  return {
      "backbone": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
                   "bn": {"scale": rng.normal(1.0, 0.2, size=4).astype(np.float32),
                          "bias": rng.normal(size=4).astype(np.float32)}},
      "head": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
               "bias": rng.normal(size=3).astype(np.float32)},
  }


def _grads(params):
  rng = np.random.default_rng(1)
  return [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(STEPS)]


def _schedule():
  # Warm-up then cosine: lr 0, 0.05, 0.043, 0.025, 0.007, per step and per group.
  return optim.make_schedule(name="cosine", base_lr=BASE_LR, total_steps=STEPS + 1, warmup_steps=1)


def _ftjax(params, grads, *, nesterov, mode):
  labels = paths.path_labels(params, [("head/.*", "head"), ("backbone/bn/.*", "sb"),
                                        ("backbone/conv/.*", "frozen")])
  groups = {"head": optim.GroupConfig(lr_mult=HEAD_MULT), "sb": optim.GroupConfig(weight_decay=SB_WD),
            "frozen": optim.GroupConfig(frozen=True)}
  tx = optim.make_optimizer(labels=labels, groups=groups, schedule=_schedule(), momentum=0.9,
                            nesterov=nesterov, weight_decay=WD, weight_decay_mode=mode)

  @jax.jit
  def update(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s = jax.tree.map(jnp.asarray, params), tx.init(params)
  for g in grads:
    p, s = update(p, s, g)
  return jax.tree.map(np.asarray, p)


def _torch(params, grads, *, nesterov):
  """torch.optim.SGD over the same groups; the frozen conv is not given to the optimizer."""
  flat = paths.flatten_paths(params)
  tensors = {k: torch.tensor(v, requires_grad=True) for k, v in flat.items()}
  head = [tensors["head/kernel"], tensors["head/bias"]]
  sb = [tensors["backbone/bn/scale"], tensors["backbone/bn/bias"]]
  opt = torch.optim.SGD([{"params": head, "lr": BASE_LR * HEAD_MULT},
                         {"params": sb, "lr": BASE_LR, "weight_decay": SB_WD}],
                        lr=BASE_LR, momentum=0.9, dampening=0, weight_decay=WD, nesterov=nesterov)
  schedule = _schedule()
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: float(schedule(k)) / BASE_LR)
  for g in grads:
    flat_g = paths.flatten_paths(g)
    opt.zero_grad()
    for k, t in tensors.items():
      t.grad = torch.tensor(flat_g[k])
    opt.step()
    sched.step()
  return {k: t.detach().numpy() for k, t in tensors.items()}


@pytest.mark.parametrize("nesterov", [False, True])
def test_coupled_sgd_equals_torch_sgd_and_decoupled_does_not(nesterov):
  params = _params()
  grads = _grads(params)
  want = _torch(params, grads, nesterov=nesterov)
  coupled = paths.flatten_paths(_ftjax(params, grads, nesterov=nesterov, mode="coupled"))
  decoupled = paths.flatten_paths(_ftjax(params, grads, nesterov=nesterov, mode="decoupled"))
  for name in ("head/kernel", "head/bias", "backbone/bn/scale", "backbone/bn/bias"):
    np.testing.assert_allclose(coupled[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # Frozen: bitwise unchanged despite decay 0.1 and non-zero gradients (torch never saw it).
  np.testing.assert_array_equal(coupled["backbone/conv/kernel"], params["backbone"]["conv"]["kernel"])
  np.testing.assert_array_equal(decoupled["backbone/conv/kernel"], params["backbone"]["conv"]["kernel"])
  # The old (decoupled) behaviour is not torch's: off by orders of magnitude more than the tolerance.
  for name in ("head/kernel", "backbone/bn/scale"):
    gap = np.max(np.abs(decoupled[name] - want[name]))
    assert gap > 1e-2, (name, gap)


def test_decoupled_mode_is_the_previous_optimizer_bitwise():
  """``weight_decay_mode="decoupled"`` (the default) is the old chain trace -> decay -> lr."""
  params = _params()
  grads = _grads(params)
  labels = jax.tree.map(lambda _: "all", params)
  schedule = _schedule()
  old = optax.partition({"all": optax.chain(optax.trace(decay=0.9, nesterov=True), optax.add_decayed_weights(WD),
                                            optax.scale_by_learning_rate(lambda s: schedule(s) * 1.0))}, labels)
  new = optim.make_optimizer(labels=labels, groups={"all": optim.GroupConfig()}, schedule=schedule,
                             momentum=0.9, nesterov=True, weight_decay=WD)
  results = []
  for tx in (old, new):
    p, s = jax.tree.map(jnp.asarray, params), tx.init(params)
    for g in grads:
      u, s = jax.jit(tx.update)(g, s, p)
      p = optax.apply_updates(p, u)
    results.append(p)
  jax.tree.map(np.testing.assert_array_equal, results[0], results[1])


def test_momentum_zero_modes_coincide_and_bad_mode_is_a_config_error():
  params = {"w": np.array([1.0, -2.0], np.float32)}
  g = {"w": np.array([0.5, 0.5], np.float32)}
  outs = []
  for mode in optim.WEIGHT_DECAY_MODES:
    tx = optim.sgd(optax.constant_schedule(0.1), momentum=0.0, weight_decay=WD, weight_decay_mode=mode)
    u, _ = tx.update(g, tx.init(params), params)
    outs.append(np.asarray(u["w"]))
  np.testing.assert_allclose(outs[0], outs[1])
  np.testing.assert_allclose(outs[0], -0.1 * (g["w"] + WD * params["w"]), rtol=1e-6)
  with pytest.raises(ConfigError, match="weight_decay_mode must be 'coupled'.*got 'adamw'"):
    optim.make_optimizer(labels={"w": "all"}, groups={"all": optim.GroupConfig()},
                         schedule=optax.constant_schedule(0.1), weight_decay_mode="adamw")


PAPER_CONFIGS = {"baselines": "", "bi_tuning": "", "co_tuning": "", "model_patches": "table1",
                 "regularizers": "", "spottune": "", "spottune_decathlon": "aircraft", "default": ""}


def test_paper_configs_use_coupled_decay_and_full_validation_defaults_do_not():
  import importlib

  from ftjax.train.config import default_config
  from ftjax.train.setup import validate_config
  for name, arg in PAPER_CONFIGS.items():
    c = importlib.import_module(f"experiments.configs.{name}").get_config(arg)
    assert (c.optimizer.weight_decay_mode, c.dataset.val_source) == ("coupled", "full"), name
  c = default_config()
  assert (c.optimizer.weight_decay_mode, c.dataset.val_source) == ("decoupled", "sampled")
  tiny = importlib.import_module("experiments.configs.tiny").get_config()
  assert (tiny.optimizer.weight_decay_mode, tiny.dataset.val_source) == ("decoupled", "sampled")
  # Bad values: one-line ConfigErrors before any work.
  for field, value, message in (("optimizer.weight_decay_mode", "l2", "optimizer.weight_decay_mode must be"),
                                ("dataset.val_source", "all", "dataset.val_source must be"),
                                ("dataset.val_fraction", 1.0, r"dataset.val_fraction must be in \(0, 1\)")):
    bad = default_config()
    section, key = field.split(".")
    bad[section][key] = value
    with pytest.raises(ConfigError, match=message) as err:
      validate_config(bad)
    assert "\n" not in str(err.value)

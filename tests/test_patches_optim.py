"""Parameter rules -> optax.partition labels, and the SGDW optimizer, against NumPy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax.core import paths
from ftjax.train import optim


def _params():
  rng = np.random.default_rng(0)
  return {
      "backbone": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
                   "bn": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}},
      "head": {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)},
  }


def test_labels_follow_rules():
  labels = paths.path_labels(_params(), [("head/.*", "head"), ("backbone/bn/.*", "sb"),
                                           ("backbone/conv/.*", "frozen")])
  assert labels["head"]["kernel"] == "head"
  assert labels["backbone"]["bn"]["scale"] == "sb"
  assert labels["backbone"]["conv"]["kernel"] == "frozen"


def test_uncovered_and_double_cover_name_the_paths():
  with pytest.raises(paths.RuleError, match=re.escape("backbone/conv/kernel")) as e:
    paths.path_labels(_params(), [("head/.*", "head"), ("backbone/bn/.*", "sb")])
  assert "match no rule" in str(e.value)
  with pytest.raises(paths.RuleError, match="head/kernel.*several rules|several rules.*head/kernel"):
    paths.path_labels(_params(), [("head/.*", "head"), (".*kernel", "k"), ("backbone/bn/.*", "sb")])


def test_missing_group_config_is_an_error():
  labels = paths.path_labels(_params(), [(".*", "all")])
  with pytest.raises(paths.RuleError, match="all"):
    paths.check_groups(labels, {"head": optim.GroupConfig()})


def _numpy_sgdw(params, grads_seq, *, lr, momentum, nesterov, wd):
  """SGD with (Nesterov) momentum and decoupled weight decay, written out."""
  p = params.copy()
  m = np.zeros_like(p)
  for g in grads_seq:
    m = momentum * m + g
    direction = g + momentum * m if nesterov else m
    p = p - lr * (direction + wd * p)
  return p


@pytest.mark.parametrize("nesterov", [False, True])
def test_partitioned_sgdw_matches_numpy_and_freezes(nesterov):
  params = _params()
  labels = paths.path_labels(params, [("head/.*", "head"), ("backbone/bn/.*", "sb"),
                                        ("backbone/conv/.*", "frozen")])
  groups = {"head": optim.GroupConfig(lr_mult=10.0), "sb": optim.GroupConfig(weight_decay=0.0),
            "frozen": optim.GroupConfig(frozen=True)}
  tx = optim.make_optimizer(labels=labels, groups=groups, schedule=optax.constant_schedule(0.01),
                            momentum=0.9, nesterov=nesterov, weight_decay=0.1)
  rng = np.random.default_rng(1)
  grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(3)]

  @jax.jit
  def update(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s = jax.tree.map(jnp.asarray, params), tx.init(params)
  for g in grads_seq:
    p, s = update(p, s, g)
  # Frozen parameters are bitwise unchanged, despite weight decay 0.1 and non-zero gradients.
  np.testing.assert_array_equal(np.asarray(p["backbone"]["conv"]["kernel"]), params["backbone"]["conv"]["kernel"])
  want_head = _numpy_sgdw(params["head"]["kernel"], [g["head"]["kernel"] for g in grads_seq],
                          lr=0.1, momentum=0.9, nesterov=nesterov, wd=0.1)
  np.testing.assert_allclose(np.asarray(p["head"]["kernel"]), want_head, rtol=1e-5, atol=1e-6)
  want_scale = _numpy_sgdw(params["backbone"]["bn"]["scale"], [g["backbone"]["bn"]["scale"] for g in grads_seq],
                           lr=0.01, momentum=0.9, nesterov=nesterov, wd=0.0)
  np.testing.assert_allclose(np.asarray(p["backbone"]["bn"]["scale"]), want_scale, rtol=1e-5, atol=1e-6)


def test_schedules():
  cos = optim.make_schedule(name="cosine", base_lr=1.0, total_steps=100)
  assert float(cos(0)) == pytest.approx(1.0)
  assert float(cos(50)) == pytest.approx(0.5, abs=1e-6)
  assert float(cos(100)) == pytest.approx(0.0, abs=1e-6)
  ms = optim.make_schedule(name="multistep", base_lr=1.0, total_steps=100, boundaries=(0.5, 0.75))
  assert [float(ms(s)) for s in (49, 51, 76)] == pytest.approx([1.0, 0.1, 0.01])
  warm = optim.make_schedule(name="constant", base_lr=1.0, total_steps=100, warmup_steps=10)
  assert float(warm(5)) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="unknown schedule 'linear'"):
    optim.make_schedule(name="linear", base_lr=1.0, total_steps=10)

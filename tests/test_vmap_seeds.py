"""Seeds vmapped into one jitted program (``config.vmap_seeds``, :mod:`ftjax.train.vmap_seeds`).

Fast: the CPU kernels under ``jax.vmap`` equal their unbatched calls and XLA's
formulation; a vmapped train step equals the seeds' serial steps; the pieces
(method fields, writers, config, records, tables). Slow: the tiny run's 2 seeds
over 24 steps vmapped against serial (cross-entropy, Bi-Tuning's queues, SpotTune's
policy), and a killed vmapped run resumed against an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import kill_after_checkpoint, run_python

TINY = "experiments/configs/tiny.py"
# tests/test_train_loop.py's tolerance for 4 devices against 1 (float32 sums in
# another order, after SGD steps at lr 0.05).
PARAM_RTOL, PARAM_ATOL = 1e-3, 1e-4
LOSS_RTOL = 1e-4


# ----------------------------------------------------------------------------- CPU kernels under vmap


def _per_seed(fn, *stacked):
  """``fn`` on each seed's slice, one call each, stacked: the serial reference."""
  outs = [fn(*(a[i] for a in stacked)) for i in range(stacked[0].shape[0])]
  return jax.tree.map(lambda *xs: np.stack(xs), *outs)


@pytest.mark.parametrize("groups, strides", [(1, (1, 1)), (1, (2, 2)), (4, (1, 1))])
def test_onednn_conv_and_its_gradients_under_vmap(groups, strides):
  from ftjax.ops import onednn_conv
  if not onednn_conv.available():
    pytest.skip(onednn_conv.unavailable_reason())
  rng = np.random.default_rng(0)
  seeds, channels = 3, 4
  x = jnp.asarray(rng.normal(size=(seeds, 2, 9, 9, channels)), jnp.float32)
  # Each seed has its own kernel (the seeds' weights differ).
  kernel = jnp.asarray(rng.normal(size=(seeds, 3, 3, channels // groups, 8)), jnp.float32)
  pads = ((1, 1), (1, 1))

  def loss(conv):
    def f(x, k):
      y = conv(x, k)
      return jnp.sum(y * jnp.cos(y)), y
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

  onednn = loss(lambda x, k: onednn_conv.conv2d_onednn(x, k, strides=strides, pads=pads,
                                                       feature_group_count=groups))
  xla = loss(lambda x, k: lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                   feature_group_count=groups,
                                                   precision=lax.Precision.HIGHEST))
  (value, y), grads = jax.jit(jax.vmap(onednn))(x, kernel)
  (ref_value, ref_y), ref_grads = _per_seed(jax.jit(onednn), x, kernel)
  # The kernels run seed by seed: each seed's convolutions are its unbatched call's.
  np.testing.assert_array_equal(y, ref_y)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_array_equal(g, r)
  # And they are convolutions: XLA's, vmapped (an independent formulation).
  (xla_value, xla_y), xla_grads = jax.jit(jax.vmap(xla))(x, kernel)
  np.testing.assert_allclose(y, xla_y, rtol=1e-4, atol=1e-4)
  for g, r in zip(grads, xla_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)


def test_max_pool_and_channel_sums_kernels_under_vmap():
  from ftjax.ops import channel_sums, pool
  if not (pool.LIBRARY.available() and channel_sums.available()):
    pytest.skip("native max-pool / channel-sum kernels not built")
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 2, 8, 8, 5)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  mean = jnp.asarray(rng.normal(size=(5,)), jnp.float32)   # unbatched: shared by the seeds

  def pooled(impl):
    def f(x):
      y = pool.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)), impl=impl)
      return jnp.sum(y * y), y
    return jax.value_and_grad(f, has_aux=True)

  (_, y), g = jax.jit(jax.vmap(pooled("native")))(x)
  (_, ref_y), ref_g = _per_seed(jax.jit(pooled("native")), x)
  np.testing.assert_array_equal(y, ref_y)
  np.testing.assert_array_equal(g, ref_g)
  (_, xla_y), xla_g = jax.jit(jax.vmap(pooled("xla")))(x)   # reduce_window and select_and_scatter
  np.testing.assert_array_equal(y, xla_y)
  np.testing.assert_allclose(g, xla_g, rtol=1e-6)

  sums = jax.jit(jax.vmap(lambda d, x: channel_sums.centred_sums(dy=d, x=x, mean=mean)))(dy, x)
  moments = jax.jit(jax.vmap(channel_sums.moments))(x)
  x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  axes = (1, 2, 3)
  np.testing.assert_allclose(moments[0], x64.sum(axes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(moments[1], (x64 ** 2).sum(axes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sums[0], dy64.sum(axes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sums[1], (dy64 * (x64 - np.asarray(mean, np.float64))).sum(axes),
                             rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- the step


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_vmapped_step_equals_the_seeds_serial_steps(impl):
  """Two seeds (own initialisation, own rng, own batches) stepped 3 times: stacked and vmapped
  against each seed's own jitted step, with the CPU kernels ("auto") and with XLA's
  formulations only ("xla", batched by XLA: equal up to float rounding)."""
  from ftjax.ops.conv import conv_impl
  with conv_impl(impl):
    _vmapped_and_serial_steps()


def _vmapped_and_serial_steps():
  import optax
  from ftjax import models
  from ftjax.methods.finetune import CrossEntropy
  from ftjax.train import setup
  from ftjax.train import vmap_seeds as vs
  from ftjax.train.config import default_config

  model = models.create_model("resnet_tiny", num_classes=5)
  config = default_config()
  config.baseline = "scratch"
  rules, groups, bn_mode = setup.resolve_rules(config)
  trainings, batches = [], []
  for seed in (0, 1):
    variables = jax.tree.map(np.asarray, dict(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)),
                                                         train=False, outputs=model.all_outputs)))
    trainings.append(setup.init_training(
        model=model, variables=variables, methods=[CrossEntropy()], rules=rules, groups=groups,
        bn_mode=bn_mode, num_classes=5, schedule=optax.constant_schedule(0.05), momentum=0.9,
        weight_decay=5e-4, method_rng=jax.random.PRNGKey(10 + seed), state_rng=jax.random.PRNGKey(20 + seed)))
    rng = np.random.default_rng(seed)
    batches.append([{"image": rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32),
                     "label": rng.integers(0, 5, 8).astype(np.int32)} for _ in range(3)])

  class Run:  # what stack_training reads of a setup.Run
    def __init__(self, training, seed):
      self.training, self.methods, self.model = training, [CrossEntropy()], model
      self.total_steps, self.eval_every, self.config = 3, 3, type("C", (), {"seed": seed})()

  stacked = vs.stack_training([Run(t, s) for s, t in enumerate(trainings)])
  # Stacked before the serial steps: these donate their states.
  state = stacked.state
  losses = []
  for step in range(3):
    host = vs._stack_host([b[step] for b in batches])
    state, metrics = stacked.train_step(state, vs.stacked_global_batch(host, stacked.mesh), stacked.source)
    losses.append(np.asarray(metrics["loss"]))
  from ftjax.train import sharding as shd
  # One compiled serial step serves both seeds (the same function of state and batch).
  serial_step = trainings[0].train_step
  for seed, training in enumerate(trainings):
    serial = training.state
    for step in range(3):
      serial, metrics = serial_step(serial, shd.global_batch(batches[seed][step], training.mesh),
                                    training.source)
      np.testing.assert_allclose(losses[step][seed], float(metrics["loss"]), rtol=LOSS_RTOL)
    for a, b in zip(jax.tree.leaves(vs.unstack(state.params, seed)), jax.tree.leaves(serial.params)):
      np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    for a, b in zip(jax.tree.leaves(vs.unstack(state.batch_stats, seed)), jax.tree.leaves(serial.batch_stats)):
      np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL)
  assert not np.allclose(losses[-1][0], losses[-1][1])  # the seeds really differ


# ----------------------------------------------------------------------------- pieces


@dataclasses.dataclass(frozen=True)
class _Prepared:
  name: str = "prepared"
  relationship: object = None
  info: object = None

  def __post_init__(self):
    if self.relationship is not None and float(np.sum(self.relationship)) < 0:
      raise ValueError("negative")   # a check a traced value could not pass: with_fields skips __init__


def test_split_methods_stacks_what_differs_and_refuses_what_cannot_be_vmapped():
  from ftjax.core.errors import ConfigError
  from ftjax.train import vmap_seeds as vs
  per_seed = [[_Prepared(relationship=np.full((2, 2), s, np.float32), info={"approach": "reverse", "t": 1.0 + s})]
              for s in range(3)]
  templates, fields = vs.split_methods(per_seed)
  assert templates[0] is per_seed[0][0]
  assert sorted(fields.values[0]) == ["info", "relationship"]
  assert list(fields.values[0]["info"]) == ["1"]   # "approach" is the same for every seed: not stacked
  np.testing.assert_array_equal(fields.values[0]["relationship"]["0"][:, 0, 0], [0, 1, 2])

  def seed_sum(values):
    method = vs.with_fields(templates[0], fields.layouts[0], values)
    assert method.info["approach"] == "reverse"
    return method.relationship.sum() + method.info["t"]

  np.testing.assert_array_equal(jax.jit(jax.vmap(seed_sum))(fields.values[0]), [1, 6, 11])
  shared = np.ones(3)
  assert vs.split_methods([[_Prepared(relationship=shared)], [_Prepared(relationship=shared.copy())]])[1].values \
      == [{}]
  with pytest.raises(ConfigError, match="method 'prepared' prepares 'info' differently for each seed"):
    vs.split_methods([[_Prepared(info={"approach": "a"})], [_Prepared(info={"approach": "b"})]])
  with pytest.raises(ConfigError, match="not a number or numeric array of one shape"):
    vs.split_methods([[_Prepared(relationship=np.ones(2))], [_Prepared(relationship=np.ones(3))]])


def test_seed_writers_give_each_seed_its_row(tmp_path):
  from ftjax.train.metrics import MetricWriter, read_metrics
  from ftjax.train.vmap_seeds import SeedWriters
  writers = SeedWriters([MetricWriter(str(tmp_path / f"s{i}"), tensorboard=False) for i in range(2)])
  writers.write(4, "train", {"loss": np.array([1.5, 2.5]), "lr": 0.1})
  writers.write(8, "train", {"loss": np.array([1.0, 2.0]), "lr": 0.1})
  writers.truncate_after(4)
  assert read_metrics(str(tmp_path / "s1")) == [{"step": 4, "split": "train", "loss": 2.5, "lr": 0.1}]
  assert read_metrics(str(tmp_path / "s0"))[0]["loss"] == 1.5


def test_vmap_seeds_config_is_checked_and_recorded():
  from ftjax.core.errors import ConfigError
  from ftjax.train import loop
  from ftjax.train.config import default_config
  from ftjax.train.setup import semantic_config, validate_config
  from ftjax.train.vmap_seeds import stacked_semantic
  config = default_config()
  assert config.vmap_seeds is False
  config.vmap_seeds = True
  validate_config(config)
  semantic = semantic_config(config)
  assert semantic["vmap_seeds"] is True
  with pytest.raises(ConfigError, match="vmap_seeds=True trains a config's seeds together"):
    loop.train_and_evaluate(config, "/nonexistent")
  config.on_divergence = "record"
  with pytest.raises(ConfigError, match="vmap_seeds=True needs on_divergence='raise'"):
    validate_config(config)
  import ml_collections
  written = default_config().to_dict()
  written["vmap_seeds"] = "yes"   # a config built from a dict, not typed by the schema
  with pytest.raises(ConfigError, match="vmap_seeds must be True or False, got 'yes'"):
    validate_config(ml_collections.ConfigDict(written))
  # A checkpoint of the other choice is another config's.
  serial, vmapped = default_config(), default_config()
  vmapped.vmap_seeds = True
  second = default_config()
  second.seed = 1
  record = loop.checkpoint_record(stacked_semantic([vmapped, second]), 8)
  assert record["config"]["seed"] == [0, 1]
  with pytest.raises(ConfigError, match="a checkpoint of a different config"):
    loop.check_record(record, semantic=stacked_semantic([serial, second]), workdir="w", directory="d")
  loop.check_record(record, semantic=stacked_semantic([vmapped, second]), workdir="w", directory="d")


def test_a_table_never_mixes_vmapped_and_serial_seeds(tmp_path):
  from ftjax.train import report
  run = lambda seed, **extra: {"seed": seed, "best_val": 0.5, "test_top1": 0.5 + seed / 100,
                               "test_mean_per_class": 0.5, "trainable_parameters": 10, **extra}
  vmapped = {"finetune": [run(0, vmap_seeds=True), run(1, vmap_seeds=True)]}
  serial = {"bss": [run(0), run(1)]}
  assert "seeds vmapped" in report.format_table(vmapped, title="t")
  assert "seeds vmapped" not in report.format_table(serial, title="t")
  with pytest.raises(ValueError, match="never mixes vmapped and serial seeds: finetune"):
    report.format_table({**vmapped, **serial})
  with pytest.raises(ValueError, match="never mixes"):
    report.format_table({"finetune": [run(0, vmap_seeds=True), run(1)]})
  from ftjax.train.config import default_config
  config = default_config()
  config.compare = {"finetune": {}, "vmapped": {"vmap_seeds": True}}
  with pytest.raises(ValueError, match="vmap_seeds is set for the whole comparison, not per variant"):
    report.run_all(config, str(tmp_path / "w"))
  for name, results in (("a", vmapped), ("b", serial)):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "results.json").write_text(json.dumps(results))
  with pytest.raises(ValueError, match="never mixes"):
    report.combine_results([str(tmp_path / "a"), str(tmp_path / "b")])


# ----------------------------------------------------------------------------- the tiny run, slow

METHODS = {
    "ce": {},
    "bi_tuning": {"bi_tuning": {"weight": 1.0, "keys_per_class": 4, "projection_dim": 16}},
    "spottune": {"spottune": {"policy_depth": 1, "policy_width": 8, "policy_image_size": 16}},
}


def _tiny_config(method: str, vmap: bool, steps: int = 24):
  from experiments.configs import tiny
  c = tiny.get_config()
  c.losses = {"ce": {"weight": 1.0}, **METHODS[method]}
  c.tensorboard = False
  c.num_seeds = 2
  c.vmap_seeds = vmap
  c.num_steps = steps
  return c


def _rows(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  for row in rows:
    row.pop("images_per_s", None)   # a timing
  return rows


def _checkpoint(run_dir):
  from ftjax.train.checkpoint import load_checkpoint_arrays
  return load_checkpoint_arrays(str(run_dir))


@pytest.mark.slow
@pytest.mark.parametrize("method, impl, steps", [
    ("ce", "auto", 24), ("bi_tuning", "auto", 24), ("spottune", "auto", 24),
    # XLA's formulations (GPU/TPU; every CPU kernel off): XLA batches the seeds'
    # convolutions, so the numbers agree up to float32 rounding (1.8e-7 relative in the
    # loss at step 4), which SGD at lr 0.05 amplifies: 2.8e-4 in the loss and 1.4e-3 in
    # a parameter at step 24, 1.1e-4 in a parameter at step 8 (measured). Compared, as
    # tests/test_train_loop.py compares 4 devices with 1, after 6 steps.
    ("ce", "xla", 6)])
def test_vmapped_seeds_equal_serial_seeds(tmp_path, method, impl, steps, fashion_mnist_ready):
  from ftjax.ops.conv import conv_impl
  from ftjax.train import report
  with conv_impl(impl):
    serial = report.run_all(_tiny_config(method, False, steps), str(tmp_path / "serial"))["run"]
    vmapped = report.run_all(_tiny_config(method, True, steps), str(tmp_path / "vmapped"))["run"]
  stacked = _checkpoint(tmp_path / "vmapped" / "seeds0-1")
  assert stacked["step"] == steps and stacked["record"]["config"]["vmap_seeds"] is True
  for i, seed in enumerate((0, 1)):
    rows, ref_rows = _rows(tmp_path / "vmapped" / f"seed{seed}"), _rows(tmp_path / "serial" / f"seed{seed}")
    assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in ref_rows]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    np.testing.assert_allclose(losses, [r["loss"] for r in ref_rows if r["split"] == "train"], rtol=LOSS_RTOL)
    ref = _checkpoint(tmp_path / "serial" / f"seed{seed}")
    for part in ("params", "batch_stats", "method_state"):   # Bi-Tuning's queues and key encoder
      leaves, ref_leaves = jax.tree.leaves(stacked["state"][part]), jax.tree.leaves(ref["state"][part])
      assert len(leaves) == len(ref_leaves)
      for a, b in zip(leaves, ref_leaves):
        np.testing.assert_allclose(np.asarray(a[i], np.float64), np.asarray(b, np.float64),
                                   rtol=PARAM_RTOL, atol=PARAM_ATOL)
    record, ref_record = vmapped[i], serial[i]
    assert record.pop("vmap_seeds") is True and "vmap_seeds" not in ref_record
    assert record["seed"] == seed and record["best_step"] == ref_record["best_step"]
    assert record["test_top1"] == pytest.approx(ref_record["test_top1"], abs=2e-3)
    if method == "spottune":   # finalize ran per seed in the seed's directory
      assert os.path.exists(tmp_path / "vmapped" / f"seed{seed}" / "spottune_decisions.npy")
      assert record["spottune_block_usage"] == pytest.approx(ref_record["spottune_block_usage"], abs=0.02)
  assert stacked["state"]["rng"][0].tolist() != stacked["state"]["rng"][1].tolist()
  with open(tmp_path / "vmapped" / "results_table.md") as f:
    assert "seeds vmapped" in f.read()


@pytest.mark.slow
def test_a_killed_vmapped_run_resumes_to_the_uninterrupted_one(tmp_path, fashion_mnist_ready):
  train = lambda workdir: ["-m", "experiments.train", f"--config={TINY}", f"--workdir={workdir}",
                           "--config.num_seeds=2", "--config.vmap_seeds=True", "--config.log_every_steps=2",
                           "--config.tensorboard=False"]
  ref = tmp_path / "ref"
  run_python(train(ref))
  killed = tmp_path / "killed"
  kill_after_checkpoint(train(killed), checkpoints=killed / "seeds0-1" / "checkpoints", min_step=8, devices=1)
  step_at_kill = _checkpoint(killed / "seeds0-1")["step"]
  assert 8 <= step_at_kill < 24
  run_python(train(killed))   # resumes from the stacked checkpoint
  a, b = _checkpoint(killed / "seeds0-1"), _checkpoint(ref / "seeds0-1")
  assert a["step"] == b["step"] == 24
  for part in ("state", "best"):
    leaves, ref_leaves = jax.tree.leaves(a[part]), jax.tree.leaves(b[part])
    assert len(leaves) == len(ref_leaves) > 0
    for x, y in zip(leaves, ref_leaves):
      np.testing.assert_array_equal(x, y)
  for seed in (0, 1):
    assert _rows(killed / f"seed{seed}") == _rows(ref / f"seed{seed}")
    with open(killed / f"seed{seed}" / "results.json") as f, open(ref / f"seed{seed}" / "results.json") as g:
      assert json.load(f) == json.load(g)


def test_seeds_with_different_step_counts_are_refused():
  from types import SimpleNamespace
  from ftjax.core.errors import ConfigError
  from ftjax.train import vmap_seeds as vs
  runs = [SimpleNamespace(total_steps=steps, eval_every=steps // 10, config=SimpleNamespace(seed=seed))
          for seed, steps in ((0, 50), (1, 60))]
  with pytest.raises(ConfigError, match="seed 0 trains 50 steps validating every 5, seed 1 60 every 6 .*"
                                        "set num_steps and eval_every_steps"):
    vs.stack_training(runs)


def test_multitask_refuses_vmapped_seeds():
  """A multitask run would otherwise ignore vmap_seeds and run its seeds serially."""
  from experiments.configs import tiny
  from ftjax.core.errors import ConfigError
  from ftjax.methods import multitask
  c = tiny.get_config()
  c.baseline = "patch"
  c.tasks = {"px32": {"image_size": 32}, "px40": {"image_size": 40}}
  c.vmap_seeds = True
  with pytest.raises(ConfigError, match="vmap_seeds=True is not supported for a multitask run"):
    multitask.task_configs(c)

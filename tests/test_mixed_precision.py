"""bfloat16 mixed precision (``config.compute_dtype = "bfloat16"``) against float32.

Every method runs the tiny config (``experiments/configs/tiny.py``: a tiny ResNet on
1% of Fashion-MNIST at 32 px) plus that method, built twice by the trainer's own
``setup_run`` (float32 and bfloat16) from the same dataset and seed, so both steps see
the same initial parameters, method state and batch. The gradients are read from the
trainer's own step function with an optimizer that records them, and compared with the
float32 step: the loss within 2% relative, the gradient within 5% (norm of the
difference over the float32 gradient's norm). In bfloat16 the parameters, optimizer
state, BatchNorm statistics and method states stay float32 while the backbone's
activations are bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import tiny
from ftjax import models
from ftjax.core import paths
from ftjax.train import setup as setup_lib
from ftjax.train import sharding as shd
from ftjax.train import step as step_lib

# name -> (config changes, losses added to the cross-entropy). Small method settings keep the
# runs tiny (queues of 4 keys per class, a 16-d projector, a 2-block SpotTune policy).
METHODS = {
    "ce": ({}, {}),
    "l2_sp": ({}, {"l2_sp": {}}),
    "delta": ({}, {"delta": {}}),
    "bss": ({}, {"bss": {}}),
    "lwf": ({}, {"lwf": {}}),
    "co_tuning": ({}, {"co_tuning": {"weight": 2.3}}),
    "bi_tuning": ({}, {"bi_tuning": {"weight": 1.0, "keys_per_class": 4, "projection_dim": 16}}),
    "spottune": ({}, {"spottune": {"policy_depth": 1, "policy_width": 8, "policy_image_size": 16}}),
    "patch": ({"baseline": "patch"}, {}),
    "data_reuse": ({"reuse": {"enabled": True, "weight": 0.3}}, {}),
}


def _config(method: str, dtype: str):
  c = tiny.get_config()
  changes, losses = METHODS[method]
  for key, value in changes.items():
    if isinstance(value, dict):
      c[key].update(value)
    else:
      c[key] = value
  c.losses = {"ce": {"weight": 1.0}, **losses}
  c.compute_dtype = dtype
  c.tensorboard = False
  return c


@pytest.fixture(scope="module")
def dataset(fashion_mnist_ready):
  return setup_lib.load_run_dataset(tiny.get_config())


def _gradient_recorder() -> optax.GradientTransformation:
  """An optimizer that changes nothing and keeps the step's gradient as its state."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


_BATCHES: dict = {}


def _first_batch(run, config):
  """The run's first train batch (the target part read once per number of views)."""
  key = (id(run.dataset), run.context.views)
  if key not in _BATCHES:
    _BATCHES[key] = next(run.dataset.train_batches(batch_size=config.batch_size, views=run.context.views))
  batch = dict(_BATCHES[key])
  for m in run.methods:
    extra = m.extra_batches(batch_size=config.batch_size, start_step=0)
    if extra is not None:
      batch = m.mix_batch(batch=batch, extra=next(extra))
  return batch


def _loss_and_gradient(method: str, dtype: str, dataset, workdir):
  """The run's first-step loss and gradient (flat path -> array), and the run."""
  config = _config(method, dtype)
  run = setup_lib.setup_run(config, str(workdir / dtype), dataset=dataset)
  training = run.training
  frozen_mask = (jax.tree.map(lambda label: label in training.frozen, training.labels)
                 if training.frozen else None)
  recorder = _gradient_recorder()
  step = jax.jit(step_lib.make_train_step(model=run.model, optimizer=recorder, methods=run.methods,
                                          train_bn=run.bn_mode == "train", frozen_mask=frozen_mask))
  state = jax.device_get(training.state)
  state = state.replace(opt_state=recorder.init(state.params))
  batch = shd.global_batch(_first_batch(run, config), training.mesh)
  new_state, metrics = step(state, batch, training.source)
  grads = jax.device_get(new_state.opt_state)
  return float(metrics["loss"]), dict(zip(paths.param_paths(grads), jax.tree.leaves(grads))), run


# The default suite compares two methods (the plain step, and SpotTune: a routed model with
# its float32 policy and frozen copies); every other method's run is `slow` (each pair of
# runs takes 15-60 s on 2 shared cores: relationships, channel weights, queues, a pool).
DEFAULT_METHODS = ("ce", "spottune")


@pytest.mark.parametrize("method", [m if m in DEFAULT_METHODS else pytest.param(m, marks=pytest.mark.slow)
                                    for m in sorted(METHODS)])
def test_bfloat16_step_matches_float32(method, dataset, tmp_path):
  loss32, grad32, run32 = _loss_and_gradient(method, "float32", dataset, tmp_path)
  loss16, grad16, run16 = _loss_and_gradient(method, "bfloat16", dataset, tmp_path)
  assert run32.model.dtype == jnp.float32 and run16.model.dtype == jnp.bfloat16
  assert np.isfinite(loss32) and loss16 == pytest.approx(loss32, rel=0.02)
  assert grad16.keys() == grad32.keys()
  assert all(g.dtype == np.float32 for g in grad16.values())
  g32 = np.concatenate([np.ravel(g) for g in grad32.values()]).astype(np.float64)
  g16 = np.concatenate([np.ravel(grad16[k]) for k in grad32]).astype(np.float64)
  assert np.linalg.norm(g32) > 0
  relative = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); a difference of
  # exactly 0 would mean the backbone did not run in bfloat16 at all.
  print(f"{method}: loss {loss32:.5f} (float32) {loss16:.5f} (bfloat16); gradient difference {relative:.4f}")
  assert 0 < relative < 0.05, relative


def _float_dtypes(tree) -> set:
  return {np.asarray(leaf).dtype for leaf in jax.tree.leaves(tree)
          if np.issubdtype(np.asarray(leaf).dtype, np.floating)}


@pytest.mark.parametrize("method", ["bi_tuning", pytest.param("spottune", marks=pytest.mark.slow)])
def test_bfloat16_run_keeps_state_float32_and_activations_bfloat16(method, dataset, tmp_path):
  config = _config(method, "bfloat16")
  run = setup_lib.setup_run(config, str(tmp_path), dataset=dataset)
  training = run.training
  batch = shd.global_batch(_first_batch(run, config), training.mesh)
  state, metrics = training.train_step(training.state, batch, training.source)
  state, metrics = training.train_step(state, batch, training.source)
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
  for part in ("params", "opt_state", "batch_stats", "method_state"):
    assert _float_dtypes(getattr(state, part)) <= {np.dtype(np.float32)}, part
  assert _float_dtypes(state.params) == {np.dtype(np.float32)}
  assert _float_dtypes(state.opt_state) == {np.dtype(np.float32)}   # momentum traces
  # The forward pass: bfloat16 feature maps, float32 pooled features and logits.
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  outputs = ("features", "logits", "feature_maps")
  out = run.model.apply(variables, batch["image"][:4], train=False, outputs=outputs,
                        rngs={"gumbel": jax.random.key(0)})
  assert {m.dtype for m in out["feature_maps"].values()} == {jnp.dtype(jnp.bfloat16)}
  assert out["features"].dtype == jnp.float32 and out["logits"].dtype == jnp.float32


def test_compute_dtype_names():
  assert models.create_model("resnet_tiny", num_classes=3).dtype == jnp.float32
  assert models.create_model("resnet_tiny", num_classes=3, dtype="bfloat16").dtype == jnp.bfloat16
  assert models.create_model("resnet_tiny", num_classes=3, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="compute_dtype must be one of 'float32', 'bfloat16', got 'float16'"):
    models.create_model("resnet_tiny", num_classes=3, dtype="float16")


def test_bad_compute_dtype_is_a_one_line_error(tmp_path, fashion_mnist_ready):
  from conftest import run_python
  proc = run_python(["-m", "experiments.train", "--config=experiments/configs/tiny.py",
                     f"--workdir={tmp_path}", "--config.compute_dtype=fp16"], check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      "ftjax: error: compute_dtype must be one of 'float32', 'bfloat16', got 'fp16'")


@pytest.mark.slow
def test_tiny_run_in_bfloat16_ends_within_3_points_of_float32(tmp_path, fashion_mnist_ready):
  from ftjax.train.loop import train_and_evaluate
  results = {}
  for dtype in ("float32", "bfloat16"):
    config = _config("ce", dtype)
    # The tiny config trained long enough to learn (its 24 steps end near 28%): about 5 epochs
    # of its 1% sample, so a 3-point band compares two trained models, not two starts.
    config.num_steps, config.eval_every_steps = 200, 50
    results[dtype] = train_and_evaluate(config, str(tmp_path / dtype))
  top1 = {dtype: r["test_top1"] for dtype, r in results.items()}
  print("test top-1 after 200 tiny steps:", top1)
  assert top1["float32"] > 0.4, top1   # the run learns (10 classes: chance is 0.1)
  assert abs(top1["bfloat16"] - top1["float32"]) <= 0.03, top1


ACCELERATOR_IMPORTS = r"""
import sys, importlib.abc

class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "ml_collections"):
      raise ImportError(f"{name} is not installed on the GPU machine")
    return None

sys.meta_path.insert(0, Blocked())
from experiments.bench import accelerator
assert not {"tensorflow", "tensorflow_datasets", "ml_collections"} & set(sys.modules)
print("ok", accelerator.peak_flops("NVIDIA H200", "bfloat16"))
"""


def test_accelerator_benchmark_needs_no_tensorflow_nor_ml_collections():
  from conftest import run_python
  out = run_python(["-c", ACCELERATOR_IMPORTS]).stdout
  assert out.strip().splitlines()[-1] == "ok 989000000000000.0"


@pytest.mark.slow
def test_accelerator_benchmark_runs_quick_on_cpu():
  from conftest import run_python
  out = run_python(["-m", "experiments.bench.accelerator", "--quick", "--models", "efficientnet_lite0",
                    "--dtypes", "bfloat16", "--no-torch"], timeout=900).stdout
  rows = [line for line in out.splitlines() if line.startswith("| efficientnet_lite0 | bfloat16 |")]
  assert [row.split("|")[3].strip() for row in rows] == ["ftjax", "ftjax 3 seeds vmapped", "ftjax 3 seeds serial"]
  assert all(float(row.split("|")[4]) > 0 for row in rows)

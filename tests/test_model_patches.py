"""Model patches (Mudrakarta et al., 2019): selections, rules, training, patch files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.core import paths
from ftjax.methods import patches
from ftjax.methods.finetune import CrossEntropy
from ftjax.train import sharding as shd
from ftjax.train.config import default_config
from ftjax.core.errors import ConfigError
from ftjax.train import setup
from ftjax.train.setup import resolve_rules
from ftjax.train.state import TrainState

NUM_CLASSES = 5


def _variables(name):
  model = models.create_model(name, num_classes=NUM_CLASSES)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False,
                         outputs=model.all_outputs)
  return model, jax.tree.map(np.asarray, dict(variables))


@pytest.fixture(scope="module")
def effnet():
  model, variables = _variables("efficientnet_tiny")
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, NUM_CLASSES, 8).astype(np.int32)}
  return model, variables, batch


def _leaves(tree):
  return {paths.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- selections


@pytest.mark.parametrize("name", ["efficientnet_tiny", "resnet_tiny"])
def test_scale_bias_selects_exactly_the_batchnorm_parameters(name):
  _, v = _variables(name)
  flat = _leaves(v["params"])
  # Independent check: a BatchNorm layer is a module whose params are exactly {scale, bias}
  # with 1-D leaves and which has running statistics of the same length.
  stats = _leaves(v["batch_stats"])
  expected = sorted(p for p in flat if p.rsplit("/", 1)[-1] in ("scale", "bias")
                    and p.rsplit("/", 1)[0] + "/mean" in stats
                    and stats[p.rsplit("/", 1)[0] + "/mean"].shape == flat[p].shape)
  got = sorted(patches.structural_paths(v["params"], batch_stats=v["batch_stats"], selection="scale_bias"))
  assert got == expected and len(got) > 0
  assert all(flat[p].ndim == 1 for p in got)
  regex = patches.selection_regex(v["params"], batch_stats=v["batch_stats"], selection="scale_bias")
  assert sorted(p for p in flat if __import__("re").fullmatch(regex, p)) == expected


def test_depthwise_selects_the_depthwise_kernels(effnet):
  _, v, _ = effnet
  flat = _leaves(v["params"])
  got = patches.structural_paths(v["params"], selection="depthwise")
  assert sorted(got) == sorted(p for p in flat if p.endswith("depthwise_conv/kernel"))
  _, resnet = _variables("resnet_tiny")
  with pytest.raises(ValueError, match="depthwise selection matches no parameter"):
    patches.selection_regex(resnet["params"], selection="depthwise")


def test_selection_errors_name_the_problem(effnet):
  _, v, _ = effnet
  with pytest.raises(ValueError, match="unknown patch selection 'bn'"):
    patches.patch_rules(v["params"], batch_stats=v["batch_stats"], selection="scale_bias+bn")
  with pytest.raises(ValueError, match="needs the model's batch_stats"):
    patches.structural_paths(v["params"], selection="scale_bias")
  # A dense layer whose name collides with a BatchNorm layer's is caught by the structure check.
  params = jax.tree.map(lambda x: x, v["params"])
  params["backbone"]["blocks_0"]["extra"] = {"depthwise_bn": {"scale": np.ones((3, 3))}}
  with pytest.raises(ValueError, match="also matches.*extra/depthwise_bn/scale"):
    patches.selection_regex(params, batch_stats=v["batch_stats"], selection="scale_bias")


@pytest.mark.parametrize("selection,train_head", [("scale_bias", True), ("scale_bias", False),
                                                  ("depthwise", True), ("scale_bias+depthwise", True),
                                                  ("head", True), ("all", True)])
def test_patch_rules_cover_every_parameter_exactly_once(effnet, selection, train_head):
  _, v, _ = effnet
  rules = patches.patch_rules(v["params"], batch_stats=v["batch_stats"], selection=selection,
                              train_head=train_head)
  labels = _leaves(paths.path_labels(v["params"], rules))  # raises on a gap or an overlap
  body = set()
  for part in patches.parse_selection(selection):
    if part != "head":
      body |= set(patches.structural_paths(v["params"], batch_stats=v["batch_stats"], selection=part))
  for path, label in labels.items():
    if selection == "all":
      assert label == "patch"
    elif path.startswith("head/"):
      assert label == ("head" if train_head else "frozen")
    else:
      assert label == ("patch" if path in body else "frozen"), path


# ----------------------------------------------------------------------------- training


def _train_patch(model, variables, batch, config, steps=3):
  rules, groups, bn_mode = resolve_rules(config, variables)
  training = setup.init_training(model=model, variables=variables, methods=[CrossEntropy()], rules=rules,
                                 groups=groups, bn_mode=bn_mode,
                                 num_classes=int(variables["params"]["head"]["bias"].shape[0]),
                                 schedule=lambda s: 0.05, momentum=0.9,
                                 weight_decay=0.1,  # large decay: it must not reach frozen weights
                                 method_rng=jax.random.PRNGKey(0), state_rng=jax.random.PRNGKey(1))
  state, labels = training.state, training.labels
  for _ in range(steps):
    state, _ = training.train_step(state, shd.global_batch(batch, training.mesh), training.source)
  return jax.device_get(state), labels, bn_mode


@pytest.mark.parametrize("selection,train_head", [("scale_bias", True), ("depthwise", False)])
def test_training_a_patch_leaves_every_other_parameter_bitwise_equal(effnet, selection, train_head):
  model, v, batch = effnet
  config = default_config()
  config.model, config.baseline = "efficientnet_tiny", "patch"
  config.patch.selection, config.patch.train_head = selection, train_head
  state, labels, bn_mode = _train_patch(model, v, batch, config)
  # Statistics re-estimated exactly when the patch holds them (S/B); a DW patch keeps them.
  assert bn_mode == ("train" if selection == "scale_bias" else "eval")
  before, after, label = _leaves(v["params"]), _leaves(state.params), _leaves(labels)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  trained = {p for p, g in label.items() if g in ("patch", "head")}
  assert changed == trained  # every patch parameter moved, nothing else did (bitwise)
  assert any(p.startswith("head/") for p in changed) == train_head


def _row_config(arg, row):
  """The ``row`` variant of ``model_patches.get_config(arg)`` on the tiny EfficientNet."""
  from experiments.configs import model_patches
  from ftjax.train.report import variant_configs
  cfg = variant_configs(model_patches.get_config(arg))[row]
  cfg.model, cfg.pretrained = "efficientnet_tiny", ""
  return cfg


def test_last_layer_row_keeps_the_pretrained_batchnorm_statistics_bitwise(effnet):
  # Paper App. B.1: the last-layer baseline fine-tunes "with frozen statistics"; re-estimating
  # them is the separate "+ batchnorm statistics" row (Table 5).
  model, v, batch = effnet
  for arg in ("table1", "fig2"):
    names = {"table1": ("last_layer", "last_layer_bn_stats"),
             "fig2": ("last_layer_lr0p0405", "last_layer_bn_stats_lr0p0405")}[arg]
    state, labels, bn_mode = _train_patch(model, v, batch, _row_config(arg, names[0]))
    assert bn_mode == "eval"
    before, after = _leaves(v["batch_stats"]), _leaves(state.batch_stats)
    assert all(np.array_equal(before[p], after[p]) for p in before)   # bitwise
    assert {g for g in jax.tree.leaves(labels)} == {"head", "frozen"}
    assert not np.array_equal(_leaves(v["params"])["head/kernel"], _leaves(state.params)["head/kernel"])
    state, _, bn_mode = _train_patch(model, v, batch, _row_config(arg, names[1]))
    assert bn_mode == "train"
    after = _leaves(state.batch_stats)
    assert all(not np.array_equal(before[p], after[p]) for p in before if p.endswith("/mean"))


def test_rows_run_with_the_statistics_their_patch_defines():
  from experiments.configs import model_patches
  from ftjax.methods import build_methods, config_losses
  from ftjax.train.report import variant_configs
  from ftjax.train.setup import resolve_bn_mode
  expected = {"last_layer": "eval", "last_layer_bn_stats": "train", "sb_last_layer": "train",
              "sb_random_last_layer": "train", "dw_last_layer": "eval", "all": "train"}
  for arg in ("table1", "fig2"):
    for name, cfg in variant_configs(model_patches.get_config(arg)).items():
      row = name.split("_lr")[0]
      assert resolve_bn_mode(cfg, build_methods(config_losses(cfg))) == expected[row], name
  # Without config.bn_mode the method picks it from the patch's definition.
  assert patches.ModelPatch(selection="head").bn_mode == "eval"
  assert patches.ModelPatch(selection="depthwise").bn_mode == "eval"
  assert patches.ModelPatch(selection="scale_bias", train_head=False).bn_mode == "train"
  assert patches.ModelPatch(selection="head", bn_statistics="task").bn_mode == "train"
  assert patches.ModelPatch(selection="scale_bias", bn_statistics="pretrained").bn_mode == "eval"
  with pytest.raises(ConfigError, match="bn_statistics"):
    patches.ModelPatch(bn_statistics="sometimes")


class _Dataset:
  name, num_classes = "toy", NUM_CLASSES


@pytest.mark.parametrize("selection", ["scale_bias", "head"])
def test_patch_file_holds_the_reestimated_mean_and_variance_of_a_scale_bias_patch(effnet, tmp_path, selection):
  from ftjax.methods.base import RunContext
  model, v, batch = effnet
  config = default_config()
  config.model, config.baseline = "efficientnet_tiny", "patch"
  config.patch.selection = selection
  state, labels, bn_mode = _train_patch(model, v, batch, config)
  trained = {"params": state.params, "batch_stats": state.batch_stats}
  context = RunContext(dataset=_Dataset(), model=model, variables=trained, workdir=str(tmp_path),
                       bn_mode=bn_mode, model_name="efficientnet_tiny", image_size=32, labels=labels,
                       base_variables=v)
  result = patches.ModelPatch(selection=selection).finalize(context)
  saved = patches.load_patch(tmp_path / "patch.npz")
  stats = _leaves(v["batch_stats"])
  if selection == "head":   # pretrained statistics, unchanged: not part of the patch
    assert saved.batch_stats == {} and result["patch_bn_statistics"] == "pretrained"
    return
  assert result["patch_bn_statistics"] == "task" and saved.info["bn_statistics"] == "task"
  bn_layers = {p.rsplit("/", 1)[0] for p in patches.structural_paths(
      v["params"], batch_stats=v["batch_stats"], selection="scale_bias")}
  # Every BatchNorm layer's running mean and variance, as re-estimated on the task.
  assert set(saved.batch_stats) == {f"{layer}/{s}" for layer in bn_layers for s in ("mean", "var")}
  after = _leaves(state.batch_stats)
  for path, value in saved.batch_stats.items():
    np.testing.assert_array_equal(value, after[path])
    assert not np.array_equal(value, stats[path]), path
  assert set(saved.params) == set(patches.structural_paths(
      v["params"], batch_stats=v["batch_stats"], selection="scale_bias")) | {"head/kernel", "head/bias"}


# ----------------------------------------------------------------------------- patch files


def test_save_load_apply_gives_identical_logits_and_sizes(effnet, tmp_path):
  model, v, batch = effnet
  config = default_config()
  config.model, config.baseline = "efficientnet_tiny", "patch"
  state, labels, _ = _train_patch(model, v, batch, config)
  trained = {"params": state.params, "batch_stats": state.batch_stats}
  patch = patches.extract_patch(trained, labels, info={"selection": "scale_bias"})
  path = patches.save_patch(tmp_path / "p" / "patch.npz", patch)
  loaded = patches.load_patch(path)
  assert loaded.info == {"selection": "scale_bias"}
  applied = patches.apply_patch(v, loaded)
  x = batch["image"]
  ref = model.apply(trained, x, train=False)["logits"]
  np.testing.assert_array_equal(np.asarray(model.apply(applied, x, train=False)["logits"]), np.asarray(ref))
  # The base is untouched by apply (a copy is returned).
  np.testing.assert_array_equal(_leaves(v["params"])["head/kernel"], _leaves(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"])["head/kernel"])

  label = _leaves(labels)
  n_expected = sum(int(np.size(x)) for p, x in _leaves(v["params"]).items() if label[p] != "frozen")
  n_total = sum(int(np.size(x)) for x in jax.tree.leaves(v["params"]))
  bytes_expected = 4 * (n_expected + sum(int(np.size(x)) for x in jax.tree.leaves(v["batch_stats"])))
  size = patches.patch_size(loaded, v["params"])
  assert size == (n_expected, bytes_expected, pytest.approx(100 * n_expected / n_total))
  assert size.percent < 25


def test_patch_file_errors(effnet, tmp_path):
  _, v, _ = effnet
  with pytest.raises(FileNotFoundError, match="patch file .*missing.npz"):
    patches.load_patch(tmp_path / "missing.npz")
  bad = patches.Patch({"head/kernel": np.zeros((3, 3), np.float32)}, {}, {})
  with pytest.raises(ValueError, match=r"head/kernel has shape \(3, 3\)"):
    patches.apply_patch(v, bad)
  bad = patches.Patch({"nope/kernel": np.zeros((3,), np.float32)}, {}, {})
  with pytest.raises(ValueError, match="not in the base model: nope/kernel"):
    patches.apply_patch(v, bad)
  labels = jax.tree.map(lambda _: "frozen", v["params"])
  with pytest.raises(ValueError, match="no parameter is labelled"):
    patches.extract_patch(v, labels)


def test_patch_baseline_needs_variables():
  config = default_config()
  config.baseline = "patch"
  with pytest.raises(ConfigError, match="patch baseline needs the model's variables"):
    resolve_rules(config)


PATCH_RUN = r"""
import sys, json
import jax, numpy as np
from experiments.configs import tiny
from ftjax.core import paths
from ftjax.methods import patches
from ftjax.data import load_dataset
from ftjax.train import loop, setup
c = tiny.get_config()
c.baseline = "patch"
c.num_steps, c.eval_every_steps = 4, 4
results = loop.train_and_evaluate(c, sys.argv[1])
# Rebuild the same base (same seed) and apply the saved patch: its val accuracy must equal
# the one the run recorded for the chosen checkpoint.
init_rng = jax.random.split(jax.random.PRNGKey(c.seed), 3)[0]
model, base = setup.build_model(c, num_classes=10, keep_source_head=False, rng=init_rng)
patched = patches.apply_patch(base, patches.load_patch(sys.argv[1] + "/patch.npz"))
ds = load_dataset("fashion_mnist", sampling_rate=c.dataset.sampling_rate, seed=c.seed,
                  val_fraction=c.dataset.val_fraction, image_size=c.dataset.image_size)
mesh = loop.shd.make_data_mesh()
eval_step = loop.step_lib.make_eval_step(model=model, num_classes=10, mesh=mesh)
val = loop.evaluate(eval_step, patched, ds, "val", batch_size=c.eval_batch_size, mesh=mesh)
print(json.dumps({"results": results, "val": val["top1"]}))
"""


def test_patch_run_writes_a_patch_that_reproduces_the_chosen_checkpoint(tmp_path, fashion_mnist_ready):
  from conftest import run_python
  out = json.loads(run_python(["-c", PATCH_RUN, str(tmp_path)]).stdout.strip().splitlines()[-1])
  r = out["results"]
  assert out["val"] == pytest.approx(r["best_val"], abs=1e-7)
  assert 0 < r["patch_parameters"] < r["total_parameters"]
  assert r["patch_parameters"] == r["trainable_parameters"]
  assert (tmp_path / "patch.npz").exists()


# ----------------------------------------------------------------------------- multitask


def test_multitask_step_sums_task_gradients_on_the_shared_weights(effnet):
  import optax
  from ftjax.methods import multitask
  model, v, batch = effnet
  privates = multitask.private_paths(v, selection="scale_bias", share_head=False)
  shared, private = multitask.split_params(v["params"], privates)
  # A ReLU6 input within float32 rounding of 0 or 6 flips its mask between two float32
  # computations and moves these gradients by percents. With this seed the smallest
  # distance of any ReLU6 input from 0 or 6 is 1.2e-5 (task b, float64; task a 2.5e-6),
  # far above the rounding; with seed 3 it was 5e-7 and the step's channel sums
  # (one-pass kernel vs XLA's) landed on different sides.
  rng = np.random.default_rng(9)
  other = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype) * 0.05, private)
  params = {"shared": shared, "tasks": {"a": private, "b": other}}
  batches = {"a": batch, "b": {"image": rng.uniform(0, 255, (8, 40, 40, 3)).astype(np.float32),
                                "label": rng.integers(0, NUM_CLASSES, 8).astype(np.int32)}}
  sgd = optax.sgd(1.0)  # update = -gradient
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats={"a": v["batch_stats"], "b": v["batch_stats"]},
                     opt_state=sgd.init(params), method_state={}, rng=jax.random.PRNGKey(0))
  step = jax.jit(multitask.make_multitask_step(models={"a": model, "b": model}, optimizer=sgd))
  new, metrics = step(state, batches)

  def task_grad(task_private, b):  # single-task gradient on the merged tree, computed independently
    def loss(full):
      out, _ = model.apply({"params": full, "batch_stats": v["batch_stats"]}, b["image"], train=True,
                           mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(out["logits"], b["label"]).mean()
    return _leaves(jax.grad(loss)(multitask.merge_params(shared, task_private)))

  ga, gb = task_grad(private, batches["a"]), task_grad(other, batches["b"])
  for path, value in _leaves(new.params["shared"]).items():
    np.testing.assert_allclose(_leaves(shared)[path] - value, ga[path] + gb[path], rtol=2e-4, atol=1e-6)
  for task, g, before in (("a", ga, private), ("b", gb, other)):
    for path, value in _leaves(new.params["tasks"][task]).items():
      np.testing.assert_allclose(_leaves(before)[path] - value, g[path], rtol=2e-4, atol=1e-6)
  assert set(privates) == {p for p in _leaves(v["params"]) if p.startswith("head/")} | set(
      patches.structural_paths(v["params"], batch_stats=v["batch_stats"], selection="scale_bias"))


def test_all_shared_multitask_shares_the_batchnorm_statistics(effnet):
  # Table 4's "all shared" column reports no private parameter: the statistics are shared
  # too. Only a scale-and-bias patch ("all the γ, β, μ, σ") keeps them per task.
  import optax
  from experiments.configs import model_patches
  from ftjax.methods import multitask
  model, v, batch = effnet
  assert model_patches.get_config("table4_shared").patch.selection == "none"
  assert not multitask.private_statistics("none") and not multitask.private_statistics("depthwise")
  assert multitask.private_statistics("scale_bias") and multitask.private_statistics("scale_bias+depthwise")
  privates = multitask.private_paths(v, selection="none", share_head=True)
  assert privates == set()
  shared, private = multitask.split_params(v["params"], privates)
  params = {"shared": shared, "tasks": {"a": private, "b": private}}
  rng = np.random.default_rng(4)
  batches = {"a": batch, "b": {"image": rng.uniform(0, 255, (8, 40, 40, 3)).astype(np.float32),
                                "label": rng.integers(0, NUM_CLASSES, 8).astype(np.int32)}}
  stats = multitask.initial_batch_stats(v["batch_stats"], ["a", "b"], private=False)
  sgd = optax.sgd(0.0)   # statistics only
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                     opt_state=sgd.init(params), method_state={}, rng=jax.random.PRNGKey(0))
  step = jax.jit(multitask.make_multitask_step(models={"a": model, "b": model}, optimizer=sgd))
  new, _ = step(state, batches)
  after_a = multitask.task_variables(new.params, new.batch_stats, "a")["batch_stats"]
  after_b = multitask.task_variables(new.params, new.batch_stats, "b")["batch_stats"]
  jax.tree.map(np.testing.assert_array_equal, after_a, after_b)   # one set, bitwise the same
  # One network seeing task a's batch, then task b's (independent of the step's code).
  chained = v["batch_stats"]
  for name in ("a", "b"):
    _, updated = model.apply({"params": v["params"], "batch_stats": chained}, batches[name]["image"],
                             train=True, mutable=["batch_stats"])
    chained = updated["batch_stats"]
  for path, value in _leaves(chained).items():
    np.testing.assert_allclose(_leaves(after_a)[path], value, rtol=1e-5, atol=1e-6)
  # A scale-and-bias patch keeps one set per task, each from its own data only.
  stats = multitask.initial_batch_stats(v["batch_stats"], ["a", "b"], private=True)
  new, _ = step(state.replace(batch_stats=stats), batches)
  assert sorted(new.batch_stats) == ["a", "b"]
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(new.batch_stats["a"]),
                                                      jax.tree.leaves(new.batch_stats["b"])))
  with pytest.raises(ConfigError, match="may not be named 'shared'"):
    multitask.initial_batch_stats(v["batch_stats"], ["shared", "b"], private=True)


MULTITASK_RUN = r"""
import sys, json
import jax, numpy as np
from experiments.configs import tiny
from ftjax.core import paths
from ftjax.methods import patches
from ftjax.methods import multitask
c = tiny.get_config()
c.baseline = "patch"
c.num_steps, c.eval_every_steps = 4, 4
c.tasks = {"px32": {"image_size": 32}, "px40": {"image_size": 40}}
c.share_head = True
results = multitask.train_multitask(c, sys.argv[1])
print(json.dumps({k: v for k, v in results.items() if k != "table"}))
"""


@pytest.mark.slow
def test_multitask_run_saves_patches_that_rebuild_each_task(tmp_path, fashion_mnist_ready):
  from conftest import run_python
  out = json.loads(run_python(["-c", MULTITASK_RUN, str(tmp_path)]).stdout.strip().splitlines()[-1])
  assert set(out["tasks"]) == {"px32", "px40"}
  shared = patches.load_patch(tmp_path / "shared.npz").params
  pa, pb = (patches.load_patch(tmp_path / f"patch_{t}.npz") for t in ("px32", "px40"))
  assert set(pa.params) == set(pb.params) and not set(pa.params) & set(shared)
  assert all("bn" in p.rsplit("/", 2)[-2] for p in pa.params)  # BatchNorm scale/bias only
  # The two tasks trained their own patches: different values at the same paths.
  assert any(not np.array_equal(pa.params[p], pb.params[p]) for p in pa.params)
  n_private = sum(v.size for v in pa.params.values())
  assert out["tasks"]["px32"]["patch_parameters"] == n_private
  assert out["total_parameters"] == out["shared_parameters"] + 2 * n_private
  assert out["shared_parameters"] == sum(v.size for v in shared.values())
  table = (tmp_path / "results_table.md").read_text()
  assert "| px40 | 40 |" in table


def test_model_patches_configs_and_lr_sweep_plot(tmp_path):
  from experiments import plot_lr_sweep
  from experiments.configs import model_patches
  t1 = model_patches.get_config("table1")
  assert sorted(t1.compare) == sorted(["last_layer", "last_layer_bn_stats", "sb_last_layer",
                                       "sb_random_last_layer", "dw_last_layer", "all"])
  assert t1.compare.sb_random_last_layer.patch.train_head is False
  f2 = model_patches.get_config("fig2")
  lrs = sorted({v.optimizer.lr for v in f2.compare.values()})
  np.testing.assert_allclose(lrs, 0.0045 * 3.0 ** np.arange(5))
  t4 = model_patches.get_config("table4")
  assert [t4.tasks[k].image_size for k in sorted(t4.tasks, key=lambda k: int(k[2:]))] == [96, 128, 160, 192, 224]
  with pytest.raises(ValueError, match="unknown model_patches config 'x'"):
    model_patches.get_config("x")
  rng = np.random.default_rng(0)
  results = {name: [{"test_top1": float(a)} for a in rng.uniform(0.5, 0.9, 2)] for name in f2.compare}
  pts = plot_lr_sweep.sweep_points(results)
  assert [lr for lr, _, _ in pts["sb_last_layer"]] == pytest.approx(lrs)
  row = [r["test_top1"] for r in results["sb_last_layer_lr0p0405"]]
  assert pts["sb_last_layer"][2][1:] == pytest.approx((100 * np.mean(row), 100 * np.std(row, ddof=1)))
  assert plot_lr_sweep.plot_lr_sweep(results, str(tmp_path / "f.png")).endswith("f.png")
  results["all_lr0p3645"] = [{"test_top1": float("nan"), "diverged": "non-finite loss"}]   # recorded divergence
  assert np.isnan(plot_lr_sweep.sweep_points(results)["all"][-1][1])
  assert plot_lr_sweep.plot_lr_sweep(results, str(tmp_path / "g.png")).endswith("g.png")
  t4 = model_patches.get_config("table4_independent,32,48")
  assert {k: (v.baseline, v.dataset.image_size) for k, v in t4.compare.items()} == {
      "px32": ("finetune", 32), "px48": ("finetune", 48)}
  assert sorted(model_patches.get_config("table4,32,48").tasks) == ["px32", "px48"]
  with pytest.raises(ValueError, match="must be integers"):
    model_patches.get_config("table4,big")


def test_flatten_and_unflatten_paths_round_trip():
  tree = {"backbone": {"block0": {"conv": {"kernel": np.ones((1, 2))}, "bn": {"scale": np.zeros(3)}}},
          "head": {"bias": np.arange(4.0)}}
  flat = paths.flatten_paths(tree)
  assert sorted(flat) == ["backbone/block0/bn/scale", "backbone/block0/conv/kernel", "head/bias"]
  back = paths.unflatten_paths(flat)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)

"""Co-Tuning loss (Eq. 2, second term) and its loss component in the train step."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from ftjax import models
from ftjax.losses import co_tuning_loss
from ftjax.methods import RunContext, build_methods
from ftjax.methods.co_tuning import method as ct_lib
from ftjax.methods.co_tuning import CoTuning
from ftjax.methods.finetune import CrossEntropy
from ftjax.train import setup
from ftjax.train import sharding as shd
from ftjax.train import step as step_lib
from ftjax.train.config import default_config
from ftjax.train.setup import resolve_rules

NUM_TARGET, NUM_SOURCE = 5, 7


def _random_problem(batch=6, classes=9, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, classes)).astype(np.float32) * 3
  targets = rng.dirichlet(np.ones(classes) * 0.5, size=batch).astype(np.float32)
  return logits, targets


def _numpy_soft_ce(logits, targets):
  log_p = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=-1)
  return -np.sum(np.asarray(targets, np.float64) * log_p, axis=-1)


def _relationship(seed=1):
  return np.random.default_rng(seed).dirichlet(np.ones(NUM_SOURCE), size=NUM_TARGET).astype(np.float32)


# ----------------------------------------------------------------------------- loss


def test_loss_matches_numpy_for_every_reduction():
  logits, targets = _random_problem()
  per_example = _numpy_soft_ce(logits, targets)
  kw = dict(source_logits=jnp.asarray(logits), relationship_targets=jnp.asarray(targets))
  np.testing.assert_allclose(co_tuning_loss(**kw), per_example.mean(), rtol=1e-6)
  np.testing.assert_allclose(co_tuning_loss(**kw, reduction="sum"), per_example.sum(), rtol=1e-6)
  np.testing.assert_allclose(co_tuning_loss(**kw, reduction="none"), per_example, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown reduction 'max'"):
    co_tuning_loss(**kw, reduction="max")


def test_loss_gradient_is_softmax_minus_target():
  logits, targets = _random_problem(seed=2)
  grad = jax.grad(lambda z: co_tuning_loss(source_logits=z, relationship_targets=targets))(logits)
  expected = (scipy.special.softmax(logits.astype(np.float64), -1) - targets) / len(logits)
  np.testing.assert_allclose(grad, expected, atol=1e-7)
  # Central finite differences on one coordinate, as a second, formula-free check.
  eps = 1e-2
  bump = np.zeros_like(logits)
  bump[1, 3] = eps
  diff = (_numpy_soft_ce(logits + bump, targets).mean() - _numpy_soft_ce(logits - bump, targets).mean())
  assert grad[1, 3] == pytest.approx(diff / (2 * eps), rel=1e-3)


def test_loss_jit_vmap_and_shape_errors():
  logits, targets = _random_problem(seed=3)
  fn = jax.jit(functools.partial(co_tuning_loss, reduction="none"))
  np.testing.assert_allclose(fn(source_logits=logits, relationship_targets=targets),
                             _numpy_soft_ce(logits, targets), rtol=1e-6)
  per_row = jax.vmap(lambda z, q: co_tuning_loss(source_logits=z[None], relationship_targets=q[None]))
  np.testing.assert_allclose(per_row(logits, targets), _numpy_soft_ce(logits, targets), rtol=1e-6)
  with pytest.raises(ValueError, match=r"relationship_targets shape \(6, 8\)"):
    co_tuning_loss(source_logits=logits, relationship_targets=targets[:, :8])
  with pytest.raises(ValueError, match="source_logits must be"):
    co_tuning_loss(source_logits=logits[0], relationship_targets=targets[0])


# ----------------------------------------------------------------------------- component


@pytest.fixture(scope="module")
def tiny():
  model = models.create_model("efficientnet_tiny", num_classes=NUM_TARGET, keep_source_head=True,
                              num_source_classes=NUM_SOURCE)
  init = jax.jit(functools.partial(model.init, train=False, outputs=model.all_outputs))
  variables = jax.tree.map(np.asarray, dict(init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))))
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, NUM_TARGET, 8).astype(np.int32)}
  return model, variables, batch


def test_component_from_config_and_its_term(tiny):
  _, variables, batch = tiny
  rel = _relationship()
  ce, co = build_methods({"ce": {"weight": 1.0},
                             "co_tuning": {"weight": 2.3, "relationship": rel}})
  assert isinstance(co, CoTuning) and co.weight == 2.3 and co.outputs == ("source_logits",)
  state = co.init_state(variables=variables, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(state["relationship"], rel)
  logits = np.random.default_rng(4).normal(size=(8, NUM_SOURCE)).astype(np.float32)
  term = co(outputs={"source_logits": logits}, batch=batch, state=state, params=None, rng=None)
  expected = _numpy_soft_ce(logits, rel[batch["label"]]).mean()
  assert float(term.loss) == pytest.approx(expected, rel=1e-6)
  assert term.state is state


def test_component_rejects_bad_relationships(tiny, tmp_path):
  _, variables, _ = tiny
  with pytest.raises(ValueError, match="call its prepare"):
    CoTuning().init_state(variables=variables, rng=None)
  with pytest.raises(ValueError, match=r"shape \(5, 6\) but the model needs \(5, 7\)"):
    CoTuning(relationship=_relationship()[:, :6] / _relationship()[:, :6].sum(1, keepdims=True)
             ).init_state(variables=variables, rng=None)
  with pytest.raises(ValueError, match="row 0 sums to"):
    CoTuning(relationship=np.full((NUM_TARGET, NUM_SOURCE), 0.5))
  with pytest.raises(ValueError, match="approach must be one of"):
    CoTuning(approach="sideways")
  with pytest.raises(ValueError, match="does not exist"):
    CoTuning(relationship_path=str(tmp_path / "missing.npy"))
  no_source = {"params": {k: v for k, v in variables["params"].items() if k != "source_head"}}
  with pytest.raises(ValueError, match="keep_source_head=True"):
    CoTuning(relationship=_relationship()).init_state(variables=no_source, rng=None)


class _FakeDataset:
  num_classes = NUM_TARGET


def test_prepare_loads_a_path_or_computes(tiny, tmp_path, monkeypatch):
  model, variables, _ = tiny
  config = default_config()
  config.seed, config.eval_batch_size, config.progress = 3, 16, False
  rel = _relationship(seed=5)
  path = tmp_path / "rel.npy"
  np.save(path, rel)
  context = RunContext(dataset=_FakeDataset(), model=model, variables=variables, seed=3, eval_batch_size=16,
                       pretrained=config.pretrained)
  prepared = CoTuning(relationship_path=str(path)).prepare(context)
  np.testing.assert_array_equal(prepared.relationship, rel)

  calls = []

  def fake_compute(**kwargs):
    calls.append(kwargs)
    return rel, {"source_calibration": "value", "source_temperature": 2.0}
  monkeypatch.setattr(ct_lib, "compute_relationship", fake_compute)
  prepared = CoTuning(approach="direct", calibrate_g=False, source_temperature=2.0).prepare(context)
  np.testing.assert_array_equal(prepared.relationship, rel)
  (kw,) = calls
  assert kw["pretrained_name"] == config.pretrained and kw["seed"] == 3 and kw["batch_size"] == 16
  assert kw["approach"] == "direct" and kw["calibrate_g"] is False and kw["source_temperature"] == 2.0
  assert kw["source_calibration_data"] is None and kw["return_info"] is True
  assert kw["model"] is model and kw["variables"] is variables and kw["cache_dir"] is None
  assert prepared.finalize(context) == {"co_tuning_calibration": {"source_calibration": "value",
                                                                  "source_temperature": 2.0}}
  calls.clear()
  CoTuning(source_temperature=0.0).prepare(context)   # 0 = no given temperature
  assert calls[0]["source_temperature"] is None and calls[0]["calibrate_g"] is True
  with pytest.raises(ValueError, match=r"shape \(5, 7\) but the model needs \(4, 7\)"):
    bad = type("D", (), {"num_classes": 4})()
    CoTuning(relationship_path=str(path)).prepare(context._replace(dataset=bad))


def test_source_calibration_split_is_loaded_and_handed_to_the_relationship(tiny, monkeypatch):
  """A TFDS name + split of the source dataset: load_data reads that split as 'test', prepare
  calibrates on it (Alg. 2 on the source model), separately from g's temperature."""
  model, variables, _ = tiny
  loads, calls = [], []
  source_data = object()

  def load_dataset(name, **options):
    loads.append((name, options))
    return source_data

  def fake_compute(**kwargs):
    calls.append(kwargs)
    return _relationship(seed=5), {"source_calibration": "split"}
  monkeypatch.setattr(ct_lib, "compute_relationship", fake_compute)
  ct = CoTuning(source_calibration_dataset="imagenet2012", source_calibration_split="validation",
                calibrate_g=False)
  with pytest.raises(ValueError, match="is not loaded: call its load_data"):
    ct.prepare(RunContext(dataset=_FakeDataset(), model=model, variables=variables))
  loaded = ct.load_data(load_dataset=load_dataset, seed=0)
  assert loads == [("imagenet2012", {"test_split": "validation"})]
  assert loaded.source_calibration_data is source_data
  loaded.prepare(RunContext(dataset=_FakeDataset(), model=model, variables=variables))
  (kw,) = calls
  assert kw["source_calibration_data"] is source_data and kw["source_calibration_split"] == "test"
  assert kw["source_temperature"] is None and kw["calibrate_g"] is False
  # Nothing to load without a source dataset, or when the relationship is given.
  assert CoTuning().load_data(load_dataset=load_dataset, seed=0).source_calibration_data is None
  assert len(loads) == 1
  with pytest.raises(ValueError, match="either source_temperature .* or source_calibration_dataset"):
    CoTuning(source_temperature=1.1, source_calibration_dataset="imagenet2012")
  with pytest.raises(ValueError, match="held-out split"):
    CoTuning(source_calibration_dataset="imagenet2012", source_calibration_split="train")
  with pytest.raises(ValueError, match="bad options .*calibrate"):
    build_methods({"co_tuning": {"calibrate": True}})   # the old option that set both at once


def test_experiment_config_rows_are_named_by_the_calibrations_that_ran():
  """No row claims a source calibration that cannot run offline; the x0.884 rows say whose value it is."""
  from experiments.configs import co_tuning as ct_config
  from experiments.configs import regularizers as reg_config
  from ftjax.methods.co_tuning import OFFICIAL_RESNET50_TEMPERATURE
  from ftjax.train import report
  assert OFFICIAL_RESNET50_TEMPERATURE == pytest.approx(1 / 0.8840456604957581, rel=1e-12)
  variants = report.variant_configs(ct_config.get_config("5"))
  rows = {}
  for name, cfg in variants.items():
    methods = {m.name: m for m in build_methods(cfg.losses)}
    co = methods.get("co_tuning")
    rows[name] = None if co is None else (co.approach, co.source_temperature or None,
                                          co.source_calibration_dataset, co.calibrate_g)
  t = OFFICIAL_RESNET50_TEMPERATURE
  assert rows == {
      "finetune": None,
      "co_tuning_src_uncal_g_cal": ("reverse", None, "", True),
      "co_tuning_src_r50_x0884_g_cal": ("reverse", t, "", True),
      "co_tuning_src_r50_x0884_g_uncal": ("reverse", t, "", False),
      "co_tuning_no_calibration": ("reverse", None, "", False),   # neither calibration
      "co_tuning_direct_src_uncal": ("direct", None, "", True),
  }
  assert not any("calibrated" in name for name in rows)
  assert all(("r50_x0884" in name) == (row is not None and row[1] == t) for name, row in rows.items())
  composed = report.variant_configs(reg_config.get_config("5"))["co_tuning_bss_l2sp"]
  (co,) = [m for m in build_methods(composed.losses) if m.name == "co_tuning"]
  assert (co.source_temperature or None, co.source_calibration_dataset, co.calibrate_g) == (None, "", True)


def test_train_step_with_ce_plus_co_tuning(tiny):
  model, variables, batch = tiny
  rel = _relationship(seed=6)
  components = [CrossEntropy(), CoTuning(weight=2.3, relationship=rel)]
  config = default_config()
  config.model = "efficientnet_tiny"
  rules, groups, _ = resolve_rules(config)
  training = setup.init_training(model=model, variables=variables, methods=components, rules=rules,
                                 groups=groups, num_classes=NUM_TARGET, schedule=lambda s: 0.05, momentum=0.9,
                                 method_rng=jax.random.PRNGKey(0), state_rng=jax.random.PRNGKey(1))
  assert step_lib.required_outputs(components) == ("logits", "source_logits")
  new_state, metrics = training.train_step(training.state, shd.global_batch(batch, training.mesh),
                                           training.source)

  # Reference: the same training-mode forward, losses re-derived in NumPy.
  out, _ = model.apply(variables, batch["image"], train=True, outputs=("logits", "source_logits"),
                       mutable=["batch_stats"])
  ce = -scipy.special.log_softmax(np.asarray(out["logits"], np.float64), -1)[
      np.arange(8), batch["label"]].mean()
  co = _numpy_soft_ce(out["source_logits"], rel[batch["label"]]).mean()
  assert float(metrics["loss/ce"]) == pytest.approx(ce, rel=1e-4)
  assert float(metrics["loss/co_tuning"]) == pytest.approx(co, rel=1e-4)
  assert float(metrics["loss"]) == pytest.approx(ce + 2.3 * co, rel=1e-4)
  new_state = jax.device_get(new_state)
  # The source head trains (the co_tuning term reaches it); the relationship is a constant.
  assert not np.allclose(new_state.params["source_head"]["kernel"],
                         variables["params"]["source_head"]["kernel"])
  np.testing.assert_array_equal(new_state.method_state["co_tuning"]["relationship"], rel)


def test_write_artifacts_saves_the_relationship_and_fig1(tmp_path):
  from ftjax.models import registry
  rel = np.random.default_rng(7).dirichlet(np.ones(1000) * 0.05, size=3).astype(np.float32)
  config = default_config()  # pretrained efficientnet_lite0/imagenet: ImageNet names
  dataset = type("D", (), {"class_names": ["tee", "trouser", "bag"], "num_classes": 3})()
  paths = CoTuning(relationship=rel).write_artifacts(
      RunContext(workdir=str(tmp_path), dataset=dataset, pretrained=config.pretrained))
  assert [p.rsplit("/", 1)[-1] for p in paths] == ["relationship.npy", "relationship.png"]
  np.testing.assert_array_equal(np.load(tmp_path / "relationship.npy"), rel)
  assert (tmp_path / "relationship.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(registry.load_class_names(registry.source_class_names_file(config.pretrained))) == 1000
  with pytest.raises(ValueError, match="unknown pretrained model 'nope'"):
    registry.source_class_names_file("nope")
  config.pretrained = ""  # no names known: indices stand in, still a figure
  assert CoTuning(relationship=rel).write_artifacts(
      RunContext(workdir=str(tmp_path / "b"), dataset=dataset, pretrained=""))[1].endswith(".png")


CO_TUNING_RUN = r"""
import sys
from experiments.configs import tiny
from ftjax.train import report
c = tiny.get_config()
c.num_steps, c.eval_every_steps = 4, 4
c.losses = {"ce": {"weight": 1.0},
            "co_tuning": {"weight": 2.3, "approach": "direct", "cache_dir": sys.argv[2]}}
report.run_all(c, sys.argv[1])
"""


@pytest.mark.slow
def test_run_writes_results_table_and_relationship_figure(tmp_path, fashion_mnist_ready):
  """ce + co_tuning through the experiment runner on real data; the workdir holds Fig. 1."""
  from conftest import run_python
  workdir = tmp_path / "run"
  run_python(["-c", CO_TUNING_RUN, str(workdir), str(tmp_path / "cache")])
  run_dir = workdir / "seed0"
  rel = np.load(run_dir / "relationship.npy")
  assert rel.shape[0] == 10 and np.allclose(rel.sum(1), 1, atol=1e-4)
  assert (run_dir / "relationship.png").exists()
  assert "[seed0/relationship.png](seed0/relationship.png)" in (workdir / "results_table.md").read_text()
  assert json.loads((run_dir / "results.json").read_text())["steps"] == 4

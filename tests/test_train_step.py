"""The jitted train step with the baselines' parameter rules, on a tiny EfficientNet."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import models
from ftjax.core import paths
from ftjax.methods.finetune import CrossEntropy
from ftjax.train import sharding as shd
from ftjax.train.config import default_config
from ftjax.core.errors import ConfigError
from ftjax.train import setup
from ftjax.train.setup import resolve_rules

NUM_CLASSES = 5


def _config(baseline, **kw):
  c = default_config()
  c.model = "efficientnet_tiny"
  c.baseline = baseline
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def tiny():
  model = models.create_model("efficientnet_tiny", num_classes=NUM_CLASSES)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False,
                         outputs=model.all_outputs)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, NUM_CLASSES, 8).astype(np.int32)}
  return model, jax.tree.map(np.asarray, dict(variables)), batch


def _train(model, variables, batch, config, steps=3):
  rules, groups, bn_mode = resolve_rules(config)
  training = setup.init_training(model=model, variables=variables, methods=[CrossEntropy()], rules=rules,
                                 groups=groups, bn_mode=bn_mode, num_classes=NUM_CLASSES,
                                 schedule=lambda s: 0.05, momentum=0.9, weight_decay=1e-2,
                                 method_rng=jax.random.PRNGKey(0), state_rng=jax.random.PRNGKey(1))
  state, labels = training.state, training.labels
  losses = []
  for _ in range(steps):
    state, metrics = training.train_step(state, shd.global_batch(batch, training.mesh), training.source)
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), labels, losses


def _flat(tree):
  return dict(zip(paths.param_paths(tree), jax.tree.leaves(tree)))


def test_first_loss_is_cross_entropy_of_the_forward(tiny):
  model, variables, batch = tiny
  _, _, losses = _train(model, variables, batch, _config("finetune"), steps=1)
  logits = np.asarray(model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])[0]["logits"],
                      np.float64)
  logp = logits - logits.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  want = -logp[np.arange(len(batch["label"])), batch["label"]].mean()
  assert losses[0] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("baseline, k", [("linear_probe", 0), ("last_k", 2), ("finetune", 0)])
def test_frozen_parameters_are_bitwise_unchanged(tiny, baseline, k):
  model, variables, batch = tiny
  config = _config(baseline, last_k=max(k, 1))
  state, labels, losses = _train(model, variables, batch, config)
  assert np.all(np.isfinite(losses))
  before, after, label = _flat(variables["params"]), _flat(state.params), _flat(labels)
  trained_blocks = models.block_prefixes("efficientnet_tiny")[-k:] if k else []
  for path in before:
    in_last_k = any(path.startswith(p + "/") for prefix in trained_blocks for p in prefix.split("|"))
    should_train = (baseline == "finetune" or path.startswith("head/") or in_last_k)
    changed = not np.array_equal(before[path], after[path])
    assert changed == should_train, (path, label[path])
  # BatchNorm statistics: kept everywhere by the linear probe (eval mode), re-estimated
  # everywhere otherwise (train mode), so training and evaluation normalise alike.
  stats_before, stats_after = _flat(variables["batch_stats"]), _flat(state.batch_stats)
  for path in stats_before:
    unchanged = np.array_equal(stats_before[path], stats_after[path])
    assert unchanged == (baseline == "linear_probe"), path


def test_last_k_out_of_range_is_an_error():
  with pytest.raises(ConfigError, match="last_k=9 is out of range"):
    resolve_rules(_config("last_k", last_k=9))


def test_explicit_rules_and_groups_override_the_baseline(tiny):
  _, variables, _ = tiny
  config = _config("finetune")
  config.param_rules = (("head/.*", "head"), (r".*_bn/(scale|bias)", "bn"), (r"(?!head/|.*_bn/).*", "frozen"))
  config.groups = ml_collections.ConfigDict({"bn": {"lr_mult": 2.0}, "frozen": {"frozen": True}})
  rules, groups, _ = resolve_rules(config)
  labels = _flat(paths.path_labels(variables["params"], rules))
  assert labels["backbone/stem_bn/scale"] == "bn"
  assert labels["backbone/stem_conv/kernel"] == "frozen"
  assert groups["bn"].lr_mult == 2.0 and groups["frozen"].frozen

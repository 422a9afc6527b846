"""The jitted train step with the baselines' parameter rules, on a tiny EfficientNet."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import models, patches
from ftjax.methods.finetune import CrossEntropy
from ftjax.train import optim
from ftjax.train import sharding as shd
from ftjax.train import step as step_lib
from ftjax.train.config import default_config
from ftjax.train.loop import ConfigError, resolve_rules
from ftjax.train.state import TrainState

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
  labels = patches.path_labels(variables["params"], rules)
  tx = optim.make_optimizer(labels=labels, groups=groups, schedule=lambda s: 0.05,
                            momentum=0.9, weight_decay=1e-2)
  frozen = {n for n, g in groups.items() if g.frozen}
  frozen_mask = jax.tree.map(lambda label: label in frozen, labels) if frozen else None
  mesh = shd.make_data_mesh()
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                     method_state={"ce": ()}, rng=jax.random.PRNGKey(1))
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(model=model, optimizer=tx, components=[CrossEntropy()],
                               train_bn=bn_mode == "train", frozen_mask=frozen_mask),
      mesh=mesh, state=state)
  losses = []
  for _ in range(steps):
    state, metrics = fn(state, shd.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), labels, losses


def _flat(tree):
  return dict(zip(patches.param_paths(tree), jax.tree.leaves(tree)))


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
  labels = _flat(patches.path_labels(variables["params"], rules))
  assert labels["backbone/stem_bn/scale"] == "bn"
  assert labels["backbone/stem_conv/kernel"] == "frozen"
  assert groups["bn"].lr_mult == 2.0 and groups["frozen"].frozen

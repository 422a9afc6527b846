"""SpotTune: straight-through Gumbel-softmax, Global-k losses (Eq. 5, 6) against NumPy,
forced routings against the plain model, per-image mixing, training keeps the frozen
copies bitwise, the component, pruning and the figures."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.core import paths
from ftjax.losses.spottune import block_usage, global_k_loss, gumbel_softmax, policy_entropy_loss
from ftjax.methods import build_methods
from ftjax.methods.finetune import CrossEntropy
from ftjax.methods.spottune import SpotTune
from ftjax.models import create_model
from ftjax.methods import spottune as st

from conftest import train_spottune_steps

SIZE = 32


# ----------------------------------------------------------------------------- NumPy references


def np_global_k(decisions, k):
  """Eq. 5 from the paper: v_l = fraction of images using block l; (sum_l v_l - k)^2."""
  decisions = np.asarray(decisions, np.float64)
  v = [decisions[:, l].sum() / decisions.shape[0] for l in range(decisions.shape[1])]
  return (sum(v) - k) ** 2


def np_entropy(decisions):
  """Eq. 6: sum_l -v_l log v_l with 0 log 0 = 0."""
  decisions = np.asarray(decisions, np.float64)
  total = 0.0
  for l in range(decisions.shape[1]):
    v = decisions[:, l].mean()
    if v > 0:
      total += -v * np.log(v)
  return total


def np_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- pure functions


def test_hard_gumbel_sample_is_exactly_one_hot():
  key = jax.random.key(0)
  logits = jax.random.normal(jax.random.key(1), (6, 5, 2)) * 3.0
  for shape_logits in (logits, jax.random.normal(jax.random.key(2), (4, 7))):
    hard = np.asarray(gumbel_softmax(key, shape_logits, temperature=5.0, hard=True))
    soft = np.asarray(gumbel_softmax(key, shape_logits, temperature=5.0, hard=False))
    assert set(np.unique(hard).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(hard.sum(-1), 1.0)
    # The one-hot position is the arg-max of logits + G (Eq. 3), i.e. of the soft sample.
    noise = np.asarray(jax.random.gumbel(key, shape_logits.shape))
    np.testing.assert_array_equal(hard.argmax(-1), (np.asarray(shape_logits) + noise).argmax(-1))
    np.testing.assert_array_equal(hard.argmax(-1), soft.argmax(-1))
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)


def test_straight_through_gradient_equals_softmax_relaxation_gradient():
  key = jax.random.key(3)
  tau = 2.0
  logits = jax.random.normal(jax.random.key(4), (3, 4, 2))
  weights = jax.random.normal(jax.random.key(5), (3, 4, 2))
  f = lambda l, hard: jnp.sum(weights * gumbel_softmax(key, l, temperature=tau, hard=hard))
  grad_hard = np.asarray(jax.grad(functools.partial(f, hard=True))(logits))
  grad_soft = np.asarray(jax.grad(functools.partial(f, hard=False))(logits))
  np.testing.assert_allclose(grad_hard, grad_soft, rtol=1e-6, atol=1e-7)
  # Independent: d/dl sum_i w_i y_i with y = softmax((l + G) / tau) is y (w - <w, y>) / tau.
  noise = np.asarray(jax.random.gumbel(key, logits.shape), np.float64)
  y = np_softmax((np.asarray(logits, np.float64) + noise) / tau)
  w = np.asarray(weights, np.float64)
  expected = y * (w - (w * y).sum(-1, keepdims=True)) / tau
  np.testing.assert_allclose(grad_hard, expected, rtol=1e-4, atol=1e-6)
  assert np.abs(grad_hard).max() > 1e-3  # a real gradient, not zeros


def test_gumbel_softmax_rejects_bad_input():
  with pytest.raises(ValueError, match="temperature"):
    gumbel_softmax(jax.random.key(0), jnp.zeros((2, 2)), temperature=0.0)
  with pytest.raises(ValueError, match="categories"):
    gumbel_softmax(jax.random.key(0), jnp.zeros((2, 1)), temperature=1.0)


def test_global_k_and_entropy_losses_match_numpy():
  rng = np.random.default_rng(0)
  decisions = (rng.random((9, 6)) < 0.4).astype(np.float32)
  decisions[:, 2] = 0.0  # an unused block: 0 log 0
  decisions[:, 4] = 1.0
  for k in (0, 1.5, 3, 6):
    np.testing.assert_allclose(float(global_k_loss(decisions=jnp.asarray(decisions), k=k)),
                               np_global_k(decisions, k), rtol=1e-5)
  np.testing.assert_allclose(float(policy_entropy_loss(decisions=jnp.asarray(decisions))),
                             np_entropy(decisions), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(block_usage(decisions=jnp.asarray(decisions))),
                             decisions.mean(0), rtol=1e-6)
  # Gradients exist and are finite where v_l is 0 (jit/grad compatible).
  g = jax.jit(jax.grad(lambda d: global_k_loss(decisions=d, k=2) + policy_entropy_loss(decisions=d)))(
      jnp.asarray(decisions))
  assert np.all(np.isfinite(np.asarray(g)))
  with pytest.raises(ValueError, match="k must be"):
    global_k_loss(decisions=jnp.asarray(decisions), k=7)
  with pytest.raises(ValueError, match="batch, num_blocks"):
    policy_entropy_loss(decisions=jnp.zeros((3,)))


# ----------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=None)
def _models(base: str):
  """(SpotTune model, plain model, SpotTune variables, plain variables), trainable copies perturbed."""
  model = st.create_spottune_model(base, num_classes=5, policy_depth=1, policy_width=8, policy_image_size=SIZE)
  plain = create_model(base, num_classes=5)
  init = jax.jit(lambda key: plain.init(key, jnp.zeros((1, SIZE, SIZE, 3)), train=False,
                                        outputs=plain.all_outputs))
  plain_vars = jax.tree.map(np.asarray, dict(init(jax.random.key(0, impl="rbg"))))
  variables = st.spottune_variables_from_pretrained(model, plain_vars, rng=jax.random.key(1))
  return model, plain, variables, plain_vars


@functools.lru_cache(maxsize=None)
def _plain_apply(base: str):
  """Jitted plain-model logits (one compilation per base model for the whole module)."""
  plain = _models(base)[1]
  return jax.jit(lambda v, x: plain.apply(v, x, train=False)["logits"])


@functools.lru_cache(maxsize=None)
def _spot_apply(base: str):
  """Jitted SpotTune forward ``(variables, images, key, routing)``: logits, policy, policy_logits."""
  model = _models(base)[0]
  return jax.jit(lambda v, x, key, routing: model.apply(
      v, x, train=False, outputs=("logits", "policy", "policy_logits"), routing=routing,
      rngs={"gumbel": key}), static_argnums=3)


def _images(n=4, seed=7):
  return jax.random.uniform(jax.random.key(seed), (n, SIZE, SIZE, 3), maxval=255.0)


def _perturbed(variables, scale=0.3, seed=11):
  """A copy whose trainable copies of the routed blocks differ from the frozen ones.

  (The stem and unrouted blocks exist once; they are left as they are.)
  """
  backbone = dict(variables["params"]["backbone"])
  for i, name in enumerate(sorted(variables["params"]["frozen_backbone"])):
    leaves, treedef = jax.tree.flatten(backbone[name])
    keys = jax.random.split(jax.random.key(seed + i), len(leaves))
    backbone[name] = jax.tree.unflatten(
        treedef, [np.asarray(x) + scale * np.asarray(jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])
  params = dict(variables["params"], backbone=backbone)
  return dict(variables, params=params)


def _plain_with(plain_vars, variables, mask, routed):
  """Plain variables whose block l is the trainable copy where mask[l] = 1, else the frozen copy."""
  out = {}
  for collection in ("params", "batch_stats"):
    backbone = dict(variables[collection]["backbone"])
    for name, m in zip(routed, mask):
      if not m:
        backbone[name] = variables[collection]["frozen_backbone"][name]
    out[collection] = dict(plain_vars[collection], backbone=backbone)
  out["params"]["head"] = variables["params"]["head"]
  return out


@pytest.mark.parametrize("base", ["resnet_tiny", "efficientnet_tiny"])
def test_layout_and_copies(base):
  model, _, variables, plain_vars = _models(base)
  params = variables["params"]
  assert set(params) == {"backbone", "frozen_backbone", "policy", "head"}
  assert sorted(params["frozen_backbone"]) == sorted(model.routed_blocks)
  # Trainable backbone = the plain backbone (same names and values), frozen copies equal too.
  assert paths.param_paths(params["backbone"]) == paths.param_paths(plain_vars["params"]["backbone"])
  for collection in ("params", "batch_stats"):
    for name in model.routed_blocks:
      jax.tree.map(np.testing.assert_array_equal, variables[collection]["frozen_backbone"][name],
                   plain_vars[collection]["backbone"][name])
  # Copies, not aliases.
  leaf = jax.tree.leaves(params["frozen_backbone"])[0]
  assert leaf is not jax.tree.leaves(params["backbone"][model.routed_blocks[0]])[0]
  # Every block is routed, residual or not (Lite: the stride-2 and channel-changing blocks too).
  assert model.routed_blocks == tuple(st.block_names(base))
  if base == "efficientnet_tiny":
    assert model.routed_blocks == ("blocks_0", "blocks_1", "blocks_2", "blocks_3")


@pytest.mark.parametrize("base", ["resnet_tiny", "efficientnet_tiny"])
def test_forced_routings_equal_the_plain_model(base):
  model, _, variables, plain_vars = _models(base)
  variables = _perturbed(variables)
  images = _images()
  routed = model.routed_blocks
  plain_apply = _plain_apply(base)
  spot_apply = lambda v, x, routing: _spot_apply(base)(v, x, jax.random.key(0), routing)
  # All frozen: the pretrained model exactly, whatever the trainable copies hold.
  out = spot_apply(variables, images, "all_frozen")
  reference = plain_apply(plain_vars, images)
  np.testing.assert_array_equal(np.asarray(out["logits"]), np.asarray(reference))
  np.testing.assert_array_equal(np.asarray(out["policy"]), 0.0)
  # All fine-tuned: the plain model with the trainable copies' parameters, exactly.
  out = spot_apply(variables, images, "all_finetuned")
  reference = plain_apply(_plain_with(plain_vars, variables, (1,) * len(routed), routed), images)
  np.testing.assert_array_equal(np.asarray(out["logits"]), np.asarray(reference))
  assert not np.allclose(np.asarray(out["logits"]), np.asarray(plain_apply(plain_vars, images)))
  # A fixed mixed mask: block by block.
  mask = (1, 0) if len(routed) == 2 else tuple(i % 2 for i in range(len(routed)))
  out = spot_apply(variables, images, mask)
  reference = plain_apply(_plain_with(plain_vars, variables, mask, routed), images)
  np.testing.assert_array_equal(np.asarray(out["logits"]), np.asarray(reference))


def test_policy_routes_each_image_through_its_chosen_copies():
  model, _, variables, plain_vars = _models("resnet_tiny")
  variables = _perturbed(variables)
  images = _images(n=8, seed=3)
  routed = model.routed_blocks
  # Sampled decisions (gumbel rng) differ per image; each image's logits must equal the
  # plain model built from the copies its decisions pick.
  out = _spot_apply("resnet_tiny")(variables, images, jax.random.key(5), "sample")
  decisions = np.asarray(out["policy"])
  assert set(np.unique(decisions).tolist()) <= {0.0, 1.0}
  assert len({tuple(d) for d in decisions}) > 1  # the test covers different routes
  plain_apply = _plain_apply("resnet_tiny")
  for i in range(len(images)):
    mask = tuple(int(d) for d in decisions[i])
    expected = plain_apply(_plain_with(plain_vars, variables, mask, routed), images)[i]
    np.testing.assert_allclose(np.asarray(out["logits"][i]), np.asarray(expected), rtol=1e-5, atol=1e-5)
  # argmax routing = argmax of the policy logits; deterministic.
  out = _spot_apply("resnet_tiny")(variables, images, jax.random.key(5), "argmax")
  np.testing.assert_array_equal(np.asarray(out["policy"]), np.asarray(out["policy_logits"]).argmax(-1))
  # Random policy: always fine-tunes the last blocks it is told to.
  random_model = st.create_spottune_model("resnet_tiny", num_classes=5, policy_depth=1, policy_width=8,
                                          policy_image_size=SIZE, random_finetune_last=1)
  out = jax.jit(lambda v, x: random_model.apply(v, x, train=False, outputs=("policy",), routing="random",
                                                rngs={"gumbel": jax.random.key(0)}))(variables, _images(n=64))
  decisions = np.asarray(out["policy"])
  np.testing.assert_array_equal(decisions[:, -1], 1.0)
  assert 0.2 < decisions[:, 0].mean() < 0.8


def test_model_rejects_bad_routing():
  model, _, variables, _ = _models("resnet_tiny")
  with pytest.raises(ValueError, match="unknown SpotTune routing"):
    model.apply(variables, _images(), train=False, routing="sometimes")
  with pytest.raises(ValueError, match="routing mask"):
    model.apply(variables, _images(), train=False, routing=(1, 0, 1))
  with pytest.raises(ValueError, match="needs randomness"):
    model.apply(variables, _images(), train=False, routing="sample")
  with pytest.raises(ValueError, match="unknown SpotTune base model"):
    st.create_spottune_model("vgg16", num_classes=3)
  with pytest.raises(ValueError, match="routing 'fixed' needs"):
    st.create_spottune_model("resnet_tiny", num_classes=3, eval_routing="fixed")


# ----------------------------------------------------------------------------- training


def _official_trainable(variables):
  """Parameters the authors' code trains (gyhui14/spottune main.py), derived independently of the rules.

  "# freeze the original blocks": every nn.Conv2d outside ``parallel_blocks`` (our trainable
  copies, ``backbone/<routed block>``) gets ``requires_grad = False`` except the first one
  (the convolution that reads the image: 3 input channels); nothing else is frozen (BatchNorm
  γ, β, the head; the agent, our policy, is a network of its own with its own optimizer).
  """
  params = variables["params"]
  routed = set(params["frozen_backbone"]) & set(params["backbone"])
  flat = paths.flatten_paths(params)
  out = set()
  for path, leaf in flat.items():
    parts = path.split("/")
    in_copy = parts[0] == "backbone" and parts[1] in routed
    conv = path.endswith("/kernel") and np.ndim(leaf) == 4
    first_conv = conv and np.shape(leaf)[2] == 3 and parts[0] == "backbone"
    if parts[0] in ("policy", "head") or in_copy or not conv or first_conv:
      out.add(path)
  return out


def _rule_labels(variables, spottune):
  from ftjax.train.config import default_config
  from ftjax.train.setup import resolve_rules
  config = default_config()
  config.baseline = "finetune"
  rules, groups, bn_mode = resolve_rules(config, variables, methods=[CrossEntropy(), spottune])
  labels = paths.flatten_paths(paths.path_labels(variables["params"], rules))
  return labels, groups, bn_mode


@pytest.mark.parametrize("base", ["efficientnet_lite0", "efficientnet_tiny", "resnet_tiny"])
def test_every_block_routed_and_the_official_recipe_trains_outside_the_copies(base):
  spottune = SpotTune(policy_depth=1, policy_width=8, policy_image_size=SIZE)
  model = st.create_spottune_model(base, num_classes=5, **spottune.routing_options())
  shapes = jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, 64, 64, 3)), train=False,
                                                 outputs=model.all_outputs, routing="argmax"), jax.random.key(0))
  assert model.routed_blocks == tuple(st.block_names(base))
  assert sorted(shapes["params"]["frozen_backbone"]) == sorted(model.routed_blocks)
  if base == "efficientnet_lite0":
    assert len(model.routed_blocks) == 16   # the 9 residual MBConv blocks and the 7 others
  labels, groups, bn_mode = _rule_labels(shapes, spottune)
  assert bn_mode == "train"
  trainable = {p for p, g in labels.items() if not groups[g].frozen}
  assert trainable == _official_trainable(shapes)
  flat = paths.flatten_paths(shapes["params"])
  # What that means, named: the stem conv trains, the head conv (Lite) and every frozen
  # copy's convolution are frozen, every BatchNorm γ, β trains, the policy trains.
  assert labels["backbone/stem_conv/kernel"] == "backbone"
  if "head_conv" in shapes["params"]["backbone"]:
    assert labels["backbone/head_conv/kernel"] == "frozen"
  frozen_copies = [p for p in flat if p.startswith("frozen_backbone/")]
  assert {labels[p] for p in frozen_copies if p.endswith("/kernel")} == {"frozen"}
  assert {labels[p] for p in frozen_copies if p.endswith(("/scale", "/bias"))} == {"backbone"}
  assert {labels[p] for p in flat if p.startswith("policy/")} == {"policy"}
  # The trainable-parameter count the results report.
  sizes = paths.group_sizes(shapes["params"], paths.unflatten_paths(labels))
  assert sum(n for g, n in sizes.items() if not groups[g].frozen) == sum(
      int(np.prod(np.shape(flat[p]))) for p in trainable)
  if base == "efficientnet_lite0":
    assert sizes["frozen"] == 2_918_528 + 409_600          # the copies' convolutions + the head conv
    # Trainable copies 2,957,920 + stem 928 + head BN 2,560 + the frozen copies' BN 39,392.
    assert sizes["backbone"] == 3_000_800


def test_static_and_random_routings_freeze_what_training_never_runs():
  _, _, variables, _ = _models("efficientnet_tiny")
  routed = st.block_names("efficientnet_tiny")
  # Stochastic fine-tuning (fixed mask): no policy, the unused copy of each block frozen.
  mask = (1, 0, 0, 1)
  labels, groups, _ = _rule_labels(variables, SpotTune(train_routing="fixed", eval_routing="fixed",
                                                       routing_mask=mask))
  for name, m in zip(routed, mask):
    used, unused = ("backbone", "frozen_backbone") if m else ("frozen_backbone", "backbone")
    assert {labels[p] for p in labels if p.startswith(f"{unused}/{name}/")} == {"frozen"}, name
    assert any(not groups[labels[p]].frozen for p in labels if p.startswith(f"{used}/{name}/")), name
  assert {labels[p] for p in labels if p.startswith("policy/")} == {"frozen"}
  # Random policy: no policy; the always fine-tuned last blocks' frozen copies never run.
  labels, _, _ = _rule_labels(variables, SpotTune(train_routing="random", eval_routing="random",
                                                  random_finetune_last=1))
  assert {labels[p] for p in labels if p.startswith("policy/")} == {"frozen"}
  assert {labels[p] for p in labels if p.startswith(f"frozen_backbone/{routed[-1]}/")} == {"frozen"}
  assert "backbone" in {labels[p] for p in labels if p.startswith(f"frozen_backbone/{routed[0]}/")}
  # The paper's reading of a frozen block ("left unchanged"): BatchNorm frozen too.
  labels, _, _ = _rule_labels(variables, SpotTune(train_frozen_bn=False))
  assert {labels[p] for p in labels if p.startswith("frozen_backbone/")} == {"frozen"}


@pytest.mark.parametrize("base", ["efficientnet_tiny", "resnet_tiny"])
def test_training_follows_the_official_recipe(base):
  model, _, variables, _ = _models(base)
  spottune = SpotTune(lambda1=1.0, lambda2=0.5, k=1)
  components = [CrossEntropy(), spottune]
  params, batch_stats = variables["params"], variables["batch_stats"]
  state, metrics = train_spottune_steps(model=model, variables=variables, components=components,
                                        batch={"image": _images(n=8, seed=1), "label": jnp.arange(8) % 5},
                                        weight_decay=1e-4)
  before, after = paths.flatten_paths(params), paths.flatten_paths(state.params)
  trainable = _official_trainable(variables)
  for path in before:   # every other parameter bitwise as pretrained
    if path not in trainable:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert "backbone/stem_conv/kernel" in changed
  assert any(p.startswith("frozen_backbone/") and p.endswith("/scale") for p in changed)
  assert not any(p.startswith("frozen_backbone/") and p.endswith("/kernel") for p in changed)
  if base == "efficientnet_tiny":
    assert "backbone/head_conv/kernel" not in changed and "backbone/head_bn/scale" in changed
  for name in ("backbone", "policy", "head"):
    assert any(p.startswith(name + "/") for p in changed), name
  # BatchNorm in training mode in both copies (net.train()): the frozen copies' running
  # statistics are re-estimated as well.
  stats_before, stats_after = paths.flatten_paths(batch_stats), paths.flatten_paths(state.batch_stats)
  for prefix in ("frozen_backbone/", "backbone/"):
    assert any(not np.array_equal(stats_before[p], stats_after[p]) for p in stats_before if p.startswith(prefix))
  # The policy gets gradients through the straight-through decisions.
  assert any(p.startswith("policy/logits/") for p in changed)
  assert np.isfinite(float(metrics["loss"]))
  assert 0.0 <= float(metrics["spottune/finetuned_blocks"]) <= len(model.routed_blocks)
  assert "spottune/global_k" in metrics and "spottune/entropy" in metrics


def test_frozen_copies_can_stay_as_pretrained():
  # train_frozen_bn=False: the paper's "left unchanged" (BatchNorm on running statistics, frozen).
  base = "resnet_tiny"
  plain_vars = _models(base)[3]
  model = st.create_spottune_model(base, num_classes=5, policy_depth=1, policy_width=8, policy_image_size=SIZE,
                                   train_frozen_bn=False)
  variables = st.spottune_variables_from_pretrained(model, plain_vars, rng=jax.random.key(1))
  state, _ = train_spottune_steps(model=model, variables=variables,
                                  components=[CrossEntropy(), SpotTune(train_frozen_bn=False)],
                                  batch={"image": _images(n=8, seed=1), "label": jnp.arange(8) % 5})
  for collection, new in (("params", state.params), ("batch_stats", state.batch_stats)):
    jax.tree.map(np.testing.assert_array_equal, new["frozen_backbone"], variables[collection]["frozen_backbone"])


def test_component_matches_numpy_and_is_zero_without_lambdas():
  rng = np.random.default_rng(1)
  decisions = (rng.random((10, 5)) < 0.5).astype(np.float32)
  outputs = {"policy": jnp.asarray(decisions)}
  plain = SpotTune()
  term = plain(outputs=outputs, batch={}, state=(), params=None, rng=None)
  assert float(term.loss) == 0.0
  np.testing.assert_allclose(float(term.metrics["finetuned_blocks"]), decisions.sum(1).mean(), rtol=1e-6)
  for j in range(5):
    np.testing.assert_allclose(float(term.metrics[f"usage/{j}"]), decisions[:, j].mean(), rtol=1e-6)
  global_k = build_methods({"spottune": {"lambda1": 2.0, "lambda2": 0.3, "k": 2}})[0]
  term = global_k(outputs=outputs, batch={}, state=(), params=None, rng=None)
  np.testing.assert_allclose(float(term.loss), 2.0 * np_global_k(decisions, 2) + 0.3 * np_entropy(decisions),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="lambda1"):
    SpotTune(lambda1=-1.0)
  with pytest.raises(ValueError, match="unknown SpotTune routing"):
    SpotTune(eval_routing="maybe")
  with pytest.raises(ValueError, match="SpotTune model"):
    SpotTune().init_state(variables={"params": {"backbone": {}}}, rng=None)


def test_wrap_model_builds_spottune_from_plain():
  _, plain, _, plain_vars = _models("resnet_tiny")
  component = SpotTune(policy_depth=1, policy_width=8, policy_image_size=SIZE)
  model, variables = component.wrap_model(model=plain, variables=plain_vars, rng=jax.random.key(2))
  assert isinstance(model, st.SpotTuneClassifier) and model.num_classes == 5
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["backbone"], plain_vars["params"]["backbone"])
  out = model.apply(variables, _images(), train=False, outputs=("logits",), routing="all_frozen")
  np.testing.assert_allclose(np.asarray(out["logits"]),
                             np.asarray(plain.apply(plain_vars, _images(), train=False)["logits"]), rtol=1e-6)


# ----------------------------------------------------------------------------- pruning and figures


def test_unused_blocks_and_pruned_size():
  model, _, variables, _ = _models("resnet_tiny")
  params = variables["params"]
  decisions = np.array([[1, 0], [1, 0], [0, 0]])
  assert st.unused_blocks(decisions, model.routed_blocks) == [model.routed_blocks[1]]
  size = st.pruned_size(params, decisions, model.routed_blocks)
  count = lambda tree: sum(int(np.size(a)) for a in jax.tree.leaves(tree))
  assert size.total == count(params)
  assert size.pruned == count(params) - count(params["backbone"][model.routed_blocks[1]])
  assert size.pruned_without_policy == size.pruned - count(params["policy"])
  np.testing.assert_allclose(size.usage, [2 / 3, 0.0])
  with pytest.raises(ValueError, match="decisions must be"):
    st.unused_blocks(np.zeros((3, 3)), model.routed_blocks)


def test_figures_are_written(tmp_path):
  decisions = (np.random.default_rng(0).random((50, 6)) < 0.3).astype(np.float32)
  fig3 = st.plot_block_usage(decisions, str(tmp_path / "fig3" / "usage.png"),
                             block_names=[f"b{i}" for i in range(6)])
  fig4 = st.plot_finetuned_histogram(decisions, str(tmp_path / "hist.png"))
  for path in (fig3, fig4):
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="block names"):
    st.plot_block_usage(decisions, str(tmp_path / "x.png"), block_names=["a"])


def test_random_block_mask():
  mask = st.random_block_mask(16, fraction=0.5, seed=3)
  assert len(mask) == 16 and sum(mask) == 8
  assert mask == st.random_block_mask(16, fraction=0.5, seed=3)
  assert mask != st.random_block_mask(16, fraction=0.5, seed=4)
  # 50% of an odd count rounds half up (Python's round(4.5) is 4).
  assert [sum(st.random_block_mask(n, fraction=0.5)) for n in (1, 2, 9, 12)] == [1, 1, 5, 6]


def test_config_rows_follow_the_official_recipe():
  from experiments.configs import spottune as spottune_config
  from ftjax.methods import build_methods
  from ftjax.train.report import variant_configs
  config = spottune_config.get_config("5")   # Lite0
  variants = variant_configs(config)
  # Stochastic fine-tuning: 50% of all 16 routed blocks.
  mask = tuple(variants["stochastic"].losses.spottune.routing_mask)
  assert len(mask) == 16 and sum(mask) == 8
  for name in ("spottune", "global_k", "stochastic", "random_policy"):
    spot = [m for m in build_methods(variants[name].losses) if isinstance(m, SpotTune)][0]
    # The authors' agent optimizer: lr_agent 0.01 against lr 0.1, weight decay 0.001.
    assert spot.param_groups()["policy"] == {"lr_mult": 0.1, "weight_decay": 1e-3}
    assert spot.train_frozen_bn
  assert variants["random_policy"].losses.spottune.eval_routing == "random"


def test_random_routing_is_fresh_for_every_test_batch():
  # The trainer's eval step hands the "gumbel" stream the same key, PRNGKey(0), for every
  # batch (ftjax.train.step.make_eval_step); the random policy must still route each test
  # batch at random, not repeat the first batch's decisions row by row.
  model = st.create_spottune_model("resnet_tiny", num_classes=5, policy_depth=1, policy_width=8,
                                   policy_image_size=SIZE, eval_routing="random")
  _, _, variables, _ = _models("resnet_tiny")
  from ftjax.train import step as step_lib
  fixed_keys = {name: jax.random.PRNGKey(i) for i, name in enumerate(step_lib.rng_streams([SpotTune()]))}
  route = jax.jit(lambda v, x: model.apply(v, x, train=False, outputs=("policy",), rngs=fixed_keys)["policy"])
  first, second = (np.asarray(route(variables, _images(n=64, seed=s))) for s in (1, 2))
  assert not np.array_equal(first, second)
  assert 0.3 < first.mean() < 0.7 and 0.3 < second.mean() < 0.7
  np.testing.assert_array_equal(np.asarray(route(variables, _images(n=64, seed=1))), first)  # reproducible
  # Per image, independent of the batch it is in.
  np.testing.assert_array_equal(np.asarray(route(variables, _images(n=64, seed=1)[:8])), first[:8])
  # Sampled routing likewise.
  sample = jax.jit(lambda v, x: model.apply(v, x, train=False, outputs=("policy",), routing="sample",
                                            rngs=fixed_keys)["policy"])
  assert not np.array_equal(np.asarray(sample(variables, _images(n=64, seed=1))),
                            np.asarray(sample(variables, _images(n=64, seed=2))))
  hashes = np.asarray(st.image_hashes(_images(n=64, seed=1)))
  assert len(set(hashes.tolist())) == 64


# ----------------------------------------------------------------------------- trainer (slow)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["global_k", "stochastic", "random_policy"])
def test_trainer_runs_spottune_variants(variant, tmp_path, fashion_mnist_ready):
  from experiments.configs import spottune as spottune_config
  from ftjax.train.loop import train_and_evaluate
  from ftjax.train.report import variant_configs

  config = spottune_config.get_config("1,resnet_tiny")
  with config.unlocked():
    config.dataset.image_size = SIZE
    config.batch_size, config.eval_batch_size = 16, 500
    config.num_steps, config.eval_every_steps, config.log_every_steps = 4, 4, 2
    config.progress, config.tensorboard = False, False
  cfg = variant_configs(config)[variant]
  with cfg.unlocked():
    cfg.losses.spottune.policy_depth, cfg.losses.spottune.policy_width = 1, 8
    cfg.losses.spottune.policy_image_size = SIZE
  results = train_and_evaluate(cfg, str(tmp_path))
  decisions = np.load(tmp_path / "spottune_decisions.npy")
  assert decisions.shape == (results["num_test"], 2)
  for name in ("spottune_block_usage.png", "spottune_finetuned_blocks.png"):
    assert (tmp_path / name).exists()
  np.testing.assert_allclose(results["spottune_block_usage"], decisions.mean(0))
  if variant == "stochastic":
    mask = tuple(cfg.losses.spottune.routing_mask)
    np.testing.assert_array_equal(decisions, np.broadcast_to(mask, decisions.shape))
    assert results["spottune_eval_routing"] == "fixed"
  elif variant == "random_policy":
    assert results["spottune_eval_routing"] == "random"
    np.testing.assert_array_equal(decisions[:, -2:], 1)   # resnet_tiny: 2 routed blocks, the last 2 always
  else:
    assert results["spottune_eval_routing"] == "argmax"
    assert "spottune_test_top1/sample" in results

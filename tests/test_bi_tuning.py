"""Bi-Tuning: CCE (Eq. 3), CCL (Eq. 4) and InfoNCE (Eq. 1) against NumPy, gradient
routing, the vectorised per-class enqueue, the momentum key encoder, the projector,
two augmented views, and end-to-end training with resume."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from ftjax import data, models
from ftjax.losses import categorical_contrastive_loss, contrastive_cross_entropy, info_nce
from ftjax.methods import build_methods
from ftjax.methods.bi_tuning import BiTuning, enqueue_by_label, momentum_update, queue_nbytes
from ftjax.train.config import default_config

C, K, D, B = 5, 4, 6, 7


# ----------------------------------------------------------------------------- NumPy references


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_multi_positive(anchor_logit_fn, own, queue, counts, label):
  """Eq. 3/4 for one example, written from the paper: explicit K_p and K_n lists.

  ``anchor_logit_fn(key)`` is the logit of a key; ``own`` the own positive key.
  """
  positives = [own] + [queue[label, j] for j in range(counts[label])]
  negatives = [queue[c, j] for c in range(queue.shape[0]) if c != label for j in range(counts[c])]
  logits_all = np.array([anchor_logit_fn(k) for k in positives + negatives])
  log_denominator = scipy.special.logsumexp(logits_all)
  return -np.mean([anchor_logit_fn(k) - log_denominator for k in positives])


def np_ccl(queries, keys, queue, labels, counts, tau):
  q, k = _normalize(queries), _normalize(keys)
  return np.array([_np_multi_positive(lambda key: q[i] @ key / tau, k[i], np.asarray(queue, np.float64),
                                      counts, labels[i]) for i in range(len(q))])


def np_cce(features, kernel, bias, queue, labels, counts, tau):
  h = _normalize(np.concatenate([features, np.ones((len(features), 1))], axis=1))
  w = _normalize(np.concatenate([np.asarray(kernel).T, np.asarray(bias)[:, None]], axis=1))
  return np.array([_np_multi_positive(lambda key: w[labels[i]] @ key / tau, h[i],
                                      np.asarray(queue, np.float64), counts, labels[i])
                   for i in range(len(h))])


def np_info_nce(queries, keys, queue, counts, tau):
  q, k = _normalize(queries), _normalize(keys)
  out = []
  for i in range(len(q)):
    negatives = [queue[c, j] for c in range(queue.shape[0]) for j in range(counts[c])]
    logits_all = np.array([q[i] @ k[i]] + [q[i] @ n for n in negatives]) / tau
    out.append(-(logits_all[0] - scipy.special.logsumexp(logits_all)))
  return np.array(out)


def _problem(seed=0, dim=D, counts=(K, 2, 0, K, 1)):
  """Random queries/keys and a queue whose unused entries hold garbage (must be ignored)."""
  rng = np.random.default_rng(seed)
  queries = rng.normal(size=(B, dim)).astype(np.float32)
  keys = rng.normal(size=(B, dim)).astype(np.float32)
  queue = _normalize(rng.normal(size=(C, K, dim))).astype(np.float32)
  counts = np.asarray(counts, np.int32)
  garbage = np.arange(K)[None, :] >= counts[:, None]
  queue[garbage] = 50.0  # huge logits if they were not masked
  labels = rng.integers(0, C, B).astype(np.int32)
  labels[:3] = [0, 2, 4]  # a full class, an empty class, a partly filled class
  return queries, keys, queue, labels, counts


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_ccl_matches_numpy_with_partly_filled_queues(tau):
  queries, keys, queue, labels, counts = _problem(seed=1)
  expected = np_ccl(queries, keys, queue, labels, counts, tau)
  kw = dict(queries=queries, keys=keys, queue=queue, labels=labels, queue_counts=counts, temperature=tau)
  np.testing.assert_allclose(categorical_contrastive_loss(**kw, reduction="none"), expected, rtol=2e-5)
  np.testing.assert_allclose(categorical_contrastive_loss(**kw), expected.mean(), rtol=2e-5)
  np.testing.assert_allclose(categorical_contrastive_loss(**kw, reduction="sum"), expected.sum(), rtol=2e-5)
  # Full queues (counts=None) equal explicit counts of K.
  full = dict(kw, queue_counts=None)
  np.testing.assert_allclose(categorical_contrastive_loss(**full, reduction="none"),
                             np_ccl(queries, keys, queue, labels, np.full(C, K), tau), rtol=2e-5)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_cce_matches_numpy_with_partly_filled_queues(tau):
  queries, _, queue, labels, counts = _problem(seed=2, dim=D + 1)
  features = queries[:, :D] * 3.0
  rng = np.random.default_rng(3)
  kernel = rng.normal(size=(D, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  expected = np_cce(features, kernel, bias, queue, labels, counts, tau)
  kw = dict(features=features, head_kernel=kernel, head_bias=bias, queue=queue, labels=labels,
            queue_counts=counts, temperature=tau)
  np.testing.assert_allclose(contrastive_cross_entropy(**kw, reduction="none"), expected, rtol=2e-5)
  np.testing.assert_allclose(contrastive_cross_entropy(**kw), expected.mean(), rtol=2e-5)
  # Same value when the prototypes carry gradient.
  np.testing.assert_allclose(contrastive_cross_entropy(**kw, prototype_gradient=True), expected.mean(),
                             rtol=2e-5)


def test_info_nce_matches_numpy():
  queries, keys, queue, _, counts = _problem(seed=4)
  expected = np_info_nce(queries, keys, queue, counts, 0.07)
  out = info_nce(queries=queries, keys=keys, queue=queue, queue_counts=counts, reduction="none")
  np.testing.assert_allclose(out, expected, rtol=2e-5)
  # With empty queues every loss is exactly zero (the own key is the only key).
  zero = info_nce(queries=queries, keys=keys, queue=queue, queue_counts=np.zeros(C, np.int32))
  assert float(zero) == pytest.approx(0.0, abs=1e-6)


def test_losses_jit_vmap_and_errors():
  queries, keys, queue, labels, counts = _problem(seed=5)
  fn = jax.jit(functools.partial(categorical_contrastive_loss, reduction="none"))
  out = fn(queries=queries, keys=keys, queue=queue, labels=labels, queue_counts=counts)
  np.testing.assert_allclose(out, np_ccl(queries, keys, queue, labels, counts, 0.07), rtol=2e-5)
  per_row = jax.vmap(lambda q, k, y: categorical_contrastive_loss(
      queries=q[None], keys=k[None], queue=queue, labels=y[None], queue_counts=counts))
  np.testing.assert_allclose(per_row(queries, keys, labels), out, rtol=2e-5)
  with pytest.raises(ValueError, match="queue has dimension 5 but the queries have 6"):
    categorical_contrastive_loss(queries=queries, keys=keys, queue=queue[..., :5], labels=labels)
  with pytest.raises(ValueError, match=r"queue_counts must be \[num_classes\] = \[5\]"):
    categorical_contrastive_loss(queries=queries, keys=keys, queue=queue, labels=labels,
                                 queue_counts=counts[:3])
  with pytest.raises(ValueError, match=r"labels must be \[batch\]"):
    categorical_contrastive_loss(queries=queries, keys=keys, queue=queue, labels=labels[:2])
  with pytest.raises(ValueError, match="queries and keys must both be"):
    info_nce(queries=queries, keys=keys[:2], queue=queue)
  with pytest.raises(ValueError, match=r"head_kernel must be \[dim, num_classes\]"):
    contrastive_cross_entropy(features=queries, head_kernel=np.zeros((3, C)), head_bias=np.zeros(C),
                              queue=queue, labels=labels)
  with pytest.raises(ValueError, match="queue has 5 classes but the head has 4"):
    contrastive_cross_entropy(features=queries[:, :5], head_kernel=np.zeros((5, 4)), head_bias=np.zeros(4),
                              queue=queue, labels=labels)
  with pytest.raises(ValueError, match="unknown reduction"):
    info_nce(queries=queries, keys=keys, queue=queue, reduction="max")


def test_gradients_only_into_queries():
  queries, keys, queue, labels, counts = _problem(seed=6)
  rng = np.random.default_rng(7)
  features = rng.normal(size=(B, D - 1)).astype(np.float32)
  kernel = rng.normal(size=(D - 1, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)

  def ccl(q, k, qu):
    return categorical_contrastive_loss(queries=q, keys=k, queue=qu, labels=labels, queue_counts=counts)

  def cce(h, w, b, qu, prototype_gradient=False):
    return contrastive_cross_entropy(features=h, head_kernel=w, head_bias=b, queue=qu, labels=labels,
                                     queue_counts=counts, prototype_gradient=prototype_gradient)

  def nce(q, k, qu):
    return info_nce(queries=q, keys=k, queue=qu, queue_counts=counts)

  for loss in (ccl, nce):
    g_q, g_k, g_queue = jax.grad(loss, argnums=(0, 1, 2))(queries, keys, queue)
    assert np.abs(g_q).max() > 1e-3
    assert not np.any(g_k) and not np.any(g_queue)
  g_h, g_w, g_b, g_queue = jax.grad(cce, argnums=(0, 1, 2, 3))(features, kernel, bias, queue)
  assert np.abs(g_h).max() > 1e-3
  assert not np.any(g_w) and not np.any(g_b) and not np.any(g_queue)
  # The gradient into the queries is the loss's own: check one coordinate by finite differences.
  eps = 1e-3
  bump = np.zeros_like(features)
  bump[0, 1] = eps
  fd = (np_cce(features + bump, kernel, bias, queue, labels, counts, 0.07).mean()
        - np_cce(features - bump, kernel, bias, queue, labels, counts, 0.07).mean()) / (2 * eps)
  assert float(g_h[0, 1]) == pytest.approx(fd, rel=1e-2, abs=1e-4)
  # prototype_gradient=True opens the path into the head (for CCE without CE).
  g_w, g_b = jax.grad(functools.partial(cce, prototype_gradient=True), argnums=(1, 2))(
      features, kernel, bias, queue)
  assert np.abs(g_w).max() > 1e-3 and np.abs(g_b).max() > 1e-3


# ----------------------------------------------------------------------------- queues


def _python_enqueue(queue, keys, labels, pointers, counts):
  queue, pointers, counts = queue.copy(), pointers.copy(), counts.copy()
  num_keys = queue.shape[1]
  for i, c in enumerate(labels):
    queue[c, pointers[c]] = keys[i]
    pointers[c] = (pointers[c] + 1) % num_keys
    counts[c] = min(counts[c] + 1, num_keys)
  return queue, pointers, counts


def test_vectorised_enqueue_equals_python_loop_with_wrap_around():
  rng = np.random.default_rng(8)
  num_keys = 3
  queue_a = np.zeros((C, num_keys, 2), np.float32)
  queue_b = np.zeros((C, num_keys, 4), np.float32)
  pointers, counts = np.zeros(C, np.int32), np.zeros(C, np.int32)
  ref_a, ref_b, ref_ptr, ref_cnt = queue_a, queue_b, pointers, counts
  enqueue = jax.jit(enqueue_by_label)
  # Batches where a class appears more often than K (overwrites within the batch), classes
  # that never appear, and pointers that wrap around.
  batches = [np.array([0, 0, 0, 0, 0, 1, 3]), np.array([1, 1, 2]), rng.integers(0, C, 9),
             np.array([4, 0, 4, 4, 0, 4, 4, 4]), rng.integers(0, 2, 11), np.array([2, 3, 2, 2, 2])]
  for step, labels in enumerate(batches):
    labels = labels.astype(np.int32)
    keys_a = rng.normal(size=(len(labels), 2)).astype(np.float32)
    keys_b = rng.normal(size=(len(labels), 4)).astype(np.float32)
    (queue_a, queue_b), pointers, counts = enqueue(queues=(queue_a, queue_b), keys=(keys_a, keys_b),
                                                   labels=labels, pointers=pointers, counts=counts)
    ref_a, ref_ptr_a, ref_cnt_a = _python_enqueue(ref_a, keys_a, labels, ref_ptr, ref_cnt)
    ref_b, ref_ptr, ref_cnt = _python_enqueue(ref_b, keys_b, labels, ref_ptr, ref_cnt)
    np.testing.assert_array_equal(queue_a, ref_a, err_msg=f"step {step}")
    np.testing.assert_array_equal(queue_b, ref_b, err_msg=f"step {step}")
    np.testing.assert_array_equal(pointers, ref_ptr)
    np.testing.assert_array_equal(counts, ref_cnt)
  assert np.all(np.asarray(counts) == num_keys)  # every class wrapped at least once by now
  with pytest.raises(ValueError, match="do not match"):
    enqueue_by_label(queues=(queue_a,), keys=(keys_b,), labels=labels, pointers=pointers, counts=counts)


def test_queue_nbytes_counts_the_state():
  bt = BiTuning(keys_per_class=3, projection_dim=8)
  variables = {"params": {"backbone": {"w": np.zeros(2)}, "projector": {"kernel": np.zeros((10, 8)),
                                                                         "bias": np.zeros(8)},
                          "head": {"kernel": np.zeros((10, 4)), "bias": np.zeros(4)}}}
  state = bt.init_state(variables=variables, rng=None)
  queue_state = sum(state[k].nbytes for k in ("queue_h", "queue_z", "pointer", "count"))
  assert queue_nbytes(num_classes=4, keys_per_class=3, feature_dim=10, projection_dim=8) == queue_state
  assert state["queue_h"].shape == (4, 3, 11) and state["queue_z"].shape == (4, 3, 8)
  # The sizing: K = 32 per class, 200 classes, 1280-d features.
  assert queue_nbytes(num_classes=200, keys_per_class=32, feature_dim=1280) == (
      200 * 32 * (1281 + 128) * 4 + 2 * 200 * 4)


# ----------------------------------------------------------------------------- component


@pytest.fixture(scope="module")
def tiny():
  model = models.create_model("resnet_tiny", num_classes=C, projection_dim=8)
  init = jax.jit(functools.partial(model.init, train=False, outputs=model.all_outputs))
  variables = jax.tree.map(np.asarray, dict(init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))))
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32),
           "image_key": rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32),
           "label": np.array([0, 1, 1, 2, 3, 3, 3, 4], np.int32)}
  return model, variables, batch


def test_projector_output_and_no_change_without_it(tiny):
  model, variables, batch = tiny
  assert model.all_outputs[-1] == "projection"
  assert variables["params"]["projector"]["kernel"].shape == (16, 8)
  out = model.apply(variables, batch["image"], train=False, outputs=("features", "projection"))
  z = np.asarray(out["projection"])
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
  p = variables["params"]["projector"]
  np.testing.assert_allclose(z, _normalize(np.asarray(out["features"]) @ p["kernel"] + p["bias"]),
                             rtol=1e-4, atol=1e-6)
  plain = models.create_model("resnet_tiny", num_classes=C)
  assert "projection" not in plain.all_outputs
  plain_vars = jax.eval_shape(functools.partial(plain.init, train=False, outputs=plain.all_outputs),
                              jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert set(plain_vars["params"]) == set(variables["params"]) - {"projector"}
  with pytest.raises(ValueError, match="projection_dim=0"):
    plain.apply(variables, batch["image"], train=False, outputs=("projection",))
  with pytest.raises(ValueError, match="projection_dim must be >= 0"):
    models.create_model("resnet_tiny", num_classes=C, projection_dim=-1)
  # Bi-Tuning owns the projector's rule; without the method, no rule covers it.
  from ftjax.core import paths
  from ftjax.train.setup import resolve_rules
  for baseline in ("finetune", "linear_probe", "last_k"):
    config = default_config()
    config.model, config.baseline = "resnet_tiny", baseline
    with pytest.raises(paths.RuleError, match="projector/kernel"):
      paths.path_labels(variables["params"], resolve_rules(config)[0])


@pytest.mark.parametrize("baseline", ["finetune", "last_k", "scratch", "linear_probe"])
def test_projector_trains_at_the_backbone_learning_rate(tiny, baseline):
  """TLlib's Bi-Tuning Classifier.get_parameters: the projector's lr is the backbone's (0.1x the
  head's when fine-tuning, 1x from scratch). Before issue 23 it was a new head in the head's
  10x group."""
  from ftjax.core import paths
  from ftjax.train.setup import resolve_rules
  _, variables, _ = tiny
  config = default_config()
  config.model, config.baseline, config.last_k = "resnet_tiny", baseline, 1
  config.losses = {"ce": {"weight": 1.0}, "bi_tuning": {"projection_dim": 8}}
  rules, groups, _ = resolve_rules(config, variables)
  labels = paths.path_labels(variables["params"], rules)
  (projector,) = set(jax.tree.leaves(labels["projector"]))
  (head,) = set(jax.tree.leaves(labels["head"]))
  backbone = set(jax.tree.leaves(labels["backbone"]))
  assert projector == "backbone" and not groups[projector].frozen
  assert groups[projector].lr_mult == 1.0 and groups[head].lr_mult == (1.0 if baseline == "scratch" else 10.0)
  assert groups[projector].weight_decay is None   # the run's weight decay, as the backbone's
  if baseline in ("finetune", "last_k"):
    assert projector in backbone            # the very group of the (trained) backbone
  elif baseline == "scratch":
    assert backbone == {"all"} and groups["all"] == groups[projector]   # everything at one lr
  else:
    # linear_probe: the backbone is frozen; the random projector still trains, at 1x (the
    # backbone's lr when fine-tuning), so CCL is not a constant.
    assert backbone == {"frozen"} and groups["frozen"].frozen
  # The run's own group settings still apply to the projector with the backbone.
  config.groups = {"backbone": {"lr_mult": 0.5}}
  assert resolve_rules(config, variables)[1]["backbone"].lr_mult == 0.5


def test_pretrained_accepts_projection_dim():
  name = "efficientnet_lite0/imagenet"
  with_projector = models.pretrained(name, num_classes=C, keep_source_head=False, projection_dim=16, seed=3)
  without = models.pretrained(name, num_classes=C, keep_source_head=False, seed=3)
  assert with_projector.variables["params"]["projector"]["kernel"].shape == (1280, 16)
  assert "projector" not in without.variables["params"]
  np.testing.assert_array_equal(with_projector.variables["params"]["head"]["kernel"],
                                without.variables["params"]["head"]["kernel"])
  shapes = jax.eval_shape(lambda v: with_projector.model.apply(
      v, jnp.zeros((2, 64, 64, 3)), train=False, outputs=("projection",)), with_projector.variables)
  assert shapes["projection"].shape == (2, 16)


def test_component_options_and_errors(tiny):
  _, variables, _ = tiny
  ce, bt = build_methods({"ce": {"weight": 1.0},
                             "bi_tuning": {"keys_per_class": 8, "ccl_weight": 0.0, "projection_dim": 8}})
  assert isinstance(bt, BiTuning) and bt.views == 2 and bt.outputs == ("features", "projection")
  assert (bt.cce_weight, bt.ccl_weight, bt.temperature, bt.momentum) == (1.0, 0.0, 0.07, 0.999)
  with pytest.raises(ValueError, match="keys_per_class must be a positive integer"):
    BiTuning(keys_per_class=0)
  with pytest.raises(ValueError, match="momentum must be in"):
    BiTuning(momentum=1.5)
  with pytest.raises(ValueError, match="key_bn_mode must be"):
    BiTuning(key_bn_mode="frozen")
  with pytest.raises(ValueError, match="bad options"):
    build_methods({"bi_tuning": {"queue_size": 3}})
  with pytest.raises(ValueError, match="projection_dim=128 but the model's projector has 8"):
    BiTuning().init_state(variables=variables, rng=None)
  no_projector = {"params": {k: v for k, v in variables["params"].items() if k != "projector"}}
  with pytest.raises(ValueError, match="no 'projector' parameters"):
    BiTuning(projection_dim=8).init_state(variables=no_projector, rng=None)
  state = BiTuning(projection_dim=8).init_state(variables=variables, rng=None)
  with pytest.raises(ValueError, match="call its prepare"):
    BiTuning(projection_dim=8).keys(state=state, images=np.zeros((1, 32, 32, 3), np.float32))


def test_momentum_update_comes_before_the_keys(tiny):
  model, variables, batch = tiny
  m = 0.5
  bt = BiTuning(keys_per_class=K, projection_dim=8, momentum=m, key_bn_mode="train",
                model=model)
  state = bt.init_state(variables=variables, rng=None)
  # A key encoder that differs from the query encoder, so "before" and "after" differ.
  rng = np.random.default_rng(9)
  state["key_params"] = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32) * 0.1,
                                     state["key_params"])
  params = variables["params"]
  out = model.apply(variables, batch["image"], train=True, outputs=("features", "projection"),
                    mutable=["batch_stats"])[0]
  term = jax.jit(lambda s, p, o, b: bt(outputs=o, batch=b, state=s, params=p, rng=None))(
      state, params, out, batch)
  new = term.state
  expected_key_params = jax.tree.map(lambda k, p: m * k + (1 - m) * p, state["key_params"],
                                     {n: params[n] for n in ("backbone", "projector")})
  for a, b in zip(jax.tree.leaves(new["key_params"]), jax.tree.leaves(expected_key_params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert set(new["key_params"]) == {"backbone", "projector"}
  np.testing.assert_array_equal(jax.tree.leaves(momentum_update(
      key_params={"a": np.ones(2)}, params={"a": np.zeros(2)}, momentum=0.9)), [[0.9, 0.9]])

  # The enqueued keys are those of the *updated* key encoder on the second view.
  def key_encoder(key_params):
    kv = {"params": key_params, "batch_stats": state["key_batch_stats"]}
    o, new_vars = model.apply(kv, batch["image_key"], train=True, outputs=("features", "projection"),
                              mutable=["batch_stats"])
    h = _normalize(np.concatenate([o["features"], np.ones((8, 1))], axis=1))
    return h, np.asarray(o["projection"]), new_vars["batch_stats"]
  h_new, z_new, stats_new = key_encoder(expected_key_params)
  h_old, _, _ = key_encoder(state["key_params"])
  labels = batch["label"]
  ref_h, _, _ = _python_enqueue(np.zeros((C, K, 17)), h_new, labels, np.zeros(C, int), np.zeros(C, int))
  ref_z, _, _ = _python_enqueue(np.zeros((C, K, 8)), z_new, labels, np.zeros(C, int), np.zeros(C, int))
  np.testing.assert_allclose(new["queue_h"], ref_h, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new["queue_z"], ref_z, rtol=1e-4, atol=1e-5)
  assert np.abs(h_new - h_old).max() > 1e-3  # the check above could tell the difference
  np.testing.assert_array_equal(new["count"], np.bincount(labels, minlength=C))
  for a, b in zip(jax.tree.leaves(new["key_batch_stats"]), jax.tree.leaves(stats_new)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  # The losses used the queues *before* this batch (empty: both terms are zero) and
  # the metrics report each part.
  assert float(term.metrics["cce"]) == pytest.approx(0.0, abs=1e-5)
  assert float(term.metrics["ccl"]) == pytest.approx(0.0, abs=1e-5)
  term2 = bt(outputs=out, batch=batch, state=new, params=params, rng=None)
  z_k2 = key_encoder(term2.state["key_params"])[1]
  expected_ccl = np_ccl(out["projection"], z_k2, new["queue_z"], labels, np.asarray(new["count"]), 0.07)
  expected_cce = np_cce(out["features"], params["head"]["kernel"], params["head"]["bias"], new["queue_h"],
                        labels, np.asarray(new["count"]), 0.07)
  assert float(term2.metrics["ccl"]) == pytest.approx(expected_ccl.mean(), rel=1e-4)
  assert float(term2.metrics["cce"]) == pytest.approx(expected_cce.mean(), rel=1e-4)
  assert float(term2.loss) == pytest.approx(expected_ccl.mean() + expected_cce.mean(), rel=1e-4)


def test_missing_second_view_is_a_clear_error(tiny):
  model, variables, batch = tiny
  bt = BiTuning(projection_dim=8, model=model)
  state = bt.init_state(variables=variables, rng=None)
  with pytest.raises(ValueError, match="image_key"):
    bt(outputs={}, batch={"image": batch["image"], "label": batch["label"]}, state=state,
       params=variables["params"], rng=None)


# ----------------------------------------------------------------------------- data and trainer


def test_two_views_differ_and_are_deterministic(fashion_mnist_ready):
  ds = data.load_dataset("fashion_mnist", sampling_rate=1, seed=0, image_size=32)
  one = next(ds.train_batches(batch_size=16))
  two = [next(ds.train_batches(batch_size=16, views=2)) for _ in range(2)]
  assert set(two[0]) == {"image", "image_key", "label"}
  np.testing.assert_array_equal(two[0]["image"], one["image"])  # views=1 unchanged
  np.testing.assert_array_equal(two[0]["label"], one["label"])
  np.testing.assert_array_equal(two[0]["image_key"], two[1]["image_key"])
  assert two[0]["image_key"].shape == two[0]["image"].shape
  per_image_diff = np.abs(two[0]["image_key"] - two[0]["image"]).reshape(16, -1).max(axis=1)
  assert np.all(per_image_diff > 1.0)
  # Resume: the stream from step 3 equals steps 3.. of the full stream.
  full = ds.train_batches(batch_size=16, views=2)
  for _ in range(3):
    next(full)
  expected = next(full)
  resumed = next(ds.train_batches(batch_size=16, views=2, start_step=3))
  for key in ("image", "image_key", "label"):
    np.testing.assert_array_equal(resumed[key], expected[key])
  with pytest.raises(ValueError, match="views must be 1 or 2"):
    next(ds.train_batches(batch_size=16, views=3))


def _tiny_bi_tuning_config():
  from experiments.configs import tiny as tiny_config
  c = tiny_config.get_config()
  c.num_steps = 8
  c.eval_every_steps = 4
  c.log_every_steps = 2
  c.tensorboard = False
  c.losses = {"ce": {"weight": 1.0},
              "bi_tuning": {"weight": 1.0, "keys_per_class": 4, "projection_dim": 16}}
  return c


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fashion_mnist_ready):
  """8 steps of ce + bi_tuning on 1% of Fashion-MNIST with resnet_tiny (checkpoints at 4 and 8)."""
  from ftjax.train.loop import train_and_evaluate
  config = _tiny_bi_tuning_config()
  workdir = tmp_path_factory.mktemp("bi_tuning_run")
  return config, workdir, train_and_evaluate(config, str(workdir))


def test_end_to_end_training_runs_with_finite_losses(trained_run):
  from ftjax.train.checkpoint import load_checkpoint_arrays
  _, workdir, result = trained_run
  assert result["steps"] == 8 and np.isfinite(result["test_top1"])
  ckpt = load_checkpoint_arrays(str(workdir))
  method_state = ckpt["state"]["method_state"]["bi_tuning"]
  assert "projector" in ckpt["state"]["params"] and "projector" in method_state["key_params"]
  assert np.all(method_state["count"] == 4)  # 8 steps x 16 images over 10 classes
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert len(train_rows) == 4
  assert all(np.isfinite(r["loss"]) and "bi_tuning/cce" in r and "bi_tuning/ccl" in r for r in train_rows)
  assert train_rows[-1]["bi_tuning/ccl"] > 0.1 and train_rows[-1]["bi_tuning/cce"] > 0.1  # queues used


@pytest.mark.slow
def test_end_to_end_resume_is_exact(trained_run, tmp_path):
  from ftjax.train.checkpoint import load_checkpoint_arrays
  from ftjax.train.loop import train_and_evaluate
  config, ref_dir, result = trained_run
  # A copy of the run without its last checkpoint restarts from step 4 and must end
  # exactly where the uninterrupted run did (data views, queues, key encoder, optimizer).
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(ref_dir, resumed_dir)
  shutil.rmtree(resumed_dir / "checkpoints" / "8")
  os.remove(resumed_dir / "results.json")
  resumed = train_and_evaluate(config, str(resumed_dir))
  assert resumed["test_top1"] == result["test_top1"]
  a, b = load_checkpoint_arrays(str(ref_dir)), load_checkpoint_arrays(str(resumed_dir))
  assert a["step"] == b["step"] == 8
  for x, y in zip(jax.tree.leaves(a["state"]), jax.tree.leaves(b["state"])):
    np.testing.assert_array_equal(x, y)


def test_experiment_config_rows():
  from experiments.configs import bi_tuning as bi_config
  from ftjax.train import report
  assert [bi_config.keys_per_class(r) for r in (5, 25, 50, 75, 100)] == [8, 8, 16, 24, 32]
  config = bi_config.get_config("50")
  assert config.dataset.sampling_rate == 50.0 and config.model == "efficientnet_lite0"
  variants = report.variant_configs(config)
  assert set(variants) == {"finetune", "bi_tuning", "ce_cce", "ce_ccl", "cce_ccl"}
  weights = {}
  for name, cfg in variants.items():
    comps = {c.name: c for c in build_methods(cfg.losses)}
    bt = comps.get("bi_tuning")
    weights[name] = ("ce" in comps, bool(bt and bt.cce_weight), bool(bt and bt.ccl_weight))
    if bt:
      assert bt.keys_per_class == 16 and bt.temperature == 0.07 and bt.momentum == 0.999
  assert weights == {"finetune": (True, False, False), "bi_tuning": (True, True, True),
                     "ce_cce": (True, True, False), "ce_ccl": (True, False, True),
                     "cce_ccl": (False, True, True)}
  assert default_config().losses.to_dict() == {"ce": {"weight": 1.0}}

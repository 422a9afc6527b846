"""Regularisation baselines (L2-SP, DELTA, BSS, LwF): losses against NumPy, components in the step."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from ftjax import models
from ftjax.losses import (batch_spectral_shrinkage, delta, delta_channel_weights,
                          filter_ablation_loss_increase, l2_sp, lwf)
from ftjax.losses.regularizers import delta_behavioural
from ftjax.methods import build_methods
from ftjax.methods import regularizers as mr
from ftjax.methods.co_tuning import CoTuning
from ftjax.methods.finetune import CrossEntropy
from ftjax.train import sharding as shd
from ftjax.train.config import default_config
from ftjax.methods import RunContext
from ftjax.train import setup
from ftjax.train.setup import resolve_rules

NUM_TARGET, NUM_SOURCE = 4, 7


# ----------------------------------------------------------------------------- L2-SP


def _random_tree(rng, shapes):
  return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def test_l2_sp_matches_numpy_and_its_gradient():
  rng = np.random.default_rng(0)
  shapes = {"conv": (3, 3, 2, 4), "bn": (4,), "dense": (5, 2)}
  params, anchor = _random_tree(rng, shapes), _random_tree(rng, shapes)
  head = {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": rng.normal(size=3).astype(np.float32)}
  alpha, beta = 0.3, 0.07
  expected = (alpha / 2 * sum(np.sum((params[k].astype(np.float64) - anchor[k]) ** 2) for k in shapes)
              + beta / 2 * sum(np.sum(v.astype(np.float64) ** 2) for v in head.values()))
  fn = jax.jit(functools.partial(l2_sp, alpha=alpha, beta=beta))
  assert float(fn(params=params, anchor=anchor, head_params=head)) == pytest.approx(expected, rel=1e-5)
  no_head = alpha / 2 * sum(np.sum((params[k].astype(np.float64) - anchor[k]) ** 2) for k in shapes)
  assert float(l2_sp(params=params, anchor=anchor, alpha=alpha)) == pytest.approx(no_head, rel=1e-5)

  grads = jax.grad(lambda p, a, h: l2_sp(params=p, anchor=a, head_params=h, alpha=alpha, beta=beta),
                   argnums=(0, 1, 2))(params, anchor, head)
  for k in shapes:
    np.testing.assert_allclose(grads[0][k], alpha * (params[k] - anchor[k]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(grads[1][k], 0.0)  # the anchor is a constant
  for k in head:
    np.testing.assert_allclose(grads[2][k], beta * head[k], rtol=1e-5, atol=1e-6)


def test_l2_sp_rejects_mismatched_trees():
  rng = np.random.default_rng(1)
  params = _random_tree(rng, {"a": (2,), "b": (3,)})
  with pytest.raises(ValueError, match="same pytree structure"):
    l2_sp(params=params, anchor={"a": params["a"]})
  with pytest.raises(ValueError, match=r"shape of \['b'\] is \(3,\) in params but \(4,\) in anchor"):
    l2_sp(params=params, anchor={"a": params["a"], "b": np.zeros(4, np.float32)})


# ----------------------------------------------------------------------------- DELTA


def _random_maps(rng, shapes, scale=1.0):
  return {name: (scale * rng.normal(size=shape)).astype(np.float32) for name, shape in shapes.items()}


def _numpy_delta(maps, source, weights=None):
  """TLlib's DELTA term, re-derived in its own layout (tllib/regularization/delta.py).

  ``AttentionBehavioralRegularization``: per layer, the NCHW maps reshaped to
  ``[B, C, H*W]``, ``distance = ||fm_t - fm_s||_2`` over H*W, and
  ``output += 0.5 * sum_{b,c}(C * a_c * distance**2 / (H*W))``.
  ``BehavioralRegularization`` (no attention): ``output += 0.5 * ||fm_t - fm_s||^2``.
  """
  total = 0.0
  for name in maps:
    fm_t = np.transpose(maps[name].astype(np.float64), (0, 3, 1, 2))   # NHWC -> NCHW
    fm_s = np.transpose(source[name].astype(np.float64), (0, 3, 1, 2))
    b, c, h, w = fm_t.shape
    if weights is None:
      total += 0.5 * np.linalg.norm((fm_t - fm_s).ravel()) ** 2
      continue
    distance = np.linalg.norm(fm_t.reshape(b, c, h * w) - fm_s.reshape(b, c, h * w), 2, axis=2)   # [B, C]
    attention = np.asarray(weights[name], np.float64)[None, :]
    total += 0.5 * np.sum(c * attention * distance ** 2 / (h * w))
  return total


def _numpy_delta_before_issue_23(maps, source, weights):
  """The old term: sum_c a_c mean_b ||FM_bc - FM0_bc||^2 (no 1/2, no C/(HW), batch mean)."""
  return sum(np.sum(weights[n] * np.mean(np.sum((maps[n].astype(np.float64) - source[n]) ** 2, axis=(1, 2)),
                                         axis=0)) for n in maps)


def test_delta_matches_tllib_reference_formula_on_several_layers():
  """Ω' equals a NumPy re-derivation of TLlib's term on random maps of 3 layers with different
  C/H/W and batch 3; it is not the pre-issue-23 normalisation (off by 0.5 B C / (HW) per layer)."""
  rng = np.random.default_rng(2)
  shapes = {"early": (3, 8, 6, 4), "mid": (3, 4, 4, 6), "late": (3, 2, 2, 10)}
  maps, source = _random_maps(rng, shapes), _random_maps(rng, shapes)
  weights = {name: rng.dirichlet(np.ones(s[-1])).astype(np.float32) for name, s in shapes.items()}
  head = {"kernel": rng.normal(size=(10, 4)).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)}
  fn = jax.jit(functools.partial(delta, alpha=1.0))
  reference = _numpy_delta(maps, source, weights)
  assert float(fn(feature_maps=maps, source_feature_maps=source, channel_weights=weights)) == pytest.approx(
      reference, rel=1e-5)
  assert reference != pytest.approx(_numpy_delta_before_issue_23(maps, source, weights), rel=0.05)
  for name in shapes:   # per layer too: the old normalisation is off by a different factor per layer
    one = {name: maps[name]}, {name: source[name]}, {name: weights[name]}
    assert float(delta(feature_maps=one[0], source_feature_maps=one[1], channel_weights=one[2],
                       alpha=1.0)) == pytest.approx(_numpy_delta(*one), rel=1e-5)
  # No attention: TLlib's BehavioralRegularization, 1/2 ||FM - FM0||^2 over everything.
  assert float(fn(feature_maps=maps, source_feature_maps=source)) == pytest.approx(
      _numpy_delta(maps, source), rel=1e-5)
  # With the coefficients and the new head's L2: alpha Ω' + beta/2 ||w_head||^2.
  alpha, beta = 0.01, 0.02
  head_sq = sum(np.sum(v.astype(np.float64) ** 2) for v in head.values())
  assert float(delta(feature_maps=maps, source_feature_maps=source, channel_weights=weights,
                     head_params=head, alpha=alpha, beta=beta)) == pytest.approx(
      alpha * reference + beta / 2 * head_sq, rel=1e-5)
  assert float(delta_behavioural(feature_maps=maps, source_feature_maps=source,
                                 channel_weights=weights)) == pytest.approx(reference, rel=1e-5)

  # Gradient: d/dFM = alpha C / (HW) a_c (FM - FM0) (summed over the batch: no 1/B); none into
  # the source maps; beta w into the head.
  grads = jax.grad(lambda m, s, h: delta(feature_maps=m, source_feature_maps=s, channel_weights=weights,
                                         head_params=h, alpha=alpha, beta=beta),
                   argnums=(0, 1, 2))(maps, source, head)
  for name, (_, h, w, c) in shapes.items():
    expected = alpha * c / (h * w) * weights[name] * (maps[name] - source[name])
    np.testing.assert_allclose(grads[0][name], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grads[1][name], 0.0)
  for k in head:
    np.testing.assert_allclose(grads[2][k], beta * head[k], rtol=1e-5, atol=1e-7)


def test_delta_rejects_bad_inputs():
  rng = np.random.default_rng(3)
  maps = _random_maps(rng, {"a": (2, 3, 3, 4)})
  with pytest.raises(ValueError, match="source_feature_maps has"):
    delta(feature_maps=maps, source_feature_maps={"b": maps["a"]})
  with pytest.raises(ValueError, match=r"layer 'a' must be \[B, H, W, C\]"):
    delta(feature_maps=maps, source_feature_maps={"a": maps["a"][:, :2]})
  with pytest.raises(ValueError, match=r"channel_weights\['a'\] must have shape \(4,\)"):
    delta(feature_maps=maps, source_feature_maps=maps, channel_weights={"a": np.ones(3, np.float32)})


def test_filter_ablation_on_a_tiny_function_matches_a_loop():
  # loss(mask) = mean_b CE(W (x_b * mask) + b, y_b): a linear classifier on C "channels".
  rng = np.random.default_rng(4)
  batch, channels, classes = 6, 5, 3
  x = rng.normal(size=(batch, channels)).astype(np.float32)
  w = rng.normal(size=(channels, classes)).astype(np.float32)
  bias = rng.normal(size=classes).astype(np.float32)
  y = rng.integers(0, classes, batch)

  def numpy_loss(mask):
    logits = (x.astype(np.float64) * mask) @ w + bias
    return -np.mean(scipy.special.log_softmax(logits, -1)[np.arange(batch), y])

  def jax_loss(mask):
    log_p = jax.nn.log_softmax((x * mask) @ w + bias, -1)
    return -jnp.mean(log_p[jnp.arange(batch), y])

  expected = np.array([numpy_loss(1.0 - np.eye(channels)[c]) - numpy_loss(np.ones(channels))
                       for c in range(channels)])
  for chunk in (0, 2, 5):  # all at once, ragged chunks, one chunk
    got = jax.jit(lambda: filter_ablation_loss_increase(loss_fn=jax_loss, num_channels=channels,
                                                        chunk_size=chunk))()
    np.testing.assert_allclose(got, expected, atol=1e-5)

  weights = delta_channel_weights(loss_increase=jnp.asarray(expected), temperature=5.0)
  z = (expected - expected.mean()) / expected.std()
  np.testing.assert_allclose(weights, scipy.special.softmax(z / 5.0), rtol=1e-5)
  assert float(jnp.sum(weights)) == pytest.approx(1.0, abs=1e-6)
  raw = delta_channel_weights(loss_increase=jnp.asarray(expected), temperature=1.0, standardize=False)
  np.testing.assert_allclose(raw, scipy.special.softmax(expected), rtol=1e-5)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    delta_channel_weights(loss_increase=jnp.asarray(expected), temperature=0.0)
  with pytest.raises(ValueError, match="chunk_size must be >= 0"):
    filter_ablation_loss_increase(loss_fn=jax_loss, num_channels=channels, chunk_size=-1)


def _init(model, size=32, seed=0):
  # The "rbg" generator: XLA:CPU compiles threefry-based initialisers ~10x slower.
  init = jax.jit(functools.partial(model.init, train=False, outputs=model.all_outputs))
  key = jax.random.key(seed, impl="rbg")
  return jax.tree.map(np.asarray, dict(init(key, jnp.zeros((1, size, size, 3)))))


def _images(n=6, size=32, seed=0, classes=NUM_TARGET):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, classes, n).astype(np.int32)}


@pytest.mark.parametrize("name,last_layer", [("resnet_tiny", "stage2_block0"),
                                             ("efficientnet_tiny", "head_conv")])
def test_channel_ablation_of_the_last_map_matches_numpy_on_pooled_features(name, last_layer):
  # The last feature map is average-pooled into ``features``, so zeroing its channel c
  # zeroes feature c: the ablated loss is re-derived from the features and the head in NumPy.
  model = models.create_model(name, num_classes=NUM_TARGET)
  variables = _init(model)
  batch = _images()
  assert mr.default_delta_layers(model)[-1] == last_layer
  out = model.apply(variables, batch["image"], train=False, outputs=("features", "feature_maps"))
  features = np.asarray(out["features"], np.float64)
  channels = features.shape[1]
  assert out["feature_maps"][last_layer].shape[-1] == channels
  kernel = np.asarray(variables["params"]["head"]["kernel"], np.float64)
  bias = np.asarray(variables["params"]["head"]["bias"], np.float64)

  def numpy_ce(f):
    return -np.mean(scipy.special.log_softmax(f @ kernel + bias, -1)[np.arange(len(f)), batch["label"]])

  expected = []
  for c in range(channels):
    ablated = features.copy()
    ablated[:, c] = 0.0
    expected.append(numpy_ce(ablated) - numpy_ce(features))
  got = jax.jit(lambda v, b: mr.layer_loss_increase(model, v, b, layer=last_layer, num_channels=channels,
                                                    chunk_size=7))(variables, batch)
  np.testing.assert_allclose(got, expected, atol=2e-5)


def test_channel_ablation_of_an_inner_map_matches_a_loop_and_ignores_padding():
  model = models.create_model("resnet_tiny", num_classes=NUM_TARGET)
  variables = _init(model)
  batch = _images(seed=1)
  layer, channels = "stage1_block0", 8
  padded = {"image": np.concatenate([batch["image"], np.zeros((2, 32, 32, 3), np.float32)]),
            "label": np.concatenate([batch["label"], np.zeros(2, np.int32)]),
            "mask": np.array([1.0] * 6 + [0.0] * 2, np.float32)}
  got = mr.layer_loss_increase(model, variables, padded, layer=layer, num_channels=channels)

  def ce(mask):
    logits = mr.apply_with_channel_mask(model, variables, batch["image"], layer=layer, channel_mask=mask)
    return -np.mean(scipy.special.log_softmax(np.asarray(logits, np.float64), -1)[
        np.arange(6), batch["label"]])

  base = ce(jnp.ones(channels))
  expected = [ce(jnp.asarray(1.0 - np.eye(channels)[c])) - base for c in range(channels)]
  np.testing.assert_allclose(got, expected, atol=2e-5)
  # Zeroing a channel really changes the prediction (the mask reaches the forward).
  assert np.abs(expected).max() > 1e-4
  with pytest.raises(ValueError, match="matched 0 modules"):
    mr.apply_with_channel_mask(model, variables, batch["image"], layer="nope", channel_mask=jnp.ones(8))


# ----------------------------------------------------------------------------- BSS


def _numpy_bss(features, k):
  s = np.linalg.svd(np.asarray(features, np.float64), compute_uv=False)
  return np.sum(np.sort(s)[:k] ** 2)


@pytest.mark.parametrize("shape,k", [((8, 16), 1), ((8, 16), 3), ((20, 6), 2)])
def test_bss_matches_numpy_svd(shape, k):
  rng = np.random.default_rng(5)
  features = rng.normal(size=shape).astype(np.float32) + 0.5
  fn = jax.jit(functools.partial(batch_spectral_shrinkage, k=k))
  assert float(fn(features=features)) == pytest.approx(_numpy_bss(features, k), rel=1e-4)
  # Gradient of sum_{i in smallest k} s_i^2 is sum 2 s_i u_i v_i^T (distinct singular values).
  u, s, vt = np.linalg.svd(features.astype(np.float64), full_matrices=False)
  expected = sum(2 * s[i] * np.outer(u[:, i], vt[i]) for i in range(len(s) - k, len(s)))
  grad = jax.grad(lambda f: batch_spectral_shrinkage(features=f, k=k))(features)
  np.testing.assert_allclose(grad, expected, atol=1e-4)


def test_bss_rejects_bad_inputs():
  with pytest.raises(ValueError, match="must be \\[batch, dim\\]"):
    batch_spectral_shrinkage(features=jnp.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="k must be in \\[1, min\\(batch, dim\\)\\) = \\[1, 4\\)"):
    batch_spectral_shrinkage(features=jnp.ones((4, 10)), k=4)
  with pytest.raises(ValueError, match="k must be in"):
    batch_spectral_shrinkage(features=jnp.ones((4, 10)), k=0)


# ----------------------------------------------------------------------------- LwF


def test_lwf_matches_numpy_and_gradient():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(5, 9)).astype(np.float32) * 3
  teacher = rng.normal(size=(5, 9)).astype(np.float32) * 3
  t = 3.0
  q = scipy.special.softmax(teacher.astype(np.float64) / t, -1)
  log_p = scipy.special.log_softmax(logits.astype(np.float64) / t, -1)
  expected = -np.mean(np.sum(q * log_p, -1))
  fn = jax.jit(functools.partial(lwf, temperature=t))
  assert float(fn(logits=logits, teacher_logits=teacher)) == pytest.approx(expected, rel=1e-5)
  scaled = lwf(logits=logits, teacher_logits=teacher, temperature=t, scale_by_temperature_squared=True)
  assert float(scaled) == pytest.approx(t * t * expected, rel=1e-5)
  grads = jax.grad(lambda z, v: lwf(logits=z, teacher_logits=v, temperature=t),
                   argnums=(0, 1))(logits, teacher)
  np.testing.assert_allclose(grads[0], (np.exp(log_p) - q) / (t * len(logits)), atol=1e-6)
  np.testing.assert_array_equal(grads[1], 0.0)
  with pytest.raises(ValueError, match="must both be \\[batch, classes\\]"):
    lwf(logits=logits, teacher_logits=teacher[:, :4])
  with pytest.raises(ValueError, match="temperature must be > 0"):
    lwf(logits=logits, teacher_logits=teacher, temperature=-1.0)


# ----------------------------------------------------------------------------- components in the step


def _train_state(model, variables, components, lr=0.05):
  """``(state, step, mesh, source)`` of the run's setup; ``step(state, batch)`` reads the source."""
  config = default_config()
  rules, groups, _ = resolve_rules(config, methods=components)
  training = setup.init_training(model=model, variables=variables, methods=components, rules=rules,
                                 groups=groups, num_classes=NUM_TARGET, schedule=lambda s: lr,
                                 momentum=0.9, method_rng=jax.random.PRNGKey(0),
                                 state_rng=jax.random.PRNGKey(1))
  step = lambda state, batch: training.train_step(state, batch, training.source)
  return training.state, step, training.mesh, training.source


def test_registry_defaults_are_the_literature_coefficients():
  l2, de, bss, lw = build_methods({"l2_sp": {}, "delta": {}, "bss": {}, "lwf": {}})
  assert (l2.alpha, l2.beta, l2.weight) == (0.01, 0.01, 1.0)
  assert (de.weight, de.alpha, de.beta, de.outputs) == (1.0, 0.01, 0.01, ("feature_maps",))
  assert (bss.weight, bss.k, bss.outputs) == (0.001, 1, ("features",))
  assert (lw.weight, lw.temperature, lw.outputs) == (1.0, 3.0, ("source_logits",))
  with pytest.raises(ValueError, match="bad options"):
    build_methods({"bss": {"rank": 2}})


def test_regularizers_config_runs_delta_with_the_reference_settings():
  """TLlib's DELTA example: trade-offs 0.01 (behavioural) and 0.01 (new head's L2), --wd 0."""
  from experiments.configs import regularizers as reg_config
  from ftjax.train import report
  variants = report.variant_configs(reg_config.get_config("5"))
  delta_row = variants["delta"]
  (_, de) = build_methods(delta_row.losses)
  assert (de.weight, de.alpha, de.beta, de.attention) == (1.0, 0.01, 0.01, True)
  assert delta_row.optimizer.weight_decay == 0.0
  assert variants["finetune"].optimizer.weight_decay > 0   # the baseline keeps its decay


def test_composed_co_tuning_bss_l2_sp_step_reports_each_term():
  model = models.create_model("resnet_tiny", num_classes=NUM_TARGET, keep_source_head=True,
                              num_source_classes=NUM_SOURCE)
  variables = _init(model)
  batch = _images(n=8, seed=2)
  rel = np.random.default_rng(7).dirichlet(np.ones(NUM_SOURCE), size=NUM_TARGET).astype(np.float32)
  components = build_methods({"ce": {"weight": 1.0}, "co_tuning": {"weight": 2.3, "relationship": rel},
                                 "bss": {"weight": 0.001, "k": 1}, "l2_sp": {"alpha": 0.01, "beta": 0.02}})
  assert [type(c) for c in components] == [CrossEntropy, CoTuning, mr.BatchSpectralShrinkage, mr.L2SP]
  state, step, mesh, source = _train_state(model, variables, components)
  state, metrics = step(state, shd.global_batch(batch, mesh))

  out, _ = model.apply(variables, batch["image"], train=True,
                       outputs=("logits", "source_logits", "features"), mutable=["batch_stats"])
  ce = -scipy.special.log_softmax(np.asarray(out["logits"], np.float64), -1)[
      np.arange(8), batch["label"]].mean()
  co = -np.sum(rel[batch["label"]] * scipy.special.log_softmax(
      np.asarray(out["source_logits"], np.float64), -1), -1).mean()
  bss = _numpy_bss(out["features"], 1)
  # At step 0 the parameters are the anchor: only the head's plain L2 remains.
  head = variables["params"]["head"]
  l2 = 0.02 / 2 * sum(np.sum(np.asarray(v, np.float64) ** 2) for v in head.values())
  assert float(metrics["loss/ce"]) == pytest.approx(ce, rel=1e-4)
  assert float(metrics["loss/co_tuning"]) == pytest.approx(co, rel=1e-4)
  assert float(metrics["loss/bss"]) == pytest.approx(bss, rel=1e-3)
  assert float(metrics["loss/l2_sp"]) == pytest.approx(l2, rel=1e-4)
  assert float(metrics["l2_sp/distance_sq"]) == 0.0
  assert float(metrics["loss"]) == pytest.approx(ce + 2.3 * co + 0.001 * bss + l2, rel=1e-4)

  # A second step: the backbone has moved, and the L2-SP term sees the distance.
  state, metrics = step(state, shd.global_batch(batch, mesh))
  params = jax.device_get(state.params)  # after step 2; metrics are of the params before it
  assert float(metrics["l2_sp/distance_sq"]) > 0.0
  assert state.method_state["l2_sp"] == ()  # the anchor is the run's one frozen source
  anchor = jax.device_get(source["params"])
  assert "head" not in anchor and "source_head" in anchor
  for a, v in zip(jax.tree.leaves(anchor), jax.tree.leaves({k: variables["params"][k] for k in anchor})):
    np.testing.assert_array_equal(a, v)
  assert not np.allclose(params["backbone"]["stem_conv"]["kernel"],
                         variables["params"]["backbone"]["stem_conv"]["kernel"])


class _RandomDataset:
  """Just enough of ImageDataset for Delta.prepare: random eval batches of the train split."""
  name = "random"
  num_classes = NUM_TARGET

  def eval_batches(self, split, *, batch_size):
    assert split == "train"
    for i in range(3):
      b = _images(n=batch_size, seed=10 + i)
      mask = np.ones(batch_size, np.float32)
      if i == 2:
        mask[batch_size // 2:] = 0.0
      yield {**b, "mask": mask}


def test_delta_prepare_ranks_channels_on_a_fitted_head():
  model = models.create_model("resnet_tiny", num_classes=NUM_TARGET)
  variables = _init(model, seed=3)
  config = default_config()
  config.batch_size, config.eval_batch_size = 8, 8
  (delta_c,) = build_methods({"delta": {"attention_batches": 2}})
  delta_c = delta_c.prepare(RunContext(dataset=_RandomDataset(), model=model, variables=variables,
                                       batch_size=config.batch_size, eval_batch_size=config.eval_batch_size))
  assert delta_c.model is model and delta_c.layers == ("stage1_block0", "stage2_block0")
  for layer, channels in (("stage1_block0", 8), ("stage2_block0", 16)):
    w = delta_c.channel_weights[layer]
    assert w.shape == (channels,) and np.all(w > 0) and w.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.ptp(w) > 0  # not uniform: the channels were ranked
  state = delta_c.init_state(variables=variables, rng=None)
  for layer in delta_c.layers:
    np.testing.assert_array_equal(state["channel_weights"][layer], delta_c.channel_weights[layer])


def test_delta_and_lwf_train_while_the_source_model_stays_bitwise_frozen():
  model = models.create_model("resnet_tiny", num_classes=NUM_TARGET, keep_source_head=True,
                              num_source_classes=NUM_SOURCE)
  variables = _init(model, seed=3)
  rng = np.random.default_rng(8)
  weights = {"stage1_block0": rng.dirichlet(np.ones(8)).astype(np.float32),
             "stage2_block0": rng.dirichlet(np.ones(16)).astype(np.float32)}
  components = [CrossEntropy()] + build_methods({"delta": {"channel_weights": weights}, "lwf": {}})
  components = [c.prepare(RunContext(model=model, variables=variables)) for c in components]
  delta_c = components[1]
  assert delta_c.layers == ("stage1_block0", "stage2_block0")
  state, step, mesh, source = _train_state(model, variables, components)
  batch = _images(n=8, seed=4)
  state, metrics = step(state, shd.global_batch(batch, mesh))

  # Step-0 terms re-derived: train-mode model vs eval-mode source model on the same images.
  out, _ = model.apply(variables, batch["image"], train=True, outputs=("feature_maps", "source_logits"),
                       mutable=["batch_stats"])
  src = model.apply(variables, batch["image"], train=False, outputs=("feature_maps", "source_logits"))
  maps = {k: np.asarray(out["feature_maps"][k]) for k in delta_c.layers}
  source_maps = {k: np.asarray(src["feature_maps"][k]) for k in delta_c.layers}
  # DELTA: alpha Ω' + beta/2 ||w_head||^2, TLlib's term and coefficients; the new head is the
  # only parameter without a pretrained value (the source head is anchored).
  behavioural = _numpy_delta(maps, source_maps, delta_c.channel_weights)
  head_sq = sum(np.sum(np.asarray(v, np.float64) ** 2) for v in variables["params"]["head"].values())
  assert float(metrics["delta/behavioural"]) == pytest.approx(behavioural, rel=1e-4)
  assert float(metrics["delta/head_l2"]) == pytest.approx(head_sq / 2, rel=1e-5)
  assert float(metrics["loss/delta"]) == pytest.approx(0.01 * behavioural + 0.01 / 2 * head_sq, rel=1e-4)
  q = scipy.special.softmax(np.asarray(src["source_logits"], np.float64) / 3.0, -1)
  log_p = scipy.special.log_softmax(np.asarray(out["source_logits"], np.float64) / 3.0, -1)
  assert float(metrics["loss/lwf"]) == pytest.approx(-np.mean(np.sum(q * log_p, -1)), rel=1e-4)

  for i in range(3):
    state, metrics = step(state, shd.global_batch(_images(n=8, seed=5 + i), mesh))
  assert np.isfinite(float(metrics["loss"]))
  final = jax.device_get(state)
  # The frozen source model: bitwise the initial variables (without the new head), in both terms.
  expected = {"params": {k: v for k, v in variables["params"].items() if k != "head"},
              "batch_stats": variables["batch_stats"]}
  # One copy, outside the train state: no method state holds a model.
  assert final.method_state["lwf"] == () and set(final.method_state["delta"]) == {"channel_weights"}
  held = jax.device_get(source)
  assert jax.tree.structure(held) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(expected)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  # ... while the trained model moved: backbone, source head (LwF's term reaches it) and BN stats.
  for path in (("backbone", "stem_conv", "kernel"), ("source_head", "kernel"), ("head", "kernel")):
    before, after = variables["params"], final.params
    for key in path:
      before, after = before[key], after[key]
    assert not np.allclose(before, after), path
  assert not np.allclose(final.batch_stats["backbone"]["stem_bn"]["mean"],
                         variables["batch_stats"]["backbone"]["stem_bn"]["mean"])
  # The optimizer never saw the source variables: its state mirrors params only.
  assert jax.tree.structure(jax.tree.map(lambda _: 0, final.params)) == jax.tree.structure(
      jax.tree.map(lambda _: 0, variables["params"]))


def test_components_need_prepare_and_a_source_head():
  model = models.create_model("resnet_tiny", num_classes=NUM_TARGET)
  variables = _init(model)
  with pytest.raises(ValueError, match="call its prepare"):
    mr.LwF().init_state(variables=variables, rng=None)
  with pytest.raises(ValueError, match="keep_source_head=True"):
    mr.LwF().prepare(RunContext(model=model, variables=variables))
  with pytest.raises(ValueError, match="call its prepare"):
    mr.Delta().init_state(variables=variables, rng=None)
  with pytest.raises(ValueError, match="has no channel weights"):
    dataclasses.replace(mr.Delta(), model=model).init_state(variables=variables, rng=None)
  with pytest.raises(ValueError, match="unknown feature maps \\['stage9_block0'\\]"):
    mr.Delta(layers=("stage9_block0",), attention=False).prepare(RunContext(model=model, variables=variables))
  state = mr.Delta(attention=False).prepare(RunContext(model=model, variables=variables)).init_state(
      variables=variables, rng=None)
  assert "channel_weights" not in state
  with pytest.raises(ValueError, match="k >= 1"):
    mr.BatchSpectralShrinkage(k=0)
  with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
    mr.L2SP(alpha=-1.0)


@pytest.mark.slow
def test_trainer_with_every_regularizer_checkpoints_a_frozen_source_model(tmp_path, fashion_mnist_ready):
  # The whole trainer (experiments/configs/tiny.py): prepare, init_state, the donated jitted
  # step, Orbax checkpoints of method_state; ~70 s on 2 shared cores.
  from experiments.configs import tiny
  from ftjax.train.checkpoint import load_checkpoint_arrays
  from ftjax.train.loop import train_and_evaluate
  from ftjax.train.setup import build_model

  config = tiny.get_config()
  config.num_steps, config.eval_every_steps = 8, 8
  config.losses = {"ce": {"weight": 1.0}, "delta": {"attention_batches": 1}, "lwf": {},
                   "bss": {}, "l2_sp": {}}
  train_and_evaluate(config, str(tmp_path))
  state = load_checkpoint_arrays(str(tmp_path))["state"]
  # The initial variables, rebuilt as the trainer does (same seed, same split of it).
  init_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)[0]
  _, initial = build_model(config, num_classes=10, keep_source_head=True, rng=init_rng)
  source = {k: v for k, v in initial["params"].items() if k != "head"}
  # The frozen source is never checkpointed: the method states hold no model.
  assert jax.tree.leaves(state["method_state"].get("lwf", ())) == []
  assert jax.tree.leaves(state["method_state"].get("l2_sp", ())) == []
  assert set(state["method_state"]["delta"]) == {"channel_weights"}
  assert not np.allclose(state["params"]["backbone"]["stem_conv"]["kernel"],
                         source["backbone"]["stem_conv"]["kernel"])
  with open(tmp_path / "metrics.jsonl") as f:
    text = f.read()
  for name in ("ce", "delta", "lwf", "bss", "l2_sp"):
    assert f'"loss/{name}"' in text
  assert (tmp_path / "delta_channel_weights.npz").exists()

"""Co-Tuning category relationship: calibration, direct, reverse, cache, plot.

References are independent float64 re-derivations: NumPy for the formulas and
SciPy optimisers for the argmins (scipy is a test-only dependency).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from ftjax.methods.co_tuning import relationship as R
from ftjax.data import stratified_split


def _softmax(z):
  return scipy.special.softmax(np.asarray(z, np.float64), axis=-1)


def _nll_at_temperature(t, logits, labels):
  log_p = scipy.special.log_softmax(np.asarray(logits, np.float64) / t, axis=-1)
  return -np.mean(log_p[np.arange(len(labels)), labels])


def _scipy_temperature(logits, labels):
  res = scipy.optimize.minimize_scalar(lambda log_t: _nll_at_temperature(np.exp(log_t), logits, labels),
                                       bounds=(np.log(1e-2), np.log(1e2)), method="bounded",
                                       options={"xatol": 1e-10})
  return float(np.exp(res.x))


def _synthetic(num_examples=240, num_source=12, num_target=4, seed=0):
  """Noisy (non-separable) source probabilities whose mode depends on the target class."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_target), num_examples // num_target)
  centers = rng.normal(size=(num_target, num_source)) * 1.5
  logits = centers[labels] + rng.normal(size=(len(labels), num_source)) * 2.0
  return _softmax(logits).astype(np.float32), labels.astype(np.int32)


def _scipy_softmax_regression(x, y, num_classes, l2):
  x = np.asarray(x, np.float64)
  one_hot = np.eye(num_classes)[y]

  def f(w):
    w = w.reshape(num_classes, x.shape[1])
    log_p = scipy.special.log_softmax(x @ w.T, axis=-1)
    value = -np.mean(np.sum(one_hot * log_p, -1)) + 0.5 * l2 * np.sum(w * w)
    grad = (np.exp(log_p) - one_hot).T @ x / len(y) + l2 * w
    return value, grad.ravel()

  res = scipy.optimize.minimize(f, np.zeros(num_classes * x.shape[1]), jac=True, method="L-BFGS-B",
                                options={"maxiter": 20000, "gtol": 1e-12, "ftol": 1e-16})
  return res.x.reshape(num_classes, x.shape[1]), res.fun


# ----------------------------------------------------------------------------- Alg. 2


def test_calibration_recovers_known_temperature():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(20000, 10)).astype(np.float32) * 3.0
  probs = _softmax(logits / 2.5)
  labels = (probs.cumsum(-1) > rng.uniform(size=(len(probs), 1))).argmax(-1)
  t = float(R.calibrate_temperature(logits=jnp.asarray(logits), labels=jnp.asarray(labels)))
  assert abs(t - 2.5) / 2.5 < 0.03
  # Same data: our bisection reaches SciPy's float64 argmin of the same NLL.
  assert t == pytest.approx(_scipy_temperature(logits, labels), rel=1e-4)


def test_calibration_jit_and_bounds():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(500, 6)).astype(np.float32)
  labels = rng.integers(0, 6, 500)
  eager = R.calibrate_temperature(logits=logits, labels=labels)
  jitted = jax.jit(lambda z, y: R.calibrate_temperature(logits=z, labels=y))(logits, labels)
  assert float(eager) == pytest.approx(float(jitted), rel=1e-6)
  # Labels always equal to the argmax: NLL falls as t -> 0, so the lower bound comes back.
  t = R.calibrate_temperature(logits=logits, labels=logits.argmax(-1), t_min=0.05)
  assert float(t) == pytest.approx(0.05, rel=1e-4)
  with pytest.raises(ValueError, match="t_min"):
    R.calibrate_temperature(logits=logits, labels=labels, t_min=0.0)
  with pytest.raises(ValueError, match="labels must be"):
    R.calibrate_temperature(logits=logits, labels=labels[:3])


# ----------------------------------------------------------------------------- Eq. 3


def test_direct_relationship_matches_numpy():
  probs, labels = _synthetic(num_examples=90, num_source=7, num_target=3, seed=3)
  rel = np.asarray(R.direct_relationship(probs=probs, labels=labels, num_classes=3))
  expected = np.stack([np.asarray(probs, np.float64)[labels == c].mean(0) for c in range(3)])
  np.testing.assert_allclose(rel, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(rel.sum(1), 1.0, atol=1e-6)
  jitted = jax.jit(functools.partial(R.direct_relationship, num_classes=3))
  np.testing.assert_allclose(jitted(probs=probs, labels=labels), rel, rtol=1e-6)


def test_direct_relationship_missing_class_is_an_error():
  probs, labels = _synthetic(num_examples=60, num_source=5, num_target=3)
  with pytest.raises(ValueError, match=r"target classes \[3\] have no examples"):
    R.direct_relationship(probs=probs, labels=labels, num_classes=4)


# ----------------------------------------------------------------------------- Alg. 1


def test_softmax_regression_reaches_scipy_optimum():
  probs, labels = _synthetic(seed=4)
  for l2 in (1e-2, 1e-4):
    fit = R.fit_softmax_regression(features=probs, labels=labels, num_classes=4, l2=l2)
    w_ref, f_ref = _scipy_softmax_regression(probs, labels, 4, l2)
    assert float(fit.objective) == pytest.approx(f_ref, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(np.asarray(fit.weights), w_ref, atol=2e-3 * max(1.0, np.abs(w_ref).max()))


def test_bayes_step_matches_numpy():
  rng = np.random.default_rng(5)
  weights = rng.normal(size=(4, 9)) * 3
  prior = rng.dirichlet(np.ones(9))
  t_g = 1.7
  rel = np.asarray(R.bayes_relationship(weights=jnp.asarray(weights, jnp.float32), temperature=t_g,
                                        source_prior=jnp.asarray(prior, jnp.float32)))
  # p(y_t=j | y_s=i) = softmax_j(W[j, i] / t); p(y_s=i | y_t=j) = p(i) p(j|i) / sum_i' p(i') p(j|i').
  p_t_given_s = np.exp(weights.T / t_g) / np.exp(weights.T / t_g).sum(1, keepdims=True)
  joint = prior[:, None] * p_t_given_s
  expected = (joint / joint.sum(0, keepdims=True)).T
  np.testing.assert_allclose(rel, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(rel.sum(1), 1.0, atol=1e-6)
  jitted = jax.jit(lambda w, t, p: R.bayes_relationship(weights=w, temperature=t, source_prior=p))
  np.testing.assert_allclose(jitted(weights.astype(np.float32), t_g, prior.astype(np.float32)), rel,
                             rtol=1e-5)


def test_reverse_relationship_matches_numpy_rederivation():
  probs, labels = _synthetic(seed=6)
  grid = (1e-1, 1e-3)
  result = R.reverse_relationship(source_probs=probs, labels=labels, num_classes=4, seed=11,
                                  l2_grid=grid)
  # Re-derive every step of Alg. 1 in float64.
  train, val = stratified_split(labels, 0.2, 11)
  scores = []
  for l2 in grid:
    w, _ = _scipy_softmax_regression(probs[train], labels[train], 4, l2)
    logits = np.asarray(probs[val], np.float64) @ w.T
    scores.append(((logits.argmax(-1) == labels[val]).mean(),
                   -_nll_at_temperature(1.0, logits, labels[val]), l2, w))
  accuracy, _, l2, w = max(scores, key=lambda s: (s[0], s[1]))
  t_g = _scipy_temperature(np.asarray(probs[val], np.float64) @ w.T, labels[val])
  w_all, _ = _scipy_softmax_regression(probs, labels, 4, l2)
  p_t_given_s = _softmax(w_all.T / t_g)
  joint = np.asarray(probs, np.float64).mean(0)[:, None] * p_t_given_s
  expected = (joint / joint.sum(0, keepdims=True)).T

  assert result.l2 == l2 and result.val_accuracy == pytest.approx(accuracy)
  assert 0.05 < t_g < 50  # an interior optimum: the check below is not a clamped bound
  assert result.temperature_g == pytest.approx(t_g, rel=2e-3)
  np.testing.assert_allclose(result.weights, w_all, atol=2e-3 * np.abs(w_all).max())
  np.testing.assert_allclose(result.relationship, expected, atol=2e-4)
  np.testing.assert_allclose(result.relationship.sum(1), 1.0, atol=1e-5)
  # The relationship is informative: each target row puts most mass on its own
  # class's typical source classes (the argmax of its center).
  direct = np.asarray(R.direct_relationship(probs=probs, labels=labels, num_classes=4))
  assert (result.relationship.argmax(1) == direct.argmax(1)).all()


def test_reverse_relationship_without_calibration_uses_unit_temperature():
  probs, labels = _synthetic(seed=7)
  result = R.reverse_relationship(source_probs=probs, labels=labels, num_classes=4, seed=0,
                                  l2_grid=(1e-2,), calibrate_g=False, refit=False)
  assert result.temperature_g == 1.0
  prior = np.asarray(probs, np.float64).mean(0)
  joint = prior[:, None] * _softmax(result.weights.T.astype(np.float64))
  np.testing.assert_allclose(result.relationship, (joint / joint.sum(0)).T, atol=1e-5)


def test_reverse_relationship_errors():
  probs, labels = _synthetic(num_examples=60, num_source=5, num_target=3)
  with pytest.raises(ValueError, match="l2_grid"):
    R.reverse_relationship(source_probs=probs, labels=labels, num_classes=3, seed=0, l2_grid=())
  with pytest.raises(ValueError, match="have no examples"):
    R.reverse_relationship(source_probs=probs, labels=labels, num_classes=5, seed=0)
  with pytest.raises(ValueError, match="secondary val split is empty"):
    R.reverse_relationship(source_probs=probs[:3], labels=np.arange(3), num_classes=3, seed=0)


# ----------------------------------------------------------------------------- cache


BASE_KEY = dict(pretrained_name="efficientnet_lite0/imagenet", weights_sha256="ab", dataset="cub",
                num_classes=200, image_size=224, resize_size=256, train_examples_sha256="cd",
                process_count=1, seed=0, approach="reverse", source_calibration={"mode": "none"},
                calibrate_g=True, val_fraction=0.2, l2_grid=[0.1])
CHANGES = dict(pretrained_name="resnet50/imagenet", weights_sha256="ef", dataset="cars",
               num_classes=196, image_size=448, resize_size=512, train_examples_sha256="12",
               process_count=2, seed=1, approach="direct",
               source_calibration={"mode": "value", "temperature": 1.3}, calibrate_g=False,
               val_fraction=0.3, l2_grid=[0.1, 0.01])


def test_cache_key_changes_with_every_input(monkeypatch):
  digest, _ = R.relationship_cache_key(**BASE_KEY)
  assert R.relationship_cache_key(**dict(BASE_KEY))[0] == digest
  for field, value in CHANGES.items():
    assert R.relationship_cache_key(**{**BASE_KEY, field: value})[0] != digest, field
  monkeypatch.setattr(R, "RELATIONSHIP_VERSION", R.RELATIONSHIP_VERSION + 1)
  assert R.relationship_cache_key(**BASE_KEY)[0] != digest


def test_source_calibration_key_names_the_mode_and_its_data():
  none = R.source_calibration_key(source_temperature=None)
  value = R.source_calibration_key(source_temperature=R.OFFICIAL_RESNET50_TEMPERATURE)
  assert none == {"mode": "none"} and value == {"mode": "value", "temperature": 1 / 0.8840456604957581}
  data = _ArrayDataset("imagenet_like", np.zeros((4, 8, 8, 3), np.float32), np.array([0, 1, 2, 3]),
                       num_classes=7, split="test", tfds_split="validation")
  split = R.source_calibration_key(source_temperature=None, data=data)
  assert split["mode"] == "split" and (split["dataset"], split["split"]) == ("imagenet_like", "validation")
  other = _ArrayDataset("imagenet_like", np.zeros((4, 8, 8, 3), np.float32), np.array([0, 1, 2, 4]),
                        num_classes=7, split="test", tfds_split="validation")
  keys = [R.relationship_cache_key(**{**BASE_KEY, "source_calibration": k})[0]
          for k in (none, value, split, R.source_calibration_key(source_temperature=None, data=other))]
  assert len(set(keys)) == 4


def test_variables_fingerprint_ignores_only_the_target_head():
  variables = {"params": {"head": {"kernel": np.ones((3, 2))}, "source_head": {"bias": np.zeros(4)}},
               "batch_stats": {"bn": {"mean": np.zeros(3)}}}
  base = R.variables_fingerprint(variables)
  other_head = jax.tree.map(lambda x: x, variables)
  other_head["params"]["head"]["kernel"] = np.zeros((3, 2))
  assert R.variables_fingerprint(other_head) == base
  changed = jax.tree.map(lambda x: x, variables)
  changed["batch_stats"]["bn"]["mean"] = np.full(3, 1e-6)
  assert R.variables_fingerprint(changed) != base


def test_stale_or_torn_cache_is_not_reused(tmp_path):
  digest, key = R.relationship_cache_key(**BASE_KEY)
  path, sidecar = R.cache_paths(tmp_path, dataset_name="cub", approach="reverse", digest=digest)
  assert digest[:20] in os.path.basename(path)
  rel = np.full((2, 4), 0.25, np.float32)
  R.save_cached(path, sidecar, rel, key)
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic: no temp files left
  np.testing.assert_array_equal(R.load_cached(path, sidecar, key), rel)
  _, other_key = R.relationship_cache_key(**{**BASE_KEY, "seed": 5})
  assert R.load_cached(path, sidecar, other_key) is None   # same file, different key
  np.save(path, np.full((2, 4), 0.5, np.float32))          # array replaced behind the sidecar
  assert R.load_cached(path, sidecar, key) is None
  os.remove(sidecar)
  assert R.load_cached(path, sidecar, key) is None
  with open(sidecar, "w") as f:
    json.dump({"key": key}, f)
  assert R.load_cached(path, sidecar, key) is None         # no array hash in the sidecar


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(fashion_mnist_ready):
  from ftjax import data, models
  dataset = data.load_dataset("fashion_mnist", sampling_rate=0.5, seed=0, image_size=32)
  model = models.create_model("efficientnet_tiny", num_classes=dataset.num_classes,
                              keep_source_head=True, num_source_classes=7)
  init = jax.jit(functools.partial(model.init, train=False, outputs=model.all_outputs))
  variables = init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  return dataset, model, jax.tree.map(np.asarray, dict(variables))


def test_compute_relationship_end_to_end_and_cache(tiny_run, tmp_path, monkeypatch):
  dataset, model, variables = tiny_run
  kwargs = dict(pretrained_name="tiny/random", dataset=dataset, cache_dir=tmp_path, seed=0,
                batch_size=64, model=model, variables=variables, progress=False)
  rel = R.compute_relationship(approach="direct", source_temperature=2.0, **kwargs)
  # Reference: the same forward, softmax(logits / 2), per-class mean in NumPy.
  batches = list(dataset.eval_batches("train", batch_size=64))
  images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False, outputs=("source_logits",)))
  logits = np.asarray(forward(variables, images)["source_logits"], np.float64)
  assert len(labels) == dataset.num_examples["train"]
  probs = _softmax(logits / 2.0)
  expected = np.stack([probs[labels == c].mean(0) for c in range(dataset.num_classes)])
  assert rel.shape == (10, 7)
  np.testing.assert_allclose(rel, expected, atol=1e-5)

  # Second call: served from the cache without running the model.
  def no_forward(*a, **k):
    raise AssertionError("the model ran although a valid cache exists")
  monkeypatch.setattr(R, "source_logits_over", no_forward)
  np.testing.assert_array_equal(
      R.compute_relationship(approach="direct", source_temperature=2.0, **kwargs), rel)
  # Any changed input misses the cache.
  with pytest.raises(AssertionError, match="the model ran"):
    R.compute_relationship(approach="direct", source_temperature=1.0, **kwargs)
  with pytest.raises(AssertionError, match="the model ran"):
    R.compute_relationship(approach="direct", source_temperature=None, **kwargs)
  changed = jax.tree.map(lambda x: x, variables)
  changed["params"]["source_head"]["bias"] = variables["params"]["source_head"]["bias"] + 1e-3
  with pytest.raises(AssertionError, match="the model ran"):
    R.compute_relationship(approach="direct", source_temperature=2.0,
                           **{**kwargs, "variables": changed})
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".npy")]) == 1


@pytest.mark.slow
def test_compute_relationship_reverse_rows_sum_to_one(tiny_run, tmp_path):
  dataset, model, variables = tiny_run
  rel = R.compute_relationship(pretrained_name="tiny/random", dataset=dataset, approach="reverse",
                               cache_dir=tmp_path, seed=0, model=model, variables=variables,
                               l2_grid=(1e-2, 1e-4), progress=False)
  assert rel.shape == (10, 7) and rel.dtype == np.float32
  np.testing.assert_allclose(rel.sum(1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="unknown approach 'both'"):
    R.compute_relationship(pretrained_name="tiny/random", dataset=dataset, approach="both",
                           cache_dir=tmp_path, model=model, variables=variables)


# ----------------------------------------------------------------------------- the two calibrations


class _ArrayDataset:
  """Just enough of ImageDataset for compute_relationship: in-memory images of one split."""
  image_size, resize_size = 32, 36

  def __init__(self, name, images, labels, *, num_classes, split="train", tfds_split="train"):
    self.name, self.num_classes = name, num_classes
    self._images, self._labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
    self._split_name, self._tfds_split = split, tfds_split

  def _check(self, split):
    assert split == self._split_name, split

  def labels(self, split):
    self._check(split)
    return self._labels

  def example_indices(self, split):
    self._check(split)
    return np.arange(len(self._labels))

  def tfds_split(self, split):
    self._check(split)
    return self._tfds_split

  def eval_batches(self, split, *, batch_size):
    self._check(split)
    for i in range(0, len(self._labels), batch_size):
      n = len(self._labels[i:i + batch_size])
      yield {"image": self._images[i:i + batch_size], "label": self._labels[i:i + batch_size],
             "mask": np.ones(n, np.float32)}


@pytest.fixture(scope="module")
def tiny_source():
  """A random 7-way 'source' model (its head scaled to logits of unit spread), a 4-class target
  train split, and a held-out source split whose labels follow the model's own logits at
  temperature 0.5 (so Alg. 2 has an interior optimum far from t = 1)."""
  from ftjax import models
  model = models.create_model("resnet_tiny", num_classes=4, keep_source_head=True, num_source_classes=7)
  init = jax.jit(functools.partial(model.init, train=False, outputs=model.all_outputs))
  variables = jax.tree.map(np.asarray, dict(init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))))
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False, outputs=("source_logits",))["source_logits"])
  rng = np.random.default_rng(11)
  images = rng.uniform(0, 255, (256, 32, 32, 3)).astype(np.float32)
  scale = 1.0 / float(np.std(np.asarray(forward(variables, images[:64]))))
  head = variables["params"]["source_head"]
  variables["params"]["source_head"] = {"kernel": head["kernel"] * scale, "bias": head["bias"] * scale}
  logits = np.asarray(forward(variables, images), np.float64)
  source_logits, target_logits = logits[:192], logits[192:232]
  probs = _softmax(source_logits / 0.5)
  source_labels = (probs.cumsum(-1) > rng.uniform(size=(len(probs), 1))).argmax(-1)
  source = _ArrayDataset("source_like", images[:192], source_labels, num_classes=7, split="test",
                         tfds_split="validation")
  target = _ArrayDataset("target_like", images[192:232], np.arange(40) % 4, num_classes=4)
  return model, variables, source, source_logits, target, target_logits


def test_source_temperature_is_calibrated_on_a_held_out_source_split(tiny_source, tmp_path, monkeypatch):
  """Alg. 2 on the source model with source data: t* of the held-out split's logits scales the
  source probabilities (before issue 23 the source model always ran at t = 1 without data)."""
  model, variables, source, source_logits, target, target_logits = tiny_source
  kwargs = dict(pretrained_name="tiny/random", dataset=target, cache_dir=tmp_path, model=model,
                variables=variables, progress=False, approach="direct")
  t_ref = _scipy_temperature(source_logits, source.labels("test"))
  assert 0.05 < t_ref < 50 and abs(np.log(t_ref)) > 0.3   # interior, and far from t = 1
  rel, info = R.compute_relationship(source_calibration_data=source, return_info=True, **kwargs)
  assert info["source_calibration"] == "split" and info["source_calibration_data"] == "source_like:validation"
  assert info["source_temperature"] == pytest.approx(t_ref, rel=1e-3) and info["cached"] is False
  probs = _softmax(target_logits / t_ref)
  expected = np.stack([probs[target.labels("train") == c].mean(0) for c in range(4)])
  np.testing.assert_allclose(rel, expected, atol=1e-5)
  uncalibrated = _softmax(target_logits)
  assert np.abs(expected - np.stack([uncalibrated[target.labels("train") == c].mean(0)
                                     for c in range(4)])).max() > 1e-3
  assert R.calibrate_source(model=model, variables=variables, data=source,
                            progress=False) == pytest.approx(t_ref, rel=1e-3)

  # Cached with what ran; another source split is another key.
  def no_forward(*a, **k):
    raise AssertionError("the model ran although a valid cache exists")
  monkeypatch.setattr(R, "source_logits_over", no_forward)
  again, info = R.compute_relationship(source_calibration_data=source, return_info=True, **kwargs)
  np.testing.assert_array_equal(again, rel)
  assert info["cached"] is True and info["source_temperature"] == pytest.approx(t_ref, rel=1e-3)
  other = _ArrayDataset("source_like", source._images[:96], source._labels[:96], num_classes=7,
                        split="test", tfds_split="validation")
  with pytest.raises(AssertionError, match="the model ran"):
    R.compute_relationship(source_calibration_data=other, **kwargs)


def test_source_calibration_errors(tiny_source, tmp_path):
  model, variables, source, _, target, _ = tiny_source
  kwargs = dict(pretrained_name="tiny/random", dataset=target, cache_dir=tmp_path, model=model,
                variables=variables, progress=False, approach="direct")
  wrong = _ArrayDataset("other_task", source._images[:8], source._labels[:8] % 5, num_classes=5,
                        split="test")
  with pytest.raises(ValueError, match="has 5 classes but the source head has 7"):
    R.compute_relationship(source_calibration_data=wrong, **kwargs)
  with pytest.raises(ValueError, match="either source_temperature or source_calibration_data"):
    R.compute_relationship(source_calibration_data=source, source_temperature=1.1, **kwargs)


def test_source_temperature_and_g_calibration_are_separate(tiny_source, tmp_path):
  """A given source temperature applies with g's calibration off, and vice versa (before issue 23
  one ``calibrate`` flag set both, and calibrate=False dropped the source temperature too)."""
  model, variables, _, _, target, target_logits = tiny_source
  kwargs = dict(pretrained_name="tiny/random", dataset=target, cache_dir=tmp_path, model=model,
                variables=variables, progress=False, approach="reverse", l2_grid=(1e-2,), seed=0)
  labels = target.labels("train")
  for t, calibrate_g in ((R.OFFICIAL_RESNET50_TEMPERATURE, False), (None, True), (None, False)):
    rel, info = R.compute_relationship(source_temperature=t, calibrate_g=calibrate_g, return_info=True,
                                       **kwargs)
    expected = R.reverse_relationship(source_probs=jnp.asarray(_softmax(target_logits / (t or 1.0)), jnp.float32),
                                      labels=labels, num_classes=4, seed=0, l2_grid=(1e-2,),
                                      calibrate_g=calibrate_g)
    np.testing.assert_allclose(rel, expected.relationship, atol=1e-5)
    assert info["source_calibration"] == ("none" if t is None else "value")
    assert info["source_temperature"] == (t or 1.0) and info["calibrate_g"] is calibrate_g
    assert info["temperature_g"] == pytest.approx(expected.temperature_g)
    assert (info["temperature_g"] == 1.0) is (not calibrate_g)
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".npy")]) == 3


# ----------------------------------------------------------------------------- Fig. 1


def test_plot_relationship_writes_png(tmp_path):
  import matplotlib.image
  rng = np.random.default_rng(8)
  rel = rng.dirichlet(np.ones(30), size=3)
  path = R.plot_relationship(rel, target_names=["a", "b", "c"],
                             source_names=[f"s{i}" for i in range(30)], path=tmp_path / "fig1.png")
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
  with pytest.raises(ValueError, match="does not match"):
    R.plot_relationship(rel, target_names=["a"], source_names=["s"], path=tmp_path / "x.png")

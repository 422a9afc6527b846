"""Pre-training data reuse: Eq. 6 / Eq. 7 losses, feature extraction, class subsets and reuse training."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.losses import pseudo_label_loss, reuse_loss


def _log_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _numpy_ce(logits, labels):
  return -_log_softmax(logits)[np.arange(len(labels)), labels].mean()


def _random_reuse_problem(seed=0, n=6, m=5, c_target=4, c_pool=7):
  rng = np.random.default_rng(seed)
  return dict(target_logits=(3 * rng.normal(size=(n, c_target))).astype(np.float32),
              target_labels=rng.integers(0, c_target, n).astype(np.int32),
              pool_logits=(3 * rng.normal(size=(m, c_pool))).astype(np.float32),
              pool_labels=rng.integers(0, c_pool, m).astype(np.int32))


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("weight", [1.0, 0.3, 0.0])
def test_reuse_loss_matches_numpy_eq6(weight):
  problem = _random_reuse_problem(seed=int(weight * 10))
  expected_target = _numpy_ce(problem["target_logits"], problem["target_labels"])
  expected_pool = _numpy_ce(problem["pool_logits"], problem["pool_labels"])
  out = jax.jit(reuse_loss)(**problem, weight=weight)
  np.testing.assert_allclose(out.target_ce, expected_target, rtol=1e-5)
  np.testing.assert_allclose(out.pool_ce, expected_pool, rtol=1e-5)
  np.testing.assert_allclose(out.total, expected_target + weight * expected_pool, rtol=1e-5)


def test_reuse_loss_gradients_only_reach_their_own_head():
  problem = _random_reuse_problem(seed=3)
  weight = 0.3
  grads = jax.grad(lambda t, p: reuse_loss(**{**problem, "target_logits": t, "pool_logits": p},
                                           weight=weight).total, argnums=(0, 1))(
      problem["target_logits"], problem["pool_logits"])
  def softmax(z):
    return np.exp(_log_softmax(z))
  one_hot_t = np.eye(4)[problem["target_labels"]]
  one_hot_p = np.eye(7)[problem["pool_labels"]]
  np.testing.assert_allclose(grads[0], (softmax(problem["target_logits"]) - one_hot_t) / 6, atol=1e-6)
  np.testing.assert_allclose(grads[1], weight * (softmax(problem["pool_logits"]) - one_hot_p) / 5, atol=1e-6)


def test_reuse_loss_rejects_bad_input():
  problem = _random_reuse_problem()
  with pytest.raises(ValueError, match="pool_labels out of range"):
    reuse_loss(**{**problem, "pool_labels": np.array([0, 1, 2, 3, 7], np.int32)}, weight=1.0)
  with pytest.raises(ValueError, match="target_labels out of range"):
    reuse_loss(**{**problem, "target_labels": -np.ones(6, np.int32)}, weight=1.0)
  with pytest.raises(ValueError, match=r"target_labels must be \[batch\]"):
    reuse_loss(**{**problem, "target_labels": problem["target_labels"][:3]}, weight=1.0)
  with pytest.raises(ValueError, match="pool_logits must be"):
    reuse_loss(**{**problem, "pool_logits": problem["pool_logits"][0]}, weight=1.0)
  with pytest.raises(ValueError, match="must be integers"):
    reuse_loss(**{**problem, "pool_labels": problem["pool_labels"].astype(np.float32)}, weight=1.0)


def _numpy_pseudo_label(strong, weak):
  soft = np.exp(_log_softmax(weak))
  return -(soft * _log_softmax(strong)).sum(-1).mean()


def test_pseudo_label_loss_matches_numpy_eq7_and_vmaps():
  rng = np.random.default_rng(5)
  strong = (2 * rng.normal(size=(3, 8, 6))).astype(np.float32)
  weak = (2 * rng.normal(size=(3, 8, 6))).astype(np.float32)
  jitted = jax.jit(pseudo_label_loss)
  np.testing.assert_allclose(jitted(strong_logits=strong[0], weak_logits=weak[0]),
                             _numpy_pseudo_label(strong[0], weak[0]), rtol=1e-5)
  per_problem = jax.vmap(lambda s, w: pseudo_label_loss(strong_logits=s, weak_logits=w))(strong, weak)
  np.testing.assert_allclose(per_problem, [_numpy_pseudo_label(s, w) for s, w in zip(strong, weak)],
                             rtol=1e-5)


def test_pseudo_label_loss_gradients():
  rng = np.random.default_rng(6)
  strong = rng.normal(size=(5, 4)).astype(np.float32)
  weak = rng.normal(size=(5, 4)).astype(np.float32)
  loss = jax.jit(lambda s, w: pseudo_label_loss(strong_logits=s, weak_logits=w))
  grad_strong, grad_weak = jax.grad(loss, argnums=(0, 1))(strong, weak)
  assert np.all(np.asarray(grad_weak) == 0.0)  # the pseudo-label is a constant (stop_gradient)
  expected = (np.exp(_log_softmax(strong)) - np.exp(_log_softmax(weak))) / 5
  np.testing.assert_allclose(grad_strong, expected, atol=1e-6)
  # Same logits for both views: the pseudo-label is the prediction itself, gradient zero.
  np.testing.assert_allclose(jax.grad(loss)(weak, weak), 0.0, atol=1e-7)


def test_pseudo_label_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match="weak_logits shape"):
    pseudo_label_loss(strong_logits=jnp.zeros((4, 3)), weak_logits=jnp.zeros((4, 5)))
  with pytest.raises(ValueError, match="strong_logits must be"):
    pseudo_label_loss(strong_logits=jnp.zeros((4,)), weak_logits=jnp.zeros((4,)))


# ----------------------------------------------------------------------------- feature extraction


@functools.lru_cache(maxsize=1)
def _tiny_model_and_variables():
  from ftjax import models
  model = models.create_model("resnet_tiny", num_classes=3)
  # Jitted init with the "rbg" generator: un-jitted initialisers compile slowly on CPU.
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False,
                                             outputs=model.all_outputs))(jax.random.key(0, impl="rbg"))
  return model, variables


def _image_batches(num_batches=3, batch=4, seed=0, calls=None):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 255, size=(num_batches, batch, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(num_batches, batch)).astype(np.int32)
  def gen():
    for i in range(num_batches):
      if calls is not None:
        calls.append(i)
      yield {"image": images[i], "label": labels[i], "mask": np.ones([batch], np.float32)}
  return images, labels, gen()


def test_extract_features_matches_the_model_and_drops_padding():
  from ftjax.selection import extract_features
  model, variables = _tiny_model_and_variables()
  images, labels, _ = _image_batches()
  batches = [{"image": images[i], "label": labels[i],
              "mask": np.array([1, 1, 1, 0] if i == 2 else [1, 1, 1, 1], np.float32)} for i in range(3)]
  feats, got_labels = extract_features(model=model, variables=variables, batches=batches, total=3,
                                       progress=False)
  direct = model.apply(variables, images.reshape(-1, 32, 32, 3), train=False, outputs=("features",))
  expected = np.asarray(direct["features"])[:11]
  assert feats.dtype == np.float32 and feats.shape == (11, 16)
  np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got_labels, labels.reshape(-1)[:11])


def test_extract_features_cache_reused_only_for_the_same_key(tmp_path):
  from ftjax.selection import extract_features
  model, variables = _tiny_model_and_variables()
  path = str(tmp_path / "feats.npz")
  calls = []
  _, _, gen = _image_batches(calls=calls)
  first = extract_features(model=model, variables=variables, batches=gen, cache_path=path,
                           cache_key="key-a", progress=True, total=3)
  assert calls == [0, 1, 2] and (tmp_path / "feats.npz").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
  calls.clear()
  _, _, gen = _image_batches(calls=calls)
  cached = extract_features(model=model, variables=variables, batches=gen, cache_path=path,
                            cache_key="key-a", progress=False)
  assert calls == []  # nothing recomputed
  np.testing.assert_array_equal(cached[0], first[0])
  np.testing.assert_array_equal(cached[1], first[1])
  # Another key (e.g. other weights or another dataset): recomputed from the new batches.
  _, _, gen = _image_batches(seed=1, calls=calls)
  other = extract_features(model=model, variables=variables, batches=gen, cache_path=path,
                           cache_key="key-b", progress=False)
  assert calls == [0, 1, 2]
  assert not np.allclose(other[0], first[0])
  with pytest.raises(ValueError, match="cache_key"):
    extract_features(model=model, variables=variables, batches=[], cache_path=path)


class _PixelMeanModel:
  """A stand-in model whose ``features`` are per-image channel means times a scale."""

  def apply(self, variables, images, *, train, outputs):
    del train
    assert outputs == ("features",)
    return {"features": images.mean(axis=(1, 2)) * variables["scale"]}


def test_extract_features_rejects_nan_features():
  from ftjax.selection import extract_features
  images = np.ones((2, 4, 32, 32, 3), np.float32)
  images[1, 2, 0, 0, 1] = np.nan  # one broken input image: row 6
  batches = [{"image": images[i], "label": np.zeros(4, np.int32)} for i in range(2)]
  with pytest.raises(ValueError, match=r"1 of 8 feature rows contain NaN/inf \(first: row 6\)"):
    extract_features(model=_PixelMeanModel(), variables={"scale": 1.0}, batches=batches, progress=False)
  feats, _ = extract_features(model=_PixelMeanModel(), variables={"scale": 2.0}, batches=batches[:1],
                              progress=False)
  np.testing.assert_allclose(feats, 2.0)
  with pytest.raises(ValueError, match="no examples"):
    extract_features(model=_PixelMeanModel(), variables={"scale": 1.0}, batches=[], progress=False)


# ----------------------------------------------------------------------------- class subsets


def _idx_labels_and_images(kind):
  """Independent IDX reader (big-endian header, uint8 body) of the Fashion-MNIST source files."""
  import gzip

  from ftjax.data import offline
  files = offline.fashion_mnist_source_files()
  out = []
  for key in (f"{kind}_labels", f"{kind}_data"):
    with gzip.open(files[key], "rb") as f:
      raw = f.read()
    ndim = int.from_bytes(raw[:4], "big") & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    out.append(np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims))
  return out


def test_class_subset_relabels_every_split(fashion_mnist_ready):
  from ftjax import data
  classes = [7, 2, 9]
  full = data.load_dataset("fashion_mnist", sampling_rate=2, seed=3, image_size=28, resize_size=28)
  sub = data.load_dataset("fashion_mnist", sampling_rate=2, seed=3, image_size=28, resize_size=28,
                          classes=classes)
  assert sub.num_classes == 3
  assert sub.class_names == [full.class_names[c] for c in classes] == ["Sneaker", "Pullover", "Ankle boot"]
  relabel = {c: i for i, c in enumerate(classes)}
  for split in ("train", "val"):
    # The same examples as the full dataset's (sampling is per class), relabelled.
    of_classes = np.isin(full.labels(split), classes)
    np.testing.assert_array_equal(sub.example_indices(split), full.example_indices(split)[of_classes])
    np.testing.assert_array_equal(sub.labels(split), [relabel[int(l)] for l in full.labels(split)[of_classes]])
  # Test split at the identity transform: the IDX test images of those classes, relabelled.
  test_labels, test_images = _idx_labels_and_images("test")
  batches = list(sub.eval_batches("test", batch_size=1000))
  mask = np.concatenate([b["mask"] for b in batches]) > 0
  images = np.concatenate([b["image"] for b in batches])[mask][..., 0].astype(np.uint8)
  labels = np.concatenate([b["label"] for b in batches])[mask]
  keep = np.isin(test_labels, classes)
  assert len(labels) == keep.sum() == 3000
  # TFDS stores examples in another order than the IDX files: compare as multisets.
  def hashes(ims, labs):
    return sorted(im.tobytes() + bytes([int(l)]) for im, l in zip(ims, labs))
  assert hashes(images, labels) == hashes(test_images[keep], [relabel[int(l)] for l in test_labels[keep]])
  batch = next(sub.train_batches(batch_size=32))
  assert batch["label"].min() >= 0 and batch["label"].max() <= 2


def test_train_indices_restrict_the_train_split(fashion_mnist_ready):
  from ftjax import data
  pool = data.load_dataset("fashion_mnist", sampling_rate=2, image_size=32, classes=[0, 1, 4])
  chosen = pool.example_indices("train")[::3]
  ds = data.load_dataset("fashion_mnist", image_size=32, classes=[0, 1, 4], train_indices=chosen)
  np.testing.assert_array_equal(ds.example_indices("train"), np.sort(chosen))
  np.testing.assert_array_equal(ds.labels("train"), pool.labels("train")[::3])
  full = data.load_dataset("fashion_mnist", image_size=32)
  train_labels = np.zeros(60_000, np.int64)
  for split in ("train", "val"):
    train_labels[full.example_indices(split)] = full.labels(split)
  np.testing.assert_array_equal(ds.example_indices("val"), data.load_dataset(
      "fashion_mnist", image_size=32, classes=[0, 1, 4]).example_indices("val"))
  batch = next(ds.train_batches(batch_size=16))
  assert batch["image"].shape == (16, 32, 32, 3)
  val_index = int(ds.example_indices("val")[0])
  with pytest.raises(ValueError, match="not in the train part"):
    data.load_dataset("fashion_mnist", image_size=32, classes=[0, 1, 4], train_indices=[val_index])
  other_class = int(np.flatnonzero(train_labels == 9)[0])
  with pytest.raises(ValueError, match="not in the train part"):
    data.load_dataset("fashion_mnist", image_size=32, classes=[0, 1, 4],
                      train_indices=[int(chosen[0]), other_class])
  with pytest.raises(ValueError, match="repeated"):
    data.load_dataset("fashion_mnist", image_size=32, train_indices=[int(chosen[0])] * 2)
  with pytest.raises(ValueError, match="out of range"):
    data.load_dataset("fashion_mnist", image_size=32, train_indices=[60_000])


def test_class_subset_errors(fashion_mnist_ready):
  from ftjax import data
  with pytest.raises(ValueError, match=r"class id 10 in classes is out of range \[0, 10\)"):
    data.load_dataset("fashion_mnist", image_size=32, classes=[0, 10])
  with pytest.raises(ValueError, match=r"repeats class id\(s\) \[3\]"):
    data.load_dataset("fashion_mnist", image_size=32, classes=[3, 1, 3])
  with pytest.raises(ValueError, match="at least one class"):
    data.load_dataset("fashion_mnist", image_size=32, classes=[])


# ----------------------------------------------------------------------------- reuse training


def _mixed_step_setup(weight, mode="labelled", with_reuse=True, n=4, num_pool_classes=5):
  """A mixed batch and the run setup's jitted step (plain SGD at lr 0.1, every parameter trained)."""
  from ftjax.methods.data_reuse import DataReuse, mixed_batch
  from ftjax.methods.finetune import CrossEntropy
  from ftjax.train import setup
  from ftjax.train.optim import GroupConfig

  model, variables = _tiny_model_and_variables()
  reuse = DataReuse(weight=weight, mode=mode, num_pool_classes=num_pool_classes, seed=1)
  model, variables = reuse.wrap_model(model=model, variables=variables, rng=None)
  components = [CrossEntropy(), reuse] if with_reuse else [CrossEntropy()]
  training = setup.init_training(model=model, variables=variables, methods=components, rules=[(".*", "all")],
                                 groups={"all": GroupConfig()}, num_classes=3, schedule=lambda step: 0.1,
                                 momentum=0.0, method_rng=jax.random.PRNGKey(1), state_rng=jax.random.PRNGKey(0))
  rng = np.random.default_rng(11)
  target = {"image": rng.uniform(0, 255, (n, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 3, n).astype(np.int32)}
  pool = {"image": rng.uniform(0, 255, (n, 32, 32, 3)).astype(np.float32),
          "label": rng.integers(0, num_pool_classes, n).astype(np.int32)}
  if mode == "pseudo_label":
    pool["image_key"] = rng.uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)
  batch = mixed_batch(target, pool)
  step = lambda state, batch: training.train_step(state, batch, training.source)  # state is donated
  return model, jax.device_get(training.state), batch, step


def test_mixed_batch_layout():
  from ftjax.methods.data_reuse import mixed_batch
  target = {"image": np.zeros((3, 32, 32, 3), np.float32), "label": np.array([0, 1, 2], np.int32)}
  pool = {"image": np.ones((3, 32, 32, 3), np.float32), "label": np.array([4, 3, 2], np.int32),
          "image_key": np.full((3, 32, 32, 3), 2, np.float32)}
  batch = mixed_batch(target, pool)
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], [0, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(batch["pool_mask"], [0, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(batch["label"], [0, 1, 2])
  np.testing.assert_array_equal(batch["pool_label"], [4, 3, 2])


def test_labelled_reuse_step_matches_eq6_rederived():
  """One jitted train step on a mixed batch: the logged terms are Eq. 6's, computed in
  NumPy from one train-mode forward of all rows (BatchNorm sees the mixed batch)."""
  weight, n = 0.3, 4
  model, state, batch, step = _mixed_step_setup(weight, n=n)
  out = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=True,
                    outputs=("features", "logits"), mutable=["batch_stats"])[0]
  features = np.asarray(out["features"], np.float64)
  head = {k: np.asarray(v, np.float64) for k, v in state.params["pool_head"].items()}
  expected_ce = _numpy_ce(np.asarray(out["logits"])[:n], batch["label"])
  expected_pool = _numpy_ce(features[n:] @ head["kernel"] + head["bias"], batch["pool_label"])
  params_before = jax.tree.map(np.asarray, state.params)
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["loss/ce"], expected_ce, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss/data_reuse"], expected_pool, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], expected_ce + weight * expected_pool, rtol=1e-4)
  # The pool head learns: SGD moves it by lr * λ * features^T (softmax - onehot) / m.
  logits_pool = features[n:] @ head["kernel"] + head["bias"]
  probs = np.exp(_log_softmax(logits_pool))
  grad_kernel = weight * features[n:].T @ (probs - np.eye(5)[batch["pool_label"]]) / n
  np.testing.assert_allclose(np.asarray(new_state.params["pool_head"]["kernel"]),
                             params_before["pool_head"]["kernel"] - 0.1 * grad_kernel, atol=2e-5)


def test_zero_weight_reuse_equals_unweighted_pool_rows():
  """λ = 0 gives the parameters of a step whose pool rows are in the forward (BatchNorm)
  but in no loss term; λ > 0 does not."""
  results = {}
  for name, weight, with_reuse in (("zero", 0.0, True), ("none", 0.0, False), ("some", 1.0, True)):
    _, state, batch, step = _mixed_step_setup(weight, with_reuse=with_reuse)
    for _ in range(2):
      state, _ = step(state, batch)
    results[name] = state
  zero, none, some = (jax.tree.map(np.asarray, results[k].params) for k in ("zero", "none", "some"))
  for a, b in zip(jax.tree.leaves(zero), jax.tree.leaves(none)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  backbone_diff = max(float(np.abs(a - b).max()) for a, b in
                      zip(jax.tree.leaves(some["backbone"]), jax.tree.leaves(zero["backbone"])))
  assert backbone_diff > 1e-4
  # BatchNorm running statistics did see the pool rows in every run.
  for a, b in zip(jax.tree.leaves(results["zero"].batch_stats), jax.tree.leaves(results["some"].batch_stats)):
    assert a.shape == b.shape


def test_pseudo_label_reuse_step_matches_eq7_rederived():
  n = 4
  model, state, batch, step = _mixed_step_setup(1.0, mode="pseudo_label", n=n)
  assert "pool_head" not in state.params
  logits = np.asarray(model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                                  train=True, outputs=("logits",), mutable=["batch_stats"])[0]["logits"])
  assert logits.shape[0] == 3 * n
  _, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["loss/ce"], _numpy_ce(logits[:n], batch["label"]), rtol=1e-4)
  np.testing.assert_allclose(metrics["loss/data_reuse"],
                             _numpy_pseudo_label(logits[2 * n:], logits[n:2 * n]), rtol=1e-4)


def test_data_reuse_component_errors():
  from ftjax.methods import build_methods
  with pytest.raises(ValueError, match="mode must be one of"):
    build_methods({"data_reuse": {"mode": "soft"}})
  with pytest.raises(ValueError, match="weight must be >= 0"):
    build_methods({"data_reuse": {"weight": -1.0}})
  (reuse,) = build_methods({"data_reuse": {"weight": 0.1}})
  model, variables = _tiny_model_and_variables()
  with pytest.raises(ValueError, match="num_pool_classes >= 1"):
    reuse.wrap_model(model=model, variables=variables, rng=None)
  with pytest.raises(ValueError, match="pool_head"):
    reuse.init_state(variables=variables, rng=None)


def _run_tiny_reuse(workdir: str, **reuse):
  """4 tiny steps on the Fashion-MNIST target half (classes 2, 3, 6, 7, 9), the other half
  (1% of it) as the pool; returns (results, train rows of metrics.jsonl)."""
  import json

  from experiments.configs import tiny
  from ftjax.train.loop import train_and_evaluate

  c = tiny.get_config()
  c.dataset.classes = (2, 3, 6, 7, 9)
  c.num_steps, c.eval_every_steps, c.log_every_steps = 4, 4, 2
  c.reuse.enabled = True
  c.reuse.classes = (0, 1, 4, 5, 8)
  c.reuse.sampling_rate = 1.0
  for key, value in reuse.items():
    c.reuse[key] = value
  results = train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train_rows = [r for r in map(json.loads, f) if r["split"] == "train"]
  return results, train_rows


@pytest.mark.slow  # ~40 s on 2 shared cores (two compiles and a 5000-image test pass)
def test_reuse_training_end_to_end(tmp_path, fashion_mnist_ready):
  """A tiny run on the Fashion-MNIST target half with the pool half reused (Eq. 6)."""
  results, train_rows = _run_tiny_reuse(str(tmp_path / "run"), weight=0.3)
  assert results["steps"] == 4 and results["num_test"] == 5000
  assert results["reuse_pool_train"] == 5 * 48  # 1% of the 4800 train images of each pool class
  assert len(train_rows) == 2
  for row in train_rows:
    assert np.isfinite(row["loss/ce"]) and np.isfinite(row["loss/data_reuse"])
    assert row["loss"] == pytest.approx(row["loss/ce"] + 0.3 * row["loss/data_reuse"], rel=1e-5)
    assert 0 <= row["data_reuse/pool_accuracy"] <= 1


def test_init_from_round_trip_and_errors(tmp_path):
  from ftjax.core.errors import ConfigError
  from ftjax.train.setup import load_backbone_variables, save_backbone_variables
  _, variables = _tiny_model_and_variables()
  trained = jax.tree.map(lambda x: np.asarray(x) + 1.0, variables)
  path = save_backbone_variables(trained, str(tmp_path / "backbone.npz"))
  loaded = load_backbone_variables(jax.tree.map(np.asarray, variables), path)
  np.testing.assert_array_equal(loaded["params"]["backbone"]["stem_conv"]["kernel"],
                                trained["params"]["backbone"]["stem_conv"]["kernel"])
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["stem_bn"]["mean"],
                                trained["batch_stats"]["backbone"]["stem_bn"]["mean"])
  # Heads are not in the file: they keep their initial values.
  np.testing.assert_array_equal(loaded["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
  assert jax.tree.structure(loaded) == jax.tree.structure(jax.tree.map(np.asarray, variables))
  with pytest.raises(ConfigError, match="does not exist"):
    load_backbone_variables(variables, str(tmp_path / "missing.npz"))
  from ftjax import models
  other = models.create_model("resnet18", num_classes=3)
  other_vars = jax.eval_shape(lambda: other.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  other_vars = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), other_vars)
  with pytest.raises(ConfigError, match="has no array|has shape"):
    load_backbone_variables(other_vars, path)


@pytest.mark.slow  # ~40 s on 2 shared cores
def test_pseudo_label_reuse_end_to_end(tmp_path, fashion_mnist_ready):
  """Eq. 7 through the trainer: two pool views per step, no pool head, a finite pseudo-label term."""
  from ftjax.train.checkpoint import load_checkpoint_arrays

  results, train_rows = _run_tiny_reuse(str(tmp_path / "run"), mode="pseudo_label", weight=1.0)
  assert results["steps"] == 4
  for row in train_rows:
    assert row["loss/data_reuse"] > 0 and np.isfinite(row["loss/ce"])
    assert row["loss"] == pytest.approx(row["loss/ce"] + row["loss/data_reuse"], rel=1e-5)
    assert 0 <= row["data_reuse/view_agreement"] <= 1
  assert "pool_head" not in load_checkpoint_arrays(str(tmp_path / "run"))["state"]["params"]


def test_the_committed_tables_follow_from_the_committed_results():
  """results_table.md is format_tables of results.json read back (str keys), chosen marked once per variant."""
  import json
  import pathlib

  from experiments import data_reuse, stats
  from experiments.configs import data_reuse as data_reuse_config

  results_dir = pathlib.Path(__file__).parents[1] / "experiments" / "results" / "data_reuse_near"
  results = json.loads((results_dir / "results.json").read_text())
  table = data_reuse.format_tables(results, data_reuse_config.get_config("near"), stats)
  assert table == (results_dir / "results_table.md").read_text()
  sweep = table.split("## Sweep on validation")[1].splitlines()
  for variant, chosen in results["chosen"].items():
    if variant not in results["sweep"]:
      continue   # random and Greedy-OT reuse take UOT reuse's values
    marked = [line for line in sweep if line.startswith(f"| {variant} |") and line.endswith("| chosen |")]
    assert len(marked) == 1 and f"| {chosen['lr']:g} |" in marked[0], variant

"""Tests for ftjax.selection: UOT scores (vs POT), top-k, class means, baselines."""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from ftjax.selection import class_means
from ftjax.selection import greedy_ot_scores
from ftjax.selection import label_overlap_units
from ftjax.selection import random_units
from ftjax.selection import select_top_k
from ftjax.selection import uot_scores

IMAGENET_CLASSES = (pathlib.Path(__file__).parents[1] / "ftjax" / "models"
                    / "imagenet_classes.txt")


def _unit_rows(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pot_row_masses(pool, target, *, epsilon=1.0, tau_pool=1.0, tau_target=100.0,
                    cost_scale=0.01, cost="cosine"):
  """Independent reference: POT's generalised Sinkhorn in float64."""
  pool = np.asarray(pool, np.float64)
  target = np.asarray(target, np.float64)
  if cost == "cosine":
    m = (1.0 - _unit_rows(pool) @ _unit_rows(target).T) / cost_scale
  else:
    m = ((pool[:, None, :] - target[None, :, :]) ** 2).sum(-1) / cost_scale
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "c is overwritten by the one matrix"
    plan = ot.unbalanced.sinkhorn_unbalanced(
        np.ones(len(pool)), np.ones(len(target)), m, reg=epsilon,
        reg_m=(tau_pool, tau_target), reg_type="entropy", numItermax=20000,
        stopThr=1e-13)
  return plan.sum(1), plan


# Most tests share these shapes so that the jitted solver compiles once.
N_POOL, N_TARGET, DIM = 120, 30, 32


def _planted_problem(seed, n_pool=N_POOL, n_target=N_TARGET, dim=DIM, n_related=15):
  """Pool units, of which ``n_related`` lie near the target classes."""
  rng = np.random.default_rng(seed)
  pool = rng.normal(size=(n_pool, dim))
  related = rng.choice(n_pool, n_related, replace=False)
  # Every related unit gets at least one target class near it.
  target = pool[related[np.arange(n_target) % n_related]]
  target = target + 0.6 * rng.normal(size=target.shape)
  return pool.astype(np.float32), target.astype(np.float32), related


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uot_scores_match_pot_at_paper_settings(seed):
  pool, target, _ = _planted_problem(seed)
  out = uot_scores(target_means=target, pool_means=pool)
  ref, _ = _pot_row_masses(pool, target)
  assert bool(out.converged)
  assert out.scores.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out.scores), ref, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out.log_scores), np.log(ref), atol=1e-4)


@pytest.mark.parametrize("kwargs", [
    dict(epsilon=0.5, tau_pool=2.0, tau_target=10.0, cost_scale=0.1),
    dict(cost="sqeuclidean", cost_scale=10.0),
])
def test_uot_scores_match_pot_other_settings(kwargs):
  pool, target, _ = _planted_problem(7)
  out = uot_scores(target_means=target, pool_means=pool, threshold=1e-6, **kwargs)
  ref, _ = _pot_row_masses(pool, target, **kwargs)
  assert bool(out.converged)
  np.testing.assert_allclose(np.asarray(out.scores), ref, rtol=1e-4)


def test_uot_plan_matches_pot_and_sums_to_scores():
  pool, target, _ = _planted_problem(3)
  out = uot_scores(target_means=target, pool_means=pool, return_plan=True)
  _, ref_plan = _pot_row_masses(pool, target)
  plan = np.asarray(out.plan)
  assert plan.shape == (N_POOL, N_TARGET)
  np.testing.assert_allclose(plan, ref_plan, rtol=1e-3, atol=1e-6 * ref_plan.max())
  np.testing.assert_allclose(plan.sum(1), np.asarray(out.scores), rtol=1e-5)
  np.testing.assert_allclose(plan.sum(0), ref_plan.sum(0), rtol=1e-4)
  # tau_target >> tau_pool: target masses vary far less than pool masses.
  assert plan.sum(0).std() < 0.2 * plan.sum(1).std()


@pytest.mark.parametrize("seed", [0, 1])
def test_uot_top_k_matches_pot_and_finds_related_units(seed):
  pool, target, related = _planted_problem(seed)
  out = uot_scores(target_means=target, pool_means=pool)
  ref, _ = _pot_row_masses(pool, target)
  k = len(related)
  ref_top = select_top_k(ref, k)
  # The cut at k must be clear for "same top-k" to be a meaningful check.
  ordered = np.sort(ref)[::-1]
  assert ordered[k - 1] > 1.01 * ordered[k]
  np.testing.assert_array_equal(select_top_k(out.scores, k), ref_top)
  assert set(ref_top.tolist()) == set(related.tolist())


def test_uot_jit_vmap_over_targets_equals_one_at_a_time():
  rng = np.random.default_rng(5)
  pool = rng.normal(size=(N_POOL, DIM)).astype(np.float32)
  targets = rng.normal(size=(3, N_TARGET, DIM)).astype(np.float32)
  # Under jit the value checks are skipped (tracers); the result must not change.
  batched = jax.jit(jax.vmap(lambda t: uot_scores(target_means=t, pool_means=pool)))(
      jnp.asarray(targets))
  assert batched.scores.shape == (3, N_POOL)
  for i in range(3):
    single = uot_scores(target_means=targets[i], pool_means=pool)
    np.testing.assert_allclose(np.asarray(batched.scores[i]),
                               np.asarray(single.scores), rtol=5e-5)
    assert bool(batched.converged[i])


def test_uot_float32_stable_with_large_costs():
  # Opposite directions: costs up to 2 / 0.01 = 200, exp(-200) underflows in
  # float32; the solver (kernel space on shifted costs, exact rows near underflow)
  # must still give finite, positive masses.
  rng = np.random.default_rng(0)
  target = rng.normal(size=(N_TARGET, DIM)).astype(np.float32)
  near = target[:3] + 0.1 * rng.normal(size=(3, DIM))
  pool = np.concatenate([-np.tile(target, (4, 1))[:N_POOL - 3], near]).astype(np.float32)
  out = uot_scores(target_means=target, pool_means=pool)
  ref, _ = _pot_row_masses(pool, target)
  cosine_cost = (1 - _unit_rows(pool) @ _unit_rows(target).T) / 0.01
  # The Gibbs kernel exp(-C / eps) underflows to 0 in float32 for these costs.
  assert np.exp(-cosine_cost.astype(np.float32)).min() == 0.0
  assert np.all(np.isfinite(np.asarray(out.log_scores)))
  # atol on logs = relative tolerance on the masses.
  np.testing.assert_allclose(np.asarray(out.log_scores), np.log(ref), atol=1e-4)
  np.testing.assert_array_equal(np.sort(select_top_k(out.log_scores, 3)),
                                np.arange(N_POOL - 3, N_POOL))


@pytest.mark.parametrize("pool, target, match", [
    (np.full((5, 4), np.nan), np.ones((3, 4)), "pool_means contains 20 NaN/inf"),
    (np.ones((5, 4)), np.array([[1.0, np.inf, 0, 0]]), "target_means contains 1 NaN/inf"),
    (np.ones((5, 4)), np.ones((3, 6)), "feature dim 6 .* has 4"),
    (np.ones(5), np.ones((3, 5)), "pool_means must be 2-D"),
    (np.ones((0, 4)), np.ones((3, 4)), "at least one row"),
])
def test_uot_bad_features_raise(pool, target, match):
  with pytest.raises(ValueError, match=match):
    uot_scores(target_means=target, pool_means=pool)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cost="l1"), "cost='l1' is not supported"),
    (dict(epsilon=0.0), "epsilon must be a finite positive"),
    (dict(tau_target=-1.0), "tau_target must be"),
    (dict(max_iterations=0), "max_iterations must be"),
])
def test_uot_bad_hyperparameters_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    uot_scores(target_means=np.ones((2, 3)), pool_means=np.ones((4, 3)), **kwargs)


def test_select_top_k_descending_with_stable_ties():
  scores = np.array([0.3, 0.9, 0.5, 0.9, 0.1, 0.5])
  np.testing.assert_array_equal(select_top_k(scores, 4), [1, 3, 2, 5])
  rng = np.random.default_rng(0)
  values = rng.random(50)
  expected = sorted(range(50), key=lambda i: -values[i])[:7]
  np.testing.assert_array_equal(select_top_k(jnp.asarray(values), 7), expected)
  with pytest.raises(ValueError, match="k must be an int in"):
    select_top_k(scores, 7)
  with pytest.raises(ValueError, match="NaN"):
    select_top_k(np.array([1.0, np.nan]), 1)


def test_class_means_matches_numpy():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(40, 5)).astype(np.float32)
  labels = np.concatenate([np.arange(4), rng.integers(0, 4, 36)])
  means = np.asarray(class_means(features=features, labels=labels, num_classes=4))
  for c in range(4):
    np.testing.assert_allclose(means[c], features[labels == c].mean(0), rtol=1e-5,
                               atol=1e-6)


def test_class_means_empty_class():
  features = np.ones((4, 2), np.float32)
  labels = np.array([0, 0, 2, 2])
  with pytest.raises(ValueError, match=r"classes \[1\] have no examples"):
    class_means(features=features, labels=labels, num_classes=3)
  with pytest.raises(ValueError, match="labels must be in"):
    class_means(features=features, labels=np.array([0, 1, 5, 0]), num_classes=3)
  # Under jit no error can be raised: the empty class is NaN.
  traced = jax.jit(lambda f, l: class_means(features=f, labels=l, num_classes=3))(
      features, labels)
  assert np.all(np.isnan(np.asarray(traced[1])))
  np.testing.assert_allclose(np.asarray(traced)[[0, 2]], 1.0)


def test_greedy_ot_scores_match_pot_emd():
  rng = np.random.default_rng(0)
  pool = rng.normal(size=(30, 6))
  target = rng.normal(size=(8, 6))
  weights = rng.integers(5, 60, size=8).astype(np.float64)
  for cost, metric in (("euclidean", "euclidean"), ("sqeuclidean", "sqeuclidean")):
    scores = np.asarray(greedy_ot_scores(target_means=target, pool_means=pool,
                                         target_weights=weights, cost=cost))
    # Independent: exact EMD of one unit-mass source point to the target measure.
    emd = np.array([
        ot.emd2(np.ones(1), weights / weights.sum(), ot.dist(pool[i:i + 1], target, metric=metric))
        for i in range(30)])
    np.testing.assert_allclose(scores, np.exp(-0.01 * emd), rtol=1e-5)


def test_greedy_ot_sqeuclidean_ranks_by_distance_to_target_centroid():
  rng = np.random.default_rng(1)
  pool = rng.normal(size=(25, 4))
  target = rng.normal(size=(6, 4))
  scores = greedy_ot_scores(target_means=target, pool_means=pool, cost="sqeuclidean")
  by_centroid = np.argsort(np.linalg.norm(pool - target.mean(0), axis=1), kind="stable")
  np.testing.assert_array_equal(select_top_k(scores, 10), by_centroid[:10])


def test_greedy_ot_bad_input():
  with pytest.raises(ValueError, match="cost='l1' is not supported"):
    greedy_ot_scores(target_means=np.ones((2, 3)), pool_means=np.ones((4, 3)), cost="l1")
  with pytest.raises(ValueError, match="target_weights must be 2"):
    greedy_ot_scores(target_means=np.ones((2, 3)), pool_means=np.ones((4, 3)),
                     target_weights=np.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="NaN/inf"):
    greedy_ot_scores(target_means=np.ones((2, 3)), pool_means=np.full((4, 3), np.nan))


def test_random_units():
  a = random_units(1000, 100, seed=0)
  assert a.shape == (100,) and len(set(a.tolist())) == 100
  assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
  np.testing.assert_array_equal(a, random_units(1000, 100, seed=0))
  assert not np.array_equal(a, random_units(1000, 100, seed=1))
  with pytest.raises(ValueError, match="k must be an int in"):
    random_units(10, 11, seed=0)


def test_label_overlap_units_on_imagenet_names():
  imagenet = IMAGENET_CLASSES.read_text().splitlines()
  assert len(imagenet) == 1000
  # CUB-200 style target names.
  cub = ["001.Black_footed_Albatross", "047.American_Goldfinch",
         "014.Indigo_Bunting", "073.Blue_Jay", "080.Green_Kingfisher",
         "118.Purple_Finch"]
  selected = label_overlap_units(imagenet, cub)
  heads = {imagenet[i].split(",")[0] for i in selected}
  assert heads == {"albatross", "goldfinch", "indigo bunting", "jay"}
  # "house finch" must not match "purple finch" (different species).
  assert not any(imagenet[i].startswith("house finch") for i in selected)


def test_label_overlap_units_normalisation():
  pool = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark",
          "tiger shark, Galeocerdo cuvieri", "grey whale"]
  np.testing.assert_array_equal(
      label_overlap_units(pool, ["Goldfish", "Tiger-Sharks", "whale"]), [1, 3, 4])
  assert label_overlap_units(pool, ["airliner"]).size == 0
  with pytest.raises(ValueError, match="sequence of strings"):
    label_overlap_units(pool, "goldfish")

"""Tests for ftjax.selection.kmeans (chunked cosine k-means)."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from ftjax.selection import kmeans


def _numpy_spherical_lloyd(x, init, num_iterations):
  """Reference: plain NumPy spherical Lloyd with the same empty-cluster rule."""
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  c = init / np.linalg.norm(init, axis=1, keepdims=True)
  k = c.shape[0]
  history, prev, reseeded_last, reseeded = [], None, 0, 0
  for t in range(num_iterations + 1):
    sims = xn @ c.T
    assign = sims.argmax(1)
    best = sims.max(1)
    history.append(float((1.0 - best).sum()))
    if t == num_iterations:
      break
    if prev is not None and np.array_equal(assign, prev) and reseeded_last == 0:
      break
    counts = np.bincount(assign, minlength=k)
    sums = np.zeros_like(c)
    np.add.at(sums, assign, xn)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    new = np.where(norms > 0, sums / np.maximum(norms, 1e-30), c)
    empty = np.flatnonzero(counts == 0)
    far = np.argsort(best, kind="stable")[:len(empty)]  # lowest cosine first
    new[empty] = xn[far]
    reseeded_last = len(empty)
    reseeded += len(empty)
    c, prev = new, assign
  history += [history[-1]] * (num_iterations + 1 - len(history))
  return c, assign, np.array(history), reseeded


def _blobs(seed, n, d, k, noise):
  rng = np.random.default_rng(seed)
  directions = rng.normal(size=(k, d))
  labels = rng.integers(0, k, n)
  x = directions[labels] + noise * rng.normal(size=(n, d))
  return x.astype(np.float32), labels


# 1 empty cluster: re-seeded centroid measured directly; 70 empty (> 64):
# the fallback where the re-seeding jump enters the drift bound.
@pytest.mark.parametrize("num_clusters, num_far", [(6, 1), (80, 70)])
def test_matches_numpy_lloyd_with_same_init_including_reseeding(num_clusters, num_far):
  x, _ = _blobs(0, 500, 8, 6, noise=0.8)
  x = np.abs(x)  # positive orthant, so a centroid in the negative one attracts no point
  rng = np.random.default_rng(1)
  init = x[rng.choice(500, num_clusters, replace=False)].copy()
  init[:num_far] = -1.0 - rng.random((num_far, 8))
  result = kmeans(x, num_clusters=num_clusters, num_iterations=25, init=init,
                  chunk_size=64)
  ref_c, ref_a, ref_hist, ref_reseeded = _numpy_spherical_lloyd(
      x.astype(np.float64), init.astype(np.float64), 25)
  assert ref_reseeded >= num_far and int(result.num_reseeded) == ref_reseeded
  np.testing.assert_array_equal(np.asarray(result.assignments), ref_a)
  np.testing.assert_allclose(np.asarray(result.centroids), ref_c, atol=1e-5)
  np.testing.assert_allclose(np.asarray(result.objective_history), ref_hist, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(result.cluster_sizes),
                                np.bincount(ref_a, minlength=num_clusters))
  assert np.all(np.asarray(result.cluster_sizes) > 0)


@pytest.fixture(scope="module")
def random_run():
  x = np.random.default_rng(2).normal(size=(3000, 16)).astype(np.float32)
  return x, kmeans(x, num_clusters=50, num_iterations=15, seed=0, chunk_size=512)


def test_objective_never_increases(random_run):
  x, result = random_run
  history = np.asarray(result.objective_history)
  assert history.shape == (16,)
  assert history[-1] < 0.9 * history[0]
  assert np.all(np.diff(history) <= 1e-6 * history[0]), history
  # The last entry is the objective of the returned centroids/assignments.
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  cos = np.sum(xn * np.asarray(result.centroids)[np.asarray(result.assignments)], 1)
  np.testing.assert_allclose(history[-1], np.sum(1.0 - cos), rtol=1e-5)
  # Every point sits with its most similar centroid.
  np.testing.assert_array_equal(
      np.asarray(result.assignments), np.argmax(xn @ np.asarray(result.centroids).T, 1))


def test_chunking_invariance(random_run):
  x, result = random_run  # chunk_size=512: last chunk ragged (3000 = 5 * 512 + 440)
  for chunk_size in (700, 3000):  # ragged again; one single chunk
    other = kmeans(x, num_clusters=50, num_iterations=15, seed=0, chunk_size=chunk_size)
    np.testing.assert_array_equal(np.asarray(other.assignments),
                                  np.asarray(result.assignments))
    np.testing.assert_allclose(np.asarray(other.centroids),
                               np.asarray(result.centroids), atol=1e-5)
    np.testing.assert_allclose(np.asarray(other.objective_history),
                               np.asarray(result.objective_history), rtol=1e-5)


def test_result_shapes_and_unit_centroids(random_run):
  _, result = random_run
  assert result.centroids.shape == (50, 16)
  assert result.assignments.shape == (3000,)
  assert int(np.asarray(result.cluster_sizes).sum()) == 3000
  np.testing.assert_allclose(np.linalg.norm(np.asarray(result.centroids), axis=1), 1.0,
                             atol=1e-5)


def test_kmeanspp_recovers_separated_clusters_and_stops_early():
  x, labels = _blobs(3, 2000, 16, 8, noise=0.05)
  result = kmeans(x, num_clusters=8, num_iterations=30, seed=0, chunk_size=512)
  assert adjusted_rand_score(labels, np.asarray(result.assignments)) > 0.99
  assert int(result.num_iterations) < 30  # no assignment changed -> stopped
  # Well-separated clusters: the bounds skip most distance computations.
  assert float(result.recomputed_fraction) < 0.5
  history = np.asarray(result.objective_history)
  assert np.all(history[int(result.num_iterations):] == history[-1])


def test_random_init_is_distinct_data_points():
  x, _ = _blobs(4, 300, 8, 5, noise=0.5)
  result = kmeans(x, num_clusters=5, num_iterations=0, seed=3, init="random")
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  c = np.asarray(result.centroids)
  # With 0 iterations the centroids are the chosen (normalised) data points.
  nearest = np.abs(xn[None, :, :] - c[:, None, :]).max(-1).min(-1)
  assert np.all(nearest < 1e-6)
  assert len({tuple(np.round(row, 5)) for row in c}) == 5


@pytest.mark.parametrize("features, kwargs, match", [
    (np.full((10, 3), np.nan), {}, "NaN/inf"),
    (np.vstack([np.ones((9, 3)), np.zeros((1, 3))]), {}, "all-zero row"),
    (np.ones(10), {}, "2-D"),
    (np.ones((10, 3)), dict(num_clusters=11), r"num_clusters must be an int in \[1, n=10\]"),
    (np.ones((10, 3)), dict(init="furthest"), "init='furthest' is not supported"),
    (np.ones((10, 3)), dict(init=np.ones((2, 4))), r"init array must have shape \(2, 3\)"),
    (np.ones((10, 3)), dict(chunk_size=0), "chunk_size must be"),
])
def test_bad_input_raises(features, kwargs, match):
  args = dict(num_clusters=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    kmeans(features, **args)

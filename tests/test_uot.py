"""Tests for the jitted UOT solver (ftjax.selection.uot / uot_sinkhorn) against POT.

Every accuracy check compares with POT's generalised Sinkhorn in float64 on
random problems, for the kernel-space and the log-domain iterations, called
directly, jitted and vmapped.
"""

import doctest
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from ftjax.selection import cost_matrix
from ftjax.selection import select_top_k
from ftjax.selection import solve_uot
from ftjax.selection import uot
from ftjax.selection import uot_scores
from ftjax.selection import uot_scores_batched
from ftjax.selection import uot_sinkhorn

N_POOL, N_TARGET, DIM = 120, 30, 32
PAPER = dict(epsilon=1.0, tau_pool=1.0, tau_target=100.0)


def _pot_plan(cost, *, epsilon=1.0, tau_pool=1.0, tau_target=100.0, p=None, q=None):
  """Independent reference: POT, float64, KL(P | p q^T) (= entropy for unit masses)."""
  cost = np.asarray(cost, np.float64)
  p = np.ones(cost.shape[0]) if p is None else np.asarray(p, np.float64)
  q = np.ones(cost.shape[1]) if q is None else np.asarray(q, np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return ot.unbalanced.sinkhorn_unbalanced(
        p, q, cost, reg=epsilon, reg_m=(tau_pool, tau_target), reg_type="kl",
        numItermax=50000, stopThr=1e-14)


def _random_cost(seed, kind, n_pool=N_POOL, n_target=N_TARGET):
  """float32 cost of a random problem (its float64 copy is what POT gets)."""
  rng = np.random.default_rng(seed)
  if kind == "cosine":  # paper cost: up to 2 / 0.01 = 200, exp(-200) underflows float32
    pool = rng.normal(size=(n_pool, DIM)).astype(np.float32)
    target = rng.normal(size=(n_target, DIM)).astype(np.float32)
    return np.asarray(cost_matrix(jnp.asarray(pool), jnp.asarray(target), cost_scale=0.01))
  if kind == "uniform":
    return rng.uniform(0.0, 30.0, size=(n_pool, n_target)).astype(np.float32)
  raise ValueError(kind)


def _dual_gradient_error(cost, f, g, *, epsilon, tau_pool, tau_target, p=None, q=None):
  """UOTScores.error recomputed in float64 from the returned potentials."""
  cost, f, g = (np.asarray(x, np.float64) for x in (cost, f, g))
  p = np.ones(cost.shape[0]) if p is None else np.asarray(p, np.float64)
  q = np.ones(cost.shape[1]) if q is None else np.asarray(q, np.float64)
  plan = p[:, None] * q[None, :] * np.exp((f[:, None] + g[None, :] - cost) / epsilon)
  rows = np.abs(plan.sum(1) - p * np.exp(-f / tau_pool)).sum()
  cols = np.abs(plan.sum(0) - q * np.exp(-g / tau_target)).sum()
  return (rows + cols) / (p.sum() + q.sum())


@pytest.mark.parametrize("mode", ["kernel", "log"])
@pytest.mark.parametrize("kind, seed, settings", [
    ("cosine", 0, PAPER),
    ("cosine", 1, PAPER),
    ("uniform", 2, PAPER),
    ("uniform", 3, dict(epsilon=0.5, tau_pool=2.0, tau_target=10.0)),
    ("cosine", 4, dict(epsilon=2.0, tau_pool=0.5, tau_target=50.0)),
])
def test_solve_uot_matches_pot_on_random_problems(mode, kind, seed, settings):
  cost = _random_cost(seed, kind)
  out = solve_uot(cost=cost, mode=mode, threshold=1e-7, **settings)
  ref = _pot_plan(cost, **settings)
  assert bool(out.converged) and bool(out.log_domain) == (mode == "log")
  assert out.scores.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out.scores), ref.sum(1), rtol=1e-4)
  # log_scores are right even where the masses underflow float32.
  np.testing.assert_allclose(np.asarray(out.log_scores), np.log(ref.sum(1)), atol=1e-4)
  np.testing.assert_array_equal(select_top_k(out.scores, 10), select_top_k(ref.sum(1), 10))
  # The reported error is the dual-gradient norm of the returned potentials.
  assert float(out.error) <= 1e-7
  recomputed = _dual_gradient_error(cost, out.f, out.g, **settings)
  assert recomputed < 2e-5  # float32 rounding of f, g ~ 50 dominates


@pytest.mark.parametrize("mode", ["kernel", "log"])
def test_solve_uot_masses_and_plan_match_pot(mode):
  rng = np.random.default_rng(7)
  cost = _random_cost(7, "uniform")
  p = rng.uniform(0.2, 3.0, N_POOL).astype(np.float32)
  q = rng.uniform(0.5, 2.0, N_TARGET).astype(np.float32)
  out = solve_uot(cost=cost, pool_masses=p, target_masses=q, mode=mode, threshold=1e-7,
                  return_plan=True, tau_target=20.0)
  ref = _pot_plan(cost, p=p, q=q, tau_target=20.0)
  plan = np.asarray(out.plan)
  np.testing.assert_allclose(np.asarray(out.scores), ref.sum(1), rtol=1e-4)
  np.testing.assert_allclose(plan, ref, rtol=2e-4, atol=1e-6 * ref.max())
  np.testing.assert_allclose(plan.sum(1), np.asarray(out.scores), rtol=1e-5)
  assert _dual_gradient_error(cost, out.f, out.g, tau_pool=1.0, tau_target=20.0,
                              epsilon=1.0, p=p, q=q) < 2e-5


@pytest.mark.parametrize("mode", ["kernel", "log"])
def test_jit_vmap_solve_uot_matches_pot(mode):
  costs = np.stack([_random_cost(s, "cosine") for s in (10, 11, 12)])
  many = jax.jit(jax.vmap(lambda c: solve_uot(cost=c, mode=mode, threshold=1e-7)))(costs)
  assert many.scores.shape == (3, N_POOL)
  assert np.all(np.asarray(many.log_domain) == (mode == "log"))
  for i, c in enumerate(costs):
    ref = _pot_plan(c).sum(1)
    np.testing.assert_allclose(np.asarray(many.scores[i]), ref, rtol=1e-4)
    single = solve_uot(cost=c, mode=mode, threshold=1e-7)
    # Each vmapped problem runs (and stops) on its own, as the single call does.
    assert int(many.num_iterations[i]) == int(single.num_iterations)
    np.testing.assert_allclose(np.asarray(many.scores[i]), np.asarray(single.scores),
                               rtol=1e-6)


@pytest.mark.parametrize("mode", ["kernel", "log"])
def test_uot_scores_vmap_and_batched_match_pot(mode):
  rng = np.random.default_rng(3)
  pool = np.abs(rng.normal(size=(N_POOL, DIM))).astype(np.float32)
  targets = np.abs(pool[rng.choice(N_POOL, (4, N_TARGET))]
                   + 0.5 * rng.normal(size=(4, N_TARGET, DIM))).astype(np.float32)
  batched = uot_scores_batched(target_means=targets, pool_means=pool, mode=mode,
                               threshold=1e-7)
  vmapped = jax.jit(jax.vmap(lambda t: uot_scores(target_means=t, pool_means=pool,
                                                  mode=mode, threshold=1e-7)))(targets)
  assert batched.scores.shape == vmapped.scores.shape == (4, N_POOL)
  for i in range(4):
    c = cost_matrix(jnp.asarray(pool), jnp.asarray(targets[i]), cost_scale=0.01)
    ref = _pot_plan(c).sum(1)
    np.testing.assert_allclose(np.asarray(batched.scores[i]), ref, rtol=1e-4)
    # Same solver; the cost matmuls may round differently (batched or not).
    np.testing.assert_allclose(np.asarray(vmapped.scores[i]), np.asarray(batched.scores[i]),
                               rtol=5e-5)
  assert np.all(np.asarray(batched.converged))


def test_auto_mode_picks_kernel_at_paper_settings_and_log_for_small_eps():
  cost = _random_cost(0, "cosine")
  assert not bool(solve_uot(cost=cost).log_domain)
  # Small eps: lambda_1 lambda_2 -> 1 and the float32 scaling bound fails: log domain.
  small = dict(epsilon=0.05, tau_pool=1.0, tau_target=100.0)
  assert uot_sinkhorn.kernel_bound(N_POOL, N_TARGET, **small) > uot_sinkhorn.KERNEL_BOUND[
      "float32"]
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(N_POOL + N_TARGET, DIM)).astype(np.float32)
  # cost_scale 1: costs in [0, 2], so POT's float64 kernel exp(-C / 0.05) is fine.
  c = np.asarray(cost_matrix(jnp.asarray(feats[:N_POOL]), jnp.asarray(feats[N_POOL:])))
  # float32 rounding of C / eps (x 20 here) sets the error floor near 1e-6.
  out = solve_uot(cost=c, threshold=2e-6, **small)
  assert bool(out.log_domain) and bool(out.converged)
  np.testing.assert_allclose(np.asarray(out.scores), _pot_plan(c, **small).sum(1),
                             rtol=1e-3)


def _far_rows_problem(seed=0):
  """Target classes around one direction, each with a pool unit next to it, and
  pool units pointing the other way: far rows' masses are ~exp(-180), their
  kernel rows underflow float32."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=DIM)
  target = u + 0.3 * np.linalg.norm(u) / np.sqrt(DIM) * rng.normal(size=(N_TARGET, DIM))
  near = target + 0.05 * rng.normal(size=target.shape)
  far = -u + 0.3 * np.linalg.norm(u) / np.sqrt(DIM) * rng.normal(size=(N_POOL - N_TARGET, DIM))
  return (np.concatenate([far, near]).astype(np.float32), target.astype(np.float32))


def test_kernel_mode_exact_rows_where_kernel_sums_underflow():
  pool, target = _far_rows_problem()
  c = cost_matrix(jnp.asarray(pool), jnp.asarray(target), cost_scale=0.005)  # up to 400
  ref = _pot_plan(c).sum(1)
  assert np.log(ref).min() < -150  # far below float32's smallest normal (exp(-87))
  out = solve_uot(cost=c, mode="kernel", threshold=1e-7)
  assert bool(out.converged) and not bool(out.log_domain)
  np.testing.assert_allclose(np.asarray(out.log_scores), np.log(ref), atol=1e-3)
  np.testing.assert_array_equal(np.sort(select_top_k(out.log_scores, N_TARGET)),
                                np.arange(N_POOL - N_TARGET, N_POOL))
  # Same through the features, with the cost built in chunks and the exact rows
  # rebuilt from the features (the dense cost is not kept).
  chunked = uot_scores(target_means=target, pool_means=pool, cost_scale=0.005,
                       mode="kernel", threshold=1e-7, chunk_size=16)
  np.testing.assert_allclose(np.asarray(chunked.log_scores), np.log(ref), atol=1e-3)


def test_kernel_mode_exact_columns_where_kernel_sums_underflow():
  # The mirror image: far target classes, a weak target-side penalty (tau_2 = 1)
  # and a strong pool-side one, so far columns get masses ~exp(-180).
  far_pool, far_target = _far_rows_problem(1)
  pool, target = far_target, far_pool  # 30 pool units, 120 target classes
  settings = dict(epsilon=1.0, tau_pool=100.0, tau_target=1.0)
  c = cost_matrix(jnp.asarray(pool), jnp.asarray(target), cost_scale=0.005)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    plan, log = ot.unbalanced.sinkhorn_unbalanced(
        np.ones(N_TARGET), np.ones(N_POOL), np.asarray(c, np.float64), reg=1.0,
        reg_m=(100.0, 1.0), reg_type="entropy", numItermax=50000, stopThr=1e-14, log=True)
  g_ref = log["logv"]  # g = eps log v
  assert np.log(plan.sum(0)).min() < -150
  dense = solve_uot(cost=c, mode="kernel", threshold=1e-7, **settings)
  chunked = uot_scores(target_means=target, pool_means=pool, cost_scale=0.005,
                       mode="kernel", threshold=1e-7, chunk_size=8, **settings)
  for out in (dense, chunked):
    assert not bool(out.log_domain) and bool(out.converged)
    np.testing.assert_allclose(np.asarray(out.g), g_ref, atol=2e-3)
    np.testing.assert_allclose(np.asarray(out.scores), plan.sum(1), rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [7, 64])
def test_chunked_cost_equals_dense(chunk_size):
  rng = np.random.default_rng(2)
  pool = rng.normal(size=(N_POOL, DIM)).astype(np.float32)
  target = rng.normal(size=(N_TARGET, DIM)).astype(np.float32)
  dense = uot_scores(target_means=target, pool_means=pool, threshold=1e-7)
  chunked = uot_scores(target_means=target, pool_means=pool, threshold=1e-7,
                       chunk_size=chunk_size)
  np.testing.assert_allclose(np.asarray(chunked.log_scores), np.asarray(dense.log_scores),
                             atol=2e-5)
  c = uot._chunked_cost(jnp.asarray(pool), jnp.asarray(target), cost="cosine",
                        cost_scale=0.01, chunk=chunk_size)
  np.testing.assert_allclose(
      np.asarray(c), np.asarray(cost_matrix(jnp.asarray(pool), jnp.asarray(target),
                                            cost_scale=0.01)), atol=1e-4)


def test_convergence_info_and_warning_when_the_cap_is_hit():
  cost = _random_cost(5, "cosine")
  with pytest.warns(RuntimeWarning, match="hit max_iterations=3"):
    short = solve_uot(cost=cost, max_iterations=3, threshold=1e-7)
  assert not bool(short.converged) and int(short.num_iterations) == 3
  errors = np.asarray(short.errors)
  assert errors.shape == (3,) and np.all(errors > 0)
  assert errors[-1] == float(short.error) > 1e-7
  # The reported error is the dual gradient of the returned potentials (float64 check).
  np.testing.assert_allclose(float(short.error),
                             _dual_gradient_error(cost, short.f, short.g, **PAPER),
                             rtol=1e-2)
  # Under jit the warning comes from a host callback.
  with pytest.warns(RuntimeWarning, match="did not converge in 1 of 1"):
    jax.block_until_ready(jax.jit(lambda c: solve_uot(cost=c, max_iterations=3))(cost))
  # Under vmap: one warning for the batch, counting the unconverged problems.
  costs = jnp.stack([cost, cost + 1.0])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.block_until_ready(jax.vmap(lambda c: solve_uot(cost=c, max_iterations=3))(costs))
  assert [str(w.message)[:45] for w in caught] == [
      "UOT Sinkhorn did not converge in 2 of 2 probl"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    full = solve_uot(cost=cost, threshold=1e-7)
  n = int(full.num_iterations)
  trace = np.asarray(full.errors)
  assert bool(full.converged) and 3 < n < 30
  assert np.all(trace[:n] >= 0) and np.all(trace[n:] == -1) and trace[n - 1] <= 1e-7
  # Over-relaxation (default, Young's optimal factor) against plain Sinkhorn.
  plain = solve_uot(cost=cost, threshold=1e-7, over_relaxation=1.0)
  assert int(plain.num_iterations) > 1.5 * n
  np.testing.assert_allclose(np.asarray(plain.scores), np.asarray(full.scores), rtol=1e-5)


def _pot_log_rows(cost, p=None, q=None, **kwargs):
  return np.log(_pot_plan(cost, p=p, q=q, **kwargs).sum(1))


@pytest.mark.parametrize("mode", ["kernel", "log"])
def test_grad_matches_finite_differences_of_pot(mode):
  rng = np.random.default_rng(4)
  n, m = 12, 5
  cost = rng.uniform(0.0, 4.0, size=(n, m)).astype(np.float32)
  q = rng.uniform(0.5, 2.0, m).astype(np.float32)
  w = rng.normal(size=n)
  settings = dict(epsilon=1.0, tau_pool=1.0, tau_target=10.0)

  def objective(c, q):
    out = solve_uot(cost=c, target_masses=q, mode=mode, threshold=1e-7, **settings)
    return jnp.sum(jnp.asarray(w, jnp.float32) * out.log_scores)

  g_cost, g_q = jax.jit(jax.grad(objective, argnums=(0, 1)))(cost, q)
  h = 1e-4
  for i, j in [(0, 0), (3, 2), (11, 4), (7, 1)]:
    up, down = cost.astype(np.float64), cost.astype(np.float64)
    up[i, j] += h
    down[i, j] -= h
    fd = w @ (_pot_log_rows(up, q=q, **settings) - _pot_log_rows(down, q=q, **settings))
    np.testing.assert_allclose(float(g_cost[i, j]), fd / (2 * h), rtol=2e-3, atol=1e-4)
  for j in [0, 3]:
    up, down = q.astype(np.float64), q.astype(np.float64)
    up[j] += h
    down[j] -= h
    fd = w @ (_pot_log_rows(cost, q=up, **settings) - _pot_log_rows(cost, q=down, **settings))
    np.testing.assert_allclose(float(g_q[j]), fd / (2 * h), rtol=2e-3, atol=1e-4)


def test_grad_through_features_and_vmap():
  rng = np.random.default_rng(6)
  pool = rng.normal(size=(N_POOL, DIM)).astype(np.float32)
  targets = rng.normal(size=(2, N_TARGET, DIM)).astype(np.float32)

  def loss(t):
    return jnp.sum(jax.vmap(lambda x: uot_scores(target_means=x, pool_means=pool,
                                                 cost_scale=0.1).log_scores[:5])(t))

  g = jax.grad(loss)(targets)
  assert g.shape == targets.shape and np.all(np.isfinite(np.asarray(g)))
  # Directional finite difference, float32 (cost_scale 0.1 keeps it well conditioned).
  d = rng.normal(size=targets.shape).astype(np.float32)
  h = 1e-2
  fd = (float(loss(targets + h * d)) - float(loss(targets - h * d))) / (2 * h)
  np.testing.assert_allclose(float(jnp.vdot(g, d)), fd, rtol=2e-2)


def test_module_examples_run():
  result = doctest.testmod(uot, verbose=False)
  assert result.attempted >= 10 and result.failed == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="fast"), "mode='fast' is not supported"),
    (dict(over_relaxation=2.5), "over_relaxation must be in"),
    (dict(pool_masses=-np.ones(4)), "pool_masses must be positive"),
    (dict(target_masses=np.ones(3)), r"target_masses must have shape \(2,\)"),
    (dict(cost=np.array([[0.0, np.nan]] * 4)), "cost contains NaN"),
    (dict(cost=np.ones(4)), "cost must be a non-empty 2-D"),
])
def test_solve_uot_bad_arguments_raise(kwargs, match):
  kwargs = {"cost": np.ones((4, 2), np.float32), **kwargs}
  with pytest.raises(ValueError, match=match):
    solve_uot(**kwargs)


def test_batched_and_chunk_arguments_raise():
  with pytest.raises(ValueError, match="must be 3-D"):
    uot_scores_batched(target_means=np.ones((3, 4)), pool_means=np.ones((5, 4)))
  with pytest.raises(ValueError, match="feature dim 6"):
    uot_scores_batched(target_means=np.ones((2, 3, 6)), pool_means=np.ones((5, 4)))
  with pytest.raises(ValueError, match="NaN/inf"):
    uot_scores_batched(target_means=np.full((2, 3, 4), np.nan), pool_means=np.ones((5, 4)))
  with pytest.raises(ValueError, match="chunk_size must be"):
    uot_scores(target_means=np.ones((3, 4)), pool_means=np.ones((5, 4)), chunk_size=0)

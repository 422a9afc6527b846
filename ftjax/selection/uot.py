"""Pre-training data selection by unbalanced optimal transport (UOT).

Implements the UOT selection of "Improved Fine-Tuning by Better Leveraging
Pre-Training Data" (papers/uot-data-reuse.txt, Eq. 5). Each selection unit (a
pre-training class or a k-means cluster) and each target class is summarised by
the mean of its pretrained features. The plan ``P`` of

  min_P <P, C> - eps h(P) + tau_1 KL(P 1 | w_pool) + tau_2 KL(P^T 1 | w_target)

is solved with ott-jax's log-domain generalised Sinkhorn; unit ``i`` is scored by
its row mass ``(P 1)_i``. A small ``tau_1`` (pool side) lets the pool marginal
shrink freely, a large ``tau_2`` (target side) forces every target class to be
covered, so the row masses rank the units by similarity to the target set.

Masses: the paper gives every class/cluster *unit weight* ``w = 1`` on both
sides ("all classes or clusters are assigned with unit weights"), so both
marginals are vectors of ones (not uniform probabilities). With unit masses the
entropic term ``-h(P) = sum P log P - P`` and ``KL(P | 1 1^T)`` differ only by a
constant, so the solution does not depend on which of the two is meant.

In ott-jax the marginal penalties are parameterised by
``tau = rho / (rho + eps)`` where ``rho`` is the KL weight of Eq. 5, so the
paper's defaults (eps = 1, tau_1 = 1, tau_2 = 100) become ``tau_a = 0.5`` and
``tau_b = 100 / 101``. This matches POT's
``ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg=eps, reg_m=(tau_1, tau_2),
reg_type="entropy")``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

COSTS = ("cosine", "sqeuclidean", "euclidean")
# Residual checked every 5 iterations: at the paper's settings the residual
# halves per iteration, so checking every 10 (ott's default) wastes up to 9
# iterations, which costs more than the extra checks.
_INNER_ITERATIONS = 5


class UOTScores(NamedTuple):
  """Result of :func:`uot_scores`.

  Attributes:
    scores: ``[n_pool]`` row masses ``(P 1)_i`` of the UOT plan; larger means
      more similar to the target set.
    log_scores: ``[n_pool]`` natural log of ``scores``, computed from the dual
      potentials without underflow (use it to rank when masses are tiny).
    plan: ``[n_pool, n_target]`` transport plan, or ``None`` unless
      ``return_plan=True``.
    converged: whether the Sinkhorn residual fell below the threshold.
    num_iterations: Sinkhorn iterations run (a multiple of 5: the residual is
      checked every 5 iterations).
    error: final optimality residual (L1 norm over both marginals, absolute).
    errors: ott's residual trace, one entry per 5 iterations, ``-1`` where not
      computed.
  """

  scores: jax.Array
  log_scores: jax.Array
  plan: jax.Array | None
  converged: jax.Array
  num_iterations: jax.Array
  error: jax.Array
  errors: jax.Array


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def validate_features(name: str, x, dim: int | None = None) -> None:
  """Raises ValueError if ``x`` is not a finite 2-D array (optionally of width dim).

  Checks are skipped for tracers (inside ``jit``/``vmap``), where values are
  unknown; shapes are still checked whenever they are known.
  """
  shape = np.shape(x)
  if len(shape) != 2:
    raise ValueError(f"{name} must be 2-D [num_rows, feature_dim], got shape {shape}")
  if shape[0] == 0:
    raise ValueError(f"{name} must have at least one row, got shape {shape}")
  if dim is not None and shape[1] != dim:
    raise ValueError(
        f"{name} has feature dim {shape[1]} but the other input has {dim}; "
        "they must match")
  if _is_concrete(x):
    values = np.asarray(x)
    if not np.all(np.isfinite(values)):
      bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
      raise ValueError(f"{name} contains {bad} NaN/inf values; features must be finite")


def _check_choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed values: {allowed}")


def _check_positive(**kwargs) -> None:
  for name, value in kwargs.items():
    if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
      raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def cost_matrix(pool: jax.Array, target: jax.Array, *, cost: str = "cosine",
                cost_scale: float = 1.0) -> jax.Array:
  """Pairwise cost ``[n_pool, n_target]`` divided by ``cost_scale``.

  ``cosine``: ``1 - cos(pool_i, target_j)`` (paper Sec. 4.1);
  ``sqeuclidean``: ``||pool_i - target_j||^2``; ``euclidean``: its square root.
  """
  _check_choice("cost", cost, COSTS)
  if cost == "cosine":
    # A tiny floor keeps zero rows finite; callers validate real inputs.
    p = pool * jax.lax.rsqrt(jnp.maximum(jnp.sum(pool * pool, -1, keepdims=True), 1e-30))
    t = target * jax.lax.rsqrt(jnp.maximum(jnp.sum(target * target, -1, keepdims=True), 1e-30))
    c = 1.0 - p @ t.T
  else:
    sq = (jnp.sum(pool * pool, -1)[:, None] + jnp.sum(target * target, -1)[None, :]
          - 2.0 * pool @ target.T)
    sq = jnp.maximum(sq, 0.0)
    c = sq if cost == "sqeuclidean" else jnp.sqrt(sq)
  return c / cost_scale


@functools.partial(
    jax.jit,
    static_argnames=("epsilon", "tau_pool", "tau_target", "cost_scale", "cost",
                     "max_iterations", "threshold", "return_plan"))
def _uot_scores(target_means, pool_means, *, epsilon, tau_pool, tau_target,
                cost_scale, cost, max_iterations, threshold, return_plan):
  dtype = jnp.result_type(pool_means.dtype, target_means.dtype, jnp.float32)
  pool_means = pool_means.astype(dtype)
  target_means = target_means.astype(dtype)
  c = cost_matrix(pool_means, target_means, cost=cost, cost_scale=cost_scale)
  n_pool, n_target = c.shape
  geom = geometry.Geometry(cost_matrix=c, epsilon=epsilon)
  problem = linear_problem.LinearProblem(
      geom, jnp.ones((n_pool,), dtype), jnp.ones((n_target,), dtype),
      tau_a=tau_pool / (tau_pool + epsilon),
      tau_b=tau_target / (tau_target + epsilon))
  # ott's residual is an absolute L1 norm over both marginals; the threshold is
  # per unit of input mass so that it means the same for any problem size.
  solver = sinkhorn.Sinkhorn(
      lse_mode=True, threshold=threshold * (n_pool + n_target),
      max_iterations=max_iterations, inner_iterations=_INNER_ITERATIONS)
  out = solver(problem)
  # P_ij = exp((f_i + g_j - C_ij) / eps)  =>  log (P 1)_i in closed form.
  log_scores = (out.f / epsilon
                + jax.nn.logsumexp((out.g[None, :] - c) / epsilon, axis=1))
  errors = out.errors
  computed = errors >= 0
  last = jnp.maximum(jnp.sum(computed) - 1, 0)
  return UOTScores(
      scores=jnp.exp(log_scores),
      log_scores=log_scores,
      plan=out.matrix if return_plan else None,
      converged=jnp.asarray(out.converged),
      num_iterations=out.n_iters,
      error=errors[last],
      errors=errors)


def uot_scores(*, target_means: jax.Array, pool_means: jax.Array,
               epsilon: float = 1.0, tau_pool: float = 1.0,
               tau_target: float = 100.0, cost_scale: float = 0.01,
               cost: str = "cosine", max_iterations: int = 2000,
               threshold: float = 1e-5, return_plan: bool = False) -> UOTScores:
  """Scores pool units by their UOT row mass towards the target classes (Eq. 5).

  Solves Eq. 5 of the UOT data-reuse paper between the pool measure
  ``{(pool_means[i], 1)}`` and the target measure ``{(target_means[j], 1)}``
  with cost ``C_ij = (1 - cos(pool_i, target_j)) / cost_scale`` and returns the
  row masses ``(P 1)_i``. Pure and jitted (hyper-parameters are static); it
  can be ``jax.vmap``-ed over a stack of target sets sharing one pool.

  Args:
    target_means: ``[n_target, d]`` per-class mean features of the target set.
    pool_means: ``[n_pool, d]`` per-unit mean features of the pre-training pool.
    epsilon: entropic regularisation ``eps`` (paper: 1.0).
    tau_pool: KL weight ``tau_1`` on the pool marginal (paper: 1.0).
    tau_target: KL weight ``tau_2`` on the target marginal (paper: 100.0).
    cost_scale: ``eps_c`` dividing the cost (paper text 0.01; authors' code 0.1).
    cost: ``"cosine"`` (paper), ``"sqeuclidean"`` or ``"euclidean"``.
    max_iterations: Sinkhorn iteration cap.
    threshold: stop when ott's L1 optimality residual over both marginals is
      below ``threshold * (n_pool + n_target)``. In float32 the residual
      floor is about 1e-7..1e-6 per unit mass, so go lower only in float64.
    return_plan: also return the ``[n_pool, n_target]`` plan.

  Returns:
    A :class:`UOTScores`.

  Raises:
    ValueError: non-2-D inputs, mismatched feature dims, NaN/inf features, or
      bad hyper-parameters. Value checks (NaN/inf) need concrete arrays and are
      skipped under ``jit``/``vmap`` tracing; shape checks always run.

  Example:
    >>> out = uot_scores(target_means=t, pool_means=p)
    >>> top = select_top_k(out.scores, k=100)
    >>> many = jax.vmap(lambda t: uot_scores(target_means=t, pool_means=p))(ts)
  """
  _check_choice("cost", cost, COSTS)
  _check_positive(epsilon=epsilon, tau_pool=tau_pool, tau_target=tau_target,
                  cost_scale=cost_scale, threshold=threshold)
  if not (isinstance(max_iterations, int) and max_iterations > 0):
    raise ValueError(f"max_iterations must be a positive int, got {max_iterations!r}")
  validate_features("pool_means", pool_means)
  validate_features("target_means", target_means, dim=np.shape(pool_means)[1])
  return _uot_scores(
      jnp.asarray(target_means), jnp.asarray(pool_means),
      epsilon=float(epsilon), tau_pool=float(tau_pool),
      tau_target=float(tau_target), cost_scale=float(cost_scale), cost=cost,
      max_iterations=int(max_iterations), threshold=float(threshold),
      return_plan=bool(return_plan))


def select_top_k(scores: jax.Array, k: int) -> np.ndarray:
  """Indices of the ``k`` largest scores, descending; ties keep index order.

  Args:
    scores: ``[n]`` finite scores (e.g. ``UOTScores.scores`` or ``log_scores``).
    k: how many to select, ``1 <= k <= n``.

  Returns:
    ``int64`` NumPy array of ``k`` indices.

  Example:
    >>> select_top_k(jnp.array([0.1, 0.5, 0.5, 0.2]), 2)
    array([1, 2])
  """
  values = np.asarray(scores)
  if values.ndim != 1:
    raise ValueError(f"scores must be 1-D, got shape {values.shape}")
  if not (isinstance(k, (int, np.integer)) and 1 <= k <= values.shape[0]):
    raise ValueError(f"k must be an int in [1, {values.shape[0]}], got {k!r}")
  if np.any(np.isnan(values)):
    raise ValueError("scores contain NaN; cannot rank")
  # Stable sort of the negated scores: descending with ties in index order.
  return np.argsort(-values, kind="stable")[:k].astype(np.int64)


def class_means(*, features: jax.Array, labels: jax.Array,
                num_classes: int) -> jax.Array:
  """Per-class mean of ``features`` (the paper's ``a_i`` / ``b_j``).

  Args:
    features: ``[n, d]`` features.
    labels: ``[n]`` integer labels in ``[0, num_classes)``.
    num_classes: number of classes.

  Returns:
    ``[num_classes, d]`` means. A class with no example gets a row of NaN
    (under jit; no error can be raised there) -- with concrete inputs an empty
    class raises ValueError instead, naming the empty classes.
  """
  if not (isinstance(num_classes, (int, np.integer)) and num_classes > 0):
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  validate_features("features", features)
  if np.shape(labels) != (np.shape(features)[0],):
    raise ValueError(
        f"labels must have shape ({np.shape(features)[0]},), got {np.shape(labels)}")
  if _is_concrete(labels):
    lab = np.asarray(labels)
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
      raise ValueError(
          f"labels must be in [0, {num_classes}), got range [{lab.min()}, {lab.max()}]")
    counts = np.bincount(lab, minlength=num_classes)
    if np.any(counts == 0):
      empty = np.flatnonzero(counts == 0)
      raise ValueError(f"classes {empty[:10].tolist()} have no examples "
                       f"({empty.size} empty of {num_classes})")
  return _class_means(jnp.asarray(features), jnp.asarray(labels), num_classes)


@functools.partial(jax.jit, static_argnums=2)
def _class_means(features, labels, num_classes):
  sums = jax.ops.segment_sum(features, labels, num_segments=num_classes)
  counts = jax.ops.segment_sum(jnp.ones_like(labels, features.dtype), labels,
                               num_segments=num_classes)
  return sums / counts[:, None]  # 0 / 0 -> NaN for empty classes

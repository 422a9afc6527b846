"""Pre-training data selection by unbalanced optimal transport (UOT).

Implements the UOT selection of "Improved Fine-Tuning by Better Leveraging
Pre-Training Data" (papers/uot-data-reuse.txt, Eq. 5). Each selection unit (a
pre-training class or a k-means cluster) and each target class is summarised by
the mean of its pretrained features. The plan ``P`` of

  min_P <P, C> - eps h(P) + tau_1 KL(P 1 | w_pool) + tau_2 KL(P^T 1 | w_target)

is solved with a jitted generalised Sinkhorn (``ftjax.selection.uot_sinkhorn``:
kernel-space iterations with the cost shifted by the potentials of the
eps -> 0 problem, over-relaxed, log domain as the automatic fallback for small
eps); unit ``i`` is scored by its row mass ``(P 1)_i``. A small ``tau_1`` (pool
side) lets the pool marginal shrink freely, a large ``tau_2`` (target side)
forces every target class to be covered, so the row masses rank the units by
similarity to the target set.

The problem is apart from the solver, as in ott-jax: :func:`cost_matrix` builds
the cost, :func:`solve_uot` solves Eq. 5 for any cost (and masses);
:func:`uot_scores` does both from feature means, :func:`uot_scores_batched` for
a stack of target sets sharing one pool.

Masses: the paper gives every class/cluster *unit weight* ``w = 1`` on both
sides ("all classes or clusters are assigned with unit weights"), so both
marginals are vectors of ones (not uniform probabilities). With unit masses the
entropic term ``-h(P) = sum P log P - P`` and ``KL(P | 1 1^T)`` differ only by a
constant, so the solution does not depend on which of the two is meant. With
other masses :func:`solve_uot` uses ``KL(P | p q^T)`` (POT's default
``reg_type="kl"``).

In ott-jax the marginal penalties are parameterised by
``tau = rho / (rho + eps)`` where ``rho`` is the KL weight of Eq. 5, so the
paper's defaults (eps = 1, tau_1 = 1, tau_2 = 100) become ``tau_a = 0.5`` and
``tau_b = 100 / 101``. This matches POT's
``ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg=eps, reg_m=(tau_1, tau_2),
reg_type="entropy")``.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.core.errors import is_concrete
from ftjax.selection import uot_sinkhorn

COSTS = ("cosine", "sqeuclidean", "euclidean")
MODES = ("auto", "kernel", "log")
# Rows of the cost built at a time when the cost is chunked (uot_scores): about
# this many bytes per chunk.
_CHUNK_BYTES = 32 * 2**20


class UOTScores(NamedTuple):
  """Result of :func:`uot_scores`, :func:`uot_scores_batched` and :func:`solve_uot`.

  Attributes:
    scores: ``[n_pool]`` row masses ``(P 1)_i`` of the UOT plan; larger means
      more similar to the target set.
    log_scores: ``[n_pool]`` natural log of ``scores``, computed without
      underflow (use it to rank when masses are tiny).
    plan: ``[n_pool, n_target]`` transport plan, or ``None`` unless
      ``return_plan=True``.
    converged: whether the marginal error fell to the threshold.
    num_iterations: Sinkhorn iterations run (each updates both potentials).
    error: final marginal error: the L1 norm of the dual gradient,
      ``||P 1 - p exp(-f / tau_1)||_1 + ||P^T 1 - q exp(-g / tau_2)||_1``
      (ott-jax's residual for unbalanced problems; zero at the optimum),
      divided by the total mass ``sum p + sum q``.
    errors: ``[max_iterations]`` error after each iteration, ``-1`` after the
      last.
    log_domain: ``True`` when the log-domain iterations were used, ``False``
      for kernel space (chosen by ``mode``; "auto" picks kernel space unless
      eps is small relative to the KL weights, see ``uot_sinkhorn``).
    f: ``[n_pool]`` dual potential of the pool side.
    g: ``[n_target]`` dual potential of the target side; the plan is
      ``P_ij = p_i q_j exp((f_i + g_j - C_ij) / eps)``.
  """

  scores: jax.Array
  log_scores: jax.Array
  plan: jax.Array | None
  converged: jax.Array
  num_iterations: jax.Array
  error: jax.Array
  errors: jax.Array
  log_domain: jax.Array | None = None
  f: jax.Array | None = None
  g: jax.Array | None = None


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
  if is_concrete(x):
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


def _check_solver_options(*, epsilon, tau_pool, tau_target, threshold, max_iterations,
                          mode, over_relaxation) -> None:
  _check_choice("mode", mode, MODES)
  _check_positive(epsilon=epsilon, tau_pool=tau_pool, tau_target=tau_target,
                  threshold=threshold)
  if not (isinstance(max_iterations, (int, np.integer)) and max_iterations > 0):
    raise ValueError(f"max_iterations must be a positive int, got {max_iterations!r}")
  if over_relaxation is not None and not (
      isinstance(over_relaxation, (int, float)) and 0 < over_relaxation < 2):
    raise ValueError(f"over_relaxation must be in (0, 2) or None, got {over_relaxation!r}")


def _normalize_rows(x):
  # A tiny floor keeps zero rows finite; callers validate real inputs.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-30))


def cost_matrix(pool: jax.Array, target: jax.Array, *, cost: str = "cosine",
                cost_scale: float = 1.0) -> jax.Array:
  """Pairwise cost ``[n_pool, n_target]`` divided by ``cost_scale``.

  ``cosine``: ``1 - cos(pool_i, target_j)`` (paper Sec. 4.1);
  ``sqeuclidean``: ``||pool_i - target_j||^2``; ``euclidean``: its square root.
  """
  _check_choice("cost", cost, COSTS)
  if cost == "cosine":
    c = 1.0 - _normalize_rows(pool) @ _normalize_rows(target).T
  else:
    sq = (jnp.sum(pool * pool, -1)[:, None] + jnp.sum(target * target, -1)[None, :]
          - 2.0 * pool @ target.T)
    sq = jnp.maximum(sq, 0.0)
    c = sq if cost == "sqeuclidean" else jnp.sqrt(sq)
  return c / cost_scale


def _row_chunks(n_rows: int, chunk: int):
  """Start offsets of row chunks of size ``chunk`` covering ``n_rows`` (the last
  one moved back so that it ends at ``n_rows``; overlapping rows are recomputed)."""
  count = -(-n_rows // chunk)
  return jnp.minimum(jnp.arange(count) * chunk, n_rows - chunk)


def _chunked_cost(pool, target, *, cost, cost_scale, chunk):
  """:func:`cost_matrix` built ``chunk`` rows at a time (no full-size temporaries)."""
  n_pool = pool.shape[0]
  target = _normalize_rows(target) if cost == "cosine" else target
  starts = _row_chunks(n_pool, chunk)

  def body(k, out):
    rows = jax.lax.dynamic_slice_in_dim(pool, starts[k], chunk, axis=0)
    if cost == "cosine":
      block = (1.0 - _normalize_rows(rows) @ target.T) / cost_scale
    else:
      block = cost_matrix(rows, target, cost=cost, cost_scale=cost_scale)
    return jax.lax.dynamic_update_slice_in_dim(out, block, starts[k], axis=0)

  out = jnp.zeros((n_pool, target.shape[0]), pool.dtype)
  return jax.lax.fori_loop(0, starts.shape[0], body, out)


def _chunked_lse(potential, features, axis, *, epsilon, cost, cost_scale, chunk):
  """Exact log-sum-exps of the solver's fallback (unit masses), rebuilding the
  cost ``chunk`` rows at a time from the features: axis 1 (rows),
  ``log sum_j exp((g_j - C_ij) / eps)``; axis 0 (columns),
  ``log sum_i exp((f_i - C_ij) / eps)``."""
  pool, target = features
  n_pool, n_target = pool.shape[0], target.shape[0]
  starts = _row_chunks(n_pool, chunk)

  def block(k):
    rows = jax.lax.dynamic_slice_in_dim(pool, starts[k], chunk, axis=0)
    return cost_matrix(rows, target, cost=cost, cost_scale=cost_scale)

  if axis == 1:
    def body(k, out):
      lse = jax.nn.logsumexp((potential[None, :] - block(k)) / epsilon, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(out, lse, starts[k], axis=0)

    return jax.lax.fori_loop(0, starts.shape[0], body,
                             jnp.zeros(n_pool, potential.dtype))

  def body(k, state):  # running log-sum-exp over row chunks
    top, total = state
    f = jax.lax.dynamic_slice_in_dim(potential, starts[k], chunk)
    z = (f[:, None] - block(k)) / epsilon
    # The last chunk is moved back to end at n_pool: skip the rows seen before.
    seen = starts[k] + jnp.arange(chunk) < k * chunk
    z = jnp.where(seen[:, None], -jnp.inf, z)
    new_top = jnp.maximum(top, jnp.max(z, axis=0))
    total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(z - new_top), axis=0)
    return new_top, total

  init = (jnp.full(n_target, -jnp.inf, potential.dtype), jnp.zeros(n_target, potential.dtype))
  top, total = jax.lax.fori_loop(0, starts.shape[0], body, init)
  return top + jnp.log(total)


def _warn_not_converged(converged, error, threshold, max_iterations):
  converged = np.asarray(converged)
  if not np.all(converged):
    bad = int(np.size(converged) - np.count_nonzero(converged))
    worst = float(np.max(np.where(converged, -np.inf, np.asarray(error))))
    warnings.warn(
        f"UOT Sinkhorn did not converge in {bad} of {np.size(converged)} problem(s): "
        f"hit max_iterations={max_iterations} (or a non-finite value) with marginal "
        f"error {worst:.3g} > threshold {threshold:.3g}; raise max_iterations or "
        "threshold, or check the inputs", RuntimeWarning, stacklevel=3)


def _warn_from_host(converged, error, *, threshold, max_iterations):
  """Host callback that warns about unconverged problems; one call per vmapped
  batch (plain ``jax.debug.callback`` would call back once per problem)."""
  warn = functools.partial(_warn_not_converged, threshold=threshold,
                           max_iterations=max_iterations)

  @jax.custom_batching.custom_vmap
  def hook(converged, error):
    jax.debug.callback(warn, converged, error)
    return converged

  @hook.def_vmap
  def hook_vmap(axis_size, in_batched, converged, error):
    del axis_size
    converged_b, error_b = in_batched
    if converged_b != error_b:  # broadcast the unbatched one
      n = (converged if converged_b else error).shape[0]
      converged = converged if converged_b else jnp.broadcast_to(converged, (n,) + converged.shape)
      error = error if error_b else jnp.broadcast_to(error, (n,) + error.shape)
    return hook(converged, error), converged_b or error_b

  # No gradient flows into the hook (custom_vmap functions cannot be linearised).
  hook(jax.lax.stop_gradient(converged), jax.lax.stop_gradient(error))


def _finish(cost_mat, out, *, epsilon, log_p, log_q, return_plan, warn_traced,
            threshold, max_iterations):
  plan = None
  if return_plan:
    plan = jnp.exp(log_p[:, None] + log_q[None, :]
                   + (out.f[:, None] + out.g[None, :] - cost_mat) / epsilon)
  if warn_traced:
    # Traced by the caller's jit/vmap: no Python value to test, warn from the host.
    _warn_from_host(out.converged, out.error, threshold=threshold,
                    max_iterations=max_iterations)
  return UOTScores(
      scores=jnp.exp(out.log_row_masses), log_scores=out.log_row_masses, plan=plan,
      converged=out.converged, num_iterations=out.num_iterations, error=out.error,
      errors=out.errors, log_domain=out.log_domain, f=out.f, g=out.g)


_SOLVER_STATIC = ("epsilon", "tau_pool", "tau_target", "log_domain", "omega",
                  "max_iterations", "threshold", "return_plan", "warn_traced")


def _solver_kwargs(out_static):
  return {k: out_static[k] for k in ("epsilon", "tau_pool", "tau_target", "log_domain",
                                     "omega", "max_iterations", "threshold")}


@functools.partial(jax.jit, static_argnames=_SOLVER_STATIC)
def _solve_uot(cost, pool_masses, target_masses, **static):
  log_p = (jnp.zeros(cost.shape[0], cost.dtype) if pool_masses is None
           else jnp.log(pool_masses.astype(cost.dtype)))
  log_q = (jnp.zeros(cost.shape[1], cost.dtype) if target_masses is None
           else jnp.log(target_masses.astype(cost.dtype)))
  out = uot_sinkhorn.sinkhorn_uot(cost=cost, log_p=log_p, log_q=log_q,
                                  **_solver_kwargs(static))
  # Checked here (one fused pass) rather than on the host: a host check of a
  # 100,000 x 1,000 cost copies and scans 400 MB.
  finite = jnp.all(jnp.isfinite(cost))
  return _finish(cost, out, epsilon=static["epsilon"], log_p=log_p, log_q=log_q,
                 return_plan=static["return_plan"], warn_traced=static["warn_traced"],
                 threshold=static["threshold"],
                 max_iterations=static["max_iterations"]), finite


def _scores_from_features(target_means, pool_means, *, cost, cost_scale, chunk_size,
                          **static):
  """Cost from features, then the solver (traced; vmapped by the batched entry)."""
  dtype = jnp.result_type(pool_means.dtype, target_means.dtype, jnp.float32)
  pool_means = pool_means.astype(dtype)
  target_means = target_means.astype(dtype)
  n_pool, n_target = pool_means.shape[0], target_means.shape[0]
  log_p = jnp.zeros(n_pool, dtype)
  log_q = jnp.zeros(n_target, dtype)
  chunked = chunk_size < n_pool
  if chunked:
    c = _chunked_cost(pool_means, target_means, cost=cost, cost_scale=cost_scale,
                      chunk=chunk_size)
  else:
    c = cost_matrix(pool_means, target_means, cost=cost, cost_scale=cost_scale)
  exact = extra = None
  if chunked and not static["log_domain"] and not static["return_plan"]:
    # Rebuild the cost rows from the features if a row's kernel sum underflows,
    # so that the dense cost is released once the kernel is built.
    exact = functools.partial(_chunked_lse, epsilon=static["epsilon"], cost=cost,
                              cost_scale=cost_scale, chunk=chunk_size)
    extra = (pool_means, target_means)
  out = uot_sinkhorn.sinkhorn_uot(cost=c, log_p=log_p, log_q=log_q,
                                  exact_lse=exact, extra=extra,
                                  **_solver_kwargs(static))
  return _finish(c, out, epsilon=static["epsilon"], log_p=log_p, log_q=log_q,
                 return_plan=static["return_plan"], warn_traced=static["warn_traced"],
                 threshold=static["threshold"], max_iterations=static["max_iterations"])


_FEATURE_STATIC = _SOLVER_STATIC + ("cost", "cost_scale", "chunk_size")


@functools.partial(jax.jit, static_argnames=_FEATURE_STATIC)
def _uot_scores(target_means, pool_means, **static):
  return _scores_from_features(target_means, pool_means, **static)


@functools.partial(jax.jit, static_argnames=_FEATURE_STATIC)
def _uot_scores_batched(target_means, pool_means, **static):
  return jax.vmap(lambda t: _scores_from_features(t, pool_means, **static))(target_means)


def _resolve(*, n_pool, n_target, dtype, epsilon, tau_pool, tau_target, mode,
             over_relaxation):
  log_domain = uot_sinkhorn.use_log_domain(
      mode, n_pool, n_target, dtype, epsilon=float(epsilon), tau_pool=float(tau_pool),
      tau_target=float(tau_target))
  omega = (uot_sinkhorn.optimal_relaxation(epsilon=float(epsilon), tau_pool=float(tau_pool),
                                           tau_target=float(tau_target))
           if over_relaxation is None else float(over_relaxation))
  return log_domain, omega


def _feature_call(fn, target_means, pool_means, *, epsilon, tau_pool, tau_target,
                  cost_scale, cost, max_iterations, threshold, return_plan, mode,
                  over_relaxation, chunk_size):
  _check_choice("cost", cost, COSTS)
  _check_positive(cost_scale=cost_scale)
  _check_solver_options(epsilon=epsilon, tau_pool=tau_pool, tau_target=tau_target,
                        threshold=threshold, max_iterations=max_iterations, mode=mode,
                        over_relaxation=over_relaxation)
  if chunk_size is not None and not (isinstance(chunk_size, (int, np.integer))
                                     and chunk_size > 0):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  n_pool, n_target = np.shape(pool_means)[0], np.shape(target_means)[-2]
  # What the jitted call will compute in (float64 only with jax_enable_x64).
  dtype = jax.dtypes.canonicalize_dtype(np.result_type(
      getattr(pool_means, "dtype", np.float32), getattr(target_means, "dtype", np.float32),
      np.float32))
  if chunk_size is None:
    chunk_size = max(1, _CHUNK_BYTES // (jnp.dtype(dtype).itemsize * n_target))
  log_domain, omega = _resolve(
      n_pool=n_pool, n_target=n_target, dtype=dtype, epsilon=epsilon, tau_pool=tau_pool,
      tau_target=tau_target, mode=mode, over_relaxation=over_relaxation)
  concrete = is_concrete(target_means) and is_concrete(pool_means)
  out = fn(jnp.asarray(target_means), jnp.asarray(pool_means),
           epsilon=float(epsilon), tau_pool=float(tau_pool), tau_target=float(tau_target),
           cost_scale=float(cost_scale), cost=cost, chunk_size=int(min(chunk_size, n_pool)),
           log_domain=log_domain, omega=omega, max_iterations=int(max_iterations),
           threshold=float(threshold), return_plan=bool(return_plan),
           warn_traced=not concrete)
  if concrete:
    _warn_not_converged(out.converged, out.error, float(threshold), int(max_iterations))
  return out


def uot_scores(*, target_means: jax.Array, pool_means: jax.Array,
               epsilon: float = 1.0, tau_pool: float = 1.0,
               tau_target: float = 100.0, cost_scale: float = 0.01,
               cost: str = "cosine", max_iterations: int = 2000,
               threshold: float = 1e-5, return_plan: bool = False,
               mode: str = "auto", over_relaxation: float | None = None,
               chunk_size: int | None = None) -> UOTScores:
  """Scores pool units by their UOT row mass towards the target classes (Eq. 5).

  Solves Eq. 5 of the UOT data-reuse paper between the pool measure
  ``{(pool_means[i], 1)}`` and the target measure ``{(target_means[j], 1)}``
  with cost ``C_ij = (1 - cos(pool_i, target_j)) / cost_scale`` and returns the
  row masses ``(P 1)_i``. Pure and jitted (hyper-parameters are static); it
  can be ``jax.vmap``-ed over a stack of target sets sharing one pool (or use
  :func:`uot_scores_batched`), and ``jax.grad``-ed (implicit differentiation
  of the Sinkhorn fixed point).

  Args:
    target_means: ``[n_target, d]`` per-class mean features of the target set.
    pool_means: ``[n_pool, d]`` per-unit mean features of the pre-training pool.
    epsilon: entropic regularisation ``eps`` (paper: 1.0).
    tau_pool: KL weight ``tau_1`` on the pool marginal (paper: 1.0).
    tau_target: KL weight ``tau_2`` on the target marginal (paper: 100.0).
    cost_scale: ``eps_c`` dividing the cost (paper text 0.01; authors' code 0.1).
    cost: ``"cosine"`` (paper), ``"sqeuclidean"`` or ``"euclidean"``.
    max_iterations: Sinkhorn iteration cap; hitting it warns (``RuntimeWarning``).
    threshold: stop when the marginal error (``UOTScores.error``: the dual
      gradient's L1 norm per unit of input mass, ott-jax's residual) is at
      most this. In float32 its floor is about 5e-9 at the paper's settings,
      higher for small eps (rounding of ``C / eps``: ~1e-6 at ``C / eps``
      ~ 40).
    return_plan: also return the ``[n_pool, n_target]`` plan.
    mode: ``"auto"`` (kernel-space iterations unless eps is too small relative
      to the KL weights for float32, then log domain), ``"kernel"`` or
      ``"log"``. The mode used is ``UOTScores.log_domain``.
    over_relaxation: factor ``omega`` of the over-relaxed updates; ``None``
      uses Young's optimal ``2 / (1 + sqrt(1 - lambda_1 lambda_2))`` (1.17 at
      the paper's settings), ``1.0`` is plain Sinkhorn.
    chunk_size: pool rows of the cost built at a time; ``None`` picks about
      32 MB per chunk. When the cost has more rows than this, the dense cost
      is released once the kernel is built (kernel mode without
      ``return_plan``), so the peak holds one ``[n_pool, n_target]`` matrix.

  Returns:
    A :class:`UOTScores`.

  Raises:
    ValueError: non-2-D inputs, mismatched feature dims, NaN/inf features, or
      bad hyper-parameters. Value checks (NaN/inf) need concrete arrays and are
      skipped under ``jit``/``vmap`` tracing; shape checks always run.

  Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> pool = rng.normal(size=(40, 16)).astype(np.float32)
    >>> target = pool[:4] + 0.1 * rng.normal(size=(4, 16)).astype(np.float32)
    >>> out = uot_scores(target_means=target, pool_means=pool)
    >>> sorted(select_top_k(out.scores, k=4).tolist())
    [0, 1, 2, 3]
    >>> bool(out.converged), bool(out.log_domain), bool(out.error <= 1e-5)
    (True, False, True)
    >>> many = jax.vmap(lambda t: uot_scores(target_means=t, pool_means=pool))(
    ...     jnp.stack([target, target[::-1]]))
    >>> many.scores.shape
    (2, 40)
  """
  validate_features("pool_means", pool_means)
  validate_features("target_means", target_means, dim=np.shape(pool_means)[1])
  return _feature_call(
      _uot_scores, target_means, pool_means, epsilon=epsilon, tau_pool=tau_pool,
      tau_target=tau_target, cost_scale=cost_scale, cost=cost,
      max_iterations=max_iterations, threshold=threshold, return_plan=return_plan,
      mode=mode, over_relaxation=over_relaxation, chunk_size=chunk_size)


def uot_scores_batched(*, target_means: jax.Array, pool_means: jax.Array,
                       epsilon: float = 1.0, tau_pool: float = 1.0,
                       tau_target: float = 100.0, cost_scale: float = 0.01,
                       cost: str = "cosine", max_iterations: int = 2000,
                       threshold: float = 1e-5, return_plan: bool = False,
                       mode: str = "auto", over_relaxation: float | None = None,
                       chunk_size: int | None = None) -> UOTScores:
  """:func:`uot_scores` for a stack of target sets sharing one pool (Eq. 5 each).

  Equivalent to ``jax.vmap`` of :func:`uot_scores` over ``target_means`` (one
  compiled call; the pool is normalised once). Every field of the result gets
  a leading ``[num_tasks]`` axis; each problem stops at its own iteration.

  Args:
    target_means: ``[num_tasks, n_target, d]`` per-class means of each target
      set (stack sets with the same number of classes).
    pool_means: ``[n_pool, d]`` per-unit mean features of the shared pool.
    epsilon, tau_pool, tau_target, cost_scale, cost, max_iterations, threshold,
    return_plan, mode, over_relaxation, chunk_size: as in :func:`uot_scores`.

  Returns:
    A :class:`UOTScores` with a leading task axis.

  Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> pool = rng.normal(size=(40, 16)).astype(np.float32)
    >>> tasks = np.stack([pool[:4], pool[10:14]]) + 0.1
    >>> out = uot_scores_batched(target_means=tasks, pool_means=pool)
    >>> [sorted(select_top_k(s, k=4).tolist()) for s in out.scores]
    [[0, 1, 2, 3], [10, 11, 12, 13]]
  """
  validate_features("pool_means", pool_means)
  shape = np.shape(target_means)
  if len(shape) != 3 or shape[0] == 0:
    raise ValueError("target_means must be 3-D [num_tasks, n_target, d] with at least "
                     f"one task, got shape {shape}")
  # Each task is one [n_target, d] set: same checks as uot_scores, all at once.
  validate_features("target_means (tasks stacked)",
                    np.reshape(target_means, (-1, shape[2]))
                    if is_concrete(target_means) else
                    jnp.reshape(target_means, (-1, shape[2])),
                    dim=np.shape(pool_means)[1])
  return _feature_call(
      _uot_scores_batched, target_means, pool_means, epsilon=epsilon,
      tau_pool=tau_pool, tau_target=tau_target, cost_scale=cost_scale, cost=cost,
      max_iterations=max_iterations, threshold=threshold, return_plan=return_plan,
      mode=mode, over_relaxation=over_relaxation, chunk_size=chunk_size)


def solve_uot(*, cost: jax.Array, epsilon: float = 1.0, tau_pool: float = 1.0,
              tau_target: float = 100.0, pool_masses: jax.Array | None = None,
              target_masses: jax.Array | None = None, max_iterations: int = 2000,
              threshold: float = 1e-5, return_plan: bool = False, mode: str = "auto",
              over_relaxation: float | None = None) -> UOTScores:
  """Solves Eq. 5 (the UOT problem) for a given cost matrix: the solver alone.

  ``min_P <P, C> + eps KL(P | p q^T) + tau_1 KL(P 1 | p) + tau_2 KL(P^T 1 | q)``
  with ``p = pool_masses`` and ``q = target_masses`` (default: ones, the
  paper's unit weights; then this equals Eq. 5's ``-eps h(P)`` form up to a
  constant). Same solver, options and result as :func:`uot_scores`; ``scores``
  are the row masses ``(P 1)_i``. Jitted; vmap and grad (in ``cost`` and the
  masses) work.

  Args:
    cost: ``[n_pool, n_target]`` finite cost (e.g. :func:`cost_matrix`).
    epsilon: entropic regularisation ``eps``.
    tau_pool: KL weight ``tau_1`` on the row (pool) marginal.
    tau_target: KL weight ``tau_2`` on the column (target) marginal.
    pool_masses: ``[n_pool]`` positive masses ``p`` (default ones).
    target_masses: ``[n_target]`` positive masses ``q`` (default ones).
    max_iterations, threshold, return_plan, mode, over_relaxation: as in
      :func:`uot_scores`.

  Returns:
    A :class:`UOTScores`.

  Raises:
    ValueError: a cost that is not 2-D or has NaN/inf (checked inside the
      compiled call, raised after it), masses of the wrong shape or not
      positive, or bad hyper-parameters. Value checks are skipped under
      ``jit``/``vmap`` tracing.

  Example:
    >>> cost = jnp.array([[0.0, 2.0], [2.0, 0.0], [5.0, 5.0]])
    >>> out = solve_uot(cost=cost, tau_target=10.0)
    >>> np.round(np.asarray(out.scores), 3)
    array([0.967, 0.967, 0.105], dtype=float32)
    >>> bool(out.converged)
    True
  """
  shape = np.shape(cost)
  if len(shape) != 2 or 0 in shape:
    raise ValueError(f"cost must be a non-empty 2-D array, got shape {shape}")
  _check_solver_options(epsilon=epsilon, tau_pool=tau_pool, tau_target=tau_target,
                        threshold=threshold, max_iterations=max_iterations, mode=mode,
                        over_relaxation=over_relaxation)
  dtype = jax.dtypes.canonicalize_dtype(
      np.result_type(getattr(cost, "dtype", np.float32), np.float32))
  masses = []
  for name, m, n in (("pool_masses", pool_masses, shape[0]),
                     ("target_masses", target_masses, shape[1])):
    if m is not None:
      if np.shape(m) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {np.shape(m)}")
      if is_concrete(m) and not np.all(np.isfinite(m) & (np.asarray(m) > 0)):
        raise ValueError(f"{name} must be positive and finite")
      m = jnp.asarray(m)
    masses.append(m)
  log_domain, omega = _resolve(
      n_pool=shape[0], n_target=shape[1], dtype=dtype, epsilon=epsilon, tau_pool=tau_pool,
      tau_target=tau_target, mode=mode, over_relaxation=over_relaxation)
  concrete = is_concrete(cost) and all(
      is_concrete(m) for m in (pool_masses, target_masses) if m is not None)
  out, finite = _solve_uot(jnp.asarray(cost, dtype), masses[0], masses[1],
                           epsilon=float(epsilon), tau_pool=float(tau_pool),
                           tau_target=float(tau_target), log_domain=log_domain,
                           omega=omega, max_iterations=int(max_iterations),
                           threshold=float(threshold), return_plan=bool(return_plan),
                           warn_traced=not concrete)
  if concrete:
    if not bool(finite):
      raise ValueError("cost contains NaN/inf values")
    _warn_not_converged(out.converged, out.error, float(threshold), int(max_iterations))
  return out


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
  if is_concrete(labels):
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

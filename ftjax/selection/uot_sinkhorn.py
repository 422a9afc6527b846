"""Generalised Sinkhorn for entropic unbalanced OT, in kernel space or log domain.

The problem (papers/uot-data-reuse.txt, Eq. 5, with reference measure
``p q^T``; for the paper's unit masses this is its ``-eps h(P)`` term):

  min_P <P, C> + eps KL(P | p q^T) + rho_1 KL(P 1 | p) + rho_2 KL(P^T 1 | q).

Its dual potentials ``(f, g)`` give the plan
``P_ij = p_i q_j exp((f_i + g_j - C_ij) / eps)`` and are the fixed point of the
generalised Sinkhorn updates (Chizat, Peyre, Schmitzer & Vialard 2018, "Scaling
algorithms for unbalanced optimal transport problems", Sec. 4):

  f_i = -lambda_1 eps log sum_j q_j exp((g_j - C_ij) / eps),
  g_j = -lambda_2 eps log sum_i p_i exp((f_i - C_ij) / eps),
  lambda_k = rho_k / (rho_k + eps)        (ott-jax's ``tau``).

Four things make the solver fast and safe in float32:

* **Offsets from the eps -> 0 problem.** The same updates with a hard minimum in
  place of the soft minimum, ``F_i = lambda_1 min_j (C_ij - G_j - eps log q_j)``
  and ``G_j = lambda_2 min_i (C_ij - F_i - eps log p_i)``, contract with factor
  ``lambda_1 lambda_2`` and cost no exponential. Started from
  ``G_j = lambda_2 (1 - lambda_1) / (1 - lambda_1 lambda_2) min_i C_ij`` (their
  fixed point for a single pair), one or two sweeps usually reach it within
  ``2 eps``. The entropic potentials lie within ``eps * B`` of it (a soft
  minimum of ``n`` terms is within ``eps log n`` of the hard one; ``B`` below),
  and for non-negative costs ``F_i + G_j <= C_ij``. The offsets are absorbed
  into the kernel ``K_ij = exp((F_i + G_j - C_ij) / eps) <= 1`` -- the
  row-minimum shift of the cost, made consistent on both sides -- and the
  iterations work on the log-scalings ``a = (f - F) / eps`` and
  ``b = (g - G) / eps``, which stay within ``[-2B, 2B]`` (in practice a few
  units).
* **Kernel space.** Each iteration is then two matrix-vector products with
  ``K`` and ``O(n_pool + n_target)`` exponentials, instead of two
  log-sum-exps over all ``n_pool * n_target`` entries. Entries of ``K`` that
  underflow belong to pairs whose plan mass is negligible. A row (column)
  whose whole kernel sum comes near the underflow threshold -- a pool unit far
  from every target class, mass below ~exp(-40) -- cannot move the other side,
  but its own potential and score are redone at the end by an exact
  log-sum-exp of the update, so ``log_row_masses`` stay exact.
  Kernel mode is chosen when the worst-case bound
  ``B = max(lambda_1 (log n_t + lambda_2 log n_p),
  lambda_2 (log n_p + lambda_1 log n_t)) / (1 - lambda_1 lambda_2) + 2`` is at
  most 32 (float32) or 320 (float64); otherwise (small eps, or both marginals
  nearly hard) the log domain is used. At the paper's settings ``B`` is 20.7
  for 1,000 x 200 and 31.3 for 100,000 x 1,000.
* **Over-relaxation.** The alternating updates are a two-block Gauss-Seidel
  scheme whose linearisation has spectral radius exactly ``lambda_1 lambda_2``
  (the constant shift of ``g`` is an eigenvector), so Young's optimal
  successive over-relaxation factor ``omega = 2 / (1 + sqrt(1 - lambda_1
  lambda_2))`` cuts the convergence factor per iteration from ``lambda_1
  lambda_2`` to ``omega - 1`` (0.50 -> 0.17 at the paper's settings: 10
  iterations instead of 20 to a marginal error of 1e-7).
* **One problem at a time under vmap.** ``jax.vmap`` of the solver runs the
  problems one after another (a ``custom_vmap`` rule with ``lax.map``) rather
  than in lockstep: a 1,000 x 200 kernel (0.8 MB) stays in cache across its
  iterations where 16 in lockstep (12.8 MB) would not, and each problem stops
  at its own iteration count.

Stopping rule (ott-jax's for unbalanced problems): the L1 norm of the dual
gradient, ``||P 1 - p exp(-f / rho_1)||_1 + ||P^T 1 - q exp(-g / rho_2)||_1``,
divided by the total input mass ``sum p + sum q``. It is zero exactly at the
optimum. Gradients (``jax.grad`` through the solver) use implicit
differentiation of the fixed point, not unrolled iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Largest worst-case log-scaling bound B (see module docstring) for which the
# kernel-space iterations are used: exp(2 B) and n * exp(2 B) stay far from
# overflow (float32 overflows at exp(88.7), float64 at exp(709)).
KERNEL_BOUND = {"float32": 32.0, "float64": 320.0}
# Offsets: hard-min sweeps stop once the remaining distance to their fixed
# point, at most change / (1 - l1 l2) (a contraction), is below
# _OFFSET_SLACK * eps; the bound B of use_log_domain includes this slack.
_OFFSET_SLACK = 2.0
_OFFSET_MAX_SWEEPS = 60
# A row's kernel sum is trusted when it exceeds the largest possible loss to
# underflow (n_target * tiny * max v) by this factor; below, the row's update
# is redone exactly at the end (columns likewise).
_UNDERFLOW_MARGIN = 1e6
# Exponents are clipped here before exp (log-scalings are far smaller in
# practice; this only keeps a diverging iterate finite).
_EXP_CLIP = {"float32": 80.0, "float64": 700.0}


class SinkhornOutput(NamedTuple):
  """Result of :func:`sinkhorn_uot` (internal: :mod:`ftjax.selection.uot` wraps it).

  Attributes:
    f: ``[n_pool]`` dual potential of the rows.
    g: ``[n_target]`` dual potential of the columns.
    log_row_masses: ``[n_pool]`` log of the plan's row masses ``log (P 1)_i``.
    converged: error at most the threshold.
    num_iterations: Sinkhorn iterations run (each: one row and one column
      update).
    error: final dual-gradient L1 norm per unit of input mass.
    errors: ``[max_iterations]`` error after each iteration, ``-1`` after the
      last one.
    log_domain: whether the log-domain iterations were used (else kernel).
  """

  f: jax.Array
  g: jax.Array
  log_row_masses: jax.Array
  converged: jax.Array
  num_iterations: jax.Array
  error: jax.Array
  errors: jax.Array
  log_domain: jax.Array


def lambdas(*, epsilon: float, tau_pool: float, tau_target: float) -> tuple[float, float]:
  """Exponents ``lambda_k = rho_k / (rho_k + eps)`` of the two updates."""
  return tau_pool / (tau_pool + epsilon), tau_target / (tau_target + epsilon)


def kernel_bound(n_pool: int, n_target: int, *, epsilon: float, tau_pool: float,
                 tau_target: float) -> float:
  """Worst-case bound ``B`` on the log-scalings around the eps -> 0 offsets."""
  l1, l2 = lambdas(epsilon=epsilon, tau_pool=tau_pool, tau_target=tau_target)
  gap = 1.0 - l1 * l2
  lp, lt = math.log(max(n_pool, 1)), math.log(max(n_target, 1))
  return max(l1 * (lt + l2 * lp), l2 * (lp + l1 * lt)) / gap + _OFFSET_SLACK


def use_log_domain(mode: str, n_pool: int, n_target: int, dtype, *, epsilon: float,
                   tau_pool: float, tau_target: float) -> bool:
  """Resolves ``mode`` ("auto", "kernel" or "log") to log domain or not (static)."""
  if mode == "log":
    return True
  if mode == "kernel":
    return False
  bound = kernel_bound(n_pool, n_target, epsilon=epsilon, tau_pool=tau_pool,
                       tau_target=tau_target)
  return bound > KERNEL_BOUND[jnp.dtype(dtype).name]


def optimal_relaxation(*, epsilon: float, tau_pool: float, tau_target: float) -> float:
  """Young's optimal over-relaxation factor ``2 / (1 + sqrt(1 - lambda_1 lambda_2))``."""
  l1, l2 = lambdas(epsilon=epsilon, tau_pool=tau_pool, tau_target=tau_target)
  return 2.0 / (1.0 + math.sqrt(1.0 - l1 * l2))


def hard_offsets(cost, log_p, log_q, *, epsilon, l1, l2):
  """Fixed point of the eps -> 0 updates (the offsets ``F``, ``G``); no exp.

  Starts from ``G_j = l2 (1 - l1) / (1 - l1 l2) min_i C_ij``, the fixed point
  when each column's nearest row has that column as its nearest too (exact
  for one row and one column), and sweeps ``F <- T_1(G)``, ``G <- T_2(F)``
  until ``G`` moves by at most ``_OFFSET_SLACK (1 - l1 l2) eps``: the map
  ``G -> T_2(T_1(G))`` contracts by ``l1 l2``, so ``G`` is then within
  ``_OFFSET_SLACK eps`` of the fixed point, and ``F`` too.
  """
  q_shift = epsilon * log_q
  p_shift = epsilon * log_p
  rate = l1 * l2

  def sweep(g):
    f = l1 * jnp.min(cost - (g + q_shift)[None, :], axis=1)
    return f, l2 * jnp.min(cost - (f + p_shift)[:, None], axis=0)

  def cond(state):
    _, _, change, k = state
    return (change > _OFFSET_SLACK * (1.0 - rate) * epsilon) & (k < _OFFSET_MAX_SWEEPS)

  def body(state):
    _, g, _, k = state
    f_new, g_new = sweep(g)
    return f_new, g_new, jnp.max(jnp.abs(g_new - g)), k + 1

  g0 = (l2 * (1.0 - l1) / (1.0 - rate)) * jnp.min(cost - p_shift[:, None], axis=0)
  f, g, _, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros(cost.shape[0], cost.dtype), g0,
                   jnp.asarray(jnp.inf, cost.dtype), 0))
  return f, g


def _residual(log_p, a, log_sum, c, lam):
  """L1 dual-gradient residual of one side, ``sum |mass - p exp(-f / rho)|``.

  With ``f = F + eps a`` and ``c = -(1 - lam) F / eps`` (the constant of the
  update ``a <- c - lam log(K v)``), ``-f / rho = (c - (1 - lam) a) / lam``;
  written this way the residual is consistent with the update to rounding of
  the O(1) log-scalings, not of the (large) offsets.
  """
  mass = jnp.exp(log_p + a + log_sum)
  fit = jnp.exp(log_p + (c - (1.0 - lam) * a) / lam)
  return jnp.sum(jnp.abs(mass - fit))


def _solve(cost, log_p, log_q, exact_lse, extra, *, epsilon, tau_pool, tau_target,
           log_domain, omega, max_iterations, threshold):
  """Forward solve; returns (f, g, log_row_masses, stats)."""
  dtype = cost.dtype
  n_pool, n_target = cost.shape
  l1, l2 = lambdas(epsilon=epsilon, tau_pool=tau_pool, tau_target=tau_target)
  clip = _EXP_CLIP[jnp.dtype(dtype).name]
  tiny = jnp.finfo(dtype).tiny
  big_f, big_g = hard_offsets(cost, log_p, log_q, epsilon=epsilon, l1=l1, l2=l2)
  # Constant parts of the updates: a = c_a - l1 log(K v), b = c_b - l2 log(K^T u).
  c_a = -(1.0 - l1) * big_f / epsilon
  c_b = -(1.0 - l2) * big_g / epsilon
  total_mass = jnp.sum(jnp.exp(log_p)) + jnp.sum(jnp.exp(log_q))

  if log_domain:
    def log_kv(b):  # log sum_j q_j exp(b_j) K_ij, with K = exp((F + G - C) / eps)
      z = (big_f[:, None] + big_g[None, :] - cost) / epsilon
      return jax.nn.logsumexp(z + (b + log_q)[None, :], axis=1)

    def log_ktu(a):
      z = (big_f[:, None] + big_g[None, :] - cost) / epsilon
      return jax.nn.logsumexp(z + (a + log_p)[:, None], axis=0)
  else:
    kernel = jnp.exp((big_f[:, None] + big_g[None, :] - cost) / epsilon)

    def log_kv(b):
      return jnp.log(jnp.maximum(kernel @ jnp.exp(jnp.minimum(b + log_q, clip)), tiny))

    def log_ktu(a):
      return jnp.log(jnp.maximum(jnp.exp(jnp.minimum(a + log_p, clip)) @ kernel, tiny))

  def error_of(a, b, log_rows, log_cols):
    rows = _residual(log_p, a, log_rows, c_a, l1)
    cols = _residual(log_q, b, log_cols, c_b, l2)
    return (rows + cols) / total_mass

  def cond(state):
    *_, it, err, _ = state
    return (err > threshold) & (it < max_iterations)

  def body(state):
    a, b, log_rows, _, it, _, errors = state
    a = a + omega * (c_a - l1 * log_rows - a)
    log_cols = log_ktu(a)
    b = b + omega * (c_b - l2 * log_cols - b)
    log_rows = log_kv(b)
    err = error_of(a, b, log_rows, log_cols)
    return a, b, log_rows, log_cols, it + 1, err, errors.at[it].set(err)

  a0 = jnp.zeros(n_pool, dtype)
  b0 = jnp.zeros(n_target, dtype)
  rows0, cols0 = log_kv(b0), log_ktu(a0)
  state = (a0, b0, rows0, cols0, jnp.asarray(0, jnp.int32),
           error_of(a0, b0, rows0, cols0), jnp.full((max_iterations,), -1.0, dtype))
  a, b, log_rows, log_cols, it, err, errors = jax.lax.while_loop(cond, body, state)
  f = big_f + epsilon * a
  g = big_g + epsilon * b
  log_row_masses = log_p + a + log_rows
  if not log_domain:
    # Rows (columns) whose kernel sums came within _UNDERFLOW_MARGIN of the
    # underflow threshold: their masses are below ~exp(-40), too small to move
    # the other side, but their own potential was updated from a floored sum
    # (it is too low). Redo their update exactly,
    #   f_i = -l1 eps log S_i,  log S_i = logsumexp_j (log q_j + (g_j - C_ij) / eps),
    # which also gives log (P 1)_i = log p_i + (1 - l1) log S_i.
    doubtful_rows = log_rows < (jnp.log(_UNDERFLOW_MARGIN * n_target * tiny)
                                + jnp.max(b + log_q))
    doubtful_cols = log_cols < (jnp.log(_UNDERFLOW_MARGIN * n_pool * tiny)
                                + jnp.max(a + log_p))

    def exact():
      new_g = jnp.where(doubtful_cols, -l2 * epsilon * exact_lse(f, extra, 0), g)
      log_s = exact_lse(new_g, extra, 1)
      return (jnp.where(doubtful_rows, -l1 * epsilon * log_s, f), new_g,
              jnp.where(doubtful_rows, log_p + (1.0 - l1) * log_s, log_row_masses))

    f, g, log_row_masses = jax.lax.cond(
        jnp.any(doubtful_rows) | jnp.any(doubtful_cols), exact,
        lambda: (f, g, log_row_masses))
  stats = (err <= threshold, it, err, errors, jnp.asarray(log_domain))
  return f, g, log_row_masses, stats


def plan_probabilities(cost, f, g, log_p, log_q, *, epsilon):
  """Row- and column-normalised plans (for the implicit-differentiation VJP)."""
  log_plan = (log_p[:, None] + log_q[None, :]
              + (f[:, None] + g[None, :] - cost) / epsilon)
  rows = jax.nn.softmax(log_plan, axis=1)
  cols = jax.nn.softmax(log_plan, axis=0)
  return rows, cols


def _adjoint(cost, f, g, log_p, log_q, f_bar, g_bar, *, epsilon, l1, l2,
             max_iterations, threshold):
  """Cotangents of (cost, log_p, log_q) from those of the fixed point (f, g).

  At the fixed point ``z = Phi(z, theta)`` the VJP is ``theta_bar =
  (d Phi / d theta)^T w`` with ``w = z_bar + (d Phi / d z)^T w``, solved by the
  same alternating (Gauss-Seidel) iteration as the forward problem: its
  contraction factor is again ``lambda_1 lambda_2``.
  """
  rows, cols = plan_probabilities(cost, f, g, log_p, log_q, epsilon=epsilon)
  # d f_i / d g_j = -l1 rows_ij;  d g_j / d f_i = -l2 cols_ij.
  def body(state):
    w_f, w_g, _, k = state
    w_g_new = g_bar - l1 * (w_f @ rows)
    w_f_new = f_bar - l2 * (cols @ w_g_new)
    change = (jnp.max(jnp.abs(w_f_new - w_f)) + jnp.max(jnp.abs(w_g_new - w_g)))
    return w_f_new, w_g_new, change, k + 1

  def cond(state):
    _, _, change, k = state
    scale = 1.0 + jnp.max(jnp.abs(f_bar)) + jnp.max(jnp.abs(g_bar))
    return (change > threshold * scale) & (k < max_iterations)

  w_f, w_g, _, _ = jax.lax.while_loop(
      cond, body, (f_bar, g_bar, jnp.asarray(jnp.inf, cost.dtype), 0))
  # d f_i / d C_ij = l1 rows_ij; d g_j / d C_ij = l2 cols_ij;
  # d f_i / d log q_j = -l1 eps rows_ij; d g_j / d log p_i = -l2 eps cols_ij.
  cost_bar = l1 * w_f[:, None] * rows + l2 * cols * w_g[None, :]
  log_q_bar = -l1 * epsilon * (w_f @ rows)
  log_p_bar = -l2 * epsilon * (cols @ w_g)
  return cost_bar, log_p_bar, log_q_bar


def sinkhorn_uot(*, cost: jax.Array, log_p: jax.Array, log_q: jax.Array,
                 epsilon: float, tau_pool: float, tau_target: float, log_domain: bool,
                 omega: float, max_iterations: int, threshold: float,
                 exact_lse: Callable | None = None, extra=None) -> SinkhornOutput:
  """Solves the UOT dual; differentiable in ``cost``, ``log_p``, ``log_q``.

  Args:
    cost: ``[n_pool, n_target]`` cost matrix.
    log_p: ``[n_pool]`` log masses of the rows.
    log_q: ``[n_target]`` log masses of the columns.
    epsilon: entropic regularisation.
    tau_pool: KL weight ``rho_1`` of the row marginal.
    tau_target: KL weight ``rho_2`` of the column marginal.
    log_domain: log-domain iterations (else kernel space); see
      :func:`use_log_domain`.
    omega: over-relaxation factor (1 = plain Sinkhorn).
    max_iterations: iteration cap.
    threshold: stop when the dual-gradient L1 norm per unit mass is below it.
    exact_lse: ``(potential, extra, axis) -> log-sum-exp`` over the exact cost:
      axis 1, ``log sum_j q_j exp((g_j - C_ij) / eps)`` per row; axis 0,
      ``log sum_i p_i exp((f_i - C_ij) / eps)`` per column. Used only for the
      rows/columns whose kernel sums come near underflow (default: over
      ``cost``). Lets a caller that can rebuild the cost in chunks (from
      ``extra``, e.g. the features) let the dense cost go once the kernel is
      built.
    extra: arrays passed to ``exact_lse`` (no gradient flows through them:
      they only recompute the cost).

  Returns:
    A :class:`SinkhornOutput`.
  """
  l1, l2 = lambdas(epsilon=epsilon, tau_pool=tau_pool, tau_target=tau_target)
  static = dict(epsilon=epsilon, tau_pool=tau_pool, tau_target=tau_target,
                log_domain=log_domain, omega=omega, max_iterations=max_iterations,
                threshold=threshold)

  @jax.custom_vjp
  @jax.custom_batching.custom_vmap
  def potentials(cost, log_p, log_q, extra):
    if exact_lse is None:
      def lse_fn(potential, _, axis):
        if axis == 1:  # rows: log sum_j q_j exp((g_j - C_ij) / eps)
          return jax.nn.logsumexp(log_q[None, :] + (potential[None, :] - cost) / epsilon,
                                  axis=1)
        return jax.nn.logsumexp(log_p[:, None] + (potential[:, None] - cost) / epsilon,
                                axis=0)
    else:
      lse_fn = exact_lse
    return _solve(cost, log_p, log_q, lse_fn, extra, **static)

  @potentials.def_vmap
  def potentials_vmap(axis_size, in_batched, cost, log_p, log_q, extra):
    # Under jax.vmap, solve the problems one after another (lax.map) instead of
    # in lockstep: each problem's kernel stays in cache across its iterations
    # (16 lockstep 1000 x 200 kernels are 12.8 MB, one is 0.8 MB), and each
    # stops at its own iteration count.
    del axis_size
    args = (cost, log_p, log_q, extra)
    leaves, treedef = jax.tree_util.tree_flatten(args)
    batched = treedef.flatten_up_to(tuple(in_batched))

    def one(mapped):
      it = iter(mapped)
      full = [next(it) if b else x for x, b in zip(leaves, batched)]
      return potentials(*jax.tree_util.tree_unflatten(treedef, full))

    out = jax.lax.map(one, [x for x, b in zip(leaves, batched) if b])
    return out, jax.tree_util.tree_map(lambda _: True, out)

  def fwd(cost, log_p, log_q, extra):
    out = potentials(cost, log_p, log_q, extra)
    return out, (cost, log_p, log_q, out[0], out[1], extra)

  def bwd(res, cotangents):
    cost, log_p, log_q, f, g, extra = res
    f_bar, g_bar, rows_bar = cotangents[0], cotangents[1], cotangents[2]
    # At the optimum log (P 1)_i = log p_i - f_i / rho_1 (the dual condition).
    f_bar = f_bar - rows_bar / tau_pool
    cost_bar, log_p_bar, log_q_bar = _adjoint(
        cost, f, g, log_p, log_q, f_bar, g_bar, epsilon=epsilon, l1=l1, l2=l2,
        max_iterations=max_iterations, threshold=threshold)
    return (cost_bar, log_p_bar + rows_bar, log_q_bar,
            jax.tree_util.tree_map(jnp.zeros_like, extra))

  potentials.defvjp(fwd, bwd)
  f, g, log_rows, (converged, it, err, errors, log_dom) = potentials(
      cost, log_p, log_q, extra)
  return SinkhornOutput(f=f, g=g, log_row_masses=log_rows, converged=converged,
                        num_iterations=it, error=err, errors=errors, log_domain=log_dom)

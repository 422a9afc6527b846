"""Benchmark: ftjax ``uot_scores`` (ott-jax, float32, log domain) vs POT.

Problem of the paper's size: 1000 pool units (ImageNet classes) x 200 target
classes, 512-d features (ResNet-18 penultimate layer), at the paper's
settings (eps = 1, tau_1 = 1, tau_2 = 100, cosine cost / 0.01). The synthetic
features have structure: 100 pool units lie near the target classes, so the
top-100 is well defined. Reported: first-call time (trace + compile + run),
steady-state time (median of repeats), POT's time
(``ot.unbalanced.sinkhorn_unbalanced``, float64, with and without building the
cost matrix), the largest relative score difference, and whether the top-100
sets agree.

Usage:
  python -m experiments.bench.uot_vs_pot [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import ot

from ftjax.selection import select_top_k
from ftjax.selection import uot_scores


def problem(n_pool: int, n_target: int, dim: int, n_related: int, seed: int):
  rng = np.random.default_rng(seed)
  # Post-ReLU-like features: non-negative, so cosines are mostly positive.
  pool = np.abs(rng.normal(size=(n_pool, dim))).astype(np.float32)
  related = rng.choice(n_pool, n_related, replace=False)
  target = pool[related[np.arange(n_target) % n_related]]
  target = np.abs(target + 0.8 * rng.normal(size=target.shape)).astype(np.float32)
  return pool, target, related


def pot_scores(pool, target, cost_scale=0.01):
  p = pool.astype(np.float64)
  t = target.astype(np.float64)
  p /= np.linalg.norm(p, axis=1, keepdims=True)
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  cost = (1.0 - p @ t.T) / cost_scale
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    plan = ot.unbalanced.sinkhorn_unbalanced(
        np.ones(len(p)), np.ones(len(t)), cost, reg=1.0, reg_m=(1.0, 100.0),
        reg_type="entropy")
  return plan.sum(1), cost


def pot_from_cost(cost):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return ot.unbalanced.sinkhorn_unbalanced(
        np.ones(cost.shape[0]), np.ones(cost.shape[1]), cost, reg=1.0,
        reg_m=(1.0, 100.0), reg_type="entropy").sum(1)


def median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), float(np.min(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num-pool", type=int, default=1000)
  parser.add_argument("--num-target", type=int, default=200)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--top-k", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(f"jax {jax.__version__} ot {ot.__version__} cpus={os.cpu_count()} "
        f"loadavg(before)={os.getloadavg()}")

  pool, target, related = problem(args.num_pool, args.num_target, args.dim,
                                  args.top_k, args.seed)
  pool_j, target_j = jnp.asarray(pool), jnp.asarray(target)

  t0 = time.perf_counter()
  out = uot_scores(target_means=target_j, pool_means=pool_j)
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  steady = median_time(lambda: uot_scores(target_means=target_j, pool_means=pool_j),
                       args.repeats)

  ref, cost = pot_scores(pool, target)
  pot_total = median_time(lambda: pot_scores(pool, target)[0], max(args.repeats // 2, 3))
  pot_solve = median_time(lambda: pot_from_cost(cost), max(args.repeats // 2, 3))

  scores = np.asarray(out.scores)
  rel = float(np.max(np.abs(scores - ref) / ref))
  ours_top = select_top_k(scores, args.top_k)
  ref_top = select_top_k(ref, args.top_k)
  ordered = np.sort(ref)[::-1]
  print(f"problem: pool {pool.shape} target {target.shape}, eps=1 tau=(1, 100), "
        f"cosine cost / 0.01")
  print(f"ftjax uot_scores (float32): first call {first * 1e3:.0f} ms "
        f"(trace+compile+run); steady median {steady[0] * 1e3:.1f} ms "
        f"(min {steady[1] * 1e3:.1f}); Sinkhorn iterations {int(out.num_iterations)}, "
        f"converged {bool(out.converged)}")
  print(f"POT sinkhorn_unbalanced (float64): median {pot_total[0] * 1e3:.1f} ms incl. "
        f"cost matrix (min {pot_total[1] * 1e3:.1f}); solver only median "
        f"{pot_solve[0] * 1e3:.1f} ms (min {pot_solve[1] * 1e3:.1f})")
  print(f"max relative score difference vs POT: {rel:.2e}")
  print(f"top-{args.top_k}: same set {set(ours_top.tolist()) == set(ref_top.tolist())}, "
        f"same order {bool(np.array_equal(ours_top, ref_top))}, "
        f"= planted related units {set(ref_top.tolist()) == set(related.tolist())}; "
        f"score gap at the cut {ordered[args.top_k - 1] / ordered[args.top_k]:.2f}x")
  print(f"speed-up (steady, incl. cost matrix) vs POT: {pot_total[0] / steady[0]:.2f}x; "
        f"loadavg(after)={os.getloadavg()}")


if __name__ == "__main__":
  main()

"""Benchmark: cosine k-means at ImageNet scale (1.28M x 128 into 2000 clusters).

The UOT data-reuse paper clusters ImageNet's 1.28M MoCo features (128-d) into
2000 clusters. This script clusters synthetic features of that size -- a
Gaussian mixture with 1000 components (generated chunk by chunk into one
preallocated float32 array) -- and prints wall time and peak resident memory
(``resource.getrusage(...).ru_maxrss``). Goal: under 5 minutes and 4 GB on a
2-core CPU.

Usage:
  python -m experiments.bench.kmeans_imagenet_scale [--num-points 1281167]
      [--num-iterations 10] [--chunk-size 4096]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import jax
import numpy as np

from ftjax.selection import kmeans


def synthetic_features(num_points: int, dim: int, num_components: int, seed: int,
                       chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian-mixture features, written chunk by chunk (no full-size temporaries)."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_components, dim)).astype(np.float32)
  # Unequal component sizes and spreads, like real classes.
  weights = rng.dirichlet(np.full(num_components, 5.0))
  spreads = rng.uniform(0.3, 0.8, size=num_components).astype(np.float32)
  features = np.empty((num_points, dim), np.float32)
  labels = np.empty((num_points,), np.int32)
  for start in range(0, num_points, chunk):
    stop = min(start + chunk, num_points)
    lab = rng.choice(num_components, size=stop - start, p=weights)
    noise = rng.standard_normal(size=(stop - start, dim), dtype=np.float32)
    features[start:stop] = centers[lab] + spreads[lab, None] * noise
    labels[start:stop] = lab
  return features, labels


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num-points", type=int, default=1_281_167)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--num-clusters", type=int, default=2000)
  parser.add_argument("--num-components", type=int, default=1000)
  parser.add_argument("--num-iterations", type=int, default=10)
  parser.add_argument("--chunk-size", type=int, default=4096)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  print(f"jax {jax.__version__} devices={jax.devices()} cpus={os.cpu_count()} "
        f"loadavg(before)={os.getloadavg()}")
  t0 = time.perf_counter()
  features, _ = synthetic_features(args.num_points, args.dim, args.num_components,
                                   args.seed)
  t_data = time.perf_counter() - t0
  print(f"data: {features.shape} {features.dtype} "
        f"({features.nbytes / 2**30:.2f} GiB) generated in {t_data:.1f} s")

  t0 = time.perf_counter()
  result = kmeans(features, num_clusters=args.num_clusters,
                  num_iterations=args.num_iterations, seed=args.seed,
                  chunk_size=args.chunk_size)
  jax.block_until_ready(result)
  t_kmeans = time.perf_counter() - t0

  history = np.asarray(result.objective_history)
  sizes = np.asarray(result.cluster_sizes)
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
  print(f"kmeans: k={args.num_clusters} iterations run={int(result.num_iterations)} "
        f"of {args.num_iterations}, chunk={args.chunk_size}")
  print(f"  wall time (incl. compile, init, validation): {t_kmeans:.1f} s")
  print(f"  objective (sum 1-cos): first {history[0]:.1f} -> last {history[-1]:.1f}; "
        f"non-increasing: {bool(np.all(np.diff(history) <= 1e-6 * history[0]))}")
  print(f"  mean 1-cos per point: {history[-1] / args.num_points:.4f}")
  print(f"  cluster sizes: min {sizes.min()} median {int(np.median(sizes))} "
        f"max {sizes.max()} empty {int((sizes == 0).sum())}; "
        f"re-seeded {int(result.num_reseeded)}")
  print(f"  share of point-iterations recomputed (rest skipped by bounds): "
        f"{float(result.recomputed_fraction):.3f}")
  print(f"peak RSS: {peak_gib:.2f} GiB; total wall (data + kmeans): "
        f"{t_data + t_kmeans:.1f} s; loadavg(after)={os.getloadavg()}")


if __name__ == "__main__":
  main()

r"""The model-patches Fig. 2 picture: test accuracy against learning rate, one line per patch.

  .venv/bin/python -m experiments.plot_lr_sweep runs/patches_f2     # writes runs/patches_f2/lr_sweep.png

Reads ``results.json`` of a ``model_patches.py:fig2`` run (variants named
``<row>_lr<value with p for the dot>``); mean over seeds, error bars = std. Runs
recorded as diverged (``--config.on_divergence=record``) are marked with an x at the
bottom edge.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

_NAME = re.compile(r"(?P<row>.+)_lr(?P<lr>[0-9p]+)")


def sweep_points(results: dict[str, list[dict]]) -> dict[str, list[tuple[float, float, float]]]:
  """``{row: [(lr, mean test top-1 %, std), ...]}`` sorted by lr."""
  points: dict[str, list[tuple[float, float, float]]] = {}
  for name, runs in results.items():
    m = _NAME.fullmatch(name)
    if not m or not runs:
      continue
    acc = 100 * np.asarray([r["test_top1"] for r in runs])
    points.setdefault(m["row"], []).append((float(m["lr"].replace("p", ".")), float(acc.mean()),
                                            float(acc.std(ddof=1)) if len(acc) > 1 else 0.0))
  if not points:
    raise ValueError("no variant named <row>_lr<value> in the results: is this a fig2 run?")
  return {row: sorted(v) for row, v in points.items()}


def plot_lr_sweep(results: dict[str, list[dict]], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
  diverged = []
  for row, pts in sweep_points(results).items():
    lr, mean, std = map(np.asarray, zip(*pts))
    ok = np.isfinite(mean)
    line = ax.errorbar(lr[ok], mean[ok], yerr=std[ok], marker="o", capsize=3, label=row)
    diverged.extend((x, line.lines[0].get_color()) for x in lr[~ok])
  if diverged:   # a diverged run has no accuracy: an x on the bottom edge marks its learning rate
    y = ax.get_ylim()[0]
    for i, (x, color) in enumerate(diverged):
      ax.plot([x], [y], marker="x", color=color, ms=9, clip_on=False, ls="none",
              label="diverged (loss non-finite)" if i == 0 else None)
  ax.set_xscale("log")
  ax.set_xlabel("initial learning rate")
  ax.set_ylabel("test top-1 (%)")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdir")
  args = parser.parse_args()
  path = os.path.join(args.workdir, "results.json")
  if not os.path.exists(path):
    raise SystemExit(f"ftjax: error: {path} does not exist (run model_patches.py:fig2 into it first)")
  with open(path) as f:
    results = json.load(f)
  print(plot_lr_sweep(results, os.path.join(args.workdir, "lr_sweep.png")))


if __name__ == "__main__":
  main()

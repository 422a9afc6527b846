r"""Results tables, figures and the scorecard of the papers' claims, written from the ledger.

  .venv/bin/python -m experiments.evidence tables

For every table of :data:`experiments.evidence.TABLES` this writes
``experiments/results/<table>/``: ``results.json`` (every seed's record with the
commit and kernel set that produced it, and the values chosen on validation),
``results_table.md`` (mean ± std, the 95% interval, the paired difference to
fine-tuning with its interval; ``*`` where that interval excludes 0; the
validation sweep behind the chosen values) and ``test_top1.png`` (bars with 95%
intervals). Then ``experiments/results/README.md``: one row per claim of
:data:`CLAIMS` with the paper's figures, ftjax's paired difference and a verdict
from :func:`verdict`. Everything is computed from the ledger, whose records
belong to one version of the library code (the git tree of ``ftjax/``) and one
kernel set (the latest entry's unless ``identity`` is given): a table never mixes
library versions or kernel sets. Each record names its commit too; records of
several commits appear together only when those commits hold the same ``ftjax/``.
"""

from __future__ import annotations

import collections

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

from experiments import evidence as ev
from experiments import stats

BASELINE_ROW = "finetune"
DATA_REUSE = "data_reuse_near"   # written by experiments/data_reuse.py, not by the evidence runner
PENDING, REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "pending", "reproduced", "not reproduced", "inconclusive"
MIN_SEEDS = 3


@dataclasses.dataclass(frozen=True)
class Claim:
  """One claim of a paper, tested by the paired difference of two rows (``a - b``).

  Attributes:
    paper: short name of the paper.
    text: the claim, as a sentence.
    a, b: ``(table, row)`` of the two rows compared (``a`` is claimed better).
    paper_figures: what the paper reports for the claim.
    margin: 0 for "a beats b"; > 0 (fraction) for "a keeps b's accuracy": a
      non-inferiority claim, reproduced when the interval's lower end is above
      ``-margin``.
  """
  paper: str
  text: str
  a: tuple[str, str]
  b: tuple[str, str]
  paper_figures: str
  margin: float = 0.0
  metric: str = "test_top1"


CLAIMS: tuple[Claim, ...] = (
    Claim("Co-Tuning", "Co-Tuning beats fine-tuning at 15%", ("co_tuning_15", "co_tuning_src_r50_x0884_g_cal"),
          ("co_tuning_15", "finetune"), "CUB 15%: 52.58 vs 45.25 (Table 4); Cars 15%: 46.02 vs 36.77 (Sec. 5.2)"),
    Claim("Co-Tuning", "Co-Tuning beats fine-tuning at 5% (below the paper's lowest rate)",
          ("co_tuning_5", "co_tuning_src_r50_x0884_g_cal"), ("co_tuning_5", "finetune"),
          "not in the paper (rates 15-100%); gains grow as data shrink (Table 2)"),
    Claim("Co-Tuning", "calibration helps: Co-Tuning beats Co-Tuning w/o calibration (15%)",
          ("co_tuning_15", "co_tuning_src_r50_x0884_g_cal"), ("co_tuning_15", "co_tuning_no_calibration"),
          "CUB 15%: 52.58 vs 50.67 (Table 4)"),
    Claim("Co-Tuning", "calibration helps: Co-Tuning beats Co-Tuning w/o calibration (5%)",
          ("co_tuning_5", "co_tuning_src_r50_x0884_g_cal"), ("co_tuning_5", "co_tuning_no_calibration"),
          "CUB 15%: 52.58 vs 50.67 (Table 4)"),
    Claim("Co-Tuning", "the reverse relationship beats the direct one (5%)",
          ("co_tuning_5", "co_tuning_src_r50_x0884_g_cal"), ("co_tuning_5", "co_tuning_direct_src_uncal"),
          "CUB 15%: 52.58 vs 51.20 (Table 4)"),
    Claim("Co-Tuning", "Co-Tuning beats L2-SP (5%)", ("co_tuning_5", "co_tuning_src_r50_x0884_g_cal"),
          ("regularizers_5", "l2_sp"), "better than L2-SP on every dataset and rate (Table 2)"),
    Claim("Co-Tuning", "Co-Tuning beats DELTA (5%)", ("co_tuning_5", "co_tuning_src_r50_x0884_g_cal"),
          ("regularizers_5", "delta"), "better than DELTA on every dataset and rate (Table 2)"),
    Claim("Co-Tuning", "Co-Tuning beats BSS (5%)", ("co_tuning_5", "co_tuning_src_r50_x0884_g_cal"),
          ("regularizers_5", "bss"), "better than BSS on every dataset and rate (Table 2)"),
    Claim("Co-Tuning", "Co-Tuning beats LwF (5%)", ("co_tuning_5", "co_tuning_src_r50_x0884_g_cal"),
          ("regularizers_5", "lwf"), "CUB 15%: 52.58 vs 47.67 (Table 4)"),
    Claim("Co-Tuning", "Co-Tuning + BSS + L2-SP beats fine-tuning (5%)", ("regularizers_5", "co_tuning_bss_l2sp"),
          ("regularizers_5", "finetune"), "not in the paper (ftjax's composition)"),
    Claim("Bi-Tuning", "Bi-Tuning beats fine-tuning (5%)", ("bi_tuning_5", "bi_tuning"), ("bi_tuning_5", "finetune"),
          "CUB 25%: 67.47 vs 61.36; Cars 25%: 66.15 vs 56.45 (Table 1)"),
    Claim("Bi-Tuning", "Bi-Tuning beats fine-tuning at 25%, the paper's lowest rate", ("bi_tuning_25", "bi_tuning"),
          ("bi_tuning_25", "finetune"), "CUB 25%: 67.47 vs 61.36; Cars 25%: 66.15 vs 56.45 (Table 1)"),
    Claim("Bi-Tuning", "CE + CCL beats CE alone (5%)", ("bi_tuning_5", "ce_ccl"), ("bi_tuning_5", "finetune"),
          "CUB 25% (MoCo): 41.09 vs 38.57 (Table 5)"),
    Claim("Bi-Tuning", "CE + CCE beats CE alone (5%)", ("bi_tuning_5", "ce_cce"), ("bi_tuning_5", "finetune"),
          "CUB 25% (MoCo): 45.42 vs 38.57 (Table 5)"),
    Claim("Bi-Tuning", "all three losses beat CE + CCE (5%)", ("bi_tuning_5", "bi_tuning"), ("bi_tuning_5", "ce_cce"),
          "CUB 25% (MoCo): 50.54 vs 45.42 (Table 5)"),
    Claim("Bi-Tuning", "all three losses beat CE + CCL (5%)", ("bi_tuning_5", "bi_tuning"), ("bi_tuning_5", "ce_ccl"),
          "CUB 25% (MoCo): 50.54 vs 41.09 (Table 5)"),
    Claim("Bi-Tuning", "Bi-Tuning beats BSS (5%)", ("bi_tuning_5", "bi_tuning"), ("regularizers_5", "bss"),
          "CUB 25%: 67.47 vs 64.69 (Table 1)"),
    Claim("regularisers", "L2-SP beats fine-tuning (5%)", ("regularizers_5", "l2_sp"), ("regularizers_5", "finetune"),
          "mixed: CUB 25% 61.21 vs 61.36 (Bi-Tuning Table 1); better in Co-Tuning Table 2"),
    Claim("regularisers", "DELTA beats fine-tuning (5%)", ("regularizers_5", "delta"), ("regularizers_5", "finetune"),
          "CUB 25%: 62.89 vs 61.36 (Bi-Tuning Table 1)"),
    Claim("regularisers", "BSS beats fine-tuning (5%)", ("regularizers_5", "bss"), ("regularizers_5", "finetune"),
          "CUB 25%: 64.69 vs 61.36 (Bi-Tuning Table 1)"),
    Claim("regularisers", "LwF beats fine-tuning (5%)", ("regularizers_5", "lwf"), ("regularizers_5", "finetune"),
          "CUB 15%: 47.67 vs 45.25 (Co-Tuning Table 4)"),
    Claim("SpotTune", "SpotTune beats fine-tuning (5%)", ("spottune_5", "spottune"), ("spottune_5", "finetune"),
          "CUBS: 84.03 vs 81.86; Cars: 92.40 vs 89.74 (Table 2)"),
    Claim("SpotTune", "Global-k keeps SpotTune's accuracy within 1 point (5%)", ("spottune_5", "global_k"),
          ("spottune_5", "spottune"), "CUBS: 83.48 vs 84.03; Flowers 96.60 vs 96.34 (Table 2)", margin=0.01),
    Claim("SpotTune", "SpotTune beats stochastic fine-tuning (5%)", ("spottune_5", "spottune"),
          ("spottune_5", "stochastic"), "CUBS: 84.03 vs 81.03 (Table 2)"),
    Claim("SpotTune", "SpotTune beats a random policy (5%)", ("spottune_5", "spottune"),
          ("spottune_5", "random_policy"), "CUBS: 84.03 vs 81.63 (Table 2)"),
    Claim("SpotTune", "fine-tuning beats the feature extractor (5%)", ("spottune_5", "finetune"),
          ("spottune_5", "feature_extractor"), "CUBS: 81.86 vs 74.07 (Table 2)"),
    Claim("SpotTune", "fine-tuning beats fine-tuning last-1 (5%)", ("spottune_5", "finetune"), ("spottune_5", "last_1"),
          "CUBS: 81.86 vs 78.68 (Table 2)"),
    Claim("model patches", "S/B + last layer beats the last layer alone (5%)", ("patches_5", "sb_last_layer"),
          ("patches_5", "last_layer"), "Flowers: 90.4 vs 84.5; Cars: 81 vs 55 (Table 1)"),
    Claim("model patches", "S/B + last layer beats S/B with a random fixed last layer (5%)",
          ("patches_5", "sb_last_layer"), ("patches_5", "sb_random_last_layer"),
          "Flowers: 90.4 vs 79.5 (Table 1)"),
    Claim("model patches", "full fine-tuning beats S/B + last layer (5%)", ("patches_5", "all"),
          ("patches_5", "sb_last_layer"), "Flowers: 93.3 vs 90.4 (Table 1)"),
    Claim("model patches", "the last layer with frozen statistics beats it with re-estimated BatchNorm statistics (5%)",
          ("patches_5", "last_layer"), ("patches_5", "last_layer_bn_stats"),
          "Flowers 80.2 vs 79.8, Aircraft 43.3 vs 38.3, Cars 51.4 vs 43.6; Cifar100 45.0 vs 57.2 the other way "
          "(App. B.1, Table 5)"),
    Claim("model patches", "learned scales and biases beat re-estimated statistics alone (S/B + last layer vs "
          "last layer + BN statistics, 5%)", ("patches_5", "sb_last_layer"), ("patches_5", "last_layer_bn_stats"),
          "Flowers 86.9 vs 79.8, Aircraft 65.6 vs 38.3, Cars 75.9 vs 43.6, Cifar100 74.9 vs 57.2 (App. B.1, Table 5)"),
    Claim("model patches", "DW + last layer beats the last layer alone (5%)", ("patches_5", "dw_last_layer"),
          ("patches_5", "last_layer"), "not in Table 1 (DW patches: Sec. 3)"),
    Claim("data reuse", "UOT ranks matching units above random selection (recall, pool-pretrained features)",
          (DATA_REUSE, "recall_uot_pool_pretrained"), (DATA_REUSE, "recall_random_expected_pool_pretrained"),
          "bird-class recall 98.31% (supervised) / 93.22% (self-supervised) (Table 4)", metric="recall"),
    Claim("data reuse", "UOT ranks matching units above Greedy-OT (recall, pool-pretrained features)",
          (DATA_REUSE, "recall_uot_pool_pretrained"), (DATA_REUSE, "recall_greedy_ot_pool_pretrained"),
          "98.31 vs 94.92 (GOT-cos), 93.22 vs 38.98 self-supervised (Table 4)", metric="recall"),
    Claim("data reuse", "UOT ranks matching units above random selection (recall, ImageNet Lite0 features)",
          (DATA_REUSE, "recall_uot_lite0_imagenet"), (DATA_REUSE, "recall_random_expected_lite0_imagenet"),
          "see above (Table 4)", metric="recall"),
    Claim("data reuse", "UOT reuse beats fine-tuning without reuse", (DATA_REUSE, "uot_reuse"),
          (DATA_REUSE, "finetune"), "average 80.15 vs 78.98 (Table 1a)"),
    Claim("data reuse", "UOT reuse beats random reuse", (DATA_REUSE, "uot_reuse"), (DATA_REUSE, "random_reuse"),
          "average 80.15 vs 79.32 (Table 1a)"),
    Claim("data reuse", "UOT reuse beats Greedy-OT reuse", (DATA_REUSE, "uot_reuse"), (DATA_REUSE, "greedy_reuse"),
          "average 80.15 vs 79.84 (Table 1a)"),
    Claim("model patches", "private S/B patches beat one shared model at the lowest resolution (32 px)",
          ("patches_t4", "px32"), ("patches_t4s", "px32"), "96 px: 60.3 vs 52.6 (Table 4)"),
    Claim("model patches", "private S/B patches keep independently trained models' accuracy within 1 point (64 px)",
          ("patches_t4", "px64"), ("patches_t4i", "px64"), "160 px: 69.5 vs 68.8; 224 px: 71.8 vs 71.8 (Table 4)",
          margin=0.01),
    Claim("model patches", "private S/B patches keep independently trained models' accuracy within 1 point (32 px)",
          ("patches_t4", "px32"), ("patches_t4i", "px32"), "96 px: 60.3 vs 60.3 (Table 4)", margin=0.01),
)


def verdict(diff: stats.PairedDifference, *, margin: float = 0.0, min_seeds: int = MIN_SEEDS) -> str:
  """The verdict a claim's paired difference ``a - b`` supports.

  * fewer than ``min_seeds`` paired seeds: ``pending``;
  * ``margin == 0`` ("a beats b"): ``reproduced`` when the interval is above 0,
    ``not reproduced`` when it is below 0, ``inconclusive`` when it contains 0;
  * ``margin > 0`` ("a keeps b's accuracy"): ``reproduced`` when the interval's
    lower end is above ``-margin``, ``not reproduced`` when its upper end is
    below ``-margin``, else ``inconclusive``.

  >>> d = stats.paired_difference({0: .83, 1: .84, 2: .85}, {0: .80, 1: .82, 2: .81})
  >>> verdict(d)
  'reproduced'
  """
  if diff.n < min_seeds or math.isnan(diff.mean):
    return PENDING
  if diff.low > -margin:
    return REPRODUCED
  if diff.high < -margin:
    return NOT_REPRODUCED
  return INCONCLUSIVE


# ----------------------------------------------------------------------------- collecting


def latest_identity(entries: Sequence[dict[str, Any]]) -> dict[str, str] | None:
  """The commit and kernel set of the most recent ledger entry (None for an empty ledger)."""
  if not entries:
    return None
  last = max(entries, key=lambda e: e.get("finished", ""))
  return {"code": last.get("code"), "kernels": last["kernels"]}


def collect(tables: Sequence[ev.Table], entries: Sequence[dict[str, Any]], identity: dict[str, str], *,
            seeds: int | None = None, key=ev.unit_key) -> dict[str, dict[str, Any]]:
  """``{table: {"rows": {row: [record, ...]}, "chosen": ..., "sweep": ...}}`` for ``identity``'s entries."""
  done = ev.index(entries, identity)
  entries_by_key = {(e["key"], e["evaluate_test"]): e for e in entries if ev.same_code(e, identity)}
  plans = ev.plan_study(tables, done, key=key, seeds=seeds)
  out = {}
  for table in tables:
    plan = plans[table.name]
    rows: dict[str, list[dict[str, Any]]] = {}
    for group in table.groups:
      values = plan.chosen.get(group.main)
      if values is None:
        continue
      for row in group.rows:
        cfg = ev.row_config(table.config, table.arg, row)
        overrides = {p: v for p, v in values.items() if ev._has_path(cfg, p)}
        for seed in range(table.seeds if seeds is None else seeds):
          unit = ev.Unit(table.config, table.arg, row, seed, tuple(sorted(overrides.items())), True)
          record = done.get((key(unit), True))
          if record is None:
            continue
          entry = entries_by_key[(key(unit), True)]
          provenance = dict(commit=entry["commit"], code=entry["code"], kernels=entry["kernels"],
                            hyperparameters=overrides)
          if "tasks" in record:   # a multitask run: one row per task
            for task, figures in record["tasks"].items():
              rows.setdefault(task, []).append(dict(figures, seed=record["seed"], best_val=record["best_val"],
                                                    trainable_parameters=figures.get("patch_parameters"),
                                                    shared_parameters=record.get("shared_parameters"),
                                                    multitask=True, **provenance))
          else:
            rows.setdefault(row, []).append(dict(record, **provenance))
    out[table.name] = {"rows": rows, "chosen": plan.chosen,
                       "sweep": {m: [(ov, r) for ov, r in s] for m, s in plan.sweep.items()}}
  return out


def _by_seed(records: Sequence[dict[str, Any]], metric: str = "test_top1") -> dict[int, float]:
  return {r["seed"]: (math.nan if r.get(metric) is None else float(r[metric])) for r in records}


def data_reuse_rows(path: pathlib.Path) -> dict[str, Any] | None:
  """The data reuse study's results (``experiments/data_reuse.py``) as table rows, or None.

  Fine-tuning variants give records with ``test_top1``; the recall of each
  selection and feature source gives ``recall_<selection>_<features>`` rows
  whose records hold ``recall``.
  """
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  rows: dict[str, list[dict[str, Any]]] = {v: list(recs) for v, recs in results.get("finetune", {}).items()}
  for features, per_seed in results.get("recall", {}).items():
    for r in per_seed:
      for selection in ("uot", "greedy_ot", "random", "random_expected"):
        rows.setdefault(f"recall_{selection}_{features}", []).append({"seed": r["seed"], "recall": r[selection]})
  return {"rows": rows, "chosen": results.get("chosen", {}), "sweep": {}}


def claim_rows(collected: dict[str, dict[str, Any]], claims: Sequence[Claim] = CLAIMS) -> list[dict[str, Any]]:
  """Each claim with its paired difference (or why there is none yet) and its verdict."""
  out = []
  for claim in claims:
    row = {"claim": claim, "diff": None, "verdict": PENDING, "note": ""}
    a = collected.get(claim.a[0], {}).get("rows", {}).get(claim.a[1], [])
    b = collected.get(claim.b[0], {}).get("rows", {}).get(claim.b[1], [])
    if a and b:
      try:
        diff = stats.paired_difference(_by_seed(a, claim.metric), _by_seed(b, claim.metric))
        row["diff"], row["verdict"] = diff, verdict(diff, margin=claim.margin)
      except ValueError as e:
        row["note"] = str(e)
    else:
      row["note"] = "not run yet"
    out.append(row)
  return out


# ----------------------------------------------------------------------------- writing


MULTITASK_NOTE = ("One multitask run per seed trains every row together (a shared base, a private patch per "
                  "task): val (best) is that run's mean validation top-1 over its tasks at the one checkpoint "
                  "it chose, the same for each row; trainable params are the task's private patch plus the "
                  "base that every task trains.")


def _parameters(record: dict[str, Any]) -> str:
  """The trainable-parameter cell: a multitask row names its private and its shared parameters."""
  own, shared = record.get("trainable_parameters"), record.get("shared_parameters")
  if own is None:
    return "n/a"
  return f"{own:,} private + {shared:,} shared" if shared is not None else f"{own:,}"


def format_results_table(table: ev.Table, data: dict[str, Any]) -> str:
  rows = data["rows"]
  lines = [f"# {table.name}: {table.config}:{table.arg}", "",
           "Test top-1 %, checkpoint chosen on validation, test evaluated once per seed. Interval: 95% "
           "Student t over seeds. Δ: paired difference to `finetune` (same seeds), `*` where its interval "
           "excludes 0.", "",
           "| row | seeds | val (best) | test top-1 mean ± std | 95% interval | Δ vs finetune [95%] | "
           "trainable params | chosen values |",
           "|---|---|---|---|---|---|---|---|"]
  base = rows.get(BASELINE_ROW)
  for row in table.rows:
    records = rows.get(row)
    if not records:
      lines.append(f"| {row} | 0 | | | | | | |")
      continue
    test = stats.mean_interval([r["test_top1"] for r in records])
    val = stats.mean_interval([r["best_val"] for r in records])
    delta = ""
    if base and row != BASELINE_ROW:
      d = stats.paired_difference(_by_seed(records), _by_seed(base))
      delta = stats.format_points(d, signed=True) + (" *" if d.excludes_zero else "")
    std = "" if test.n < 2 else f" ± {100 * test.std:.2f}"
    interval = "" if test.n < 2 else f"[{100 * test.low:.2f}, {100 * test.high:.2f}]"
    lines.append(f"| {row} | {test.n} | {100 * val.mean:.2f} | {100 * test.mean:.2f}{std} | {interval} | {delta} | "
                 f"{_parameters(records[0])} | {_values(records[0]['hyperparameters'])} |")
  if any(r.get("multitask") for records in rows.values() for r in records):
    lines += ["", MULTITASK_NOTE]
  lines += ["", "## Chosen on validation (seed 0, test not evaluated)", "",
            "| method | values tried → best validation top-1 % | chosen | at the grid's edge |", "|---|---|---|---|"]
  for main, runs in data["sweep"].items():
    tried = ", ".join(f"{_values(ov)} → " + ("running" if r is None else _val(r)) for ov, r in runs)
    chosen = data["chosen"].get(main)
    edges = ", ".join(grid_edges(runs, chosen)) if chosen else ""
    source = f"(values of {table.values_from})" if table.values_from else "not swept (the protocol's value)"
    lines.append(f"| {main} | {tried or source} | "
                 f"{_values(chosen) if chosen else 'pending'} | {edges} |")
  return "\n".join(lines) + "\n"


def grid_edges(runs: Sequence[tuple[dict[str, float], Any]], chosen: dict[str, float]) -> list[str]:
  """The chosen values that sit at the lowest or highest value tried, e.g. ``["lr (highest)"]``.

  A value chosen at the edge of its grid (of three or more values) may have been beaten
  by one beyond it; the grid is the protocol's, so the tables say so instead of widening it.
  """
  out = []
  for name, value in sorted(chosen.items()):
    tried = sorted({ov[name] for ov, _ in runs if name in ov})
    if len(tried) < 3:
      continue
    short = _values({name: value}).split("=")[0]
    if value == tried[-1]:
      out.append(f"{short} (highest)")
    elif value == tried[0]:
      out.append(f"{short} (lowest)")
  return out


def _val(record: dict[str, Any]) -> str:
  v = record.get("best_val")
  return "diverged" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def _values(values: dict[str, float]) -> str:
  short = {"optimizer.lr": "lr"}
  return ", ".join(f"{short.get(k, k.split('.')[-2] + '.' + k.split('.')[-1] if '.' in k else k)}={v:g}"
                   for k, v in sorted(values.items()))


def plot_table(table: ev.Table, data: dict[str, Any], path: pathlib.Path) -> bool:
  """Bars of mean test top-1 with 95% intervals; False when no row has two seeds."""
  return bool(plot_bars(title=table.name, rows=table.rows, data=data, path=path))


def plot_bars(*, title: str, rows: Sequence[str], data: dict[str, Any], path: pathlib.Path,
              metric: str = "test_top1") -> list[tuple[str, float, float]]:
  """Bars of each row's mean ``metric`` (points) with its 95% t half-width as the error bar.

  Rows with fewer than two seeds are left out; nothing is written when none is left.
  Returns the ``(row, mean, half_width)`` drawn, in points.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  drawn, names, means, errs = [], [], [], []
  for row in rows:
    records = data["rows"].get(row, [])
    if len(records) < 2:
      continue
    iv = stats.mean_interval([r[metric] for r in records])
    names.append(f"{row}\n(n={iv.n})")
    means.append(100 * iv.mean)
    errs.append(100 * (iv.high - iv.mean))
    drawn.append((row, means[-1], errs[-1]))
  if not names:
    return drawn
  fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(names)), 3.6))
  ax.bar(range(len(names)), means, yerr=errs, capsize=4, color="#4c72b0")
  ax.set_xticks(range(len(names)), names, fontsize=7)
  low = min(m - e for m, e in zip(means, errs))
  ax.set_ylim(max(0, low - 3), min(100, max(m + e for m, e in zip(means, errs)) + 1.5))
  ax.set_ylabel(("test top-1" if metric == "test_top1" else metric) + " % (95% interval)")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return drawn


def plot_lr_curves(table: ev.Table, data: dict[str, Any], path: pathlib.Path) -> bool:
  """Validation top-1 against the learning rate from the sweep (model patches' Fig. 2)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  drawn = False
  for main, runs in data["sweep"].items():
    points = sorted((ov["optimizer.lr"], 100 * r["best_val"]) for ov, r in runs
                    if r is not None and len(ov) == 1 and r.get("best_val") is not None)
    if len(points) >= 2:
      ax.plot(*zip(*points), marker="o", label=main)
      drawn = True
  if not drawn:
    plt.close(fig)
    return False
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("validation top-1 % (seed 0)")
  ax.legend(fontsize=7)
  ax.set_title(f"{table.name}: learning rate on validation")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def edges_text(collected: dict[str, dict[str, Any]]) -> str:
  """One sentence naming every choice at the edge of its grid, or ``""``."""
  found = []
  for table, data in collected.items():
    for main, runs in data.get("sweep", {}).items():
      chosen = data["chosen"].get(main)
      edges = grid_edges(runs, chosen) if chosen else []
      if edges:
        found.append(f"`{table}/{main}` {', '.join(edges)}")
  if not found:
    return ""
  return ("Chosen at the edge of its grid (a value beyond it was not tried and might have done better on "
          "validation): " + "; ".join(found) + ".")


def format_scorecard(rows: Sequence[dict[str, Any]], identity: dict[str, str], *, counts: str,
                     commits: str = "", compute: str = "", edges: str = "") -> str:
  lines = [
      "# Scorecard: the papers' claims on Fashion-MNIST with ImageNet EfficientNet-Lite0", "",
      "Written by `python -m experiments.evidence tables` from `ledger.jsonl` (do not edit by hand). "
      f"Code: ftjax/ tree `{identity['code']}` (commits: {commits}), CPU kernels `{identity['kernels']}`; "
      f"{counts}.", "",
      "Protocol: 64 px, 10 epochs, SGD (momentum 0.9, coupled weight decay 5e-4), checkpoint chosen on a fixed "
      "validation split (20% of train), the test split evaluated once per seed. Each method's learning rate "
      "(and its own weight where the paper tunes it) chosen on validation with seed 0; every row then runs "
      "seeds 0-2 at the chosen values. Δ is the paired difference a − b in test top-1 points over the "
      "shared seeds with its 95% Student-t interval.", "",
      "Verdicts: *reproduced* when the interval excludes 0 in the claimed direction (for 'keeps', when its "
      "lower end is above −margin), *not reproduced* when it excludes 0 the other way, *inconclusive* when "
      "it contains 0, *pending* before 3 seeds of both rows exist.", "",
      *([compute, ""] if compute else []),
      *([edges, ""] if edges else []),
      "| paper | claim | paper's figures | ftjax Δ (a − b) [95%] | seeds | verdict |",
      "|---|---|---|---|---|---|"]
  zero_width = False
  for row in rows:
    c, d = row["claim"], row["diff"]
    shown = stats.format_points(d, signed=True) if d is not None else row["note"]
    if _zero_width(d):
      shown += f" {ZERO_WIDTH_MARK}"
      zero_width = True
    lines.append(f"| {c.paper} | {c.text} (`{c.a[0]}/{c.a[1]}` vs `{c.b[0]}/{c.b[1]}`) | {c.paper_figures} | "
                 f"{shown} | {d.n if d is not None else 0} | **{row['verdict']}** |")
  if zero_width:
    lines += ["", f"{ZERO_WIDTH_MARK} {ZERO_WIDTH_NOTE}"]
  return "\n".join(lines) + "\n"


ZERO_WIDTH_MARK = "†"
ZERO_WIDTH_NOTE = (
    "Zero-width interval: every seed gave the same difference. Recall moves in steps of 100/K % "
    "(K matching units), so equal per-seed differences are likely; the t interval then has no width, "
    "and the verdict rests on that many equal differences and nothing more (n equal signs alone have a "
    "two-sided sign-test p of 2^(1-n): 0.25 at 3 seeds).")


def _zero_width(d: stats.PairedDifference | None) -> bool:
  """Whether ``d`` is a t interval over 2+ seeds whose per-seed differences were all equal."""
  # Recall differences such as 10/11 - 9/11 round differently per seed: zero up to float error.
  return d is not None and d.n >= 2 and d.std <= 1e-9


def _left_seconds(tables: Sequence[ev.Table], plans: dict[str, ev.Plan], mine: Sequence[dict[str, Any]], *,
                  fallback: float) -> tuple[float, list[str]]:
  """Seconds the units left need: each at the median of the finished training units of its
  row (else of its table; units waiting on sweeps at their table's).

  A training unit is a validation-only one or a seed after 0 (seed 0's test unit reuses its
  sweep run when there was one, and is short). Tables with none finished count at ``fallback``.
  """
  def median(entries):
    times = sorted(e["seconds"] for e in entries)
    return times[len(times) // 2] if times else None

  left, unestimated = 0.0, []
  for table in tables:
    plan = plans[table.name]
    if not plan.runnable and not plan.waiting:
      continue
    trained = [e for e in mine if "seconds" in e and "unit" in e
               and (e["unit"]["config"], e["unit"]["arg"]) == (table.config, table.arg)
               and (not e.get("evaluate_test", True) or e["unit"].get("seed", 0) > 0)]
    table_median = median(trained)
    if table_median is None:
      unestimated.append(table.name)
      table_median = fallback
    for unit in plan.runnable:
      row_median = median([e for e in trained if e["unit"]["row"] == unit.row])
      left += table_median if row_median is None else row_median
    left += plan.waiting * table_median
  return left, unestimated


def compute_text(tables: Sequence[ev.Table], entries: Sequence[dict[str, Any]], identity: dict[str, str], *,
                 seeds: int | None = None) -> str:
  """The study's compute on this machine: recorded so far, and an estimate of what is left."""
  mine = [e for e in entries if ev.same_code(e, identity)]
  done_hours = sum(e.get("seconds", 0.0) for e in mine) / 3600
  # A validation-only unit trains a whole run; its median is the unit of the estimate.
  trainings = sorted(e["seconds"] for e in mine if not e.get("evaluate_test", True) and "seconds" in e)
  plans = ev.plan_study(tables, ev.index(entries, identity), seeds=seeds)
  runnable = {ev.unit_key(u) for p in plans.values() for u in p.runnable}
  waiting = sum(p.waiting for p in plans.values())
  cpus = collections.Counter(e.get("cpu", "CPU not recorded") for e in mine)
  text = (f"Compute on 2-core machines, one unit per core: {len(mine)} units finished, "
          f"{done_hours:.1f} core-hours recorded (each unit's wall time on its core, with whatever else ran "
          "beside it). CPUs: " + ", ".join(f"{cpu} {n}" for cpu, n in sorted(cpus.items())) +
          " (units finished before 2026-12-06 did not record theirs). A unit's rounding depends on the CPU's "
          "vector extension: in the reproducibility report another extension moved the main job's result by "
          "about one seed standard deviation.")
  if trainings:
    median = trainings[len(trainings) // 2]
    left_s, unestimated = _left_seconds(tables, plans, mine, fallback=median)
    left = len(runnable) + waiting
    text += (f" A training unit's median: {median / 60:.0f} min. Left: {len(runnable)} runnable and "
             f"{waiting} waiting on sweeps, about {left_s / 3600:.1f} core-hours at each table's median "
             "training unit")
    if unestimated:
      text += (f" ({', '.join(unestimated)}: no unit finished yet, counted at the study's median, which "
               "larger units exceed: a lower bound)")
    text += (f"; from scratch about {done_hours + left_s / 3600:.0f} core-hours "
             f"({left} units left).")
  return text + " `bash scripts/reproduce_tables.sh 2` regenerates everything from scratch and resumes where it stopped."


README_MARK = "<!-- scorecard: {paper} -->"
README_END = "<!-- /scorecard -->"


def format_readme_quote(rows: Sequence[dict[str, Any]], paper: str) -> str:
  """The claims of ``paper`` as the README's method section quotes them (a short list)."""
  mine = [r for r in rows if r["claim"].paper == paper]
  lines = [f"Scorecard ([experiments/results/README.md](experiments/results/README.md); written by "
           "`python -m experiments.evidence tables`, test top-1, paired Δ over seeds with its 95% interval):", ""]
  for row in mine:
    c, d = row["claim"], row["diff"]
    if d is None:
      shown = row["note"]
    elif d.n < 2:   # format_points already says "(1 seed)"
      shown = f"Δ {stats.format_points(d, signed=True)}"
    else:
      shown = f"Δ {stats.format_points(d, signed=True)} over {d.n} seeds"
      if _zero_width(d):
        shown += " (every seed gave the same difference)"
    lines.append(f"- {c.text}: {shown}: **{row['verdict']}**")
  return "\n".join(lines)


def update_readme(readme: pathlib.Path, rows: Sequence[dict[str, Any]]) -> list[str]:
  """Rewrites each ``<!-- scorecard: PAPER -->`` ... ``<!-- /scorecard -->`` block of ``readme``.

  The README's method sections quote the scorecard through these blocks, so their
  numbers are the scorecard's and change only when the tables are regenerated.
  Returns the papers whose blocks were written.
  """
  text = readme.read_text()
  written = []
  for paper in dict.fromkeys(r["claim"].paper for r in rows):
    mark = README_MARK.format(paper=paper)
    start = text.find(mark)
    if start < 0:
      continue
    end = text.find(README_END, start)
    if end < 0:
      raise ValueError(f"{readme}: {mark} has no {README_END}")
    text = text[:start] + mark + "\n" + format_readme_quote(rows, paper) + "\n" + text[end:]
    written.append(paper)
  readme.write_text(text)
  return written


def write_all(tables: Sequence[ev.Table], ledger: ev.Ledger, results: pathlib.Path, *, seeds: int | None = None,
              identity: dict[str, str] | None = None, readme: pathlib.Path | None = None) -> list[dict[str, Any]]:
  """Writes every table's results and the scorecard under ``results``; returns the claim rows.

  With ``readme``, the scorecard blocks of that file (:func:`update_readme`) are rewritten too.
  """
  entries = ledger.entries()
  identity = identity or latest_identity(entries)
  if identity is None:
    raise SystemExit(f"evidence: {ledger.path} holds no finished run yet")
  collected = collect(tables, entries, identity, seeds=seeds)
  for table in tables:
    data = collected[table.name]
    out = results / table.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "results_table.md").write_text(format_results_table(table, data))
    payload = {"code": identity["code"], "kernels": identity["kernels"], "chosen": data["chosen"],
               "rows": data["rows"],
               "sweep": {m: [{"overrides": ov, "record": r} for ov, r in runs] for m, runs in data["sweep"].items()}}
    (out / "results.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    plot_table(table, data, out / "test_top1.png")
    if any(len(g.lr_values or ()) > 3 for g in table.groups):
      plot_lr_curves(table, data, out / "val_vs_lr.png")
  reuse = data_reuse_rows(results / DATA_REUSE / "results.json")
  if reuse is not None:
    collected[DATA_REUSE] = reuse
    finetune_rows = [r for r in reuse["rows"] if not r.startswith("recall_")]
    plot_bars(title=f"{DATA_REUSE}: fine-tuning on the target", rows=finetune_rows, data=reuse,
              path=results / DATA_REUSE / "test_top1.png")
  names = {t.name for t in tables} | {DATA_REUSE}
  rows = claim_rows(collected, [c for c in CLAIMS if {c.a[0], c.b[0]} <= names])
  mine = [e for e in entries if ev.same_code(e, identity)]
  commits = ", ".join(f"`{c}`" for c in sorted({e["commit"][:12] + ("+dirty" if e["commit"].endswith("+dirty") else "")
                                                 for e in mine}))
  (results / "README.md").write_text(format_scorecard(rows, identity, counts=f"{len(mine)} finished runs in the ledger",
                                                      commits=commits,
                                                      compute=compute_text(tables, entries, identity, seeds=seeds),
                                                      edges=edges_text(collected)))
  if readme is not None:
    update_readme(readme, rows)
  return rows

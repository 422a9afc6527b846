"""Runs a config's variants and seeds, and tabulates test accuracy as mean ± std."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
import numpy as np

from ftjax.core.errors import ConfigError
from ftjax.core.io import atomic_write_text
from ftjax.train.loop import train_and_evaluate


def variant_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """``{name: config}``: one per entry of ``config.compare`` (or the config itself)."""
  base = copy.deepcopy(config)
  with base.unlocked():
    variants = base.compare.to_dict() if base.compare else {}
    base.compare = ml_collections.ConfigDict()
  if not variants:
    return {"run": base}
  out = {}
  for name, overrides in variants.items():
    cfg = copy.deepcopy(base)
    _apply(cfg, overrides or {}, prefix=f"compare.{name}")
    out[name] = cfg
  return out


def _apply(cfg: ml_collections.ConfigDict, overrides: dict[str, Any], prefix: str) -> None:
  for key, value in overrides.items():
    if key not in cfg:
      raise ConfigError(f"{prefix}.{key}: unknown config field {key!r}")
    if isinstance(value, dict) and isinstance(cfg[key], ml_collections.ConfigDict) and key not in ("groups", "losses"):
      _apply(cfg[key], value, f"{prefix}.{key}")
    else:
      with cfg.unlocked():
        cfg[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def run_all(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[dict[str, Any]]]:
  """Trains every variant for ``config.num_seeds`` seeds; writes ``results_table.md``/``.json``.

  Seeds are the outer loop (seed 0 of every variant, then seed 1, ...) and the
  table is rewritten after every run, so a long comparison stopped early still
  leaves a table with the same seeds for each variant. With ``config.vmap_seeds``
  each variant trains all its seeds at once as one vmapped program
  (:mod:`ftjax.train.vmap_seeds`), variant after variant.
  """
  variants = variant_configs(config)
  vmapped = {name: bool(cfg.get("vmap_seeds", False)) for name, cfg in variants.items()}
  if set(vmapped.values()) - {bool(config.get("vmap_seeds", False))}:
    # One table never mixes vmapped and serial seeds.
    raise ConfigError(f"compare: vmap_seeds is set for the whole comparison, not per variant "
                      f"(variants: {vmapped})")
  results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
  table = ""
  if config.get("vmap_seeds", False):
    from ftjax.train.vmap_seeds import train_and_evaluate_seeds
    for name, cfg in variants.items():
      seeded = []
      for i in range(config.num_seeds):
        seeded.append(copy.deepcopy(cfg))
        seeded[-1].seed = config.seed + i
      results[name] = train_and_evaluate_seeds(seeded, os.path.join(workdir, name if name != "run" else ""))
      if jax.process_index() == 0:
        table = write_table({k: v for k, v in results.items() if v}, workdir, title=_title(config))
    if jax.process_index() == 0:
      print(table, flush=True)
    return results
  for i in range(config.num_seeds):
    for name, cfg in variants.items():
      seeded = copy.deepcopy(cfg)
      seeded.seed = config.seed + i
      run_dir = os.path.join(workdir, name if name != "run" else "", f"seed{seeded.seed}")
      try:
        results[name].append(train_and_evaluate(seeded, run_dir))
      except FloatingPointError as err:
        if seeded.get("on_divergence", "raise") != "record":
          raise
        logging.warning("%s seed %d diverged (recorded, going on): %s", name, seeded.seed, err)
        results[name].append(diverged_record(seed=seeded.seed, error=str(err)))
      if jax.process_index() == 0:
        table = write_table({k: v for k, v in results.items() if v}, workdir, title=_title(config))
  if jax.process_index() == 0:
    print(table, flush=True)
  return results


def diverged_record(*, seed: int, error: str) -> dict[str, Any]:
  """The result of a run whose loss became non-finite (``on_divergence="record"``)."""
  nan = float("nan")
  return {"seed": seed, "diverged": error, "best_val": nan, "test_top1": nan,
          "test_mean_per_class": nan, "trainable_parameters": None}


def write_table(results: dict[str, list[dict[str, Any]]], workdir: str, *, title: str = "") -> str:
  """Writes ``results_table.md`` (with the figures found under ``workdir``) and ``results.json``."""
  table = format_table(results, title=title) + _figure_list(workdir)
  for name, text in (("results_table.md", table + "\n"), ("results.json", json.dumps(results, indent=2))):
    atomic_write_text(os.path.join(workdir, name), text)
  return table


def combine_results(workdirs: list[str]) -> dict[str, list[dict[str, Any]]]:
  """The variants of several comparisons' ``results.json`` in one table's results.

  Runs of the same protocol made by different configs (Co-Tuning's rows, the
  regularisers' rows) share rows such as ``finetune``: a variant found in several
  workdirs appears once when its records are equal and raises otherwise, since
  two different results under one name would make the table ambiguous.
  """
  combined: dict[str, list[dict[str, Any]]] = {}
  origin: dict[str, str] = {}
  for workdir in workdirs:
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: is {workdir} a comparison's workdir?")
    with open(path) as f:
      results = json.load(f)
    for name, runs in results.items():
      if name in combined and combined[name] != runs:
        raise ValueError(f"variant {name!r} differs between {origin[name]} and {workdir}; "
                         "rename one of them")
      combined.setdefault(name, runs)
      origin.setdefault(name, workdir)
  seeds_vmapped(combined)  # refuses a table of vmapped and serial seeds
  return combined


def seeds_vmapped(results: dict[str, list[dict[str, Any]]]) -> bool:
  """Whether the table's seeds were vmapped (``config.vmap_seeds``); serial records lack the key.

  Raises:
    ValueError: some records are vmapped and others serial (one table never
      mixes them: their numbers agree only up to float rounding).
  """
  kinds = {bool(r.get("vmap_seeds", False)) for runs in results.values() for r in runs}
  if len(kinds) > 1:
    mixed = sorted(name for name, runs in results.items()
                   if any(r.get("vmap_seeds", False) for r in runs))
    raise ValueError(f"a table never mixes vmapped and serial seeds: {', '.join(mixed)} have vmapped seeds "
                     f"(vmap_seeds=True) and the other runs serial ones; tabulate them apart")
  return kinds == {True}


def _figure_list(workdir: str) -> str:
  """Markdown lines naming the figures the runs wrote (e.g. Co-Tuning's Fig. 1)."""
  found = sorted(os.path.relpath(os.path.join(root, f), workdir)
                 for root, _, files in os.walk(workdir) for f in files if f.endswith(".png"))
  if not found:
    return ""
  return "\n\nFigures:" + "".join(f"\n- [{p}]({p})" for p in found)


def _title(config) -> str:
  d = config.dataset
  if d.get("val_source", "sampled") == "full":
    val = (f"val the full held-out split (a fixed {100 * d.val_fraction:g}% of train, or the dataset's "
           f"validation split), not sampled")
  else:
    val = f"val sampled at {d.sampling_rate:g}% like train (low-data setting)"
  return (f"{d.name} at {d.sampling_rate:g}% of train, {d.image_size}px, {config.model}"
          f"{' (' + config.pretrained + ')' if config.pretrained else ''}; "
          f"checkpoint chosen on val ({config.selection_metric}), {val}; test evaluated once")


def _test_cell(runs: list[dict[str, Any]], key: str) -> str:
  """Mean ± std of a test figure; "not evaluated" for validation-only runs (``evaluate_test=False``)."""
  if any(key not in r for r in runs):
    return "not evaluated"
  return _mean_std([r[key] for r in runs])


def _mean_std(values: list[float]) -> str:
  arr = 100 * np.asarray(values, dtype=float)
  if np.isnan(arr).any():
    return f"diverged ({int(np.isnan(arr).sum())}/{len(arr)})"
  if len(arr) == 1:
    return f"{arr[0]:.2f}"
  return f"{arr.mean():.2f} ± {arr.std(ddof=1):.2f}"


def _count(runs: list[dict[str, Any]]) -> str:
  counts = [r["trainable_parameters"] for r in runs if r.get("trainable_parameters") is not None]
  return f"{counts[0]:,}" if counts else "n/a"


def format_table(results: dict[str, list[dict[str, Any]]], *, title: str = "") -> str:
  """The markdown table of ``results`` (``{variant: [record per seed]}``), mean ± std over seeds.

  Raises:
    ValueError: the records mix vmapped and serial seeds.
  """
  if seeds_vmapped(results):
    title = f"{title}; seeds vmapped" if title else "seeds vmapped"
  lines = [f"{title}", ""] if title else []
  lines.append("| variant | seeds | val (best) | test top-1 | test mean per-class | trainable params |")
  lines.append("|---|---|---|---|---|---|")
  for name, runs in results.items():
    lines.append(
        f"| {name} | {len(runs)} | {_mean_std([r['best_val'] for r in runs])} | "
        f"{_test_cell(runs, 'test_top1')} | "
        f"{_test_cell(runs, 'test_mean_per_class')} | {_count(runs)} |")
  return "\n".join(lines)

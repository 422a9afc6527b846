r"""The evidence study: every paper table at three seeds, hyper-parameters chosen on validation.

  .venv/bin/python -m experiments.evidence run --workers 2        # resumable; Ctrl-C and rerun
  .venv/bin/python -m experiments.evidence status                 # what is done, running, left
  .venv/bin/python -m experiments.evidence tables                 # results tables, figures, scorecard

``run`` works through :data:`TABLES` in order. For each method (a :class:`Group` of
rows sharing its hyper-parameters) it first sweeps on the validation split with
seed 0 and *no test evaluation* (``evaluate_test=False``):

1. the learning rate on {⅓, 1, 3} × the protocol's value, with the method's own
   weight at the paper's value;
2. the method's weight where the paper tunes it (λ, α, η, …), on three values
   containing the paper's, at the chosen learning rate;

and picks the value with the best validation accuracy (``best_val``; ties go to
the protocol's value). Then every row of the group runs seeds 0 … n-1 at the
chosen values with the test split evaluated once; seed 0 at the chosen values
reuses the sweep's run directory, so it only evaluates the test split.

A unit of work is one (config, seed) run, named by a hash of its semantic config:
rows that are the same run in several tables (the 5% ``finetune`` row) run once. A
finished unit is appended to the ledger (``experiments/results/ledger.jsonl``) with
the commit and the CPU kernel set that produced it and is never rerun for that
commit and kernel set; a stopped unit resumes from its checkpoints. Several
workers (``--workers``, or several ``run`` commands on hosts sharing the
directories) claim units through lock files.

Run the study from a clean checkout of a fixed commit (a ``git worktree``), so
that work landing meanwhile does not change the code under it; ``--results``
points at the checkout whose ``experiments/results`` should receive the ledger.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
LR_FACTORS = (1 / 3, 1.0, 3.0)


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Group:
  """Rows that share one method's hyper-parameters, chosen by sweeping its ``main`` row.

  Attributes:
    main: the row swept (seed 0, validation only).
    follows: further rows (ablations of the method) run at ``main``'s chosen values.
    weight: ``(config path, values)`` of the method's own weight where the paper
      tunes it; the values contain the paper's (the config's) value.
    lr_values: the learning rates swept; ``None``: {⅓, 1, 3} × the protocol's value;
      ``()``: no sweep (the protocol's value).
  """
  main: str
  follows: tuple[str, ...] = ()
  weight: tuple[str, tuple[float, ...]] | None = None
  lr_values: tuple[float, ...] | None = None

  @property
  def rows(self) -> tuple[str, ...]:
    return (self.main,) + self.follows


@dataclasses.dataclass(frozen=True)
class Table:
  """One results table: a config (file and argument) and its rows grouped by method.

  Attributes:
    name: directory under ``experiments/results``.
    config: config file, relative to the repository.
    arg: the config's argument (e.g. the sampling rate).
    groups: the methods of the table.
    seeds: seeds per row.
    values_from: take every group's chosen values from this table (same main row)
      instead of sweeping again (e.g. 15% at the values chosen at 5%).
  """
  name: str
  config: str
  arg: str
  groups: tuple[Group, ...]
  seeds: int = 3
  values_from: str | None = None
  tasks: tuple[str, ...] = ()

  @property
  def rows(self) -> tuple[str, ...]:
    """The table's rows: the groups' rows, or for a multitask config (one run per seed) its tasks."""
    return self.tasks or tuple(r for g in self.groups for r in g.rows)

  @property
  def runs(self) -> tuple[str, ...]:
    """The config variants that run (a multitask config has one, ``run``)."""
    return tuple(r for g in self.groups for r in g.rows)


def _round(x: float) -> float:
  """6 significant digits: ⅓ × 0.005 names the same run however it was computed."""
  return float(f"{x:.6g}")


def _thirds(value: float) -> tuple[float, float, float]:
  return (_round(value / 3), value, _round(value * 3))


T4_SIZES = "32,48,64,80,96"
T4_TASKS = tuple(f"px{size}" for size in T4_SIZES.split(","))
PATCH_LRS = (0.0045, 0.0135, 0.0405, 0.1215, 0.3645)   # experiments/configs/model_patches.py LR_SWEEP
FINETUNE = Group("finetune")
CO_TUNING = Group("co_tuning_src_r50_x0884_g_cal",
                  follows=("co_tuning_src_uncal_g_cal", "co_tuning_no_calibration", "co_tuning_direct_src_uncal"),
                  weight=("losses.co_tuning.weight", _thirds(2.3)))

TABLES: tuple[Table, ...] = (
    Table("co_tuning_5", "experiments/configs/co_tuning.py", "5", (FINETUNE, CO_TUNING)),
    Table("regularizers_5", "experiments/configs/regularizers.py", "5", (
        FINETUNE,
        Group("l2_sp", weight=("losses.l2_sp.alpha", _thirds(0.01))),
        Group("delta", weight=("losses.delta.alpha", _thirds(0.01))),
        Group("bss", weight=("losses.bss.weight", _thirds(0.001))),
        Group("lwf", weight=("losses.lwf.weight", _thirds(1.0))),
        Group("co_tuning_bss_l2sp"),
    )),
    Table("bi_tuning_5", "experiments/configs/bi_tuning.py", "5", (
        FINETUNE, Group("bi_tuning", follows=("ce_cce", "ce_ccl", "cce_ccl")))),
    # Model patches sweep the learning rates of their Fig. 2 (0.0045 x 3^k; the figure
    # is drawn from these validation runs).
    Table("patches_5", "experiments/configs/model_patches.py", "table1", tuple(
        Group(row, lr_values=PATCH_LRS) for row in ("last_layer", "last_layer_bn_stats", "sb_last_layer",
                                                    "sb_random_last_layer", "dw_last_layer", "all"))),
    Table("spottune_5", "experiments/configs/spottune.py", "5", (
        FINETUNE, Group("feature_extractor"), Group("last_1"), Group("last_2"), Group("last_3"),
        Group("spottune", follows=("global_k", "stochastic", "random_policy")))),
    Table("co_tuning_15", "experiments/configs/co_tuning.py", "15", (
        FINETUNE, Group(CO_TUNING.main, follows=("co_tuning_no_calibration",), weight=CO_TUNING.weight)),
          values_from="co_tuning_5"),
    # Model patches' Table 4 at 32-96 px: the multitask runs (one run per seed trains every
    # resolution) at the protocol's learning rate, and the independently fine-tuned models.
    Table("patches_t4", "experiments/configs/model_patches.py", "table4," + T4_SIZES,
          (Group("run", lr_values=()),), tasks=T4_TASKS),
    Table("patches_t4s", "experiments/configs/model_patches.py", "table4_shared," + T4_SIZES,
          (Group("run", lr_values=()),), tasks=T4_TASKS),
    Table("patches_t4i", "experiments/configs/model_patches.py", "table4_independent," + T4_SIZES,
          tuple(Group(task, lr_values=()) for task in T4_TASKS)),
    # Bi-Tuning's Table 1 at its own lowest rate, 25%, at the values chosen at 5% (5x the
    # steps of a 5% unit: the headline rows only, fine-tuning and all three losses).
    Table("bi_tuning_25", "experiments/configs/bi_tuning.py", "25", (FINETUNE, Group("bi_tuning")),
          values_from="bi_tuning_5"),
)


# ----------------------------------------------------------------------------- units


@dataclasses.dataclass(frozen=True)
class Unit:
  """One training run: a row of a config at a seed, with overrides of dotted config fields."""
  config: str
  arg: str
  row: str
  seed: int
  overrides: tuple[tuple[str, float], ...]
  evaluate_test: bool

  def spec(self) -> dict[str, Any]:
    return {"config": self.config, "arg": self.arg, "row": self.row, "seed": self.seed,
            "overrides": dict(self.overrides), "evaluate_test": self.evaluate_test}


def load_config_module(path: str):
  full = REPO / path
  spec = importlib.util.spec_from_file_location(f"_evidence_cfg_{full.stem}", full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_CONFIG_CACHE: dict[tuple[str, str], Any] = {}


def row_config(config: str, arg: str, row: str):
  """The ``compare`` variant ``row`` of a config file called with ``arg``."""
  from ftjax.train import report
  if (config, arg) not in _CONFIG_CACHE:
    _CONFIG_CACHE[(config, arg)] = report.variant_configs(load_config_module(config).get_config(arg))
  variants = _CONFIG_CACHE[(config, arg)]
  if row not in variants:
    raise KeyError(f"{config}:{arg} has no row {row!r}; rows: {', '.join(variants)}")
  return copy.deepcopy(variants[row])


def get_path(cfg, path: str):
  for part in path.split("."):
    cfg = cfg[part]
  return cfg


def set_path(cfg, path: str, value) -> None:
  *parents, leaf = path.split(".")
  for part in parents:
    cfg = cfg[part]
  if leaf not in cfg:
    raise KeyError(f"config field {path!r} does not exist")
  with cfg.unlocked():
    cfg[leaf] = value


def unit_config(unit: Unit):
  """The run config of ``unit`` (progress bars off)."""
  cfg = row_config(unit.config, unit.arg, unit.row)
  for path, value in unit.overrides:
    set_path(cfg, path, value)
  cfg.seed = unit.seed
  cfg.evaluate_test = unit.evaluate_test
  cfg.progress = False
  return cfg


def unit_key(unit: Unit) -> str:
  """The run's identity: its row name and a hash of its semantic config (seed included).

  Fields at their default value are left out of the hash, so that a config field
  added to ftjax later (at a neutral default) does not rename finished runs.
  """
  from ftjax.train.config import default_config
  from ftjax.train.setup import semantic_config
  canonical = _without_defaults(semantic_config(unit_config(unit)), semantic_config(default_config()))
  semantic = json.dumps(canonical, sort_keys=True)
  return f"{unit.row}-{hashlib.sha256(semantic.encode()).hexdigest()[:12]}-seed{unit.seed}"


def _without_defaults(config: Any, default: Any) -> Any:
  if not isinstance(config, dict):
    return config
  default = default if isinstance(default, dict) else {}
  out = {}
  for key, value in config.items():
    if key in default and value == default[key]:
      continue
    out[key] = _without_defaults(value, default.get(key))
  return out


# ----------------------------------------------------------------------------- the ledger


def code_identity(repo: pathlib.Path = REPO) -> dict[str, str]:
  """The commit, the code that trains and the active CPU kernel set.

  ``code`` is the git tree hash of ``ftjax/`` (the library, kernels' sources
  included; ``+dirty`` when it has uncommitted changes). Units are matched on
  ``code`` and ``kernels``: a commit that changes only the study's plan, its
  tables or the docs does not invalidate finished runs, while any change to the
  library does. (What else defines a run, the experiment config, is in the unit's
  name.) ``commit`` is kept in every record for provenance.
  """
  def git(*args):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
  commit = git("rev-parse", "HEAD")
  dirty = git("status", "--porcelain", "--untracked-files=no")
  code_dirty = git("status", "--porcelain", "--untracked-files=no", "--", "ftjax")
  return {"commit": commit + ("+dirty" if dirty else ""), "code": git("rev-parse", "HEAD:ftjax")[:12]
          + ("+dirty" if code_dirty else ""), "kernels": kernel_set()}


def kernel_set() -> str:
  """Which compiled CPU kernels are active (and a forced convolution formulation)."""
  from ftjax.ops import channel_sums, onednn_conv, pool
  names = [name for name, lib in (("onednn_conv", onednn_conv.LIBRARY), ("max_pool", pool.LIBRARY),
                                  ("channel_sums", channel_sums.LIBRARY)) if lib.path().exists()]
  forced = os.environ.get("FTJAX_CONV_IMPL")
  return "+".join(names or ["none"]) + (f" conv={forced}" if forced else "")


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU model and its widest x86 vector extension, e.g. ``"AMD EPYC avx512"``.

  Recorded with each finished unit, not matched on: XLA and oneDNN pick kernels by the
  vector extension, so the same code rounds differently on another CPU (in the
  reproducibility report, SSE4.1 instead of AVX2 made the main job depart at its first
  logged step and end within about a seed's spread). The scorecard says which CPUs its
  units ran on.
  """
  model, flags = "unknown CPU", set()
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    return f"{platform.machine() or 'unknown'} CPU"
  widest = next((isa for isa, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"),
                                        ("sse4.2", "sse4_2")) if flag in flags), "")
  return " ".join(part for part in (model, widest) if part)


class Ledger:
  """Finished units, one JSON line each: ``{"key", "evaluate_test", "commit", "kernels", "record", ...}``."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)

  def entries(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    out = []
    with open(self.path) as f:
      for line in f:
        line = line.strip()
        if line:
          out.append(json.loads(line))
    return out

  def append(self, entry: dict[str, Any]) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True) + "\n"
    # One write of a short line with O_APPEND: concurrent workers do not interleave.
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      os.write(fd, line.encode())
      os.fsync(fd)
    finally:
      os.close(fd)


def same_code(entry: dict[str, Any], identity: dict[str, str]) -> bool:
  """Whether a ledger entry was made by ``identity``'s library code and kernel set."""
  return entry.get("code") == identity["code"] and entry["kernels"] == identity["kernels"]


def index(entries: Iterable[dict[str, Any]], identity: dict[str, str]) -> dict[tuple[str, bool], dict]:
  """``{(key, evaluate_test): record}`` of the entries made by ``identity``'s code and kernels."""
  out = {}
  for e in entries:
    if same_code(e, identity):
      out[(e["key"], e["evaluate_test"])] = e["record"]
  return out


# ----------------------------------------------------------------------------- choosing on validation


def choose(candidates: Sequence[tuple[float, dict[str, Any]]], *, preferred: float) -> float:
  """The value whose run scored the best validation figure (``best_val``).

  Args:
    candidates: ``(value, record)`` pairs; a diverged record (NaN) never wins.
    preferred: the protocol's value, which wins ties.

  Only ``best_val`` is read: a record's test figures (if any) never influence the choice.
  """
  def score(item):
    value, record = item
    val = record.get("best_val", math.nan)
    return (-math.inf if val is None or math.isnan(val) else val, value == preferred)
  return max(candidates, key=score)[0]


@dataclasses.dataclass
class Plan:
  """The units a table still needs, in order, and the values chosen so far."""
  runnable: list[Unit]
  waiting: int                       # units whose inputs (a sweep) are not finished
  chosen: dict[str, dict[str, float]]   # group main row -> {path: value}
  sweep: dict[str, list[tuple[dict[str, float], dict[str, Any] | None]]]  # main -> [(overrides, record)]


def plan_table(table: Table, done: dict[tuple[str, bool], dict], *, key: Callable[[Unit], str] = unit_key,
               chosen_elsewhere: dict[str, dict[str, float]] | None = None, seeds: int | None = None) -> Plan:
  """What ``table`` needs next given the finished units ``done`` (see :func:`index`)."""
  seeds = table.seeds if seeds is None else seeds
  runnable: list[Unit] = []
  waiting = 0
  chosen: dict[str, dict[str, float]] = {}
  sweeps: dict[str, list] = {}

  def record(unit: Unit):
    return done.get((key(unit), unit.evaluate_test))

  for group in table.groups:
    base = row_config(table.config, table.arg, group.main)
    lr0 = _round(float(base.optimizer.lr))
    weight_path, weight_values = group.weight or (None, ())
    weight0 = None
    if weight_path:
      weight0 = float(get_path(base, weight_path))
      if not any(math.isclose(weight0, v) for v in weight_values):
        raise ValueError(f"{table.name}/{group.main}: the sweep of {weight_path} {weight_values} does not "
                         f"contain the config's value {weight0}")
    sweeps[group.main] = []

    def sweep_unit(overrides: dict[str, float]) -> Unit:
      return Unit(table.config, table.arg, group.main, 0, tuple(sorted(overrides.items())), False)

    if table.values_from is not None:
      if chosen_elsewhere is None or group.main not in chosen_elsewhere:
        waiting += len(group.rows) * seeds
        continue
      values = dict(chosen_elsewhere[group.main])
    elif group.lr_values == () and not weight_path:
      # Nothing to choose: no validation run (a multitask run cannot make one, as it
      # always evaluates the test split), the seeds run at the protocol's value.
      values = {"optimizer.lr": lr0}
    else:
      if group.lr_values is None:
        lr_values = [_round(lr0 * f) for f in LR_FACTORS]
      else:
        lr_values = [_round(v) for v in group.lr_values] or [lr0]
      # Ties go to the protocol's value (or, when the sweep does not contain it, the middle one).
      preferred_lr = lr0 if lr0 in lr_values else lr_values[len(lr_values) // 2]
      weight_default = {weight_path: weight0} if weight_path else {}
      stage = [({"optimizer.lr": lr, **weight_default}, sweep_unit({"optimizer.lr": lr, **weight_default}))
               for lr in lr_values]
      results = [(ov, record(u)) for ov, u in stage]
      sweeps[group.main] += results
      missing = [u for (_, r), (_, u) in zip(results, stage) if r is None]
      if missing:
        runnable += missing
        waiting += (len(weight_values) - 1 if weight_path else 0) + len(group.rows) * seeds
        continue
      lr = choose([(ov["optimizer.lr"], r) for ov, r in results], preferred=preferred_lr)
      values = {"optimizer.lr": lr}
      if weight_path:
        stage = [({"optimizer.lr": lr, weight_path: w}, sweep_unit({"optimizer.lr": lr, weight_path: w}))
                 for w in weight_values if not math.isclose(w, weight0)]
        results = [(ov, record(u)) for ov, u in stage]
        sweeps[group.main] += results
        missing = [u for (_, r), (_, u) in zip(results, stage) if r is None]
        if missing:
          runnable += missing
          waiting += len(group.rows) * seeds
          continue
        at_lr = [(weight0, done[(key(sweep_unit({"optimizer.lr": lr, weight_path: weight0})), False)])]
        w = choose(at_lr + [(ov[weight_path], r) for ov, r in results], preferred=weight0)
        values[weight_path] = w
    chosen[group.main] = values
    for seed in range(seeds):
      for row in group.rows:
        cfg = row_config(table.config, table.arg, row)
        overrides = {p: v for p, v in values.items() if _has_path(cfg, p)}
        unit = Unit(table.config, table.arg, row, seed, tuple(sorted(overrides.items())), True)
        if record(unit) is None:
          runnable.append(unit)
  # Seeds outer across the table's groups: seed 0 of every row first, so a stopped
  # study leaves tables with the same seeds for each row.
  runnable.sort(key=lambda u: (u.evaluate_test, u.seed))
  return Plan(runnable, waiting, chosen, sweeps)


def _has_path(cfg, path: str) -> bool:
  try:
    get_path(cfg, path)
    return True
  except KeyError:
    return False


def plan_study(tables: Sequence[Table], done, *, key: Callable[[Unit], str] = unit_key,
               seeds: int | None = None) -> dict[str, Plan]:
  plans: dict[str, Plan] = {}
  for table in tables:
    elsewhere = plans[table.values_from].chosen if table.values_from in plans else None
    if table.values_from and elsewhere is None:
      source = next(t for t in TABLES if t.name == table.values_from)
      elsewhere = plan_table(source, done, key=key, seeds=seeds).chosen
    plans[table.name] = plan_table(table, done, key=key, chosen_elsewhere=elsewhere, seeds=seeds)
  return plans


# ----------------------------------------------------------------------------- running


def run_unit_in_process(spec: dict[str, Any], workdir: str) -> dict[str, Any]:
  """Trains one unit (called in the unit's own subprocess); returns its results record."""
  from ftjax.train.loop import train_and_evaluate
  from ftjax.train.report import diverged_record
  unit = Unit(spec["config"], spec["arg"], spec["row"], spec["seed"], tuple(sorted(spec["overrides"].items())),
              spec["evaluate_test"])
  cfg = unit_config(unit)
  if cfg.get("tasks"):
    return _run_multitask(cfg, workdir)
  try:
    return train_and_evaluate(cfg, workdir)
  except FloatingPointError as err:   # a too-high learning rate in a sweep: recorded, never chosen
    return diverged_record(seed=unit.seed, error=str(err))


def _run_multitask(cfg, workdir: str) -> dict[str, Any]:
  """A multitask run's record: ``best_val`` (mean over tasks, from its metrics) and per-task test figures."""
  from ftjax.methods import multitask
  if not cfg.evaluate_test:
    raise ValueError("multitask runs are not swept (they always evaluate the test split)")
  results = multitask.train_multitask(cfg, workdir)
  metric = "mean_" + cfg.selection_metric
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    vals = [row[metric] for row in map(json.loads, f) if row.get("split") == "val" and metric in row]
  return {"seed": int(cfg.seed), "best_val": max(vals) if vals else math.nan,
          **{k: v for k, v in results.items() if k != "table"}}


class Lock:
  """``<dir>/<key>.lock`` held by this process (host, pid); a dead holder's lock is taken over."""

  def __init__(self, directory: pathlib.Path, key: str):
    self.path = directory / f"{key}.lock"

  def acquire(self) -> bool:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        if not self._holder_dead():
          return False
        with contextlib.suppress(FileNotFoundError):
          os.unlink(self.path)
        continue
      os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
      os.close(fd)
      return True
    return False

  def _holder_dead(self) -> bool:
    try:
      holder = json.loads(self.path.read_text())
    except (OSError, ValueError):
      return False   # being written
    if holder.get("host") != socket.gethostname():
      return False
    try:
      os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
      return True
    except PermissionError:
      return False
    return False

  def release(self) -> None:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)


def _log(message: str) -> None:
  print(f"{datetime.datetime.now():%H:%M:%S} {message}", flush=True)


def work(tables: Sequence[Table], *, runs: pathlib.Path, ledger: Ledger, identity: dict[str, str],
         seeds: int | None, cpus: Sequence[int] | None, poll_s: float = 20.0) -> None:
  """One worker: runs units until none is left (waiting while other workers finish sweeps)."""
  stop = {"now": False}

  def on_signal(signum, frame):
    stop["now"] = True
    raise KeyboardInterrupt
  signal.signal(signal.SIGTERM, on_signal)
  failed: set[str] = set()
  while not stop["now"]:
    done = index(ledger.entries(), identity)
    plans = plan_study(tables, done, seeds=seeds)
    units = [u for p in plans.values() for u in p.runnable if unit_key(u) not in failed]
    waiting = sum(p.waiting for p in plans.values())
    if not units and not waiting:
      _log("nothing left to run" + (f"; {len(failed)} unit(s) failed: {sorted(failed)}" if failed else ""))
      return
    if not units and failed:
      _log(f"only units waiting on failed ones are left: {sorted(failed)}")
      return
    started = False
    seen = set()
    for unit in units:
      key = unit_key(unit)
      if (key, unit.evaluate_test) in seen:
        continue
      seen.add((key, unit.evaluate_test))
      lock = Lock(runs, f"{key}-{'test' if unit.evaluate_test else 'val'}")
      if not lock.acquire():
        continue
      try:
        if (key, unit.evaluate_test) in index(ledger.entries(), identity):
          continue   # another worker finished it meanwhile
        started = True
        _run_one(unit, key, runs=runs, ledger=ledger, identity=identity, cpus=cpus)
      except UnitFailed:
        failed.add(key)
      finally:
        lock.release()
      break
    if not started:
      time.sleep(poll_s)   # every runnable unit is held by another worker


class UnitFailed(Exception):
  """A unit's process failed (its log says why); the worker goes on with other units."""


def _run_one(unit: Unit, key: str, *, runs: pathlib.Path, ledger: Ledger, identity: dict[str, str],
             cpus: Sequence[int] | None) -> None:
  workdir = runs / key
  workdir.mkdir(parents=True, exist_ok=True)
  out = workdir / ("record_test.json" if unit.evaluate_test else "record_val.json")
  spec = dict(unit.spec(), workdir=str(workdir), out=str(out))
  env = dict(os.environ)
  if cpus is not None:
    env["OMP_NUM_THREADS"] = str(len(cpus))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={'true' if len(cpus) > 1 else 'false'}"
                        f" intra_op_parallelism_threads={len(cpus)}").strip()
  what = f"{unit.row} seed {unit.seed} {dict(unit.overrides)} {'test' if unit.evaluate_test else 'val only'}"
  _log(f"start {what} -> {workdir}")
  t0 = time.time()
  with open(workdir / "unit.log", "a") as log:
    proc = subprocess.Popen([sys.executable, "-m", "experiments.evidence", "_unit", json.dumps(spec)], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus is not None else None)
    try:
      code = proc.wait()
    except KeyboardInterrupt:
      proc.send_signal(signal.SIGTERM)
      proc.wait()
      raise
  if code != 0:
    _log(f"FAILED {what} (exit {code}); see {workdir / 'unit.log'}; this worker skips it from now on")
    raise UnitFailed(key)
  record = json.loads(out.read_text())
  ledger.append({"key": key, "evaluate_test": unit.evaluate_test, **identity, "cpu": host_cpu(), "unit": unit.spec(),
                 "record": record, "seconds": round(time.time() - t0, 1),
                 "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
  val = record.get("best_val")
  test = record.get("test_top1")
  _log(f"done  {what}: val {val:.4f}" + (f" test {test:.4f}" if test is not None else "") +
       f" ({time.time() - t0:.0f} s)")


def _select_tables(names: Sequence[str] | None) -> list[Table]:
  if not names:
    return list(TABLES)
  known = {t.name: t for t in TABLES}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise SystemExit(f"evidence: unknown table(s) {', '.join(unknown)}; tables: {', '.join(known)}")
  return [known[n] for n in names]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.evidence", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name in ("run", "status", "tables"):
    p = sub.add_parser(name)
    p.add_argument("--only", nargs="*", help="table names (default: every table)")
    p.add_argument("--results", default=str(REPO / "experiments" / "results"),
                   help="directory of the ledger and the tables")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default: each table's)")
    if name == "run":
      p.add_argument("--runs", default=str(REPO / "runs" / "evidence"), help="run directories")
      p.add_argument("--workers", type=int, default=1, help="workers on this host")
      p.add_argument("--allow_dirty", action="store_true", help="run from a tree with uncommitted changes")
      p.add_argument("--cpus", default=None, help=argparse.SUPPRESS)   # a worker's CPU set
  p = sub.add_parser("_unit")
  p.add_argument("spec")
  args = parser.parse_args(argv)

  if args.command == "_unit":
    spec = json.loads(args.spec)
    from ftjax.core.io import write_json
    write_json(spec["out"], run_unit_in_process(spec, spec["workdir"]))
    return
  if args.command in ("status", "tables"):
    # Warnings and the study's own output, without TensorFlow's C++ start-up INFO lines.
    from ftjax.core import console
    console.configure(console.DEFAULT_VERBOSITY)
  tables = _select_tables(args.only)
  ledger = Ledger(pathlib.Path(args.results) / "ledger.jsonl")
  if args.command == "run":
    identity = code_identity()
    if identity["code"].endswith("+dirty") and not args.allow_dirty:
      raise SystemExit("evidence: ftjax/ has uncommitted changes; run the study from a clean "
                       "checkout of a fixed commit (git worktree add ...), or pass --allow_dirty")
    _run_workers(tables, args, ledger, identity)
  elif args.command == "status":
    print(status_text(tables, ledger, seeds=args.seeds))
  else:
    from experiments import scorecard
    results = pathlib.Path(args.results)
    # The repository's own tables also refresh the README's quotes of the scorecard.
    readme = REPO / "README.md" if results.resolve() == (REPO / "experiments" / "results").resolve() else None
    scorecard.write_all(tables, ledger, results, seeds=args.seeds, readme=readme)


def _run_workers(tables, args, ledger, identity) -> None:
  runs = pathlib.Path(args.runs)
  if args.cpus is not None or args.workers == 1:
    cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else None
    _log(f"commit {identity['commit']}, code {identity['code']}, kernels {identity['kernels']}; "
         f"ledger {ledger.path}; runs {runs}"
         + (f"; cpus {cpus}" if cpus else ""))
    try:
      work(tables, runs=runs, ledger=ledger, identity=identity, seeds=args.seeds, cpus=cpus)
    except KeyboardInterrupt:
      raise SystemExit("evidence: stopped; the same command resumes") from None
    return
  # Several workers: one process each, each on its share of this process's CPUs.
  available = sorted(os.sched_getaffinity(0))
  per = max(1, len(available) // args.workers)
  children = []
  for i in range(args.workers):
    cpus = available[i * per:(i + 1) * per] or [available[i % len(available)]]
    cmd = [sys.executable, "-m", "experiments.evidence", "run", "--results", args.results, "--runs", args.runs,
           "--cpus", ",".join(map(str, cpus))]
    cmd += ["--only", *args.only] if args.only else []
    cmd += ["--seeds", str(args.seeds)] if args.seeds is not None else []
    cmd += ["--allow_dirty"] if args.allow_dirty else []
    children.append(subprocess.Popen(cmd, cwd=REPO))
    time.sleep(10)   # staggered: the next worker sees the first one's lock
  try:
    codes = [c.wait() for c in children]
  except KeyboardInterrupt:
    for c in children:
      c.send_signal(signal.SIGTERM)
    for c in children:
      c.wait()
    raise SystemExit("evidence: stopped; the same command resumes") from None
  if any(codes):
    raise SystemExit("evidence: a worker failed (see above)")


def status_text(tables: Sequence[Table], ledger: Ledger, *, seeds: int | None = None) -> str:
  from experiments import scorecard
  identity = scorecard.latest_identity(ledger.entries()) or code_identity()
  done = index(ledger.entries(), identity)
  plans = plan_study(tables, done, seeds=seeds)
  lines = [f"code {identity['code']}, kernels {identity['kernels']}: {len(done)} finished units"]
  for t in tables:
    p = plans[t.name]
    lines.append(f"  {t.name}: {len(p.runnable)} runnable, {p.waiting} waiting on sweeps; chosen "
                 + ("; ".join(f"{m}: {v}" for m, v in p.chosen.items()) or "nothing yet"))
  return "\n".join(lines)


if __name__ == "__main__":
  main()

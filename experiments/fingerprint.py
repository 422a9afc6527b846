r"""Fingerprints of training runs: every logged metric and a hash of the final parameters.

A refactor that must not change any number is checked by recording fingerprints
before the change and comparing them after it::

  .venv/bin/python -m experiments.fingerprint record --out before.json --workdir /tmp/fp_before
  # ... change the code ...
  .venv/bin/python -m experiments.fingerprint record --out after.json --workdir /tmp/fp_after
  .venv/bin/python -m experiments.fingerprint compare before.json after.json

Cases (``--cases``, comma-separated; default all): ``main`` (the README's main job,
``experiments/configs/default.py``: Lite0 on 5% of Fashion-MNIST, linear probe and
fine-tune, ~4 min on 2 cores) and a tiny run per method on ``tiny.py``: ``ce``,
``co_tuning``, ``bi_tuning``, ``spottune``, ``patch``, ``regularizers`` (L2-SP +
DELTA + BSS + LwF), ``data_reuse`` and ``multitask`` (~5 min together).

A fingerprint holds, per run directory, every row of ``metrics.jsonl`` without its
timing fields, the SHA-256 of the final checkpoint's parameters and BatchNorm
statistics (arrays in sorted path order, bytes, shapes and dtypes), and the
results record without file paths. ``compare`` prints each difference (a changed
value, or an entry that disappeared) and each addition (a field only the new
fingerprint has, e.g. a newly logged metric), and exits 1 when there is a difference.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from typing import Any

import numpy as np

TIMING_FIELDS = ("images_per_s", "seconds", "time")


def _tiny(steps: int = 8, **extra):
  from experiments.configs import tiny
  c = tiny.get_config(extra.pop("arg", ""))
  c.num_steps, c.eval_every_steps, c.log_every_steps = steps, 4, 2
  return c


def _case_configs(name: str, workdir: str):
  """``(kind, config)`` of case ``name``; kind is ``"run_all"`` or ``"multitask"``."""
  if name == "main":
    from experiments.configs import default
    return "run_all", default.get_config()
  if name == "ce":
    from experiments.configs import tiny
    return "run_all", tiny.get_config()
  if name == "co_tuning":
    c = _tiny()
    c.losses = {"ce": {"weight": 1.0},
                "co_tuning": {"weight": 2.3, "approach": "reverse",
                              "cache_dir": os.path.join(workdir, "cache")}}
    return "run_all", c
  if name == "bi_tuning":
    return "run_all", _tiny(arg="bi_tuning")
  if name == "spottune":
    from experiments.configs import spottune
    from ftjax.train.report import variant_configs
    base = spottune.get_config("1,resnet_tiny")
    with base.unlocked():
      base.dataset.image_size = 32
      base.batch_size, base.eval_batch_size = 16, 500
      base.num_steps, base.eval_every_steps, base.log_every_steps = 8, 4, 2
      base.progress, base.tensorboard = False, False
    c = variant_configs(base)["global_k"]
    with c.unlocked():
      c.losses.spottune.policy_depth, c.losses.spottune.policy_width = 1, 8
      c.losses.spottune.policy_image_size = 32
    return "run_all", c
  if name == "patch":
    c = _tiny()
    c.baseline = "patch"
    return "run_all", c
  if name == "regularizers":
    c = _tiny()
    c.losses = {"ce": {"weight": 1.0}, "delta": {"attention_batches": 1}, "lwf": {},
                "bss": {}, "l2_sp": {}}
    return "run_all", c
  if name == "data_reuse":
    c = _tiny()
    c.dataset.classes = (2, 3, 6, 7, 9)
    c.reuse.enabled = True
    c.reuse.classes = (0, 1, 4, 5, 8)
    c.reuse.sampling_rate = 1.0
    return "run_all", c
  if name == "multitask":
    c = _tiny()
    c.baseline = "patch"
    c.tasks = {"px32": {"image_size": 32}, "px40": {"image_size": 40}}
    c.share_head = True
    return "multitask", c
  raise SystemExit(f"fingerprint: unknown case {name!r}; known: {', '.join(CASES)}")


CASES = ("main", "ce", "co_tuning", "bi_tuning", "spottune", "patch", "regularizers", "data_reuse",
         "multitask")


def _array_hash(tree: Any) -> str:
  from ftjax.core.paths import flatten_paths
  digest = hashlib.sha256()
  for path, leaf in sorted(flatten_paths(tree).items()):
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{path}|{leaf.dtype}|{leaf.shape}|".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _clean(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()
            if k not in TIMING_FIELDS and not k.endswith("_files") and k != "table"}
  if isinstance(value, list):
    return [_clean(v) for v in value]
  if isinstance(value, str) and os.sep in value:
    return os.path.basename(value)
  return value


def run_fingerprint(run_dir: str) -> dict[str, Any]:
  """The fingerprint of one run directory (``metrics.jsonl``, checkpoints, ``results.json``)."""
  from ftjax.train.checkpoint import load_checkpoint_arrays
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    metrics = [_clean(json.loads(line)) for line in f]
  state = load_checkpoint_arrays(run_dir)["state"]
  out = {"metrics": metrics,
         "params_sha256": _array_hash(state["params"]),
         "batch_stats_sha256": _array_hash(state.get("batch_stats") or {})}
  results = os.path.join(run_dir, "results.json")
  if os.path.exists(results):
    with open(results) as f:
      out["results"] = _clean(json.load(f))
  return out


def record(cases: list[str], workdir: str) -> dict[str, Any]:
  from ftjax.methods import multitask
  from ftjax.train import report
  out: dict[str, Any] = {}
  for name in cases:
    case_dir = os.path.join(workdir, name)
    if os.path.exists(case_dir):
      raise SystemExit(f"fingerprint: {case_dir} exists; use a new --workdir")
    kind, config = _case_configs(name, workdir)
    t0 = time.time()
    if kind == "multitask":
      multitask.train_multitask(copy.deepcopy(config), case_dir)
    else:
      report.run_all(copy.deepcopy(config), case_dir)
    runs = {}
    for root, _, files in sorted(os.walk(case_dir)):
      if "metrics.jsonl" in files:
        runs[os.path.relpath(root, case_dir)] = run_fingerprint(root)
    if not runs:
      raise SystemExit(f"fingerprint: case {name} left no metrics.jsonl under {case_dir}")
    out[name] = runs
    print(f"fingerprint: {name}: {len(runs)} run(s) in {time.time() - t0:.0f} s", flush=True)
  return out


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
  """``(differences, additions)`` between two fingerprint files, as lines.

  A difference is a value that changed or an entry that only ``before`` has; an
  addition is an entry only ``after`` has (a newly logged field). No differences:
  every number that was recorded before is bitwise the same.
  """
  diffs, added = [], []

  def walk(a, b, where):
    if isinstance(a, dict) and isinstance(b, dict):
      for key in sorted(set(a) | set(b)):
        if key not in b:
          diffs.append(f"{where}/{key}: only in before")
        elif key not in a:
          added.append(f"{where}/{key}: only in after")
        else:
          walk(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
      for i, (x, y) in enumerate(zip(a, b)):
        walk(x, y, f"{where}[{i}]")
    elif a != b:
      diffs.append(f"{where}: {a!r} -> {b!r}")

  for case in sorted(set(before) & set(after)):
    walk(before[case], after[case], case)
  return diffs, added


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  rec = sub.add_parser("record", help="train the cases and write their fingerprints")
  rec.add_argument("--out", required=True)
  rec.add_argument("--workdir", required=True)
  rec.add_argument("--cases", default=",".join(CASES))
  cmp = sub.add_parser("compare", help="compare two fingerprint files")
  cmp.add_argument("before")
  cmp.add_argument("after")
  args = parser.parse_args(argv)
  if args.command == "record":
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
      if c not in CASES:
        raise SystemExit(f"fingerprint: unknown case {c!r}; known: {', '.join(CASES)}")
    fingerprints = record(cases, os.path.abspath(args.workdir))
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(fingerprints, f, indent=1, sort_keys=True)
    os.replace(tmp, args.out)
    print(f"fingerprint: wrote {args.out}")
    return 0
  with open(args.before) as f:
    before = json.load(f)
  with open(args.after) as f:
    after = json.load(f)
  diffs, added = compare(before, after)
  common = sorted(set(before) & set(after))
  for line in diffs + added:
    print(line)
  print(f"fingerprint: {len(common)} case(s) compared ({', '.join(common)}): "
        f"{'bitwise identical' if not diffs else f'{len(diffs)} difference(s)'}"
        f"{f'; {len(added)} field(s) only in after' if added else ''}")
  missing = sorted(set(before) ^ set(after))
  if missing:
    print(f"fingerprint: cases in only one file: {', '.join(missing)}")
  return 1 if diffs else 0


if __name__ == "__main__":
  sys.exit(main())

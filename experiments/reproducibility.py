r"""How reproducible a run is: the same command under settings that emulate other machines.

  .venv/bin/python -m experiments.reproducibility run --workdir /tmp/repro   # resumable
  .venv/bin/python -m experiments.reproducibility report

Each setting trains the fingerprint cases (``experiments/fingerprint.py``: by default
``main``, the README's main job, and ``ce``, a tiny run) in a fresh process and keeps
the fingerprint (every logged metric, a hash of the final parameters, the results
record) in ``experiments/results/reproducibility/<setting>.json``. ``report`` compares
every setting with ``native`` and writes ``README.md`` there: bitwise or not, the
first train step whose loss differs, the largest loss difference, and each variant's
validation and test accuracy.

Settings (the same code and data; what changes is how the CPU computes):

* ``native``: this machine as it is (every core, the widest ISA, ftjax's CPU kernels);
* ``native_again``: the same command again (is a run bitwise repeatable?);
* ``main_job_cli``: the README's main-job command itself
  (``python -m experiments.train --config experiments/configs/default.py``), its
  console kept in ``main_job_console.txt``: the ``main`` case once more, as a user runs it;
* ``one_core``: pinned to one core (oneDNN's and XLA's thread pools shrink to one
  thread, as on a machine with fewer cores);
* ``avx2``: ``ONEDNN_MAX_CPU_ISA=AVX2`` for oneDNN and ``--xla_cpu_max_isa=AVX2`` for
  XLA's code generation. The CPU this was measured on has AVX2 and no AVX-512, so this is
  the control (the caps alone change nothing); on an AVX-512 host it emulates an AVX2 one;
* ``sse41``: an older CPU without AVX: ``ONEDNN_MAX_CPU_ISA=SSE41``, ``--xla_cpu_max_isa=SSE4_2``;
* ``xla_formulations``: ftjax's CPU kernels off (``FTJAX_CONV_IMPL=xla``), the
  formulations GPUs and TPUs run, computed by XLA:CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
OUT = REPO / "experiments" / "results" / "reproducibility"

SETTINGS: dict[str, tuple[str, dict[str, str], bool]] = {
    # name: (what it emulates, environment, pinned to one core)
    "native": ("this machine", {}, False),
    "native_again": ("the same command again", {}, False),
    "main_job_cli": ("the README's main-job command (console kept)", {}, False),
    "one_core": ("a machine with one core (thread pools of one)", {}, True),
    # This machine's CPU has AVX2 and no AVX-512 (/proc/cpuinfo), so the AVX2 cap changes
    # nothing here: it is the control that the caps themselves change no number.
    "avx2": ("oneDNN and XLA capped at AVX2 (this CPU's own ISA: the control)",
             {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}, False),
    "sse41": ("an older CPU without AVX (oneDNN at SSE4.1, XLA at SSE4.2)",
              {"ONEDNN_MAX_CPU_ISA": "SSE41", "XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}, False),
    "xla_formulations": ("ftjax's CPU kernels off (the GPU/TPU formulations on XLA:CPU)",
                         {"FTJAX_CONV_IMPL": "xla",
                          "FTJAX_ONEDNN_LIBRARY": "/nonexistent/libftjax_onednn_conv.so",
                          "FTJAX_MAX_POOL_LIBRARY": "/nonexistent/libftjax_max_pool.so",
                          "FTJAX_CHANNEL_SUMS_LIBRARY": "/nonexistent/libftjax_channel_sums.so"}, False),
}


def run_setting(name: str, *, cases: str, workdir: pathlib.Path, out: pathlib.Path) -> None:
  """Records the fingerprint of ``cases`` under setting ``name`` (skipped when it exists)."""
  target = out / f"{name}.json"
  if target.exists():
    print(f"reproducibility: {name}: {target} exists, kept", flush=True)
    return
  _, extra, one_core = SETTINGS[name]
  env = {**os.environ, **extra, "PYTHONPATH": str(REPO)}
  run_dir = workdir / f"{name}-{int(time.time())}"
  cmd = [sys.executable, "-m", "experiments.fingerprint", "record", "--cases", cases,
         "--out", str(target), "--workdir", str(run_dir)]
  preexec = (lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) if one_core else None
  if name == "main_job_cli":
    cmd = [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/default.py",
           "--workdir", str(run_dir / "main")]
  print(f"reproducibility: {name}: {' '.join(f'{k}={v}' for k, v in extra.items())} "
        f"{'(one core) ' if one_core else ''}-> {target}", flush=True)
  t0 = time.time()
  if name != "main_job_cli":
    subprocess.run(cmd, cwd=REPO, env=env, check=True, preexec_fn=preexec)
  else:
    proc = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    console = (proc.stdout + proc.stderr).replace(str(run_dir), "runs")
    (out / "main_job_console.txt").write_text(console)
    from experiments.fingerprint import run_fingerprint
    runs = {}
    for root, _, files in sorted(os.walk(run_dir / "main")):
      if "metrics.jsonl" in files:
        runs[os.path.relpath(root, run_dir / "main")] = run_fingerprint(root)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"main": runs}, indent=1, sort_keys=True))
    os.replace(tmp, target)
  print(f"reproducibility: {name}: {time.time() - t0:.0f} s", flush=True)


def _train_losses(run: dict[str, Any]) -> dict[int, float]:
  return {m["step"]: m["loss"] for m in run["metrics"] if m.get("split") == "train" and "loss" in m}


def compare_runs(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
  """How one run's fingerprint differs from the reference's."""
  a, b = _train_losses(reference), _train_losses(other)
  steps = sorted(set(a) & set(b))
  differing = [s for s in steps if a[s] != b[s]]
  rel = [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps]
  bitwise = (reference["metrics"] == other["metrics"] and reference["params_sha256"] == other["params_sha256"]
             and reference.get("results") == other.get("results"))
  res_a, res_b = reference.get("results", {}), other.get("results", {})
  return {
      "bitwise": bitwise,
      "first_differing_train_step": differing[0] if differing else None,
      "logged_train_steps": len(steps),
      "max_rel_loss_diff": max(rel) if rel else 0.0,
      "last_rel_loss_diff": rel[-1] if rel else 0.0,
      "params_equal": reference["params_sha256"] == other["params_sha256"],
      "val": res_b.get("best_val"),
      "test": res_b.get("test_top1"),
      "delta_test_points": (100 * (res_b["test_top1"] - res_a["test_top1"])
                            if "test_top1" in res_a and "test_top1" in res_b else None),
  }


def report(out: pathlib.Path) -> str:
  """Writes ``out/README.md``: every setting against ``native``; returns the text."""
  found = {name: json.loads((out / f"{name}.json").read_text()) for name in SETTINGS
           if (out / f"{name}.json").exists()}
  if "native" not in found:
    raise SystemExit(f"reproducibility: {out}/native.json is missing: run `run` first")
  ref = found["native"]
  lines = [
      "# Reproducibility: the same command under settings that emulate other machines",
      "",
      "Written by `python -m experiments.reproducibility report` (do not edit by hand); the runs by "
      "`python -m experiments.reproducibility run`. Each setting is compared with `native`. "
      "Test accuracy in %; Δ test in points; loss differences relative, over the logged train steps.",
      "",
      "| case / run | setting | emulates | bitwise | first differing train step | max rel. loss diff | "
      "final params | best val | test | Δ test |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  summary: dict[str, Any] = {}
  for case in sorted(ref):
    for run in sorted(ref[case]):
      for name, fp in found.items():
        if case not in fp or run not in fp[case]:
          continue
        c = compare_runs(ref[case][run], fp[case][run])
        summary.setdefault(f"{case}/{run}", {})[name] = c
        pct = (lambda v: f"{100 * v:.2f}" if v is not None else "")
        delta = f"{c['delta_test_points']:+.2f}" if c["delta_test_points"] is not None else ""
        lines.append(
            f"| {case}/{run} | {name} | {SETTINGS[name][0]} | {'yes' if c['bitwise'] else 'no'} | "
            f"{c['first_differing_train_step'] if c['first_differing_train_step'] is not None else '—'} "
            f"(of {c['logged_train_steps']}) | {c['max_rel_loss_diff']:.1e} | "
            f"{'equal' if c['params_equal'] else 'differ'} | {pct(c['val'])} | {pct(c['test'])} | {delta} |")
  text = "\n".join(lines) + "\n"
  (out / "README.md").write_text(text)
  (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="record every setting's fingerprint (resumable), then report")
  run.add_argument("--workdir", required=True, help="run directories (kept out of the repository)")
  run.add_argument("--settings", default=",".join(SETTINGS))
  run.add_argument("--cases", default="main,ce")
  run.add_argument("--out", default=str(OUT))
  rep = sub.add_parser("report", help="compare the recorded settings with native")
  rep.add_argument("--out", default=str(OUT))
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.command == "run":
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
      raise SystemExit(f"reproducibility: unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    for name in names:
      run_setting(name, cases=args.cases, workdir=pathlib.Path(args.workdir), out=out)
  print(report(out), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())

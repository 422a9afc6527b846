r"""The Visual Decathlon score S of every row of per-domain runs (SpotTune Table 3).

  .venv/bin/python -m experiments.decathlon_score runs/decathlon/aircraft runs/decathlon/dtd ...
  .venv/bin/python -m experiments.decathlon_score --baseline_row=finetune runs/decathlon/*
  .venv/bin/python -m experiments.decathlon_score svhn=runs/dec_svhn_try2 runs/decathlon/dtd

Each argument is a comparison workdir of one domain (written by
``experiments.train --config experiments/configs/spottune_decathlon.py:DOMAIN``), named
``DOMAIN=WORKDIR`` or just ``WORKDIR`` when the directory's name is the domain
(``aircraft``, ``vgg-flowers``, ...). Its ``results.json`` holds the rows (``finetune``,
``spottune``, ...) with one record per seed; a row's error on a domain is
``1 - mean test_top1`` over its seeds.

Baseline (``E^max_d = 2 x the baseline's error``, :func:`ftjax.train.metrics.decathlon_score`):

* default: the Decathlon's own, the fine-tuned ResNet-26 of Rebuffi et al. (NeurIPS 2017),
  :data:`ftjax.train.metrics.DECATHLON_BASELINE_ACCURACY`; with it the scores printed in
  SpotTune's Table 3 are reproduced (its "Scratch" and "Fine-tuning" rows are entries of
  the table, not the baseline: the baseline itself scores 250 per domain);
* ``--baseline_row=NAME``: a row of these runs (e.g. ``finetune``), for runs whose
  setting (no ImageNet ResNet-26, a sampled training set) is far from the paper's;
* ``--baseline_errors=aircraft=0.42,dtd=0.5``: explicit errors (fractions), overriding
  either of the above per domain.

Prints, per row, the test error on each domain and S, and writes ``decathlon_table.md``
and ``decathlon_scores.json`` into ``--out`` (default: the workdirs' common parent).
Rows missing a domain are scored over the domains they have, and the table says so.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
from absl import app
from absl import flags

_BASELINE_ROW = flags.DEFINE_string("baseline_row", "", "row of these runs whose errors are the baseline "
                                    "(E^max = 2x); default: the Decathlon's published baseline")
_BASELINE_ERRORS = flags.DEFINE_string("baseline_errors", "", "DOMAIN=ERROR,... (fractions) overriding the "
                                       "baseline per domain")
_OUT = flags.DEFINE_string("out", "", "directory for decathlon_table.md / decathlon_scores.json "
                           "(default: the workdirs' common parent)")


def _domains():
  from ftjax.train.metrics import DECATHLON_DOMAINS
  return DECATHLON_DOMAINS


def parse_workdirs(args: list[str]) -> dict[str, str]:
  """``{domain: workdir}`` from ``DOMAIN=WORKDIR`` or ``WORKDIR`` (named after its domain) arguments."""
  from experiments.configs.spottune_decathlon import parse_domain
  out: dict[str, str] = {}
  for arg in args:
    if "=" in arg:
      name, path = arg.split("=", 1)
    elif os.path.isfile(arg):  # e.g. this script's own table when called with runs/decathlon/*
      print(f"decathlon_score: skipping the file {arg} (not a workdir)", file=sys.stderr)
      continue
    else:
      path = arg
      name = os.path.basename(os.path.normpath(arg))
      if name not in _domains():
        raise ValueError(f"cannot tell the domain of {arg!r}: name it DOMAIN={arg} "
                         f"(domains: {', '.join(_domains())})")
    domain = parse_domain(name)
    if domain in out:
      raise ValueError(f"domain {domain!r} given twice ({out[domain]} and {path})")
    out[domain] = path
  return out


def collect_errors(workdirs: dict[str, str]) -> dict[str, dict[str, float]]:
  """``{row: {domain: test error}}`` from each domain's ``results.json`` (mean over seeds)."""
  errors: dict[str, dict[str, float]] = {}
  for domain, workdir in workdirs.items():
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: is {workdir} a comparison workdir of {domain}?")
    with open(path) as f:
      results = json.load(f)
    for row, runs in results.items():
      if not runs:
        continue
      top1 = [float(r["test_top1"]) for r in runs]
      if any(t == 0.0 for t in top1):
        print(f"warning: {domain}/{row}: a test accuracy of exactly 0 — was the test split unlabelled "
              "(TFDS's Decathlon test split has label -1 everywhere)?", file=sys.stderr)
      errors.setdefault(row, {})[domain] = 1.0 - float(np.mean(top1))
  return errors


def baseline_errors(errors: dict[str, dict[str, float]], *, row: str = "", overrides: str = ""
                    ) -> dict[str, float]:
  """The baseline error of each domain: published, a row of ``errors``, then ``overrides``."""
  from ftjax.train.metrics import DECATHLON_BASELINE_ACCURACY
  if row:
    if row not in errors:
      raise ValueError(f"--baseline_row={row!r} is not a row of these runs; rows: {', '.join(errors)}")
    base = dict(errors[row])
  else:
    base = {d: 1.0 - a / 100.0 for d, a in DECATHLON_BASELINE_ACCURACY.items()}
  for item in filter(None, (s.strip() for s in overrides.split(","))):
    if "=" not in item:
      raise ValueError(f"--baseline_errors entries are DOMAIN=ERROR, got {item!r}")
    from experiments.configs.spottune_decathlon import parse_domain
    name, value = item.split("=", 1)
    base[parse_domain(name)] = float(value)
  return base


def score_rows(errors: dict[str, dict[str, float]], baseline: dict[str, float]) -> dict[str, dict[str, Any]]:
  """Per row: its domains, errors, per-domain scores and S (over the domains it has)."""
  import jax.numpy as jnp
  from ftjax.train.metrics import decathlon_domain_scores
  scored = {}
  for row, by_domain in errors.items():
    domains = [d for d in _domains() if d in by_domain]
    missing = [d for d in domains if d not in baseline]
    if missing:
      raise ValueError(f"no baseline error for {', '.join(missing)} (row {row!r}); give --baseline_errors")
    row_errors = np.array([by_domain[d] for d in domains], np.float64)
    per_domain = np.asarray(decathlon_domain_scores(errors=jnp.asarray(row_errors, jnp.float32),
                                                    baseline_errors=jnp.asarray([baseline[d] for d in domains],
                                                                                jnp.float32)))
    scored[row] = {"domains": domains, "errors": row_errors.tolist(), "domain_scores": per_domain.tolist(),
                   "score": float(per_domain.sum())}
  return scored


def format_table(scored: dict[str, dict[str, Any]], baseline: dict[str, float], *, baseline_name: str) -> str:
  domains = [d for d in _domains() if any(d in s["domains"] for s in scored.values())]
  lines = [f"Visual Decathlon: test error (%) per domain and score S; E^max = 2 x baseline error "
           f"(baseline: {baseline_name})", "",
           "| row | " + " | ".join(domains) + " | S | domains |",
           "|---|" + "---|" * (len(domains) + 2)]
  base_cells = [f"{100 * baseline[d]:.2f}" if d in baseline else "-" for d in domains]
  lines.append("| *baseline* | " + " | ".join(base_cells) + f" | {250 * len(domains)} | {len(domains)} |")
  for row, s in scored.items():
    err = dict(zip(s["domains"], s["errors"]))
    cells = [f"{100 * err[d]:.2f}" if d in err else "-" for d in domains]
    lines.append(f"| {row} | " + " | ".join(cells) + f" | {s['score']:.0f} | {len(s['domains'])} |")
  lines += ["", f"S sums 1000 (E^max - E)^2 / (E^max)^2 over a row's domains (max 1000 each); "
            f"{len(domains)} of 10 domains here."]
  return "\n".join(lines)


def run(args: list[str], *, baseline_row: str = "", baseline_overrides: str = "", out: str = ""
        ) -> dict[str, Any]:
  """Scores the workdirs in ``args``; writes the table and JSON into ``out``; returns the JSON."""
  workdirs = parse_workdirs(args)
  if not workdirs:
    raise ValueError("no domain workdir among the arguments")
  errors = collect_errors(workdirs)
  baseline = baseline_errors(errors, row=baseline_row, overrides=baseline_overrides)
  scored = score_rows(errors, baseline)
  name = f"row {baseline_row!r}" if baseline_row else "Rebuffi et al. 2017 fine-tuned ResNet-26"
  if baseline_overrides:
    name += f", overridden: {baseline_overrides}"
  table = format_table(scored, baseline, baseline_name=name)
  out = out or os.path.commonpath([os.path.abspath(p) for p in workdirs.values()])
  os.makedirs(out, exist_ok=True)
  record = {"baseline": name, "baseline_errors": baseline, "workdirs": workdirs, "rows": scored}
  for filename, text in (("decathlon_table.md", table + "\n"), ("decathlon_scores.json",
                                                               json.dumps(record, indent=2))):
    tmp = os.path.join(out, filename + ".tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(out, filename))
  print(table, flush=True)
  return record


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("name at least one domain workdir (DOMAIN=WORKDIR or WORKDIR)")
  try:
    run(argv[1:], baseline_row=_BASELINE_ROW.value, baseline_overrides=_BASELINE_ERRORS.value, out=_OUT.value)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"decathlon_score: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)

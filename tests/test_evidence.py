"""The evidence study: seed statistics against scipy, choices on validation only, verdicts."""

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import evidence as ev
from experiments import scorecard
from experiments import stats

TINY = "experiments/configs/tiny.py"


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("values", [[0.81, 0.83, 0.80], [0.5, 0.52, 0.49, 0.55, 0.51], [0.9, 0.9001]])
def test_mean_interval_equals_scipy(values):
  iv = stats.mean_interval(values)
  low, high = scipy_stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
  assert iv.mean == pytest.approx(np.mean(values), abs=1e-12)
  assert iv.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
  assert (iv.low, iv.high) == pytest.approx((low, high), rel=1e-10)
  iv90 = stats.mean_interval(values, confidence=0.9)
  assert (iv90.low, iv90.high) == pytest.approx(scipy_stats.ttest_1samp(values, 0.0).confidence_interval(0.9),
                                                rel=1e-10)


def test_paired_difference_equals_scipy_ttest_rel():
  a = {0: 0.832, 1: 0.845, 2: 0.828, 3: 0.851}
  b = {0: 0.815, 1: 0.822, 2: 0.825, 3: 0.830, 7: 0.9}   # seed 7 has no partner: left out
  d = stats.paired_difference(a, b)
  xa, xb = [a[s] for s in (0, 1, 2, 3)], [b[s] for s in (0, 1, 2, 3)]
  ref = scipy_stats.ttest_rel(xa, xb)
  assert d.seeds == (0, 1, 2, 3)
  assert d.mean == pytest.approx(np.mean(np.subtract(xa, xb)), abs=1e-12)
  assert (d.low, d.high) == pytest.approx(ref.confidence_interval(0.95), rel=1e-10)
  # The interval excludes 0 exactly when the two-sided paired test rejects at 5%.
  assert d.excludes_zero == (ref.pvalue < 0.05)


def test_paired_difference_is_not_the_unpaired_one():
  # A seed effect shared by both rows: the paired interval is narrow, the unpaired one wide.
  seed_effect = np.array([0.0, 0.03, -0.02])
  a = dict(enumerate(0.82 + seed_effect + [0.011, 0.010, 0.012]))
  b = dict(enumerate(0.82 + seed_effect))
  d = stats.paired_difference(a, b)
  assert d.excludes_zero
  unpaired = scipy_stats.ttest_ind(list(a.values()), list(b.values()))
  assert unpaired.pvalue > 0.05


def test_statistics_errors():
  with pytest.raises(ValueError, match="no seed"):
    stats.paired_difference({0: 1.0}, {1: 1.0})
  with pytest.raises(ValueError, match="at least one"):
    stats.mean_interval([])
  one = stats.mean_interval([0.8])
  assert one.n == 1 and math.isnan(one.low) and not one.excludes_zero


# ----------------------------------------------------------------------------- verdicts


def _diff(values_a, values_b):
  return stats.paired_difference(dict(enumerate(values_a)), dict(enumerate(values_b)))


def test_verdict_follows_the_interval():
  better = _diff([0.83, 0.84, 0.85], [0.80, 0.82, 0.81])
  assert better.low > 0 and scorecard.verdict(better) == scorecard.REPRODUCED
  worse = _diff([0.80, 0.82, 0.81], [0.83, 0.84, 0.85])
  assert worse.high < 0 and scorecard.verdict(worse) == scorecard.NOT_REPRODUCED
  noisy = _diff([0.83, 0.80, 0.85], [0.81, 0.82, 0.82])
  assert noisy.low < 0 < noisy.high and scorecard.verdict(noisy) == scorecard.INCONCLUSIVE
  assert scorecard.verdict(_diff([0.83, 0.84], [0.80, 0.82])) == scorecard.PENDING   # 2 seeds
  # Non-inferiority within 1 point: slightly worse but surely within the margin.
  close = _diff([0.815, 0.825, 0.818], [0.82, 0.83, 0.822])
  assert close.high < 0 and scorecard.verdict(close) == scorecard.NOT_REPRODUCED
  assert scorecard.verdict(close, margin=0.01) == scorecard.REPRODUCED


def test_every_scorecard_verdict_follows_its_interval():
  """The committed ledger's scorecard: no 'reproduced' where the interval reaches 0 (or -margin)."""
  ledger = ev.Ledger(ev.REPO / "experiments" / "results" / "ledger.jsonl")
  entries = ledger.entries()
  identity = scorecard.latest_identity(entries)
  if identity is None:
    pytest.fail("experiments/results/ledger.jsonl is empty: the study has not recorded any run")
  collected = scorecard.collect(ev.TABLES, entries, identity)
  reuse = scorecard.data_reuse_rows(ev.REPO / "experiments" / "results" / scorecard.DATA_REUSE / "results.json")
  if reuse is not None:
    collected[scorecard.DATA_REUSE] = reuse
  rows = scorecard.claim_rows(collected)
  assert len(rows) == len(scorecard.CLAIMS)
  for row in rows:
    d, claim = row["diff"], row["claim"]
    if row["verdict"] == scorecard.PENDING:
      assert d is None or d.n < scorecard.MIN_SEEDS
      continue
    assert d.n >= scorecard.MIN_SEEDS
    if row["verdict"] == scorecard.REPRODUCED:
      assert d.low > -claim.margin, claim.text
    elif row["verdict"] == scorecard.NOT_REPRODUCED:
      assert d.high < -claim.margin, claim.text
    else:
      assert d.low <= -claim.margin <= d.high, claim.text


def test_claims_name_rows_that_exist():
  tables = {t.name: t for t in ev.TABLES}
  for claim in scorecard.CLAIMS:
    for table, row in (claim.a, claim.b):
      if table == scorecard.DATA_REUSE:
        assert row.startswith("recall_") or row in ("finetune", "random_reuse", "greedy_reuse", "uot_reuse")
        continue
      assert row in tables[table].rows, (claim.text, table, row)


# ----------------------------------------------------------------------------- the sweep runner


def _key(unit):
  return repr(unit)


def _record(val, test=None, seed=0):
  r = {"seed": seed, "best_val": val}
  if test is not None:
    r["test_top1"] = test
  return r


def test_sweep_chooses_on_validation_not_test():
  """Validation prefers lr x3, test would prefer lr x1/3: the study picks x3, and only tests there."""
  table = ev.Table("t", TINY, "", (ev.Group("run", weight=("losses.ce.weight", (0.5, 1.0, 2.0))),), seeds=2)
  lr0 = 0.05
  lrs = [ev._round(lr0 / 3), lr0, ev._round(lr0 * 3)]
  done = {}

  plan = ev.plan_table(table, done, key=_key)
  assert [dict(u.overrides)["optimizer.lr"] for u in plan.runnable] == lrs
  assert all(not u.evaluate_test and u.seed == 0 for u in plan.runnable)
  # Validation and test disagree: a sweep record never has test figures, but even if
  # one had (a stray record), the choice must ignore them.
  for unit, val, test in zip(plan.runnable, (0.60, 0.65, 0.70), (0.90, 0.50, 0.40)):
    done[(_key(unit), False)] = _record(val, test)
  plan = ev.plan_table(table, done, key=_key)
  assert {dict(u.overrides)["optimizer.lr"] for u in plan.runnable} == {lrs[2]}
  assert sorted(dict(u.overrides)["losses.ce.weight"] for u in plan.runnable) == [0.5, 2.0]
  for unit, val in zip(plan.runnable, (0.69, 0.71)):
    done[(_key(unit), False)] = _record(val)
  plan = ev.plan_table(table, done, key=_key)
  weight = {dict(u.overrides)["losses.ce.weight"] for u in plan.runnable}
  chosen = {"optimizer.lr": lrs[2], "losses.ce.weight": 2.0 if 0.71 > 0.70 else 1.0}
  assert plan.chosen == {"run": chosen} and weight == {chosen["losses.ce.weight"]}
  assert [(u.seed, u.evaluate_test) for u in plan.runnable] == [(0, True), (1, True)]
  # Seed 0 at the chosen values is the sweep's own run: same key, so it only tests.
  sweep_keys = {k for (k, test) in done if not test}
  assert _key(ev.Unit(TINY, "", "run", 0, tuple(sorted(chosen.items())), False)) in sweep_keys


def test_sweep_ties_go_to_the_protocol_value_and_divergence_never_wins():
  assert ev.choose([(1.0, _record(0.7)), (3.0, _record(0.7)), (0.3, _record(0.6))], preferred=1.0) == 1.0
  assert ev.choose([(1.0, _record(0.6)), (3.0, _record(math.nan))], preferred=3.0) == 1.0


def test_sweep_rejects_a_grid_without_the_paper_value():
  table = ev.Table("t", TINY, "", (ev.Group("run", weight=("losses.ce.weight", (0.5, 2.0, 4.0))),))
  with pytest.raises(ValueError, match="does not contain the config's value 1.0"):
    ev.plan_table(table, {}, key=_key)


def test_a_group_without_a_sweep_runs_only_its_seeds():
  """``lr_values=()``: no validation-only run (a multitask run cannot make one), seeds at the config's lr."""
  table = ev.Table("t", TINY, "", (ev.Group("run", lr_values=()),), seeds=3)
  plan = ev.plan_table(table, {}, key=_key)
  lr0 = ev._round(float(ev.row_config(TINY, "", "run").optimizer.lr))
  assert plan.chosen == {"run": {"optimizer.lr": lr0}} and plan.waiting == 0
  assert [(u.seed, u.evaluate_test, dict(u.overrides)) for u in plan.runnable] == [
      (s, True, {"optimizer.lr": lr0}) for s in range(3)]
  plans = ev.plan_study([t for t in ev.TABLES if t.name.startswith("patches_t4")], {})
  assert all(u.evaluate_test for p in plans.values() for u in p.runnable)
  assert [len(plans[n].runnable) for n in ("patches_t4", "patches_t4s", "patches_t4i")] == [3, 3, 15]


def test_study_tables_plan():
  """Every table of the study plans: rows exist, weight grids contain the configs' values."""
  plans = ev.plan_study(ev.TABLES, {})
  for table in ev.TABLES:
    for row in table.runs:
      ev.row_config(table.config, table.arg, row)
    if table.values_from is None:
      assert plans[table.name].runnable, table.name
  # Rows that are the same run share a unit: the 5% finetune sweep is planned identically everywhere.
  keys = {t.name: {ev.unit_key(u) for u in plans[t.name].runnable if u.row == "finetune"} for t in ev.TABLES
          if "finetune" in t.rows and t.values_from is None}
  assert len({frozenset(k) for k in keys.values()}) == 1


def test_ledger_counts_only_the_same_commit_and_kernels(tmp_path):
  ledger = ev.Ledger(tmp_path / "ledger.jsonl")
  mine = {"commit": "abc", "code": "t1", "kernels": "onednn_conv"}
  ledger.append({"key": "k1", "evaluate_test": False, **mine, "record": _record(0.5)})
  ledger.append({"key": "k2", "evaluate_test": False, "commit": "def", "code": "t2", "kernels": "onednn_conv",
                 "record": _record(0.6)})
  ledger.append({"key": "k3", "evaluate_test": True, "commit": "abc", "code": "t1", "kernels": "none",
                 "record": _record(0.7)})
  # Another commit with the same library tree counts (a change of docs or of the plan).
  ledger.append({"key": "k4", "evaluate_test": True, "commit": "ghi", "code": "t1", "kernels": "onednn_conv",
                 "record": _record(0.8)})
  assert set(ev.index(ledger.entries(), mine)) == {("k1", False), ("k4", True)}
  assert json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[0])["key"] == "k1"


def test_a_sweep_run_reads_no_test_split(tmp_path, monkeypatch):
  """evaluate_test=False: no test figures and the test split is never iterated; the same
  directory evaluated afterwards with evaluate_test=True only tests (no training step)."""
  read = []
  unit = ev.Unit(TINY, "", "run", 0, (("optimizer.lr", 0.05),), False)
  cfg = ev.unit_config(unit)
  from ftjax.train import loop

  real_evaluate = loop.evaluate

  def spy(eval_step, variables, dataset, split, **kw):
    read.append(split)
    return real_evaluate(eval_step, variables, dataset, split, **kw)
  monkeypatch.setattr(loop, "evaluate", spy)
  record = loop.train_and_evaluate(cfg, str(tmp_path))
  assert "test" not in read and "test_top1" not in record and record["test_evaluated"] is False
  read.clear()
  cfg.evaluate_test = True
  tested = loop.train_and_evaluate(cfg, str(tmp_path))
  assert read == ["test"]   # resumed at the last step: no validation, no training
  assert tested["best_val"] == record["best_val"] and 0 < tested["test_top1"] <= 1


def test_unit_key_ignores_fields_added_at_their_default(monkeypatch):
  """A trainer field added later at a neutral default keeps every finished unit's name."""
  from ftjax.train import config as config_lib
  unit = ev.Unit("experiments/configs/co_tuning.py", "5", "finetune", 1, (("optimizer.lr", 0.005),), True)
  before = ev.unit_key(unit)
  original = config_lib.default_config

  def with_new_field():
    c = original()
    c.some_new_setting = 0
    return c
  from experiments.configs import default as default_cfg
  monkeypatch.setattr(config_lib, "default_config", with_new_field)
  monkeypatch.setattr(default_cfg, "default_config", with_new_field)
  ev._CONFIG_CACHE.clear()
  try:
    assert "some_new_setting" in ev.unit_config(unit)
    assert ev.unit_key(unit) == before
    changed = ev.Unit(unit.config, unit.arg, unit.row, unit.seed, (("optimizer.lr", 0.015),), True)
    assert ev.unit_key(changed) != before
  finally:
    ev._CONFIG_CACHE.clear()


def test_readme_blocks_quote_the_scorecard(tmp_path):
  """The README's method sections quote the claim rows between markers; the rest is kept."""
  claim = scorecard.Claim(paper="Co-Tuning", text="Co-Tuning beats fine-tuning (5%)", a=("t", "co"),
                          b=("t", "finetune"), paper_figures="")
  other = scorecard.Claim(paper="SpotTune", text="SpotTune beats fine-tuning", a=("s", "x"), b=("s", "y"),
                          paper_figures="")
  diff = stats.paired_difference({0: 0.83, 1: 0.84, 2: 0.85}, {0: 0.82, 1: 0.82, 2: 0.83})
  rows = [{"claim": claim, "diff": diff, "verdict": scorecard.verdict(diff), "note": ""},
          {"claim": other, "diff": None, "verdict": scorecard.PENDING, "note": "not run yet"}]
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- scorecard: Co-Tuning -->\nstale numbers\n<!-- /scorecard -->\noutro\n")
  assert scorecard.update_readme(readme, rows) == ["Co-Tuning"]
  text = readme.read_text()
  assert text.startswith("intro\n<!-- scorecard: Co-Tuning -->\n") and text.endswith("<!-- /scorecard -->\noutro\n")
  assert "stale numbers" not in text and "SpotTune" not in text
  expected = f"- Co-Tuning beats fine-tuning (5%): Δ {stats.format_points(diff, signed=True)} over 3 seeds: **"
  assert expected + scorecard.verdict(diff) + "**" in text
  one = stats.paired_difference({0: 0.8438}, {0: 0.84})   # one seed: no interval, said once
  scorecard.update_readme(readme, [{**rows[0], "diff": one, "verdict": scorecard.PENDING}])
  assert "- Co-Tuning beats fine-tuning (5%): Δ +0.38 (1 seed): **pending**\n" in readme.read_text()
  readme.write_text("<!-- scorecard: Co-Tuning -->\nno end marker\n")
  with pytest.raises(ValueError, match="has no <!-- /scorecard -->"):
    scorecard.update_readme(readme, rows)


def test_a_zero_width_interval_is_marked_in_the_scorecard_and_the_readme(tmp_path):
  """Equal per-seed differences (recall moves in steps of 1/K) give a t interval of no width: said so."""
  claim = scorecard.Claim(paper="data reuse", text="UOT beats Greedy-OT (recall)", a=("r", "uot"),
                          b=("r", "greedy"), paper_figures="")
  # 10/11 - 9/11 and 11/11 - 10/11 differ in the last bits: equal up to float error.
  equal = stats.paired_difference({0: 10 / 11, 1: 10 / 11, 2: 1.0}, {0: 9 / 11, 1: 9 / 11, 2: 10 / 11})
  spread = stats.paired_difference({0: 0.83, 1: 0.84, 2: 0.85}, {0: 0.82, 1: 0.82, 2: 0.83})
  assert equal.low == pytest.approx(equal.high) and spread.high - spread.low > 0.01
  identity = {"code": "c", "kernels": "k"}
  for diff, marked in ((equal, True), (spread, False)):
    rows = [{"claim": claim, "diff": diff, "verdict": scorecard.verdict(diff), "note": ""}]
    text = scorecard.format_scorecard(rows, identity, counts="3 runs")
    row = next(line for line in text.splitlines() if line.startswith("| data reuse |"))
    assert (scorecard.ZERO_WIDTH_MARK in row) == marked
    assert (scorecard.ZERO_WIDTH_NOTE in text) == marked
    readme = tmp_path / "README.md"
    readme.write_text("<!-- scorecard: data reuse -->\n<!-- /scorecard -->\n")
    scorecard.update_readme(readme, rows)
    assert ("every seed gave the same difference" in readme.read_text()) == marked


def test_the_readme_quotes_the_committed_scorecard(tmp_path):
  """README.md's blocks equal what the committed ledger gives (regenerate with `evidence tables`)."""
  import shutil
  readme = ev.REPO / "README.md"
  text = readme.read_text()
  for paper in dict.fromkeys(c.paper for c in scorecard.CLAIMS):
    assert scorecard.README_MARK.format(paper=paper) in text, f"README has no scorecard block for {paper}"
  results = ev.REPO / "experiments" / "results"
  if (results / scorecard.DATA_REUSE).exists():  # written by experiments/data_reuse.py, read by the scorecard
    shutil.copytree(results / scorecard.DATA_REUSE, tmp_path / "results" / scorecard.DATA_REUSE)
  copy = tmp_path / "README.md"
  copy.write_text(text)
  scorecard.write_all(ev.TABLES, ev.Ledger(results / "ledger.jsonl"), tmp_path / "results", readme=copy)
  assert copy.read_text() == text, "README's scorecard blocks are stale: run `python -m experiments.evidence tables`"


def test_each_unit_records_its_cpu_and_the_scorecard_counts_them(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 avx512f avx512_vnni\n\n"
                  "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 avx512f avx512_vnni\n")
  assert ev.host_cpu(str(info)) == "AMD EPYC avx512"
  info.write_text("model name\t: Some CPU\nflags\t\t: fpu sse4_2 avx avx2\n")
  assert ev.host_cpu(str(info)) == "Some CPU avx2"
  assert ev.host_cpu(str(tmp_path / "missing")).endswith("CPU")
  mine = {"commit": "abc", "code": "t1", "kernels": "onednn_conv"}
  entries = [{"key": "k1", "evaluate_test": True, **mine, "record": _record(0.5), "seconds": 60.0},
             {"key": "k2", "evaluate_test": True, **mine, "cpu": "AMD EPYC avx512", "record": _record(0.6),
              "seconds": 60.0},
             {"key": "k3", "evaluate_test": True, **mine, "cpu": "AMD EPYC avx512", "record": _record(0.7),
              "seconds": 60.0}]
  text = scorecard.compute_text(ev.TABLES, entries, mine)
  assert "CPUs: AMD EPYC avx512 2, CPU not recorded 1 " in text, text


def test_compute_left_counts_each_unit_at_its_rows_median():
  table = ev.Table("t", TINY, "", (ev.Group("run", lr_values=()),), seeds=3)
  other = ev.Table("u", TINY, "bi_tuning", (ev.Group("run", lr_values=()),), seeds=2)
  unit = {"config": TINY, "arg": "", "row": "run", "seed": 1}
  mine = [{"unit": unit, "evaluate_test": True, "seconds": 100.0},
          {"unit": dict(unit, seed=0), "evaluate_test": True, "seconds": 5.0},   # seed 0: not a training unit
          {"unit": dict(unit, row="elsewhere", seed=2), "evaluate_test": True, "seconds": 900.0}]
  done = {(ev.unit_key(ev.Unit(TINY, "", "run", 1, (("optimizer.lr", ev._round(0.05)),), True)), True): {}}
  plans = ev.plan_study([table, other], done)
  assert len(plans["t"].runnable) == 2 and len(plans["u"].runnable) == 2
  left, unestimated = scorecard._left_seconds([table, other], plans, mine, fallback=7.0)
  assert (left, unestimated) == (2 * 100.0 + 2 * 7.0, ["u"])


def test_status_prints_the_study_and_no_tensorflow_start_up_lines(tmp_path):
  """As a user runs it (no TF_CPP_MIN_LOG_LEVEL): on AVX-512 VNNI CPUs TensorFlow 2.21 prints
  C++ INFO lines at import unless ftjax.core.console filters them."""
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  proc = subprocess.run([sys.executable, "-m", "experiments.evidence", "status", "--results", str(tmp_path),
                         "--only", "co_tuning_5"], cwd=ev.REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = (proc.stdout + proc.stderr).splitlines()
  assert lines[0].startswith("code ") and lines[0].endswith(": 0 finished units"), lines
  assert lines[1].startswith("  co_tuning_5: ") and len(lines) == 2, lines


def test_bars_are_the_seed_means_with_their_t_half_widths(tmp_path):
  """The figure's bars and error bars equal numpy means and scipy t half-widths; 1-seed rows are left out."""
  values = {"finetune": [0.80, 0.83, 0.81], "uot_reuse": [0.84, 0.82, 0.86, 0.85], "lonely": [0.9]}
  data = {"rows": {row: [{"seed": s, "test_top1": v} for s, v in enumerate(vs)] for row, vs in values.items()}}
  path = tmp_path / "bars.png"
  drawn = scorecard.plot_bars(title="t", rows=["finetune", "uot_reuse", "lonely"], data=data, path=path)
  assert [row for row, _, _ in drawn] == ["finetune", "uot_reuse"]
  for row, mean, half in drawn:
    x = 100 * np.asarray(values[row])
    low, high = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert mean == pytest.approx(x.mean()) and half == pytest.approx((high - low) / 2)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert scorecard.plot_bars(title="t", rows=["lonely"], data=data, path=tmp_path / "none.png") == []
  assert not (tmp_path / "none.png").exists()


def test_choices_at_the_edge_of_their_grid_are_named():
  """A chosen value equal to the lowest or highest tried is named; a middle one or a 2-value grid is not."""
  lr, w = "optimizer.lr", "losses.bss.weight"
  runs = [({lr: 0.001, w: 0.01}, {}), ({lr: 0.003, w: 0.01}, {}), ({lr: 0.01, w: 0.01}, {}),
          ({lr: 0.01, w: 0.003}, {}), ({lr: 0.01, w: 0.03}, {})]
  assert scorecard.grid_edges(runs, {lr: 0.01, w: 0.01}) == ["lr (highest)"]
  assert scorecard.grid_edges(runs, {lr: 0.003, w: 0.003}) == ["bss.weight (lowest)"]
  assert scorecard.grid_edges(runs, {lr: 0.003, w: 0.01}) == []
  assert scorecard.grid_edges(runs[:2], {lr: 0.003}) == []   # two values: no middle to compare with
  collected = {"t": {"sweep": {"bss": runs, "other": runs}, "chosen": {"bss": {lr: 0.01, w: 0.03}}}}
  text = scorecard.edges_text(collected)
  assert "`t/bss` bss.weight (highest), lr (highest)" in text and "other" not in text
  assert scorecard.edges_text({"t": {"sweep": {"bss": runs}, "chosen": {"bss": {lr: 0.003, w: 0.01}}}}) == ""


def test_a_multitask_table_names_private_and_shared_parameters():
  """A multitask row's parameters are its private patch plus the shared base, and the table says val is joint."""
  table = next(t for t in ev.TABLES if t.name == "patches_t4")
  provenance = {"hyperparameters": {"optimizer.lr": 0.005}}
  multitask = {task: [dict(test_top1=0.8 + 0.01 * s, best_val=0.84, seed=s, trainable_parameters=42016,
                           shared_parameters=3341802, multitask=True, **provenance) for s in range(3)]
               for task in table.rows}
  text = scorecard.format_results_table(table, {"rows": multitask, "chosen": {}, "sweep": {}})
  px32 = next(line for line in text.splitlines() if line.startswith("| px32 |"))
  assert "| 42,016 private + 3,341,802 shared |" in px32 and scorecard.MULTITASK_NOTE in text
  single = {task: [{k: v for k, v in r.items() if k not in ("shared_parameters", "multitask")} for r in records]
            for task, records in multitask.items()}
  text = scorecard.format_results_table(table, {"rows": single, "chosen": {}, "sweep": {}})
  assert "| 42,016 |" in text and scorecard.MULTITASK_NOTE not in text

"""The experiment runner: variants x seeds, seed-major order, table rewritten after each run."""

import json

import numpy as np
import pytest

from ftjax.train import report
from ftjax.train.config import default_config


def test_run_all_is_seed_major_and_tables_mean_and_std(tmp_path, monkeypatch):
  calls = []
  rng = np.random.default_rng(0)
  scores = {}

  def fake_train(cfg, run_dir):
    calls.append((cfg.seed, run_dir.split("/")[-2], cfg.optimizer.lr))
    top1 = float(rng.uniform(0.5, 0.9))
    scores.setdefault(run_dir.split("/")[-2], []).append(top1)
    # After the first run the table already exists (the runner rewrites it each time).
    if len(calls) == 2:
      assert "| a | 1 |" in (tmp_path / "results_table.md").read_text()
    return {"seed": cfg.seed, "best_val": top1, "test_top1": top1, "test_mean_per_class": top1,
            "trainable_parameters": 10}

  monkeypatch.setattr(report, "train_and_evaluate", fake_train)
  config = default_config()
  config.num_seeds, config.seed = 3, 4
  config.compare = {"b": {"optimizer": {"lr": 0.5}}, "a": {}}
  report.run_all(config, str(tmp_path))
  assert calls == [(4, "a", 0.01), (4, "b", 0.5), (5, "a", 0.01), (5, "b", 0.5),
                   (6, "a", 0.01), (6, "b", 0.5)]
  table = (tmp_path / "results_table.md").read_text()
  for name in ("a", "b"):
    values = 100 * np.asarray(scores[name])
    assert f"| {name} | 3 | {values.mean():.2f} ± {values.std(ddof=1):.2f} |" in table
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["seed"] for r in saved["b"]] == [4, 5, 6]


def test_combine_results_keeps_equal_shared_rows_once_and_rejects_conflicts(tmp_path):
  run = {"seed": 0, "best_val": 0.5, "test_top1": 0.6, "test_mean_per_class": 0.6,
         "trainable_parameters": 10}
  a, b, c = (tmp_path / n for n in "abc")
  for d, results in ((a, {"finetune": [run], "co_tuning": [dict(run, test_top1=0.7)]}),
                     (b, {"finetune": [run], "bss": [dict(run, test_top1=0.65)]}),
                     (c, {"finetune": [dict(run, test_top1=0.1)]})):
    d.mkdir()
    (d / "results.json").write_text(json.dumps(results))
  combined = report.combine_results([str(a), str(b)])
  assert list(combined) == ["finetune", "co_tuning", "bss"]
  assert combined["bss"][0]["test_top1"] == 0.65
  table = report.write_table(combined, str(tmp_path), title="t")
  assert table.count("| finetune |") == 1 and "| bss | 1 | 50.00 | 65.00 |" in table
  with pytest.raises(ValueError, match="variant 'finetune' differs"):
    report.combine_results([str(a), str(c)])
  with pytest.raises(FileNotFoundError, match="results.json not found"):
    report.combine_results([str(tmp_path / "missing")])


def test_diverged_variant_is_recorded_and_the_comparison_goes_on(tmp_path, fashion_mnist_ready):
  from experiments.configs import tiny
  config = tiny.get_config()
  config.num_steps, config.eval_every_steps, config.log_every_steps = 3, 3, 1
  config.compare = {"huge_lr": {"optimizer": {"lr": 1e30}}, "ok": {}}
  with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step \d+; no checkpoint was written yet"):
    report.run_all(config, str(tmp_path / "raise"))
  config.on_divergence = "record"
  results = report.run_all(config, str(tmp_path / "record"))
  assert "non-finite loss" in results["huge_lr"][0]["diverged"]
  assert np.isnan(results["huge_lr"][0]["test_top1"])
  assert 0 <= results["ok"][0]["test_top1"] <= 1 and "diverged" not in results["ok"][0]
  table = (tmp_path / "record" / "results_table.md").read_text()
  assert "| huge_lr | 1 | diverged (1/1) | diverged (1/1) | diverged (1/1) | n/a |" in table
  config.on_divergence = "ignore"
  with pytest.raises(report.ConfigError, match="on_divergence must be 'raise' or 'record'"):
    report.run_all(config, str(tmp_path / "bad"))


def test_table_of_validation_only_runs():
  """evaluate_test=False records have no test figures: the table says so instead of failing."""
  from ftjax.train import report
  runs = {"sweep": [{"seed": 0, "best_val": 0.8, "trainable_parameters": 10, "test_evaluated": False}]}
  table = report.format_table(runs)
  assert "| sweep | 1 | 80.00 | not evaluated | not evaluated | 10 |" in table

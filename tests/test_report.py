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

"""experiments/reproducibility.py: the comparison of a setting's fingerprint with native's."""

from __future__ import annotations

import copy
import json

import pytest

from experiments import reproducibility as repro


def _fingerprint(losses, *, test=0.83, params="a" * 64):
  metrics = [{"step": s, "split": "train", "loss": l} for s, l in enumerate(losses, start=1)]
  metrics.append({"step": len(losses), "split": "val", "top1": 0.8})
  return {"main": {"finetune/seed0": {"metrics": metrics, "params_sha256": params, "batch_stats_sha256": "b",
                                       "results": {"best_val": 0.8, "test_top1": test}}}}


def test_identical_runs_are_bitwise():
  a = _fingerprint([2.0, 1.5, 1.0])
  c = repro.compare_runs(a["main"]["finetune/seed0"], copy.deepcopy(a)["main"]["finetune/seed0"])
  assert c["bitwise"] and c["params_equal"] and c["first_differing_train_step"] is None
  assert c["max_rel_loss_diff"] == 0.0 and c["delta_test_points"] == 0.0


def test_first_difference_and_its_size():
  a = _fingerprint([2.0, 1.5, 1.0, 0.5])
  b = _fingerprint([2.0, 1.5, 1.0 + 1e-6, 0.5 + 1e-3], test=0.8312, params="c" * 64)
  c = repro.compare_runs(a["main"]["finetune/seed0"], b["main"]["finetune/seed0"])
  assert not c["bitwise"] and not c["params_equal"]
  assert c["first_differing_train_step"] == 3
  assert c["max_rel_loss_diff"] == pytest.approx(1e-3 / 0.5)
  assert c["delta_test_points"] == pytest.approx(0.12)


def test_equal_losses_but_other_params_are_not_bitwise():
  a = _fingerprint([2.0, 1.0])
  b = _fingerprint([2.0, 1.0], params="d" * 64)
  c = repro.compare_runs(a["main"]["finetune/seed0"], b["main"]["finetune/seed0"])
  assert not c["bitwise"] and c["first_differing_train_step"] is None


def test_report_table(tmp_path):
  (tmp_path / "native.json").write_text(json.dumps(_fingerprint([2.0, 1.0])))
  (tmp_path / "avx2.json").write_text(json.dumps(_fingerprint([2.0, 1.1], test=0.84)))
  text = repro.report(tmp_path)
  rows = [line for line in text.splitlines() if line.startswith("| main/")]
  assert len(rows) == 2
  assert "| avx2 |" in rows[0] or "| avx2 |" in rows[1]
  avx2 = next(r for r in rows if "| avx2 |" in r)
  assert "| no | 2 (of 2) |" in avx2 and avx2.rstrip().endswith("| +1.00 |"), avx2
  assert (tmp_path / "README.md").read_text() == text


def test_report_needs_native(tmp_path):
  (tmp_path / "avx2.json").write_text(json.dumps(_fingerprint([2.0])))
  with pytest.raises(SystemExit, match="native.json is missing"):
    repro.report(tmp_path)

"""The run fingerprints that check a refactor changed no number (experiments/fingerprint.py)."""

from __future__ import annotations

import numpy as np

from experiments import fingerprint


def test_array_hash_sees_one_ulp_and_paths():
  tree = {"a": {"kernel": np.linspace(0, 1, 7, dtype=np.float32)}, "b": np.zeros(3, np.float32)}
  base = fingerprint._array_hash(tree)
  nudged = {"a": {"kernel": tree["a"]["kernel"].copy()}, "b": tree["b"]}
  nudged["a"]["kernel"][3] = np.nextafter(nudged["a"]["kernel"][3], np.float32(2))
  assert fingerprint._array_hash(nudged) != base
  renamed = {"a": {"bias": tree["a"]["kernel"]}, "b": tree["b"]}
  assert fingerprint._array_hash(renamed) != base
  assert fingerprint._array_hash({"b": tree["b"], "a": {"kernel": tree["a"]["kernel"]}}) == base


def test_compare_separates_changes_from_additions():
  before = {"ce": {".": {"metrics": [{"step": 1, "loss": 0.5}], "params_sha256": "x"}}}
  same_plus_field = {"ce": {".": {"metrics": [{"step": 1, "loss": 0.5, "lr": 0.1}], "params_sha256": "x"}}}
  diffs, added = fingerprint.compare(before, same_plus_field)
  assert diffs == [] and added == ["ce/./metrics[0]/lr: only in after"]
  changed = {"ce": {".": {"metrics": [{"step": 1, "loss": 0.5000001}], "params_sha256": "y"}}}
  diffs, added = fingerprint.compare(before, changed)
  assert diffs == ["ce/./metrics[0]/loss: 0.5 -> 0.5000001", "ce/./params_sha256: 'x' -> 'y'"]
  dropped = {"ce": {".": {"metrics": [{"step": 1}], "params_sha256": "x"}}}
  assert fingerprint.compare(before, dropped)[0] == ["ce/./metrics[0]/loss: only in before"]


def test_timing_fields_and_paths_are_left_out():
  row = {"step": 4, "loss": 1.0, "images_per_s": 123.0, "spottune_files": ["/tmp/x/a.png"],
         "path": "/tmp/run/patch.npz"}
  assert fingerprint._clean(row) == {"step": 4, "loss": 1.0, "path": "patch.npz"}

"""Metrics to JSON lines and TensorBoard-readable event files (process 0 only)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np


def _to_float(value: Any) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Appends ``{"step": s, "split": ..., name: value}`` lines to ``metrics.jsonl``.

  On resume, :meth:`truncate_after` drops lines written after the restored
  checkpoint so a resumed run's log equals an uninterrupted run's.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        import tensorflow as tf  # only for the event-file writer
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _to_float(v) for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      import tensorflow as tf
      with self._tb.as_default(step=int(step)):
        for name, value in record.items():
          if name not in ("step", "split"):
            tf.summary.scalar(f"{split}/{name}", value)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]

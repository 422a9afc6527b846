"""Orbax checkpoints of the whole train state (atomic, keep N, exact resume).

One checkpoint holds the train state (params, batch stats, optimizer state,
method state, step, RNG; the data position is the step), the best-so-far
variables chosen on the validation split, and a small JSON record. Orbax writes
into a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores ``(state, best, record)`` under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
        item_names=("state", "best", "record"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, *, state: Any, best: Any, record: dict[str, Any]) -> None:
    self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            best=ocp.args.StandardSave(best),
            record=ocp.args.JsonSave(record),
        ),
        force=True,
    )

  def read_record(self, step: int) -> dict[str, Any]:
    """The JSON record of checkpoint ``step`` alone (checked before the state is restored)."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return dict(restored.record)

  def restore(self, step: int, *, state: Any, best: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Restores into the structure, shapes and shardings of the given templates."""
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract(state)),
            best=ocp.args.StandardRestore(abstract(best)),
            record=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, restored.best, dict(restored.record)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_checkpoint_arrays(workdir: str, step: int | None = None) -> dict[str, Any]:
  """The saved ``state``/``best``/``record`` of a run as NumPy arrays (no templates needed).

  Works on any device count (the arrays are gathered to the host). For
  inspection and tests; resuming uses :meth:`Checkpointer.restore`.
  """
  import json

  import numpy as np

  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(d) for d in (os.listdir(directory) if os.path.isdir(directory) else []) if d.isdigit())
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {workdir}")
  step = steps[-1] if step is None else step
  out: dict[str, Any] = {"step": step}
  checkpointer = ocp.PyTreeCheckpointer()
  for item in ("state", "best"):
    path = os.path.join(directory, str(step), item)
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    out[item] = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  record_dir = os.path.join(directory, str(step), "record")
  with open(os.path.join(record_dir, "metadata")) as f:  # JsonSave's file
    out["record"] = json.load(f)
  return out

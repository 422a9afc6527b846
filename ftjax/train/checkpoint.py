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
  """The saved ``state``/``best``/``record`` of a run as plain arrays (no templates needed).

  For inspection and tests; resuming uses :meth:`Checkpointer.restore`.
  """
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                  item_names=("state", "best", "record"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), best=ocp.args.StandardRestore(), record=ocp.args.JsonRestore()))
  return {"state": restored.state, "best": restored.best, "record": dict(restored.record), "step": step}

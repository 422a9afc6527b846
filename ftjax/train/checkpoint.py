"""Orbax checkpoints of the whole train state (atomic, keep N, exact resume).

One checkpoint holds the train state (params, batch stats, optimizer state,
method state, step, RNG; the data position is the step), the best-so-far
variables chosen on the validation split, and a small JSON record. Orbax writes
into a temporary directory and renames it when complete, so a run killed while
saving, or a save that fails (a full disk), leaves the previous checkpoint
intact; the failure is raised as :class:`CheckpointWriteError`, one line.

A checkpoint that cannot be read back is moved aside by
:meth:`Checkpointer.move_aside` into ``workdir/checkpoints_unreadable`` (never
deleted: the files may still matter to whoever looks at them).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from ftjax.core.errors import RunError

UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointWriteError(RunError):
  """Writing a checkpoint failed (the previous checkpoint, if any, is intact)."""


class _OneLineOrbaxErrors(logging.Filter):
  """Orbax logs a failed background save with each thread's traceback; the trainer raises
  one :class:`CheckpointWriteError` for it, so those records keep their first line only."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and "orbax" in record.pathname and record.exc_info:
      record.exc_info, record.exc_text = None, None
      record.msg, record.args = (record.getMessage().splitlines() or [""])[0], ()
    return True


_ORBAX_FILTER = _OneLineOrbaxErrors()


def _ignore_late_reader_callbacks() -> None:
  """After a failed restore, TensorStore's reads still in flight call back into the
  asyncio loop Orbax has closed; Python prints each as an 'Exception ignored'
  traceback. Those callbacks carry nothing (the restore already failed and was
  reported), so this drops exactly them and passes every other one on."""
  previous = sys.unraisablehook
  if getattr(previous, "_ftjax_late_reader_filter", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._ftjax_late_reader_filter = True
  sys.unraisablehook = hook


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


class Checkpointer:
  """Saves and restores ``(state, best, record)`` under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self._pending: int | None = None  # the step of a save that may still be writing
    logging.getLogger("absl").addFilter(_ORBAX_FILTER)  # once: a filter object is added at most once
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
        item_names=("state", "best", "record"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The complete checkpoints' steps, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def save(self, step: int, *, state: Any, best: Any, record: dict[str, Any]) -> None:
    """Starts writing checkpoint ``step`` (in the background; :meth:`wait` ends it).

    Raises:
      CheckpointWriteError: this save, or the previous one still writing, failed.
    """
    self.wait()  # a failure of the previous save surfaces here, naming that save
    self._pending = int(step)
    try:
      self._manager.save(
          int(step),
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              best=ocp.args.StandardSave(best),
              record=ocp.args.JsonSave(record),
          ),
          force=True,
      )
    except Exception as e:  # noqa: BLE001 - any failure of the write is reported the same way
      self._raise_write_error(e)

  def _raise_write_error(self, error: BaseException) -> None:
    step, self._pending = self._pending, None
    with_previous = [s for s in self._steps_on_disk() if s != step]
    previous = (f"the previous checkpoint (step {max(with_previous)}) is intact" if with_previous
                else "no earlier checkpoint exists")
    raise CheckpointWriteError(
        f"writing the checkpoint of step {step} in {self.directory} failed ({_first_line(error)}); "
        f"{previous}: fix the cause (disk space?) and run the same command to resume") from error

  def _steps_on_disk(self) -> list[int]:
    try:
      self._manager.reload()
      return list(self._manager.all_steps())
    except Exception:  # noqa: BLE001 - only used to word an error message
      return []

  def read_record(self, step: int) -> dict[str, Any]:
    """The JSON record of checkpoint ``step`` alone (checked before the state is restored)."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return dict(restored.record)

  def restore(self, step: int, *, state: Any, best: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Restores into the structure, shapes and shardings of the given templates."""
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    try:
      restored = self._manager.restore(
          int(step),
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract(state)),
              best=ocp.args.StandardRestore(abstract(best)),
              record=ocp.args.JsonRestore(),
          ),
      )
    except Exception:
      _ignore_late_reader_callbacks()
      raise
    return restored.state, restored.best, dict(restored.record)

  def move_aside(self, step: int) -> str:
    """Moves checkpoint ``step`` to ``workdir/checkpoints_unreadable/<step>`` (process 0); returns it.

    Every process then sees the remaining checkpoints (after a barrier).
    """
    target = os.path.join(self.workdir, UNREADABLE_DIR, str(int(step)))
    if os.path.exists(target):
      n = 1
      while os.path.exists(f"{target}.{n}"):
        n += 1
      target = f"{target}.{n}"
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(self.directory, str(int(step))), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"ftjax_moved_aside_{int(step)}")
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Waits for a background save to finish.

    Raises:
      CheckpointWriteError: it failed.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._raise_write_error(e)
    self._pending = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # noqa: BLE001 - a failed save already raised from wait()
        logging.debug("closing the checkpoint manager", exc_info=True)


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

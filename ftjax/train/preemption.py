"""Preemption: SIGTERM or SIGINT ends a run at a step boundary, after a checkpoint.

Slurm, Kubernetes and TPU maintenance stop a job with SIGTERM (and a grace
period before SIGKILL); a person stops it with Ctrl-C (SIGINT). While
:class:`PreemptionWatch` is active, either signal only marks the run as
preempted: the training loop finishes the current step, writes a checkpoint at
that step and raises :class:`Preempted`, and the same command resumes from it.
A second signal stops at once (the previous checkpoint is intact).

With several processes, all of them must save at the same step (an Orbax save is
collective). JAX's preemption service (``jax.distributed.initialize`` starts it)
catches SIGTERM in any process, tells the others through the coordination
service, and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`
then returns True at the same step everywhere. That service owns the SIGTERM
handler, so this module leaves SIGTERM to it and turns a SIGINT into a SIGTERM
to the own process. Without the service, the processes agree by gathering each
one's flag after every step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np

from ftjax.core.errors import RunError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RunError):
  """The run stopped at ``step`` on a signal, after writing a checkpoint at that step."""

  def __init__(self, *, step: int, signum: int, directory: str):
    self.step, self.signum, self.directory = int(step), int(signum), directory
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; a checkpoint of step {step} "
                     f"is in {directory}: the same command resumes from it")

  @property
  def exit_code(self) -> int:
    """``128 + signal``, the status a shell reports for a process ended by that signal."""
    return 128 + self.signum


def _sync_manager_running() -> bool:
  """Whether JAX's preemption service runs in this (multi-process) job."""
  try:
    from jax._src import distributed
  except ImportError:  # pragma: no cover - a JAX without the module
    return False
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatch:
  """A context manager that turns SIGTERM/SIGINT into a request to stop at the next step.

  Example:
    >>> with PreemptionWatch() as watch:
    ...   watch.should_stop(1)
    False
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    self._service = self._multi and _sync_manager_running()

  def __enter__(self) -> "PreemptionWatch":
    # Python runs signal handlers in the main thread only (a loop in another thread
    # keeps the default actions).
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        if self._service and signum == signal.SIGTERM:
          continue  # JAX's preemption notifier holds SIGTERM (a C handler Python does not see)
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:  # asked twice: stop now, without the checkpoint
      self.__exit__()
      raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice: stopped without a checkpoint")
    self.signum = signum
    logging.warning("%s received: finishing this step, writing a checkpoint, then stopping",
                    signal.Signals(signum).name)
    if self._service:
      # The preemption service listens for SIGTERM and tells the other processes.
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint at ``step`` and stop; the same answer in every process.

    Multi-process runs must call it at every step, in every process.
    """
    if not self._multi:
      return self.signum is not None
    if self._service:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.signum is not None))
    return bool(np.any(flags))

  def stop_signal(self) -> int:
    """The signal that stopped the run (SIGTERM when another process received it)."""
    return self.signum if self.signum is not None else int(signal.SIGTERM)

"""One writer per workdir: a lock file naming the job that holds it.

``workdir/.ftjax.lock`` holds a JSON line ``{"host", "pid", "job", "since"}`` and
an exclusive ``flock`` for as long as the job runs. The kernel releases a flock
when its process dies, however it dies, so a lock whose file is still there
but whose flock is free was left by a dead process: it is taken over with a
warning naming that process. A second live job finds the flock taken and
refuses in one line naming the holder.

The processes of a multi-process job share the workdir: process 0 takes the
lock for the job and tells the others whether it got it.

Example:
  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> with hold_workdir(d):
  ...   holder(d)["pid"] == os.getpid()
  True
  >>> holder(d) is None
  True
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from ftjax.core.errors import RunError

LOCK_NAME = ".ftjax.lock"

# Locks this process holds: path -> [fd, depth]. A job that locks a workdir and
# then a run directory inside it (or the same one twice) does not lock itself out.
_held: dict[str, list[int]] = {}


class WorkdirLocked(RunError):
  """Another live job holds the workdir."""


def job_id() -> str:
  """This job's id: ``$FTJAX_JOB_ID`` (the local launcher sets it), the scheduler's, or host:pid."""
  for name in ("FTJAX_JOB_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID"):
    if os.environ.get(name):
      return os.environ[name]
  return f"{socket.gethostname()}:{os.getpid()}"


def lock_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), LOCK_NAME)


def holder(workdir: str) -> dict[str, Any] | None:
  """The record in ``workdir``'s lock file, or None when there is none (or it is unreadable)."""
  try:
    with open(lock_path(workdir)) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    record = json.loads(text)
  except ValueError:
    return None
  return record if isinstance(record, dict) else None


def _describe(record: dict[str, Any] | None) -> str:
  if not record:
    return "an unknown job (its lock file is empty)"
  return (f"job {record.get('job', '?')} (host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
          f"since {record.get('since', '?')})")


def _acquire(path: str) -> int:
  """Opens and flocks ``path``; returns the fd. Raises WorkdirLocked when a live job holds it."""
  workdir = os.path.dirname(path)
  os.makedirs(workdir, exist_ok=True)
  for _ in range(10):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        raise
      raise WorkdirLocked(f"{workdir} is in use by {_describe(holder(workdir))}; wait for it to end or "
                          f"use another --workdir (one job writes a workdir at a time)") from None
    # The holder before us may have removed the file between our open and flock:
    # then we locked an unlinked inode; open the path again.
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if not same:
      os.close(fd)
      continue
    old = os.read(fd, 1 << 16).decode(errors="replace").strip()
    if old:
      try:
        previous = json.loads(old)
      except ValueError:
        previous = None
      logging.warning("%s: taking over the lock left by %s, which is no longer running", workdir,
                      _describe(previous if isinstance(previous, dict) else None))
    record = {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd
  raise WorkdirLocked(f"{workdir}: could not take the lock {path} (it keeps being replaced)")


def _release(path: str, fd: int) -> None:
  # Remove the file while still holding the flock, so a clean exit leaves no lock behind.
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)
  fcntl.flock(fd, fcntl.LOCK_UN)
  os.close(fd)


@contextlib.contextmanager
def hold_workdir(workdir: str) -> Iterator[None]:
  """Holds ``workdir``'s lock for the block (process 0 for a multi-process job).

  Raises:
    WorkdirLocked: another live job holds it (in every process of this job).
  """
  import jax
  path = lock_path(workdir)
  multi = jax.process_count() > 1
  fd = None
  error = None
  if jax.process_index() == 0:
    if path in _held:
      _held[path][1] += 1
      fd = -1  # re-entered: released by the outermost block
    else:
      try:
        fd = _acquire(path)
        _held[path] = [fd, 1]
      except WorkdirLocked as e:
        error = e
  if multi:
    from jax.experimental import multihost_utils
    import numpy as np
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = WorkdirLocked(f"{os.path.abspath(workdir)} is in use by another job (process 0 could not "
                            f"take its lock {path}; see process 0's message)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if fd is not None:
      entry = _held[path]
      entry[1] -= 1
      if entry[1] == 0:
        del _held[path]
        _release(path, entry[0])

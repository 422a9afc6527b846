"""Atomic file writes: a killed process never leaves half a file behind.

Each writer writes a temporary file in the target's directory and renames it
over the target (``os.replace`` is atomic on POSIX file systems).

Example:
  >>> import tempfile, os, json
  >>> d = tempfile.mkdtemp()
  >>> path = write_json(os.path.join(d, "r.json"), {"top1": 0.8})
  >>> json.load(open(path))
  {'top1': 0.8}
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
  """An open temporary file that replaces ``path`` when the block ends without an error."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
  with atomic_file(path) as f:
    f.write(text)
  return os.fspath(path)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> str:
  """``value`` as JSON at ``path``, atomically."""
  with atomic_file(path) as f:
    json.dump(value, f, indent=indent)
  return os.fspath(path)


def atomic_save(path: str | os.PathLike, save: Callable[[IO[bytes]], None]) -> str:
  """Runs ``save(binary_file)`` (e.g. ``lambda f: np.save(f, array)``) into ``path``, atomically."""
  with atomic_file(path, "wb") as f:
    save(f)
  return os.fspath(path)


def save_npy(path: str | os.PathLike, array: Any) -> str:
  """``np.save`` of ``array`` to exactly ``path``, atomically."""
  import numpy as np
  return atomic_save(path, lambda f: np.save(f, array))


def save_npz(path: str | os.PathLike, **arrays: Any) -> str:
  """``np.savez`` of ``arrays`` to exactly ``path``, atomically."""
  import numpy as np
  return atomic_save(path, lambda f: np.savez(f, **arrays))

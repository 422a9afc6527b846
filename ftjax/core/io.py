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


# ----------------------------------------------------------------------------- verified caches
#
# A cache file (converted weights, extracted features) can be damaged after it was
# written: a disk error, a copy cut short, an edit by hand. Its content hash is
# kept beside it in ``<path>.sha256``; a reader that finds a different hash
# rebuilds the cache instead of training on damaged numbers. A file without the
# sidecar (written by an older ftjax) is still read, and its hash recorded once it
# has been read in full.

CHECKSUM_SUFFIX = ".sha256"


def file_sha256(path: str | os.PathLike) -> str:
  """The sha256 hex digest of the file's bytes."""
  import hashlib
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_checksum(path: str | os.PathLike) -> str:
  """Records ``path``'s content hash in ``<path>.sha256`` (atomically); returns the digest."""
  digest = file_sha256(path)
  atomic_write_text(os.fspath(path) + CHECKSUM_SUFFIX, digest + "\n")
  return digest


def checksum_matches(path: str | os.PathLike) -> bool | None:
  """Whether ``path`` still has the hash recorded beside it; None when none is recorded.

  Example:
    >>> import tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "cache.npy")
    >>> _ = save_npy(p, [1.0, 2.0])
    >>> print(checksum_matches(p))
    None
    >>> _ = write_checksum(p)
    >>> checksum_matches(p)
    True
    >>> with open(p, "r+b") as f:
    ...   _ = f.seek(-1, 2); _ = f.write(b"x")
    >>> checksum_matches(p)
    False
  """
  sidecar = os.fspath(path) + CHECKSUM_SUFFIX
  try:
    with open(sidecar) as f:
      recorded = f.read().strip()
  except FileNotFoundError:
    return None
  return recorded == file_sha256(path)

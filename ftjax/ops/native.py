"""Loading ftjax's compiled CPU kernels (``ftjax/ops/*.cc``) from ``ftjax/ops/_build/``.

``pip install .`` (or a wheel) compiles them there through ``setup.py``; in a source
checkout ``scripts/build_native.sh`` does. Both link the convolutions against the
pip-installed oneDNN that :mod:`ftjax.ops.build_kernels` pins, which
:func:`load_onednn` loads first, from wherever pip put it. ``python -m ftjax.info``
says which kernels are active and why the others are not.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import threading
from collections.abc import Callable

import jax

from ftjax.ops import build_kernels

BUILD_DIR = pathlib.Path(__file__).resolve().parent / "_build"

_onednn_lock = threading.Lock()
_onednn: ctypes.CDLL | str | None = None  # the loaded library, or why it could not be loaded


def load_onednn() -> ctypes.CDLL | str:
  """Loads the pinned ``libdnnl.so.3`` (pip's ``onednn-cpu-gomp``) once.

  The kernel's run path (``$ORIGIN/../../../../..``) finds it only where pip's
  ``site-packages`` sits under ``<prefix>/lib``; loading it by its recorded location
  first covers ``--user``, ``--target`` and editable installs too (the dynamic
  loader reuses an already loaded ``libdnnl.so.3``).

  Returns:
    The library, or a one-line reason it could not be loaded.
  """
  global _onednn
  with _onednn_lock:
    if _onednn is None:
      path = build_kernels.onednn_library()
      if path is None:
        _onednn = (f"oneDNN runtime not installed (pip install "
                   f"{build_kernels.ONEDNN_RUNTIME}=={build_kernels.ONEDNN_VERSION})")
      else:
        try:
          # Local: a kernel that needs libdnnl.so.3 is matched to it by its soname, while
          # the dnnl_* symbols stay out of the global scope, where they would shadow
          # another oneDNN's for a kernel built against it (FTJAX_ONEDNN_LIBRARY).
          _onednn = load_library(path)
        except OSError as e:
          _onednn = f"cannot load {path}: {e}"
    return _onednn


def load_library(path: pathlib.Path | str) -> ctypes.CDLL:
  """``ctypes`` loads ``path`` with GNU OpenMP's passive wait policy unless the caller set one.

  The kernels run on GNU OpenMP threads while XLA runs other ops on its own threads;
  spinning OpenMP workers can starve XLA's (one Lite0 b32/224 run: 12.6 img/s with
  the default policy vs 26.5 passive; later alternating runs showed no difference
  between passive and a 20,000-spin count, experiments/bench/README.md). libgomp
  reads the policy once, when it is first loaded (here, as a dependency of the
  library), so it is set only around the load and a caller's own OMP_WAIT_POLICY
  wins. If PyTorch (which ships its own libgomp.so.1) was imported first, the
  kernels share that runtime and its settings; if PyTorch comes later, it shares
  this one.

  Raises:
    OSError: the library cannot be loaded.
  """
  previous = os.environ.get("OMP_WAIT_POLICY")
  os.environ.setdefault("OMP_WAIT_POLICY", "passive")
  try:
    return ctypes.cdll.LoadLibrary(str(path))
  finally:
    if previous is None:
      del os.environ["OMP_WAIT_POLICY"]


class KernelLibrary:
  """One compiled library of XLA FFI handlers, loaded and registered on first use.

  Args:
    name: file name under :data:`BUILD_DIR` (``libftjax_*.so``).
    env_var: environment variable that overrides the path.
    targets: FFI target name -> exported handler symbol.
    preload: loads a library this one needs (:func:`load_onednn`) and returns it or
      why it failed; the failure is reported only if this library then fails to load.
  """

  def __init__(self, name: str, env_var: str, targets: dict[str, str],
               preload: Callable[[], object] | None = None):
    self.name, self.env_var, self.targets = name, env_var, dict(targets)
    self.preload = preload
    self._reason: str | None = None
    self._loaded = False
    self._lock = threading.Lock()

  def path(self) -> pathlib.Path:
    return pathlib.Path(os.environ.get(self.env_var, BUILD_DIR / self.name))

  def unavailable_reason(self) -> str | None:
    """None once the handlers are registered, else what is missing."""
    with self._lock:  # registers each target once, whichever thread traces first
      if not self._loaded:
        self._reason = self._register()
        self._loaded = True
    return self._reason

  def available(self) -> bool:
    return self.unavailable_reason() is None

  def _register(self) -> str | None:
    path = self.path()
    if not path.exists():
      source = f" (from {self.env_var})" if self.env_var in os.environ else ""
      return (f"{path}{source} not built (pip install . builds it; in a source checkout run "
              "scripts/build_native.sh)")
    dependency = self.preload() if self.preload is not None else None
    try:
      library = load_library(path)
    except OSError as e:
      return f"cannot load {path}: {e}" + (f"; {dependency}" if isinstance(dependency, str) else "")
    for target, symbol in self.targets.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
    return None

"""Loading ftjax's compiled CPU kernels (``ftjax/ops/*.cc``, built by
``scripts/build_native.sh`` into ``ftjax/ops/_build/``)."""

from __future__ import annotations

import ctypes
import os
import pathlib
import threading

import jax

BUILD_DIR = pathlib.Path(__file__).resolve().parent / "_build"


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
  """

  def __init__(self, name: str, env_var: str, targets: dict[str, str]):
    self.name, self.env_var, self.targets = name, env_var, dict(targets)
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
      return f"{path} not built (run scripts/build_native.sh)"
    try:
      library = load_library(path)
    except OSError as e:
      return f"cannot load {path}: {e}"
    for target, symbol in self.targets.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
    return None

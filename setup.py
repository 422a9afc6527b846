"""Package build with ftjax's CPU kernels (``ftjax/ops/*.cc``) compiled by ``build_ext``.

``pip install .`` and ``python -m build --wheel`` compile each kernel into
``ftjax/ops/_build/libftjax_<name>.so`` (where :mod:`ftjax.ops.native` loads them)
against jaxlib's XLA FFI headers and the oneDNN pinned in
``ftjax/ops/build_kernels.py`` (both build requirements in ``pyproject.toml``); it
needs ``g++``. ``FTJAX_SKIP_KERNELS=1`` builds without them (the XLA paths then run,
and ``python -m ftjax.info`` says so).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent


def _load_build_kernels():
  # By path: importing the ftjax package would import jax, which the build does not have.
  spec = importlib.util.spec_from_file_location("_ftjax_build_kernels",
                                                ROOT / "ftjax" / "ops" / "build_kernels.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


build_kernels = _load_build_kernels()
PREFIX = "ftjax.ops._build."
CXX = os.environ.get("CXX", "g++")


class BuildKernels(build_ext):
  """Builds each kernel as a plain shared library (no Python module init) with g++."""

  def get_ext_filename(self, fullname: str) -> str:
    # "ftjax.ops._build.libftjax_max_pool" -> "ftjax/ops/_build/libftjax_max_pool.so", the
    # name ftjax.ops.native looks for (no "cpython-311-x86_64-linux-gnu" tag).
    return os.path.join(*fullname.split(".")) + ".so"

  def build_extension(self, ext: Extension) -> None:
    output = pathlib.Path(self.get_ext_fullpath(ext.name))
    try:
      build_kernels.compile_kernel(_kernel(ext), output, cxx=CXX)
    except build_kernels.BuildError as e:
      raise SystemExit(f"ftjax: error: {e}\n(set FTJAX_SKIP_KERNELS=1 to install without "
                       "the CPU kernels)") from e

  def copy_extensions_to_source(self) -> None:
    # An editable install (pip install -e) copies the kernels into ftjax/ops/_build/.
    # Copy to a temporary name and rename: overwriting the file in place would change
    # the pages of a library that running processes have mapped.
    inplace, self.inplace = self.inplace, False  # get_ext_fullpath: where it was built
    try:
      built = {ext.name: self.get_ext_fullpath(ext.name) for ext in self.extensions}
    finally:
      self.inplace = inplace
    for ext in self.extensions:
      target = ROOT / self.get_ext_filename(ext.name)
      target.parent.mkdir(parents=True, exist_ok=True)
      temporary = target.with_name(f"{target.name}.tmp.{os.getpid()}")
      shutil.copyfile(built[ext.name], temporary)
      os.chmod(temporary, 0o755)
      os.replace(temporary, target)
      # scripts/build_native.sh then skips it until a source or version changes.
      build_kernels.record_stamp(_kernel(ext), target, cxx=CXX)


def _kernel(ext: Extension) -> str:
  """``ftjax.ops._build.libftjax_max_pool`` -> ``max_pool``."""
  return ext.name.removeprefix(PREFIX).removeprefix("libftjax_")


def _extensions() -> list[Extension]:
  if os.environ.get("FTJAX_SKIP_KERNELS", "") not in ("", "0"):
    return []
  return [Extension(PREFIX + build_kernels.library_name(kernel).removesuffix(".so"),
                    sources=[f"ftjax/ops/{kernel}.cc"])
          for kernel in build_kernels.KERNELS]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildKernels})

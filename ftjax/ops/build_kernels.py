"""Compiles ftjax's CPU kernels (``ftjax/ops/*.cc``) against the pinned oneDNN.

Used by the package build (``setup.py``: ``pip install .`` and wheels), by
``scripts/build_native.sh`` (a source checkout, into ``ftjax/ops/_build/``) and, for
the oneDNN it pins, by :mod:`ftjax.ops.native` at run time. It imports nothing
outside the standard library, because the package build runs it before ftjax's
dependencies exist.

oneDNN comes from PyPI: ``onednn-cpu-gomp`` (the shared library) and
``onednn-devel-cpu-gomp`` (headers), version :data:`ONEDNN_VERSION` = oneDNN 3.2.0,
CPU only, threaded with GNU OpenMP like ``max_pool.cc`` and ``channel_sums.cc``. The
newer ``onednn`` releases on PyPI are SYCL builds threaded with TBB that pull in the
DPC++ and OpenCL runtimes, so they are not used.

Command line (what ``scripts/build_native.sh`` runs)::

  python -m ftjax.ops.build_kernels --missing-requirements   # pins still to pip install
  python -m ftjax.ops.build_kernels ftjax/ops/_build
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys

#: The PyPI release of oneDNN the kernels are built against and load (oneDNN 3.2.0).
ONEDNN_VERSION = "2023.2.0"
#: The distribution holding ``lib/libdnnl.so*`` (installed into ``sys.prefix/lib``).
ONEDNN_RUNTIME = "onednn-cpu-gomp"
#: The distribution holding ``include/oneapi/dnnl/*`` (needed only to compile).
ONEDNN_DEVEL = "onednn-devel-cpu-gomp"
#: The file name the kernels' ``DT_NEEDED`` entry asks for.
ONEDNN_SONAME = "libdnnl.so.3"

#: Kernel name (``ftjax/ops/<name>.cc``) -> extra compiler/linker flags.
KERNELS = {
    "onednn_conv": ("-ldnnl",),
    "max_pool": ("-fopenmp",),
    "channel_sums": ("-fopenmp",),
}
CXXFLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-Wno-attributes")
#: From ``<prefix>/lib/python3.X/site-packages/ftjax/ops/_build`` (where a wheel puts the
#: kernels) to ``<prefix>/lib`` (where pip puts ``onednn-cpu-gomp``'s library).
WHEEL_RPATH = "$ORIGIN/../../../../.."

SOURCE_DIR = pathlib.Path(__file__).resolve().parent


class BuildError(RuntimeError):
  """A kernel cannot be compiled (missing compiler, headers or library)."""


def library_name(kernel: str) -> str:
  """``"max_pool"`` -> ``"libftjax_max_pool.so"``."""
  return f"libftjax_{kernel}.so"


def _distribution_file(distribution: str, suffix: str) -> pathlib.Path | None:
  """The installed file of ``distribution`` whose path ends with ``suffix`` (None if absent)."""
  try:
    dist = importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None
  name = suffix.rsplit("/", 1)[-1]
  for entry in dist.files or ():
    # RECORD paths are relative to site-packages ("../../libdnnl.so.3" for a file in
    # <prefix>/lib), so compare the resolved path.
    if entry.name == name:
      path = pathlib.Path(str(dist.locate_file(entry))).resolve()
      if path.as_posix().endswith(suffix) and path.exists():
        return path
  return None


def installed_onednn_version() -> str | None:
  """The installed ``onednn-cpu-gomp`` version, or None."""
  try:
    return importlib.metadata.version(ONEDNN_RUNTIME)
  except importlib.metadata.PackageNotFoundError:
    return None


def onednn_library() -> pathlib.Path | None:
  """``<prefix>/lib/libdnnl.so.3`` of the pip-installed ``onednn-cpu-gomp``, or None."""
  return _distribution_file(ONEDNN_RUNTIME, f"lib/{ONEDNN_SONAME}")


def onednn_include_dir() -> pathlib.Path | None:
  """The include directory of the pip-installed ``onednn-devel-cpu-gomp``, or None."""
  header = _distribution_file(ONEDNN_DEVEL, "include/oneapi/dnnl/dnnl.hpp")
  return None if header is None else header.parents[2]


def jaxlib_include_dir() -> pathlib.Path | None:
  """jaxlib's ``include`` directory (the XLA FFI headers), found without importing jax."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return None
  include = pathlib.Path(list(spec.submodule_search_locations)[0]) / "include"
  return include if (include / "xla" / "ffi" / "api" / "ffi.h").exists() else None


def _require(path: pathlib.Path | None, what: str, install: str) -> pathlib.Path:
  if path is None:
    raise BuildError(f"{what} not found; {install}")
  return path


def compile_command(kernel: str, output: pathlib.Path, cxx: str = "g++") -> list[str]:
  """The compiler command that builds ``kernel`` into ``output``.

  Raises:
    BuildError: jaxlib's headers or, for ``onednn_conv``, the pinned oneDNN are missing.
  """
  if kernel not in KERNELS:
    raise BuildError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
  jax_include = _require(jaxlib_include_dir(), "jaxlib's XLA FFI headers", "pip install jaxlib")
  command = [cxx, *CXXFLAGS, "-isystem", str(jax_include)]
  if "-ldnnl" in KERNELS[kernel]:
    pin = f"pip install {ONEDNN_DEVEL}=={ONEDNN_VERSION}"
    include = _require(onednn_include_dir(), f"oneDNN headers ({ONEDNN_DEVEL})", pin)
    library = _require(onednn_library(), f"oneDNN library ({ONEDNN_RUNTIME})", pin)
    if installed_onednn_version() != ONEDNN_VERSION:
      raise BuildError(f"{ONEDNN_RUNTIME} {installed_onednn_version()} is installed, the kernels "
                       f"are pinned to {ONEDNN_VERSION}: {pin}")
    # -L finds the unversioned libdnnl.so the package ships next to libdnnl.so.3.
    command += ["-isystem", str(include), f"-L{library.parent}", f"-Wl,-rpath,{WHEEL_RPATH}"]
  return [*command, str(SOURCE_DIR / f"{kernel}.cc"), "-o", str(output), *KERNELS[kernel]]


def _fingerprint(kernel: str, command: list[str]) -> str:
  """Source, flags, jaxlib and oneDNN versions: a kernel is rebuilt when one changes."""
  digest = hashlib.sha256((SOURCE_DIR / f"{kernel}.cc").read_bytes())
  # Paths differ between an isolated build environment and a venv; flags and versions do not.
  flags = [part for part in command if not part.startswith(("/", "-L/"))]
  try:
    jaxlib = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    jaxlib = "none"
  digest.update(repr((flags, jaxlib, installed_onednn_version())).encode())
  return digest.hexdigest()


def _stamp_file(output: pathlib.Path, kernel: str) -> pathlib.Path:
  return output.with_name(f".stamp_{kernel}")


def record_stamp(kernel: str, output: pathlib.Path | str, *, cxx: str = "g++") -> None:
  """Marks ``output`` as built from the current source, flags and versions."""
  fingerprint = _fingerprint(kernel, compile_command(kernel, pathlib.Path("/output"), cxx))
  _stamp_file(pathlib.Path(output), kernel).write_text(fingerprint + "\n")


def compile_kernel(kernel: str, output: pathlib.Path | str, *, cxx: str = "g++",
                   stamp: bool = False, log=print) -> bool:
  """Compiles ``ftjax/ops/<kernel>.cc`` into ``output``; returns whether it compiled.

  The library is written under a temporary name and renamed, so a process that has
  the old one loaded never sees half a file. With ``stamp`` a fingerprint beside the
  library (``.stamp_<kernel>``) skips the build when nothing changed.

  Raises:
    BuildError: a missing dependency, or the compiler failed (its output included).
  """
  output = pathlib.Path(output)
  temporary = output.with_name(f"{output.name}.tmp.{os.getpid()}")
  command = compile_command(kernel, temporary, cxx)
  fingerprint = _fingerprint(kernel, compile_command(kernel, pathlib.Path("/output"), cxx))
  stamp_file = _stamp_file(output, kernel)
  if stamp and output.exists() and stamp_file.exists() and stamp_file.read_text().strip() == fingerprint:
    return False
  output.parent.mkdir(parents=True, exist_ok=True)
  log(f"[build_kernels] {shlex.join(command)}")
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
  except FileNotFoundError as e:
    raise BuildError(f"no C++ compiler {cxx!r} (on Debian: apt-get install g++)") from e
  if result.returncode != 0:
    temporary.unlink(missing_ok=True)
    raise BuildError(f"compiling {kernel}.cc failed:\n{result.stdout}{result.stderr}")
  os.replace(temporary, output)
  if stamp:
    stamp_file.write_text(fingerprint + "\n")
  return True


def missing_requirements() -> list[str]:
  """The pinned oneDNN distributions (``name==version``) not installed at that version."""
  missing = []
  for name in (ONEDNN_RUNTIME, ONEDNN_DEVEL):
    try:
      installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      installed = None
    if installed != ONEDNN_VERSION:
      missing.append(f"{name}=={ONEDNN_VERSION}")
  return missing


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Builds ftjax's CPU kernels into OUT_DIR.")
  parser.add_argument("out_dir", type=pathlib.Path, nargs="?")
  parser.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
  parser.add_argument("--missing-requirements", action="store_true",
                      help="print the pinned oneDNN requirements not installed, then exit")
  args = parser.parse_args(argv)
  if args.missing_requirements:
    print(" ".join(missing_requirements()))
    return 0
  if args.out_dir is None:
    parser.error("OUT_DIR is required")
  try:
    for kernel in KERNELS:
      output = args.out_dir / library_name(kernel)
      if compile_kernel(kernel, output, cxx=args.cxx, stamp=True):
        print(f"[build_kernels] built {output}")
  except BuildError as e:
    print(f"build_kernels: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""What ftjax runs on: versions, and which CPU kernels are active and why not.

``python -m ftjax.info`` prints it; ``--json`` prints the same as one JSON object;
``--check`` exits 1 when a kernel is inactive (for install scripts and tests).

Example:
  >>> status = kernel_status()
  >>> sorted(status) == ["channel_sums", "max_pool", "onednn_conv"]
  True
  >>> all(reason is None or isinstance(reason, str) for reason in status.values())
  True
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import sys

import jax

import ftjax
from ftjax.ops import build_kernels, channel_sums, conv, onednn_conv, pool

#: Kernel name -> its library and what it does.
KERNELS = {
    "onednn_conv": (onednn_conv.LIBRARY, "convolutions and their gradients (oneDNN)"),
    "max_pool": (pool.LIBRARY, "max pooling and its gradient (OpenMP)"),
    "channel_sums": (channel_sums.LIBRARY, "BatchNorm's per-channel sums (OpenMP)"),
}


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def loaded_onednn() -> tuple[str, str] | None:
  """``(version, file)`` of the oneDNN the convolution kernel loaded (None if not loaded)."""
  if not onednn_conv.available():
    return None

  class _Version(ctypes.Structure):  # the leading fields of oneDNN's dnnl_version_t
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]

  # Already loaded: this only takes another reference, whose symbol lookup also
  # searches the libraries it depends on (libdnnl).
  kernel = ctypes.CDLL(str(onednn_conv.library_path()))
  kernel.dnnl_version.restype = ctypes.POINTER(_Version)
  v = kernel.dnnl_version().contents
  try:
    with open("/proc/self/maps", encoding="utf-8") as maps:
      files = {line.split()[-1] for line in maps if "libdnnl" in line}
  except OSError:
    files = set()
  return f"{v.major}.{v.minor}.{v.patch}", ", ".join(sorted(files)) or "?"


def kernel_status() -> dict[str, str | None]:
  """Kernel name -> None when its library is loaded and used, else why it is not.

  A loaded library is still unused when JAX runs on an accelerator or when
  ``FTJAX_CONV_IMPL=xla`` (:func:`ftjax.ops.conv.conv_impl`) forces the XLA
  formulations; those are reported as reasons too.
  """
  status, forced_error = {}, ""
  try:
    forced = conv.forced_impl()
  except ValueError as e:  # an unknown FTJAX_CONV_IMPL
    forced, forced_error = None, str(e)
  backend = jax.default_backend()
  for name, (library, _) in KERNELS.items():
    reason = library.unavailable_reason()
    if reason is None and backend != "cpu":
      reason = f"built, but JAX runs on {backend} (these are CPU kernels)"
    elif reason is None and forced is None:
      reason = forced_error
    elif reason is None and forced == "xla":
      reason = "built, but FTJAX_CONV_IMPL=xla forces XLA's formulations"
    status[name] = reason
  return status


def report() -> dict:
  """Versions, the pinned and loaded oneDNN, and :func:`kernel_status` with library paths."""
  status = kernel_status()
  loaded = loaded_onednn()
  return {
      "ftjax": ftjax.__version__,
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "backend": jax.default_backend(),
      "onednn": {
          "pinned": f"{build_kernels.ONEDNN_RUNTIME}=={build_kernels.ONEDNN_VERSION}",
          "installed": _version(build_kernels.ONEDNN_RUNTIME),
          "loaded_version": None if loaded is None else loaded[0],
          "loaded_from": None if loaded is None else loaded[1],
      },
      "kernels": {name: {"active": status[name] is None, "reason": status[name],
                         "library": str(library.path()), "what": what}
                  for name, (library, what) in KERNELS.items()},
  }


def format_report(info: dict) -> str:
  """The human-readable form of :func:`report`."""
  onednn = info["onednn"]
  lines = [
      f"ftjax {info['ftjax']}, jax {info['jax']} (jaxlib {info['jaxlib']}, backend {info['backend']})",
      f"oneDNN: pinned {onednn['pinned']}, installed {onednn['installed'] or 'no'}"
      + (f", loaded oneDNN {onednn['loaded_version']} from {onednn['loaded_from']}"
         if onednn["loaded_version"] else ""),
      "CPU kernels:",
  ]
  width = max(map(len, info["kernels"]))
  for name, kernel in info["kernels"].items():
    state = "active" if kernel["active"] else "inactive"
    lines.append(f"  {name:<{width}}  {state:<8}  {kernel['what']}")
    lines.append(f"  {'':<{width}}  {'':<8}  {kernel['library'] if kernel['active'] else kernel['reason']}")
  inactive = [name for name, kernel in info["kernels"].items() if not kernel["active"]]
  if inactive:
    lines.append(f"{', '.join(inactive)}: XLA's own formulations run instead (slower on CPU)")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ftjax.info", description=__doc__.split("\n")[0])
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--check", action="store_true", help="exit 1 when a kernel is inactive")
  args = parser.parse_args(argv)
  info = report()
  print(json.dumps(info, indent=2) if args.json else format_report(info))
  return 1 if args.check and not all(k["active"] for k in info["kernels"].values()) else 0


if __name__ == "__main__":
  sys.exit(main())

"""Keeps freed host memory in the process, so XLA:CPU steps stop page-faulting.

Why: XLA:CPU allocates a step's large buffers (activations, patch matrices, the
temporary arena) with ``malloc`` on every execution. glibc serves allocations above
its mmap threshold (at most 32 MiB) and those made from per-thread arenas that
cannot grow with fresh ``mmap`` calls, and unmaps them on ``free``. Every page of
such a buffer is then faulted in and zeroed by the kernel again on the next step:
a ResNet-18 training step at batch 32 / 112 px took about 100,000 page faults
(~400 MiB) per step on the 2-core CPU, and stopping them made the step ~12% faster
(``experiments/bench/README.md``).

:func:`retain_freed_host_memory` switches glibc to one arena, no ``mmap`` for
allocations and no trimming, so freed buffers are reused by the next step. The cost
is that the process keeps its peak heap until it exits, and glibc's aligned
allocations fragment it during the first calls (a jitted gradient with ~128 MiB of
buffers per call: peak resident 936 MB instead of 439 MB, page faults per call
32,770 -> 0 after 50 calls). That suits a training or benchmark process, not
necessarily a notebook that does other work. It only affects host (CPU) memory;
accelerator memory is managed by the device runtime.

Call it early, before JAX runs anything: threads that already own an arena keep it.

Example::

  from ftjax import host_memory
  host_memory.retain_freed_host_memory()
  import jax  # ... then build and run the jitted step
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Largest value glibc accepts for M_TRIM_THRESHOLD is a (signed) int.
_NEVER_TRIM = 2**31 - 1


@functools.cache
def retain_freed_host_memory() -> bool:
  """Tells glibc's malloc to keep and reuse freed memory (see module docstring).

  Returns:
    ``True`` when every setting was applied; ``False`` where the C library is not
    glibc (macOS, musl) or refused a setting; the accepted settings stay applied
    and a warning is logged.
  """
  if not sys.platform.startswith("linux"):
    return False
  name = ctypes.util.find_library("c") or "libc.so.6"
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    logging.warning("host_memory: %s has no mallopt; allocator left as it is", name)
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  # Order matters: one arena first, so that disabling mmap also covers the
  # allocations that worker threads make (other arenas fall back to mmap).
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
  accepted = [mallopt(param, value) == 1 for param, value in settings]  # try every one
  applied = all(accepted)
  if not applied:
    logging.warning("host_memory: mallopt refused a setting; freed memory may be unmapped")
  return applied

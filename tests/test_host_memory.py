"""ftjax.host_memory: freed host memory is reused instead of faulted in again."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import run_python

# A jitted gradient whose buffers (input-sized activations and their gradients,
# ~128 MiB per call) are allocated on every call; reports page faults per call after
# warm-up. With glibc's default malloc every call maps these buffers afresh.
# Measured over 4 x 50 calls: default ~32,770 faults per call throughout; retained
# ~3,300 per call in the first 50 and 0 after (peak RSS 936 MB vs 439 MB).
_PROBE = r"""
import json, resource, sys
from ftjax import host_memory
retained = host_memory.retain_freed_host_memory() if sys.argv[1] == "retain" else None
import jax, jax.numpy as jnp
x = jnp.ones((32, 64, 64, 64), jnp.float32)  # 32 MiB
w = jnp.ones((64, 64), jnp.float32) / 64
def loss(w, x):
  h = jnp.tanh(jnp.tanh(x @ w) @ w)
  return jnp.mean(h ** 2)
f = jax.jit(jax.grad(loss))
for _ in range(20):  # the retained heap settles within the first calls
  f(w, x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
  f(w, x).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"retained": retained, "faults_per_call": (after - before) / 8}))
"""


def _faults(mode: str) -> dict:
  proc = run_python(["-c", _PROBE, mode], timeout=300)
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_retained_memory_stops_per_call_page_faults():
  default = _faults("default")
  retained = _faults("retain")
  assert retained["retained"] is True
  # 32 MiB of 4 KiB pages is 8,192 faults; the default allocator maps several such
  # buffers afresh per call (measured: ~32,770 faults per call).
  assert default["faults_per_call"] > 8192, default
  # Retained: glibc's aligned allocations leave some freed chunks too small for the
  # next request, so the heap grows during the first calls and then stops.
  assert retained["faults_per_call"] < default["faults_per_call"] / 4, (default, retained)


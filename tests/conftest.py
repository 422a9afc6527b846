"""Shared test set-up.

JAX runs on the host CPU; tests that need several devices start a subprocess
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (see ``run_python``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_python(args: list[str], *, devices: int = 1, timeout: float = 600, check: bool = True,
               cwd: str = ROOT, **popen) -> subprocess.CompletedProcess:
  """Runs ``python ARGS`` in a fresh interpreter with ``devices`` host CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout, **popen)
  if check and proc.returncode != 0:
    raise AssertionError(f"python {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


@pytest.fixture(scope="session")
def fashion_mnist_ready():
  """fashion_mnist prepared in TFDS's default data dir (scripts/setup.sh does it too)."""
  from ftjax import data
  data.prepare_offline("fashion_mnist")
  return True

"""Shared test set-up.

JAX runs on the host CPU; tests that need several devices start a subprocess
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (see ``run_python``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _share_compilations_within_the_session() -> None:
  """One persistent XLA compilation cache for this test session, fresh each session.

  Dozens of tests (and the subprocesses they start) compile the same tiny models and
  steps; a cache hit loads the executable XLA built before instead of building it again
  (about 5 s of a 25 s tiny run). The cache keys on the program, the devices and the
  flags, so a hit is the executable a miss would build and results stay bitwise equal.
  The directory is created by the first process that imports this file (the xdist
  controller, whose environment its workers and their subprocesses inherit) and removed
  by it at exit. ``FTJAX_TEST_COMPILATION_CACHE=0`` turns it off.
  """
  if os.environ.get("FTJAX_TEST_COMPILATION_CACHE", "1") == "0" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  import atexit
  import shutil
  import tempfile
  directory = tempfile.mkdtemp(prefix="ftjax-test-xla-cache-")
  owner = os.getpid()
  atexit.register(lambda: os.getpid() == owner and shutil.rmtree(directory, ignore_errors=True))
  os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  # Tiny programs compile in well under JAX's default thresholds (1 s, 0 bytes): cache all.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


_share_compilations_within_the_session()

# Freed host memory stays in the process (as in experiments/train.py): XLA:CPU's
# large buffers are then not page-faulted in again on every call.
from ftjax import host_memory  # noqa: E402

host_memory.retain_freed_host_memory()


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


def kill_after_checkpoint(args: list[str], *, checkpoints, min_step: int, timeout: float = 400,
                          devices: int | None = None) -> None:
  """Runs ``python ARGS`` and SIGKILLs it once ``checkpoints`` holds a step >= ``min_step``."""
  import time
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  try:
    while time.time() < deadline:
      done = [d for d in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else []) if d.isdigit()]
      if any(int(d) >= min_step for d in done):
        break
      assert proc.poll() is None, "the run ended before it could be killed"
      time.sleep(0.05)
    else:
      pytest.fail("no checkpoint appeared in time")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def fashion_mnist_ready():
  """fashion_mnist prepared in TFDS's default data dir (scripts/setup.sh does it too)."""
  from ftjax import data
  data.prepare_offline("fashion_mnist")
  return True


def train_spottune_steps(*, model, variables, components, batch, steps: int = 3, weight_decay: float = 1e-4):
  """Runs ``steps`` jitted SpotTune train steps (library rules, groups and optimizer).

  Returns ``(state, metrics of the last step)``.
  """
  import jax
  import optax
  from ftjax.methods import spottune as st
  from ftjax.train import optim, setup
  groups = {name: optim.GroupConfig.from_mapping(g)
            for name, g in st.spottune_groups(head_lr_mult=10.0, policy_lr_mult=2.0).items()}
  spot = next((c for c in components if isinstance(c, st.SpotTune)), st.SpotTune())
  rules = st.spottune_rules(variables, train_frozen_bn=spot.train_frozen_bn, train_routing=spot.train_routing,
                            routing_mask=tuple(spot.routing_mask) or None,
                            random_finetune_last=spot.random_finetune_last)
  training = setup.init_training(
      model=model, variables=variables, methods=components, rules=rules, groups=groups,
      num_classes=int(variables["params"]["head"]["bias"].shape[0]),
      schedule=optax.constant_schedule(0.05), weight_decay=weight_decay,
      method_rng=jax.random.PRNGKey(1), state_rng=jax.random.PRNGKey(0))
  state = training.state
  for _ in range(steps):
    state, metrics = training.train_step(state, batch, training.source)
  return state, metrics

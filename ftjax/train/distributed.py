"""JAX's multi-process runtime for runs that span several processes or hosts.

Every process runs the same command; :func:`initialize` connects them through
``jax.distributed.initialize`` before any other JAX call, after which
``jax.devices()`` lists the devices of all processes and the trainer's mesh,
data sharding (``tfds.even_splits`` by process), global batches
(``jax.make_array_from_process_local_data``), evaluation sums and Orbax
checkpoints span them all. Only process 0 writes logs, tables and figures.

Where the three values come from, first match wins:

1. arguments (the ``--coordinator_address / --num_processes / --process_id``
   flags of ``experiments.train``);
2. the environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID`` (what ``experiments.launch_local`` sets);
3. ``auto=True``: JAX's own cluster detection (Slurm, Cloud TPU pod slices,
   Open MPI, ...), i.e. ``jax.distributed.initialize()`` with no arguments.

With none of these, nothing happens: a single-process run.

On CPU, cross-process collectives use gloo (set here; no effect on GPU/TPU).
"""

from __future__ import annotations

import logging
import os

import jax

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               heartbeat_timeout_seconds: int = 30, initialization_timeout: int = 120) -> bool:
  """Starts the multi-process runtime when asked; returns whether it did.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator.
    num_processes: total number of processes.
    process_id: this process, in ``[0, num_processes)``.
    auto: let JAX detect the cluster (Slurm, TPU pod, MPI) when no address is given.
    heartbeat_timeout_seconds: a process that stops answering for this long is
      declared dead and the others stop with an error instead of hanging.
    initialization_timeout: seconds to wait for every process to connect.

  Raises:
    ValueError: some but not all of the three values are given, or they are
      inconsistent (names which).
  """
  values = {
      "coordinator_address": coordinator_address or os.environ.get(ENV[0]) or None,
      "num_processes": num_processes if num_processes is not None else _env_int(ENV[1]),
      "process_id": process_id if process_id is not None else _env_int(ENV[2]),
  }
  given = {k for k, v in values.items() if v is not None}
  if not given and not auto:
    return False
  if given and len(given) < 3:
    missing = sorted(set(values) - given)
    raise ValueError(f"multi-process run: {sorted(given)} given but {missing} missing; set all three "
                     f"(flags, or the environment variables {', '.join(ENV)})")
  if given:
    n, i = values["num_processes"], values["process_id"]
    if n < 1 or not 0 <= i < n:
      raise ValueError(f"multi-process run: process_id must be in [0, num_processes), got "
                       f"process_id={i}, num_processes={n}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**(values if given else {}),
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                             initialization_timeout=initialization_timeout)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

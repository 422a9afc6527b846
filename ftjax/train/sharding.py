"""The data-parallel mesh: batch sharded on ``"data"``, state replicated.

FSDP later is a change of :func:`state_sharding`, not of the step.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (global) devices with the axis ``"data"``."""
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh, *, row_axis: int = 0) -> NamedSharding:
  """Rows (axis ``row_axis``) sharded on ``"data"``; the axes before it (a seed axis) whole on every device."""
  return NamedSharding(mesh, P(*([None] * row_axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_sharding(mesh: Mesh, state: Any) -> Any:
  """Sharding of every leaf of the train state (replicated for data parallelism)."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, *, row_axis: int = 0) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays sharded on ``"data"`` (nested dicts: per leaf).

  ``row_axis=1``: a stacked batch ``[seeds, local rows, ...]`` (:mod:`ftjax.train.vmap_seeds`).
  """
  sharding = batch_sharding(mesh, row_axis=row_axis)
  num_devices = mesh.devices.size
  out = {}
  for name, value in local_batch.items():
    if isinstance(value, dict):  # one batch per task (multitask)
      out[name] = global_batch(value, mesh, row_axis=row_axis)
      continue
    global_rows = value.shape[row_axis] * jax.process_count()
    if global_rows % num_devices:
      raise ValueError(f"global batch of {global_rows} does not divide over {num_devices} devices; "
                       f"choose a batch size that is a multiple of {num_devices}")
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out

"""The whole train state as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed as a unit.

  The data position is ``step`` itself: the input stream is a pure function of
  ``(config, seed, step)`` (see :mod:`ftjax.data`), so restoring ``step`` restores it.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any
  rng: jax.Array

  @property
  def variables(self) -> dict[str, Any]:
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}

"""Vanilla fine-tuning: cross-entropy on the target head."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from ftjax.losses import softmax_cross_entropy
from ftjax.methods.base import TermOutput


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """``CE(head(f(x)), y)``, the target-task term every method keeps."""
  weight: float = 1.0
  label_smoothing: float = 0.0
  name: str = "ce"
  outputs: tuple[str, ...] = ("logits",)

  def init_state(self, *, variables: Any, rng: jax.Array) -> tuple:
    del variables, rng
    return ()

  def __call__(self, *, outputs, batch, state, params, rng) -> TermOutput:
    del params, rng
    loss = softmax_cross_entropy(logits=outputs["logits"], labels=batch["label"],
                                 label_smoothing=self.label_smoothing)
    return TermOutput(loss=loss, state=state)

"""Vanilla fine-tuning: cross-entropy on the target head."""

from __future__ import annotations

import dataclasses

from ftjax.losses import softmax_cross_entropy
from ftjax.methods.base import Method, TermOutput


@dataclasses.dataclass(frozen=True)
class CrossEntropy(Method):
  """``CE(head(f(x)), y)``, the target-task term every method keeps."""
  weight: float = 1.0
  label_smoothing: float = 0.0
  name: str = "ce"
  outputs: tuple[str, ...] = ("logits",)

  def __call__(self, *, outputs, batch, state, params, rng, source=None) -> TermOutput:
    del params, rng, source
    loss = softmax_cross_entropy(logits=outputs["logits"], labels=batch["label"],
                                 label_smoothing=self.label_smoothing)
    return TermOutput(loss=loss, state=state)

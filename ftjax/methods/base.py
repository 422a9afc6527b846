"""The interface between a method and the one training step.

A method is a list of :class:`LossComponent` objects. Each names the forward
outputs it needs, owns an explicit state pytree (queues, momentum encoders, ...)
and returns one loss term; the step sums ``weight * term`` over components and
takes a single gradient. Composition is therefore a list in the config.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax


class TermOutput(NamedTuple):
  """What a component returns inside the differentiated loss function."""
  loss: jax.Array            # scalar, unweighted
  state: Any = ()            # the component's new state (use stop_gradient inside)
  metrics: dict[str, jax.Array] | None = None


class LossComponent(Protocol):
  name: str
  weight: float
  outputs: tuple[str, ...]

  def init_state(self, *, variables: Any, rng: jax.Array) -> Any:
    """The component's initial state pytree (``()`` for stateless terms)."""

  def __call__(self, *, outputs: dict[str, Any], batch: dict[str, jax.Array], state: Any,
               params: Any, rng: jax.Array) -> TermOutput:
    """The loss term for one batch; pure and jit-compatible."""

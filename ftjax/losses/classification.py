"""Classification losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _reduce(values: jax.Array, reduction: str) -> jax.Array:
  if reduction == "mean":
    return jnp.mean(values)
  if reduction == "sum":
    return jnp.sum(values)
  if reduction == "none":
    return values
  raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")


def softmax_cross_entropy(
    *, logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0, reduction: str = "mean"
) -> jax.Array:
  """Cross-entropy of integer labels under ``softmax(logits)``: ``-log p(y|x)``.

  Args:
    logits: ``[batch, num_classes]``.
    labels: integer ``[batch]``.
    label_smoothing: mass spread uniformly over all classes.
    reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-example losses).

  Example:
    >>> softmax_cross_entropy(logits=jnp.zeros((2, 4)), labels=jnp.array([0, 3]))
    Array(1.3862944, dtype=float32)
  """
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"expected logits [batch, classes] and labels [batch]; got {logits.shape} and {labels.shape}")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)
  return _reduce(nll, reduction)

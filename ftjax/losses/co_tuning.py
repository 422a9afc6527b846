"""Co-Tuning's source-label term (Co-Tuning paper, Eq. 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.losses.classification import _reduce


def co_tuning_loss(
    *, source_logits: jax.Array, relationship_targets: jax.Array, reduction: str = "mean"
) -> jax.Array:
  """Soft cross-entropy of the source head against translated target labels.

  The second term of Eq. 2 of the Co-Tuning paper: for an example of target
  class ``y_t`` the soft target is ``q = p(y_s | y_t)`` (one row of the category
  relationship) and the loss is ``-sum_s q_s log softmax(source_logits)_s``,
  summed over source classes. Its gradient in the logits is ``softmax - q``.

  Args:
    source_logits: ``[batch, num_source]`` output of the kept pretrained head.
    relationship_targets: ``[batch, num_source]`` rows ``p(y_s | y_t = label)``
      (non-negative, summing to 1; they are not renormalised here).
    reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (per example).

  Returns:
    A scalar, or ``[batch]`` with ``reduction="none"``.

  Example:
    >>> q = jnp.full((2, 4), 0.25)
    >>> co_tuning_loss(source_logits=jnp.zeros((2, 4)), relationship_targets=q)
    Array(1.3862944, dtype=float32)
  """
  if source_logits.ndim != 2:
    raise ValueError(f"source_logits must be [batch, num_source], got shape {source_logits.shape}")
  if relationship_targets.shape != source_logits.shape:
    raise ValueError(f"relationship_targets shape {relationship_targets.shape} must equal "
                     f"source_logits shape {source_logits.shape}")
  log_probs = jax.nn.log_softmax(source_logits.astype(jnp.float32), axis=-1)
  targets = jax.lax.stop_gradient(relationship_targets.astype(jnp.float32))
  # xlogy-style guard is not needed: q = 0 multiplies a finite log-probability.
  per_example = -jnp.sum(targets * log_probs, axis=-1)
  return _reduce(per_example, reduction)

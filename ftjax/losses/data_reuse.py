"""Pre-training data reuse losses (Eq. 6 and Eq. 7 of "Improved Fine-Tuning by
Better Leveraging Pre-Training Data", papers/uot-data-reuse.txt)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.core.errors import is_concrete
from ftjax.losses.classification import softmax_cross_entropy


class ReuseLoss(NamedTuple):
  """The Eq. 6 objective and its two terms."""
  total: jax.Array      # target_ce + weight * pool_ce
  target_ce: jax.Array  # mean CE of the target head on the target batch
  pool_ce: jax.Array    # mean CE of the pool head on the pool batch (unweighted)


def _check_logits_labels(logits: jax.Array, labels: jax.Array, what: str) -> None:
  if logits.ndim != 2:
    raise ValueError(f"{what}_logits must be [batch, classes], got shape {tuple(logits.shape)}")
  if labels.shape != logits.shape[:1]:
    raise ValueError(f"{what}_labels must be [batch] = {tuple(logits.shape[:1])}, got shape "
                     f"{tuple(labels.shape)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{what}_labels must be integers, got dtype {labels.dtype}")
  if not is_concrete(labels):
    return  # values unknown under jit: only shapes can be checked
  values = np.asarray(labels)
  if values.size and (values.min() < 0 or values.max() >= logits.shape[1]):
    raise ValueError(f"{what}_labels out of range: found [{values.min()}, {values.max()}] for "
                     f"{logits.shape[1]} classes")


def _mean_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return softmax_cross_entropy(logits=logits, labels=labels)


def reuse_loss(*, target_logits: jax.Array, target_labels: jax.Array, pool_logits: jax.Array,
               pool_labels: jax.Array, weight: float | jax.Array) -> ReuseLoss:
  """Fine-tuning with labelled pre-training data, Eq. 6.

  ``1/ñ Σ_t f(θ; x_t, y_t) + λ/m̃ Σ_s h(θ; x'_s, y'_s)``: ``f`` is the cross-entropy
  of the target head on the target batch, ``h`` that of the second (pre-training
  classes) head on the selected pool batch; each is averaged over its own batch.

  Args:
    target_logits: ``[n, C_target]`` target-head logits of the target batch.
    target_labels: int ``[n]`` in ``[0, C_target)``.
    pool_logits: ``[m, C_pool]`` pool-head logits of the pool batch.
    pool_labels: int ``[m]`` in ``[0, C_pool)``.
    weight: λ (paper grid {1, 0.3, 0.1}).

  Returns:
    :class:`ReuseLoss` ``(total, target_ce, pool_ce)``.

  Raises:
    ValueError: bad shapes or dtypes; labels out of range (checked outside jit only).

  Example:
    >>> out = reuse_loss(target_logits=jnp.zeros((2, 5)), target_labels=jnp.array([0, 4]),
    ...                  pool_logits=jnp.zeros((2, 3)), pool_labels=jnp.array([1, 2]), weight=0.3)
    >>> float(out.total)  # log 5 + 0.3 log 3
    1.93902...
  """
  _check_logits_labels(target_logits, target_labels, "target")
  _check_logits_labels(pool_logits, pool_labels, "pool")
  target_ce = _mean_ce(target_logits, target_labels)
  pool_ce = _mean_ce(pool_logits, pool_labels)
  return ReuseLoss(total=target_ce + weight * pool_ce, target_ce=target_ce, pool_ce=pool_ce)


def pseudo_label_loss(*, strong_logits: jax.Array, weak_logits: jax.Array) -> jax.Array:
  """Soft pseudo-label loss on unlabelled pre-training data, the second term of Eq. 7.

  ``1/m̃ Σ_s h(θ; x̃'_s, p(y | x'_s))``: the target head's prediction on the weakly
  augmented view, ``softmax(weak_logits)``, is a fixed soft label (no gradient)
  for the strongly augmented view: ``-Σ_c p_c log softmax(strong_logits)_c``,
  averaged over the pool batch. One head, no temperature, no threshold.

  Args:
    strong_logits: ``[m, C]`` target-head logits of the strongly augmented views.
    weak_logits: ``[m, C]`` target-head logits of the weakly augmented views.

  Returns:
    The scalar loss (multiply by λ outside).

  Raises:
    ValueError: shapes differ or are not ``[batch, classes]``.

  Example:
    >>> pseudo_label_loss(strong_logits=jnp.zeros((2, 4)), weak_logits=jnp.ones((2, 4)))
    Array(1.3862944, dtype=float32)
  """
  if strong_logits.ndim != 2:
    raise ValueError(f"strong_logits must be [batch, classes], got shape {tuple(strong_logits.shape)}")
  if weak_logits.shape != strong_logits.shape:
    raise ValueError(f"weak_logits shape {tuple(weak_logits.shape)} must equal strong_logits shape "
                     f"{tuple(strong_logits.shape)}")
  soft_labels = jax.nn.softmax(jax.lax.stop_gradient(weak_logits).astype(jnp.float32), axis=-1)
  log_probs = jax.nn.log_softmax(strong_logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(soft_labels * log_probs, axis=-1))

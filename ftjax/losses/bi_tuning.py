"""Bi-Tuning's contrastive losses (Zhong et al., "Bi-Tuning: Efficient Transfer from
Pre-Trained Models"): InfoNCE (Eq. 1), contrastive cross-entropy (Eq. 3) and the
categorical contrastive loss (Eq. 4), against per-class key queues.

Key pool layout (shared by the three functions): a queue ``[C, K, D]`` holding up
to ``K`` keys per class, and ``queue_counts [C]``, the number of *real* keys in
each class's queue. Entries ``k >= queue_counts[c]`` hold no key yet (a queue
starts empty and fills from slot 0; once full every slot is real) and are masked
out of both the positives and the negatives. Keys, queues and the CCE class
prototypes receive no gradient.

For a query of class ``y`` the positive set is ``K_p = {own key} ∪ {real entries of
queue[y]}`` and the negative set ``K_n`` the real entries of every other class's
queue; with logits ``s = q·k / τ`` the per-example loss is the soft cross-entropy
with a target uniform over ``K_p``::

  L = logsumexp_{k ∈ K_p ∪ K_n} s_k  -  mean_{k ∈ K_p} s_k
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.losses.classification import _reduce

_EPS = 1e-12


def l2_normalize(x: jax.Array, *, axis: int = -1) -> jax.Array:
  """``x / max(||x||, 1e-12)`` along ``axis`` (torch ``F.normalize`` semantics).

  Example:
    >>> l2_normalize(jnp.array([[3.0, 4.0]]))
    Array([[0.6, 0.8]], dtype=float32)
  """
  # rsqrt of the clamped squared norm: finite gradient even at x = 0.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), _EPS**2))


def features_with_bias(features: jax.Array) -> jax.Array:
  """``normalise([h, 1])``: the classifier-space representation of features ``[B, d]``.

  With a prototype ``w_c = normalise([W_c, b_c])`` the dot product is the class
  logit ``W_c·h + b_c`` up to the two norms; queue ``queue_h`` stores these.

  Example:
    >>> features_with_bias(jnp.zeros((1, 2)))
    Array([[0., 0., 1.]], dtype=float32)
  """
  features = features.astype(jnp.float32)
  ones = jnp.ones(features.shape[:-1] + (1,), features.dtype)
  return l2_normalize(jnp.concatenate([features, ones], axis=-1))


def class_prototypes(*, head_kernel: jax.Array, head_bias: jax.Array) -> jax.Array:
  """``normalise([W_c, b_c])`` for every class: ``[C, d + 1]``, without gradient.

  Args:
    head_kernel: the classifier kernel in Flax layout ``[d, C]``.
    head_bias: its bias ``[C]``.

  Example:
    >>> class_prototypes(head_kernel=jnp.ones((2, 3)), head_bias=jnp.zeros(3)).shape
    (3, 3)
  """
  if head_kernel.ndim != 2 or head_bias.shape != head_kernel.shape[1:]:
    raise ValueError(f"expected head_kernel [d, C] and head_bias [C]; got {head_kernel.shape} and "
                     f"{head_bias.shape}")
  weights = jnp.concatenate([head_kernel.T, head_bias[:, None]], axis=1).astype(jnp.float32)
  return jax.lax.stop_gradient(l2_normalize(weights))


def _check_queue(queue: jax.Array, queue_counts: jax.Array | None, dim: int, what: str) -> jax.Array:
  """Validates the queue and returns the ``[C, K]`` mask of real entries."""
  if queue.ndim != 3:
    raise ValueError(f"{what} must be [num_classes, keys_per_class, dim], got shape {queue.shape}")
  if queue.shape[-1] != dim:
    raise ValueError(f"{what} has dimension {queue.shape[-1]} but the queries have {dim}")
  num_classes, keys_per_class = queue.shape[:2]
  if queue_counts is None:
    return jnp.ones((num_classes, keys_per_class), bool)
  if queue_counts.shape != (num_classes,):
    raise ValueError(f"queue_counts must be [num_classes] = [{num_classes}], got shape {queue_counts.shape}")
  return jnp.arange(keys_per_class)[None, :] < queue_counts[:, None]


def _check_labels(labels: jax.Array, batch: int) -> None:
  if labels.shape != (batch,):
    raise ValueError(f"labels must be [batch] = [{batch}], got shape {labels.shape}")


def _multi_positive_loss(*, own_logits: jax.Array, queue_logits: jax.Array, labels: jax.Array | None,
                         valid: jax.Array, reduction: str) -> jax.Array:
  """Soft CE with a target uniform over ``{own} ∪ {real same-class entries}``.

  ``own_logits [B]``, ``queue_logits [B, C, K]``, ``valid [C, K]``; ``labels=None``
  means InfoNCE (the own key is the only positive).
  """
  batch = own_logits.shape[0]
  valid = jnp.broadcast_to(valid[None], queue_logits.shape)
  masked = jnp.where(valid, queue_logits, -jnp.inf)
  all_logits = jnp.concatenate([own_logits[:, None], masked.reshape(batch, -1)], axis=1)
  log_partition = jax.nn.logsumexp(all_logits, axis=1)
  if labels is None:
    positive_sum, num_positive = own_logits, jnp.ones_like(own_logits)
  else:
    same_class = jax.nn.one_hot(labels, queue_logits.shape[1], dtype=bool)[:, :, None]
    positive = jnp.logical_and(valid, same_class)
    positive_sum = own_logits + jnp.sum(jnp.where(positive, queue_logits, 0.0), axis=(1, 2))
    num_positive = 1.0 + jnp.sum(positive, axis=(1, 2)).astype(jnp.float32)
  return _reduce(log_partition - positive_sum / num_positive, reduction)


def categorical_contrastive_loss(
    *,
    queries: jax.Array,
    keys: jax.Array,
    queue: jax.Array,
    labels: jax.Array,
    queue_counts: jax.Array | None = None,
    temperature: float = 0.07,
    reduction: str = "mean",
) -> jax.Array:
  """Categorical contrastive loss L_CCL, Eq. 4 of the Bi-Tuning paper (projector head).

  For the query projection ``z_q`` of class ``y``: positives are its own key ``z_k``
  (the momentum encoder's projection of another view of the same image) and the
  real keys in ``queue[y]``; negatives are the real keys of all other classes; the
  target is uniform over the positives (``1 / (1 + queue_counts[y])``).

  Args:
    queries: ``[B, D]`` query projections (L2-normalised here; a no-op for the
      model's ``projection`` output).
    keys: ``[B, D]`` the queries' own keys (normalised here; no gradient).
    queue: ``[C, K, D]`` normalised key projections per class (no gradient).
    labels: int ``[B]``.
    queue_counts: int ``[C]`` real keys per class (``None`` = every entry is real).
    temperature: τ (paper: 0.07).
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.

  Returns:
    A scalar, or ``[B]`` with ``reduction="none"``.

  Example:
    >>> z = l2_normalize(jnp.ones((2, 4)))
    >>> categorical_contrastive_loss(queries=z, keys=z, queue=jnp.zeros((3, 5, 4)),
    ...                              labels=jnp.array([0, 2]), queue_counts=jnp.zeros(3, jnp.int32))
    Array(0., dtype=float32)
  """
  if queries.ndim != 2 or keys.shape != queries.shape:
    raise ValueError(f"queries and keys must both be [batch, dim]; got {queries.shape} and {keys.shape}")
  _check_labels(labels, queries.shape[0])
  valid = _check_queue(queue, queue_counts, queries.shape[1], "queue")
  q = l2_normalize(queries.astype(jnp.float32))
  k = jax.lax.stop_gradient(l2_normalize(keys.astype(jnp.float32)))
  pool = jax.lax.stop_gradient(queue.astype(jnp.float32))
  own = jnp.sum(q * k, axis=1) / temperature
  queue_logits = jnp.einsum("bd,ckd->bck", q, pool) / temperature
  return _multi_positive_loss(own_logits=own, queue_logits=queue_logits, labels=labels, valid=valid,
                              reduction=reduction)


def contrastive_cross_entropy(
    *,
    features: jax.Array,
    head_kernel: jax.Array,
    head_bias: jax.Array,
    queue: jax.Array,
    labels: jax.Array,
    queue_counts: jax.Array | None = None,
    temperature: float = 0.07,
    reduction: str = "mean",
    prototype_gradient: bool = False,
) -> jax.Array:
  """Contrastive cross-entropy L_CCE, Eq. 3 of the Bi-Tuning paper (classifier head).

  The class prototype ``w_y = normalise([W_y, b_y])`` is contrasted against keys
  in the classifier space ``normalise([h, 1])``: positives are the query's own
  representation ``normalise([h_q, 1])`` (as in the authors' code: it carries the
  term's only gradient, into the backbone) and the real keys in ``queue[y]``;
  negatives are the real keys of all other classes; target uniform over the
  positives. Logits ``w_y · h / τ``.

  Args:
    features: ``[B, d]`` pooled backbone features ``h_q`` of the queries (raw: the
      constant 1 is appended and the result normalised here).
    head_kernel: classifier kernel ``[d, C]`` (Flax layout).
    head_bias: classifier bias ``[C]``.
    queue: ``[C, K, d + 1]`` normalised ``[h_k, 1]`` keys per class (no gradient).
    labels: int ``[B]``.
    queue_counts: int ``[C]`` real keys per class (``None`` = every entry is real).
    temperature: τ (paper: 0.07).
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    prototype_gradient: False (default, as DESIGN.md and the authors' code): the
      prototypes are constants, so this term trains no head parameter. True lets
      the gradient reach ``W`` and ``b`` (needed if CCE is used without CE).

  Returns:
    A scalar, or ``[B]`` with ``reduction="none"``.

  Example:
    >>> contrastive_cross_entropy(
    ...     features=jnp.ones((2, 3)), head_kernel=jnp.ones((3, 4)), head_bias=jnp.zeros(4),
    ...     queue=jnp.zeros((4, 2, 4)), labels=jnp.array([0, 1]),
    ...     queue_counts=jnp.zeros(4, jnp.int32))
    Array(0., dtype=float32)
  """
  if features.ndim != 2:
    raise ValueError(f"features must be [batch, dim], got shape {features.shape}")
  if head_kernel.ndim != 2 or head_kernel.shape[0] != features.shape[1]:
    raise ValueError(f"head_kernel must be [dim, num_classes] with dim = {features.shape[1]}, got "
                     f"shape {head_kernel.shape}")
  _check_labels(labels, features.shape[0])
  valid = _check_queue(queue, queue_counts, features.shape[1] + 1, "queue")
  if queue.shape[0] != head_kernel.shape[1]:
    raise ValueError(f"queue has {queue.shape[0]} classes but the head has {head_kernel.shape[1]}")
  if prototype_gradient:
    weights = jnp.concatenate([head_kernel.T, head_bias[:, None]], axis=1).astype(jnp.float32)
    prototypes = l2_normalize(weights)
  else:
    prototypes = class_prototypes(head_kernel=head_kernel, head_bias=head_bias)
  w = jnp.take(prototypes, labels, axis=0)                      # [B, d + 1]
  h = features_with_bias(features)
  pool = jax.lax.stop_gradient(queue.astype(jnp.float32))
  own = jnp.sum(w * h, axis=1) / temperature
  queue_logits = jnp.einsum("bd,ckd->bck", w, pool) / temperature
  return _multi_positive_loss(own_logits=own, queue_logits=queue_logits, labels=labels, valid=valid,
                              reduction=reduction)


def info_nce(
    *,
    queries: jax.Array,
    keys: jax.Array,
    queue: jax.Array,
    queue_counts: jax.Array | None = None,
    temperature: float = 0.07,
    reduction: str = "mean",
) -> jax.Array:
  """InfoNCE, Eq. 1 of the Bi-Tuning paper: the own key is the only positive.

  ``-log exp(q·k_0/τ) / (exp(q·k_0/τ) + Σ_{real queue entries k} exp(q·k/τ))``; every
  real queue entry is a negative, whatever its class (the GPT*-style baseline).

  Args:
    queries: ``[B, D]`` (normalised here).
    keys: ``[B, D]`` own keys ``k_0`` (normalised here; no gradient).
    queue: ``[C, K, D]`` (or ``[1, N, D]`` for one class-agnostic queue) of
      normalised keys (no gradient).
    queue_counts: int ``[C]`` real keys per queue row (``None`` = all real).
    temperature: τ.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.

  Example:
    >>> z = l2_normalize(jnp.ones((2, 4)))
    >>> info_nce(queries=z, keys=z, queue=jnp.zeros((1, 3, 4)), queue_counts=jnp.zeros(1, jnp.int32))
    Array(0., dtype=float32)
  """
  if queries.ndim != 2 or keys.shape != queries.shape:
    raise ValueError(f"queries and keys must both be [batch, dim]; got {queries.shape} and {keys.shape}")
  valid = _check_queue(queue, queue_counts, queries.shape[1], "queue")
  q = l2_normalize(queries.astype(jnp.float32))
  k = jax.lax.stop_gradient(l2_normalize(keys.astype(jnp.float32)))
  pool = jax.lax.stop_gradient(queue.astype(jnp.float32))
  own = jnp.sum(q * k, axis=1) / temperature
  queue_logits = jnp.einsum("bd,ckd->bck", q, pool) / temperature
  return _multi_positive_loss(own_logits=own, queue_logits=queue_logits, labels=None, valid=valid,
                              reduction=reduction)

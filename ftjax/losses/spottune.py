"""SpotTune (Guo et al., CVPR 2019): Gumbel-softmax routing and the Global-k losses.

* :func:`gumbel_softmax`: a sample of the freeze / fine-tune decision (Eq. 3),
  relaxed by a tempered softmax (Eq. 4); ``hard=True`` is the straight-through
  estimator the paper trains with: the forward value is the one-hot arg-max
  sample, the gradient is the gradient of the softmax relaxation.
* :func:`global_k_loss` (Eq. 5) and :func:`policy_entropy_loss` (Eq. 6) push
  every image towards the same ``k`` fine-tuned blocks (the compact Global-k
  variant, Eq. 7: ``l = l_c + λ1 l_k + λ2 l_e``).

Decisions are ``[batch, num_blocks]`` arrays of ``I_l(x)`` (1 = fine-tuned
block, 0 = frozen block); ``v_l`` is their batch mean, the fraction of images
routed through the fine-tuned copy of block ``l``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gumbel_softmax(key: jax.Array, logits: jax.Array, *, temperature: float, hard: bool = True
                   ) -> jax.Array:
  """A Gumbel-softmax sample over the last axis of ``logits`` (SpotTune Eq. 3 and 4).

  ``y = softmax((logits + G) / τ)`` with ``G`` i.i.d. standard Gumbel noise
  (Eq. 4, where ``logits = log α``). With ``hard=True`` the forward value is the
  one-hot ``argmax(logits + G)`` (Eq. 3, the Gumbel-max sample) while the
  gradient is that of the soft ``y``: the straight-through estimator. The
  forward value is written ``one_hot + (y - stop_gradient(y))``; the bracket is
  exactly zero, so the sample is exactly one-hot.

  Args:
    key: PRNG key of the Gumbel noise.
    logits: ``[..., categories]`` unnormalised log-probabilities (SpotTune's
      policy gives ``[batch, blocks, 2]``).
    temperature: τ > 0 of Eq. 4 (the reference code uses 5).
    hard: straight-through one-hot forward (True) or the soft relaxation.

  Returns:
    An array shaped like ``logits``: one-hot (``hard``) or on the simplex.

  Example:
    >>> y = gumbel_softmax(jax.random.key(0), jnp.zeros((4, 3, 2)), temperature=5.0)
    >>> bool(jnp.all(y.sum(-1) == 1))
    True
  """
  try:
    positive = float(temperature) > 0
  except TypeError:
    positive = False
  if not positive:
    raise ValueError(f"gumbel_softmax temperature must be a number > 0, got {temperature!r}")
  if logits.ndim < 1 or logits.shape[-1] < 2:
    raise ValueError(f"gumbel_softmax needs logits [..., categories >= 2], got shape {logits.shape}")
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  perturbed = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
  soft = jax.nn.softmax(perturbed / temperature, axis=-1)
  if not hard:
    return soft
  one_hot = jax.nn.one_hot(jnp.argmax(perturbed, axis=-1), logits.shape[-1], dtype=soft.dtype)
  return one_hot + (soft - jax.lax.stop_gradient(soft))


def _check_decisions(decisions: jax.Array, name: str) -> jax.Array:
  if decisions.ndim != 2:
    raise ValueError(f"{name} needs decisions [batch, num_blocks], got shape {decisions.shape}")
  return decisions.astype(jnp.promote_types(decisions.dtype, jnp.float32))


def block_usage(*, decisions: jax.Array) -> jax.Array:
  """``v_l``: the fraction of the batch routed through each fine-tuned block, ``[num_blocks]``.

  Example:
    >>> block_usage(decisions=jnp.array([[1.0, 0.0], [1.0, 1.0]]))
    Array([1. , 0.5], dtype=float32)
  """
  return jnp.mean(_check_decisions(decisions, "block_usage"), axis=0)


def global_k_loss(*, decisions: jax.Array, k: float) -> jax.Array:
  """SpotTune Eq. 5: ``l_k = (Σ_l v_l - k)^2`` with ``v_l`` the batch mean of ``I_l``.

  Args:
    decisions: ``[batch, num_blocks]`` decisions ``I_l(x)`` (hard 0/1 values with
      straight-through gradients in training).
    k: the number of blocks every image should fine-tune, ``0 <= k <= num_blocks``.

  Returns:
    A scalar.

  Example:
    >>> global_k_loss(decisions=jnp.array([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), k=1)
    Array(0.25, dtype=float32)
  """
  decisions = _check_decisions(decisions, "global_k_loss")
  num_blocks = decisions.shape[1]
  if not 0 <= k <= num_blocks:
    raise ValueError(f"global_k_loss k must be in [0, num_blocks={num_blocks}], got {k}")
  usage = jnp.mean(decisions, axis=0)
  return jnp.square(jnp.sum(usage) - k)


def policy_entropy_loss(*, decisions: jax.Array) -> jax.Array:
  """SpotTune Eq. 6: ``l_e = Σ_l -v_l log v_l``, pushing every ``v_l`` to 0 or 1.

  ``0 log 0`` is taken as 0, with a zero gradient there (the analytic one is
  infinite).

  Args:
    decisions: ``[batch, num_blocks]`` decisions ``I_l(x)``.

  Returns:
    A scalar.

  Example:
    >>> policy_entropy_loss(decisions=jnp.array([[1.0, 0.0], [1.0, 0.0]]))
    Array(0., dtype=float32)
  """
  usage = jnp.mean(_check_decisions(decisions, "policy_entropy_loss"), axis=0)
  positive = usage > 0
  safe = jnp.where(positive, usage, 1.0)
  return jnp.sum(jnp.where(positive, -safe * jnp.log(safe), 0.0))

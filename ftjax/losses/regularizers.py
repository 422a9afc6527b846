"""Regularisation baselines of the fine-tuning papers: L2-SP, DELTA, BSS and LwF.

Each is a pure function of arrays (keyword-only), jit-, vmap- and grad-compatible.
The papers' equations, as numbered in their arXiv versions:

* L2-SP, Li, Grandvalet & Davoine, "Explicit inductive bias for transfer
  learning with convolutional networks" (ICML 2018), Eq. 3.
* DELTA, Li et al., "DELTA: DEep Learning Transfer using feature map with
  Attention" (ICLR 2019), Sec. 3: the behavioural regulariser Ω' and its
  attention weights W_j, with the normalisation and coefficients of TLlib's
  reference implementation (tllib/regularization/delta.py,
  examples/task_adaptation/image_classification/delta.py).
* BSS, Chen et al., "Catastrophic forgetting meets negative transfer: batch
  spectral shrinkage" (NeurIPS 2019), the BSS term of Sec. 4.
* LwF, Li & Hoiem, "Learning without forgetting" (TPAMI 2018), Eq. 2.

How the step feeds them (the frozen source model, the anchor) is in
:mod:`ftjax.methods.regularizers`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

#: Default coefficients from the literature (the issue's protocol).
L2_SP_ALPHA = 0.01
L2_SP_BETA = 0.01
#: DELTA's trade-offs in TLlib's example script (--trade-off-backbone, --trade-off-head;
#: it trains with --wd 0).
DELTA_ALPHA = 0.01
DELTA_BETA = 0.01
BSS_WEIGHT = 0.001
LWF_TEMPERATURE = 3.0


def _squared_norm(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves)


def l2_sp(
    *,
    params: Any,
    anchor: Any,
    head_params: Any = None,
    alpha: float = L2_SP_ALPHA,
    beta: float = L2_SP_BETA,
) -> jax.Array:
  """L2-SP: ``alpha/2 ||w_S - w_S^0||^2 + beta/2 ||w_new||^2`` (L2-SP paper, Eq. 3).

  ``w_S`` are the parameters that have a pretrained value (the backbone, and
  the kept source head when there is one) and ``w_S^0`` that value; ``w_new``
  are the parameters without one (the new target head), pulled towards 0 by
  plain L2. The squared norms are sums over every element of every leaf.
  ``anchor`` gets no gradient.

  Args:
    params: pytree of the parameters that have a pretrained value.
    anchor: pytree of the same structure and shapes: their pretrained values.
    head_params: pytree of the new parameters (``None``: no such term).
    alpha: coefficient of the starting-point term.
    beta: coefficient of the plain L2 term on ``head_params``.

  Returns:
    A float32 scalar.

  Example:
    >>> w = {"conv": jnp.ones((2, 2))}
    >>> l2_sp(params=w, anchor={"conv": jnp.zeros((2, 2))}, head_params=jnp.ones(3),
    ...       alpha=1.0, beta=2.0)
    Array(5., dtype=float32)
  """
  params_def, anchor_def = jax.tree.structure(params), jax.tree.structure(anchor)
  if params_def != anchor_def:
    raise ValueError(f"l2_sp: params and anchor must have the same pytree structure; got "
                     f"{params_def} and {anchor_def}")
  for (path, p), a in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(anchor)):
    if jnp.shape(p) != jnp.shape(a):
      raise ValueError(f"l2_sp: shape of {jax.tree_util.keystr(path)} is {jnp.shape(p)} in "
                       f"params but {jnp.shape(a)} in anchor")
  anchor = jax.lax.stop_gradient(anchor)
  difference = jax.tree.map(lambda p, a: jnp.asarray(p, jnp.float32) - jnp.asarray(a, jnp.float32),
                            params, anchor)
  loss = 0.5 * alpha * _squared_norm(difference)
  if head_params is not None:
    loss = loss + 0.5 * beta * _squared_norm(head_params)
  return loss


def _as_layer_dict(maps: Any, what: str) -> dict[str, jax.Array]:
  if isinstance(maps, Mapping):
    return dict(maps)
  if isinstance(maps, (list, tuple)):
    return {str(i): m for i, m in enumerate(maps)}
  raise ValueError(f"delta: {what} must be a dict name -> [B, H, W, C] map (or a list); "
                   f"got {type(maps).__name__}")


def delta(
    *,
    feature_maps: Mapping[str, jax.Array] | list[jax.Array],
    source_feature_maps: Mapping[str, jax.Array] | list[jax.Array],
    channel_weights: Mapping[str, jax.Array] | list[jax.Array] | None = None,
    head_params: Any = None,
    alpha: float = DELTA_ALPHA,
    beta: float = DELTA_BETA,
) -> jax.Array:
  """DELTA: ``alpha · Ω'(FM, FM0) + beta/2 ||w_new||^2`` (DELTA paper, Sec. 3, Ω' and Eq. 1's Ω).

  Ω' is the behavioural regulariser as TLlib's reference computes it
  (``AttentionBehavioralRegularization``), summed over the batch:

  ``Ω' = 1/2 Σ_l Σ_b Σ_c C_l · a_{l,c} · ||FM_l(x_b)[:, :, c] - FM0_l(x_b)[:, :, c]||² / (H_l W_l)``

  for every layer ``l`` with ``C_l`` channels on an ``H_l × W_l`` grid and the
  channel attention ``a_{l,c}`` (:func:`delta_channel_weights`: summing to 1 per
  layer, so ``C_l a_{l,c}`` averages 1 and each layer counts as a mean over its
  positions). ``channel_weights=None`` is TLlib's ``BehavioralRegularization``
  (no attention): ``Ω' = 1/2 Σ_l ||FM_l - FM0_l||²`` over every element, unnormalised.
  The reference trains with ``alpha = beta = 0.01`` and no weight decay; the
  second term is its ``L2Regularization`` of the new head (``1/2 ||w||²`` over
  every element, bias included), as L2-SP's ``beta`` term. The source maps get
  no gradient.

  Args:
    feature_maps: layer name -> ``[B, H, W, C]`` of the model being trained
      (or a list, matched by position).
    source_feature_maps: the same layers of the frozen source model.
    channel_weights: layer name -> ``[C]`` non-negative weights, or ``None``.
    head_params: pytree of the new parameters (the target head); ``None``: no such term.
    alpha: coefficient of Ω' (TLlib's ``trade_off_backbone``).
    beta: coefficient of the head's L2 (TLlib's ``trade_off_head``).

  Returns:
    A float32 scalar.

  Example:
    >>> fm = {"stage1": jnp.ones((2, 4, 4, 3))}
    >>> delta(feature_maps=fm, source_feature_maps={"stage1": jnp.zeros((2, 4, 4, 3))},
    ...       channel_weights={"stage1": jnp.full(3, 1 / 3)}, alpha=1.0)
    Array(3., dtype=float32)
  """
  return alpha * delta_behavioural(feature_maps=feature_maps, source_feature_maps=source_feature_maps,
                                   channel_weights=channel_weights) + (
      0.0 if head_params is None else 0.5 * beta * _squared_norm(head_params))


def delta_behavioural(
    *,
    feature_maps: Mapping[str, jax.Array] | list[jax.Array],
    source_feature_maps: Mapping[str, jax.Array] | list[jax.Array],
    channel_weights: Mapping[str, jax.Array] | list[jax.Array] | None = None,
) -> jax.Array:
  """DELTA's Ω' alone, unscaled (see :func:`delta` for the formula and its reference).

  Example:
    >>> fm = {"stage1": jnp.ones((2, 4, 4, 3))}
    >>> delta_behavioural(feature_maps=fm, source_feature_maps={"stage1": jnp.zeros((2, 4, 4, 3))})
    Array(48., dtype=float32)
  """
  maps = _as_layer_dict(feature_maps, "feature_maps")
  source = _as_layer_dict(source_feature_maps, "source_feature_maps")
  if not maps:
    raise ValueError("delta: feature_maps is empty")
  if set(maps) != set(source):
    raise ValueError(f"delta: feature_maps has layers {sorted(maps)} but source_feature_maps has "
                     f"{sorted(source)}")
  weights = None if channel_weights is None else _as_layer_dict(channel_weights, "channel_weights")
  if weights is not None and set(weights) != set(maps):
    raise ValueError(f"delta: channel_weights has layers {sorted(weights)} but feature_maps has "
                     f"{sorted(maps)}")
  total = jnp.zeros((), jnp.float32)
  for name in sorted(maps):
    current, reference = maps[name], source[name]
    if current.ndim != 4 or current.shape != reference.shape:
      raise ValueError(f"delta: layer {name!r} must be [B, H, W, C] in both models; got "
                       f"{current.shape} and {reference.shape}")
    _, height, width, channels = current.shape
    reference = jax.lax.stop_gradient(reference)
    diff = current.astype(jnp.float32) - reference.astype(jnp.float32)
    per_channel = jnp.sum(jnp.square(diff), axis=(0, 1, 2))  # [C]: summed over batch and positions
    if weights is None:
      total = total + 0.5 * jnp.sum(per_channel)
    else:
      w = jnp.asarray(weights[name], jnp.float32)
      if w.shape != per_channel.shape:
        raise ValueError(f"delta: channel_weights[{name!r}] must have shape {per_channel.shape} "
                         f"(one per channel), got {w.shape}")
      total = total + 0.5 * channels / (height * width) * jnp.sum(jax.lax.stop_gradient(w) * per_channel)
  return total


def filter_ablation_loss_increase(
    *,
    loss_fn: Callable[[jax.Array], jax.Array],
    num_channels: int,
    chunk_size: int = 0,
) -> jax.Array:
  """How much the loss rises when each channel (filter) of a layer is zeroed.

  DELTA's attention (Sec. 3, the weights W_j) ranks the filters of the source
  model by ``L(z(x, w* \\ j), y) - L(z(x, w*), y)``: the task loss with filter
  ``j`` removed minus the loss of the intact model. ``loss_fn`` maps a ``[C]``
  channel mask (1 = keep, 0 = zeroed) to a scalar loss; the ablations run
  vectorised with :func:`jax.vmap` (so whatever ``loss_fn`` computes before the
  mask is applied is computed once), in chunks of ``chunk_size`` channels
  (``0`` = all at once) to bound memory.

  Args:
    loss_fn: ``mask [C] -> scalar``; jit/vmap-compatible.
    num_channels: ``C``.
    chunk_size: channels per vectorised chunk (``0``: all).

  Returns:
    ``[C]`` float32: ``loss_fn(1 - e_c) - loss_fn(1)`` for every channel ``c``.

  Example:
    >>> x = jnp.array([1.0, 2.0, 3.0])
    >>> filter_ablation_loss_increase(loss_fn=lambda m: -jnp.sum(m * x), num_channels=3)
    Array([1., 2., 3.], dtype=float32)
  """
  if num_channels < 1:
    raise ValueError(f"num_channels must be >= 1, got {num_channels}")
  if chunk_size < 0:
    raise ValueError(f"chunk_size must be >= 0 (0 = all channels at once), got {chunk_size}")
  base = loss_fn(jnp.ones((num_channels,), jnp.float32))
  masks = 1.0 - jnp.eye(num_channels, dtype=jnp.float32)
  if chunk_size == 0 or chunk_size >= num_channels:
    ablated = jax.vmap(loss_fn)(masks)
  else:
    ablated = jax.lax.map(loss_fn, masks, batch_size=chunk_size)
  return (ablated - base).astype(jnp.float32)


def delta_channel_weights(
    *, loss_increase: jax.Array, temperature: float = 5.0, standardize: bool = True
) -> jax.Array:
  """DELTA attention weights of one layer: a softmax over its channels.

  The DELTA paper (Sec. 3) sets ``W_j = softmax_j(loss increase when filter j
  is removed)``, per layer. We keep the softmax (not a division by the sum):
  loss increases can be negative (removing a filter can help), which a
  sum-normalisation cannot turn into weights, and the softmax keeps every
  channel's weight positive so no channel goes unregularised. Raw increases
  are tiny (about 1e-3 nats), which makes a plain softmax uniform; so, as the
  DELTA authors' code does, the increases are first standardised (zero mean,
  unit standard deviation over the layer's channels) and divided by
  ``temperature`` (5 in that code). ``standardize=False, temperature=1`` is
  the paper's formula verbatim. The weights sum to 1 per layer.

  Args:
    loss_increase: ``[C]`` from :func:`filter_ablation_loss_increase`.
    temperature: softmax temperature (> 0).
    standardize: z-score the increases first (a constant layer gives uniform weights).

  Returns:
    ``[C]`` float32, non-negative, summing to 1.

  Example:
    >>> delta_channel_weights(loss_increase=jnp.zeros(4))
    Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
  """
  if loss_increase.ndim != 1:
    raise ValueError(f"loss_increase must be [num_channels], got shape {loss_increase.shape}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  scores = jnp.asarray(loss_increase, jnp.float32)
  if standardize:
    std = jnp.std(scores)
    scores = jnp.where(std > 0, (scores - jnp.mean(scores)) / jnp.where(std > 0, std, 1.0), 0.0)
  return jax.nn.softmax(scores / temperature)


def batch_spectral_shrinkage(*, features: jax.Array, k: int = 1) -> jax.Array:
  """BSS: the sum of the ``k`` smallest squared singular values of the batch features.

  ``L_bss(F) = sum_{i=1}^{k} sigma_{-i}^2`` where ``sigma_{-1} <= sigma_{-2} ...``
  are the smallest singular values of the ``[B, d]`` feature matrix (BSS
  paper, Sec. 4; the coefficient η = 0.001 is the component's weight). The
  features are not centred, as in the paper.

  Args:
    features: ``[B, d]``.
    k: number of smallest singular values; ``1 <= k < min(B, d)``.

  Returns:
    A float32 scalar.

  Example:
    >>> batch_spectral_shrinkage(features=jnp.diag(jnp.array([3.0, 2.0, 1.0])), k=1)
    Array(1., dtype=float32)
  """
  if features.ndim != 2:
    raise ValueError(f"batch_spectral_shrinkage: features must be [batch, dim], got shape "
                     f"{features.shape}")
  num_values = min(features.shape)
  if not 1 <= k < num_values:
    raise ValueError(f"batch_spectral_shrinkage: k must be in [1, min(batch, dim)) = [1, {num_values}) "
                     f"for features of shape {features.shape}; got k={k} (k >= batch size would "
                     "shrink every direction of the batch)")
  singular_values = jnp.linalg.svd(features.astype(jnp.float32), compute_uv=False)  # descending
  return jnp.sum(jnp.square(singular_values[num_values - k:]))


def lwf(
    *,
    logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = LWF_TEMPERATURE,
    scale_by_temperature_squared: bool = False,
) -> jax.Array:
  """Learning without Forgetting's distillation loss (LwF paper, Eq. 2).

  ``-mean_b sum_j softmax(teacher/T)_j · log_softmax(logits/T)_j``: the cross-entropy
  of the model's old-task outputs against the recorded ones, both softened by
  ``T``. For LwF the ``logits`` are the model's ``source_logits`` (the old head)
  and ``teacher_logits`` those of the frozen source model; the teacher gets no
  gradient.

  Not scaled by ``T^2`` by default: LwF's Eq. 2 is unscaled and its λ_o = 1 was
  chosen with it. Hinton et al.'s ``T^2`` factor keeps the gradient's size
  independent of ``T`` when mixing with a hard-label loss;
  ``scale_by_temperature_squared=True`` applies it.

  Args:
    logits: ``[B, K]`` model outputs.
    teacher_logits: ``[B, K]`` frozen source outputs.
    temperature: ``T`` > 0 (LwF: 2; the issue's protocol: 3).
    scale_by_temperature_squared: multiply by ``T^2``.

  Returns:
    A float32 scalar.

  Example:
    >>> lwf(logits=jnp.zeros((1, 4)), teacher_logits=jnp.zeros((1, 4)))
    Array(1.3862944, dtype=float32)
  """
  if logits.ndim != 2 or logits.shape != teacher_logits.shape:
    raise ValueError(f"lwf: logits and teacher_logits must both be [batch, classes]; got "
                     f"{logits.shape} and {teacher_logits.shape}")
  if not temperature > 0:
    raise ValueError(f"lwf: temperature must be > 0, got {temperature}")
  teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature)
  log_student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
  loss = jnp.mean(-jnp.sum(teacher * log_student, axis=-1))
  if scale_by_temperature_squared:
    loss = loss * temperature ** 2
  return loss

"""Regularisation baselines as loss components: L2-SP, DELTA, BSS and LwF.

Each adds one term to the step (``loss/<name>`` in the metrics) and composes
with every other component, e.g. Co-Tuning + BSS + L2-SP:

  losses = {"ce": {"weight": 1.0}, "co_tuning": {"weight": 2.3},
            "bss": {"weight": 0.001, "k": 1}, "l2_sp": {"alpha": 0.01, "beta": 0.01}}

The frozen source model. L2-SP pulls the weights towards the pretrained ones;
DELTA and LwF compare the model being trained with the pretrained one on the
same images inside the same jitted step. They declare ``needs_source``: the
trainer holds one copy of the pretrained variables (the initial ``variables``
minus the new ``head``, :func:`source_variables`) outside the train state, so it
has no optimizer state, no gradient and is never checkpointed (it is rebuilt
from the pretrained weights on resume), and hands it to every method's loss as
``source=``. DELTA and LwF apply it under ``stop_gradient``, in eval mode, so its
BatchNorm statistics never move; they need the model object to run it, which
the trainer hands over in :meth:`prepare` (called before ``init_state``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.core.batches import collect
from ftjax.core.io import save_npz
from ftjax.losses import regularizers as reg
from ftjax.losses import softmax_cross_entropy
from ftjax.methods.base import Method, RunContext, TermOutput, source_variables  # noqa: F401  (doc examples)

def _require_model(component: Any) -> Any:
  if component.model is None:
    raise ValueError(f"{component.name} needs the model to run the frozen source model: call its "
                     "prepare(RunContext(model=..., variables=...)) first "
                     "(or dataclasses.replace(component, model=model))")
  return component.model


# ----------------------------------------------------------------------------- L2-SP


@dataclasses.dataclass(frozen=True)
class L2SP(Method):
  """``alpha/2 ||w_S - w_S^0||^2 + beta/2 ||w_head||^2`` towards the pretrained values.

  ``w_S`` is every parameter except the new ``head`` (the backbone, and the
  kept ``source_head`` when the model has one); ``w_S^0`` their initial
  values, the frozen source's parameters. The literature coefficients are
  ``alpha`` and ``beta`` (both 0.01); ``weight`` scales the whole term and
  stays 1, so ``loss/l2_sp`` is exactly what is added to the loss. L2-SP
  replaces weight decay: set ``optimizer.weight_decay = 0`` with it.

  Example:
    >>> from ftjax import models
    >>> model = models.create_model("resnet_tiny", num_classes=3)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False,
    ...                        outputs=model.all_outputs)
    >>> l2sp = L2SP()
    >>> term = l2sp(outputs={}, batch={}, state=(), params=variables["params"], rng=None,
    ...             source=source_variables(variables))
    >>> float(term.metrics["distance_sq"])   # at the pretrained values: only the head's L2 remains
    0.0
  """
  weight: float = 1.0
  alpha: float = reg.L2_SP_ALPHA
  beta: float = reg.L2_SP_BETA
  name: str = "l2_sp"
  outputs: tuple[str, ...] = ()
  needs_source: bool = True

  def __post_init__(self):
    if min(self.weight, self.alpha, self.beta) < 0:
      raise ValueError(f"l2_sp weight, alpha and beta must be >= 0; got {self.weight}, {self.alpha}, "
                       f"{self.beta}")

  def __call__(self, *, outputs, batch, state, params, rng, source) -> TermOutput:
    del outputs, batch, rng
    anchor = source["params"]
    missing = sorted(set(anchor) - set(params))
    if missing:
      raise ValueError(f"l2_sp: the anchor has parameters {missing} that the model does not")
    anchored = {k: params[k] for k in anchor}
    head = {k: params[k] for k in params if k not in anchor}
    loss = reg.l2_sp(params=anchored, anchor=anchor, head_params=head or None, alpha=self.alpha,
                     beta=self.beta)
    distance = reg.l2_sp(params=anchored, anchor=anchor, alpha=2.0)
    return TermOutput(loss=loss, state=state, metrics={"distance_sq": distance})


# ----------------------------------------------------------------------------- DELTA

# Where a named feature map can be zeroed channel by channel: the module whose
# output it is. EfficientNet's "head_conv" map is relu6(head_bn(head_conv(x)));
# zeroing head_bn's output channel zeroes the map's channel (relu6(0) = 0).
_MAP_MODULE = {"head_conv": "head_bn"}


def feature_map_order(model: Any, *, image_size: int = 224) -> list[tuple[str, tuple[int, ...]]]:
  """``[(name, shape)]`` of the model's ``feature_maps`` in network order (shape only, no compute)."""
  order: list[str] = []

  def init(key):
    out, _ = model.init_with_output(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                                    train=False, outputs=("feature_maps",))
    order.extend(out["feature_maps"])  # the Python dict, in insertion (network) order
    return out["feature_maps"]

  shapes = jax.eval_shape(init, jax.random.key(0))
  return [(name, tuple(shapes[name].shape)) for name in order]


def default_delta_layers(model: Any) -> tuple[str, ...]:
  """The last feature map at each spatial resolution (a ResNet's stage outputs).

  For ResNet-50 these are the four stage outputs that DELTA regularises; for
  EfficientNet-Lite the last block before each stride-2 block plus ``head_conv``.
  """
  maps = feature_map_order(model)
  layers = [name for i, (name, shape) in enumerate(maps)
            if i + 1 == len(maps) or maps[i + 1][1][1:3] != shape[1:3]]
  return tuple(layers)


def apply_with_channel_mask(model: Any, variables: Any, images: jax.Array, *, layer: str,
                            channel_mask: jax.Array) -> jax.Array:
  """Target logits (eval mode) with feature map ``layer`` multiplied by ``channel_mask [C]``."""
  module_name = _MAP_MODULE.get(layer, layer)
  hits = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.name == module_name:
      hits.append(module_name)
      out = out * channel_mask.astype(out.dtype)
    return out

  with nn.intercept_methods(interceptor):
    logits = model.apply(variables, images, train=False, outputs=("logits",))["logits"]
  if len(hits) != 1:
    raise ValueError(f"delta: feature map {layer!r} matched {len(hits)} modules named "
                     f"{module_name!r}; expected exactly one")
  return logits


def layer_loss_increase(model: Any, variables: Any, batch: dict[str, Any], *, layer: str,
                        num_channels: int, chunk_size: int = 0) -> jax.Array:
  """``[C]`` mean cross-entropy increase on ``batch`` when each channel of ``layer`` is zeroed.

  ``batch`` has ``image``, ``label`` and optionally ``mask`` (padding rows count 0).
  """
  images, labels = batch["image"], batch["label"]
  mask = batch.get("mask")
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)

  def loss_fn(channel_mask):
    logits = apply_with_channel_mask(model, variables, images, layer=layer, channel_mask=channel_mask)
    nll = softmax_cross_entropy(logits=logits, labels=labels, reduction="none")
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  return reg.filter_ablation_loss_increase(loss_fn=loss_fn, num_channels=num_channels,
                                           chunk_size=chunk_size)


def _fit_head(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float) -> dict[str, Any]:
  """Softmax regression with bias on the source features (the head DELTA's attention needs)."""
  from ftjax.methods.co_tuning.relationship import fit_softmax_regression

  with_bias = np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)
  fit = fit_softmax_regression(features=with_bias, labels=labels, num_classes=num_classes, l2=l2)
  weights = np.asarray(fit.weights)
  return {"kernel": weights[:, :-1].T.copy(), "bias": weights[:, -1].copy()}


@dataclasses.dataclass(frozen=True)
class Delta(Method):
  """DELTA: attention-weighted distance of feature maps to the frozen source model's.

  The term is TLlib's (the DELTA reference implementation,
  tllib/regularization/delta.py and its example script):
  ``alpha · 1/2 Σ_b Σ_l Σ_c C_l a_{l,c} ||ΔFM_{l,b,c}||² / (H_l W_l) + beta/2 ||w_head||²``
  (:func:`~ftjax.losses.regularizers.delta`), summed over the batch, with
  ``alpha = beta = 0.01`` and trained **without weight decay** (set
  ``optimizer.weight_decay = 0``, as the regularizers config does). ``w_head``
  is every parameter without a pretrained value (the new target head), as in
  L2-SP. ``weight`` scales the whole term and stays 1, so ``loss/delta`` is
  what is added to the loss; ``delta/behavioural`` and ``delta/head_l2`` are
  the two parts before their coefficients.

  Remaining differences from the reference: the regularised maps are block
  outputs (TLlib: the last ``conv3`` of each ResNet stage, before its BatchNorm),
  and the attention averages ``attention_batches`` batches of a head fitted on
  frozen features (TLlib: 10 batches, after 10 epochs of training a classifier).

  Attributes:
    weight: multiplier of the whole term (1).
    alpha: coefficient of the behavioural term (TLlib ``trade_off_backbone`` 0.01).
    beta: coefficient of the new head's L2 (TLlib ``trade_off_head`` 0.01).
    layers: feature-map names to regularise; ``()`` = :func:`default_delta_layers`.
    attention: weigh channels by their importance to the target task
      (:meth:`prepare` computes it); False is TLlib's unweighted, unnormalised
      ``1/2 ||ΔFM||²``.
    attention_batches: training batches (eval transform) the importance is
      averaged over (the DELTA code: 4).
    attention_temperature: softmax temperature of :func:`delta_channel_weights`.
    attention_chunk: channels ablated per vectorised chunk (memory bound).
    head_l2: L2 strength of the target head fitted on the source features
      before ranking channels (the DELTA code first trains the head alone).
    model: the model (set by :meth:`prepare`).
    channel_weights: ``{layer: [C]}`` (set by :meth:`prepare`, or pass them).

  Example:
    >>> from ftjax import models
    >>> model = models.create_model("resnet_tiny", num_classes=3)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False,
    ...                        outputs=model.all_outputs)
    >>> d = Delta(attention=False).prepare(RunContext(model=model, variables=variables))
    >>> d.layers, d.init_state(variables=variables, rng=None)
    (('stage1_block0', 'stage2_block0'), {})
  """
  weight: float = 1.0
  alpha: float = reg.DELTA_ALPHA
  beta: float = reg.DELTA_BETA
  layers: tuple[str, ...] = ()
  attention: bool = True
  attention_batches: int = 4
  attention_temperature: float = 5.0
  attention_chunk: int = 64
  head_l2: float = 1e-3
  model: Any = dataclasses.field(default=None, compare=False, repr=False)
  channel_weights: Any = dataclasses.field(default=None, compare=False, repr=False)
  name: str = "delta"
  outputs: tuple[str, ...] = ("feature_maps",)
  needs_source: bool = True

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    if min(self.weight, self.alpha, self.beta) < 0:
      raise ValueError(f"delta weight, alpha and beta must be >= 0; got {self.weight}, {self.alpha}, "
                       f"{self.beta}")
    if self.attention_batches < 1 or self.attention_chunk < 0:
      raise ValueError(f"delta attention_batches must be >= 1 and attention_chunk >= 0; got "
                       f"{self.attention_batches}, {self.attention_chunk}")
    if not self.attention_temperature > 0:
      raise ValueError(f"delta attention_temperature must be > 0, got {self.attention_temperature}")

  def resolved_layers(self, model: Any) -> tuple[str, ...]:
    available = [name for name, _ in feature_map_order(model)]
    layers = self.layers or default_delta_layers(model)
    unknown = [name for name in layers if name not in available]
    if unknown:
      raise ValueError(f"delta: unknown feature maps {unknown}; the model has {available}")
    return layers

  def prepare(self, context: RunContext) -> "Delta":
    """A copy holding the model, its layers and (with ``attention``) the channel weights.

    Fits a softmax-regression head on the source model's pooled features of the
    train split (eval transform), then averages each channel's loss increase
    over ``attention_batches`` training batches of the run's ``batch_size`` and
    turns it into weights with :func:`~ftjax.losses.regularizers.delta_channel_weights`.
    """
    model = context.model
    layers = self.resolved_layers(model)
    prepared = dataclasses.replace(self, model=model, layers=layers)
    if not self.attention or self.channel_weights is not None:
      return prepared
    weights = compute_channel_weights(
        model=model, variables=context.variables, dataset=context.dataset, layers=layers,
        batch_size=int(context.batch_size), eval_batch_size=int(context.eval_batch_size),
        num_batches=self.attention_batches, temperature=self.attention_temperature,
        chunk_size=self.attention_chunk, head_l2=self.head_l2)
    return dataclasses.replace(prepared, channel_weights=weights)

  def write_artifacts(self, context: RunContext) -> list[str]:
    """Saves the channel weights used by the run (``delta_channel_weights.npz``)."""
    workdir = context.workdir
    if self.channel_weights is None:
      return []
    path = save_npz(os.path.join(workdir, "delta_channel_weights.npz"),
                    **{k: np.asarray(v) for k, v in self.channel_weights.items()})
    return [path]

  def init_state(self, *, variables: Any, rng: jax.Array) -> dict[str, Any]:
    del rng
    model = _require_model(self)
    layers = self.layers or default_delta_layers(model)
    state = {}
    if self.attention:
      if self.channel_weights is None:
        raise ValueError("delta with attention=True has no channel weights: call its prepare(...) "
                         "first, pass channel_weights=, or use attention=False")
      if set(self.channel_weights) != set(layers):
        raise ValueError(f"delta: channel_weights has layers {sorted(self.channel_weights)} but the "
                         f"regularised layers are {sorted(layers)}")
      state["channel_weights"] = {k: jnp.asarray(self.channel_weights[k], jnp.float32) for k in layers}
    return state

  def __call__(self, *, outputs, batch, state, params, rng, source) -> TermOutput:
    del rng
    model = _require_model(self)
    layers = self.layers or default_delta_layers(model)
    source = jax.lax.stop_gradient(source)
    source_maps = model.apply(source, batch["image"], train=False, outputs=("feature_maps",))
    source_maps = jax.lax.stop_gradient(source_maps["feature_maps"])
    head = {k: params[k] for k in params if k not in source["params"]}
    maps = dict(feature_maps={k: outputs["feature_maps"][k] for k in layers},
                source_feature_maps={k: source_maps[k] for k in layers},
                channel_weights=state.get("channel_weights"))
    loss = reg.delta(**maps, head_params=head or None, alpha=self.alpha, beta=self.beta)
    # The parts before their coefficients (XLA shares the computation with the loss).
    metrics = {"behavioural": reg.delta_behavioural(**maps),
               "head_l2": 0.5 * sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(head)),
                                    jnp.zeros((), jnp.float32))}
    return TermOutput(loss=loss, state=state, metrics=metrics)


def compute_channel_weights(*, model: Any, variables: Any, dataset: Any, layers: tuple[str, ...],
                            batch_size: int, eval_batch_size: int, num_batches: int = 4,
                            temperature: float = 5.0, chunk_size: int = 64,
                            head_l2: float = 1e-3) -> dict[str, np.ndarray]:
  """DELTA's per-layer channel weights from the source model and the target train split.

  1. Pooled source features of the train split (eval mode, eval transform) and a
     softmax-regression head fitted on them: the source model's own head on the
     target task, as the DELTA code trains its classifier first.
  2. For each layer and channel, the cross-entropy increase when that channel
     is zeroed, averaged over the first ``num_batches`` batches of ``batch_size``.
  3. :func:`~ftjax.losses.regularizers.delta_channel_weights` per layer.

  Single-process only (each process would rank channels on its own shard).
  """
  if jax.process_count() > 1:
    raise NotImplementedError("delta channel attention runs in one process; pass channel_weights")
  features_fn = jax.jit(lambda v, x: model.apply(v, x, train=False, outputs=("features",))["features"])
  out, labels = collect(lambda b, i: {"features": features_fn(variables, b["image"])},
                        dataset.eval_batches("train", batch_size=eval_batch_size))
  features, labels = out["features"], labels.astype(np.int32)
  head = _fit_head(features, labels, dataset.num_classes, head_l2)
  probe = {**variables, "params": {**variables["params"], "head": head}}
  logging.info("delta: fitted a head on %d source features for channel attention", len(features))

  shapes = dict(feature_map_order(model))
  fns = {layer: jax.jit(lambda v, b, layer=layer: layer_loss_increase(
      model, v, b, layer=layer, num_channels=shapes[layer][-1], chunk_size=chunk_size))
      for layer in layers}
  totals = {layer: np.zeros(shapes[layer][-1], np.float64) for layer in layers}
  count = 0.0
  for i, b in enumerate(dataset.eval_batches("train", batch_size=batch_size)):
    if i >= num_batches:
      break
    n = float(np.sum(b["mask"]))
    if n == 0:
      continue
    batch = {"image": b["image"], "label": b["label"], "mask": b["mask"]}
    for layer in layers:
      totals[layer] += n * np.asarray(fns[layer](probe, batch), np.float64)
    count += n
  if count == 0:
    raise ValueError(f"delta: the train split of {dataset.name} is empty")
  weights = {}
  for layer in layers:
    increase = jnp.asarray(totals[layer] / count, jnp.float32)
    weights[layer] = np.asarray(reg.delta_channel_weights(loss_increase=increase,
                                                          temperature=temperature))
    logging.info("delta: %s: loss increase per channel in [%.4g, %.4g], weights in [%.4g, %.4g]",
                 layer, float(increase.min()), float(increase.max()), weights[layer].min(),
                 weights[layer].max())
  return weights


# ----------------------------------------------------------------------------- BSS


@dataclasses.dataclass(frozen=True)
class BatchSpectralShrinkage(Method):
  """BSS on the pooled ``features``: the ``k`` smallest squared singular values.

  Example:
    >>> bss = BatchSpectralShrinkage()
    >>> features = jnp.diag(jnp.array([3.0, 2.0, 0.5]))   # singular values 3, 2, 0.5
    >>> term = bss(outputs={"features": features}, batch={}, state=(), params=None, rng=None)
    >>> round(float(term.loss), 4)
    0.25
  """
  weight: float = reg.BSS_WEIGHT
  k: int = 1
  name: str = "bss"
  outputs: tuple[str, ...] = ("features",)

  def __post_init__(self):
    if self.weight < 0 or self.k < 1:
      raise ValueError(f"bss weight must be >= 0 and k >= 1; got {self.weight}, {self.k}")

  def __call__(self, *, outputs, batch, state, params, rng, source=None) -> TermOutput:
    del batch, params, rng, source
    loss = reg.batch_spectral_shrinkage(features=outputs["features"], k=self.k)
    return TermOutput(loss=loss, state=state)


# ----------------------------------------------------------------------------- LwF


@dataclasses.dataclass(frozen=True)
class LwF(Method):
  """Learning without Forgetting: the old head's outputs distilled from the frozen source model.

  The model's ``source_logits`` (the kept pretrained head, trained on with the
  backbone) against those of the frozen source model on the same images, both
  softened by ``temperature``. LwF's λ_o = 1 is the weight.

  Example:
    >>> from ftjax import models
    >>> model = models.create_model("resnet_tiny", num_classes=3, keep_source_head=True, num_source_classes=5)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False,
    ...                        outputs=model.all_outputs)
    >>> lwf = LwF().prepare(RunContext(model=model, variables=variables))
    >>> batch = {"image": jnp.zeros((2, 32, 32, 3))}
    >>> outputs = model.apply(variables, batch["image"], train=False, outputs=("source_logits",))
    >>> term = lwf(outputs=outputs, batch=batch, state=(), params=None, rng=None,
    ...            source=source_variables(variables))
    >>> bool(term.loss > 0)   # the soft cross-entropy of identical predictions is their entropy
    True
  """
  weight: float = 1.0
  temperature: float = reg.LWF_TEMPERATURE
  scale_by_temperature_squared: bool = False
  model: Any = dataclasses.field(default=None, compare=False, repr=False)
  name: str = "lwf"
  outputs: tuple[str, ...] = ("source_logits",)
  needs_source: bool = True

  def __post_init__(self):
    if self.weight < 0 or not self.temperature > 0:
      raise ValueError(f"lwf weight must be >= 0 and temperature > 0; got {self.weight}, "
                       f"{self.temperature}")

  def prepare(self, context: RunContext) -> "LwF":
    if not getattr(context.model, "keep_source_head", False):
      raise ValueError("lwf needs a model built with keep_source_head=True (the old task's head)")
    return dataclasses.replace(self, model=context.model)

  def init_state(self, *, variables: Any, rng: jax.Array) -> tuple:
    del rng
    _require_model(self)
    if "source_head" not in variables["params"]:
      raise ValueError("lwf needs a model built with keep_source_head=True "
                       "(no 'source_head' parameters found)")
    return ()

  def __call__(self, *, outputs, batch, state, params, rng, source) -> TermOutput:
    del params, rng
    model = _require_model(self)
    source = jax.lax.stop_gradient(source)
    teacher = model.apply(source, batch["image"], train=False, outputs=("source_logits",))
    loss = reg.lwf(logits=outputs["source_logits"], teacher_logits=teacher["source_logits"],
                   temperature=self.temperature,
                   scale_by_temperature_squared=self.scale_by_temperature_squared)
    return TermOutput(loss=loss, state=state)

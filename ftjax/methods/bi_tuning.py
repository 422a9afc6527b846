"""Bi-Tuning (Zhong et al.): contrastive cross-entropy and categorical contrastive
losses against per-class queues of momentum-encoder keys.

Loss (Eq. 5): ``CE + L_CCE + L_CCL``. CE is the ``ce`` component; this component
adds ``cce_weight * L_CCE + ccl_weight * L_CCL`` (Eq. 3 and Eq. 4), so every row of
the paper's Table 5 is a config::

  losses = {"ce": {"weight": 1.0}, "bi_tuning": {"weight": 1.0}}             # CE + CCE + CCL
  losses = {"ce": {"weight": 1.0}, "bi_tuning": {"ccl_weight": 0.0}}         # CE + CCE
  losses = {"ce": {"weight": 1.0}, "bi_tuning": {"cce_weight": 0.0}}         # CE + CCL
  losses = {"bi_tuning": {"weight": 1.0}}                                    # CCE + CCL

What happens in one (jitted) step, inside the differentiated loss function:

1. The key encoder (a momentum copy of the backbone and projector, parameters
   and BatchNorm statistics in the component's state) is updated *first*:
   ``key ← m · key + (1 - m) · stop_gradient(params)``, m = 0.999.
2. The updated key encoder embeds the second augmented view ``batch["image_key"]``
   into ``[h_k, 1]`` (normalised) and ``z_k``; keys carry no gradient.
3. L_CCE and L_CCL of the queries (this step's forward of ``batch["image"]``)
   against the queues ``queue_h [C, K, d+1]`` and ``queue_z [C, K, P]``, of which
   only the first ``count[c]`` entries of class c are real keys.
4. This batch's keys are written into the queues by label, vectorised (one
   scatter; slot = class pointer + rank of the example among its class in the
   batch, mod K), and the per-class pointers and counts advance.

The method needs the model to run the key encoder, which ``init_state`` cannot
see: the trainer calls :meth:`BiTuning.prepare` once before ``init_state``. It
also declares ``views = 2`` so the trainer asks the data pipeline for two views,
``projection_dim`` (:meth:`BiTuning.model_options`) so it builds the model with a
projector, and a parameter rule (:meth:`BiTuning.param_rules`) that puts the
projector in the ``backbone`` group: it trains at the backbone's learning rate,
as in the reference (TLlib's ``tllib/regularization/bi_tuning.py``,
``Classifier.get_parameters``: the projector's lr is the backbone's, 0.1x the
head's when fine-tuning, 1x from scratch), not at the new head's 10x. Per
baseline: ``finetune`` and ``last_k``: the ``backbone`` group (1x, the
backbone's weight decay); ``scratch``: a ``backbone`` group with the settings
of ``all`` (everything at 1x, like TLlib with ``finetune=False``);
``linear_probe``: the backbone is frozen, and the (random) projector still
trains in a ``backbone`` group at 1x (the learning rate the backbone has when
fine-tuning); it does not change the classifier, but a frozen random projector
would make CCL a constant.

How long the key encoder remembers its initialisation. The update
``key_t = m key_{t-1} + (1 - m) query_t`` gives
``key_t = m^t key_0 + (1 - m) Σ_s m^(t-s) query_s``: the initialisation keeps a
share ``m^t``. At m = 0.999 that is 37% after 1,000 steps, 5% after ~3,000 and
1% after ~4,600. The backbone's initialisation is the pretrained weights the
queries start from too, so there it only means the keys lag the queries by
about ``1 / (1 - m)`` = 1,000 steps; the projector's is a random matrix, so
its keys are mostly random for the first ~1,000 steps. The Fashion-MNIST runs
of ``experiments/configs/bi_tuning.py`` are short: at 5% (2,400 train images,
batch 32, 10 epochs) they have 750 steps, after which the key encoder still
holds 0.999^750 = 47% of its initialisation (at the 25% default: 3,750 steps,
2.3%). In such runs the keys (and the queues) come from an encoder much closer
to the pretrained backbone and the random projector than the queries are; the
paper's runs (Table 1) are long enough for this not to matter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.losses.bi_tuning import (categorical_contrastive_loss, contrastive_cross_entropy,
                                    features_with_bias)
from ftjax.methods.base import Method, RunContext, TermOutput

# Parameter collections of the key encoder: everything the keys depend on.
KEY_ENCODER_MODULES = ("backbone", "projector")
# The parameter group of the projector: the backbone's (see the module docstring).
PROJECTOR_GROUP = "backbone"


def enqueue_by_label(
    *,
    queues: Sequence[jax.Array],
    keys: Sequence[jax.Array],
    labels: jax.Array,
    pointers: jax.Array,
    counts: jax.Array,
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
  """Writes a batch of keys into per-class ring buffers, vectorised by label.

  Equivalent to the sequential loop ``for i: c = labels[i]; queue[c, ptr[c]] =
  keys[i]; ptr[c] = (ptr[c] + 1) % K`` (later examples overwrite earlier ones when a
  class has more than K examples in the batch), but as one scatter per queue: the
  example of within-class rank r goes to slot ``(ptr[c] + r) % K``, and only each
  class's last K examples are written.

  Args:
    queues: queues ``[C, K, D_i]`` (several share the same pointers).
    keys: matching ``[B, D_i]`` keys.
    labels: int ``[B]``.
    pointers: int32 ``[C]`` next slot of each class.
    counts: int32 ``[C]`` real keys per class (saturates at K).

  Returns:
    ``(new_queues, new_pointers, new_counts)``.

  Example:
    >>> (q,), ptr, n = enqueue_by_label(queues=[jnp.zeros((2, 3, 1))], keys=[jnp.ones((2, 1))],
    ...                                 labels=jnp.array([1, 1]), pointers=jnp.zeros(2, jnp.int32),
    ...                                 counts=jnp.zeros(2, jnp.int32))
    >>> ptr.tolist(), n.tolist()
    ([0, 2], [0, 2])
  """
  if len(queues) != len(keys) or not queues:
    raise ValueError(f"need one key array per queue; got {len(queues)} queues and {len(keys)} keys")
  num_classes, keys_per_class = queues[0].shape[:2]
  batch = labels.shape[0]
  if pointers.shape != (num_classes,) or counts.shape != (num_classes,):
    raise ValueError(f"pointers and counts must be [{num_classes}], got {pointers.shape} and {counts.shape}")
  for queue, key in zip(queues, keys):
    if queue.shape[:2] != (num_classes, keys_per_class) or key.shape != (batch, queue.shape[2]):
      raise ValueError(f"queue {queue.shape} and keys {key.shape} do not match "
                       f"[{num_classes}, {keys_per_class}, D] / [{batch}, D]")
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)         # [B, C]
  rank = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0) - one_hot, labels[:, None], axis=1)[:, 0]
  per_class = jnp.sum(one_hot, axis=0)                                  # [C]
  # Only the last K examples of a class survive the sequential loop's overwrites.
  keep = rank >= per_class[labels] - keys_per_class
  slot = (pointers[labels] + rank) % keys_per_class
  row = jnp.where(keep, labels, num_classes)                            # out of range: dropped
  new_queues = [queue.at[row, slot].set(jax.lax.stop_gradient(key).astype(queue.dtype), mode="drop")
                for queue, key in zip(queues, keys)]
  new_pointers = ((pointers + per_class) % keys_per_class).astype(pointers.dtype)
  new_counts = jnp.minimum(counts + per_class, keys_per_class).astype(counts.dtype)
  return new_queues, new_pointers, new_counts


def momentum_update(*, key_params: Any, params: Any, momentum: float) -> Any:
  """``m · key + (1 - m) · stop_gradient(param)`` leaf by leaf (MoCo's key encoder update).

  Example:
    >>> momentum_update(key_params={"w": jnp.ones(2)}, params={"w": jnp.zeros(2)}, momentum=0.9)
    {'w': Array([0.9, 0.9], dtype=float32)}
  """
  return jax.tree.map(lambda k, p: momentum * k + (1.0 - momentum) * jax.lax.stop_gradient(p),
                      key_params, params)


def queue_nbytes(*, num_classes: int, keys_per_class: int, feature_dim: int, projection_dim: int = 128,
                 dtype: Any = np.float32) -> int:
  """Bytes of the two queues plus pointers and counts (``[C, K, d+1]``, ``[C, K, P]``, ``2 x [C]``).

  Example:
    >>> queue_nbytes(num_classes=200, keys_per_class=32, feature_dim=1280)
    36072000
  """
  item = np.dtype(dtype).itemsize
  return (num_classes * keys_per_class * (feature_dim + 1 + projection_dim) * item
          + 2 * num_classes * np.dtype(np.int32).itemsize)


@dataclasses.dataclass(frozen=True)
class BiTuning(Method):
  """Bi-Tuning's CCE + CCL terms with a momentum key encoder and per-class queues.

  Attributes:
    weight: multiplier of the whole term in the step's sum.
    cce_weight: weight of L_CCE (Eq. 3) inside the term.
    ccl_weight: weight of L_CCL (Eq. 4) inside the term.
    keys_per_class: K, queue length per class (paper: 8/16/24/32 by data scale;
      authors' code: 40).
    temperature: τ of both losses (0.07).
    momentum: m of the key encoder (0.999).
    projection_dim: width of the projector (128); the trainer builds the model with it.
    prototype_gradient: let L_CCE train the head (default False: DESIGN.md and the
      authors' code detach the prototypes; use True for CCE without CE).
    key_bn_mode: BatchNorm of the key encoder, ``"train"`` or ``"eval"``; ``""`` =
      the run's ``bn_mode`` (set by :meth:`prepare`; ``"train"`` if never prepared).
    model: the run's model (set by :meth:`prepare`).

  Example:
    >>> from ftjax import models
    >>> model = models.create_model("resnet_tiny", num_classes=3, projection_dim=8)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False,
    ...                        outputs=model.all_outputs)
    >>> bt = BiTuning(keys_per_class=4, projection_dim=8).prepare(RunContext(model=model, variables=variables))
    >>> state = bt.init_state(variables=variables, rng=jax.random.key(0))
    >>> images = jnp.zeros((2, 32, 32, 3))
    >>> outputs = model.apply(variables, images, train=False, outputs=("features", "projection"))
    >>> batch = {"image": images, "image_key": images, "label": jnp.array([0, 2])}
    >>> term = bt(outputs=outputs, batch=batch, state=state, params=variables["params"], rng=None,
    ...           source=None)
    >>> sorted(term.metrics), term.state["count"].tolist()
    (['cce', 'ccl', 'queue_fill'], [1, 0, 1])
  """
  weight: float = 1.0
  cce_weight: float = 1.0
  ccl_weight: float = 1.0
  keys_per_class: int = 16
  temperature: float = 0.07
  momentum: float = 0.999
  projection_dim: int = 128
  prototype_gradient: bool = False
  key_bn_mode: str = ""
  model: Any = dataclasses.field(default=None, compare=False, repr=False)
  name: str = "bi_tuning"
  outputs: tuple[str, ...] = ("features", "projection")
  views: int = 2

  def __post_init__(self):
    for field in ("weight", "cce_weight", "ccl_weight"):
      if getattr(self, field) < 0:
        raise ValueError(f"bi_tuning {field} must be >= 0, got {getattr(self, field)}")
    if int(self.keys_per_class) != self.keys_per_class or self.keys_per_class < 1:
      raise ValueError(f"bi_tuning keys_per_class must be a positive integer, got {self.keys_per_class}")
    if not self.temperature > 0:
      raise ValueError(f"bi_tuning temperature must be > 0, got {self.temperature}")
    if not 0.0 <= self.momentum <= 1.0:
      raise ValueError(f"bi_tuning momentum must be in [0, 1], got {self.momentum}")
    if int(self.projection_dim) != self.projection_dim or self.projection_dim < 1:
      raise ValueError(f"bi_tuning projection_dim must be a positive integer, got {self.projection_dim}")
    if self.key_bn_mode not in ("", "train", "eval"):
      raise ValueError(f"bi_tuning key_bn_mode must be 'train', 'eval' or '' (the run's), "
                       f"got {self.key_bn_mode!r}")
    if self.views != 2:
      raise ValueError(f"bi_tuning needs two views of each image, got views={self.views}")

  def model_options(self) -> dict[str, Any]:
    return {"projection_dim": int(self.projection_dim)}

  def param_rules(self, *, variables: Any) -> list[tuple[str, str]]:
    """The projector trains in the ``backbone`` group (the reference's projector lr is the backbone's)."""
    del variables
    return [("projector/.*", PROJECTOR_GROUP)]

  def param_groups(self) -> dict[str, dict[str, Any]]:
    """The ``backbone`` group at the base learning rate (as the baselines define it)."""
    return {PROJECTOR_GROUP: {}}

  def prepare(self, context: RunContext) -> "BiTuning":
    """A copy holding the model (for the key encoder) and the key encoder's BatchNorm mode.

    Reads the context's ``model`` (built with ``projection_dim``), ``variables``
    (checked for a ``projector``) and ``bn_mode`` (the key encoder's mode when
    ``key_bn_mode`` is ``""``).
    """
    self._check_variables(context.variables)
    return dataclasses.replace(self, model=context.model, key_bn_mode=self.key_bn_mode or context.bn_mode)

  def _check_variables(self, variables: Any) -> None:
    params = variables["params"]
    if "projector" not in params:
      raise ValueError("bi_tuning needs a model with a projector: build it with "
                       f"projection_dim={self.projection_dim} (no 'projector' parameters found)")
    width = int(params["projector"]["kernel"].shape[1])
    if width != self.projection_dim:
      raise ValueError(f"bi_tuning projection_dim={self.projection_dim} but the model's projector "
                       f"has {width} outputs")
    if "head" not in params:
      raise ValueError("bi_tuning needs the target 'head' parameters (its prototypes)")

  def init_state(self, *, variables: Any, rng: jax.Array) -> dict[str, Any]:
    """Key encoder = a copy of the initial backbone + projector; empty queues."""
    del rng
    self._check_variables(variables)
    params = variables["params"]
    feature_dim, num_classes = (int(n) for n in params["head"]["kernel"].shape)
    k = int(self.keys_per_class)
    copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
    return {
        "key_params": copy({name: params[name] for name in KEY_ENCODER_MODULES}),
        "key_batch_stats": copy(dict(variables.get("batch_stats", {}))),
        "queue_h": jnp.zeros((num_classes, k, feature_dim + 1), jnp.float32),
        "queue_z": jnp.zeros((num_classes, k, self.projection_dim), jnp.float32),
        "pointer": jnp.zeros((num_classes,), jnp.int32),
        "count": jnp.zeros((num_classes,), jnp.int32),
    }

  def keys(self, *, state: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    """The key encoder's ``(normalise([h_k, 1]), z_k, new batch_stats)`` of ``images`` (no gradient)."""
    if self.model is None:
      raise ValueError("bi_tuning has no model: call its prepare(RunContext(model=..., "
                       "variables=...)) first")
    variables = {"params": state["key_params"]}
    batch_stats = state["key_batch_stats"]
    if batch_stats:
      variables["batch_stats"] = batch_stats
    if batch_stats and self.key_bn_mode in ("", "train"):
      out, new_vars = self.model.apply(variables, images, train=True, outputs=("features", "projection"),
                                       mutable=["batch_stats"])
      batch_stats = new_vars["batch_stats"]
    else:
      out = self.model.apply(variables, images, train=False, outputs=("features", "projection"))
    h_k = jax.lax.stop_gradient(features_with_bias(out["features"]))
    z_k = jax.lax.stop_gradient(out["projection"].astype(jnp.float32))
    return h_k, z_k, jax.lax.stop_gradient(batch_stats)

  def __call__(self, *, outputs, batch, state, params, rng, source=None) -> TermOutput:
    del rng, source
    if "image_key" not in batch:
      raise ValueError("bi_tuning needs a second view batch['image_key']: build the train batches "
                       "with views=2")
    labels = batch["label"]
    # 1. Momentum update first, from the current (pre-update) query parameters.
    key_params = momentum_update(key_params=state["key_params"],
                                 params={name: params[name] for name in KEY_ENCODER_MODULES},
                                 momentum=self.momentum)
    state = dict(state, key_params=key_params)
    # 2. Keys of the second view with the updated key encoder.
    h_k, z_k, key_batch_stats = self.keys(state=state, images=batch["image_key"])
    # 3. Losses against the queues as they were before this batch.
    common = dict(labels=labels, queue_counts=state["count"], temperature=self.temperature)
    cce = contrastive_cross_entropy(features=outputs["features"], head_kernel=params["head"]["kernel"],
                                    head_bias=params["head"]["bias"], queue=state["queue_h"],
                                    prototype_gradient=self.prototype_gradient, **common)
    ccl = categorical_contrastive_loss(queries=outputs["projection"], keys=z_k, queue=state["queue_z"],
                                       **common)
    # 4. Enqueue this batch's keys by label.
    (queue_h, queue_z), pointer, count = enqueue_by_label(
        queues=(state["queue_h"], state["queue_z"]), keys=(h_k, z_k), labels=labels,
        pointers=state["pointer"], counts=state["count"])
    new_state = {"key_params": key_params, "key_batch_stats": key_batch_stats, "queue_h": queue_h,
                 "queue_z": queue_z, "pointer": pointer, "count": count}
    loss = self.cce_weight * cce + self.ccl_weight * ccl
    metrics = {"cce": cce, "ccl": ccl,
               "queue_fill": jnp.mean(count.astype(jnp.float32)) / self.keys_per_class}
    return TermOutput(loss=loss, state=new_state, metrics=metrics)

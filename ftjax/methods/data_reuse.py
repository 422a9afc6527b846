"""Pre-training data reuse (papers/uot-data-reuse.txt, Sec. 3.3): the pool term.

Each training step forwards one mixed batch, the target batch followed by an
equal-size batch of selected pre-training ("pool") data, so BatchNorm sees both
as in the paper. The method loads the pool (:meth:`DataReuse.load_data`), gives
the trainer a stream of pool batches (:meth:`DataReuse.extra_batches`) and mixes
each with the target batch (:meth:`DataReuse.mix_batch`); the mixed batch's keys are

* ``image``: ``[n + v·m, S, S, 3]``, target rows first, then the pool rows
  (``v = 1``; for Eq. 7 ``v = 2``: the weak views, then the strong views);
* ``label``: ``[n]`` target labels (only the target rows);
* ``pool_label``: ``[m]`` pool labels (Eq. 6);
* ``pool_mask``: int ``[n + v·m]``: 0 target row, 1 pool row (weak view), 2 strong view.

The train step hands every other method the target rows only (the base
``ce`` term stays the target CE of Eq. 6), and this method — it sets
``reads_extra_rows`` — all rows. Config (``config.reuse.enabled = True`` is a
shorthand that adds it from ``config.reuse``; λ is the method's ``weight``)::

  losses = {"ce": {"weight": 1.0},
            "data_reuse": {"weight": 0.3, "mode": "labelled", "classes": (0, 1, 4, 5, 8)}}

* ``mode="labelled"`` (Eq. 6): a second head ``pool_head`` (``[D, C_pool]``,
  trained like the target head) on the pooled features of the pool rows,
  cross-entropy against ``pool_label``. The head is added to the model's
  parameters by :meth:`DataReuse.wrap_model`.
* ``mode="pseudo_label"`` (Eq. 7): no second head; the target head's softmax on
  the weak view is the soft label of the strong view. Weak view: a mild random
  resized crop (``reuse.weak_crop_scale``, default area 0.8-1) and flip; strong
  view: the dataset's training crop (``dataset.crop_scale``) and flip, drawn
  independently. No colour or RandAugment-style strong augmentation is implemented.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.core.errors import check_labels
from ftjax.losses import pseudo_label_loss, softmax_cross_entropy
from ftjax.methods.base import Method, RunContext, TermOutput
from ftjax.models.layers import head_kernel_init

MODES = ("labelled", "pseudo_label")
POOL_HEAD = "pool_head"


def pool_head_logits(*, features: jax.Array, params: Any) -> jax.Array:
  """``features @ pool_head.kernel + pool_head.bias``: the pre-training-classes head of Eq. 6."""
  head = params[POOL_HEAD]
  return features.astype(jnp.float32) @ head["kernel"] + head["bias"]


@dataclasses.dataclass(frozen=True)
class DataReuse(Method):
  """The λ-weighted pool term of Eq. 6 (labelled pool) or Eq. 7 (unlabelled pool).

  Attributes:
    weight: λ (paper grid {1, 0.3, 0.1}).
    mode: ``"labelled"`` (Eq. 6) or ``"pseudo_label"`` (Eq. 7).
    dataset: TFDS name of the pool (``""``: the run's dataset).
    classes: pool class subset (TFDS label ids; ``()``: all).
    indices_path: ``.npy`` of pool train example indices (the selected units; ``""``: all).
    sampling_rate: percent of the pool's train part, per class.
    weak_crop_scale: Eq. 7: crop area range of the weak view (strong: the run's crop).
    num_pool_classes: width of ``pool_head`` (set by :meth:`load_data` from the pool).
    seed: seed of the ``pool_head`` initialisation (set by :meth:`load_data`).
    pool: the pool dataset (set by :meth:`load_data`).

  Example:
    >>> from ftjax import models
    >>> model = models.create_model("resnet_tiny", num_classes=3)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False,
    ...                        outputs=model.all_outputs)
    >>> reuse = DataReuse(weight=0.3, num_pool_classes=5)
    >>> model, variables = reuse.wrap_model(model=model, variables=variables, rng=jax.random.key(0))
    >>> target = {"image": np.zeros((2, 32, 32, 3), np.float32), "label": np.array([0, 1])}
    >>> pool = {"image": np.ones((2, 32, 32, 3), np.float32), "label": np.array([4, 3])}
    >>> batch = mixed_batch(target, pool)
    >>> outputs = model.apply(variables, batch["image"], train=False, outputs=("features",))
    >>> term = reuse(outputs=outputs, batch=batch, state=(), params=variables["params"], rng=None,
    ...              source=None)
    >>> batch["pool_mask"].tolist(), sorted(term.metrics)
    ([0, 0, 1, 1], ['pool_accuracy'])
  """
  weight: float = 0.3
  mode: str = "labelled"
  dataset: str = ""
  classes: tuple[int, ...] = ()
  indices_path: str = ""
  sampling_rate: float = 100.0
  weak_crop_scale: tuple[float, float] = (0.8, 1.0)
  num_pool_classes: int = 0
  seed: int = 0
  pool: Any = dataclasses.field(default=None, compare=False, repr=False)
  name: str = "data_reuse"
  reads_extra_rows: bool = True
  new_heads: tuple[str, ...] = (POOL_HEAD,)

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"data_reuse mode must be one of {MODES}, got {self.mode!r}")
    if not self.weight >= 0:
      raise ValueError(f"data_reuse weight must be >= 0, got {self.weight}")
    if self.num_pool_classes < 0:
      raise ValueError(f"data_reuse num_pool_classes must be >= 0, got {self.num_pool_classes}")

  @property
  def outputs(self) -> tuple[str, ...]:
    return ("features",) if self.mode == "labelled" else ("logits",)

  @property
  def pool_views(self) -> int:
    """Views of each pool image the batch must hold (2 for the weak/strong pair of Eq. 7)."""
    return 2 if self.mode == "pseudo_label" else 1

  def load_data(self, *, load_dataset, seed: int) -> "DataReuse":
    """A copy holding the pool dataset, its number of classes and the run's seed."""
    import jax
    if jax.process_count() > 1:
      raise ValueError("data_reuse (pre-training data reuse) supports one process only")
    indices = None
    if self.indices_path:
      if not os.path.exists(self.indices_path):
        raise ValueError(f"data_reuse indices_path={self.indices_path!r} does not exist")
      indices = np.load(self.indices_path)
    pool = load_dataset(self.dataset, sampling_rate=self.sampling_rate,
                        classes=tuple(self.classes) or None, train_indices=indices)
    logging.info("reuse: %s pool %s, %d train images, %d classes", self.mode, pool.name,
                 pool.num_examples["train"], pool.num_classes)
    return dataclasses.replace(self, pool=pool, num_pool_classes=pool.num_classes, seed=int(seed))

  def extra_batches(self, *, batch_size: int, start_step: int):
    """Pool batches of ``batch_size`` (two views for Eq. 7: weak crop, then the run's crop)."""
    if self.pool is None:
      raise ValueError("data_reuse has no pool: call its load_data(load_dataset=..., seed=...) first")
    scales = ((tuple(self.weak_crop_scale), tuple(self.pool.crop_scale)) if self.pool_views == 2 else None)
    return self.pool.train_batches(batch_size=batch_size, start_step=start_step, views=self.pool_views,
                                   view_crop_scales=scales)

  def mix_batch(self, *, batch: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    if "image_key" in batch:
      raise ValueError("data_reuse cannot be combined with a method that needs two target views")
    check_labels(extra["label"], self.num_pool_classes, what="pool")
    return mixed_batch(batch, extra)

  def finalize(self, context: RunContext) -> dict[str, Any]:
    del context
    return {"reuse_pool_train": self.pool.num_examples["train"]} if self.pool is not None else {}

  def wrap_model(self, *, model: Any, variables: Any, rng: jax.Array):
    """Adds ``pool_head`` (LeCun-normal kernel, zero bias) to the parameters (Eq. 6 only)."""
    del rng
    if self.mode != "labelled":
      return model, variables
    if self.num_pool_classes < 1:
      raise ValueError("data_reuse (labelled) needs num_pool_classes >= 1 (the pool dataset's classes)")
    params = dict(variables["params"])
    width = int(params["head"]["kernel"].shape[0])
    kernel = head_kernel_init(jax.random.key(self.seed), (width, self.num_pool_classes), jnp.float32)
    params[POOL_HEAD] = {"kernel": np.asarray(kernel),
                         "bias": np.zeros((self.num_pool_classes,), np.float32)}
    return model, {**variables, "params": params}

  def init_state(self, *, variables: Any, rng: jax.Array) -> tuple:
    del rng
    if self.mode == "labelled" and POOL_HEAD not in variables["params"]:
      raise ValueError("data_reuse (labelled) needs the 'pool_head' parameters: call wrap_model first")
    return ()

  def __call__(self, *, outputs, batch, state, params, rng, source=None) -> TermOutput:
    del rng, source
    if "pool_mask" not in batch:
      raise ValueError("data_reuse needs a mixed batch (target rows, then pool rows, and 'pool_mask'): "
                       "enable config.reuse")
    n = batch["label"].shape[0]
    if self.mode == "labelled":
      features = outputs["features"]
      m = batch["pool_label"].shape[0]
      if features.shape[0] != n + m:
        raise ValueError(f"data_reuse: {features.shape[0]} rows but {n} target + {m} pool labels")
      pool_logits = pool_head_logits(features=features[n:], params=params)
      # The second term of Eq. 6 (``reuse_loss``'s ``pool_ce``); the first is the ``ce`` component.
      pool_ce = softmax_cross_entropy(logits=pool_logits, labels=batch["pool_label"])
      accuracy = jnp.mean(jnp.argmax(pool_logits, -1) == batch["pool_label"])
      return TermOutput(loss=pool_ce, state=state, metrics={"pool_accuracy": accuracy})
    logits = outputs["logits"]
    rows = logits.shape[0] - n
    if rows <= 0 or rows % 2:
      raise ValueError(f"data_reuse (pseudo_label): expected target rows then two equal pool views, "
                       f"got {logits.shape[0]} rows for {n} target labels")
    weak, strong = logits[n:n + rows // 2], logits[n + rows // 2:]
    loss = pseudo_label_loss(strong_logits=strong, weak_logits=weak)
    agreement = jnp.mean(jnp.argmax(weak, -1) == jnp.argmax(strong, -1))
    return TermOutput(loss=loss, state=state, metrics={"view_agreement": agreement})


def mixed_batch(target: dict[str, np.ndarray], pool: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One forward batch of data reuse: target rows, then pool rows (then strong pool views).

  Returns ``image`` (all rows), ``label`` (target rows), ``pool_label`` and
  ``pool_mask`` (0 target row, 1 pool row / weak view, 2 strong view).
  """
  images = [target["image"], pool["image"]]
  mask = [np.zeros(len(target["label"]), np.int32), np.ones(len(pool["label"]), np.int32)]
  if "image_key" in pool:  # Eq. 7: the second view is the strongly augmented one
    images.append(pool["image_key"])
    mask.append(np.full(len(pool["label"]), 2, np.int32))
  return {"image": np.concatenate(images), "label": target["label"], "pool_label": pool["label"],
          "pool_mask": np.concatenate(mask)}


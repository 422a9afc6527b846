"""Pre-training data reuse (papers/uot-data-reuse.txt, Sec. 3.3): the pool term.

Each training step forwards one mixed batch, the target batch followed by an
equal-size batch of selected pre-training ("pool") data, so BatchNorm sees both
as in the paper. The trainer builds it (``config.reuse``); its keys are

* ``image``: ``[n + v·m, S, S, 3]``, target rows first, then the pool rows
  (``v = 1``; for Eq. 7 ``v = 2``: the weak views, then the strong views);
* ``label``: ``[n]`` target labels (only the target rows);
* ``pool_label``: ``[m]`` pool labels (Eq. 6);
* ``pool_mask``: int ``[n + v·m]``: 0 target row, 1 pool row (weak view), 2 strong view.

The train step hands every other component the target rows only (the base
``ce`` term stays the target CE of Eq. 6), and this component — it sets
``reads_pool_rows`` — all rows. Loss config (added by the trainer when
``config.reuse.enabled``; λ is the component's ``weight``)::

  losses = {"ce": {"weight": 1.0}, "data_reuse": {"weight": 0.3, "mode": "labelled"}}

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.losses import pseudo_label_loss, softmax_cross_entropy
from ftjax.methods.base import TermOutput
from ftjax.models.layers import head_kernel_init

MODES = ("labelled", "pseudo_label")
POOL_HEAD = "pool_head"


def pool_head_logits(*, features: jax.Array, params: Any) -> jax.Array:
  """``features @ pool_head.kernel + pool_head.bias``: the pre-training-classes head of Eq. 6."""
  head = params[POOL_HEAD]
  return features.astype(jnp.float32) @ head["kernel"] + head["bias"]


@dataclasses.dataclass(frozen=True)
class DataReuse:
  """The λ-weighted pool term of Eq. 6 (labelled pool) or Eq. 7 (unlabelled pool).

  Attributes:
    weight: λ (paper grid {1, 0.3, 0.1}).
    mode: ``"labelled"`` (Eq. 6) or ``"pseudo_label"`` (Eq. 7).
    num_pool_classes: width of ``pool_head`` (set by the trainer from the pool dataset).
    seed: seed of the ``pool_head`` initialisation.

  Example:
    >>> reuse = DataReuse(weight=0.3, num_pool_classes=5)
    >>> model, variables = reuse.wrap_model(model=model, variables=variables, config=None,
    ...                                     rng=jax.random.key(0))
    >>> term = reuse(outputs=outputs, batch=mixed_batch, state=(), params=variables["params"], rng=None)
  """
  weight: float = 0.3
  mode: str = "labelled"
  num_pool_classes: int = 0
  seed: int = 0
  name: str = "data_reuse"
  reads_pool_rows: bool = True

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

  def wrap_model(self, *, model: Any, variables: Any, config: Any, rng: jax.Array):
    """Adds ``pool_head`` (LeCun-normal kernel, zero bias) to the parameters (Eq. 6 only)."""
    del config, rng
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

  def __call__(self, *, outputs, batch, state, params, rng) -> TermOutput:
    del rng
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

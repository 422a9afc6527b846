"""Co-Tuning (You et al., 2020): source labels translated from target labels.

Loss (Eq. 2): ``CE(head(f(x)), y) + λ · softCE(source_head(f(x)), p(y_s | y_t = y))``.
The first term is the ``ce`` component; this module is the second. A config:

  losses = {"ce": {"weight": 1.0}, "co_tuning": {"weight": 2.3, "approach": "reverse"}}

(source model at ``t = 1``, ``g`` calibrated; see :class:`CoTuning` for the two
calibrations.)

How the relationship ``p(y_s | y_t)`` reaches the step: it needs the target
data and the pretrained model, which ``init_state`` cannot see. So the trainer
calls :meth:`CoTuning.prepare` (a hook of :class:`ftjax.methods.base.Method`) once
after building the dataset and the model and before ``init_state``; it returns a copy of the component holding the
``[C_t, C_s]`` matrix (loaded from ``relationship_path`` when given, else
computed by :func:`ftjax.methods.co_tuning.relationship.compute_relationship` and cached on disk).
``init_state`` then puts it in the component's state: a constant array in the
train state (replicated, checkpointed with the run, never differentiated), so
the jitted step does not bake a large constant into its program.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.losses import co_tuning_loss
from ftjax.core.io import save_npy
from ftjax.methods.base import Method, RunContext, TermOutput
from ftjax.methods.co_tuning.relationship import APPROACHES, compute_relationship, plot_relationship


def check_relationship(relationship: Any, *, num_target: int | None = None,
                       num_source: int | None = None, atol: float = 1e-3) -> np.ndarray:
  """A ``[C_t, C_s]`` float32 row-stochastic matrix, or a ValueError saying what is wrong."""
  rel = np.asarray(relationship, np.float32)
  if rel.ndim != 2:
    raise ValueError(f"the Co-Tuning relationship must be [num_target, num_source], got shape {rel.shape}")
  expected = (num_target or rel.shape[0], num_source or rel.shape[1])
  if rel.shape != expected:
    raise ValueError(f"the Co-Tuning relationship has shape {rel.shape} but the model needs "
                     f"{expected} (target classes, source classes)")
  if not np.all(np.isfinite(rel)) or rel.min() < 0:
    raise ValueError("the Co-Tuning relationship must be finite and non-negative")
  sums = rel.sum(axis=1)
  if np.abs(sums - 1).max() > atol:
    row = int(np.argmax(np.abs(sums - 1)))
    raise ValueError(f"the Co-Tuning relationship rows must sum to 1; row {row} sums to {sums[row]:.4f}")
  return rel


@dataclasses.dataclass(frozen=True)
class CoTuning(Method):
  """Soft cross-entropy of ``source_logits`` against ``relationship[label]``.

  The relationship's two calibrations (Alg. 1 calls Alg. 2 twice) are separate
  options, and a results row should be named by which of them ran:

  * the **source** model's temperature ``t`` (source probabilities
    ``softmax(logits / t)``), one of: Alg. 2 on a held-out split of the source
    dataset (``source_calibration_dataset`` + ``source_calibration_split``, a
    TFDS name and split, e.g. ``"imagenet2012"`` / ``"validation"``; the
    paper's protocol); a given ``source_temperature`` (e.g.
    :data:`~ftjax.methods.co_tuning.relationship.OFFICIAL_RESNET50_TEMPERATURE`,
    ``1 / 0.884``: the official code's logit scale, measured on *its* ImageNet
    ResNet-50, a borrowed value for any other model); or none (``t = 1``);
  * **g**'s temperature on the secondary val split (``calibrate_g``).

  With no ImageNet data offline, no Lite0 run here is source-calibrated: the
  source model runs at ``t = 1`` or at the borrowed ResNet-50 value.

  Attributes:
    weight: λ of Eq. 2 (paper default 2.3).
    relationship_path: a ``.npy`` ``[C_t, C_s]`` matrix to use; ``""`` = compute it
      in :meth:`prepare`.
    approach: ``"reverse"`` (Alg. 1) or ``"direct"`` (Eq. 3).
    source_temperature: a given source temperature ``t > 0``; ``0``/``None`` = none.
    source_calibration_dataset: TFDS name of the source dataset to calibrate the
      source model on (``""``: none); loaded by :meth:`load_data` with the run's
      image settings. Its labels must be the source head's classes.
    source_calibration_split: the held-out TFDS split of it that Alg. 2 reads
      (not ``"train"``).
    calibrate_g: calibrate ``g`` by temperature on the secondary val (reverse
      approach); False with no source calibration is the paper's "w/o calibration".
    cache_dir: relationship cache (``""`` = ``$FTJAX_CACHE/relationships``).
    val_fraction: secondary-val fraction of the reverse approach.
    relationship: the matrix itself (set by :meth:`prepare`, or pass an array).
    source_calibration_data: the loaded source dataset (set by :meth:`load_data`).
    calibration_info: what the relationship ran with (set by :meth:`prepare`;
      :meth:`finalize` puts it in ``results.json`` as ``co_tuning_calibration``).

  Example:
    >>> from ftjax import models
    >>> model = models.create_model("resnet_tiny", num_classes=3, keep_source_head=True, num_source_classes=5)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False,
    ...                        outputs=model.all_outputs)
    >>> ct = CoTuning(relationship=np.full((3, 5), 0.2))
    >>> state = ct.init_state(variables=variables, rng=jax.random.key(0))
    >>> outputs = {"source_logits": jnp.zeros((2, 5))}
    >>> term = ct(outputs=outputs, batch={"label": jnp.array([0, 2])}, state=state, params=None, rng=None)
    >>> round(float(term.loss), 4)  # uniform targets, uniform predictions: log 5
    1.6094
  """
  weight: float = 2.3
  relationship_path: str = ""
  approach: str = "reverse"
  source_temperature: float | None = None
  source_calibration_dataset: str = ""
  source_calibration_split: str = "validation"
  calibrate_g: bool = True
  cache_dir: str = ""
  val_fraction: float = 0.2
  relationship: Any = dataclasses.field(default=None, compare=False, repr=False)
  source_calibration_data: Any = dataclasses.field(default=None, compare=False, repr=False)
  calibration_info: Any = dataclasses.field(default=None, compare=False, repr=False)
  name: str = "co_tuning"
  outputs: tuple[str, ...] = ("source_logits",)

  def __post_init__(self):
    if self.approach not in APPROACHES:
      raise ValueError(f"co_tuning approach must be one of {APPROACHES}, got {self.approach!r}")
    if self.weight < 0:
      raise ValueError(f"co_tuning weight must be >= 0, got {self.weight}")
    if self.source_temperature is not None and self.source_temperature < 0:
      raise ValueError(f"co_tuning source_temperature must be > 0 (or 0/None: none), "
                       f"got {self.source_temperature}")
    if self.source_temperature and self.source_calibration_dataset:
      raise ValueError("co_tuning: give either source_temperature (a given value) or "
                       "source_calibration_dataset (calibrate on held-out source data), not both")
    if self.source_calibration_dataset and self.source_calibration_split in ("", "train"):
      raise ValueError(f"co_tuning source_calibration_split must name a held-out split of "
                       f"{self.source_calibration_dataset!r} (e.g. 'validation'), got "
                       f"{self.source_calibration_split!r}")
    if self.relationship_path and not os.path.exists(self.relationship_path):
      raise ValueError(f"co_tuning relationship_path {self.relationship_path!r} does not exist")
    if self.relationship is not None:
      object.__setattr__(self, "relationship", check_relationship(self.relationship))

  def load_data(self, *, load_dataset, seed: int) -> "CoTuning":
    """Loads the source calibration dataset (its held-out split read as ``"test"``), if one is named."""
    del seed
    if (not self.source_calibration_dataset or self.source_calibration_data is not None
        or self.relationship is not None or self.relationship_path):
      return self
    data = load_dataset(self.source_calibration_dataset, test_split=self.source_calibration_split)
    return dataclasses.replace(self, source_calibration_data=data)

  def prepare(self, context: RunContext) -> "CoTuning":
    """A copy holding the relationship for the run's dataset (loaded, or computed and cached).

    Reads the context's ``dataset`` (its train split), ``model`` (with
    ``source_head``) and initial ``variables``, ``pretrained`` (or ``model_name``),
    ``seed``, ``eval_batch_size`` and ``progress``.
    """
    dataset = context.dataset
    if self.relationship is not None:
      rel, info = self.relationship, {"relationship": "given"}
    elif self.relationship_path:
      rel, info = np.load(self.relationship_path), {"relationship": self.relationship_path}
    else:
      if self.source_calibration_dataset and self.source_calibration_data is None:
        raise ValueError(f"co_tuning: source_calibration_dataset={self.source_calibration_dataset!r} "
                         "is not loaded: call its load_data(load_dataset=..., seed=...) first")
      rel, info = compute_relationship(
          pretrained_name=context.pretrained or context.model_name, dataset=dataset,
          approach=self.approach, source_temperature=self.source_temperature or None,
          source_calibration_data=self.source_calibration_data, source_calibration_split="test",
          calibrate_g=self.calibrate_g, cache_dir=self.cache_dir or None,
          seed=context.seed, batch_size=context.eval_batch_size, model=context.model,
          variables=context.variables, val_fraction=self.val_fraction, progress=context.progress,
          return_info=True)
    rel = check_relationship(
        rel, num_target=dataset.num_classes if dataset is not None else context.model.num_classes)
    return dataclasses.replace(self, relationship=rel, calibration_info=info)

  def finalize(self, context: RunContext) -> dict[str, Any]:
    """``{"co_tuning_calibration": ...}``: the calibrations the relationship ran with."""
    del context
    return {} if self.calibration_info is None else {"co_tuning_calibration": dict(self.calibration_info)}

  def write_artifacts(self, context: RunContext) -> list[str]:
    """Saves the relationship used by the run next to its results.

    Writes ``relationship.npy`` (``[C_t, C_s]``) and ``relationship.png``, the
    paper's Fig. 1: each target class with its top-5 source classes. Source
    class names come from the pretrained registry entry (indices when the
    model has none).

    Returns:
      The paths written.
    """
    from ftjax.models import registry

    rel, workdir, dataset = self.relationship, context.workdir, context.dataset
    if rel is None:
      return []
    npy = save_npy(os.path.join(workdir, "relationship.npy"), rel)
    name = context.pretrained
    source_names = (registry.load_class_names(registry.source_class_names_file(name))
                    if name in registry.KNOWN_PRETRAINED else ())
    if len(source_names) != rel.shape[1]:
      source_names = [f"source {i}" for i in range(rel.shape[1])]
    png = plot_relationship(rel, target_names=list(dataset.class_names), source_names=list(source_names),
                            path=os.path.join(workdir, "relationship.png"))
    return [npy, png]

  def init_state(self, *, variables: Any, rng: jax.Array) -> dict[str, jax.Array]:
    del rng
    rel = self.relationship
    if rel is None and self.relationship_path:
      rel = np.load(self.relationship_path)
    if rel is None:
      raise ValueError("co_tuning has no relationship: call its prepare(RunContext(dataset=..., "
                       "model=..., variables=...)) first, or give relationship_path")
    params = variables["params"]
    if "source_head" not in params:
      raise ValueError("co_tuning needs a model built with keep_source_head=True "
                       "(no 'source_head' parameters found)")
    rel = check_relationship(rel, num_target=int(params["head"]["bias"].shape[0]),
                             num_source=int(params["source_head"]["bias"].shape[0]))
    return {"relationship": jnp.asarray(rel, jnp.float32)}

  def __call__(self, *, outputs, batch, state, params, rng, source=None) -> TermOutput:
    del params, rng, source
    targets = jnp.take(state["relationship"], batch["label"], axis=0)
    loss = co_tuning_loss(source_logits=outputs["source_logits"], relationship_targets=targets)
    return TermOutput(loss=loss, state=state)

"""Co-Tuning (You et al., 2020): source labels translated from target labels.

Loss (Eq. 2): ``CE(head(f(x)), y) + λ · softCE(source_head(f(x)), p(y_s | y_t = y))``.
The first term is the ``ce`` component; this module is the second. A config:

  losses = {"ce": {"weight": 1.0}, "co_tuning": {"weight": 2.3, "approach": "reverse"}}

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

  Attributes:
    weight: λ of Eq. 2 (paper default 2.3).
    relationship_path: a ``.npy`` ``[C_t, C_s]`` matrix to use; ``""`` = compute it
      in :meth:`prepare`.
    approach: ``"reverse"`` (Alg. 1) or ``"direct"`` (Eq. 3).
    calibrate: temperature calibration (source model and ``g``); False is the
      paper's "w/o calibration" ablation.
    source_temperature: temperature of the source model measured on source
      validation data; ``0``/``None`` = not available (``t = 1``, logged).
    cache_dir: relationship cache (``""`` = ``$FTJAX_CACHE/relationships``).
    val_fraction: secondary-val fraction of the reverse approach.
    relationship: the matrix itself (set by :meth:`prepare`, or pass an array).

  Example:
    >>> ct = CoTuning(relationship=np.full((10, 1000), 1e-3))
    >>> state = ct.init_state(variables=variables, rng=jax.random.key(0))
    >>> term = ct(outputs=outputs, batch=batch, state=state, params=None, rng=None, source=None)
  """
  weight: float = 2.3
  relationship_path: str = ""
  approach: str = "reverse"
  calibrate: bool = True
  source_temperature: float | None = None
  cache_dir: str = ""
  val_fraction: float = 0.2
  relationship: Any = dataclasses.field(default=None, compare=False, repr=False)
  name: str = "co_tuning"
  outputs: tuple[str, ...] = ("source_logits",)

  def __post_init__(self):
    if self.approach not in APPROACHES:
      raise ValueError(f"co_tuning approach must be one of {APPROACHES}, got {self.approach!r}")
    if self.weight < 0:
      raise ValueError(f"co_tuning weight must be >= 0, got {self.weight}")
    if self.source_temperature is not None and self.source_temperature < 0:
      raise ValueError(f"co_tuning source_temperature must be > 0 (or 0/None: not available), "
                       f"got {self.source_temperature}")
    if self.relationship_path and not os.path.exists(self.relationship_path):
      raise ValueError(f"co_tuning relationship_path {self.relationship_path!r} does not exist")
    if self.relationship is not None:
      object.__setattr__(self, "relationship", check_relationship(self.relationship))

  def prepare(self, context: RunContext) -> "CoTuning":
    """A copy holding the relationship for the run's dataset (loaded, or computed and cached).

    Reads the context's ``dataset`` (its train split), ``model`` (with
    ``source_head``) and initial ``variables``, ``pretrained`` (or ``model_name``),
    ``seed``, ``eval_batch_size`` and ``progress``.
    """
    dataset = context.dataset
    if self.relationship is not None:
      rel = self.relationship
    elif self.relationship_path:
      rel = np.load(self.relationship_path)
    else:
      rel = compute_relationship(
          pretrained_name=context.pretrained or context.model_name, dataset=dataset,
          approach=self.approach, calibrate=self.calibrate,
          source_temperature=self.source_temperature or None, cache_dir=self.cache_dir or None,
          seed=context.seed, batch_size=context.eval_batch_size, model=context.model,
          variables=context.variables, val_fraction=self.val_fraction, progress=context.progress)
    return dataclasses.replace(self, relationship=check_relationship(
        rel, num_target=dataset.num_classes if dataset is not None else context.model.num_classes))

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

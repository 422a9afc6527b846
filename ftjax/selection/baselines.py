"""Baseline selection rules of the UOT data-reuse paper (papers/uot-data-reuse.txt).

* :func:`random_units` -- uniform selection over classes/clusters (Sec. 4.1).
* :func:`label_overlap_units` -- "label-based" selection: pool classes whose
  name matches a target class name (Sec. 4.2, e.g. the ImageNet bird classes
  for CUB).
* :func:`greedy_ot_scores` -- the Greedy-OT baseline of [19] (Cui et al.,
  CVPR 2018), see its docstring for what exactly is computed.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.selection.uot import COSTS
from ftjax.selection.uot import cost_matrix
from ftjax.selection.uot import validate_features


def random_units(num_units: int, k: int, seed: int) -> np.ndarray:
  """``k`` distinct unit indices drawn uniformly from ``range(num_units)``.

  Args:
    num_units: size of the pool (classes or clusters).
    k: how many to select, ``1 <= k <= num_units``.
    seed: NumPy seed; the same seed gives the same selection.

  Returns:
    Sorted ``int64`` array of ``k`` indices.
  """
  if not (isinstance(num_units, (int, np.integer)) and num_units >= 1):
    raise ValueError(f"num_units must be a positive int, got {num_units!r}")
  if not (isinstance(k, (int, np.integer)) and 1 <= k <= num_units):
    raise ValueError(f"k must be an int in [1, {num_units}], got {k!r}")
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_units, size=k, replace=False)).astype(np.int64)


_SPLIT = re.compile(r"[^0-9a-z]+")


def _singular(token: str) -> str:
  # Crude English plural folding: "finches" -> "finch", "dogs" -> "dog";
  # words ending in "ss"/"us"/"is" ("bass", "ibis") are left alone.
  if len(token) > 3 and token.endswith("ies"):
    return token[:-3] + "y"
  if len(token) > 4 and token.endswith(("ches", "shes", "sses", "xes")):
    return token[:-2]
  if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
    return token[:-1]
  return token


def _name_variants(name: str) -> set[str]:
  """Normalised forms of one class name (or of each of its comma synonyms)."""
  variants = set()
  # ImageNet-style names list synonyms separated by commas: "tench, Tinca tinca".
  for synonym in name.split(","):
    # Drop dataset prefixes like "001." (CUB) and separators "_", "-", " ".
    synonym = re.sub(r"^\s*\d+[.)]\s*", "", synonym.lower())
    tokens = [_singular(t) for t in _SPLIT.split(synonym) if t]
    if tokens:
      variants.add(" ".join(tokens))
  return variants


def label_overlap_units(pool_class_names: Sequence[str],
                        target_class_names: Sequence[str]) -> np.ndarray:
  """Pool classes whose name matches some target class name (label-based selection).

  Matching is deliberately simple and documented: each name is split into its
  comma-separated synonyms (ImageNet style); each synonym is lower-cased,
  stripped of a leading number prefix (``"001.Black_footed_Albatross"``),
  split on any non-alphanumeric character and plural-folded token by token.
  A pool class matches when one of its normalised synonyms equals one of a
  target class's normalised synonyms, or when one is a whole-word suffix of
  the other (``"albatross"`` matches ``"black footed albatross"``). No WordNet
  hierarchy is used, so hypernyms ("bird" for "albatross") do not match.

  Args:
    pool_class_names: names of the pool classes, index = unit index.
    target_class_names: names of the target classes.

  Returns:
    Sorted ``int64`` array of matching pool unit indices (possibly empty).

  Example:
    >>> label_overlap_units(["tench, Tinca tinca", "goldfish", "great white shark"],
    ...                     ["Goldfish", "Tiger_Shark"])
    array([1])
  """
  for name, values in (("pool_class_names", pool_class_names),
                       ("target_class_names", target_class_names)):
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
      raise ValueError(f"{name} must be a sequence of strings, got {type(values).__name__}")
  target_variants = set()
  for name in target_class_names:
    target_variants |= _name_variants(name)

  def matches(variant: str) -> bool:
    if variant in target_variants:
      return True
    for other in target_variants:
      short, long = sorted((variant, other), key=len)
      if long.endswith(" " + short):
        return True
    return False

  selected = [i for i, name in enumerate(pool_class_names)
              if any(matches(v) for v in _name_variants(name))]
  return np.asarray(selected, dtype=np.int64)


def greedy_ot_scores(*, target_means: jax.Array, pool_means: jax.Array,
                     target_weights: jax.Array | None = None,
                     cost: str = "euclidean", gamma: float = 0.01) -> jax.Array:
  """Greedy-OT scores: per-unit EMD similarity to the target set ([19], Table 4).

  Cui et al. (CVPR 2018) measure how close a source domain is to the target by
  ``sim = exp(-gamma * EMD(source, target))`` with class-mean features, l2
  ground distance and target classes weighted by their share of images, and
  pick source classes greedily by this similarity. The UOT paper's Greedy-OT
  baseline ranks pre-training units by their "EMD similarity" and keeps the
  top K. What is implemented: each unit ``i`` is taken alone, as a unit mass
  at ``pool_means[i]``; its exact OT (EMD) cost to the target measure is then
  closed-form, ``sum_j w_j C(pool_i, target_j)`` (all mass must go to the
  targets in proportion ``w``), and its score is
  ``exp(-gamma * that cost)``. The selection is greedy in that units are
  ranked independently rather than jointly (contrast UOT, where units compete
  for target mass).

  With ``cost="sqeuclidean"`` the score ranks units by their distance to the
  weighted target centroid (the cross terms average out), so the paper's l2
  distance ``cost="euclidean"`` is the default; ``"cosine"`` gives Table 4's
  GOT-cos.

  Args:
    target_means: ``[n_target, d]`` target class means.
    pool_means: ``[n_pool, d]`` pool unit means.
    target_weights: ``[n_target]`` non-negative weights (e.g. images per
      class); default uniform. Normalised to sum to 1.
    cost: ``"euclidean"`` (default), ``"sqeuclidean"`` or ``"cosine"``.
    gamma: similarity temperature of [19] (0.01); does not change the ranking.

  Returns:
    ``[n_pool]`` scores in (0, 1]; larger is more similar. Rank with
    :func:`ftjax.selection.select_top_k`.
  """
  if cost not in COSTS:
    raise ValueError(f"cost={cost!r} is not supported; allowed values: {COSTS}")
  if not (isinstance(gamma, (int, float)) and gamma > 0):
    raise ValueError(f"gamma must be a positive number, got {gamma!r}")
  validate_features("pool_means", pool_means)
  validate_features("target_means", target_means, dim=np.shape(pool_means)[1])
  n_target = np.shape(target_means)[0]
  if target_weights is None:
    weights = jnp.full((n_target,), 1.0 / n_target, jnp.float32)
  else:
    w = np.asarray(target_weights, np.float64)
    if w.shape != (n_target,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"target_weights must be {n_target} finite non-negative values "
                       f"with a positive sum, got shape {w.shape}")
    weights = jnp.asarray(w / w.sum(), jnp.float32)
  c = cost_matrix(jnp.asarray(pool_means, jnp.float32),
                  jnp.asarray(target_means, jnp.float32), cost=cost)
  return jnp.exp(-gamma * (c @ weights))

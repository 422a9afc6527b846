"""Co-Tuning's category relationship ``p(y_s | y_t)`` (Co-Tuning paper, Sec. 4.2-4.3).

Pieces, from pure numerics to the cached end-to-end computation:

* :func:`calibrate_temperature` (Alg. 2): the scalar ``t > 0`` minimising the NLL
  of ``softmax(logits / t)``.
* :func:`direct_relationship` (Eq. 3): per-target-class mean of calibrated
  source probabilities.
* :func:`fit_softmax_regression`, :func:`bayes_relationship` and
  :func:`reverse_relationship` (Alg. 1): learn ``g: p(y_s|x) -> y_t``, calibrate
  it, then invert it with Bayes' rule.
* :func:`calibrate_source` (Alg. 2 on the source model): the source
  temperature from a held-out split of the *source* dataset.
* :func:`compute_relationship`: runs a pretrained model over a target train
  split and caches the ``[num_target, num_source]`` matrix on disk under a key
  that covers every input (never a stale reuse).

Two separate calibrations (Alg. 1 calls Alg. 2 twice): the *source* model's
temperature (from held-out source data, a given value, or none: ``t = 1``) and
``g``'s temperature (on the secondary val split; on or off).
* :func:`plot_relationship`: the paper's Fig. 1 (top source classes per target class).

Example:
  >>> rng = np.random.default_rng(0)
  >>> labels = np.repeat(np.arange(3), 20)                       # 3 target classes
  >>> source_logits = rng.normal(size=(60, 8)) + 3 * np.eye(8)[labels]  # 8 source classes
  >>> probs = jax.nn.softmax(jnp.asarray(source_logits, jnp.float32))
  >>> direct = direct_relationship(probs=probs, labels=jnp.asarray(labels), num_classes=3)
  >>> direct.shape, np.allclose(direct.sum(1), 1.0, atol=1e-5), int(direct[2].argmax())
  ((3, 8), True, 2)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from ftjax.core.batches import collect
from ftjax.core.errors import is_concrete
from ftjax.core.io import atomic_file, save_npy
from ftjax.core.paths import flatten_paths
from ftjax.data.sampling import stratified_split

log = logging.getLogger(__name__)

# Bump whenever the numbers compute_relationship produces for the same inputs change
# (it is part of the cache key, so old cache files are then ignored).
RELATIONSHIP_VERSION = 1

# The official Co-Tuning code (github.com/thuml/CoTuning, module/relationship_learning.py,
# relationship_learning and direct_relationship_learning) turns ImageNet logits into
# probabilities as softmax(logits * 0.8840456604957581): the calibration of *its* torchvision
# ResNet-50 on ImageNet validation data, a logit scale of 1 / t. Borrowing it for another
# model is a guess, not a calibration of that model.
OFFICIAL_RESNET50_LOGIT_SCALE = 0.8840456604957581
OFFICIAL_RESNET50_TEMPERATURE = 1.0 / OFFICIAL_RESNET50_LOGIT_SCALE

# L2 strengths tried for g (objective: mean NLL + l2/2 ||W||^2), half-decades.
DEFAULT_L2_GRID = tuple(float(f"{10.0 ** (e / 2):.3g}") for e in range(-12, -1))
APPROACHES = ("reverse", "direct")


def _check_probs_labels(probs: jax.Array, labels: jax.Array, name: str) -> None:
  if probs.ndim != 2:
    raise ValueError(f"{name} must be [num_examples, num_source], got shape {probs.shape}")
  if labels.shape != probs.shape[:1]:
    raise ValueError(f"labels must be [num_examples]={probs.shape[:1]}, got shape {labels.shape}")


def _check_labels_cover(labels: Any, num_classes: int, what: str) -> None:
  """Every class in ``[0, num_classes)`` has an example (skipped under tracing)."""
  if not is_concrete(labels):
    return
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must be in [0, {num_classes}), found [{labels.min()}, {labels.max()}]")
  counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
  missing = np.flatnonzero(counts == 0)
  if missing.size:
    raise ValueError(f"target classes {missing[:10].tolist()}{'...' if missing.size > 10 else ''} "
                     f"have no examples in {what}: their relationship row is undefined")


# ----------------------------------------------------------------------------- Alg. 2


def _temperature_bisection(logits, labels, log_t_min, log_t_max, num_iters):
  z = logits.astype(jnp.float32)
  z_label = jnp.take_along_axis(z, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]

  def slope(log_beta):
    # d/d(beta) of mean NLL(softmax(beta z)) = mean(E_p[z] - z_y); increasing in beta
    # (the second derivative is the mean variance of z under p), so bisect its root.
    p = jax.nn.softmax(jnp.exp(log_beta) * z, axis=-1)
    return jnp.mean(jnp.sum(p * z, axis=-1) - z_label)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    positive = slope(mid) > 0
    return jnp.where(positive, lo, mid), jnp.where(positive, mid, hi)

  # Bisection over log(beta) = -log(t): beta in [1/t_max, 1/t_min].
  lo, hi = jax.lax.fori_loop(0, num_iters, body, (jnp.float32(-log_t_max), jnp.float32(-log_t_min)))
  return jnp.exp(-0.5 * (lo + hi))


def calibrate_temperature(*, logits: jax.Array, labels: jax.Array, t_min: float = 1e-2,
                          t_max: float = 1e2, tol: float = 1e-6) -> jax.Array:
  """Temperature scaling (Co-Tuning Alg. 2; Guo et al., 2017).

  Solves ``t* = argmin_{t>0} mean_i CE(softmax(logits_i / t), y_i)``. The NLL is
  convex in ``beta = 1/t``; its derivative is bisected in ``log beta`` with a fixed
  iteration count (from ``tol``), so the function is jit-compatible. An optimum
  outside ``[t_min, t_max]`` returns the nearer bound.

  Args:
    logits: ``[num_examples, num_classes]`` uncalibrated logits.
    labels: integer ``[num_examples]``.
    t_min: smallest temperature considered (> 0).
    t_max: largest temperature considered.
    tol: precision of ``log t``.

  Returns:
    Scalar float32 ``t > 0``; calibrated probabilities are ``softmax(logits / t)``.

  Example:
    >>> logits = jnp.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    >>> t = calibrate_temperature(logits=logits, labels=jnp.array([0, 1, 1, 0]))
    >>> bool(t > 1.0)   # half the confident predictions are wrong: soften them
    True
  """
  _check_probs_labels(logits, labels, "logits")
  if not 0 < t_min < t_max:
    raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
  if tol <= 0:
    raise ValueError(f"tol must be positive, got {tol}")
  if logits.shape[0] == 0:
    raise ValueError("calibrate_temperature needs at least one example, got 0")
  log_t_min, log_t_max = math.log(t_min), math.log(t_max)
  num_iters = max(1, math.ceil(math.log2((log_t_max - log_t_min) / tol)))
  return _temperature_bisection(logits, labels, log_t_min, log_t_max, num_iters)


# ----------------------------------------------------------------------------- Eq. 3


def direct_relationship(*, probs: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Direct approach (Co-Tuning Eq. 3): ``p(y_s | y_t=c) = mean_{x in class c} p(y_s | x)``.

  Args:
    probs: ``[num_examples, num_source]`` calibrated source probabilities.
    labels: integer target labels ``[num_examples]``.
    num_classes: number of target classes (static under ``jax.jit``).

  Returns:
    ``[num_classes, num_source]``, rows summing to 1.

  Raises:
    ValueError: a target class without examples (checked when ``labels`` is concrete;
      under ``jit`` such a row is NaN).
  """
  _check_probs_labels(probs, labels, "probs")
  _check_labels_cover(labels, num_classes, "the data given to direct_relationship")
  probs = probs.astype(jnp.float32)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  sums = one_hot.T @ probs
  means = sums / jnp.sum(one_hot, axis=0)[:, None]
  # Renormalise: inputs that sum to 1 only up to rounding still give exact rows.
  return means / jnp.sum(means, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- Alg. 1


class SoftmaxRegressionFit(NamedTuple):
  weights: jax.Array      # [num_classes, num_features]; logits = features @ weights.T
  objective: jax.Array    # final mean NLL + l2/2 ||W||^2
  grad_norm: jax.Array    # final gradient norm
  iterations: jax.Array   # L-BFGS iterations run


def softmax_regression_objective(weights: jax.Array, features: jax.Array, labels: jax.Array,
                                 l2: float | jax.Array,
                                 sample_weight: jax.Array | None = None) -> jax.Array:
  """``mean_i -log softmax(W x_i)_{y_i} + l2/2 ||W||_F^2`` (no intercept).

  With ``sample_weight`` the mean is weighted: ``sum_i s_i nll_i / sum_i s_i``.
  """
  logits = features @ weights.T
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  if sample_weight is None:
    mean_nll = jnp.mean(nll)
  else:
    mean_nll = jnp.sum(sample_weight * nll) / jnp.sum(sample_weight)
  return mean_nll + 0.5 * l2 * jnp.sum(weights * weights)


@functools.partial(jax.jit, static_argnames=("max_iters",))
def _lbfgs_fit(features, labels, sample_weight, l2, init, tol, max_iters):
  def objective(w):
    return softmax_regression_objective(w, features, labels, l2, sample_weight)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    w, state = carry
    value, grad = value_and_grad(w, state=state)
    updates, state = solver.update(grad, state, w, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(w, updates), state

  def not_done(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
    return (count == 0) | ((count < max_iters) & (grad_norm >= tol))

  w, state = jax.lax.while_loop(not_done, step, (init, solver.init(init)))
  value, grad = jax.value_and_grad(objective)(w)
  return SoftmaxRegressionFit(w, value, otu.tree_norm(grad), otu.tree_get(state, "count"))


def fit_softmax_regression(*, features: jax.Array, labels: jax.Array, num_classes: int,
                           l2: float, init: jax.Array | None = None, tol: float = 1e-6,
                           max_iters: int = 1000,
                           sample_weight: jax.Array | None = None) -> SoftmaxRegressionFit:
  """Full-batch L-BFGS fit of an L2-regularised softmax regression (the ``g`` of Alg. 1).

  No intercept: the inputs are probability vectors (they sum to 1), so a bias
  ``b`` is the same model as ``W + b 1^T``; dropping it loses nothing and makes
  ``g(e_i) = softmax(W[:, i])`` the whole of ``p(y_t | y_s = i)``.

  Args:
    features: ``[num_examples, num_features]``.
    labels: integer ``[num_examples]`` in ``[0, num_classes)``.
    num_classes: number of output classes.
    l2: strength in ``mean NLL + l2/2 ||W||^2`` (sklearn's ``C`` is ``1 / (l2 n)``).
    init: starting weights ``[num_classes, num_features]`` (default zeros).
    tol: stop when the gradient norm is below this.
    max_iters: L-BFGS iteration cap.
    sample_weight: optional ``[num_examples]`` non-negative weights; a 0/1 mask
      fits a subset without a new compilation for its shape.

  Returns:
    :class:`SoftmaxRegressionFit`.
  """
  _check_probs_labels(features, labels, "features")
  if l2 < 0:
    raise ValueError(f"l2 must be >= 0, got {l2}")
  features = jnp.asarray(features, jnp.float32)
  if init is None:
    init = jnp.zeros((num_classes, features.shape[1]), jnp.float32)
  elif init.shape != (num_classes, features.shape[1]):
    raise ValueError(f"init must have shape {(num_classes, features.shape[1])}, got {init.shape}")
  if sample_weight is None:
    sample_weight = jnp.ones(features.shape[:1], jnp.float32)
  elif sample_weight.shape != features.shape[:1]:
    raise ValueError(f"sample_weight must be [num_examples]={features.shape[:1]}, "
                     f"got {sample_weight.shape}")
  return _lbfgs_fit(features, jnp.asarray(labels, jnp.int32),
                    jnp.asarray(sample_weight, jnp.float32), jnp.float32(l2),
                    jnp.asarray(init, jnp.float32), jnp.float32(tol), max_iters)


def bayes_relationship(*, weights: jax.Array, temperature: float | jax.Array,
                       source_prior: jax.Array) -> jax.Array:
  """Bayes' rule of Alg. 1: ``p(y_s=i | y_t=j) ∝ p(y_s=i) p(y_t=j | y_s=i)``.

  ``p(y_t | y_s=i) = softmax(W[:, i] / t_g)`` is the calibrated ``g`` applied to the
  one-hot source distribution ``e_i``. Each target row is normalised by its sum over
  source classes, i.e. ``p(y_t=j)`` is the marginal implied by the model (the paper's
  empirical ``p(y_t)`` only differs by the per-row scale this normalisation removes).

  Args:
    weights: ``[num_target, num_source]`` weights of ``g``.
    temperature: ``t_g > 0``.
    source_prior: ``[num_source]`` marginal ``p(y_s)``.

  Returns:
    ``[num_target, num_source]``, rows summing to 1.
  """
  if weights.ndim != 2 or source_prior.shape != weights.shape[1:]:
    raise ValueError(f"expected weights [num_target, num_source] and source_prior [num_source]; "
                     f"got {weights.shape} and {source_prior.shape}")
  target_given_source = jax.nn.softmax(weights.T.astype(jnp.float32) / temperature, axis=-1)
  joint = source_prior.astype(jnp.float32)[:, None] * target_given_source   # [S, T]
  return (joint / jnp.sum(joint, axis=0, keepdims=True)).T


class ReverseResult(NamedTuple):
  relationship: np.ndarray   # [num_target, num_source], rows sum to 1
  l2: float                  # L2 strength chosen on the secondary val
  val_accuracy: float        # secondary-val accuracy of g at that strength
  temperature_g: float       # t_g from the secondary val (1.0 when calibrate_g=False)
  weights: np.ndarray        # W of g used in the Bayes step, [num_target, num_source]


def reverse_relationship(*, source_probs: jax.Array, labels: jax.Array, num_classes: int,
                         seed: int, val_fraction: float = 0.2,
                         l2_grid: Sequence[float] = DEFAULT_L2_GRID, calibrate_g: bool = True,
                         refit: bool = True, tol: float = 1e-6,
                         max_iters: int = 1000) -> ReverseResult:
  """Reverse approach (Co-Tuning Alg. 1) from calibrated source probabilities.

  1. Stratified secondary split of the target train examples (``seed``,
     ``val_fraction``; classes with one example stay in the secondary train).
  2. Softmax regression ``g`` on the secondary train for each L2 strength of
     ``l2_grid`` (strongest first, each warm-started from the previous); the
     strength with the best secondary-val accuracy wins (ties: lower val NLL).
  3. ``t_g`` = temperature of that ``g`` on the secondary val (Alg. 2).
  4. ``refit=True``: refit ``g`` on all examples at the chosen strength and keep
     ``t_g`` from step 3 (the usual select-then-refit; the val set cannot measure
     the refit's own temperature). ``refit=False``: keep the secondary-train fit.
  5. :func:`bayes_relationship` with ``p(y_s)`` = mean source probability over all examples.

  Args:
    source_probs: ``[num_examples, num_source]`` calibrated source probabilities.
    labels: integer target labels ``[num_examples]``.
    num_classes: number of target classes.
    seed: seed of the secondary split.
    val_fraction: secondary-val fraction per class, in (0, 1).
    l2_grid: L2 strengths tried (``mean NLL + l2/2 ||W||^2``).
    calibrate_g: calibrate ``g`` on the secondary val (False: ``t_g = 1``).
    refit: refit on all examples at the chosen strength (see step 4).
    tol, max_iters: L-BFGS stopping rule.

  Returns:
    :class:`ReverseResult`.
  """

  _check_probs_labels(source_probs, labels, "source_probs")
  if not l2_grid or any(l2 < 0 for l2 in l2_grid):
    raise ValueError(f"l2_grid must be a non-empty sequence of values >= 0, got {l2_grid}")
  labels = np.asarray(labels).astype(np.int32)
  _check_labels_cover(labels, num_classes, "the target train data")
  probs = jnp.asarray(source_probs, jnp.float32)
  train_idx, val_idx = stratified_split(labels, val_fraction, seed)
  if len(val_idx) == 0:
    raise ValueError("the secondary val split is empty: every target class has a single example")
  # The secondary-train fits and the refit share one compiled solver: same arrays,
  # different 0/1 sample weights.
  train_mask = jnp.asarray(np.isin(np.arange(len(labels)), train_idx), jnp.float32)
  y_all = jnp.asarray(labels)
  x_val, y_val = probs[val_idx], jnp.asarray(labels[val_idx])

  candidates = []
  weights = None
  for l2 in sorted(set(float(v) for v in l2_grid), reverse=True):
    fit = fit_softmax_regression(features=probs, labels=y_all, num_classes=num_classes, l2=l2,
                                 init=weights, tol=tol, max_iters=max_iters,
                                 sample_weight=train_mask)
    weights = fit.weights
    val_logits = x_val @ weights.T
    accuracy = float(jnp.mean(jnp.argmax(val_logits, -1) == y_val))
    nll = float(softmax_regression_objective(weights, x_val, y_val, 0.0))
    log.info("co-tuning g: l2=%g val_accuracy=%.4f val_nll=%.4f iterations=%d grad_norm=%.2g",
             l2, accuracy, nll, int(fit.iterations), float(fit.grad_norm))
    candidates.append((accuracy, -nll, l2, weights))
  accuracy, _, l2, weights = max(candidates, key=lambda c: (c[0], c[1]))
  if len(candidates) > 1 and l2 in (min(l2_grid), max(l2_grid)):
    log.warning("co-tuning g: the chosen l2=%g is at the edge of l2_grid %s; consider extending it",
                l2, tuple(l2_grid))

  if calibrate_g:
    t_g = float(calibrate_temperature(logits=x_val @ weights.T, labels=y_val))
  else:
    t_g = 1.0
  if refit:
    weights = fit_softmax_regression(features=probs, labels=y_all, num_classes=num_classes,
                                     l2=l2, init=weights, tol=tol, max_iters=max_iters).weights
  relationship = bayes_relationship(weights=weights, temperature=t_g,
                                    source_prior=jnp.mean(probs, axis=0))
  log.info("co-tuning relationship (reverse): l2=%g val_accuracy=%.4f t_g=%.4f refit=%s",
           l2, accuracy, t_g, refit)
  return ReverseResult(np.asarray(relationship), l2, accuracy, t_g, np.asarray(weights))


# ----------------------------------------------------------------------------- cache


def _sha256_arrays(*arrays: Any) -> str:
  digest = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    digest.update(f"{a.dtype.str}{a.shape}".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def variables_fingerprint(variables: Any, *, exclude: Sequence[str] = ("params/head/",)) -> str:
  """sha256 of every variable whose '/'-joined path does not start with ``exclude``.

  The fresh target ``head`` is excluded: it does not enter the relationship.
  """
  digest = hashlib.sha256()
  entries = [(name, leaf) for name, leaf in flatten_paths(variables).items()
             if not any(name.startswith(prefix) for prefix in exclude)]
  for name, leaf in sorted(entries, key=lambda e: e[0]):
    digest.update(name.encode())
    digest.update(_sha256_arrays(leaf).encode())
  return digest.hexdigest()


def relationship_cache_key(**fields: Any) -> tuple[str, dict[str, Any]]:
  """``(sha256 hex, canonical field dict)`` of every input that changes the result.

  ``RELATIONSHIP_VERSION`` is always part of it.
  """
  key = dict(fields, code_version=RELATIONSHIP_VERSION)
  canonical = json.loads(json.dumps(key, sort_keys=True, default=str))
  digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
  return digest, canonical


def cache_paths(cache_dir: str | os.PathLike, *, dataset_name: str, approach: str,
                digest: str) -> tuple[str, str]:
  """``(.npy, .json sidecar)`` paths; the key digest is in the file name."""
  stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"relationship_{dataset_name}_{approach}_{digest[:20]}")
  base = os.path.join(os.fspath(cache_dir), stem)
  return base + ".npy", base + ".json"


def save_cached(path: str, sidecar: str, relationship: np.ndarray, key: dict[str, Any],
                info: dict[str, Any] | None = None) -> None:
  """Writes the matrix and its sidecar atomically (temp file + ``os.replace``).

  ``info`` (what ran: the temperatures used) is stored beside the key; it is
  not part of it.
  """
  relationship = np.asarray(relationship, np.float32)
  save_npy(path, relationship)
  meta = {"key": key, "shape": list(relationship.shape), "sha256": _sha256_arrays(relationship)}
  if info is not None:
    meta["info"] = info
  with atomic_file(sidecar) as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def load_cached(path: str, sidecar: str, key: dict[str, Any]) -> np.ndarray | None:
  """The cached matrix if its sidecar matches ``key`` and its bytes; else ``None``."""
  if not (os.path.exists(path) and os.path.exists(sidecar)):
    return None
  try:
    with open(sidecar) as f:
      meta = json.load(f)
    relationship = np.load(path)
  except (OSError, ValueError) as e:
    log.warning("ignoring unreadable relationship cache %s: %s", path, e)
    return None
  if meta.get("key") != key:
    log.warning("ignoring relationship cache %s: its key differs from this run's", path)
    return None
  if meta.get("sha256") != _sha256_arrays(relationship):
    log.warning("ignoring relationship cache %s: the array does not match its sidecar", path)
    return None
  return relationship


# ----------------------------------------------------------------------------- end to end


def source_logits_over(model: Any, variables: Any, dataset: Any, *, split: str = "train",
                       batch_size: int = 64, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """``(source_logits [N, S], labels [N])`` of ``split`` in eval mode with the eval transform.

  With several processes the per-process parts are gathered, so every process
  gets the same arrays.
  """
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False, outputs=("source_logits",))
                    ["source_logits"])
  try:
    out, labels = collect(lambda batch, i: {"logits": np.asarray(forward(variables, batch["image"]), np.float32)},
                          dataset.eval_batches(split, batch_size=batch_size),
                          progress=progress and jax.process_index() == 0,
                          description=f"source predictions ({dataset.name} {split})", gather=True)
  except ValueError:
    raise ValueError(f"the {split} split of {dataset.name} is empty") from None
  return out["logits"], labels.astype(np.int32)


def calibrate_source(*, model: Any, variables: Any, data: Any, split: str = "test",
                     batch_size: int = 64, progress: bool = True) -> float:
  """The source model's temperature by Alg. 2 on a held-out split of the *source* dataset.

  Runs the model's ``source_logits`` head (eval mode, eval transform) over
  ``split`` of ``data`` (an :class:`ftjax.data.ImageDataset` of the source
  dataset, e.g. ImageNet with its ``validation`` split read as ``"test"``) and
  returns :func:`calibrate_temperature` of those logits and labels. The
  source probabilities are then ``softmax(logits / t)``.

  Raises:
    ValueError: the split's label space is not the source head's.
  """
  def check(width):
    if int(data.num_classes) != int(width):
      raise ValueError(f"source calibration data {data.name!r} has {data.num_classes} classes but the "
                       f"source head has {width}: calibrate on the source model's own dataset")

  head = variables.get("params", {}).get("source_head", {}) if hasattr(variables, "get") else {}
  if "bias" in head:
    check(head["bias"].shape[-1])   # before running the model over the split
  logits, labels = source_logits_over(model, variables, data, split=split, batch_size=batch_size,
                                      progress=progress)
  check(logits.shape[1])
  t = float(calibrate_temperature(logits=jnp.asarray(logits), labels=jnp.asarray(labels)))
  log.info("co-tuning source calibration: t = %.4f from %d examples of %s (%s)", t, len(labels),
           data.name, split)
  return t


def source_calibration_key(*, source_temperature: float | None, data: Any = None,
                           split: str = "test") -> dict[str, Any]:
  """The cache-key part of the source calibration: its mode and what determines its value.

  ``"none"`` (``t = 1``), ``"value"`` (a given ``t``) or ``"split"`` (Alg. 2 on
  ``split`` of ``data``: its name, TFDS split, and a hash of its example indices
  and labels, so another subset of the source data is another key).
  """
  if data is not None:
    return {"mode": "split", "dataset": str(data.name), "split": str(data.tfds_split(split)),
            "examples_sha256": _sha256_arrays(np.asarray(data.example_indices(split), np.int64),
                                              np.asarray(data.labels(split), np.int32))}
  if source_temperature is not None:
    return {"mode": "value", "temperature": float(source_temperature)}
  return {"mode": "none"}


def compute_relationship(*, pretrained_name: str, dataset: Any, approach: str = "reverse",
                         source_temperature: float | None = None, source_calibration_data: Any = None,
                         source_calibration_split: str = "test", calibrate_g: bool = True,
                         cache_dir: str | os.PathLike | None = None, seed: int = 0,
                         batch_size: int = 64, model: Any = None, variables: Any = None,
                         val_fraction: float = 0.2, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                         progress: bool = True, return_info: bool = False
                         ) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
  """The Co-Tuning relationship of a pretrained model on ``dataset``'s train split, cached.

  Runs the pretrained model (eval mode, eval transform) over the target train
  split, turns its source logits into calibrated probabilities and applies the
  ``approach``. The result is cached as ``.npy`` + JSON sidecar in ``cache_dir``
  under a key of: pretrained name and a hash of the weights used (target head
  excluded), dataset name, class count, image size, a hash of the selected train
  example indices and labels (covers the sampling rate and sampling seed),
  ``seed``, approach, the source calibration (:func:`source_calibration_key`),
  ``calibrate_g``, the reverse options and :data:`RELATIONSHIP_VERSION`. A cache
  file is used only if its sidecar holds exactly this key and the array's hash.

  The two calibrations of Alg. 1 are separate options:

  * the *source* model's temperature ``t`` (probabilities ``softmax(logits / t)``):
    Alg. 2 on ``source_calibration_split`` of ``source_calibration_data`` (held-out
    data of the source dataset, the paper's protocol), or a given
    ``source_temperature`` (e.g. :data:`OFFICIAL_RESNET50_TEMPERATURE`, the official
    code's logit scale 0.884 of *its* ResNet-50), or neither: ``t = 1`` (logged);
  * ``g``'s temperature on the secondary val split (``calibrate_g``; reverse
    approach only). Both off is the paper's "w/o calibration" (Table 4).

  Args:
    pretrained_name: registry name, e.g. ``"efficientnet_lite0/imagenet"``.
    dataset: an :class:`ftjax.data.ImageDataset`.
    approach: ``"reverse"`` (Alg. 1) or ``"direct"`` (Eq. 3).
    source_temperature: a given source temperature ``t > 0``, or ``None``.
    source_calibration_data: a dataset of the source task (its labels are the
      source head's classes) whose ``source_calibration_split`` is held out; or ``None``.
    source_calibration_split: the logical split of ``source_calibration_data`` read.
    calibrate_g: calibrate ``g`` on the secondary val (reverse approach).
    cache_dir: cache directory (default ``$FTJAX_CACHE/relationships``).
    seed: seed of the secondary split (reverse approach).
    batch_size: evaluation batch size.
    model, variables: a model with ``source_logits`` and its variables (default:
      ``models.pretrained(pretrained_name, num_classes=dataset.num_classes)``).
    val_fraction, l2_grid: reverse-approach options.
    progress: tqdm bar over the evaluation batches.
    return_info: also return what ran: ``{"source_calibration": mode,
      "source_temperature": t, "source_calibration_data": "name:split" | None,
      "calibrate_g": bool | None, "temperature_g": t_g | None, "cached": bool}``.

  Returns:
    float32 ``[dataset.num_classes, num_source]``, rows summing to 1 (and the info
    dict with ``return_info``).
  """
  from ftjax import models  # local: models import is heavy

  if approach not in APPROACHES:
    raise ValueError(f"unknown approach {approach!r}; expected one of {APPROACHES}")
  if source_temperature is not None and not source_temperature > 0:
    raise ValueError(f"source_temperature must be > 0 or None, got {source_temperature}")
  if source_temperature is not None and source_calibration_data is not None:
    raise ValueError("give either source_temperature or source_calibration_data, not both")
  if (model is None) != (variables is None):
    raise ValueError("pass both model and variables, or neither")
  if model is None:
    entry = models.pretrained(pretrained_name, num_classes=dataset.num_classes,
                              keep_source_head=True, seed=seed)
    model, variables = entry.model, entry.variables
  if cache_dir is None:
    cache_dir = os.path.join(models.registry.default_cache_dir(), "relationships")

  source_key = source_calibration_key(source_temperature=source_temperature, data=source_calibration_data,
                                      split=source_calibration_split)
  reverse = approach == "reverse"
  resize_size = getattr(dataset, "resize_size", getattr(dataset, "_resize_size", None))
  digest, key = relationship_cache_key(
      pretrained_name=pretrained_name,
      weights_sha256=variables_fingerprint(variables),
      dataset=dataset.name,
      num_classes=int(dataset.num_classes),
      image_size=int(dataset.image_size),
      resize_size=None if resize_size is None else int(resize_size),
      train_examples_sha256=_sha256_arrays(np.asarray(dataset.example_indices("train"), np.int64),
                                           np.asarray(dataset.labels("train"), np.int32)),
      process_count=jax.process_count(),
      seed=int(seed),
      approach=approach,
      source_calibration=source_key,
      calibrate_g=bool(calibrate_g) if reverse else None,
      val_fraction=float(val_fraction) if reverse else None,
      l2_grid=[float(v) for v in l2_grid] if reverse else None,
  )
  path, sidecar = cache_paths(cache_dir, dataset_name=dataset.name, approach=approach, digest=digest)
  cached = load_cached(path, sidecar, key)
  if cached is not None:
    log.info("co-tuning relationship: loaded %s", path)
    if not return_info:
      return cached
    with open(sidecar) as f:
      info = dict(json.load(f).get("info") or {})
    return cached, dict(info, cached=True)

  if source_calibration_data is not None:
    temperature = calibrate_source(model=model, variables=variables, data=source_calibration_data,
                                   split=source_calibration_split, batch_size=batch_size,
                                   progress=progress)
  elif source_temperature is not None:
    temperature = float(source_temperature)
    log.info("co-tuning relationship: source model at the given t = %.4f (not calibrated on this "
             "model's source data)", temperature)
  else:
    temperature = 1.0
    log.info("co-tuning relationship: no source calibration data or temperature given; "
             "the source model is used at t = 1")
  logits, labels = source_logits_over(model, variables, dataset, batch_size=batch_size,
                                      progress=progress)
  probs = jax.nn.softmax(jnp.asarray(logits) / temperature, axis=-1)
  temperature_g = None
  if approach == "direct":
    relationship = np.asarray(direct_relationship(probs=probs, labels=labels,
                                                  num_classes=dataset.num_classes))
  else:
    result = reverse_relationship(
        source_probs=probs, labels=labels, num_classes=dataset.num_classes, seed=seed,
        val_fraction=val_fraction, l2_grid=l2_grid, calibrate_g=calibrate_g)
    relationship, temperature_g = result.relationship, float(result.temperature_g)
  relationship = np.asarray(relationship, np.float32)
  info = {"source_calibration": source_key["mode"], "source_temperature": temperature,
          "source_calibration_data": (f"{source_key['dataset']}:{source_key['split']}"
                                      if source_key["mode"] == "split" else None),
          "calibrate_g": bool(calibrate_g) if reverse else None, "temperature_g": temperature_g}
  if jax.process_index() == 0:
    save_cached(path, sidecar, relationship, key, info=info)
    log.info("co-tuning relationship: wrote %s", path)
  return (relationship, dict(info, cached=False)) if return_info else relationship


# ----------------------------------------------------------------------------- Fig. 1


def _short(name: str, width: int = 28) -> str:
  """Class names such as 'jersey, T-shirt, tee shirt' cut to fit a tick label."""
  return name if len(name) <= width else name[: width - 1] + "…"


def plot_relationship(relationship: Any, *, target_names: Sequence[str],
                      source_names: Sequence[str], path: str | os.PathLike, top: int = 5,
                      classes: Sequence[int] | None = None, columns: int = 4) -> str:
  """The paper's Fig. 1: each target class with its ``top`` source classes.

  One small horizontal bar chart per target class (names and probabilities).

  Args:
    relationship: ``[num_target, num_source]``.
    target_names, source_names: class names, index-aligned.
    path: PNG file written.
    top: source classes shown per target class.
    classes: target class indices to show (default all).
    columns: panels per row.

  Returns:
    ``path`` as a string.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rel = np.asarray(relationship)
  if rel.ndim != 2 or rel.shape != (len(target_names), len(source_names)):
    raise ValueError(f"relationship shape {rel.shape} does not match "
                     f"{len(target_names)} target and {len(source_names)} source names")
  if not 1 <= top <= rel.shape[1]:
    raise ValueError(f"top must be in [1, {rel.shape[1]}], got {top}")
  classes = list(range(rel.shape[0])) if classes is None else [int(c) for c in classes]
  if not classes or min(classes) < 0 or max(classes) >= rel.shape[0]:
    raise ValueError(f"classes must be non-empty indices in [0, {rel.shape[0]}), got {classes}")
  columns = max(1, min(columns, len(classes)))
  rows = math.ceil(len(classes) / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 0.3 * top * rows + 0.7 * rows),
                           squeeze=False, layout="constrained")
  for ax in axes.ravel()[len(classes):]:
    ax.axis("off")
  for ax, c in zip(axes.ravel(), classes):
    order = np.argsort(-rel[c])[:top]
    ax.barh(range(top), rel[c, order][::-1], color="tab:blue")
    ax.set_yticks(range(top), [_short(source_names[i]) for i in order][::-1], fontsize=7)
    ax.set_xlim(0, 1)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(str(target_names[c]), fontsize=9)
    for y, p in enumerate(rel[c, order][::-1]):
      ax.text(min(p, 0.8) + 0.01, y, f"{p:.2f}", va="center", fontsize=7)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path

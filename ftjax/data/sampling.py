"""Index selection for the data pipeline, in NumPy only: sampling rates and stratified splits.

No TensorFlow here, so methods (Co-Tuning's secondary split) can use it on in-memory arrays.

Example:
  >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  >>> train, val = stratified_split(labels, 0.25, seed=0)
  >>> len(train), len(val)
  (6, 2)
  >>> len(select_val(labels, val, sampling_rate=50, val_source="full"))
  2
"""

from __future__ import annotations

import math

import numpy as np

# Fixed seed of the train/val split and of the val subsampling: val never depends
# on the run seed, so model selection is comparable across runs.
SPLIT_SEED = 20_240_601

# Where the validation split comes from (``dataset.val_source``):
#   "sampled": the held-out pool sampled at the training rate (the realistic low-data
#              setting: no more labels for validation than the rate gives);
#   "full":    the whole held-out pool, not sampled (Co-Tuning Sec. 5 / Bi-Tuning: a
#              fixed 20% of the train split, or the dataset's validation split).
VAL_SOURCES = ("sampled", "full")


def check_val_source(val_source: str) -> str:
  """``val_source`` if it is one of :data:`VAL_SOURCES`, else a one-line ValueError."""
  if val_source not in VAL_SOURCES:
    raise ValueError(f"val_source must be 'sampled' (val sampled at the training rate) or 'full' "
                     f"(the whole held-out split), got {val_source!r}")
  return val_source



def check_sampling_rate(rate: float) -> float:
  """Validates a sampling rate in percent, ``0 < rate <= 100``."""
  rate = float(rate)
  if not 0.0 < rate <= 100.0:  # also rejects NaN
    raise ValueError(f"sampling_rate must be in (0, 100] (percent), got {rate}")
  return rate


def class_keep_count(rate: float, n: int) -> int:
  """``ceil(rate / 100 * n)``, at least 1 for a non-empty class.

  Rounded to 9 decimals first so that e.g. 15% of 20 is 3, not 4 (float noise).
  """
  if n == 0:
    return 0
  return max(1, min(n, math.ceil(round(rate * n / 100.0, 9))))


def _class_permutation(indices: np.ndarray, seed: int, label: int) -> np.ndarray:
  rng = np.random.default_rng([seed, int(label)])
  return indices[rng.permutation(len(indices))]


def stratified_sample(labels: np.ndarray, pool: np.ndarray, rate: float,
                      seed: int) -> np.ndarray:
  """Stratified per-class subset of ``pool`` (indices into ``labels``).

  For each class c, the pool's c-indices (ascending) are permuted with a generator
  seeded by ``(seed, c)`` and the first ``ceil(rate/100 * n_c)`` are kept. Subsets
  for one seed are nested across rates.

  Args:
    labels: int labels of the whole TFDS split.
    pool: candidate example indices (e.g. the train part of the split).
    rate: percent in (0, 100].
    seed: sampling seed.

  Returns:
    Sorted selected indices.
  """
  rate = check_sampling_rate(rate)
  pool = np.sort(np.asarray(pool, np.int64))
  if rate == 100.0:
    return pool
  pool_labels = labels[pool]
  kept = []
  for c in np.unique(pool_labels):
    members = pool[pool_labels == c]
    kept.append(_class_permutation(members, seed, c)[:class_keep_count(rate, len(members))])
  return np.sort(np.concatenate(kept)) if kept else pool[:0]


def stratified_split(labels: np.ndarray, val_fraction: float,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Stratified ``(train, val)`` split of ``range(len(labels))``.

  Per class: a permutation seeded by ``(seed, c)``; the first
  ``round(val_fraction * n_c)`` (clamped so both sides keep an example when
  ``n_c >= 2``) go to val.

  Returns:
    Sorted ``(train_indices, val_indices)``.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  all_idx = np.arange(len(labels), dtype=np.int64)
  train, val = [], []
  for c in np.unique(labels):
    members = _class_permutation(all_idx[labels == c], seed, c)
    n_val = int(round(val_fraction * len(members)))
    if len(members) >= 2:
      n_val = min(max(n_val, 1), len(members) - 1)
    else:
      n_val = 0
    val.append(members[:n_val])
    train.append(members[n_val:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def select_val(labels: np.ndarray, pool: np.ndarray, *, sampling_rate: float,
               val_source: str) -> np.ndarray:
  """The validation examples taken from the held-out ``pool`` (indices into ``labels``).

  ``pool`` is held out from training: the dataset's validation split, or the
  ``val`` part of :func:`stratified_split` of the train split (seed ``SPLIT_SEED``).
  Training is sampled from the rest, so train and val never overlap in either mode.

  * ``"sampled"``: ``stratified_sample(labels, pool, sampling_rate, SPLIT_SEED)``,
    per class ``ceil(rate / 100 * n_c)`` of the pool, the same for every run seed
    and nested across rates.
  * ``"full"``: the whole pool, the same for every rate and run seed. With the
    pool of ``stratified_split(labels, val_fraction)`` this is the protocol of
    Co-Tuning (papers/co-tuning.txt, Sec. 5: "20% training data are used for
    validation (split once and then the validation set is fixed) and the rest
    80% training data are used for training. Sampling rate further determines
    the actually used training data").

  Args:
    labels: int labels of the split ``pool`` indexes.
    pool: held-out example indices.
    sampling_rate: the run's rate in percent, ``(0, 100]`` (unused by ``"full"``).
    val_source: ``"sampled"`` or ``"full"``.

  Returns:
    Sorted selected indices.
  """
  check_val_source(val_source)
  check_sampling_rate(sampling_rate)
  if val_source == "full":
    return np.sort(np.asarray(pool, np.int64))
  return stratified_sample(labels, pool, sampling_rate, SPLIT_SEED)

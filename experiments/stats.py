r"""Seed statistics for result tables: means with Student-t intervals, paired differences.

Two rows of a table run the same seeds, and a seed fixes the sampled training
subset, the new heads' initialisation and the augmentation, so rows are compared
by the *paired* difference (row A's seed s minus row B's seed s): the seed's own
luck cancels, and the interval of the mean difference is the paired t interval

  d̄ ± t_{0.975, n-1} · s_d / √n,

with s_d the sample standard deviation (ddof 1) of the n per-seed differences.
"A beats B" is claimed only where that interval excludes 0.

>>> iv = mean_interval([0.80, 0.82, 0.81])
>>> round(iv.mean, 4), round(iv.low, 4), round(iv.high, 4)
(0.81, 0.7852, 0.8348)
>>> d = paired_difference({0: 0.83, 1: 0.84, 2: 0.85}, {0: 0.80, 1: 0.82, 2: 0.81})
>>> d.seeds, round(d.mean, 4), d.excludes_zero
((0, 1, 2), 0.03, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as _scipy_stats

CONFIDENCE = 0.95


class Interval(NamedTuple):
  """Mean of ``n`` values with its two-sided t interval (``low``/``high`` are NaN for n < 2)."""
  mean: float
  std: float          # sample standard deviation (ddof 1); NaN for n < 2
  low: float
  high: float
  n: int

  @property
  def excludes_zero(self) -> bool:
    return self.n >= 2 and (self.low > 0 or self.high < 0)


class PairedDifference(NamedTuple):
  """``a - b`` over the seeds both rows ran: the mean difference and its t interval."""
  mean: float
  std: float
  low: float
  high: float
  n: int
  seeds: tuple[int, ...]

  @property
  def excludes_zero(self) -> bool:
    return self.n >= 2 and (self.low > 0 or self.high < 0)


def mean_interval(values: Sequence[float], *, confidence: float = CONFIDENCE) -> Interval:
  """The mean of ``values`` and its Student-t confidence interval.

  Args:
    values: one figure per seed (NaNs, e.g. a diverged run, make every field NaN).
    confidence: two-sided coverage.

  Raises:
    ValueError: ``values`` is empty or ``confidence`` is not in (0, 1).
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  x = np.asarray(values, dtype=np.float64)
  if x.size == 0:
    raise ValueError("mean_interval needs at least one value")
  n = int(x.size)
  mean = float(x.mean())
  if n < 2:
    return Interval(mean, math.nan, math.nan, math.nan, n)
  std = float(x.std(ddof=1))
  half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
  return Interval(mean, std, mean - half, mean + half, n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], *,
                      confidence: float = CONFIDENCE) -> PairedDifference:
  """Row ``a`` minus row ``b`` paired by seed, over the seeds both have.

  Args:
    a: ``{seed: figure}`` of one row.
    b: ``{seed: figure}`` of the other.
    confidence: two-sided coverage.

  Raises:
    ValueError: the rows share no seed.
  """
  seeds = tuple(sorted(set(a) & set(b)))
  if not seeds:
    raise ValueError(f"the rows share no seed (a: {sorted(a)}, b: {sorted(b)})")
  iv = mean_interval([a[s] - b[s] for s in seeds], confidence=confidence)
  return PairedDifference(iv.mean, iv.std, iv.low, iv.high, iv.n, seeds)


def format_points(iv: Interval | PairedDifference, *, signed: bool = False) -> str:
  """``"82.10 [81.50, 82.70]"`` in points (figures are fractions); one seed: no interval."""
  sign = "+" if signed else ""
  if math.isnan(iv.mean):
    return "diverged"
  if iv.n < 2:
    return f"{100 * iv.mean:{sign}.2f} (1 seed)"
  return f"{100 * iv.mean:{sign}.2f} [{100 * iv.low:{sign}.2f}, {100 * iv.high:{sign}.2f}]"

"""User errors that the command line reports as one line."""

from __future__ import annotations

import numpy as np


class ConfigError(ValueError):
  """A configuration value that cannot work."""


class RunError(RuntimeError):
  """A run that cannot go on for a reason outside the config (a locked workdir, no checkpoint
  that restores, a failed checkpoint write): reported in one line, nothing lost."""


def check_labels(labels: np.ndarray, num_classes: int, *, what: str = "") -> None:
  """A ValueError when a label lies outside ``[0, num_classes)``.

  Example:
    >>> check_labels(np.array([0, 3]), 3)
    Traceback (most recent call last):
    ...
    ValueError: labels out of range: found [0, 3] for a dataset with 3 classes
  """
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{what + ' ' if what else ''}labels out of range: found [{labels.min()}, "
                     f"{labels.max()}] for a dataset with {num_classes} classes")


def is_concrete(x) -> bool:
  """Whether ``x`` has values now (not a tracer under ``jit``/``vmap``/``grad``): value checks
  run only then, shape checks always."""
  import jax
  return not isinstance(x, jax.core.Tracer)

"""Builds loss components from the ``losses`` section of a config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ftjax.methods.bi_tuning import BiTuning
from ftjax.methods.co_tuning import CoTuning
from ftjax.methods.data_reuse import DataReuse
from ftjax.methods.finetune import CrossEntropy
from ftjax.methods.regularizers import L2SP, BatchSpectralShrinkage, Delta, LwF
from ftjax.methods.spottune import SpotTune

_FACTORIES: dict[str, Callable[..., Any]] = {
    "ce": CrossEntropy,
    "co_tuning": CoTuning,
    "data_reuse": DataReuse,
    "l2_sp": L2SP,
    "delta": Delta,
    "bss": BatchSpectralShrinkage,
    "lwf": LwF,
    "bi_tuning": BiTuning,
    "spottune": SpotTune,
}


def known_components() -> list[str]:
  return sorted(_FACTORIES)


def register_component(name: str, factory: Callable[..., Any]) -> None:
  """Makes ``name`` usable in ``config.losses``."""
  _FACTORIES[name] = factory


def build_components(losses: Mapping[str, Mapping[str, Any]]) -> list[Any]:
  """``{"ce": {"weight": 1.0}, ...}`` -> component objects, in a stable order."""
  components = []
  for name in losses:
    if name not in _FACTORIES:
      raise ValueError(f"unknown loss component {name!r}; known: {', '.join(known_components())}")
    options = dict(losses[name])
    try:
      components.append(_FACTORIES[name](**options))
    except TypeError as e:
      raise ValueError(f"bad options {sorted(options)} for loss component {name!r}: {e}") from None
  if not components:
    raise ValueError("config.losses is empty: at least one loss component is needed")
  return components

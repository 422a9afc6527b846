"""Builds methods from the ``losses`` section of a config (and its two shorthands)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ftjax.methods.bi_tuning import BiTuning
from ftjax.methods.co_tuning import CoTuning
from ftjax.methods.data_reuse import DataReuse
from ftjax.methods.finetune import CrossEntropy
from ftjax.methods.patches import ModelPatch
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
    "patch": ModelPatch,
}


def known_methods() -> list[str]:
  return sorted(_FACTORIES)


def register_method(name: str, factory: Callable[..., Any]) -> None:
  """Makes ``name`` usable in ``config.losses``."""
  _FACTORIES[name] = factory


def build_methods(losses: Mapping[str, Mapping[str, Any]]) -> list[Any]:
  """``{"ce": {"weight": 1.0}, ...}`` -> method objects, in a stable order."""
  methods = []
  for name in losses:
    if name not in _FACTORIES:
      raise ValueError(f"unknown loss component {name!r}; known: {', '.join(known_methods())}")
    options = dict(losses[name])
    try:
      methods.append(_FACTORIES[name](**options))
    except TypeError as e:
      raise ValueError(f"bad options {sorted(options)} for loss component {name!r}: {e}") from None
  if not methods:
    raise ValueError("config.losses is empty: at least one loss component is needed")
  return methods


def config_losses(config: Any) -> dict[str, dict[str, Any]]:
  """``config.losses`` with the config's shorthands expanded.

  * ``baseline = "patch"`` adds the ``patch`` method with ``config.patch``'s options;
  * ``reuse.enabled`` adds (last) the ``data_reuse`` method with ``config.reuse``'s
    options (an explicit ``losses.data_reuse`` entry overrides them).
  """
  losses = {name: dict(options) for name, options in config.losses.items()}
  if config.get("baseline") == "patch" and "patch" not in losses:
    losses["patch"] = {"selection": config.patch.selection, "train_head": bool(config.patch.train_head)}
  reuse = config.get("reuse")
  if reuse is not None and reuse.enabled:
    options = {"weight": reuse.weight, "mode": reuse.mode, "dataset": reuse.dataset,
               "classes": tuple(reuse.classes), "indices_path": reuse.indices_path,
               "sampling_rate": reuse.sampling_rate, "weak_crop_scale": tuple(reuse.weak_crop_scale)}
    if "data_reuse" in losses:
      explicit = losses.pop("data_reuse")
      if explicit.get("mode", reuse.mode) != reuse.mode:
        raise ValueError(f"reuse.mode={reuse.mode!r} but losses.data_reuse.mode={explicit['mode']!r}")
      options.update(explicit)
    losses["data_reuse"] = options
  return losses

"""Optimizers over parameter groups: SGD (momentum / Nesterov) with decoupled weight decay.

Each group named by :func:`ftjax.core.paths.path_labels` gets its own transform inside
:func:`optax.partition`: frozen groups get :func:`optax.set_to_zero` (never
``optax.masked`` alone, which would pass raw gradients through) and no weight
decay; trainable groups get momentum, decoupled weight decay and the shared
learning-rate schedule times the group's multiplier.

Example:
  >>> schedule = make_schedule(name="cosine", base_lr=0.01, total_steps=1000)
  >>> tx = make_optimizer(labels=labels, groups={"head": GroupConfig(lr_mult=10.0),
  ...                     "backbone": GroupConfig()}, schedule=schedule)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import optax


@dataclasses.dataclass(frozen=True)
class GroupConfig:
  """How one parameter group trains.

  Attributes:
    lr_mult: multiplier on the shared learning-rate schedule.
    weight_decay: decoupled weight decay; ``None`` means the optimizer's default.
    frozen: parameters of this group never change (zero updates, no decay).
  """
  lr_mult: float = 1.0
  weight_decay: float | None = None
  frozen: bool = False

  @classmethod
  def from_mapping(cls, mapping: Mapping[str, Any]) -> "GroupConfig":
    unknown = set(mapping) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown parameter-group option(s) {sorted(unknown)}; "
                       f"known: lr_mult, weight_decay, frozen")
    return cls(**dict(mapping))


SCHEDULES = ("constant", "cosine", "multistep")


def make_schedule(
    *,
    name: str,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    boundaries: Sequence[float] = (0.5, 0.75),
    decay_factor: float = 0.1,
) -> optax.Schedule:
  """Learning-rate schedule.

  Args:
    name: ``"constant"``, ``"cosine"`` (to zero at ``total_steps``) or
      ``"multistep"`` (times ``decay_factor`` at each boundary; boundaries below 1
      are fractions of ``total_steps``, others are step numbers).
    base_lr: peak learning rate.
    total_steps: length of training.
    warmup_steps: linear warm-up from 0.
    boundaries: multistep boundaries.
    decay_factor: multistep factor.
  """
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
  total_steps = max(int(total_steps), 1)
  decay_steps = max(total_steps - warmup_steps, 1)
  if name == "constant":
    main = optax.constant_schedule(base_lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(base_lr, decay_steps)
  else:
    steps = [int(b * total_steps) if b < 1 else int(b) for b in boundaries]
    steps = [max(s - warmup_steps, 1) for s in steps]
    main = optax.piecewise_constant_schedule(base_lr, {s: decay_factor for s in steps})
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def sgdw(
    schedule: optax.Schedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """SGD with momentum and decoupled weight decay (decay scaled by the lr, not by momentum)."""
  parts = [optax.trace(decay=momentum, nesterov=nesterov)] if momentum else []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


def make_optimizer(
    *,
    labels: Any,
    groups: Mapping[str, GroupConfig],
    schedule: optax.Schedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """One :func:`optax.partition` over the groups named in ``labels``."""
  transforms = {}
  for name, group in groups.items():
    if group.frozen:
      transforms[name] = optax.set_to_zero()
      continue
    decay = weight_decay if group.weight_decay is None else group.weight_decay
    mult = group.lr_mult
    transforms[name] = sgdw(
        lambda step, mult=mult: schedule(step) * mult,
        momentum=momentum, nesterov=nesterov, weight_decay=decay)
  return optax.partition(transforms, labels)

"""Optimizers over parameter groups: SGD (momentum / Nesterov) with coupled or decoupled weight decay.

Each group named by :func:`ftjax.core.paths.path_labels` gets its own transform inside
:func:`optax.partition`: frozen groups get :func:`optax.set_to_zero` (never
``optax.masked`` alone, which would pass raw gradients through) and no weight
decay; trainable groups get SGD with momentum, the group's weight decay and the
shared learning-rate schedule times the group's multiplier.

Weight decay comes in two forms (``weight_decay_mode``):

* ``"coupled"``: ``torch.optim.SGD`` (``dampening=0``): the decay is added to the
  gradient before the momentum trace, ``g <- g + wd * p``, so it is amplified by
  momentum like the gradient (about ``1 / (1 - momentum)`` = 10x at 0.9). This is
  the optimizer of every reference implementation the paper configs follow
  (TLlib, the official Co-Tuning and SpotTune code: ``SGD(..., momentum=0.9,
  weight_decay=5e-4)``).
* ``"decoupled"``: decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight
  Decay Regularization", 2019, SGDW) with the decay scaled by the learning rate:
  ``p <- p - lr * (momentum_direction + wd * p)``; at the same ``wd`` about ten times
  weaker than coupled decay at momentum 0.9.

Example:
  >>> params = {"head": {"kernel": jnp.ones((4, 2))}, "backbone": {"kernel": jnp.ones((3, 4))}}
  >>> labels = {"head": {"kernel": "head"}, "backbone": {"kernel": "backbone"}}
  >>> schedule = make_schedule(name="cosine", base_lr=0.01, total_steps=1000)
  >>> tx = make_optimizer(labels=labels, groups={"head": GroupConfig(lr_mult=10.0),
  ...                     "backbone": GroupConfig()}, schedule=schedule,
  ...                     weight_decay=5e-4, weight_decay_mode="coupled")
  >>> state = tx.init(params)
  >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  >>> jax.tree.map(lambda u: u.shape, updates)
  {'backbone': {'kernel': (3, 4)}, 'head': {'kernel': (4, 2)}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import optax

from ftjax.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GroupConfig:
  """How one parameter group trains.

  Attributes:
    lr_mult: multiplier on the shared learning-rate schedule.
    weight_decay: the group's weight decay (coupled or decoupled, as the
      optimizer's ``weight_decay_mode``); ``None`` means the optimizer's default.
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
WEIGHT_DECAY_MODES = ("coupled", "decoupled")


def check_weight_decay_mode(mode: str) -> str:
  """``mode`` if it is one of :data:`WEIGHT_DECAY_MODES`, else a one-line :class:`ConfigError`."""
  if mode not in WEIGHT_DECAY_MODES:
    raise ConfigError(f"optimizer.weight_decay_mode must be 'coupled' (torch.optim.SGD) or "
                      f"'decoupled' (SGDW), got {mode!r}")
  return mode


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


def sgd(
    schedule: optax.Schedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "decoupled",
) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and coupled or decoupled weight decay.

  With ``lr = schedule(t)`` (``t`` counts updates from 0), momentum ``mu`` and
  decay ``wd``, one update of a parameter ``p`` with gradient ``g`` is:

  * ``"coupled"`` (``torch.optim.SGD`` with ``dampening=0``; the algorithm box of
    https://pytorch.org/docs/stable/generated/torch.optim.SGD.html)::

        g = g + wd * p;  b = mu * b + g  (b = 0 before the first step)
        d = g + mu * b  if nesterov else b;  p = p - lr * d

  * ``"decoupled"`` (SGDW, the decay outside the momentum trace)::

        b = mu * b + g;  d = g + mu * b  if nesterov else b;  p = p - lr * (d + wd * p)

  ``momentum=0`` drops the trace (``d = g``), where the two modes coincide.

  Args:
    schedule: learning rate per step.
    momentum: ``mu``; 0 for plain SGD.
    nesterov: Nesterov momentum (torch's ``nesterov=True``).
    weight_decay: ``wd``.
    weight_decay_mode: ``"coupled"`` or ``"decoupled"``.

  Raises:
    ConfigError: unknown ``weight_decay_mode``.
  """
  check_weight_decay_mode(weight_decay_mode)
  decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  trace = [optax.trace(decay=momentum, nesterov=nesterov)] if momentum else []
  parts = decay + trace if weight_decay_mode == "coupled" else trace + decay
  return optax.chain(*parts, optax.scale_by_learning_rate(schedule))


def sgdw(
    schedule: optax.Schedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """SGD with momentum and decoupled weight decay: :func:`sgd` with ``weight_decay_mode="decoupled"``."""
  return sgd(schedule, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
             weight_decay_mode="decoupled")


def make_optimizer(
    *,
    labels: Any,
    groups: Mapping[str, GroupConfig],
    schedule: optax.Schedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "decoupled",
) -> optax.GradientTransformation:
  """One :func:`optax.partition` over the groups named in ``labels``.

  A trainable group trains with :func:`sgd` at ``schedule * lr_mult`` and its own
  ``weight_decay`` (``weight_decay`` when the group sets none), all groups in one
  ``weight_decay_mode``; a frozen group gets zero updates and no decay. As
  ``torch.optim.SGD`` param groups with ``lr = base_lr * lr_mult`` under one
  ``LambdaLR`` (coupled mode).

  ``weight_decay_mode`` defaults to ``"decoupled"``, this function's behaviour
  before the mode existed; the paper configs set ``"coupled"``
  (``optimizer.weight_decay_mode``; see :func:`ftjax.train.config.default_config`).

  Raises:
    ConfigError: unknown ``weight_decay_mode``.
  """
  check_weight_decay_mode(weight_decay_mode)
  transforms = {}
  for name, group in groups.items():
    if group.frozen:
      transforms[name] = optax.set_to_zero()
      continue
    decay = weight_decay if group.weight_decay is None else group.weight_decay
    mult = group.lr_mult
    transforms[name] = sgd(
        lambda step, mult=mult: schedule(step) * mult,
        momentum=momentum, nesterov=nesterov, weight_decay=decay, weight_decay_mode=weight_decay_mode)
  return optax.partition(transforms, labels)

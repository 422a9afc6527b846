"""One training step for every method, and the evaluation step.

The step sums ``weight * term`` over the run's methods, takes one
``jax.value_and_grad``, applies the optimizer, updates the methods' states and
returns ``(state, metrics)``. It is compiled once with ``jax.jit`` over the data
mesh: batch sharded on ``"data"``, state replicated and donated, the frozen
source model (the pretrained variables, for the methods that read it) replicated
and not donated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ftjax.losses import softmax_cross_entropy
from ftjax.train import sharding as shd
from ftjax.train.state import TrainState


def required_outputs(methods: Sequence[Any]) -> tuple[str, ...]:
  """The forward outputs the methods read (``logits`` always: accuracy)."""
  names = ["logits"]
  for m in methods:
    names.extend(o for o in m.outputs if o not in names)
  return tuple(names)


def rng_streams(methods: Sequence[Any]) -> tuple[str, ...]:
  """The Flax rng streams the methods' models read, in first-declared order."""
  names: list[str] = []
  for m in methods:
    names.extend(s for s in m.rng_streams if s not in names)
  return tuple(names)


def make_train_step(
    *,
    model: Any,
    optimizer: optax.GradientTransformation,
    methods: Sequence[Any],
    train_bn: bool = True,
    frozen_mask: Any = None,
) -> Callable[[TrainState, dict[str, jax.Array], Any], tuple[TrainState, dict[str, jax.Array]]]:
  """The un-jitted step function ``(state, batch, source) -> (state, metrics)``; see :func:`jit_train_step`.

  Args:
    model: Linen module returning a dict of named outputs.
    optimizer: the partitioned optimizer (frozen groups use ``set_to_zero``).
    methods: the run's methods (:class:`ftjax.methods.Method`).
    train_bn: run BatchNorm in training mode (batch statistics; every running
      average is re-estimated on the task). False: running statistics, unchanged.
    frozen_mask: pytree over ``params``; True marks a frozen parameter. Frozen
      parameters enter the loss through ``stop_gradient`` so no backward pass is
      spent on them (a linear probe costs a forward pass plus the head).
  """
  outputs_needed = required_outputs(methods)
  streams = rng_streams(methods)

  def step(state: TrainState, batch: dict[str, jax.Array], source: Any = None):
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      if frozen_mask is not None:
        params = jax.tree.map(lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p, params, frozen_mask)
      variables = {"params": params}
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
      rngs = {name: jax.random.fold_in(step_rng, 2**20 + i) for i, name in enumerate(streams)}
      if train_bn and state.batch_stats:
        outputs, new_vars = model.apply(variables, batch["image"], train=True, outputs=outputs_needed,
                                        mutable=["batch_stats"], rngs=rngs)
        new_stats = new_vars["batch_stats"]
      else:
        outputs = model.apply(variables, batch["image"], train=False, outputs=outputs_needed, rngs=rngs)
        new_stats = state.batch_stats
      # Extra rows (a method's mix_batch) follow the target rows ("label" covers the
      # target rows only); methods see the target rows unless they read the extra rows.
      all_outputs = outputs
      target_rows = batch["label"].shape[0]
      if batch["image"].shape[0] != target_rows:
        outputs = jax.tree.map(lambda x: x[:target_rows], outputs)
      total = 0.0
      metrics: dict[str, jax.Array] = {}
      new_method_state = {}
      for i, method in enumerate(methods):
        term = method(outputs=all_outputs if method.reads_extra_rows else outputs,
                      batch=batch, state=state.method_state[method.name],
                      params=params, rng=jax.random.fold_in(step_rng, i), source=source)
        if term is None:  # a method without a loss term (a model patch)
          new_method_state[method.name] = state.method_state[method.name]
          continue
        # Losses add up in float32 whatever the model computes in (bfloat16 mixed precision).
        total = total + method.weight * jnp.asarray(term.loss, jnp.float32)
        metrics[f"loss/{method.name}"] = term.loss
        for key, value in (term.metrics or {}).items():
          metrics[f"{method.name}/{key}"] = value
        new_method_state[method.name] = term.state
      metrics["accuracy"] = jnp.mean(jnp.argmax(outputs["logits"], -1) == batch["label"])
      return total, (new_stats, new_method_state, metrics)

    (loss, (new_stats, new_method_state, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state, method_state=new_method_state)
    return new_state, metrics

  return step


def jit_train_step(step_fn: Callable, *, mesh: Mesh, state: TrainState) -> Callable:
  """Compiles the step over ``mesh``: batch on ``"data"``, state replicated and donated,
  the source replicated."""
  state_shardings = shd.state_sharding(mesh, state)
  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, shd.batch_sharding(mesh), shd.replicated(mesh)),
      out_shardings=(state_shardings, shd.replicated(mesh)),
      donate_argnums=(0,),
  )


def make_eval_step(*, model: Any, num_classes: int, mesh: Mesh, rngs: Sequence[str] = ()) -> Callable:
  """Jitted evaluation: counts of correct predictions, overall and per class.

  Returns a function ``(variables, batch) -> dict`` with ``correct``, ``count``,
  ``class_correct [C]``, ``class_count [C]`` and ``loss_sum``; padded examples
  (``mask == 0``) count nowhere. ``rngs`` (the methods' rng streams) get fixed
  keys, so a sampled inference routing is the same in every evaluation.
  """

  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False, outputs=("logits",),
                         rngs={name: jax.random.PRNGKey(i) for i, name in enumerate(rngs)})["logits"]
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
    one_hot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
    nll = softmax_cross_entropy(logits=logits, labels=labels, reduction="none") * mask
    return {
        "correct": jnp.sum(correct),
        "count": jnp.sum(mask),
        "class_correct": jnp.sum(one_hot * correct[:, None], axis=0),
        "class_count": jnp.sum(one_hot, axis=0),
        "loss_sum": jnp.sum(nll),
    }

  return jax.jit(eval_step, in_shardings=(shd.replicated(mesh), shd.batch_sharding(mesh)),
                 out_shardings=shd.replicated(mesh))


def summarize_eval(totals: dict[str, Any]) -> dict[str, float]:
  """Top-1 accuracy, mean per-class accuracy (over classes present) and loss."""
  import numpy as np
  class_count = np.asarray(totals["class_count"])
  present = class_count > 0
  per_class = np.asarray(totals["class_correct"])[present] / class_count[present]
  count = float(totals["count"])
  return {
      "top1": float(totals["correct"]) / max(count, 1.0),
      "mean_per_class": float(per_class.mean()) if present.any() else 0.0,
      "loss": float(totals["loss_sum"]) / max(count, 1.0),
      "count": count,
  }

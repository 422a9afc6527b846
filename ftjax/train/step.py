"""One training step for every method, and the evaluation step.

The step sums ``weight * term`` over the method's loss components, takes one
``jax.value_and_grad``, applies the optimizer, updates the components' states and
returns ``(state, metrics)``. It is compiled once with ``jax.jit`` over the data
mesh: batch sharded on ``"data"``, state replicated and donated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ftjax.train import sharding as shd
from ftjax.train.state import TrainState


def required_outputs(components: Sequence[Any]) -> tuple[str, ...]:
  names = ["logits"]
  for c in components:
    names.extend(o for o in c.outputs if o not in names)
  return tuple(names)


def make_train_step(
    *,
    model: Any,
    optimizer: optax.GradientTransformation,
    components: Sequence[Any],
    train_bn: bool = True,
    frozen_mask: Any = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """The un-jitted step function; see :func:`jit_train_step`.

  Args:
    model: Linen module returning a dict of named outputs.
    optimizer: the partitioned optimizer (frozen groups use ``set_to_zero``).
    components: the method's loss components.
    train_bn: run BatchNorm in training mode (batch statistics; every running
      average is re-estimated on the task). False: running statistics, unchanged.
    frozen_mask: pytree over ``params``; True marks a frozen parameter. Frozen
      parameters enter the loss through ``stop_gradient`` so no backward pass is
      spent on them (a linear probe costs a forward pass plus the head).
  """
  outputs_needed = required_outputs(components)

  def step(state: TrainState, batch: dict[str, jax.Array]):
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      if frozen_mask is not None:
        params = jax.tree.map(lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p, params, frozen_mask)
      variables = {"params": params}
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
      # SpotTune's routing noise; Flax ignores rng streams a model does not use.
      rngs = {"gumbel": jax.random.fold_in(step_rng, 2**20)}
      if train_bn and state.batch_stats:
        outputs, new_vars = model.apply(variables, batch["image"], train=True, outputs=outputs_needed,
                                        mutable=["batch_stats"], rngs=rngs)
        new_stats = new_vars["batch_stats"]
      else:
        outputs = model.apply(variables, batch["image"], train=False, outputs=outputs_needed, rngs=rngs)
        new_stats = state.batch_stats
      # Pre-training data reuse: pool rows follow the target rows ("label" covers the
      # target rows only); components see the target rows unless they read pool rows.
      all_outputs = outputs
      target_rows = batch["label"].shape[0]
      if batch["image"].shape[0] != target_rows:
        outputs = jax.tree.map(lambda x: x[:target_rows], outputs)
      total = 0.0
      metrics: dict[str, jax.Array] = {}
      new_method_state = {}
      for i, component in enumerate(components):
        term = component(outputs=all_outputs if getattr(component, "reads_pool_rows", False) else outputs,
                         batch=batch, state=state.method_state[component.name],
                         params=params, rng=jax.random.fold_in(step_rng, i))
        total = total + component.weight * term.loss
        metrics[f"loss/{component.name}"] = term.loss
        for key, value in (term.metrics or {}).items():
          metrics[f"{component.name}/{key}"] = value
        new_method_state[component.name] = term.state
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
  """Compiles the step over ``mesh``: batch on ``"data"``, state replicated and donated."""
  state_shardings = shd.state_sharding(mesh, state)
  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, shd.batch_sharding(mesh)),
      out_shardings=(state_shardings, shd.replicated(mesh)),
      donate_argnums=(0,),
  )


def make_eval_step(*, model: Any, num_classes: int, mesh: Mesh) -> Callable:
  """Jitted evaluation: counts of correct predictions, overall and per class.

  Returns a function ``(variables, batch) -> dict`` with ``correct``, ``count``,
  ``class_correct [C]``, ``class_count [C]`` and ``loss_sum``; padded examples
  (``mask == 0``) count nowhere.
  """

  def eval_step(variables, batch):
    # A fixed "gumbel" key: only SpotTune's sampled / random inference routings read it
    # (the default routing is deterministic); other models ignore it.
    logits = model.apply(variables, batch["image"], train=False, outputs=("logits",),
                         rngs={"gumbel": jax.random.PRNGKey(0)})["logits"]
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
    one_hot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.sum(one_hot * log_probs, axis=-1)
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

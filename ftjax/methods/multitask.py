"""Multitask learning with model patches: one shared base, a private patch per task.

Mudrakarta et al. (2019), Sec. 3.2: several tasks train *simultaneously* one
network whose weights they share, except for a small private patch per task
(the scale-and-bias patch, and the last layer unless it is shared, as in the
paper's Table 4 across resolutions). All weights train; each task sees its own
patched model.

Here every step takes one batch from each task, runs each task's patched model
on its batch and sums the tasks' cross-entropies, so the shared weights get the
sum of the tasks' gradients and each patch only its own task's. The paper keeps
the tasks' learning rates "comparable at any given point in time" (App. D); one
synchronous step over all tasks with one schedule gives every task the same
learning rate at every step by construction, whatever the dataset sizes (each
task's stream simply wraps around its own data).

The parameters are ``{"shared": ..., "tasks": {task: ...}}`` (nested dicts, the
model's own paths split in two). BatchNorm statistics belong to the scale-and-bias
patch ("the patch corresponds to all the γ, β, μ, σ", Sec. 2): with a
``scale_bias`` patch each task keeps its own statistics, re-estimated on its own
data (``batch_stats = {task: ...}``); with any other patch, or none (Table 4's
"all shared" column), the statistics are shared like every other weight
(``batch_stats = {"shared": ...}``): each step runs the tasks one after another
in task-name order, each task's batch updating the running averages the next one
starts from, as one network that sees the tasks' batches in turn.

Config (``ftjax.train.config.default_config`` plus a ``tasks`` dict)::

  c.baseline = "patch"; c.patch.selection = "scale_bias"
  c.tasks = {"px96": {"image_size": 96}, "px128": {"image_size": 128}}   # dataset overrides
  c.share_head = True         # one last layer for all tasks (Table 4); False = one per task

Example:
  >>> from experiments.configs import tiny
  >>> c = tiny.get_config()
  >>> c.baseline = "patch"
  >>> c.tasks = {"px32": {"image_size": 32}, "px40": {"image_size": 40}}
  >>> {name: cfg.dataset.image_size for name, cfg in task_configs(c).items()}
  {'px32': 32, 'px40': 40}
  >>> # results = train_multitask(c, "runs/multitask")   (tests/test_model_patches.py runs it)
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ftjax.core import paths
from ftjax.core.errors import ConfigError, check_labels
from ftjax.core.io import atomic_write_text, write_json
from ftjax.losses import softmax_cross_entropy
from ftjax.methods import patches as patch_lib
from ftjax.train import optim
from ftjax.train import sharding as shd
from ftjax.train import step as step_lib
from ftjax.train.loop import evaluate, fit
from ftjax.train.metrics import MetricWriter
from ftjax.train.setup import (Training, build_model, load_run_dataset, make_mesh, make_schedule,
                               validate_config)
from ftjax.train.state import TrainState


def split_params(params: Any, private_paths: set[str]) -> tuple[dict, dict]:
  """``params`` -> (shared tree, private tree) by '/'-path."""
  flat = paths.flatten_paths(params)
  return (paths.unflatten_paths({p: v for p, v in flat.items() if p not in private_paths}),
          paths.unflatten_paths({p: v for p, v in flat.items() if p in private_paths}))


def merge_params(shared: Any, private: Any) -> dict:
  """The full parameter tree of one task: shared weights with the task's patch in place."""
  flat = paths.flatten_paths(shared)
  flat.update(paths.flatten_paths(private))
  return paths.unflatten_paths(flat)


def private_paths(variables: Any, *, selection: str, share_head: bool) -> set[str]:
  """Paths private to each task: the patch selection (``"none"``: no patch), plus the head unless shared."""
  if selection == "none":  # everything shared (Table 4's "all shared" column)
    parts = []
  else:
    parts = [p for p in patch_lib.parse_selection(selection) if p != "all"]
    if len(parts) != len(patch_lib.parse_selection(selection)):
      raise ConfigError("a multitask patch cannot be 'all': nothing would be shared")
  paths: set[str] = set()
  for part in parts:
    paths |= set(patch_lib.structural_paths(variables["params"], batch_stats=variables.get("batch_stats"),
                                          selection=part))
  if not share_head:
    paths |= set(patch_lib.structural_paths(variables["params"], selection="head"))
  return paths


def private_statistics(selection: str) -> bool:
  """Whether each task keeps its own BatchNorm statistics: only a scale-and-bias patch holds them."""
  return selection != "none" and patch_lib.holds_statistics(selection)


SHARED_STATS = "shared"   # key of the one statistics tree when the tasks share it


def initial_batch_stats(base_stats: Any, tasks, *, private: bool) -> dict[str, Any]:
  """``{task: copy}`` of the base statistics when each task keeps its own, else ``{"shared": copy}``."""
  if private and SHARED_STATS in tasks:
    raise ConfigError(f"a task may not be named {SHARED_STATS!r} (the key of shared statistics)")
  names = list(tasks) if private else [SHARED_STATS]
  return {name: jax.tree.map(np.copy, base_stats) for name in names}


def task_batch_stats(batch_stats: dict[str, Any], name: str) -> Any:
  """The statistics task ``name`` runs on (its own, or the shared ones)."""
  return batch_stats[SHARED_STATS] if SHARED_STATS in batch_stats else batch_stats[name]


def task_variables(params: dict[str, Any], batch_stats: dict[str, Any], name: str) -> dict[str, Any]:
  """The full variables of task ``name``: shared weights, its patch, and its (or the shared) statistics."""
  return {"params": merge_params(params["shared"], params["tasks"][name]),
          "batch_stats": task_batch_stats(batch_stats, name)}


def task_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """One config per task: ``config`` with the task's ``dataset`` overrides applied."""
  if not config.get("tasks"):
    raise ConfigError("config.tasks is empty: a multitask run needs at least two tasks, e.g. "
                      "{'px96': {'image_size': 96}, 'px128': {'image_size': 128}}")
  if config.get("vmap_seeds"):
    # The tasks already share one program; their seeds run one after another.
    raise ConfigError("vmap_seeds=True is not supported for a multitask run (config.tasks); "
                      "set vmap_seeds=False")
  out = {}
  for name, overrides in sorted(config.tasks.items()):
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      for key, value in dict(overrides).items():
        if key not in cfg.dataset:
          raise ConfigError(f"task {name!r}: unknown dataset field {key!r}; known: {sorted(cfg.dataset)}")
        cfg.dataset[key] = value
    out[name] = cfg
  if len(out) < 2:
    raise ConfigError(f"a multitask run needs at least two tasks, got {list(out)}")
  return out


def make_multitask_step(*, models: dict[str, Any], optimizer: optax.GradientTransformation,
                        frozen_mask: Any = None):
  """``(state, batches) -> (state, metrics)``; ``batches`` maps task -> ``{image, label}``.

  Loss: sum over tasks of the mean cross-entropy of the task's patched model on
  its batch; one gradient for the shared weights and every patch. BatchNorm
  statistics: per task (``state.batch_stats = {task: ...}``) or shared
  (``{"shared": ...}``, see :func:`initial_batch_stats`); shared ones are updated
  by the tasks in turn (sorted names), each from the previous task's result.
  """
  names = sorted(models)

  def step(state: TrainState, batches: dict[str, dict[str, jax.Array]], source: Any = None):
    del source  # the tasks share no frozen source model
    shared = SHARED_STATS in state.batch_stats
    def loss_fn(params):
      if frozen_mask is not None:
        params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen_mask)
      total, new_stats, metrics = 0.0, dict(state.batch_stats), {}
      for name in names:
        full = merge_params(params["shared"], params["tasks"][name])
        key = SHARED_STATS if shared else name
        outputs, updated = models[name].apply(
            {"params": full, "batch_stats": new_stats[key]}, batches[name]["image"],
            train=True, outputs=("logits",), mutable=["batch_stats"])
        loss = softmax_cross_entropy(logits=outputs["logits"], labels=batches[name]["label"])
        total = total + loss
        new_stats[key] = updated["batch_stats"]
        metrics[f"loss/{name}"] = loss
        metrics[f"accuracy/{name}"] = jnp.mean(jnp.argmax(outputs["logits"], -1) == batches[name]["label"])
      return total, (new_stats, metrics)

    (loss, (new_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=new_stats, opt_state=opt_state), metrics

  return step


def train_multitask(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains all ``config.tasks`` together into ``workdir`` (resumable); returns the results.

  The loop is the trainer's (:func:`ftjax.train.loop.fit`: sharding over
  ``num_devices``, the config check on resume, label checks). Writes per-task
  patches (``patch_<task>.npz``: the task's private parameters and BatchNorm
  statistics) and ``shared.npz`` (the shared weights), so any task's model is
  ``apply_patch(shared base, patch_<task>)``.
  """
  tasks = task_configs(config)
  validate_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, _, state_rng = jax.random.split(rng, 3)

  datasets, models, task_vars = {}, {}, {}
  for name, cfg in tasks.items():
    datasets[name] = load_run_dataset(cfg)
    # Same pretrained weights (or the same init key) for every task: identical
    # bases, heads sized to each task's classes.
    models[name], task_vars[name] = build_model(cfg, num_classes=datasets[name].num_classes,
                                                keep_source_head=False, rng=init_rng)
  class_counts = {n: ds.num_classes for n, ds in datasets.items()}
  if config.share_head and len(set(class_counts.values())) > 1:
    raise ConfigError(f"share_head=True needs the same classes in every task; got {class_counts}")
  base = task_vars[min(tasks)]
  privates = private_paths(base, selection=config.patch.selection, share_head=config.share_head)
  shared, _ = split_params(base["params"], privates)
  task_private = {n: split_params(v["params"], privates)[1] for n, v in task_vars.items()}
  params = {"shared": shared, "tasks": task_private}
  private_stats = private_statistics(config.patch.selection)
  batch_stats = initial_batch_stats(base["batch_stats"], tasks, private=private_stats)
  logging.info("multitask: %d tasks %s; %d private arrays per task (%s%s); BatchNorm statistics %s",
               len(tasks), sorted(tasks), len(privates), config.patch.selection,
               "" if config.share_head else " + head", "per task" if private_stats else "shared")

  groups = {"shared": optim.GroupConfig(), "patch": optim.GroupConfig()}
  labels = {"shared": jax.tree.map(lambda _: "shared", shared),
            "tasks": jax.tree.map(lambda _: "patch", task_private)}
  if config.get("patch_lr_mult", 1.0) != 1.0:
    groups["patch"] = optim.GroupConfig(lr_mult=config.patch_lr_mult)
  steps_per_epoch = max(ds.steps_per_epoch(config.batch_size) for ds in datasets.values())
  total_steps = config.num_steps or config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  schedule = make_schedule(config, total_steps)
  optimizer = optim.make_optimizer(labels=labels, groups=groups, schedule=schedule,
                                   momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov,
                                   weight_decay=config.optimizer.weight_decay,
                                   weight_decay_mode=config.optimizer.get("weight_decay_mode", "decoupled"))

  mesh = make_mesh(config.num_devices)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=optimizer.init(params), method_state={}, rng=state_rng)
  state = jax.device_put(state, shd.state_sharding(mesh, state))
  train_step = step_lib.jit_train_step(make_multitask_step(models=models, optimizer=optimizer),
                                       mesh=mesh, state=state)
  eval_steps = {n: step_lib.make_eval_step(model=models[n], num_classes=datasets[n].num_classes, mesh=mesh)
                for n in tasks}
  sizes = paths.group_sizes(params, labels)
  training = Training(state=state, source={}, train_step=train_step, eval_step=None, labels=labels,
                      groups=groups, frozen=frozenset(), sizes=sizes, schedule=schedule, mesh=mesh)

  def batch_stream(start_step: int):
    streams = {n: datasets[n].train_batches(batch_size=config.batch_size, start_step=start_step)
               for n in tasks}
    while True:
      batches = {n: next(streams[n]) for n in tasks}
      for n, batch in batches.items():
        check_labels(batch["label"], datasets[n].num_classes, what=f"task {n}")
      yield batches

  def validate(state):
    vals = {n: evaluate(eval_steps[n], task_variables(state.params, state.batch_stats, n), datasets[n],
                        "val", batch_size=config.eval_batch_size, mesh=mesh) for n in tasks}
    mean_val = float(np.mean([v[config.selection_metric] for v in vals.values()]))
    return mean_val, {"mean_" + config.selection_metric: mean_val,
                      **{f"{n}/{k}": v for n, r in vals.items() for k, v in r.items()}}

  writer = MetricWriter(workdir, tensorboard=config.tensorboard)
  fitted = fit(config=config, workdir=workdir, training=training, total_steps=total_steps,
               eval_every=eval_every, batch_stream=batch_stream, validate=validate, writer=writer)
  best, step = fitted.best, fitted.step

  best_params = jax.device_get(best["params"])
  best_stats = jax.device_get(best["batch_stats"])
  results: dict[str, Any] = {"best_step": int(best["step"]), "steps": step, "tasks": {},
                             "bn_statistics": "per task" if private_stats else "shared"}
  shared_size = sum(int(np.size(v)) for v in jax.tree.leaves(best_params["shared"]))
  total = shared_size
  for n in tasks:
    test = evaluate(eval_steps[n], task_variables(best_params, best_stats, n), datasets[n], "test",
                    batch_size=config.eval_batch_size, mesh=mesh)
    patch = patch_lib.Patch(paths.flatten_paths(best_params["tasks"][n]),
                            paths.flatten_paths(best_stats[n]) if private_stats else {},
                            {"task": n, "selection": config.patch.selection, "share_head": config.share_head})
    size = patch_lib.patch_size(patch, task_variables(best_params, best_stats, n)["params"])
    total += size.parameters
    if jax.process_index() == 0:
      patch_lib.save_patch(os.path.join(workdir, f"patch_{n}.npz"), patch)
    results["tasks"][n] = {"test_top1": test["top1"], "test_mean_per_class": test["mean_per_class"],
                           "image_size": tasks[n].dataset.image_size, "patch_parameters": size.parameters,
                           "patch_percent": size.percent}
    writer.write(step, "test", {f"{n}/{k}": v for k, v in test.items()})
  writer.close()
  results["shared_parameters"] = shared_size
  results["total_parameters"] = total
  results["table"] = format_multitask_table(results, title=_title(config))
  if jax.process_index() == 0:
    atomic_write_text(os.path.join(workdir, "results_table.md"), results["table"] + "\n")
    shared_patch = patch_lib.Patch(paths.flatten_paths(best_params["shared"]),
                                   {} if private_stats else paths.flatten_paths(best_stats[SHARED_STATS]),
                                   {"shared": True})
    patch_lib.save_patch(os.path.join(workdir, "shared.npz"), shared_patch)
    write_json(os.path.join(workdir, "results.json"), results)
  return results


def _title(config: ml_collections.ConfigDict) -> str:
  head = "shared last layer" if config.share_head else "a last layer per task"
  return (f"multitask: {config.model} ({config.pretrained or 'random init'}), private patch "
          f"{config.patch.selection!r}, {head}; checkpoint chosen on mean val {config.selection_metric}, "
          f"test evaluated once")


def format_multitask_table(results: dict[str, Any], *, title: str = "") -> str:
  lines = [title, ""] if title else []
  lines += ["| task | image size | test top-1 | test mean per-class | private params |", "|---|---|---|---|---|"]
  for name, r in results["tasks"].items():
    lines.append(f"| {name} | {r['image_size']} | {100 * r['test_top1']:.2f} | "
                 f"{100 * r['test_mean_per_class']:.2f} | {r['patch_parameters']:,} |")
  lines.append(f"\nparameters in total: {results['total_parameters']:,} "
               f"(shared {results['shared_parameters']:,})")
  return "\n".join(lines)

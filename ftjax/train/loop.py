"""The trainer: one config and one seed in, a trained model and honest numbers out.

Checkpoints and hyper-parameters are chosen on the validation split; the test
split is evaluated once, at the end, with the checkpoint that scored best on
validation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ftjax import data as ftdata
from ftjax import methods
from ftjax import models
from ftjax import patches
from ftjax.train import optim
from ftjax.train import sharding as shd
from ftjax.train import step as step_lib
from ftjax.train.checkpoint import Checkpointer
from ftjax.train.config import BASELINES
from ftjax.train.config import default_config
from ftjax.train.metrics import MetricWriter
from ftjax.train.state import TrainState


class ConfigError(ValueError):
  """A configuration value that cannot work."""


# ----------------------------------------------------------------------------- rules


def baseline_rules(config: ml_collections.ConfigDict, variables: Any = None
                   ) -> tuple[list[tuple[str, str]], dict[str, Any], str]:
  """Parameter rules, group settings and BatchNorm mode of ``config.baseline``.

  ``variables`` (the model's initial variables) are needed by the ``patch``
  baseline, whose rules come from the model's structure.
  """
  baseline = config.baseline
  if baseline not in BASELINES:
    raise ConfigError(f"unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
  head = {"lr_mult": config.head_lr_mult}
  # New heads: the target head, Bi-Tuning's projector and data reuse's pool head
  # (all randomly initialised).
  new_heads = "(?:head|projector|pool_head)/.*"
  if baseline == "finetune":
    rules = [(new_heads, "head"), ("backbone/.*|source_head/.*", "backbone")]
    groups = {"head": head, "backbone": {}}
  elif baseline == "scratch":
    rules = [(".*", "all")]
    groups = {"all": {}}
  elif baseline == "linear_probe":
    rules = [(new_heads, "head"), ("backbone/.*|source_head/.*", "frozen")]
    groups = {"head": head, "frozen": {"frozen": True}}
  elif baseline == "patch":
    if variables is None:
      raise ConfigError("the patch baseline needs the model's variables to find its patch parameters")
    rules = patches.patch_rules(variables["params"], batch_stats=variables.get("batch_stats"),
                                selection=config.patch.selection, train_head=config.patch.train_head)
    groups = {"patch": {}, "head": head, "frozen": {"frozen": True}}
  else:  # last_k
    blocks = models.block_prefixes(config.model)
    k = int(config.last_k)
    if not 1 <= k <= len(blocks):
      raise ConfigError(f"last_k={k} is out of range for {config.model}: it has {len(blocks)} blocks")
    trained = "|".join(f"(?:{prefix})" for prefix in blocks[-k:])
    rules = [(new_heads, "head"),
             (f"(?:{trained})/.*", "backbone"),
             (f"(?!(?:{trained})/)(?:backbone|source_head)/.*", "frozen")]
    groups = {"head": head, "backbone": {}, "frozen": {"frozen": True}}
  # BatchNorm in "train" mode normalises every layer, frozen or not, by batch
  # statistics and re-estimates all running statistics on the task (as a torch
  # model in train() mode with frozen weights does), so training and evaluation
  # see the same normalisation; "eval" keeps the pretrained statistics everywhere.
  bn_mode = "eval" if baseline == "linear_probe" else "train"
  return rules, groups, bn_mode


def resolve_rules(config: ml_collections.ConfigDict, variables: Any = None):
  rules, groups, bn_mode = baseline_rules(config, variables)
  if config.param_rules:
    rules = [tuple(r) for r in config.param_rules]
  groups.update({name: dict(g) for name, g in config.groups.items()})
  bn_mode = config.bn_mode or bn_mode
  if bn_mode not in ("train", "eval"):
    raise ConfigError(f"bn_mode must be 'train' or 'eval', got {bn_mode!r}")
  return rules, {name: optim.GroupConfig.from_mapping(g) for name, g in groups.items()}, bn_mode


# ----------------------------------------------------------------------------- setup


def validate_config(config: ml_collections.ConfigDict) -> None:
  rate = config.dataset.sampling_rate
  if not 0 < rate <= 100:
    raise ConfigError(f"dataset.sampling_rate must be in (0, 100] (a percentage), got {rate}")
  for name in ("batch_size", "eval_batch_size"):
    if config[name] <= 0:
      raise ConfigError(f"{name} must be positive, got {config[name]}")
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("set num_epochs or num_steps to a positive number")
  if config.selection_metric not in ("top1", "mean_per_class"):
    raise ConfigError(f"selection_metric must be 'top1' or 'mean_per_class', got {config.selection_metric!r}")
  reuse = config.get("reuse")
  if reuse is not None and reuse.enabled:
    if jax.process_count() > 1:
      raise ConfigError("reuse (pre-training data reuse) supports one process only")
    if "data_reuse" in config.losses and reuse.mode != config.losses["data_reuse"].get("mode", reuse.mode):
      raise ConfigError(f"reuse.mode={reuse.mode!r} but losses.data_reuse.mode="
                        f"{config.losses['data_reuse']['mode']!r}")
  elif "data_reuse" in config.losses:
    raise ConfigError("losses.data_reuse needs the pool batches: set reuse.enabled=True")
  if config.get("init_from") and config.pretrained and config.baseline != "scratch":
    raise ConfigError(f"set either pretrained={config.pretrained!r} or init_from={config.init_from!r}, not both")
  if config.get("on_divergence", "raise") not in ("raise", "record"):
    raise ConfigError(f"on_divergence must be 'raise' or 'record', got {config.on_divergence!r}")


def build_model(config, *, num_classes: int, keep_source_head: bool, rng: jax.Array,
                projection_dim: int = 0):
  """Model and initial variables: pretrained (new head) or random (scratch).

  ``projection_dim > 0`` adds the Bi-Tuning projector (output ``projection``).
  """
  size = config.dataset.image_size
  if config.pretrained and config.baseline != "scratch":
    entry = models.pretrained(config.pretrained, num_classes=num_classes,
                              keep_source_head=keep_source_head, seed=config.seed,
                              projection_dim=projection_dim)
    model_name = config.pretrained.split("/")[0]
    if model_name != config.model:
      raise ConfigError(f"config.model={config.model!r} but pretrained={config.pretrained!r}")
    model, variables = entry.model, entry.variables
    # Checks the image size against the model before any data work (raises a clear error).
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, 3)), train=False), variables)
    return model, variables
  model = models.create_model(config.model, num_classes=num_classes, keep_source_head=keep_source_head,
                              projection_dim=projection_dim)
  # One jitted init with the "rbg" generator: XLA:CPU compiles threefry-based
  # initialisers ~10x slower (seconds per model), and init runs once per run.
  init_key = jax.random.key(int(jax.random.randint(rng, (), 0, 2**31 - 1)), impl="rbg")
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, size, size, 3), jnp.float32), train=False,
                                             outputs=model.all_outputs))(init_key)
  variables = jax.tree.map(np.asarray, dict(variables))
  if config.get("init_from") and config.baseline != "scratch":
    variables = load_backbone_variables(variables, config.init_from)
  return model, variables


def load_backbone_variables(variables: dict[str, Any], path: str) -> dict[str, Any]:
  """``variables`` with every ``params/backbone/...`` and ``batch_stats/backbone/...`` array
  replaced by the one of that name in the ``.npz`` at ``path`` (heads stay as they are).

  Raises:
    ConfigError: the file is missing, lacks a backbone array, or has another shape.
  """
  if not os.path.exists(path):
    raise ConfigError(f"init_from={path!r} does not exist")
  out = {}
  with np.load(path) as stored:
    for collection, tree in variables.items():
      flat = {"/".join(str(getattr(k, "key", k)) for k in key_path): leaf
              for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
      for name, leaf in flat.items():
        key = f"{collection}/{name}"
        if not name.startswith("backbone/"):
          continue
        if key not in stored.files:
          raise ConfigError(f"init_from={path!r} has no array {key!r}")
        if stored[key].shape != np.shape(leaf):
          raise ConfigError(f"init_from={path!r}: {key!r} has shape {stored[key].shape}, the model "
                            f"needs {np.shape(leaf)}")
        flat[name] = np.asarray(stored[key], np.asarray(leaf).dtype)
      out[collection] = patches.unflatten_paths(flat)
  return out


def save_backbone_variables(variables: dict[str, Any], path: str) -> str:
  """Writes the backbone arrays of ``variables`` as the ``.npz`` that ``init_from`` reads (atomic)."""
  flat = {}
  for collection, tree in variables.items():
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      name = "/".join(str(getattr(k, "key", k)) for k in key_path)
      if name.startswith("backbone/"):
        flat[f"{collection}/{name}"] = np.asarray(leaf)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)
  return path


def _mesh(config):
  devices = jax.devices()
  if config.num_devices:
    if config.num_devices > len(devices):
      raise ConfigError(f"num_devices={config.num_devices} but only {len(devices)} devices exist")
    devices = devices[: config.num_devices]
  return shd.make_data_mesh(devices)


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def evaluate(eval_step, variables, dataset, split: str, *, batch_size: int, mesh) -> dict[str, float]:
  totals = None
  for batch in dataset.eval_batches(split, batch_size=batch_size):
    out = eval_step(variables, shd.global_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    raise ValueError(f"the {split} split of {dataset.name} is empty")
  return step_lib.summarize_eval(jax.device_get(totals))


def _semantic_config(config) -> dict[str, Any]:
  cfg = json.loads(config.to_json_best_effort())
  for key in ("progress", "log_every_steps", "tensorboard", "compare", "num_seeds", "keep_checkpoints",
              "on_divergence"):
    cfg.pop(key, None)
  return cfg


def _same_config(stored: Any, current: Any, default: Any) -> bool:
  """Whether a checkpoint's config ``stored`` describes the run ``current``.

  A key that ``stored`` lacks but whose current value is its default (a setting
  added to ftjax after the checkpoint was written, left at its neutral value)
  does not make the configs differ, so upgrading ftjax does not strand runs.
  """
  if not (isinstance(stored, dict) and isinstance(current, dict)):
    return stored == current
  default = default if isinstance(default, dict) else {}
  for key in set(stored) | set(current):
    if key not in current:
      return False
    if key not in stored:
      if key not in default or current[key] != default[key]:
        return False
    elif not _same_config(stored[key], current[key], default.get(key)):
      return False
  return True


# ----------------------------------------------------------------------------- train


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` (one seed) into ``workdir``, resuming if a checkpoint is there.

  Returns the results record (also written to ``workdir/results.json``).
  """
  validate_config(config)
  components = methods.build_components(config.losses)
  if config.baseline != "patch":  # fail fast on bad rules; patch rules need the model
    resolve_rules(config)
  needed = step_lib.required_outputs(components)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  rng = jax.random.PRNGKey(config.seed)  # raw uint32 key: plain array in checkpoints
  init_rng, method_rng, state_rng = jax.random.split(rng, 3)

  data_dir = config.dataset.data_dir or None
  ftdata.prepare_offline(config.dataset.name, data_dir=data_dir)
  dataset = ftdata.load_dataset(
      config.dataset.name, data_dir=data_dir, sampling_rate=config.dataset.sampling_rate,
      seed=config.seed, val_fraction=config.dataset.val_fraction,
      image_size=config.dataset.image_size, resize_size=config.dataset.resize_size or None,
      process_index=jax.process_index(), process_count=jax.process_count(),
      crop_scale=tuple(config.dataset.crop_scale), num_shards=config.dataset.num_shards,
      classes=tuple(config.dataset.get("classes", ())) or None,
      test_split=config.dataset.get("test_split", "test"))
  pool_dataset = None
  if config.get("reuse") is not None and config.reuse.enabled:
    components, pool_dataset = _reuse_setup(config, components, data_dir=data_dir)
    needed = step_lib.required_outputs(components)
  model, variables = build_model(config, num_classes=dataset.num_classes,
                                 keep_source_head="source_logits" in needed, rng=init_rng,
                                 projection_dim=_projection_dim(components, needed))

  # Components that change the model (SpotTune: frozen and trainable block copies and a
  # policy network) wrap the plain model and its variables.
  for c in components:
    if hasattr(c, "wrap_model"):
      model, variables = c.wrap_model(model=model, variables=variables, config=config,
                                      rng=jax.random.fold_in(init_rng, 1))

  # Components that need the target data or the initial model before training
  # (Co-Tuning's category relationship) return a prepared copy of themselves.
  components = [c.prepare(dataset=dataset, model=model, variables=variables, config=config)
                if hasattr(c, "prepare") else c for c in components]

  if jax.process_index() == 0:
    for c in components:
      if hasattr(c, "write_artifacts"):
        for path in c.write_artifacts(workdir=workdir, dataset=dataset, config=config):
          logging.info("%s: wrote %s", c.name, path)

  rules, groups, bn_mode = resolve_rules(config, variables)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  labels = patches.path_labels(params, rules, log=True)
  patches.check_groups(labels, groups)
  sizes = patches.group_sizes(params, labels)
  logging.info("parameter groups: %s", sizes)

  steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
  total_steps = config.num_steps or config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  schedule = optim.make_schedule(
      name=config.optimizer.schedule, base_lr=config.optimizer.lr, total_steps=total_steps,
      warmup_steps=config.optimizer.warmup_steps, boundaries=config.optimizer.boundaries,
      decay_factor=config.optimizer.decay_factor)
  optimizer = optim.make_optimizer(
      labels=labels, groups=groups, schedule=schedule, momentum=config.optimizer.momentum,
      nesterov=config.optimizer.nesterov, weight_decay=config.optimizer.weight_decay)
  frozen = {name for name, g in groups.items() if g.frozen}

  mesh = _mesh(config)
  method_state = {c.name: c.init_state(variables=variables, rng=jax.random.fold_in(method_rng, i))
                  for i, c in enumerate(components)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=optimizer.init(params), method_state=method_state, rng=state_rng)
  state = jax.device_put(state, shd.state_sharding(mesh, state))
  # Scalars too live on the mesh (replicated): multi-process checkpoints cannot
  # hold arrays that sit on one process's device.
  best = jax.device_put({"params": _copy(state.params), "batch_stats": _copy(state.batch_stats),
                         "metric": np.float32(-1.0), "step": np.int32(0)}, shd.replicated(mesh))

  writer = MetricWriter(workdir, tensorboard=config.tensorboard)
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
  semantic = _semantic_config(config)
  start = ckpt.latest_step()
  if start is not None:
    state, best, record = ckpt.restore(start, state=state, best=best)
    if not _same_config(record.get("config"), semantic, _semantic_config(default_config())):
      raise ConfigError(f"{workdir} holds a checkpoint of a different config; use a new --workdir "
                        f"(or delete {ckpt.directory}) to start over")
    writer.truncate_after(start)
    logging.info("resumed from step %d", start)
  else:
    writer.truncate_after(0)  # a killed run that never checkpointed starts over
  step = int(state.step)

  frozen_mask = jax.tree.map(lambda label: label in frozen, labels) if frozen else None
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(model=model, optimizer=optimizer, components=components,
                               train_bn=bn_mode == "train", frozen_mask=frozen_mask),
      mesh=mesh, state=state)
  eval_step = step_lib.make_eval_step(model=model, num_classes=dataset.num_classes, mesh=mesh)

  progress = None
  if config.progress and jax.process_index() == 0:
    from tqdm.auto import tqdm
    progress = tqdm(total=total_steps, initial=step, desc=os.path.basename(workdir), unit="step",
                    dynamic_ncols=True)
  # Contrastive components (Bi-Tuning) declare ``views = 2``: a second augmented view.
  views = max(int(getattr(c, "views", 1)) for c in components)
  batches = dataset.train_batches(batch_size=config.batch_size, start_step=step, views=views)
  pool_batches = None
  if pool_dataset is not None:
    if views > 1:
      raise ConfigError("reuse cannot be combined with a component that needs two target views")
    pool_views = max(int(getattr(c, "pool_views", 1)) for c in components)
    # Eq. 7: the first pool view is the weakly augmented one (a mild crop), the second the strong one.
    scales = ((tuple(config.reuse.weak_crop_scale), tuple(config.dataset.crop_scale))
              if pool_views == 2 else None)
    pool_batches = pool_dataset.train_batches(batch_size=config.batch_size, start_step=step, views=pool_views,
                                              view_crop_scales=scales)
  t0, images = time.time(), 0
  try:
    while step < total_steps:
      batch = next(batches)
      _check_labels(batch["label"], dataset.num_classes)
      if pool_batches is not None:
        pool_batch = next(pool_batches)
        _check_labels(pool_batch["label"], pool_dataset.num_classes)
        batch = mixed_batch(batch, pool_batch)
      state, metrics = train_step(state, shd.global_batch(batch, mesh))
      step += 1
      images += config.batch_size
      evaluate_now = step % eval_every == 0 or step == total_steps
      if step % config.log_every_steps == 0 or evaluate_now:
        host = jax.device_get(metrics)
        if not math.isfinite(float(host["loss"])):
          raise FloatingPointError(
              f"non-finite loss {float(host['loss'])} at step {step}; last good checkpoint: "
              f"step {ckpt.latest_step()} in {ckpt.directory} (lower optimizer.lr?)")
        host["lr"] = schedule(step - 1)
        host["images_per_s"] = images / max(time.time() - t0, 1e-9)
        writer.write(step, "train", host)
        if progress is not None:
          progress.set_postfix(loss=f"{float(host['loss']):.3f}", acc=f"{float(host['accuracy']):.2f}")
      if evaluate_now:
        val = evaluate(eval_step, state.variables, dataset, "val", batch_size=config.eval_batch_size, mesh=mesh)
        writer.write(step, "val", val)
        if val[config.selection_metric] > float(best["metric"]):
          best = jax.device_put(
              {"params": _copy(state.params), "batch_stats": _copy(state.batch_stats),
               "metric": np.float32(val[config.selection_metric]), "step": np.int32(step)},
              shd.replicated(mesh))
        ckpt.save(step, state=state, best=best, record={"config": semantic, "step": step})
      if progress is not None:
        progress.update(1)
  finally:
    if progress is not None:
      progress.close()
    ckpt.close()

  best_vars = {"params": best["params"]}
  if best["batch_stats"]:
    best_vars["batch_stats"] = best["batch_stats"]
  test = evaluate(eval_step, best_vars, dataset, "test", batch_size=config.eval_batch_size, mesh=mesh)
  writer.write(step, "test", test)
  writer.close()
  results = {
      "seed": config.seed,
      "best_val": float(best["metric"]),
      "best_step": int(best["step"]),
      "selection_metric": config.selection_metric,
      "test_top1": test["top1"],
      "test_mean_per_class": test["mean_per_class"],
      "num_train": dataset.num_examples["train"],
      "num_val": dataset.num_examples["val"],
      "num_test": int(test["count"]),
      "steps": step,
      "trainable_parameters": sum(n for g, n in sizes.items() if g not in frozen),
      "total_parameters": sum(sizes.values()),
  }
  if pool_dataset is not None:
    results["reuse_pool_train"] = pool_dataset.num_examples["train"]
  # Components with after-training analyses (SpotTune: routing of the test split, figures).
  for c in components:
    if hasattr(c, "finalize"):
      results.update(c.finalize(model=model, variables=best_vars, dataset=dataset, workdir=workdir,
                                config=config))
  if config.baseline == "patch":
    patch = patches.extract_patch(
        jax.device_get(best_vars), labels, include_batch_stats=bn_mode == "train",
        info={"model": config.model, "pretrained": config.pretrained, "selection": config.patch.selection,
              "train_head": config.patch.train_head, "dataset": config.dataset.name,
              "num_classes": dataset.num_classes, "image_size": config.dataset.image_size})
    size = patches.patch_size(patch, params)
    results.update(patch_parameters=size.parameters, patch_bytes=size.bytes,
                   patch_percent=size.percent)
    if jax.process_index() == 0:
      patches.save_patch(os.path.join(workdir, "patch.npz"), patch)
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, "results.json"), results)
  return results


def _reuse_setup(config, components: list[Any], *, data_dir: str | None):
  """The pool dataset of ``config.reuse`` and the components with a ``data_reuse`` term."""
  import dataclasses

  from ftjax.methods.data_reuse import DataReuse

  reuse = config.reuse
  name = reuse.dataset or config.dataset.name
  ftdata.prepare_offline(name, data_dir=data_dir)
  indices = None
  if reuse.indices_path:
    if not os.path.exists(reuse.indices_path):
      raise ConfigError(f"reuse.indices_path={reuse.indices_path!r} does not exist")
    indices = np.load(reuse.indices_path)
  pool = ftdata.load_dataset(
      name, data_dir=data_dir, sampling_rate=reuse.sampling_rate, seed=config.seed,
      val_fraction=config.dataset.val_fraction, image_size=config.dataset.image_size,
      resize_size=config.dataset.resize_size or None, crop_scale=tuple(config.dataset.crop_scale),
      classes=tuple(reuse.classes) or None, train_indices=indices)
  components = list(components)
  if not any(c.name == "data_reuse" for c in components):
    components.append(DataReuse(weight=reuse.weight, mode=reuse.mode, seed=config.seed))
  components = [dataclasses.replace(c, num_pool_classes=pool.num_classes) if c.name == "data_reuse" else c
                for c in components]
  logging.info("reuse: %s pool %s, %d train images, %d classes", reuse.mode, name,
               pool.num_examples["train"], pool.num_classes)
  return components, pool


def mixed_batch(target: dict[str, np.ndarray], pool: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One forward batch of data reuse: target rows, then pool rows (then strong pool views).

  Returns ``image`` (all rows), ``label`` (target rows), ``pool_label`` and
  ``pool_mask`` (0 target row, 1 pool row / weak view, 2 strong view).
  """
  images = [target["image"], pool["image"]]
  mask = [np.zeros(len(target["label"]), np.int32), np.ones(len(pool["label"]), np.int32)]
  if "image_key" in pool:  # Eq. 7: the second view is the strongly augmented one
    images.append(pool["image_key"])
    mask.append(np.full(len(pool["label"]), 2, np.int32))
  return {"image": np.concatenate(images), "label": target["label"], "pool_label": pool["label"],
          "pool_mask": np.concatenate(mask)}


def _projection_dim(components, needed: tuple[str, ...]) -> int:
  """Width of the projector the components ask for (0 when none needs ``projection``)."""
  if "projection" not in needed:
    return 0
  dims = {int(getattr(c, "projection_dim", 128)) for c in components if "projection" in c.outputs}
  if len(dims) != 1:
    raise ConfigError(f"loss components ask for different projection_dim values {sorted(dims)}")
  return dims.pop()


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels out of range: found [{labels.min()}, {labels.max()}] "
                     f"for a dataset with {num_classes} classes")


def _write_json(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)

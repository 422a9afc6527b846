"""One run setup for the trainer, the multitask trainer, notebooks, benchmarks and tests.

:func:`setup_run` turns a config into everything a training loop needs: the
dataset, the methods (prepared), the model and its variables, the parameter
groups, the optimizer, the train state, the frozen source model and the
jitted steps. :func:`init_training` is its in-memory part: from a model, its
variables and a list of methods to a state and jitted steps, with no dataset
and no TensorFlow (notebooks and tests call it directly).

The trainer names no method: every method hook of :class:`ftjax.methods.Method`
is called on every method, and the defaults do nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ftjax import methods as methods_lib
from ftjax import models
from ftjax.core import paths
from ftjax.core.errors import ConfigError
from ftjax.core.io import save_npz
from ftjax.methods.base import RunContext, source_variables
from ftjax.models.layers import compute_dtype
from ftjax.train import optim
from ftjax.train import sharding as shd
from ftjax.train import step as step_lib
from ftjax.train.config import BASELINES, check_values
from ftjax.train.state import TrainState

# ----------------------------------------------------------------------------- rules


def baseline_rules(config: ml_collections.ConfigDict, *, new_heads: Sequence[str] = ()
                   ) -> tuple[list[tuple[str, str]], dict[str, Any], str]:
  """Parameter rules, group settings and default BatchNorm mode of ``config.baseline``.

  ``new_heads``: top-level modules the methods add on top of the model (randomly
  initialised, trained like the target ``head``).
  """
  baseline = config.baseline
  if baseline not in BASELINES:
    raise ConfigError(f"unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
  head = {"lr_mult": config.head_lr_mult}
  heads = "(?:" + "|".join(("head",) + tuple(new_heads)) + ")/.*"
  if baseline == "finetune":
    rules = [(heads, "head"), ("backbone/.*|source_head/.*", "backbone")]
    groups = {"head": head, "backbone": {}}
  elif baseline == "scratch":
    rules = [(".*", "all")]
    groups = {"all": {}}
  elif baseline in ("linear_probe", "patch"):  # patch: the patch method claims its parameters first
    rules = [(heads, "head"), ("backbone/.*|source_head/.*", "frozen")]
    groups = {"head": head, "frozen": {"frozen": True}}
  else:  # last_k
    blocks = models.block_prefixes(config.model)
    k = int(config.last_k)
    if not 1 <= k <= len(blocks):
      raise ConfigError(f"last_k={k} is out of range for {config.model}: it has {len(blocks)} blocks")
    trained = "|".join(f"(?:{prefix})" for prefix in blocks[-k:])
    rules = [(heads, "head"),
             (f"(?:{trained})/.*", "backbone"),
             (f"(?!(?:{trained})/)(?:backbone|source_head)/.*", "frozen")]
    groups = {"head": head, "backbone": {}, "frozen": {"frozen": True}}
  # BatchNorm in "train" mode normalises every layer, frozen or not, by batch
  # statistics and re-estimates all running statistics on the task (as a torch
  # model in train() mode with frozen weights does), so training and evaluation
  # see the same normalisation; "eval" keeps the pretrained statistics everywhere.
  bn_mode = "eval" if baseline == "linear_probe" else "train"
  return rules, groups, bn_mode


def resolve_bn_mode(config: ml_collections.ConfigDict, methods: Sequence[Any]) -> str:
  """``config.bn_mode`` if set, else the methods' mode (they must agree), else the baseline's."""
  if config.bn_mode:
    if config.bn_mode not in ("train", "eval"):
      raise ConfigError(f"bn_mode must be 'train' or 'eval', got {config.bn_mode!r}")
    return config.bn_mode
  wanted = {m.name: m.bn_mode for m in methods if m.bn_mode}
  if len(set(wanted.values())) > 1:
    raise ConfigError(f"methods need different BatchNorm modes: {wanted}; set config.bn_mode")
  if wanted:
    return next(iter(wanted.values()))
  return baseline_rules(config)[2]


def _merge_groups(groups: dict[str, Any], more: Mapping[str, Any], owner: str) -> None:
  for name, settings in more.items():
    settings = dict(settings)
    if name in groups and dict(groups[name]) != settings:
      raise ConfigError(f"{owner} configures parameter group {name!r} as {settings}, but it is "
                        f"already {dict(groups[name])}")
    groups[name] = settings


def resolve_rules(config: ml_collections.ConfigDict, variables: Any = None, *,
                  methods: Sequence[Any] | None = None):
  """``(rules, groups, bn_mode)`` of a run: the methods' rules first, the baseline's for the rest.

  ``config.param_rules`` (when set) replaces all rules; ``config.groups`` adds or
  overrides group settings. ``variables`` (the model's initial variables) are
  needed by methods whose rules come from the model's structure (a patch: it
  raises a ConfigError without them).
  """
  if methods is None:
    methods = methods_lib.build_methods(methods_lib.config_losses(config))
  new_heads = [h for m in methods for h in m.new_heads]
  rules, groups, _ = baseline_rules(config, new_heads=new_heads)
  own: list[tuple[str, str]] = []
  for m in methods:
    own.extend(tuple(r) for r in m.param_rules(variables=variables))
    _merge_groups(groups, m.param_groups(), f"method {m.name!r}")
  rules = paths.claim_first(own, rules)
  if config.param_rules:
    rules = [tuple(r) for r in config.param_rules]
  groups.update({name: dict(g) for name, g in config.groups.items()})
  bn_mode = resolve_bn_mode(config, methods)
  return rules, {name: optim.GroupConfig.from_mapping(g) for name, g in groups.items()}, bn_mode


# ----------------------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigErrors for a config that cannot work, before any data work.

  Every numeric field is checked by :func:`ftjax.train.config.check_values`.
  """
  check_values(config)
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
  if config.get("init_from") and config.pretrained and config.baseline != "scratch":
    raise ConfigError(f"set either pretrained={config.pretrained!r} or init_from={config.init_from!r}, not both")
  if config.get("on_divergence", "raise") not in ("raise", "record"):
    raise ConfigError(f"on_divergence must be 'raise' or 'record', got {config.on_divergence!r}")
  vmap_seeds = config.get("vmap_seeds", False)
  if not isinstance(vmap_seeds, bool):
    raise ConfigError(f"vmap_seeds must be True or False, got {vmap_seeds!r}")
  if vmap_seeds and config.get("on_divergence", "raise") == "record":
    # One stacked program cannot drop a diverged seed and go on with the others as
    # serial seeds do; a sweep that records divergence runs its seeds serially.
    raise ConfigError("vmap_seeds=True needs on_divergence='raise' (a diverged seed stops the stacked "
                      "run); record divergence with serial seeds (vmap_seeds=False)")
  optim.check_weight_decay_mode(config.optimizer.get("weight_decay_mode", "decoupled"))
  check_dataset_config(config)


def semantic_config(config) -> dict[str, Any]:
  """The config fields that define a run's numbers (what a checkpoint must match)."""
  cfg = json.loads(config.to_json_best_effort())
  for key in ("progress", "log_every_steps", "tensorboard", "compare", "num_seeds", "keep_checkpoints",
              "on_divergence", "evaluate_test", "prefetch"):
    cfg.pop(key, None)
  return cfg


# ----------------------------------------------------------------------------- data and model


def check_dataset_config(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigErrors for the held-out split settings (``dataset.val_source``, ``val_fraction``)."""
  from ftjax.data.sampling import VAL_SOURCES
  val_source = config.dataset.get("val_source", "sampled")
  if val_source not in VAL_SOURCES:
    raise ConfigError(f"dataset.val_source must be 'sampled' (val sampled at the training rate) or 'full' "
                      f"(the whole held-out val_fraction of train, fixed), got {val_source!r}")
  fraction = config.dataset.val_fraction
  if not 0 < fraction < 1:
    raise ConfigError(f"dataset.val_fraction must be in (0, 1), got {fraction}")


def dataset_loader(config: ml_collections.ConfigDict) -> Callable[..., Any]:
  """``load(name="", **options)``: a dataset with the run's image and split settings (``""``: the run's dataset).

  The split settings are ``dataset.val_fraction`` and ``dataset.val_source``
  (:func:`ftjax.data.sampling.select_val`). The TFDS pipeline is imported here,
  on first use, so the rest of ftjax runs without TensorFlow.

  Raises:
    ConfigError: a bad ``dataset.val_source`` or ``dataset.val_fraction``.
  """
  check_dataset_config(config)

  def load(name: str = "", **options):
    from ftjax import data as ftdata
    name = name or config.dataset.name
    data_dir = config.dataset.data_dir or None
    ftdata.prepare_offline(name, data_dir=data_dir)
    options.setdefault("val_source", config.dataset.get("val_source", "sampled"))
    return ftdata.load_dataset(
        name, data_dir=data_dir, seed=config.seed, val_fraction=config.dataset.val_fraction,
        image_size=config.dataset.image_size, resize_size=config.dataset.resize_size or None,
        crop_scale=tuple(config.dataset.crop_scale), **options)

  return load


def load_run_dataset(config: ml_collections.ConfigDict):
  """The run's target dataset (this process's shard of it)."""
  return dataset_loader(config)(
      "", sampling_rate=config.dataset.sampling_rate, process_index=jax.process_index(),
      process_count=jax.process_count(), num_shards=config.dataset.num_shards,
      classes=tuple(config.dataset.get("classes", ())) or None,
      train_indices=_train_indices(config.dataset.get("train_indices_path", "")),
      test_split=config.dataset.get("test_split", "test"))


def _train_indices(path: str):
  if not path:
    return None
  if not os.path.exists(path):
    raise ConfigError(f"dataset.train_indices_path={path!r} does not exist")
  return np.load(path)


def model_options(methods: Sequence[Any]) -> dict[str, Any]:
  """The methods' extra model constructor arguments, merged (they must agree)."""
  options: dict[str, Any] = {}
  for m in methods:
    for key, value in m.model_options().items():
      if key in options and options[key] != value:
        raise ConfigError(f"methods ask for different {key} values: {options[key]} and {value} ({m.name})")
      options[key] = value
  return options


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
    # The registry builds float32 models; the run's computation dtype is a model attribute
    # (parameters are float32 either way), as create_model's dtype below.
    model = entry.model.clone(dtype=compute_dtype(config.get("compute_dtype", "float32")))
    variables = entry.variables
    # Checks the image size against the model before any data work (raises a clear error).
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, 3)), train=False), variables)
    return model, variables
  model = models.create_model(config.model, num_classes=num_classes, keep_source_head=keep_source_head,
                              projection_dim=projection_dim, dtype=config.get("compute_dtype", "float32"))
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
      flat = paths.flatten_paths(tree)
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
      out[collection] = paths.unflatten_paths(flat)
  return out


def save_backbone_variables(variables: dict[str, Any], path: str) -> str:
  """Writes the backbone arrays of ``variables`` as the ``.npz`` that ``init_from`` reads (atomic)."""
  flat = {}
  for collection, tree in variables.items():
    for name, leaf in paths.flatten_paths(tree).items():
      if name.startswith("backbone/"):
        flat[f"{collection}/{name}"] = np.asarray(leaf)
  return save_npz(path, **flat)


def make_mesh(num_devices: int = 0):
  """The data mesh over the first ``num_devices`` devices (0: all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ConfigError(f"num_devices={num_devices} but only {len(devices)} devices exist")
    devices = devices[:num_devices]
  return shd.make_data_mesh(devices)


# ----------------------------------------------------------------------------- training


class Training(NamedTuple):
  """A model ready to train: state, frozen source, optimizer and the jitted steps."""
  state: TrainState            # on the mesh (replicated), donated by train_step
  source: Any                  # the frozen pretrained variables ({} when no method reads them)
  train_step: Callable         # (state, batch, source) -> (state, metrics), jitted
  eval_step: Callable          # (variables, batch) -> sums, jitted
  labels: Any                  # parameter group of each parameter
  groups: dict[str, optim.GroupConfig]
  frozen: frozenset[str]       # names of the frozen groups
  sizes: dict[str, int]        # scalar parameters per group
  schedule: Callable
  mesh: Any
  # methods -> the un-jitted step (state, batch, source) -> (state, metrics) of this model,
  # optimizer and BatchNorm mode with those methods (ftjax.train.vmap_seeds vmaps it).
  make_step: Callable | None = None


def init_training(*, model: Any, variables: Any, methods: Sequence[Any], rules: Sequence[tuple[str, str]],
                  groups: Mapping[str, optim.GroupConfig], bn_mode: str = "train", num_classes: int,
                  schedule: Callable, momentum: float = 0.9, nesterov: bool = False,
                  weight_decay: float = 0.0, weight_decay_mode: str = "decoupled",
                  method_rng: jax.Array, state_rng: jax.Array,
                  mesh: Any = None, log_rules: bool = False) -> Training:
  """The train state, frozen source and jitted steps of ``model`` trained by ``methods``.

  In-memory: no dataset, no TensorFlow. ``methods`` must already be prepared
  (:meth:`ftjax.methods.Method.prepare`); their states are initialised here with
  ``fold_in(method_rng, i)``. ``weight_decay_mode``: see :func:`ftjax.train.optim.sgd`.
  """
  mesh = mesh if mesh is not None else shd.make_data_mesh()
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  labels = paths.path_labels(params, rules, log=log_rules)
  paths.check_groups(labels, groups)
  sizes = paths.group_sizes(params, labels)
  if log_rules:
    logging.info("parameter groups: %s", sizes)
  optimizer = optim.make_optimizer(labels=labels, groups=groups, schedule=schedule, momentum=momentum,
                                   nesterov=nesterov, weight_decay=weight_decay,
                                   weight_decay_mode=weight_decay_mode)
  frozen = frozenset(name for name, g in groups.items() if g.frozen)
  method_state = {m.name: m.init_state(variables=variables, rng=jax.random.fold_in(method_rng, i))
                  for i, m in enumerate(methods)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=optimizer.init(params), method_state=method_state, rng=state_rng)
  state = jax.device_put(state, shd.state_sharding(mesh, state))
  source = source_variables(variables) if any(m.needs_source for m in methods) else {}
  source = jax.device_put(source, shd.replicated(mesh))
  frozen_mask = jax.tree.map(lambda label: label in frozen, labels) if frozen else None

  def make_step(step_methods: Sequence[Any]) -> Callable:
    return step_lib.make_train_step(model=model, optimizer=optimizer, methods=step_methods,
                                    train_bn=bn_mode == "train", frozen_mask=frozen_mask)

  train_step = step_lib.jit_train_step(make_step(methods), mesh=mesh, state=state)
  eval_step = step_lib.make_eval_step(model=model, num_classes=num_classes, mesh=mesh,
                                      rngs=step_lib.rng_streams(methods))
  return Training(state=state, source=source, train_step=train_step, eval_step=eval_step, labels=labels,
                  groups=dict(groups), frozen=frozen, sizes=sizes, schedule=schedule, mesh=mesh,
                  make_step=make_step)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> Callable:
  o = config.optimizer
  return optim.make_schedule(name=o.schedule, base_lr=o.lr, total_steps=total_steps,
                             warmup_steps=o.warmup_steps, boundaries=o.boundaries,
                             decay_factor=o.decay_factor)


class Run(NamedTuple):
  """Everything :func:`ftjax.train.loop.train_and_evaluate` needs, built from a config."""
  config: Any
  workdir: str
  dataset: Any
  methods: list[Any]
  model: Any
  variables: Any               # the initial variables (the base a patch is measured against)
  bn_mode: str
  context: RunContext
  training: Training
  total_steps: int
  eval_every: int


def setup_run(config: ml_collections.ConfigDict, workdir: str, *, dataset: Any = None) -> Run:
  """Builds a run from ``config`` (one seed): data, methods, model, groups, state, steps.

  Writes the methods' artifacts into ``workdir`` (process 0). ``dataset``: use
  this dataset instead of loading ``config.dataset`` (an in-memory dataset).
  """
  validate_config(config)
  methods = methods_lib.build_methods(methods_lib.config_losses(config))
  # Fail fast on a bad baseline or BatchNorm mode, before any data work (the methods'
  # structural rules need the model and are resolved below).
  baseline_rules(config, new_heads=[h for m in methods for h in m.new_heads])
  resolve_bn_mode(config, methods)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  rng = jax.random.PRNGKey(config.seed)  # raw uint32 key: plain array in checkpoints
  init_rng, method_rng, state_rng = jax.random.split(rng, 3)

  if dataset is None:
    dataset = load_run_dataset(config)
  methods = [m.load_data(load_dataset=dataset_loader(config), seed=config.seed) for m in methods]
  needed = step_lib.required_outputs(methods)
  model, variables = build_model(config, num_classes=dataset.num_classes,
                                 keep_source_head="source_logits" in needed, rng=init_rng,
                                 **model_options(methods))
  for m in methods:
    model, variables = m.wrap_model(model=model, variables=variables, rng=jax.random.fold_in(init_rng, 1))

  bn_mode = resolve_bn_mode(config, methods)
  views = max(int(m.views) for m in methods)
  context = RunContext(dataset=dataset, model=model, variables=variables, seed=int(config.seed),
                       workdir=workdir, bn_mode=bn_mode, views=views, batch_size=int(config.batch_size),
                       eval_batch_size=int(config.eval_batch_size), pretrained=config.pretrained or "",
                       model_name=config.model, image_size=int(config.dataset.image_size),
                       progress=bool(config.get("progress", True)))
  methods = [m.prepare(context) for m in methods]
  if jax.process_index() == 0:
    for m in methods:
      for path in m.write_artifacts(context):
        logging.info("%s: wrote %s", m.name, path)

  rules, groups, bn_mode = resolve_rules(config, variables, methods=methods)
  steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
  total_steps = config.num_steps or config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  training = init_training(
      model=model, variables=variables, methods=methods, rules=rules, groups=groups, bn_mode=bn_mode,
      num_classes=dataset.num_classes, schedule=make_schedule(config, total_steps),
      momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov,
      weight_decay=config.optimizer.weight_decay,
      weight_decay_mode=config.optimizer.get("weight_decay_mode", "decoupled"),
      method_rng=method_rng, state_rng=state_rng,
      mesh=make_mesh(config.num_devices), log_rules=True)
  return Run(config=config, workdir=workdir, dataset=dataset, methods=methods, model=model,
             variables=variables, bn_mode=bn_mode, context=context, training=training,
             total_steps=total_steps, eval_every=eval_every)

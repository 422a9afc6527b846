"""The trainer's configuration schema (ml_collections), with its defaults.

Experiment configs under ``experiments/configs`` start from :func:`default_config`
and change what they need; ``--config.x=y`` overrides any field from the command
line, and an unknown field is an error.
"""

from __future__ import annotations

import ml_collections

BASELINES = ("finetune", "linear_probe", "last_k", "scratch", "patch")


def default_config() -> ml_collections.ConfigDict:
  """The schema and its defaults.

  Two defaults keep the behaviour of the code before the setting existed, and
  the paper-protocol configs (``experiments/configs/default.py`` and every config
  built on it) set the papers' choice instead:

  * ``optimizer.weight_decay_mode = "decoupled"`` (paper configs: ``"coupled"``,
    ``torch.optim.SGD`` as in TLlib and the official Co-Tuning / SpotTune code).
    A checkpoint written before the field existed is read as holding the
    default (:func:`ftjax.train.loop.check_record` accepts a missing key at its
    default value), so the default must be the decay that checkpoint trained
    with, or a resumed run would silently switch to a ~10x stronger decay; and
    configs built on this function without opting in (``tiny.py``, the
    notebooks, benchmarks and tests) keep their numbers bitwise.
  * ``dataset.val_source = "sampled"`` (paper configs: ``"full"``): 'val' is
    sampled at the training rate, the realistic low-data setting and the old
    behaviour; ``"full"`` holds out the whole ``val_fraction`` part of the train
    split (or the dataset's validation split), the same for every rate and seed,
    and samples train from the rest. Result tables name the choice.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_seeds = 1                 # seeds seed .. seed + num_seeds - 1; tables give mean ± std
  # True: the num_seeds seeds of each variant train as one jitted program, vmapped over a
  # leading seed axis of the train state and the batch (each seed keeps its own subset, head
  # initialisation, augmentation and rngs; ftjax.train.vmap_seeds). Their records say
  # "vmap_seeds": true and a table never mixes them with serial seeds. The seeds must have
  # equal step counts (set num_steps when their subsets' epochs differ).
  c.vmap_seeds = False
  # Train batches put on the devices this many steps ahead (ftjax.data.pipeline.prefetch_to_device):
  # the host-to-device copy and the host pipeline overlap the running step. Changes no number.
  c.prefetch = 2
  c.model = "efficientnet_lite0"
  c.pretrained = "efficientnet_lite0/imagenet"   # "" trains from random initialisation
  # "bfloat16": mixed precision (convolutions and activations in bfloat16; parameters, optimizer
  # state, BatchNorm statistics, softmaxes and losses float32); "float32": everything float32.
  c.compute_dtype = "float32"

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "fashion_mnist"
  c.dataset.data_dir = ""         # "" = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.dataset.sampling_rate = 100.0  # percent of the training set, stratified per class
  c.dataset.val_fraction = 0.2    # held-out part of train (datasets without a validation split)
  c.dataset.val_source = "sampled"  # "sampled": val sampled at sampling_rate like train (low-data);
                                  # "full": the whole held-out part, fixed for every rate and seed (papers)
  c.dataset.image_size = 224
  c.dataset.resize_size = 0       # 0 = image_size / 0.875
  c.dataset.crop_scale = (0.08, 1.0)  # area range of the training random-resized crop
  c.dataset.num_shards = 0        # data shards per global batch (0 = process count); fix it to get the
                                  # same batches from any number of processes (a multiple of it)
  c.dataset.test_split = "test"   # TFDS split evaluated as 'test'; "validation" -> val is carved from train
  c.dataset.classes = ()          # a class subset (TFDS label ids, relabelled 0..n-1 in this order); () = all
  c.dataset.train_indices_path = ""  # .npy of TFDS train-split indices that 'train' is sampled from
                                  # (e.g. a pre-training pool without the target's images); "" = all

  c.batch_size = 32               # global
  c.eval_batch_size = 128
  c.num_epochs = 10
  c.num_steps = 0                 # > 0 overrides num_epochs
  c.num_devices = 0               # 0 = all devices

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.weight_decay_mode = "decoupled"  # "coupled": torch.optim.SGD (decay added to the gradient
                                  # before momentum); "decoupled": SGDW, ~10x weaker at momentum 0.9
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 0
  c.optimizer.boundaries = (0.5, 0.75)
  c.optimizer.decay_factor = 0.1

  # Which parameters train: a baseline picks default rules; explicit param_rules win.
  c.baseline = "finetune"         # one of BASELINES
  c.last_k = 1                    # for baseline "last_k"
  c.patch = ml_collections.ConfigDict()   # for baseline "patch" (model patches)
  c.patch.selection = "scale_bias"  # scale_bias | depthwise | head | all, or a union "scale_bias+depthwise"
  c.patch.train_head = True       # False: the head stays at its random init ("random fixed last layer")
  c.head_lr_mult = 10.0           # new head's lr relative to the pretrained backbone
  c.param_rules = ()              # ((regex, group), ...); () = the baseline's rules
  c.groups = ml_collections.ConfigDict()  # group -> {lr_mult, weight_decay, frozen}
  c.bn_mode = ""                  # "train" | "eval"; "" = eval for linear_probe, else train

  c.losses = ml_collections.ConfigDict({"ce": {"weight": 1.0}})

  c.log_every_steps = 10
  c.eval_every_steps = 0          # 0 = once per epoch; a checkpoint is written at every evaluation
  c.keep_checkpoints = 2
  c.selection_metric = "top1"     # on the validation split: picks the checkpoint tested at the end
  # False: a hyper-parameter sweep run, which reads no test data: the results record has
  # no test figures and the methods' after-training analyses (which may read test) are
  # skipped. Not part of the run's identity: the same run directory later evaluated with
  # True (the value the sweep chose) resumes at its last step and only tests.
  c.evaluate_test = True
  c.progress = True
  # A run whose loss becomes non-finite: "raise" stops (the error names the last good
  # checkpoint); "record" (learning-rate sweeps) records it as diverged and goes on
  # with the comparison's next variant.
  c.on_divergence = "raise"
  c.tensorboard = True

  # Named variants run one after another into workdir/<name>, then a table is printed:
  # {"linear_probe": {"baseline": "linear_probe"}, "finetune": {}}.
  c.compare = ml_collections.ConfigDict()

  # Start from these backbone variables (an .npz of "params/backbone/..." and
  # "batch_stats/backbone/..." arrays, e.g. a model pretrained here); "" = none.
  c.init_from = ""

  # Pre-training data reuse (papers/uot-data-reuse.txt, Eq. 6 / Eq. 7): each step
  # also forwards an equal-size batch of (selected) pool data; the ``data_reuse``
  # loss component (added automatically) weighs its term by ``weight``.
  c.reuse = ml_collections.ConfigDict()
  c.reuse.enabled = False
  c.reuse.weight = 0.3            # λ (paper grid {1, 0.3, 0.1})
  c.reuse.mode = "labelled"       # "labelled": pool head on pool labels (Eq. 6); "pseudo_label": Eq. 7
  c.reuse.dataset = ""            # TFDS name of the pool; "" = dataset.name
  c.reuse.classes = ()            # pool class subset (TFDS label ids); () = all
  c.reuse.indices_path = ""       # .npy of pool train example indices (the selected units); "" = all
  c.reuse.sampling_rate = 100.0   # percent of the pool's train part, per class
  c.reuse.weak_crop_scale = (0.8, 1.0)   # Eq. 7: crop area range of the weak view (strong: dataset.crop_scale)
  return c


# ----------------------------------------------------------------------------- value checks
#
# Every numeric field of the schema and of the built-in methods' options, with the
# values it can take. :func:`check_values` runs before any data work
# (``ftjax.train.setup.validate_config``), so a bad value is one line naming the
# field, never a run that trains on it (a negative learning rate is gradient ascent).

POSITIVE = "finite and > 0"
NON_NEGATIVE = "finite and >= 0"
INT_POSITIVE = "an integer >= 1"
INT_NON_NEGATIVE = "an integer >= 0"
MOMENTUM = "in [0, 1)"
UNIT = "in [0, 1]"
OPEN_UNIT = "in (0, 1)"
PERCENT = "in (0, 100] (a percentage)"
CROP = "a pair (low, high) with 0 < low <= high <= 1"
BOUNDARIES = "a list of numbers > 0 (fractions of training below 1, step numbers from 1)"
OPTIONAL = " (or None)"

CONFIG_FIELDS: dict[str, str] = {
    "seed": INT_NON_NEGATIVE,
    "num_seeds": INT_POSITIVE,
    "prefetch": INT_POSITIVE,
    "dataset.sampling_rate": PERCENT,
    "dataset.val_fraction": OPEN_UNIT,
    "dataset.image_size": INT_POSITIVE,
    "dataset.resize_size": INT_NON_NEGATIVE,
    "dataset.crop_scale": CROP,
    "dataset.num_shards": INT_NON_NEGATIVE,
    "batch_size": INT_POSITIVE,
    "eval_batch_size": INT_POSITIVE,
    "num_epochs": INT_NON_NEGATIVE,
    "num_steps": INT_NON_NEGATIVE,
    "num_devices": INT_NON_NEGATIVE,
    "optimizer.lr": POSITIVE,
    "optimizer.momentum": MOMENTUM,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.warmup_steps": INT_NON_NEGATIVE,
    "optimizer.boundaries": BOUNDARIES,
    "optimizer.decay_factor": POSITIVE,
    "last_k": INT_POSITIVE,
    "head_lr_mult": NON_NEGATIVE,
    "log_every_steps": INT_POSITIVE,
    "eval_every_steps": INT_NON_NEGATIVE,
    "keep_checkpoints": INT_POSITIVE,
    "reuse.weight": NON_NEGATIVE,
    "reuse.sampling_rate": PERCENT,
    "reuse.weak_crop_scale": CROP,
}

# The groups' settings (``groups.<name>.<field>``).
GROUP_FIELDS: dict[str, str] = {"lr_mult": NON_NEGATIVE, "weight_decay": NON_NEGATIVE + OPTIONAL}

# ``losses.<method>.<option>``: every numeric option of the built-in methods
# (tests/test_faults.py checks that none is missing).
METHOD_FIELDS: dict[str, dict[str, str]] = {
    "ce": {"weight": NON_NEGATIVE, "label_smoothing": UNIT},
    "co_tuning": {"weight": NON_NEGATIVE, "val_fraction": OPEN_UNIT,
                  # 0 or None: no source calibration
                  "source_temperature": NON_NEGATIVE + OPTIONAL},
    "data_reuse": {"weight": NON_NEGATIVE, "sampling_rate": PERCENT, "weak_crop_scale": CROP,
                   "num_pool_classes": INT_NON_NEGATIVE, "seed": INT_NON_NEGATIVE},
    "l2_sp": {"weight": NON_NEGATIVE, "alpha": NON_NEGATIVE, "beta": NON_NEGATIVE},
    "delta": {"weight": NON_NEGATIVE, "alpha": NON_NEGATIVE, "beta": NON_NEGATIVE,
              "attention_batches": INT_POSITIVE, "attention_temperature": POSITIVE,
              "attention_chunk": INT_NON_NEGATIVE, "head_l2": NON_NEGATIVE},
    "bss": {"weight": NON_NEGATIVE, "k": INT_POSITIVE},
    "lwf": {"weight": NON_NEGATIVE, "temperature": POSITIVE},
    # The key encoder's momentum may be 1 (a frozen key encoder), unlike the optimizer's.
    "bi_tuning": {"weight": NON_NEGATIVE, "cce_weight": NON_NEGATIVE, "ccl_weight": NON_NEGATIVE,
                  "keys_per_class": INT_POSITIVE, "temperature": POSITIVE, "momentum": UNIT,
                  "projection_dim": INT_POSITIVE, "views": INT_POSITIVE},
    "spottune": {"weight": NON_NEGATIVE, "lambda1": NON_NEGATIVE, "lambda2": NON_NEGATIVE,
                 "k": NON_NEGATIVE, "policy_depth": INT_POSITIVE, "policy_width": INT_POSITIVE,
                 "policy_image_size": INT_NON_NEGATIVE, "temperature": POSITIVE,
                 "random_finetune_last": INT_NON_NEGATIVE, "prune_threshold": UNIT,
                 "first_routed_block": INT_NON_NEGATIVE, "policy_lr_mult": NON_NEGATIVE,
                 "policy_weight_decay": NON_NEGATIVE + OPTIONAL},
    "patch": {"weight": NON_NEGATIVE},
}


def _is_number(value) -> bool:
  import numbers
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _value_ok(value, rule: str) -> bool:
  import math
  if rule.endswith(OPTIONAL):
    if value is None:
      return True
    rule = rule[:-len(OPTIONAL)]
  if rule in (CROP, BOUNDARIES):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
      return False
    values = list(value)
    if not all(_is_number(v) and math.isfinite(v) for v in values):
      return False
    if rule == CROP:
      return len(values) == 2 and 0 < values[0] <= values[1] <= 1
    return all(v > 0 for v in values)
  if not _is_number(value) or not math.isfinite(value):
    return False
  if rule in (INT_POSITIVE, INT_NON_NEGATIVE):
    return float(value).is_integer() and value >= (1 if rule == INT_POSITIVE else 0)
  return {POSITIVE: value > 0, NON_NEGATIVE: value >= 0, MOMENTUM: 0 <= value < 1, UNIT: 0 <= value <= 1,
          OPEN_UNIT: 0 < value < 1, PERCENT: 0 < value <= 100}[rule]


def check_value(field: str, value, rule: str) -> None:
  """A one-line ConfigError naming ``field`` when ``value`` breaks ``rule``.

  Example:
    >>> check_value("optimizer.lr", -1.0, POSITIVE)
    Traceback (most recent call last):
    ...
    ftjax.core.errors.ConfigError: optimizer.lr must be finite and > 0, got -1.0
  """
  if not _value_ok(value, rule):
    from ftjax.core.errors import ConfigError
    shown = tuple(value) if isinstance(value, list) else value
    raise ConfigError(f"{field} must be {rule}, got {shown!r}")


def check_values(config: ml_collections.ConfigDict) -> None:
  """Checks every numeric field of ``config`` (schema, groups, methods' options).

  Raises:
    ConfigError: the first bad value, naming its field.
  """
  from ftjax.methods.registry import config_losses
  for field, rule in CONFIG_FIELDS.items():
    node, found = config, True
    for part in field.split("."):
      if part not in node:
        found = False  # a config built without this (optional) section
        break
      node = node[part]
    if found:
      check_value(field, node, rule)
  for name, group in config.get("groups", {}).items():
    for key, rule in GROUP_FIELDS.items():
      if key in group:
        check_value(f"groups.{name}.{key}", group[key], rule)
  if "losses" not in config:
    return  # not a trainer config (a study script's own settings)
  explicit = set(config.losses.keys())
  for method, options in config_losses(config).items():
    prefix = f"losses.{method}" if method in explicit else {"data_reuse": "reuse", "patch": "patch"}.get(
        method, f"losses.{method}")
    for key, rule in METHOD_FIELDS.get(method, {}).items():
      if key in options:
        check_value(f"{prefix}.{key}", options[key], rule)

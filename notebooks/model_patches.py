# ---
# jupyter:
#   colab:
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: colab,language_info
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # Model patches: train a scale-and-bias patch, save it, apply it
#
# Mudrakarta et al., "K for the price of 1": instead of fine-tuning a whole network per
# task, train a small *patch* (here every BatchNorm scale and bias, plus the new head)
# on top of a frozen, shared base. The `patch` method (`ftjax.methods.patches.ModelPatch`,
# added by a config's `baseline = "patch"`) claims the patch parameters, found from the
# model's structure (`selection="scale_bias"`); the baseline freezes the rest. The run is
# set up by the trainer's own setup (`ftjax.train.setup`): its optimizer trains only the
# patch (`optax.partition` with `set_to_zero` for the frozen group), and the patch is
# saved to and applied from one small `.npz` file.
#
# This notebook trains, on 5% of Fashion-MNIST at 32 px, for 40 steps of 64 images:
# * **last layer**: only the new head (BatchNorm in eval mode, base statistics);
# * **scale-and-bias patch + last layer**: BatchNorm scales/biases, the head and the
#   BatchNorm statistics re-estimated on the task.
#
# It then saves the patch, applies it onto a fresh copy of the base, checks that the
# logits are those of the trained model, and compares sizes and validation accuracy.
# The base is a randomly initialised tiny ResNet standing in for a pretrained
# checkpoint, and training is short: **the accuracies are rough** and only show the
# workflow (the same code patches `models.pretrained("efficientnet_lite0/imagenet", ...)`).
#
# The first code cell installs ftjax where it is not importable (e.g. on Colab); where ftjax
# is installed it does nothing. ftjax has no public download: open the notebook from the
# `notebooks/` folder of a copy of the repository, or upload the repository next to it as
# `ftjax/`. The cell runs `pip install` on that copy, which also compiles ftjax's CPU kernels
# (it needs `g++`; a few minutes).

# %%
# Colab-ready: installs ftjax (and the notebook extras) from a copy of its repository,
# only where it is missing.
try:
  import ftjax  # noqa: F401
except ImportError:
  import pathlib
  FTJAX_REPO = next((str(p.resolve()) for p in (pathlib.Path(".."), pathlib.Path("ftjax"))
                     if (p / "ftjax" / "ops" / "build_kernels.py").exists()), None)
  if FTJAX_REPO is None:
    raise RuntimeError("ftjax is not installed and no copy of its repository is in .. or ./ftjax: "
                       "upload the repository (ftjax has no public download) and run this cell again")
  # %pip install -q "{FTJAX_REPO}[test]"

# %%
import os
import tensorflow_datasets as tfds
from ftjax import data
from ftjax.data import offline

def ensure_fashion_mnist() -> None:
  """Prepares TFDS's fashion_mnist: from local Debian files if present, else by download."""
  if tfds.builder("fashion_mnist").is_prepared():
    return
  if os.path.isdir(offline.fashion_mnist_source_dir()):
    data.prepare_offline("fashion_mnist")        # no network
  else:
    tfds.builder("fashion_mnist").download_and_prepare()

ensure_fashion_mnist()

# %%
import functools
import itertools
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import methods as methods_lib
from ftjax import models
from ftjax.methods import RunContext
from ftjax.methods import patches
from ftjax.train import loop
from ftjax.train import setup
from ftjax.train import sharding
from ftjax.train.config import default_config

NOTEBOOK_START = time.perf_counter()
OUT_DIR = os.environ.get("FTJAX_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="ftjax_patches_")
SEED, IMAGE_SIZE, BATCH_SIZE, NUM_STEPS = 0, 32, 64, 40

dataset = data.load_dataset("fashion_mnist", sampling_rate=5, seed=SEED, image_size=IMAGE_SIZE,
                            crop_scale=(0.35, 1.0))
model = models.create_model("resnet_tiny", num_classes=dataset.num_classes)
init = jax.jit(functools.partial(model.init, train=False, outputs=model.all_outputs))
base_variables = jax.device_get(init(jax.random.key(SEED), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))))
print(dataset)

# %% [markdown]
# ## Which parameters train
#
# Each variant is a config: `baseline = "patch"` adds the `patch` method with
# `config.patch`'s selection. Rules are `(regex, group)` pairs over parameter paths;
# every parameter must match exactly one. `setup.resolve_rules` lets the method claim
# its parameters first (the `patch` group, found from the structure: BatchNorm layers
# are those with running statistics; and the `head`), then the baseline's rules cover
# the rest (`frozen`). The last-layer variant keeps BatchNorm in eval mode (the base's
# statistics); the scale-and-bias patch runs it in train mode and re-estimates them on
# the task. That is the patch method's own default, which follows the patch's definition
# (`ModelPatch.bn_statistics = "auto"`): a scale-and-bias patch holds the statistics, a
# last-layer or depthwise patch keeps the pretrained ones. The notebook also sets
# `config.bn_mode` to the same modes, so each variant says which it runs (`config.bn_mode`
# overrides the method's default). `setup.init_training` then builds the optimizer, the
# train state and the jitted steps of each variant.

# %%
params = base_variables["params"]

def build_variant(selection, bn_mode):
  """One variant's config, prepared methods and ``Training`` (state, jitted steps, labels)."""
  config = default_config()
  config.model, config.pretrained, config.seed = "resnet_tiny", "", SEED
  config.baseline, config.patch.selection, config.bn_mode = "patch", selection, bn_mode
  config.head_lr_mult = 1.0
  config.optimizer.lr, config.optimizer.schedule = 0.1, "cosine"
  config.optimizer.momentum, config.optimizer.nesterov, config.optimizer.weight_decay = 0.9, False, 0.0
  methods = methods_lib.build_methods(methods_lib.config_losses(config))   # ce + patch
  rules, groups, bn_mode = setup.resolve_rules(config, base_variables, methods=methods)
  context = RunContext(model=model, variables=base_variables, seed=SEED, bn_mode=bn_mode,
                       batch_size=BATCH_SIZE, model_name=config.model, image_size=IMAGE_SIZE)
  methods = [m.prepare(context) for m in methods]
  training = setup.init_training(
      model=model, variables=base_variables, methods=methods, rules=rules, groups=groups,
      bn_mode=bn_mode, num_classes=dataset.num_classes, schedule=setup.make_schedule(config, NUM_STEPS),
      momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov,
      weight_decay=config.optimizer.weight_decay,
      method_rng=jax.random.PRNGKey(SEED), state_rng=jax.random.PRNGKey(SEED))
  return {"config": config, "methods": methods, "bn_mode": bn_mode, "training": training,
          "labels": training.labels}

variants = {"last layer": build_variant("head", bn_mode="eval"),
            "scale-and-bias patch": build_variant("scale_bias", bn_mode="train")}
for name, variant in variants.items():
  print(f"{name}: methods {[m.name for m in variant['methods']]}, BatchNorm {variant['bn_mode']}, "
        f"parameters per group {variant['training'].sizes}")
  for m in variant["methods"]:   # claimed first
    for regex, group in m.param_rules(variables=base_variables):
      print(f"    {group:7s} {regex[:100]}   ({m.name} method)")
  for regex, group in setup.baseline_rules(variant["config"])[0]:
    print(f"    {group:7s} {regex[:100]}   (baseline, the rest)")

# %% [markdown]
# ## Training both variants

# %%
def evaluate(training, variables, split="val"):
  return loop.evaluate(training.eval_step, variables, dataset, split, batch_size=200, mesh=training.mesh)

def train(training):
  state, losses = training.state, []
  for batch in itertools.islice(dataset.train_batches(batch_size=BATCH_SIZE), NUM_STEPS):
    state, metrics = training.train_step(state, sharding.global_batch(batch, training.mesh),
                                         training.source)
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses

for name, variant in variants.items():
  t0 = time.perf_counter()
  state, losses = train(variant["training"])
  variant["variables"] = state.variables
  variant["losses"] = losses
  variant["val"] = evaluate(variant["training"], state.variables)
  print(f"{name:22s} loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}   "
        f"val top-1 {variant['val']['top1']:.3f}   ({time.perf_counter() - t0:.0f} s)")

# %% [markdown]
# ## Save the patch, apply it onto the base
#
# `extract_patch` keeps the parameters of the `patch` and `head` groups and, since
# BatchNorm ran in training mode, the re-estimated statistics. `apply_patch` writes them
# into a copy of the base variables; the result must give exactly the trained model's
# logits. (In a config-driven run, `ftjax.train.loop.train_and_evaluate`, the `patch`
# method's `finalize` does the same for the chosen checkpoint and writes `patch.npz`.)

# %%
patched = variants["scale-and-bias patch"]
patch = patches.extract_patch(patched["variables"], patched["labels"], groups=("patch", "head"),
                              include_batch_stats=True, info={"task": "fashion_mnist",
                                                              "selection": "scale_bias"})
patch_path = patches.save_patch(os.path.join(OUT_DIR, "fashion_mnist_scale_bias.npz"), patch)
loaded = patches.load_patch(patch_path)
applied = patches.apply_patch(base_variables, loaded)

check_images = next(dataset.eval_batches("val", batch_size=64))["image"]
logits_fn = jax.jit(lambda v, x: model.apply(v, x, train=False, outputs=("logits",))["logits"])
trained_logits = np.asarray(logits_fn(patched["variables"], check_images))
applied_logits = np.asarray(logits_fn(applied, check_images))
patch_logit_diff = float(np.max(np.abs(applied_logits - trained_logits)))
print(f"max |logits(base + patch) - logits(trained)| = {patch_logit_diff:.2e}")
print(f"val top-1 of base + patch: {evaluate(patched['training'], applied)['top1']:.3f}")
np.savez(os.path.join(OUT_DIR, "patch_check.npz"), images=check_images, logits=trained_logits)

# %% [markdown]
# ## Sizes and accuracy
#
# Sizes count the trained parameters (the paper's measure) and the bytes stored
# (parameters plus BatchNorm statistics). For scale; a full fine-tune would store every
# parameter.

# %%
last = variants["last layer"]
head_patch = patches.extract_patch(last["variables"], last["labels"], groups=("head",),
                                   include_batch_stats=False)
head_path = patches.save_patch(os.path.join(OUT_DIR, "fashion_mnist_last_layer.npz"), head_patch)
total_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
rows = {
    "last layer": (patches.patch_size(head_patch, params), head_path, last["val"]["top1"]),
    "scale-and-bias patch": (patches.patch_size(loaded, params), patch_path, patched["val"]["top1"]),
}
print(f"base model: {total_params} parameters")
print(f"{'variant':22s} {'params':>7s} {'% of model':>10s} {'file bytes':>10s} {'val top-1':>9s}")
for name, (size, path, top1) in rows.items():
  print(f"{name:22s} {size.parameters:7d} {size.percent:9.2f}% {os.path.getsize(path):10d} {top1:9.3f}")

# %%
# One machine-readable line for tests/test_notebooks.py.
results = {
    "python": __import__("sys").executable,
    "out_dir": OUT_DIR,
    "patch_path": patch_path,
    "patch_logit_diff": patch_logit_diff,
    "patch_parameters": rows["scale-and-bias patch"][0].parameters,
    "head_parameters": rows["last layer"][0].parameters,
    "total_parameters": total_params,
    "val_top1": {name: row[2] for name, row in rows.items()},
    "losses": {name: v["losses"] for name, v in variants.items()},
    "seconds": time.perf_counter() - NOTEBOOK_START,
}
assert patch_logit_diff <= 1e-5, "base + patch does not reproduce the trained model"
print("NOTEBOOK_RESULTS " + json.dumps(results))

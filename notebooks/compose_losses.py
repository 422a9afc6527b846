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
# # Composing losses: Co-Tuning + Bi-Tuning + BSS in one training step
#
# This notebook builds **one jitted training step** from four methods of ftjax, on a
# tiny ResNet at 32 px and 2% of Fashion-MNIST:
#
# | method | paper term | what it needs from the forward |
# |---|---|---|
# | `CrossEntropy` (`ce`) | target cross-entropy | `logits` |
# | `CoTuning` (`co_tuning`) | soft CE of the source head against the label's relationship row (Co-Tuning Eq. 2) | `source_logits` |
# | `BiTuning` (`bi_tuning`) | contrastive CE + categorical contrastive loss (Bi-Tuning Eq. 3, 4) | `features`, `projection` |
# | `BatchSpectralShrinkage` (`bss`) | smallest squared singular value of the features (BSS Eq. 4) | `features` |
#
# The methods are built from the same `losses` dictionary a config holds
# (`ftjax.methods.build_methods`), and the run is set up by the trainer's own setup,
# `ftjax.train.setup.init_training`: it runs the forward once with every output the
# methods ask for, sums `weight * term`, takes one gradient and updates each method's
# state (Bi-Tuning's momentum encoder and queues). The notebook shows each term's value
# on the first batch, trains a few dozen steps and plots the curves.
#
# The model is randomly initialised (no pretrained tiny model exists) and the
# Co-Tuning relationship is hand-built: the notebook shows how the pieces fit,
# not the methods' benefit.
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
import json
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from ftjax import methods as methods_lib
from ftjax import models
from ftjax.methods import RunContext
from ftjax.train import setup
from ftjax.train import sharding
from ftjax.train import step as step_lib
from ftjax.train.config import default_config

# %matplotlib inline
NOTEBOOK_START = time.perf_counter()

# %% [markdown]
# ## Data
#
# 2% of the Fashion-MNIST train split (about 960 images), resized to 32 px.

# %%
SEED, IMAGE_SIZE, BATCH_SIZE, NUM_STEPS = 0, 32, 32, 30
NUM_SOURCE_CLASSES, PROJECTION_DIM = 20, 16

dataset = data.load_dataset("fashion_mnist", sampling_rate=2, seed=SEED,
                            image_size=IMAGE_SIZE, crop_scale=(0.35, 1.0))
print(dataset)

# %% [markdown]
# ## The Co-Tuning relationship
#
# Co-Tuning needs `p(y_s | y_t)`, a `[target classes, source classes]` row-stochastic
# matrix. With a real pretrained model its `prepare` computes it from data (the run's
# `RunContext`: dataset, model, variables) with
# `ftjax.methods.co_tuning.relationship.compute_relationship(...)` (Alg. 1), or
# `ftjax.methods.co_tuning.relationship.direct_relationship` (Eq. 3) from the source model's probabilities.
# A random source head has no such knowledge (it sends every class to the same source
# class), so here we hand-build one: target class `c` is related to source classes `2c`
# and `2c + 1`, as if the source task had two finer categories per target class. Given
# as the method's `relationship` option, `prepare` only checks its shape.

# %%
relationship = np.full((dataset.num_classes, NUM_SOURCE_CLASSES), 0.1 / (NUM_SOURCE_CLASSES - 2))
for c in range(dataset.num_classes):
  relationship[c, 2 * c] = relationship[c, 2 * c + 1] = 0.45
print("relationship", relationship.shape, "rows sum to", np.unique(relationship.sum(1).round(6)))

# %% [markdown]
# ## Methods and the model they ask for
#
# Each method is a small frozen dataclass with a `weight`, the forward `outputs` it
# needs, `init_state` and `__call__` returning a `TermOutput(loss, state, metrics)`
# (the contract is `ftjax.methods.Method`). What the methods declare shapes the model:
# Co-Tuning reads `source_logits` (keep the source head), Bi-Tuning's `model_options()`
# adds a projector (`projection_dim`) and asks for a second augmented view of every
# image (`views=2` gives `batch["image_key"]`).

# %%
methods = methods_lib.build_methods({
    "ce": {"weight": 1.0},
    "co_tuning": {"weight": 2.3, "relationship": relationship},
    "bi_tuning": {"weight": 1.0, "keys_per_class": 8, "projection_dim": PROJECTION_DIM},
    "bss": {"weight": 1e-3, "k": 1},
})
needed = step_lib.required_outputs(methods)
views = max(m.views for m in methods)
print("forward outputs the step computes:", needed, "; views per image:", views)
print("model options from the methods:", setup.model_options(methods))

model = models.create_model("resnet_tiny", num_classes=dataset.num_classes,
                            keep_source_head="source_logits" in needed,
                            num_source_classes=NUM_SOURCE_CLASSES, **setup.model_options(methods))
init = jax.jit(functools.partial(model.init, train=False, outputs=model.all_outputs))
variables = init(jax.random.key(SEED), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
print({name: jax.tree.map(jnp.shape, p) if name == "head" else "..."
       for name, p in variables["params"].items()})

# %% [markdown]
# ## The run: rules, prepared methods, state and step
#
# The parameter rules come from the config's baseline (`finetune`: the new head and
# Bi-Tuning's projector, a `new_heads` of the method, train at 10x the backbone's
# learning rate) through `setup.resolve_rules`, as in a config-driven run. Each method
# is then prepared once from the run's `RunContext` (Bi-Tuning takes the model for its
# key encoder and the run's BatchNorm mode; Co-Tuning checks its relationship against
# the dataset), and `setup.init_training` builds the partitioned optimizer, the train
# state (with every method's state) and the jitted steps.

# %%
config = default_config()
config.model, config.pretrained = "resnet_tiny", ""   # randomly initialised
config.baseline, config.head_lr_mult = "finetune", 10.0
config.optimizer.lr, config.optimizer.schedule = 0.05, "cosine"
config.optimizer.momentum, config.optimizer.nesterov, config.optimizer.weight_decay = 0.9, False, 5e-4

rules, groups, bn_mode = setup.resolve_rules(config, variables, methods=methods)
context = RunContext(dataset=dataset, model=model, variables=variables, seed=SEED, bn_mode=bn_mode,
                     views=views, batch_size=BATCH_SIZE, model_name=config.model, image_size=IMAGE_SIZE)
methods = [m.prepare(context) for m in methods]
training = setup.init_training(
    model=model, variables=variables, methods=methods, rules=rules, groups=groups, bn_mode=bn_mode,
    num_classes=dataset.num_classes, schedule=setup.make_schedule(config, NUM_STEPS),
    momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov,
    weight_decay=config.optimizer.weight_decay,
    method_rng=jax.random.PRNGKey(1), state_rng=jax.random.PRNGKey(2))
print("BatchNorm mode:", bn_mode, "; parameters per group:", training.sizes)
for regex, group in rules:
  print(f"    {group:9s} {regex}")

# %% [markdown]
# ## Each term on the first batch
#
# The step's metrics hold every unweighted term (`loss/<name>`), each method's own
# metrics (`bi_tuning/cce`, `bi_tuning/ccl`, queue fill) and the weighted total `loss`.
# On the first batch Bi-Tuning's queues are still empty.

# %%
mesh = training.mesh
batches = dataset.train_batches(batch_size=BATCH_SIZE, views=views)
t0 = time.perf_counter()
state, metrics = training.train_step(training.state, sharding.global_batch(next(batches), mesh),
                                     training.source)
first_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
print(f"first step (trace + compile + run): {time.perf_counter() - t0:.1f} s")
for name, value in sorted(first_metrics.items()):
  print(f"  {name:22s} {value:9.4f}")
weighted_sum = sum(m.weight * first_metrics[f"loss/{m.name}"] for m in methods)
print(f"sum of weight * term = {weighted_sum:.4f}   total loss = {first_metrics['loss']:.4f}")

# %% [markdown]
# ## Training a few dozen steps
#
# The total jumps at step 2: Bi-Tuning's terms are zero while its queues are empty and
# count once they hold keys (`queue_fill` reaches 1 after a few steps), so the last cell
# compares the loss over the first 10 steps with full queues with the last 10 steps.
# With a random backbone and a few dozen steps the contrastive terms fall only slowly;
# the cross-entropy falls clearly and the Co-Tuning term heads towards its floor (the
# entropy of the relationship rows, about 1.24 here).

# %%
history = [first_metrics]
t0 = time.perf_counter()
for _ in range(NUM_STEPS - 1):
  state, metrics = training.train_step(state, sharding.global_batch(next(batches), mesh),
                                       training.source)
  history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
print(f"{NUM_STEPS - 1} more steps: {time.perf_counter() - t0:.1f} s")
print("last step:", {k: round(v, 4) for k, v in history[-1].items() if k.startswith("loss")})

# %%
curves = {"total (weighted)": "loss", "ce": "loss/ce", "co_tuning": "loss/co_tuning",
          "bi_tuning (cce + ccl)": "loss/bi_tuning", "bss": "loss/bss",
          "train accuracy": "accuracy"}
fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
steps = np.arange(1, len(history) + 1)
for ax, (title, key) in zip(axes.flat, curves.items()):
  ax.plot(steps, [h[key] for h in history])
  ax.set_title(title)
  ax.grid(alpha=0.3)
for ax in axes[-1]:
  ax.set_xlabel("step")
fig.tight_layout()
plt.show()

# %%
# One machine-readable line for tests/test_notebooks.py.
total = [h["loss"] for h in history]
queue_fill = [h["bi_tuning/queue_fill"] for h in history]
# Compare like with like: from the first step with full queues every term is active.
full = queue_fill.index(1.0)
active = total[full:]
results = {
    "python": __import__("sys").executable,
    "num_steps": len(history),
    "weights": {m.name: m.weight for m in methods},
    "first_step": first_metrics,
    "loss": total,
    "ce": [h["loss/ce"] for h in history],
    "co_tuning": [h["loss/co_tuning"] for h in history],
    "queue_fill": queue_fill,
    "first_full_step": full,
    "first10_full_mean": float(np.mean(active[:10])),
    "last10_mean": float(np.mean(active[-10:])),
    "seconds": time.perf_counter() - NOTEBOOK_START,
}
print(f"total loss, queues full: first 10 steps {results['first10_full_mean']:.3f}, "
      f"last 10 steps {results['last10_mean']:.3f}")
assert len(active) >= 20 and results["last10_mean"] < results["first10_full_mean"], "the loss did not fall"
for term in ("ce", "co_tuning"):
  assert np.mean(results[term][-10:]) < np.mean(results[term][:10]), f"{term} did not fall"
print("NOTEBOOK_RESULTS " + json.dumps(results))

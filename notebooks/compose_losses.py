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
# This notebook builds **one jitted training step** from four loss components of
# ftjax, on a tiny ResNet at 32 px and 2% of Fashion-MNIST:
#
# | component | paper term | what it needs from the forward |
# |---|---|---|
# | `CrossEntropy` | target cross-entropy | `logits` |
# | `CoTuning` | soft CE of the source head against the label's relationship row (Co-Tuning Eq. 2) | `source_logits` |
# | `BiTuning` | contrastive CE + categorical contrastive loss (Bi-Tuning Eq. 3, 4) | `features`, `projection` |
# | `BatchSpectralShrinkage` | smallest squared singular value of the features (BSS Eq. 4) | `features` |
#
# `ftjax.train.step.make_train_step` runs the forward once with every output the
# components ask for, sums `weight * term`, takes one gradient and updates each
# component's state (Bi-Tuning's momentum encoder and queues). It shows each
# term's value on the first batch, trains a few dozen steps and plots the curves.
#
# The model is randomly initialised (no pretrained tiny model exists) and the
# Co-Tuning relationship is hand-built: the notebook shows how the pieces fit,
# not the methods' benefit.
#
# The first code cell installs ftjax from the project's repository (`https://github.com/ftjax/ftjax`)
# when it is not importable (e.g. on Colab); where ftjax is installed it does nothing.

# %%
# Colab-ready: installs ftjax (and the notebook extras) only where it is missing.
try:
  import ftjax  # noqa: F401
except ImportError:
  # %pip install -q "ftjax[test] @ git+https://github.com/ftjax/ftjax"

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

from ftjax import models, patches
from ftjax.methods.bi_tuning import BiTuning
from ftjax.methods.co_tuning import CoTuning
from ftjax.methods.finetune import CrossEntropy
from ftjax.methods.regularizers import BatchSpectralShrinkage
from ftjax.train import optim
from ftjax.train import sharding
from ftjax.train import step as step_lib
from ftjax.train.state import TrainState

# %matplotlib inline
NOTEBOOK_START = time.perf_counter()

# %% [markdown]
# ## Data and model
#
# 2% of the Fashion-MNIST train split (about 960 images), resized to 32 px. Bi-Tuning
# needs a second augmented view of every image (`views=2` gives `batch["image_key"]`).
# The model keeps a source head (`keep_source_head=True`, for Co-Tuning) and has a
# projector (`projection_dim`, for Bi-Tuning).

# %%
SEED, IMAGE_SIZE, BATCH_SIZE, NUM_STEPS = 0, 32, 32, 30
NUM_SOURCE_CLASSES, PROJECTION_DIM = 20, 16

dataset = data.load_dataset("fashion_mnist", sampling_rate=2, seed=SEED,
                            image_size=IMAGE_SIZE, crop_scale=(0.35, 1.0))
print(dataset)

model = models.create_model("resnet_tiny", num_classes=dataset.num_classes,
                            keep_source_head=True, num_source_classes=NUM_SOURCE_CLASSES,
                            projection_dim=PROJECTION_DIM)
init = jax.jit(functools.partial(model.init, train=False, outputs=model.all_outputs))
variables = init(jax.random.key(SEED), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
print({name: jax.tree.map(jnp.shape, p) if name == "head" else "..."
       for name, p in variables["params"].items()})

# %% [markdown]
# ## The Co-Tuning relationship
#
# Co-Tuning needs `p(y_s | y_t)`, a `[target classes, source classes]` row-stochastic
# matrix. With a real pretrained model it is computed from data:
# `CoTuning(approach="reverse").prepare(dataset=..., model=..., variables=..., config=...)`
# or `ftjax.relationship.compute_relationship(...)` (Alg. 1), or
# `ftjax.relationship.direct_relationship` (Eq. 3) from the source model's probabilities.
# A random source head has no such knowledge (it sends every class to the same source
# class), so here we hand-build one: target class `c` is related to source classes `2c`
# and `2c + 1`, as if the source task had two finer categories per target class.

# %%
relationship = np.full((dataset.num_classes, NUM_SOURCE_CLASSES), 0.1 / (NUM_SOURCE_CLASSES - 2))
for c in range(dataset.num_classes):
  relationship[c, 2 * c] = relationship[c, 2 * c + 1] = 0.45
print("relationship", relationship.shape, "rows sum to", np.unique(relationship.sum(1).round(6)))

# %% [markdown]
# ## Components and the step
#
# Each component is a small frozen dataclass with a `weight`, the forward `outputs` it
# needs, `init_state` and `__call__` returning a `TermOutput(loss, state, metrics)`.
# Bi-Tuning's `prepare` hands it the model (its key encoder runs inside the step).
# The optimizer trains the new head and projector at 10x the backbone's learning rate,
# chosen by regex rules over parameter paths (`ftjax.patches.path_labels`).

# %%
components = [
    CrossEntropy(weight=1.0),
    CoTuning(weight=2.3, relationship=relationship),
    BiTuning(weight=1.0, keys_per_class=8, projection_dim=PROJECTION_DIM,
             key_bn_mode="train").prepare(dataset=dataset, model=model,
                                          variables=variables, config=None),
    BatchSpectralShrinkage(weight=1e-3, k=1),
]
print("forward outputs the step computes:", step_lib.required_outputs(components))

rules = [("(?:head|projector)/.*", "head"), ("backbone/.*|source_head/.*", "backbone")]
labels_tree = patches.path_labels(variables["params"], rules)
optimizer = optim.make_optimizer(
    labels=labels_tree,
    groups={"head": optim.GroupConfig(lr_mult=10.0), "backbone": optim.GroupConfig()},
    schedule=optim.make_schedule(name="cosine", base_lr=0.05, total_steps=NUM_STEPS),
    momentum=0.9, weight_decay=5e-4)

state = TrainState(
    step=jnp.zeros((), jnp.int32), params=variables["params"],
    batch_stats=variables["batch_stats"], opt_state=optimizer.init(variables["params"]),
    method_state={c.name: c.init_state(variables=variables, rng=jax.random.key(1))
                  for c in components},
    rng=jax.random.key(2))
mesh = sharding.make_data_mesh()
train_step = step_lib.jit_train_step(
    step_lib.make_train_step(model=model, optimizer=optimizer, components=components),
    mesh=mesh, state=state)

# %% [markdown]
# ## Each term on the first batch
#
# The step's metrics hold every unweighted term (`loss/<name>`), each component's own
# metrics (`bi_tuning/cce`, `bi_tuning/ccl`, queue fill) and the weighted total `loss`.
# On the first batch Bi-Tuning's queues are still empty.

# %%
batches = dataset.train_batches(batch_size=BATCH_SIZE, views=2)
t0 = time.perf_counter()
state, metrics = train_step(state, sharding.global_batch(next(batches), mesh))
first_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
print(f"first step (trace + compile + run): {time.perf_counter() - t0:.1f} s")
for name, value in sorted(first_metrics.items()):
  print(f"  {name:22s} {value:9.4f}")
weighted_sum = sum(c.weight * first_metrics[f"loss/{c.name}"] for c in components)
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
  state, metrics = train_step(state, sharding.global_batch(next(batches), mesh))
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
    "weights": {c.name: c.weight for c in components},
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

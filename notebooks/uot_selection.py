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
# # UOT data selection with your own features
#
# `ftjax.selection.uot_scores` is the jitted unbalanced-optimal-transport solver of
# "Improved Fine-Tuning by Better Leveraging Pre-Training Data" (Eq. 5): it scores each
# unit of a pre-training pool (a class or a k-means cluster) by how much mass the
# transport plan sends from it to the target classes, and the top-K units are the data
# to reuse. It needs only per-unit and per-class mean features, so any `[n, d]` feature
# array works. This notebook:
#
# 1. makes features (downsampled Fashion-MNIST pixels; swap in your model's embeddings),
# 2. clusters an unlabeled "pool" into units with `ftjax.selection.kmeans`,
# 3. takes `class_means`, runs `uot_scores` for a target task (footwear: sandal, sneaker,
#    ankle boot) and `select_top_k`, and draws the paper's Fig. 2b chart,
# 4. runs several target tasks at once with `jax.vmap`,
# 5. checks the scores against POT (`ot.unbalanced.sinkhorn_unbalanced`) and times both.
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
import json
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import ot

from ftjax.selection import class_means, kmeans, select_top_k, uot_scores

# %matplotlib inline
NOTEBOOK_START = time.perf_counter()
OUT_DIR = os.environ.get("FTJAX_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="ftjax_uot_")

# %% [markdown]
# ## Features
#
# The pool is the first 3000 Fashion-MNIST train images (their labels are used only to
# *describe* clusters afterwards, never by the selection); the target is the test images
# of three footwear classes among the first 1000. Features: 14x14 average-pooled grey
# pixels (196-d). Replace `pixel_features` with your model's embeddings.

# %%
pool = tfds.as_numpy(tfds.load("fashion_mnist", split="train[:3000]", batch_size=-1))
target = tfds.as_numpy(tfds.load("fashion_mnist", split="test[:1000]", batch_size=-1))
CLASS_NAMES = tfds.builder("fashion_mnist").info.features["label"].names

def pixel_features(images):
  grey = images[..., 0].astype(np.float32) / 255.0
  return grey.reshape(len(grey), 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(grey), -1)

pool_features, pool_labels = pixel_features(pool["image"]), pool["label"]
target_features, target_labels = pixel_features(target["image"]), target["label"]
print("pool", pool_features.shape, "target", target_features.shape)

# %% [markdown]
# ## Pool units: cosine k-means clusters
#
# The paper clusters an unlabeled pool and treats each cluster as a unit; `class_means`
# of the cluster assignments gives the unit means. We name each cluster by the most
# frequent (hidden) label of its members, only to read the results.

# %%
NUM_CLUSTERS = 40
clusters = kmeans(jnp.asarray(pool_features), num_clusters=NUM_CLUSTERS, num_iterations=20, seed=0)
assignments = np.asarray(clusters.assignments)
pool_means = class_means(features=jnp.asarray(pool_features), labels=jnp.asarray(assignments),
                         num_classes=NUM_CLUSTERS)
cluster_label = np.array([np.bincount(pool_labels[assignments == c], minlength=10).argmax()
                          for c in range(NUM_CLUSTERS)])
print("cluster sizes:", np.asarray(clusters.cluster_sizes).tolist())


# %% [markdown]
# ## Scores and top-K for one target task
#
# Paper settings: entropic ε = 1, τ₁ = 1 (pool side, relaxed), τ₂ = 100 (target side,
# every target class covered), cosine cost divided by 0.01. `scores` are the plan's row
# masses `P1`; a large score means the unit resembles the target classes.

# %%
def target_means_of(classes):
  keep = np.isin(target_labels, classes)
  relabelled = np.searchsorted(np.asarray(classes), target_labels[keep])
  return class_means(features=jnp.asarray(target_features[keep]), labels=jnp.asarray(relabelled),
                     num_classes=len(classes))

FOOTWEAR = (5, 7, 9)  # sandal, sneaker, ankle boot
footwear_means = target_means_of(FOOTWEAR)
result = uot_scores(target_means=footwear_means, pool_means=pool_means)
TOP_K = 10
top = select_top_k(result.scores, TOP_K)
print(f"converged {bool(result.converged)} after {int(result.num_iterations)} iterations")
print("top clusters:", [(int(c), CLASS_NAMES[cluster_label[c]]) for c in top])
footwear_share = float(np.mean(np.isin(cluster_label[top], FOOTWEAR)))
print(f"share of the top-{TOP_K} clusters whose majority label is footwear: {footwear_share:.0%}")

# %% [markdown]
# ### The paper's Fig. 2b: the similarity vector `P1`, top-K highlighted
#
# Units sorted by score; the top-K bars are coloured, and each bar is labelled with its
# cluster's majority class.

# %%
order = np.argsort(-np.asarray(result.scores), kind="stable")
sorted_scores = np.asarray(result.scores)[order]
colors = ["tab:orange" if i < TOP_K else "tab:gray" for i in range(NUM_CLUSTERS)]
fig, ax = plt.subplots(figsize=(12, 4))
ax.bar(np.arange(NUM_CLUSTERS), sorted_scores, color=colors)
ax.set_xticks(np.arange(NUM_CLUSTERS))
ax.set_xticklabels([CLASS_NAMES[cluster_label[c]] for c in order], rotation=90, fontsize=7)
ax.set_ylabel("UOT score  (P1)_i")
ax.set_title(f"Similarity of {NUM_CLUSTERS} pool clusters to the footwear task "
             f"(top-{TOP_K} in orange)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Several target tasks at once with `jax.vmap`
#
# Target sets with the same number of classes stack into `[tasks, classes, d]`; one
# vmapped call solves them all against the shared pool.

# %%
TASKS = {"footwear": (5, 7, 9), "tops": (0, 2, 6), "trouser-dress-bag": (1, 3, 8)}
stacked = jnp.stack([target_means_of(classes) for classes in TASKS.values()])
batched = jax.jit(jax.vmap(lambda t: uot_scores(target_means=t, pool_means=pool_means).scores))
many = np.asarray(batched(stacked))
one_by_one = np.stack([np.asarray(uot_scores(target_means=t, pool_means=pool_means).scores)
                       for t in stacked])
vmap_max_rel_diff = float(np.max(np.abs(many - one_by_one) / one_by_one))
print(f"vmap vs one call per task: max relative difference {vmap_max_rel_diff:.2e}")
for (name, classes), scores in zip(TASKS.items(), many):
  picked = cluster_label[select_top_k(scores, TOP_K)]
  print(f"{name:18s} top-{TOP_K} majority labels: {sorted(CLASS_NAMES[c] for c in picked)}")


# %% [markdown]
# ## Against POT
#
# The same problem in POT: unit masses on both sides, `reg=ε`, `reg_m=(τ₁, τ₂)`,
# `reg_type="entropy"`, cost `(1 - cos) / 0.01`, in float64. We compare the scores and
# time both, on this problem and on one of the paper's size (1000 ImageNet classes x 200
# target classes, 512-d features, synthetic). Timings on a shared 2-core CPU are rough.

# %%
def pot_scores(pool, target, cost_scale=0.01):
  pool = np.asarray(pool, np.float64)
  target = np.asarray(target, np.float64)
  pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
  target = target / np.linalg.norm(target, axis=1, keepdims=True)
  cost = (1.0 - pool @ target.T) / cost_scale
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    plan = ot.unbalanced.sinkhorn_unbalanced(np.ones(len(pool)), np.ones(len(target)), cost,
                                             reg=1.0, reg_m=(1.0, 100.0), reg_type="entropy")
  return plan.sum(axis=1)

def best_of(fn, repeats=5):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)

reference = pot_scores(pool_means, footwear_means)
pot_max_rel_diff = float(np.max(np.abs(np.asarray(result.scores) - reference) / reference))
same_top_k = bool(np.array_equal(np.sort(select_top_k(reference, TOP_K)), np.sort(top)))
print(f"max relative difference vs POT {pot_max_rel_diff:.2e}; same top-{TOP_K}: {same_top_k}")

rng = np.random.default_rng(0)
big_pool = np.abs(rng.normal(size=(1000, 512))).astype(np.float32)
big_target = np.abs(big_pool[rng.choice(1000, 200, replace=False)]
                    + 0.8 * rng.normal(size=(200, 512))).astype(np.float32)
timings = {}
for name, (p, t) in {"this notebook": (pool_means, footwear_means),
                     "paper size": (big_pool, big_target)}.items():
  p, t = jnp.asarray(p), jnp.asarray(t)
  jax.block_until_ready(uot_scores(target_means=t, pool_means=p).scores)  # compile
  ours = best_of(lambda: uot_scores(target_means=t, pool_means=p).scores)
  theirs = best_of(lambda: pot_scores(p, t), repeats=3)
  timings[name] = {"ftjax_s": ours, "pot_s": theirs}
  print(f"{name:14s} {tuple(p.shape)} x {tuple(t.shape)}: ftjax {ours * 1e3:7.1f} ms   "
        f"POT {theirs * 1e3:7.1f} ms")

# %%
# One machine-readable line for tests/test_notebooks.py.
features_path = os.path.join(OUT_DIR, "uot_features.npz")
np.savez(features_path, pool_means=np.asarray(pool_means), target_means=np.asarray(footwear_means),
         scores=np.asarray(result.scores), stacked_targets=np.asarray(stacked),
         vmapped_scores=many)
results = {
    "python": __import__("sys").executable,
    "features_path": features_path,
    "converged": bool(result.converged),
    "top_k": top.tolist(),
    "footwear_share": footwear_share,
    "vmap_max_rel_diff": vmap_max_rel_diff,
    "pot_max_rel_diff": pot_max_rel_diff,
    "same_top_k_as_pot": same_top_k,
    "timings": timings,
    "seconds": time.perf_counter() - NOTEBOOK_START,
}
assert results["converged"] and pot_max_rel_diff < 1e-3 and vmap_max_rel_diff < 1e-4
print("NOTEBOOK_RESULTS " + json.dumps(results))

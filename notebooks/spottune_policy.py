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
# # SpotTune policies: a short run, Fig. 3 and Fig. 4
#
# SpotTune (Guo et al., CVPR 2019) keeps two copies of every residual block: the frozen
# pretrained block and a fine-tuned copy. A small policy network looks at each image and
# decides, block by block, which copy the image goes through (Eq. 2), trained with a
# straight-through Gumbel-softmax (Eq. 3, 4). This notebook, on 5% of Fashion-MNIST at
# 32 px:
#
# 1. builds a SpotTune model over a tiny ResNet with the `SpotTune` method
#    (`wrap_model`: `create_spottune_model`, `spottune_variables_from_pretrained`) and
#    trains it for a few dozen steps through the trainer's setup
#    (`ftjax.train.setup.init_training`), the method's frozen copies in a frozen
#    parameter group and its policy network in a group of its own;
# 2. routes test images with the deterministic (arg-max) policy and draws the paper's
#    **Fig. 3** (per block, the fraction of images routed through the fine-tuned copy)
#    and **Fig. 4** (histogram of the number of fine-tuned blocks per image);
# 3. checks that forcing every image through the frozen copies gives the pretrained
#    model's logits exactly (the max abs difference is recorded);
# 4. trains the compact **Global-k** variant (Eq. 5-7), lists the blocks no image
#    fine-tunes and counts the parameters left once their fine-tuned copies are dropped.
#
# The base is a randomly initialised `resnet_tiny` standing in for a pretrained checkpoint
# (no pretrained tiny model exists) and it has only **2 routed blocks**, so the figures
# have two bars and the numbers only show the workflow, not the method's benefit. The same
# code runs over `resnet26` (12 routed blocks) or a pretrained EfficientNet-Lite0 (9).
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
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from ftjax import methods as methods_lib
from ftjax import models
from ftjax.methods import RunContext
from ftjax.methods import spottune as st
from ftjax.train import setup
from ftjax.train import sharding
from ftjax.train.config import default_config

# %matplotlib inline
NOTEBOOK_START = time.perf_counter()
OUT_DIR = os.environ.get("FTJAX_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="ftjax_spottune_")
SEED, IMAGE_SIZE, BATCH_SIZE, NUM_STEPS, NUM_TEST = 0, 32, 32, 24, 2000
# A small policy: 1 residual block of 8 channels on the 32 px image (paper: 3-4 blocks, 64+ channels).
# train_frozen_bn=False: the paper's frozen copies "left unchanged" (the authors' code also trains
# their BatchNorm; experiments/configs/spottune.py follows the code), so the check below holds bitwise.
POLICY = {"policy_depth": 1, "policy_width": 8, "policy_image_size": IMAGE_SIZE, "train_frozen_bn": False}
POLICY_LR_MULT = 10.0  # the policy's own learning rate: 10x the backbone's

# %% [markdown]
# ## The base model and the SpotTune model over it
#
# The run's methods come from a config's `losses`: `ce` and `spottune` (with the policy's
# size and its own learning-rate multiplier). The `SpotTune` method's `wrap_model` builds
# the SpotTune model over the base: `spottune_variables_from_pretrained` puts the base
# backbone under `backbone` (the trainable copies, same names, so pretrained weights load
# unchanged), copies each routed block again under `frozen_backbone` and initialises the
# policy at random. The stem (and the head) exist once and are trained.
# `SpotTune.routing_options()` gives the model's policy options from the method's settings.
#
# The method claims the parameters it adds (`param_rules`: `frozen_backbone` in the frozen
# group, `policy` in its own group); the config's baseline (`finetune`) covers the rest:
# the new head at 10x, the trainable copies and the stem. `setup.resolve_rules` puts the
# two together; `setup.init_training` builds the optimizer, state and jitted steps.

# %%
dataset = data.load_dataset("fashion_mnist", sampling_rate=5, seed=SEED, image_size=IMAGE_SIZE,
                            crop_scale=(0.35, 1.0))
print(dataset)
base_model = models.create_model("resnet_tiny", num_classes=dataset.num_classes)
init = jax.jit(functools.partial(base_model.init, train=False, outputs=base_model.all_outputs))
base_variables = jax.device_get(init(jax.random.key(SEED), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))))

config = default_config()
config.model, config.pretrained, config.seed = "resnet_tiny", "", SEED
config.baseline, config.head_lr_mult = "finetune", 10.0
config.optimizer.lr, config.optimizer.schedule = 0.05, "cosine"
config.optimizer.momentum, config.optimizer.nesterov, config.optimizer.weight_decay = 0.9, False, 5e-4

def build(spottune_options):
  """The run of ``ce`` + ``spottune``: the SpotTune model, its variables and ``Training``."""
  methods = methods_lib.build_methods({"ce": {"weight": 1.0}, "spottune": spottune_options})
  model, variables = base_model, base_variables
  for m in methods:
    model, variables = m.wrap_model(model=model, variables=variables, rng=jax.random.key(SEED + 1))
  rules, groups, bn_mode = setup.resolve_rules(config, variables, methods=methods)
  context = RunContext(dataset=dataset, model=model, variables=variables, seed=SEED, bn_mode=bn_mode,
                       batch_size=BATCH_SIZE, model_name=config.model, image_size=IMAGE_SIZE)
  methods = [m.prepare(context) for m in methods]
  training = setup.init_training(
      model=model, variables=variables, methods=methods, rules=rules, groups=groups, bn_mode=bn_mode,
      num_classes=dataset.num_classes, schedule=setup.make_schedule(config, NUM_STEPS),
      momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov,
      weight_decay=config.optimizer.weight_decay,
      method_rng=jax.random.key(SEED + 3), state_rng=jax.random.key(SEED + 2))
  return {"methods": methods, "spottune": methods[-1], "model": model, "variables": variables,
          "training": training}

run = build({**POLICY, "policy_lr_mult": POLICY_LR_MULT})
model = run["model"]
print("routed blocks:", model.routed_blocks)
print("parameters per group:", run["training"].sizes)
for m in run["methods"]:   # claimed first
  for regex, group in m.param_rules(variables=run["variables"]):
    print(f"    {group:8s} {regex}   ({m.name} method)")
for regex, group in setup.baseline_rules(config)[0]:
  print(f"    {group:8s} {regex}   (baseline, the rest)")

# %% [markdown]
# ## Training
#
# The step runs the model with `train=True`, where the routing is a straight-through
# Gumbel-softmax sample (temperature 5; the method declares the `gumbel` rng stream): the
# forward pass is hard (each image takes one copy of each block), the policy gets the
# gradient of the soft relaxation. The `frozen` group gets no updates (`frozen=True`) and
# no backward pass (a frozen mask). The `SpotTune` method adds nothing to the loss here
# (`lambda1 = lambda2 = 0`) but reports the per-block usage `v_l` of every batch.

# %%
def train(run):
  """NUM_STEPS steps of cross-entropy + spottune; returns the trained variables and the metrics."""
  training = run["training"]
  state, history = training.state, []
  for batch in itertools.islice(dataset.train_batches(batch_size=BATCH_SIZE), NUM_STEPS):
    state, metrics = training.train_step(state, sharding.global_batch(batch, training.mesh),
                                         training.source)
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return jax.device_get(state.variables), history

t0 = time.perf_counter()
trained, history = train(run)
print(f"{NUM_STEPS} steps: {time.perf_counter() - t0:.1f} s")
print("last step:", {k: round(v, 3) for k, v in history[-1].items()})

steps = np.arange(1, NUM_STEPS + 1)
fig, (ax_loss, ax_usage) = plt.subplots(1, 2, figsize=(10, 3.2))
ax_loss.plot(steps, [h["loss/ce"] for h in history])
ax_loss.set_title("cross-entropy")
for j, name in enumerate(model.routed_blocks):
  ax_usage.plot(steps, [h[f"spottune/usage/{j}"] for h in history], label=name)
ax_usage.set_title("fraction of the batch fine-tuning each block (Gumbel samples)")
ax_usage.set_ylim(-0.05, 1.05)
ax_usage.legend()
for ax in (ax_loss, ax_usage):
  ax.set_xlabel("step")
  ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()


# %% [markdown]
# ## Routing the test images
#
# At test time the policy decides deterministically (`routing="argmax"`, the model's
# `eval_routing`); `"sample"` would draw from it instead. We route the first 2000 test
# images (after training the trainer's `SpotTune.finalize` routes the whole split and
# writes the same figures).

# %%
def route(model, variables, routing="argmax"):
  """Decisions [NUM_TEST, blocks] (1 = fine-tuned copy), policy logits and top-1 of NUM_TEST test images."""
  apply = jax.jit(lambda v, images: model.apply(v, images, train=False, routing=routing,
                                                outputs=("logits", "policy", "policy_logits")))
  decisions, policy_logits, correct = [], [], 0
  for batch in itertools.islice(dataset.eval_batches("test", batch_size=500), NUM_TEST // 500):
    out = jax.device_get(apply(variables, batch["image"]))
    keep = batch["mask"] > 0
    decisions.append(out["policy"][keep])
    policy_logits.append(out["policy_logits"][keep])
    correct += int(np.sum((out["logits"].argmax(-1) == batch["label"])[keep]))
  decisions = np.concatenate(decisions).astype(np.uint8)
  return decisions, np.concatenate(policy_logits), correct / len(decisions)

decisions, policy_logits, top1 = route(model, trained)
print(f"{len(decisions)} test images, top-1 {top1:.3f}")
usage = {block: round(float(v), 3) for block, v in zip(model.routed_blocks, decisions.mean(0))}
print("fraction fine-tuned per block:", usage)

# %% [markdown]
# ### Fig. 3: which blocks are fine-tuned
#
# Per routed block, the fraction of test images the policy sends through the fine-tuned
# copy (`plot_block_usage`, the heat-map strip and bars of the paper's Fig. 3).

# %%
fig3_path = st.plot_block_usage(decisions, os.path.join(OUT_DIR, "spottune_block_usage.png"),
                                block_names=model.routed_blocks)
display(Image(filename=fig3_path))

# %% [markdown]
# ### Fig. 4: how many blocks each image fine-tunes
#
# `plot_finetuned_histogram`: the number of test images per count of fine-tuned blocks.

# %%
fig4_path = st.plot_finetuned_histogram(decisions, os.path.join(OUT_DIR, "spottune_finetuned_blocks.png"))
display(Image(filename=fig4_path))
histogram = np.bincount(decisions.sum(axis=1), minlength=len(model.routed_blocks) + 1)
print("images per number of fine-tuned blocks:", histogram.tolist())


# %% [markdown]
# ## All frozen = the pretrained model
#
# Training never touches the frozen copies (they are bitwise the pretrained blocks), and
# `routing="all_frozen"` sends every image through them, computing only those copies. The
# stem and the head exist once and were trained, so we put the pretrained ones back; the
# routed blocks then come from the trained SpotTune model (whose fine-tuned copies did
# move away from the pretrained weights), and its logits must equal the base model's
# exactly.

# %%
def with_pretrained_shared_parts(variables):
  """``variables`` with the parts SpotTune has once (stem, head) set back to the base model's."""
  out = {}
  for collection in ("params", "batch_stats"):
    tree = dict(variables[collection])
    backbone = dict(tree["backbone"])
    for name, value in base_variables[collection]["backbone"].items():
      if name not in model.routed_blocks:
        backbone[name] = value
    tree["backbone"] = backbone
    if "head" in base_variables[collection]:
      tree["head"] = base_variables[collection]["head"]
    out[collection] = tree
  return out

def max_abs_diff(copies, collection="params"):
  """Largest |difference| between ``copies[block]`` and the pretrained routed blocks."""
  return max(float(np.max(np.abs(a - b))) for name in model.routed_blocks
             for a, b in zip(jax.tree.leaves(copies[name]),
                             jax.tree.leaves(base_variables[collection]["backbone"][name])))

frozen_copies_max_abs_diff = max(max_abs_diff(trained[c]["frozen_backbone"], c)
                                 for c in ("params", "batch_stats"))
finetuned_copies_max_abs_diff = max_abs_diff(trained["params"]["backbone"])
print(f"max |frozen copies after training - pretrained blocks|     = {frozen_copies_max_abs_diff}")
print(f"max |fine-tuned copies after training - pretrained blocks| = {finetuned_copies_max_abs_diff:.3f}")

check_images = next(dataset.eval_batches("test", batch_size=64))["image"]
all_frozen_logits = np.asarray(jax.jit(lambda v, images: model.apply(
    v, images, train=False, routing="all_frozen")["logits"])(with_pretrained_shared_parts(trained),
                                                            check_images))
base_logits = np.asarray(jax.jit(lambda v, images: base_model.apply(v, images, train=False)["logits"])(
    base_variables, check_images))
all_frozen_max_abs_diff = float(np.max(np.abs(all_frozen_logits - base_logits)))
print(f"max |logits(all frozen) - logits(pretrained model)| = {all_frozen_max_abs_diff}")

# %% [markdown]
# ## Global-k: the same k blocks for every image, the others dropped
#
# Eq. 7 adds `lambda1 * l_k + lambda2 * l_e` to the loss: `l_k = (sum_l v_l - k)^2`
# (Eq. 5) asks for `k` fine-tuned blocks per image on average and `l_e = sum_l -v_l log v_l`
# (Eq. 6) pushes every `v_l` to 0 or 1, so all images end up fine-tuning the same `k`
# blocks. A block no test image fine-tunes (`unused_blocks`) needs no fine-tuned copy:
# `pruned_size` counts the parameters without those copies (and without the policy,
# which a model whose routing no longer depends on the image does not need). With 2
# routed blocks we ask for `k = 1`.

# %%
gk_run = build({"lambda1": 1.0, "lambda2": 1.0, "k": 1, **POLICY, "policy_lr_mult": POLICY_LR_MULT})
global_k, gk_model = gk_run["spottune"], gk_run["model"]
t0 = time.perf_counter()
gk_trained, gk_history = train(gk_run)
print(f"{NUM_STEPS} steps: {time.perf_counter() - t0:.1f} s; last step l_k = "
      f"{gk_history[-1]['spottune/global_k']:.4f}, l_e = {gk_history[-1]['spottune/entropy']:.4f}")
gk_decisions, _, gk_top1 = route(gk_model, gk_trained)
unused = st.unused_blocks(gk_decisions, gk_model.routed_blocks)
size = st.pruned_size(gk_trained["params"], gk_decisions, gk_model.routed_blocks)
base_parameters = sum(int(np.size(x)) for x in jax.tree.leaves(base_variables["params"]))
print(f"fraction fine-tuned per block: {dict(zip(gk_model.routed_blocks, gk_decisions.mean(0).tolist()))}"
      f"; top-1 {gk_top1:.3f}")
print("blocks no test image fine-tunes:", unused)
print(f"parameters: base model {base_parameters}, SpotTune {size.total}, "
      f"without the unused fine-tuned copies {size.pruned}, and without the policy "
      f"{size.pruned_without_policy}")

# %%
# One machine-readable line for tests/test_notebooks.py.
decisions_path = os.path.join(OUT_DIR, "spottune_policy.npz")
np.savez(decisions_path, decisions=decisions, global_k_decisions=gk_decisions,
         policy_logits=policy_logits, check_images=check_images, all_frozen_logits=all_frozen_logits)
results = {
    "python": __import__("sys").executable,
    "decisions_path": decisions_path,
    "figures": [fig3_path, fig4_path],
    "policy": POLICY,
    "seed": SEED,
    "image_size": IMAGE_SIZE,
    "routed_blocks": list(model.routed_blocks),
    "num_test": len(decisions),
    "block_usage": decisions.mean(0).tolist(),
    "finetuned_histogram": histogram.tolist(),
    "top1": top1,
    "ce": [h["loss/ce"] for h in history],
    "frozen_copies_max_abs_diff": frozen_copies_max_abs_diff,
    "all_frozen_max_abs_diff": all_frozen_max_abs_diff,
    "finetuned_copies_max_abs_diff": finetuned_copies_max_abs_diff,
    "global_k": {
        "k": global_k.k,
        "block_usage": gk_decisions.mean(0).tolist(),
        "unused_blocks": unused,
        "parameters_total": size.total,
        "parameters_pruned": size.pruned,
        "parameters_pruned_without_policy": size.pruned_without_policy,
        "top1": gk_top1,
    },
    "seconds": time.perf_counter() - NOTEBOOK_START,
}
assert frozen_copies_max_abs_diff == 0.0 and all_frozen_max_abs_diff == 0.0, "all frozen != pretrained"
assert finetuned_copies_max_abs_diff > 0.0, "the fine-tuned copies did not train"
assert histogram.sum() == len(decisions)
print("NOTEBOOK_RESULTS " + json.dumps(results))

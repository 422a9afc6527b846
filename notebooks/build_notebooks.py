"""Writes the ftjax notebooks (``notebooks/*.ipynb``) from the cell sources below.

The notebooks are generated, never edited by hand, and committed *without*
outputs, so a diff shows only source changes. Run after editing a cell:

  python notebooks/build_notebooks.py            # rewrite every notebook
  python notebooks/build_notebooks.py --check    # exit 1 if a notebook is stale

Each notebook opens with a markdown cell saying what it shows and a Colab-ready
install cell (a no-op where ``ftjax`` is importable), runs top to bottom on a
2-core CPU in well under a minute, and ends with a cell that prints one line
``NOTEBOOK_RESULTS {json}`` which ``tests/test_notebooks.py`` reads back.

Example:
  >>> from notebooks.build_notebooks import build_all
  >>> paths = build_all()
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat

NOTEBOOK_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_URL = "https://github.com/ftjax/ftjax"
RESULTS_PREFIX = "NOTEBOOK_RESULTS "


def _code(source: str) -> nbformat.NotebookNode:
  return nbformat.v4.new_code_cell(textwrap.dedent(source).strip("\n"))


def _markdown(*parts: str) -> nbformat.NotebookNode:
  """One markdown cell from paragraphs, each dedented on its own."""
  return nbformat.v4.new_markdown_cell("\n\n".join(textwrap.dedent(p).strip("\n") for p in parts))


INSTALL_CELL = _code(f'''
    # Colab-ready: installs ftjax (and the notebook extras) only where it is missing.
    try:
      import ftjax  # noqa: F401
    except ImportError:
      %pip install -q "ftjax[test] @ git+{REPO_URL}"
    ''')

INSTALL_NOTE = f"""
    The first code cell installs ftjax from the project's repository (`{REPO_URL}`)
    when it is not importable (e.g. on Colab); where ftjax is installed it does nothing.
    """

# Fashion-MNIST: from the Debian package `dataset-fashion-mnist` where it is
# installed (no network, as in the tests), else TFDS downloads it (Colab).
FASHION_MNIST_CELL = _code('''
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
    ''')

RESULTS_CELL_DOC = "# One machine-readable line for tests/test_notebooks.py."


# ----------------------------------------------------------------------------- compose_losses


def compose_losses() -> nbformat.NotebookNode:
  cells = [
      _markdown("""
          # Composing losses: Co-Tuning + Bi-Tuning + BSS in one training step

          This notebook builds **one jitted training step** from four loss components of
          ftjax, on a tiny ResNet at 32 px and 2% of Fashion-MNIST:

          | component | paper term | what it needs from the forward |
          |---|---|---|
          | `CrossEntropy` | target cross-entropy | `logits` |
          | `CoTuning` | soft CE of the source head against the label's relationship row (Co-Tuning Eq. 2) | `source_logits` |
          | `BiTuning` | contrastive CE + categorical contrastive loss (Bi-Tuning Eq. 3, 4) | `features`, `projection` |
          | `BatchSpectralShrinkage` | smallest squared singular value of the features (BSS Eq. 4) | `features` |

          `ftjax.train.step.make_train_step` runs the forward once with every output the
          components ask for, sums `weight * term`, takes one gradient and updates each
          component's state (Bi-Tuning's momentum encoder and queues). It shows each
          term's value on the first batch, trains a few dozen steps and plots the curves.

          The model is randomly initialised (no pretrained tiny model exists) and the
          Co-Tuning relationship is hand-built: the notebook shows how the pieces fit,
          not the methods' benefit.
          """, INSTALL_NOTE),
      INSTALL_CELL,
      FASHION_MNIST_CELL,
      _code('''
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

          %matplotlib inline
          NOTEBOOK_START = time.perf_counter()
          '''),
      _markdown("""
          ## Data and model

          2% of the Fashion-MNIST train split (about 960 images), resized to 32 px. Bi-Tuning
          needs a second augmented view of every image (`views=2` gives `batch["image_key"]`).
          The model keeps a source head (`keep_source_head=True`, for Co-Tuning) and has a
          projector (`projection_dim`, for Bi-Tuning).
          """),
      _code('''
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
          '''),
      _markdown("""
          ## The Co-Tuning relationship

          Co-Tuning needs `p(y_s | y_t)`, a `[target classes, source classes]` row-stochastic
          matrix. With a real pretrained model it is computed from data:
          `CoTuning(approach="reverse").prepare(dataset=..., model=..., variables=..., config=...)`
          or `ftjax.relationship.compute_relationship(...)` (Alg. 1), or
          `ftjax.relationship.direct_relationship` (Eq. 3) from the source model's probabilities.
          A random source head has no such knowledge (it sends every class to the same source
          class), so here we hand-build one: target class `c` is related to source classes `2c`
          and `2c + 1`, as if the source task had two finer categories per target class.
          """),
      _code("""
          relationship = np.full((dataset.num_classes, NUM_SOURCE_CLASSES), 0.1 / (NUM_SOURCE_CLASSES - 2))
          for c in range(dataset.num_classes):
            relationship[c, 2 * c] = relationship[c, 2 * c + 1] = 0.45
          print("relationship", relationship.shape, "rows sum to", np.unique(relationship.sum(1).round(6)))
          """),
      _markdown("""
          ## Components and the step

          Each component is a small frozen dataclass with a `weight`, the forward `outputs` it
          needs, `init_state` and `__call__` returning a `TermOutput(loss, state, metrics)`.
          Bi-Tuning's `prepare` hands it the model (its key encoder runs inside the step).
          The optimizer trains the new head and projector at 10x the backbone's learning rate,
          chosen by regex rules over parameter paths (`ftjax.patches.path_labels`).
          """),
      _code('''
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
          '''),
      _markdown("""
          ## Each term on the first batch

          The step's metrics hold every unweighted term (`loss/<name>`), each component's own
          metrics (`bi_tuning/cce`, `bi_tuning/ccl`, queue fill) and the weighted total `loss`.
          On the first batch Bi-Tuning's queues are still empty.
          """),
      _code('''
          batches = dataset.train_batches(batch_size=BATCH_SIZE, views=2)
          t0 = time.perf_counter()
          state, metrics = train_step(state, sharding.global_batch(next(batches), mesh))
          first_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          print(f"first step (trace + compile + run): {time.perf_counter() - t0:.1f} s")
          for name, value in sorted(first_metrics.items()):
            print(f"  {name:22s} {value:9.4f}")
          weighted_sum = sum(c.weight * first_metrics[f"loss/{c.name}"] for c in components)
          print(f"sum of weight * term = {weighted_sum:.4f}   total loss = {first_metrics['loss']:.4f}")
          '''),
      _markdown("""
          ## Training a few dozen steps

          The total jumps at step 2: Bi-Tuning's terms are zero while its queues are empty and
          count once they hold keys (`queue_fill` reaches 1 after a few steps), so the last cell
          compares the loss over the first 10 steps with full queues with the last 10 steps.
          With a random backbone and a few dozen steps the contrastive terms fall only slowly;
          the cross-entropy falls clearly and the Co-Tuning term heads towards its floor (the
          entropy of the relationship rows, about 1.24 here).
          """),
      _code('''
          history = [first_metrics]
          t0 = time.perf_counter()
          for _ in range(NUM_STEPS - 1):
            state, metrics = train_step(state, sharding.global_batch(next(batches), mesh))
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
          print(f"{NUM_STEPS - 1} more steps: {time.perf_counter() - t0:.1f} s")
          print("last step:", {k: round(v, 4) for k, v in history[-1].items() if k.startswith("loss")})
          '''),
      _code('''
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
          '''),
      _code(f'''
          {RESULTS_CELL_DOC}
          total = [h["loss"] for h in history]
          queue_fill = [h["bi_tuning/queue_fill"] for h in history]
          # Compare like with like: from the first step with full queues every term is active.
          full = queue_fill.index(1.0)
          active = total[full:]
          results = {{
              "python": __import__("sys").executable,
              "num_steps": len(history),
              "weights": {{c.name: c.weight for c in components}},
              "first_step": first_metrics,
              "loss": total,
              "ce": [h["loss/ce"] for h in history],
              "co_tuning": [h["loss/co_tuning"] for h in history],
              "queue_fill": queue_fill,
              "first_full_step": full,
              "first10_full_mean": float(np.mean(active[:10])),
              "last10_mean": float(np.mean(active[-10:])),
              "seconds": time.perf_counter() - NOTEBOOK_START,
          }}
          print(f"total loss, queues full: first 10 steps {{results['first10_full_mean']:.3f}}, "
                f"last 10 steps {{results['last10_mean']:.3f}}")
          assert len(active) >= 20 and results["last10_mean"] < results["first10_full_mean"], "the loss did not fall"
          for term in ("ce", "co_tuning"):
            assert np.mean(results[term][-10:]) < np.mean(results[term][:10]), f"{{term}} did not fall"
          print("{RESULTS_PREFIX}" + json.dumps(results))
          '''),
  ]
  return _notebook(cells)


# ----------------------------------------------------------------------------- uot_selection


def uot_selection() -> nbformat.NotebookNode:
  cells = [
      _markdown("""
          # UOT data selection with your own features

          `ftjax.selection.uot_scores` is the jitted unbalanced-optimal-transport solver of
          "Improved Fine-Tuning by Better Leveraging Pre-Training Data" (Eq. 5): it scores each
          unit of a pre-training pool (a class or a k-means cluster) by how much mass the
          transport plan sends from it to the target classes, and the top-K units are the data
          to reuse. It needs only per-unit and per-class mean features, so any `[n, d]` feature
          array works. This notebook:

          1. makes features (downsampled Fashion-MNIST pixels; swap in your model's embeddings),
          2. clusters an unlabeled "pool" into units with `ftjax.selection.kmeans`,
          3. takes `class_means`, runs `uot_scores` for a target task (footwear: sandal, sneaker,
             ankle boot) and `select_top_k`, and draws the paper's Fig. 2b chart,
          4. runs several target tasks at once with `jax.vmap`,
          5. checks the scores against POT (`ot.unbalanced.sinkhorn_unbalanced`) and times both.
          """, INSTALL_NOTE),
      INSTALL_CELL,
      FASHION_MNIST_CELL,
      _code("""
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

          %matplotlib inline
          NOTEBOOK_START = time.perf_counter()
          OUT_DIR = os.environ.get("FTJAX_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="ftjax_uot_")
          """),
      _markdown("""
          ## Features

          The pool is the first 3000 Fashion-MNIST train images (their labels are used only to
          *describe* clusters afterwards, never by the selection); the target is the test images
          of three footwear classes among the first 1000. Features: 14x14 average-pooled grey
          pixels (196-d). Replace `pixel_features` with your model's embeddings.
          """),
      _code("""
          pool = tfds.as_numpy(tfds.load("fashion_mnist", split="train[:3000]", batch_size=-1))
          target = tfds.as_numpy(tfds.load("fashion_mnist", split="test[:1000]", batch_size=-1))
          CLASS_NAMES = tfds.builder("fashion_mnist").info.features["label"].names

          def pixel_features(images):
            grey = images[..., 0].astype(np.float32) / 255.0
            return grey.reshape(len(grey), 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(grey), -1)

          pool_features, pool_labels = pixel_features(pool["image"]), pool["label"]
          target_features, target_labels = pixel_features(target["image"]), target["label"]
          print("pool", pool_features.shape, "target", target_features.shape)
          """),
      _markdown("""
          ## Pool units: cosine k-means clusters

          The paper clusters an unlabeled pool and treats each cluster as a unit; `class_means`
          of the cluster assignments gives the unit means. We name each cluster by the most
          frequent (hidden) label of its members, only to read the results.
          """),
      _code("""
          NUM_CLUSTERS = 40
          clusters = kmeans(jnp.asarray(pool_features), num_clusters=NUM_CLUSTERS, num_iterations=20, seed=0)
          assignments = np.asarray(clusters.assignments)
          pool_means = class_means(features=jnp.asarray(pool_features), labels=jnp.asarray(assignments),
                                   num_classes=NUM_CLUSTERS)
          cluster_label = np.array([np.bincount(pool_labels[assignments == c], minlength=10).argmax()
                                    for c in range(NUM_CLUSTERS)])
          print("cluster sizes:", np.asarray(clusters.cluster_sizes).tolist())
          """),
      _markdown("""
          ## Scores and top-K for one target task

          Paper settings: entropic ε = 1, τ₁ = 1 (pool side, relaxed), τ₂ = 100 (target side,
          every target class covered), cosine cost divided by 0.01. `scores` are the plan's row
          masses `P1`; a large score means the unit resembles the target classes.
          """),
      _code("""
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
          """),
      _markdown("""
          ### The paper's Fig. 2b: the similarity vector `P1`, top-K highlighted

          Units sorted by score; the top-K bars are coloured, and each bar is labelled with its
          cluster's majority class.
          """),
      _code("""
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
          """),
      _markdown("""
          ## Several target tasks at once with `jax.vmap`

          Target sets with the same number of classes stack into `[tasks, classes, d]`; one
          vmapped call solves them all against the shared pool.
          """),
      _code("""
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
          """),
      _markdown("""
          ## Against POT

          The same problem in POT: unit masses on both sides, `reg=ε`, `reg_m=(τ₁, τ₂)`,
          `reg_type="entropy"`, cost `(1 - cos) / 0.01`, in float64. We compare the scores and
          time both, on this problem and on one of the paper's size (1000 ImageNet classes x 200
          target classes, 512-d features, synthetic). Timings on a shared 2-core CPU are rough.
          """),
      _code("""
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
          """),
      _code(f"""
          {RESULTS_CELL_DOC}
          features_path = os.path.join(OUT_DIR, "uot_features.npz")
          np.savez(features_path, pool_means=np.asarray(pool_means), target_means=np.asarray(footwear_means),
                   scores=np.asarray(result.scores), stacked_targets=np.asarray(stacked),
                   vmapped_scores=many)
          results = {{
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
          }}
          assert results["converged"] and pot_max_rel_diff < 1e-3 and vmap_max_rel_diff < 1e-4
          print("{RESULTS_PREFIX}" + json.dumps(results))
          """),
  ]
  return _notebook(cells)

# ----------------------------------------------------------------------------- model_patches


def model_patches() -> nbformat.NotebookNode:
  cells = [
      _markdown("""
          # Model patches: train a scale-and-bias patch, save it, apply it

          Mudrakarta et al., "K for the price of 1": instead of fine-tuning a whole network per
          task, train a small *patch* (here every BatchNorm scale and bias, plus the new head)
          on top of a frozen, shared base. `ftjax.patches` finds the patch parameters from the
          model's structure (`patch_rules(selection="scale_bias")`), the optimizer trains only
          them (`optax.partition` with `set_to_zero` for the rest), and the patch is saved to
          and applied from one small `.npz` file.

          This notebook trains, on 5% of Fashion-MNIST at 32 px, for 40 steps of 64 images:
          * **last layer**: only the new head (BatchNorm in eval mode, base statistics);
          * **scale-and-bias patch + last layer**: BatchNorm scales/biases, the head and the
            BatchNorm statistics re-estimated on the task.

          It then saves the patch, applies it onto a fresh copy of the base, checks that the
          logits are those of the trained model, and compares sizes and validation accuracy.
          The base is a randomly initialised tiny ResNet standing in for a pretrained
          checkpoint, and training is short: **the accuracies are rough** and only show the
          workflow (the same code patches `models.pretrained("efficientnet_lite0/imagenet", ...)`).
          """, INSTALL_NOTE),
      INSTALL_CELL,
      FASHION_MNIST_CELL,
      _code("""
          import functools
          import itertools
          import json
          import tempfile
          import time

          import jax
          import jax.numpy as jnp
          import numpy as np

          from ftjax import models, patches
          from ftjax.methods.finetune import CrossEntropy
          from ftjax.train import optim
          from ftjax.train import sharding
          from ftjax.train import step as step_lib
          from ftjax.train.state import TrainState

          NOTEBOOK_START = time.perf_counter()
          OUT_DIR = os.environ.get("FTJAX_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="ftjax_patches_")
          SEED, IMAGE_SIZE, BATCH_SIZE, NUM_STEPS = 0, 32, 64, 40

          dataset = data.load_dataset("fashion_mnist", sampling_rate=5, seed=SEED, image_size=IMAGE_SIZE,
                                      crop_scale=(0.35, 1.0))
          model = models.create_model("resnet_tiny", num_classes=dataset.num_classes)
          init = jax.jit(functools.partial(model.init, train=False, outputs=model.all_outputs))
          base_variables = jax.device_get(init(jax.random.key(SEED), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))))
          print(dataset)
          """),
      _markdown("""
          ## Which parameters train

          Rules are `(regex, group)` pairs over parameter paths; every parameter must match
          exactly one. `patch_rules` builds them from the structure (BatchNorm layers are those
          with running statistics).
          """),
      _code("""
          params, batch_stats = base_variables["params"], base_variables["batch_stats"]
          variants = {
              "last layer": {"rules": patches.patch_rules(params, batch_stats=batch_stats, selection="head"),
                             "train_bn": False},
              "scale-and-bias patch": {"rules": patches.patch_rules(params, batch_stats=batch_stats,
                                                                    selection="scale_bias"),
                                       "train_bn": True},
          }
          for name, variant in variants.items():
            variant["labels"] = patches.path_labels(params, variant["rules"])
            print(f"{name}: parameters per group {patches.group_sizes(params, variant['labels'])}")
            for regex, group in variant["rules"]:
              print(f"    {group:7s} {regex[:100]}")
          """),
      _markdown("## Training both variants"),
      _code("""
          mesh = sharding.make_data_mesh()
          components = [CrossEntropy()]
          eval_step = step_lib.make_eval_step(model=model, num_classes=dataset.num_classes, mesh=mesh)

          def evaluate(variables, split="val"):
            totals = None
            for batch in dataset.eval_batches(split, batch_size=200):
              out = jax.device_get(eval_step(variables, sharding.global_batch(batch, mesh)))
              totals = out if totals is None else jax.tree.map(np.add, totals, out)
            return step_lib.summarize_eval(totals)

          def train(variant):
            labels = variant["labels"]
            groups = {"patch": optim.GroupConfig(), "head": optim.GroupConfig(),
                      "frozen": optim.GroupConfig(frozen=True)}
            groups = {g: c for g, c in groups.items() if g in set(jax.tree.leaves(labels))}
            optimizer = optim.make_optimizer(
                labels=labels, groups=groups, momentum=0.9, weight_decay=0.0,
                schedule=optim.make_schedule(name="cosine", base_lr=0.1, total_steps=NUM_STEPS))
            frozen_mask = jax.tree.map(lambda group: group == "frozen", labels)
            state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                               opt_state=optimizer.init(params), method_state={"ce": ()},
                               rng=jax.random.key(SEED))
            step = step_lib.jit_train_step(
                step_lib.make_train_step(model=model, optimizer=optimizer, components=components,
                                         train_bn=variant["train_bn"], frozen_mask=frozen_mask),
                mesh=mesh, state=state)
            losses = []
            for batch in itertools.islice(dataset.train_batches(batch_size=BATCH_SIZE), NUM_STEPS):
              state, metrics = step(state, sharding.global_batch(batch, mesh))
              losses.append(float(metrics["loss"]))
            return jax.device_get(state), losses

          for name, variant in variants.items():
            t0 = time.perf_counter()
            state, losses = train(variant)
            variant["variables"] = state.variables
            variant["losses"] = losses
            variant["val"] = evaluate(state.variables)
            print(f"{name:22s} loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}   "
                  f"val top-1 {variant['val']['top1']:.3f}   ({time.perf_counter() - t0:.0f} s)")
          """),
      _markdown("""
          ## Save the patch, apply it onto the base

          `extract_patch` keeps the parameters of the `patch` and `head` groups and, since
          BatchNorm ran in training mode, the re-estimated statistics. `apply_patch` writes them
          into a copy of the base variables; the result must give exactly the trained model's
          logits.
          """),
      _code("""
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
          print(f"val top-1 of base + patch: {evaluate(applied)['top1']:.3f}")
          np.savez(os.path.join(OUT_DIR, "patch_check.npz"), images=check_images, logits=trained_logits)
          """),
      _markdown("""
          ## Sizes and accuracy

          Sizes count the trained parameters (the paper's measure) and the bytes stored
          (parameters plus BatchNorm statistics). For scale; a full fine-tune would store every
          parameter.
          """),
      _code("""
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
          """),
      _code(f"""
          {RESULTS_CELL_DOC}
          results = {{
              "python": __import__("sys").executable,
              "out_dir": OUT_DIR,
              "patch_path": patch_path,
              "patch_logit_diff": patch_logit_diff,
              "patch_parameters": rows["scale-and-bias patch"][0].parameters,
              "head_parameters": rows["last layer"][0].parameters,
              "total_parameters": total_params,
              "val_top1": {{name: row[2] for name, row in rows.items()}},
              "losses": {{name: v["losses"] for name, v in variants.items()}},
              "seconds": time.perf_counter() - NOTEBOOK_START,
          }}
          assert patch_logit_diff <= 1e-5, "base + patch does not reproduce the trained model"
          print("{RESULTS_PREFIX}" + json.dumps(results))
          """),
  ]
  return _notebook(cells)

# ----------------------------------------------------------------------------- spottune_policy


def spottune_policy() -> nbformat.NotebookNode:
  cells = [
      _markdown("""
          # SpotTune policies: a short run, Fig. 3 and Fig. 4

          SpotTune (Guo et al., CVPR 2019) keeps two copies of every residual block: the frozen
          pretrained block and a fine-tuned copy. A small policy network looks at each image and
          decides, block by block, which copy the image goes through (Eq. 2), trained with a
          straight-through Gumbel-softmax (Eq. 3, 4). This notebook, on 5% of Fashion-MNIST at
          32 px:

          1. builds a SpotTune model over a tiny ResNet (`create_spottune_model`,
             `spottune_variables_from_pretrained`) and trains it for a few dozen steps with the
             frozen copies in a frozen parameter group (`spottune_rules` / `spottune_groups`);
          2. routes test images with the deterministic (arg-max) policy and draws the paper's
             **Fig. 3** (per block, the fraction of images routed through the fine-tuned copy)
             and **Fig. 4** (histogram of the number of fine-tuned blocks per image);
          3. checks that forcing every image through the frozen copies gives the pretrained
             model's logits exactly (the max abs difference is recorded);
          4. trains the compact **Global-k** variant (Eq. 5-7), lists the blocks no image
             fine-tunes and counts the parameters left once their fine-tuned copies are dropped.

          The base is a randomly initialised `resnet_tiny` standing in for a pretrained checkpoint
          (no pretrained tiny model exists) and it has only **2 routed blocks**, so the figures
          have two bars and the numbers only show the workflow, not the method's benefit. The same
          code runs over `resnet26` (12 routed blocks) or a pretrained EfficientNet-Lite0 (9).
          """, INSTALL_NOTE),
      INSTALL_CELL,
      FASHION_MNIST_CELL,
      _code("""
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

          from ftjax import models, patches
          from ftjax.methods.finetune import CrossEntropy
          from ftjax.methods.spottune import SpotTune
          from ftjax.models import spottune as st
          from ftjax.train import optim
          from ftjax.train import sharding
          from ftjax.train import step as step_lib
          from ftjax.train.state import TrainState

          %matplotlib inline
          NOTEBOOK_START = time.perf_counter()
          OUT_DIR = os.environ.get("FTJAX_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="ftjax_spottune_")
          SEED, IMAGE_SIZE, BATCH_SIZE, NUM_STEPS, NUM_TEST = 0, 32, 32, 24, 2000
          # A small policy: 1 residual block of 8 channels on the 32 px image (paper: 3-4 blocks, 64+ channels).
          POLICY = {"policy_depth": 1, "policy_width": 8, "policy_image_size": IMAGE_SIZE}
          POLICY_LR_MULT = 10.0  # the policy's own learning rate: 10x the backbone's
          """),
      _markdown("""
          ## The base model and the SpotTune model over it

          `spottune_variables_from_pretrained` puts the base backbone under `backbone` (the
          trainable copies, same names, so pretrained weights load unchanged), copies each routed
          block again under `frozen_backbone` and initialises the policy at random. The stem (and
          the head) exist once and are trained. `SpotTune(...).model_options()` gives the model's
          policy options from the loss component's settings.
          """),
      _code('''
          dataset = data.load_dataset("fashion_mnist", sampling_rate=5, seed=SEED, image_size=IMAGE_SIZE,
                                      crop_scale=(0.35, 1.0))
          print(dataset)
          base_model = models.create_model("resnet_tiny", num_classes=dataset.num_classes)
          init = jax.jit(functools.partial(base_model.init, train=False, outputs=base_model.all_outputs))
          base_variables = jax.device_get(init(jax.random.key(SEED), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))))

          def build(spottune):
            """The SpotTune model for ``spottune``'s options, its variables and parameter groups."""
            model = st.create_spottune_model("resnet_tiny", num_classes=dataset.num_classes,
                                             **spottune.model_options())
            variables = st.spottune_variables_from_pretrained(model, base_variables, rng=jax.random.key(SEED + 1))
            labels = patches.path_labels(variables["params"], st.spottune_rules())
            return model, variables, labels

          spottune = SpotTune(**POLICY)
          model, variables, labels = build(spottune)
          print("routed blocks:", model.routed_blocks)
          print("parameters per group:", patches.group_sizes(variables["params"], labels))
          for regex, group in st.spottune_rules():
            print(f"    {group:8s} {regex}")
          '''),
      _markdown("""
          ## Training

          One jitted step (`make_train_step`) runs the model with `train=True`, where the routing
          is a straight-through Gumbel-softmax sample (temperature 5): the forward pass is hard
          (each image takes one copy of each block), the policy gets the gradient of the soft
          relaxation. The `frozen` group gets no updates (`frozen=True`) and no backward pass
          (`frozen_mask`). The `SpotTune` component adds nothing to the loss here
          (`lambda1 = lambda2 = 0`) but reports the per-block usage `v_l` of every batch.
          """),
      _code('''
          mesh = sharding.make_data_mesh()

          def train(spottune, model, variables, labels):
            """NUM_STEPS steps of cross-entropy + ``spottune``; returns the trained variables and the metrics."""
            groups = {name: optim.GroupConfig.from_mapping(group) for name, group in
                      st.spottune_groups(head_lr_mult=10.0, policy_lr_mult=POLICY_LR_MULT).items()}
            optimizer = optim.make_optimizer(
                labels=labels, groups=groups, momentum=0.9, weight_decay=5e-4,
                schedule=optim.make_schedule(name="cosine", base_lr=0.05, total_steps=NUM_STEPS))
            components = [CrossEntropy(), spottune]
            params = variables["params"]
            state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               batch_stats=variables["batch_stats"], opt_state=optimizer.init(params),
                               method_state={c.name: c.init_state(variables=variables, rng=None)
                                             for c in components},
                               rng=jax.random.key(SEED + 2))
            frozen_mask = jax.tree.map(lambda group: group == "frozen", labels)
            step = step_lib.jit_train_step(
                step_lib.make_train_step(model=model, optimizer=optimizer, components=components,
                                         frozen_mask=frozen_mask),
                mesh=mesh, state=state)
            history = []
            for batch in itertools.islice(dataset.train_batches(batch_size=BATCH_SIZE), NUM_STEPS):
              state, metrics = step(state, sharding.global_batch(batch, mesh))
              history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
            return jax.device_get(state.variables), history

          t0 = time.perf_counter()
          trained, history = train(spottune, model, variables, labels)
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
          '''),
      _markdown("""
          ## Routing the test images

          At test time the policy decides deterministically (`routing="argmax"`, the model's
          `eval_routing`); `"sample"` would draw from it instead. We route the first 2000 test
          images (after training the trainer's `SpotTune.finalize` routes the whole split and
          writes the same figures).
          """),
      _code('''
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
          '''),
      _markdown("""
          ### Fig. 3: which blocks are fine-tuned

          Per routed block, the fraction of test images the policy sends through the fine-tuned
          copy (`plot_block_usage`, the heat-map strip and bars of the paper's Fig. 3).
          """),
      _code("""
          fig3_path = st.plot_block_usage(decisions, os.path.join(OUT_DIR, "spottune_block_usage.png"),
                                          block_names=model.routed_blocks)
          display(Image(filename=fig3_path))
          """),
      _markdown("""
          ### Fig. 4: how many blocks each image fine-tunes

          `plot_finetuned_histogram`: the number of test images per count of fine-tuned blocks.
          """),
      _code("""
          fig4_path = st.plot_finetuned_histogram(decisions, os.path.join(OUT_DIR, "spottune_finetuned_blocks.png"))
          display(Image(filename=fig4_path))
          histogram = np.bincount(decisions.sum(axis=1), minlength=len(model.routed_blocks) + 1)
          print("images per number of fine-tuned blocks:", histogram.tolist())
          """),
      _markdown("""
          ## All frozen = the pretrained model

          Training never touches the frozen copies (they are bitwise the pretrained blocks), and
          `routing="all_frozen"` sends every image through them, computing only those copies. The
          stem and the head exist once and were trained, so we put the pretrained ones back; the
          routed blocks then come from the trained SpotTune model (whose fine-tuned copies did
          move away from the pretrained weights), and its logits must equal the base model's
          exactly.
          """),
      _code('''
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
          '''),
      _markdown("""
          ## Global-k: the same k blocks for every image, the others dropped

          Eq. 7 adds `lambda1 * l_k + lambda2 * l_e` to the loss: `l_k = (sum_l v_l - k)^2`
          (Eq. 5) asks for `k` fine-tuned blocks per image on average and `l_e = sum_l -v_l log v_l`
          (Eq. 6) pushes every `v_l` to 0 or 1, so all images end up fine-tuning the same `k`
          blocks. A block no test image fine-tunes (`unused_blocks`) needs no fine-tuned copy:
          `pruned_size` counts the parameters without those copies (and without the policy,
          which a model whose routing no longer depends on the image does not need). With 2
          routed blocks we ask for `k = 1`.
          """),
      _code("""
          global_k = SpotTune(lambda1=1.0, lambda2=1.0, k=1, **POLICY)
          gk_model, gk_variables, gk_labels = build(global_k)
          t0 = time.perf_counter()
          gk_trained, gk_history = train(global_k, gk_model, gk_variables, gk_labels)
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
          """),
      _code(f"""
          {RESULTS_CELL_DOC}
          decisions_path = os.path.join(OUT_DIR, "spottune_policy.npz")
          np.savez(decisions_path, decisions=decisions, global_k_decisions=gk_decisions,
                   policy_logits=policy_logits, check_images=check_images, all_frozen_logits=all_frozen_logits)
          results = {{
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
              "global_k": {{
                  "k": global_k.k,
                  "block_usage": gk_decisions.mean(0).tolist(),
                  "unused_blocks": unused,
                  "parameters_total": size.total,
                  "parameters_pruned": size.pruned,
                  "parameters_pruned_without_policy": size.pruned_without_policy,
                  "top1": gk_top1,
              }},
              "seconds": time.perf_counter() - NOTEBOOK_START,
          }}
          assert frozen_copies_max_abs_diff == 0.0 and all_frozen_max_abs_diff == 0.0, "all frozen != pretrained"
          assert finetuned_copies_max_abs_diff > 0.0, "the fine-tuned copies did not train"
          assert histogram.sum() == len(decisions)
          print("{RESULTS_PREFIX}" + json.dumps(results))
          """),
  ]
  return _notebook(cells)


# ----------------------------------------------------------------------------- helpers


def _notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.cells = cells
  nb.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  # Stable ids: regenerating an unchanged notebook gives the same bytes.
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"cell-{i:02d}"
  return nb


NOTEBOOKS = {
    "compose_losses.ipynb": compose_losses,
    "uot_selection.ipynb": uot_selection,
    "model_patches.ipynb": model_patches,
    "spottune_policy.ipynb": spottune_policy,
}


def _text(nb: nbformat.NotebookNode) -> str:
  text = nbformat.writes(nb)
  return text if text.endswith("\n") else text + "\n"


def build_all(out_dir: str = NOTEBOOK_DIR) -> list[str]:
  """Writes every notebook into ``out_dir``; returns the paths."""
  paths = []
  for name, build in NOTEBOOKS.items():
    nb = build()
    nbformat.validate(nb)
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
      f.write(_text(nb))
    paths.append(path)
  return paths


def stale_notebooks(out_dir: str = NOTEBOOK_DIR) -> list[str]:
  """Names of notebooks whose file differs from what the generator writes."""
  stale = []
  for name, build in NOTEBOOKS.items():
    path = os.path.join(out_dir, name)
    expected = _text(build())
    if not os.path.exists(path) or open(path, encoding="utf-8").read() != expected:
      stale.append(name)
  return stale


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="exit 1 if a notebook is out of date")
  args = parser.parse_args(argv)
  if args.check:
    stale = stale_notebooks()
    if stale:
      print("stale notebooks (run python notebooks/build_notebooks.py):", ", ".join(stale))
      return 1
    return 0
  for path in build_all():
    print("wrote", path)
  return 0


if __name__ == "__main__":
  sys.exit(main())

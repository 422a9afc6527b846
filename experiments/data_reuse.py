r"""Pre-training data reuse on Fashion-MNIST halves: UOT selection recall and reuse fine-tuning.

  .venv/bin/python -m experiments.data_reuse --config experiments/configs/data_reuse.py:reduced \
      --workdir runs/data_reuse_reduced

Steps (see the config's docstring for the protocol): pretrain a ResNet on the pool
half; embed the pool (k-means units) and the target half with (a) that model and
(b) ImageNet EfficientNet-Lite0; score the units by UOT (cosine), Greedy-OT and at
random and report the recall of matching units; fine-tune model (a) on the target
half without reuse, with random units and with the UOT top-K units (Eq. 6). Writes
``results.json``, ``results_table.md``, ``uot_top_k_<features>.png`` (Fig. 2b
style) and ``selected_units_<features>.md`` into the workdir.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to experiments/configs/data_reuse.py[:reduced].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def unit_summary(*, assignments: np.ndarray, pool_labels: np.ndarray, num_units: int,
                 pool_groups: dict[int, str | None], target_groups: dict[int, str | None],
                 pool_classes: tuple[int, ...]) -> dict[str, np.ndarray]:
  """Majority pool class (TFDS id), size and whether it matches the target, per unit."""
  target_cats = {g for g in target_groups.values() if g is not None}
  majority = np.zeros(num_units, np.int64)
  sizes = np.bincount(assignments, minlength=num_units)
  purity = np.zeros(num_units)
  for u in range(num_units):
    counts = np.bincount(pool_labels[assignments == u], minlength=len(pool_classes))
    majority[u] = pool_classes[int(np.argmax(counts))]
    purity[u] = counts.max() / max(counts.sum(), 1)
  matching = np.array([pool_groups[int(m)] in target_cats for m in majority])
  return {"majority": majority, "sizes": sizes, "purity": purity, "matching": matching}


def recall_at_matching(scores: np.ndarray, matching: np.ndarray) -> tuple[float, int]:
  """(matching units among the top-K by score) / K with K = number of matching units (Table 4)."""
  from ftjax.selection import select_top_k
  k = int(matching.sum())
  if k == 0:
    raise ValueError("no unit matches the target: recall is undefined")
  top = select_top_k(np.asarray(scores), k)
  return float(matching[top].sum()) / k, k


def plot_top_k(scores: np.ndarray, matching: np.ndarray, majority: np.ndarray, names: list[str], *,
               k: int, path: str, title: str) -> str:
  """Fig. 2b style: the top-k unit scores, bars coloured by matching / not matching."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch

  from ftjax.selection import select_top_k
  top = select_top_k(np.asarray(scores), k)
  fig, ax = plt.subplots(figsize=(max(6, 0.28 * k + 2), 3.6))
  colours = ["tab:green" if matching[u] else "tab:gray" for u in top]
  ax.bar(np.arange(k), np.asarray(scores)[top], color=colours)
  ax.set_xticks(np.arange(k))
  ax.set_xticklabels([f"{u}:{names[majority[u]][:7]}" for u in top], rotation=90, fontsize=6)
  ax.set_ylabel("UOT score (P1)_i")
  ax.set_title(title, fontsize=9)
  ax.legend(handles=[Patch(color="tab:green", label="matching"), Patch(color="tab:gray", label="not matching")],
            fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)
  return path


def _features(*, model, variables, dataset, split, batch_size, cache_dir, key, progress):
  from ftjax.selection import extract_features
  feats, labels = extract_features(
      model=model, variables=variables, batches=dataset.eval_batches(split, batch_size=batch_size),
      cache_path=os.path.join(cache_dir, f"{key.replace('/', '_')}.npz"), cache_key=key,
      total=math.ceil(dataset.num_examples[split] / batch_size), progress=progress, description=key)
  return feats, labels


def _trainer_config(cfg, *, model, init_from, classes, sampling_rate, epochs, batch_size, lr, scratch):
  from ftjax.train.config import default_config
  c = default_config()
  c.seed = cfg.seed
  c.model = model
  c.pretrained = ""
  c.init_from = init_from
  c.baseline = "scratch" if scratch else "finetune"
  c.head_lr_mult = 1.0
  c.dataset.name = "fashion_mnist"
  c.dataset.classes = tuple(classes)
  c.dataset.sampling_rate = sampling_rate
  c.dataset.image_size = cfg.image_size
  c.dataset.crop_scale = (0.5, 1.0)
  c.batch_size = batch_size
  c.eval_batch_size = cfg.eval_batch_size
  c.num_epochs = epochs
  c.optimizer.lr = lr
  c.log_every_steps = 20
  c.progress = cfg.progress
  c.tensorboard = False
  return c


def main(argv):
  del argv
  import jax

  from ftjax import data as ftdata
  from ftjax import models
  from ftjax.selection import class_means, greedy_ot_scores, kmeans, random_units, select_top_k, uot_scores
  from ftjax.train.checkpoint import load_checkpoint_arrays
  from ftjax.train.loop import train_and_evaluate
  from ftjax.train.setup import save_backbone_variables
  from experiments.configs.data_reuse import POOL_GROUPS, TARGET_GROUPS

  cfg = FLAGS.config
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  cache_dir = os.path.join(workdir, "feature_cache")
  timings: dict[str, float] = {}
  results: dict = {"config": json.loads(cfg.to_json_best_effort())}

  # (a) Pretrain on the pool half from scratch.
  t = time.time()
  pre_dir = os.path.join(workdir, "pretrain")
  pre_cfg = _trainer_config(cfg, model=cfg.pretrain.model, init_from="", classes=cfg.pool_classes,
                            sampling_rate=cfg.pretrain.sampling_rate, epochs=cfg.pretrain.num_epochs,
                            batch_size=cfg.pretrain.batch_size, lr=cfg.pretrain.lr, scratch=True)
  results["pretrain"] = train_and_evaluate(pre_cfg, pre_dir)
  best = load_checkpoint_arrays(pre_dir)["best"]
  backbone_path = save_backbone_variables({"params": best["params"], "batch_stats": best["batch_stats"]},
                                          os.path.join(workdir, "pool_pretrained_backbone.npz"))
  timings["pretrain_s"] = time.time() - t
  logging.info("pretrained on the pool half: test top1 %.4f", results["pretrain"]["test_top1"])

  pool_ds = ftdata.load_dataset("fashion_mnist", sampling_rate=cfg.feature_sampling_rate, seed=cfg.seed,
                                image_size=cfg.image_size, classes=cfg.pool_classes)
  target_ds = ftdata.load_dataset("fashion_mnist", sampling_rate=cfg.finetune.sampling_rate, seed=cfg.seed,
                                  image_size=cfg.image_size, classes=cfg.target_classes)
  pool_index = pool_ds.example_indices("train")
  pool_names = list(pool_ds.class_names)
  all_names = ftdata.load_dataset("fashion_mnist", sampling_rate=1, image_size=32).class_names

  # Feature sources.
  pre_model = models.create_model(cfg.pretrain.model, num_classes=len(cfg.pool_classes))
  pre_vars = {"params": jax.tree.map(np.asarray, best["params"]),
              "batch_stats": jax.tree.map(np.asarray, best["batch_stats"])}
  sources = [("pool_pretrained", pre_model, pre_vars, pool_ds, target_ds)]
  if cfg.run_lite0:
    lite = models.pretrained("efficientnet_lite0/imagenet", num_classes=len(cfg.target_classes))
    sources.append(("lite0_imagenet", lite.model, lite.variables,
                    ftdata.load_dataset("fashion_mnist", sampling_rate=cfg.feature_sampling_rate, seed=cfg.seed,
                                        image_size=cfg.lite0_image_size, classes=cfg.pool_classes),
                    ftdata.load_dataset("fashion_mnist", sampling_rate=cfg.finetune.sampling_rate,
                                        seed=cfg.seed, image_size=cfg.lite0_image_size,
                                        classes=cfg.target_classes)))

  selection = {}
  for name, model, variables, pds, tds in sources:
    t = time.time()
    tag = f"{name}/{cfg.seed}/{cfg.pretrain.model if name == 'pool_pretrained' else 'lite0'}"
    pool_feats, pool_labels = _features(model=model, variables=variables, dataset=pds, split="train",
                                        batch_size=cfg.eval_batch_size, cache_dir=cache_dir,
                                        key=f"{tag}/pool/{cfg.feature_sampling_rate}/{pds.image_size}",
                                        progress=cfg.progress)
    target_feats, target_labels = _features(model=model, variables=variables, dataset=tds, split="train",
                                            batch_size=cfg.eval_batch_size, cache_dir=cache_dir,
                                            key=f"{tag}/target/{cfg.finetune.sampling_rate}/{tds.image_size}",
                                            progress=cfg.progress)
    assert np.array_equal(pds.example_indices("train"), pool_index)
    km = kmeans(pool_feats, num_clusters=cfg.num_clusters, num_iterations=cfg.kmeans_iterations, seed=cfg.seed)
    assignments = np.asarray(km.assignments)
    summary = unit_summary(assignments=assignments, pool_labels=pool_labels, num_units=cfg.num_clusters,
                           pool_groups=POOL_GROUPS, target_groups=TARGET_GROUPS,
                           pool_classes=tuple(cfg.pool_classes))
    sizes = summary["sizes"]
    live = sizes > 0
    unit_means = np.zeros((cfg.num_clusters, pool_feats.shape[1]), np.float32)
    unit_means[live] = np.asarray(class_means(features=pool_feats, labels=np.searchsorted(
        np.flatnonzero(live), assignments), num_classes=int(live.sum())))
    target_means = np.asarray(class_means(features=target_feats, labels=target_labels,
                                          num_classes=len(cfg.target_classes)))
    uot = uot_scores(target_means=target_means, pool_means=unit_means[live], **cfg.uot.to_dict())
    scores = {"uot_cosine": np.full(cfg.num_clusters, -np.inf),
              "greedy_ot": np.full(cfg.num_clusters, -np.inf)}
    scores["uot_cosine"][live] = np.asarray(uot.scores)
    scores["greedy_ot"][live] = np.asarray(greedy_ot_scores(target_means=target_means,
                                                            pool_means=unit_means[live]))
    matching = summary["matching"] & live
    recalls = {}
    for method, s in scores.items():
      recalls[method], k = recall_at_matching(s, matching)
    # Random: the expected recall of k random units is the matching fraction; report 20 draws.
    draws = [float(matching[random_units(cfg.num_clusters, k, seed=cfg.seed + d)].sum()) / k for d in range(20)]
    recalls["random_mean_of_20"] = float(np.mean(draws))
    top = select_top_k(scores["uot_cosine"], k)
    selection[name] = {"top_k_units": top.tolist(), "k": k, "assignments": assignments,
                       "pool_positions": {int(u): np.flatnonzero(assignments == u) for u in range(cfg.num_clusters)}}
    results[f"selection_{name}"] = {
        "k_matching_units": k, "num_units": int(cfg.num_clusters), "recall": recalls,
        "uot_converged": bool(uot.converged), "uot_iterations": int(uot.num_iterations),
        "pool_images": int(len(pool_feats)), "target_images": int(len(target_feats)),
        "feature_dim": int(pool_feats.shape[1]), "kmeans_iterations": int(km.num_iterations)}
    plot_top_k(scores["uot_cosine"], matching, summary["majority"], all_names, k=k,
               path=os.path.join(workdir, f"uot_top_k_{name}.png"),
               title=f"UOT top-{k} units ({name} features); recall {recalls['uot_cosine']:.2f}")
    lines = [f"# Selected units ({name} features): UOT top-{k} of {cfg.num_clusters}", "",
             "| rank | unit | majority class | purity | size | matching | UOT score |", "|---|---|---|---|---|---|---|"]
    for rank, u in enumerate(top):
      lines.append(f"| {rank + 1} | {u} | {all_names[summary['majority'][u]]} | {summary['purity'][u]:.2f} | "
                   f"{sizes[u]} | {'yes' if matching[u] else 'no'} | {scores['uot_cosine'][u]:.4f} |")
    with open(os.path.join(workdir, f"selected_units_{name}.md"), "w") as f:
      f.write("\n".join(lines) + "\n")
    timings[f"selection_{name}_s"] = time.time() - t
    logging.info("%s: recall %s", name, recalls)

  # Fine-tuning model (a) on the target half: no reuse, random units, UOT top-K units (Eq. 6).
  sel = selection["pool_pretrained"]
  uot_positions = np.concatenate([sel["pool_positions"][u] for u in sel["top_k_units"]])
  rng = np.random.default_rng(cfg.seed)
  random_positions = []
  for u in rng.permutation(cfg.num_clusters):  # random units until as many images as UOT's
    random_positions.extend(sel["pool_positions"][int(u)].tolist())
    if len(random_positions) >= len(uot_positions):
      break
  random_positions = np.sort(np.asarray(random_positions[:len(uot_positions)]))
  pools = {"uot_reuse": pool_index[np.sort(uot_positions)], "random_reuse": pool_index[random_positions]}
  results["finetune"] = {}
  for variant in cfg.variants:
    t = time.time()
    c = _trainer_config(cfg, model=cfg.pretrain.model, init_from=backbone_path, classes=cfg.target_classes,
                        sampling_rate=cfg.finetune.sampling_rate, epochs=cfg.finetune.num_epochs,
                        batch_size=cfg.finetune.batch_size, lr=cfg.finetune.lr, scratch=False)
    if variant != "finetune":
      path = os.path.join(workdir, f"{variant}_indices.npy")
      np.save(path, pools[variant])
      c.reuse.enabled = True
      c.reuse.weight = cfg.reuse_weight
      c.reuse.mode = "labelled"
      c.reuse.classes = tuple(cfg.pool_classes)
      c.reuse.indices_path = path
    out = train_and_evaluate(c, os.path.join(workdir, variant))
    out["pool_images"] = 0 if variant == "finetune" else int(len(pools[variant]))
    out["wall_s"] = time.time() - t
    results["finetune"][variant] = out
    logging.info("%s: test top1 %.4f", variant, out["test_top1"])
  results["timings"] = timings
  with open(os.path.join(workdir, "results.json.tmp"), "w") as f:
    json.dump(results, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
  os.replace(os.path.join(workdir, "results.json.tmp"), os.path.join(workdir, "results.json"))
  table = ["# Pre-training data reuse on Fashion-MNIST halves", "",
           f"Pretrained {cfg.pretrain.model} on the pool half ({cfg.pretrain.sampling_rate}% , "
           f"{cfg.pretrain.num_epochs} epochs): pool test top-1 {results['pretrain']['test_top1']:.4f}", "",
           "## Recall of matching units (Table 4's metric, K = number of matching units)", "",
           "| features | units | K | UOT (cosine) | Greedy-OT | random (mean of 20) |", "|---|---|---|---|---|---|"]
  for name, *_ in sources:
    r = results[f"selection_{name}"]
    table.append(f"| {name} | {r['num_units']} | {r['k_matching_units']} | {r['recall']['uot_cosine']:.3f} | "
                 f"{r['recall']['greedy_ot']:.3f} | {r['recall']['random_mean_of_20']:.3f} |")
  table += ["", f"## Fine-tuning {cfg.pretrain.model} (a) on the target half at {cfg.finetune.sampling_rate}% "
            f"({cfg.finetune.num_epochs} epochs, Eq. 6 with λ = {cfg.reuse_weight}, one seed)", "",
            "| variant | pool images | best val top-1 | test top-1 | test mean per class |", "|---|---|---|---|---|"]
  for variant, out in results["finetune"].items():
    table.append(f"| {variant} | {out['pool_images']} | {out['best_val']:.4f} | {out['test_top1']:.4f} | "
                 f"{out['test_mean_per_class']:.4f} |")
  with open(os.path.join(workdir, "results_table.md"), "w") as f:
    f.write("\n".join(table) + "\n")
  print("\n".join(table), flush=True)


if __name__ == "__main__":
  app.run(main)

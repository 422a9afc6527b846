r"""Pre-training data reuse: UOT selection recall and reuse fine-tuning, with seeds.

  .venv/bin/python -m experiments.data_reuse --config experiments/configs/data_reuse.py \
      --workdir runs/data_reuse_near

Steps (the config's docstring states the design): build the pool (fixed for every
seed, without any image the target trains on) and pretrain a ResNet on it (model
(a)); embed the pool (k-means units, fixed) with (a) and with ImageNet
EfficientNet-Lite0; per seed, embed that seed's target sample, score the units by
UOT (cosine), Greedy-OT and at random and report the recall of matching units;
choose the learning rate and λ on validation (seed 0, test not evaluated); then
fine-tune (a) on the target per seed without reuse and with the random, Greedy-OT
and UOT units (Eq. 6). Resumable: a finished run is read back, never rerun.
Writes ``results.json``, ``results_table.md`` and ``uot_top_k_<features>.png``
(Fig. 2b style) into the workdir.
"""

from __future__ import annotations

import json
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
                 matching_classes: tuple[int, ...], pool_classes: tuple[int, ...]) -> dict[str, np.ndarray]:
  """Majority pool class (TFDS id), size and whether it matches the target, per unit.

  A unit matches when its majority class is one of ``matching_classes`` (TFDS ids).
  """
  majority = np.zeros(num_units, np.int64)
  sizes = np.bincount(assignments, minlength=num_units)
  purity = np.zeros(num_units)
  for u in range(num_units):
    counts = np.bincount(pool_labels[assignments == u], minlength=len(pool_classes))
    majority[u] = pool_classes[int(np.argmax(counts))]
    purity[u] = counts.max() / max(counts.sum(), 1)
  matching = np.array([int(m) in set(matching_classes) for m in majority])
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


def _trainer_config(cfg, *, model, init_from, classes, sampling_rate, epochs, batch_size, lr, scratch, seed,
                    train_indices_path=""):
  from ftjax.train.config import default_config
  c = default_config()
  c.seed = seed
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
  c.dataset.train_indices_path = train_indices_path
  c.batch_size = batch_size
  c.eval_batch_size = cfg.eval_batch_size
  c.num_epochs = epochs
  c.optimizer.lr = lr
  c.log_every_steps = 20
  c.progress = cfg.progress
  c.tensorboard = False
  return c


def build_pool(cfg, load_dataset) -> tuple[np.ndarray, dict[str, int]]:
  """The pre-training pool: TFDS train indices of the pool classes, fixed for every seed.

  Sampled at ``feature_sampling_rate`` with ``pool_seed``; the target's training
  images of every seed are removed (the pool never holds an image the target
  trains on; the target's val and test images lie outside the train part), and
  the matching classes are thinned to ``matching_keep_fraction`` so that matching
  units are a minority.
  """
  pool = load_dataset("fashion_mnist", sampling_rate=cfg.feature_sampling_rate, seed=cfg.pool_seed,
                      image_size=32, classes=cfg.pool_classes)
  indices = pool.example_indices("train")
  labels = np.asarray(cfg.pool_classes)[pool.labels("train")]
  overlap = set(cfg.pool_classes) & set(cfg.target_classes)
  target_images: set[int] = set()
  if overlap:
    for seed in range(cfg.num_seeds):
      target = load_dataset("fashion_mnist", sampling_rate=cfg.finetune.sampling_rate, seed=seed, image_size=32,
                            classes=cfg.target_classes)
      target_images.update(int(i) for i in target.example_indices("train"))
  keep = np.array([int(i) not in target_images for i in indices])
  rng = np.random.default_rng(cfg.pool_seed)
  thinned = np.zeros(len(indices), bool)
  if cfg.matching_keep_fraction < 1:
    for c in cfg.matching_classes:
      rows = np.flatnonzero((labels == c) & keep)
      drop = rng.permutation(rows)[int(round(cfg.matching_keep_fraction * len(rows))):]
      thinned[drop] = True
  final = keep & ~thinned
  counts = {int(c): int(((labels == c) & final).sum()) for c in cfg.pool_classes}
  return np.sort(indices[final]), {"removed_target_images": int((~keep).sum()), "thinned": int(thinned.sum()),
                                   "per_class": counts}


# The selection behind each reuse variant.
PICKS = {"uot_reuse": "uot", "greedy_reuse": "greedy_ot", "random_reuse": "random"}


def expected_random_recall(matching: np.ndarray, k: int) -> float:
  """E[matching among k units drawn without replacement] / k = the matching fraction."""
  return float(matching.sum()) / len(matching) if k else math.nan


def _run(config, workdir: str) -> dict:
  """``train_and_evaluate``, or the record of a finished run (never rerun)."""
  from ftjax.train.loop import train_and_evaluate
  done = os.path.join(workdir, "results.json")
  if os.path.exists(done):
    with open(done) as f:
      record = json.load(f)
    if config.evaluate_test == ("test_top1" in record):
      return record
  return train_and_evaluate(config, workdir)


def main(argv):
  del argv
  from ftjax.core import console
  console.configure(console.verbosity_from_flags(FLAGS))  # quiet by default; --verbosity=0 for INFO
  import jax

  from experiments import stats
  from ftjax import data as ftdata
  from ftjax import models
  from ftjax.selection import class_means, greedy_ot_scores, kmeans, random_units, select_top_k, uot_scores
  from ftjax.train.checkpoint import load_checkpoint_arrays
  from ftjax.train.setup import save_backbone_variables

  cfg = FLAGS.config
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  cache_dir = os.path.join(workdir, "feature_cache")
  timings: dict[str, float] = {}
  from experiments.evidence import code_identity
  results: dict = {"config": json.loads(cfg.to_json_best_effort()), **code_identity()}
  all_names = ftdata.load_dataset("fashion_mnist", sampling_rate=1, image_size=32).class_names

  # The pool (fixed for every seed) and model (a), pretrained on exactly the pool.
  pool_indices, pool_stats = build_pool(cfg, ftdata.load_dataset)
  pool_path = os.path.join(workdir, "pool_indices.npy")
  np.save(pool_path, pool_indices)
  results["pool"] = dict(pool_stats, images=int(len(pool_indices)))
  console.say(f"pool: {results['pool']}")
  t = time.time()
  pre_dir = os.path.join(workdir, "pretrain")
  pre_cfg = _trainer_config(cfg, model=cfg.pretrain.model, init_from="", classes=cfg.pool_classes,
                            sampling_rate=100.0, epochs=cfg.pretrain.num_epochs, batch_size=cfg.pretrain.batch_size,
                            lr=cfg.pretrain.lr, scratch=True, seed=0, train_indices_path=pool_path)
  results["pretrain"] = _run(pre_cfg, pre_dir)
  best = load_checkpoint_arrays(pre_dir)["best"]
  backbone_path = save_backbone_variables({"params": best["params"], "batch_stats": best["batch_stats"]},
                                          os.path.join(workdir, "pool_pretrained_backbone.npz"))
  timings["pretrain_s"] = time.time() - t

  def pool_dataset(image_size):
    return ftdata.load_dataset("fashion_mnist", sampling_rate=100.0, seed=0, image_size=image_size,
                               classes=cfg.pool_classes, train_indices=pool_indices)

  def target_dataset(image_size, seed):
    return ftdata.load_dataset("fashion_mnist", sampling_rate=cfg.finetune.sampling_rate, seed=seed,
                               image_size=image_size, classes=cfg.target_classes)

  pre_model = models.create_model(cfg.pretrain.model, num_classes=len(cfg.pool_classes))
  pre_vars = {"params": jax.tree.map(np.asarray, best["params"]),
              "batch_stats": jax.tree.map(np.asarray, best["batch_stats"])}
  sources = [("pool_pretrained", pre_model, pre_vars, cfg.image_size)]
  if cfg.run_lite0:
    lite = models.pretrained("efficientnet_lite0/imagenet", num_classes=len(cfg.target_classes))
    sources.append(("lite0_imagenet", lite.model, lite.variables, cfg.lite0_image_size))

  # Units (k-means of the pool's features, fixed) and, per seed, the scores of each selection.
  selection: dict = {}
  recall_rows: dict[str, list[dict]] = {}
  for name, model, variables, size in sources:
    t = time.time()
    pds = pool_dataset(size)
    tag = f"{name}/{cfg.pretrain.model if name == 'pool_pretrained' else 'lite0'}/{cfg.design}"
    pool_feats, pool_labels = _features(model=model, variables=variables, dataset=pds, split="train",
                                        batch_size=cfg.eval_batch_size, cache_dir=cache_dir,
                                        key=f"{tag}/pool/{size}", progress=cfg.progress)
    km = kmeans(pool_feats, num_clusters=cfg.num_clusters, num_iterations=cfg.kmeans_iterations, seed=0)
    assignments = np.asarray(km.assignments)
    summary = unit_summary(assignments=assignments, pool_labels=pool_labels, num_units=cfg.num_clusters,
                           matching_classes=tuple(cfg.matching_classes), pool_classes=tuple(cfg.pool_classes))
    live = summary["sizes"] > 0
    unit_means = np.asarray(class_means(features=pool_feats, labels=np.searchsorted(np.flatnonzero(live),
                                                                                   assignments),
                                        num_classes=int(live.sum())))
    matching = summary["matching"][live]
    live_ids = np.flatnonzero(live)
    k = int(matching.sum())
    if k == 0:
      raise ValueError(f"{name}: no unit's majority class is a matching class; recall is undefined")
    results[f"units_{name}"] = {"units": int(live.sum()), "matching_units": k,
                                "matching_fraction": float(matching.mean()),
                                "mean_purity": float(summary["purity"][live].mean())}
    for seed in range(cfg.num_seeds):
      tds = target_dataset(size, seed)
      target_feats, target_labels = _features(model=model, variables=variables, dataset=tds, split="train",
                                              batch_size=cfg.eval_batch_size, cache_dir=cache_dir,
                                              key=f"{tag}/target/seed{seed}/{size}", progress=cfg.progress)
      target_means = np.asarray(class_means(features=target_feats, labels=target_labels,
                                            num_classes=len(cfg.target_classes)))
      uot = uot_scores(target_means=target_means, pool_means=unit_means, **cfg.uot.to_dict())
      scores = {"uot": np.asarray(uot.scores),
                "greedy_ot": np.asarray(greedy_ot_scores(target_means=target_means, pool_means=unit_means))}
      picks = {m: select_top_k(s, k) for m, s in scores.items()}
      picks["random"] = random_units(len(live_ids), k, seed=1000 + seed)
      recall = {m: float(matching[p].sum()) / k for m, p in picks.items()}
      recall["random_expected"] = expected_random_recall(matching, k)
      recall_rows.setdefault(name, []).append({"seed": seed, **recall, "uot_converged": bool(uot.converged)})
      selection[(name, seed)] = {m: live_ids[p] for m, p in picks.items()}
      if seed == 0:
        plot_top_k(_full(scores["uot"], live), summary["matching"], summary["majority"], all_names, k=k,
                   path=os.path.join(workdir, f"uot_top_k_{name}.png"),
                   title=f"UOT top-{k} units ({name} features, seed 0); recall {recall['uot']:.2f}")
    selection[name] = {"assignments": assignments}
    timings[f"selection_{name}_s"] = time.time() - t
  results["recall"] = recall_rows

  # Fine-tuning model (a) on the target: no reuse, or Eq. 6 with random / Greedy-OT / UOT units
  # (pool-pretrained features). Learning rate (finetune, uot_reuse) and λ (uot_reuse) chosen on
  # validation with seed 0; random and Greedy-OT reuse take uot_reuse's values.
  assignments = selection["pool_pretrained"]["assignments"]

  def variant_config(variant: str, seed: int, lr: float, weight: float, evaluate_test: bool):
    c = _trainer_config(cfg, model=cfg.pretrain.model, init_from=backbone_path, classes=cfg.target_classes,
                        sampling_rate=cfg.finetune.sampling_rate, epochs=cfg.finetune.num_epochs,
                        batch_size=cfg.finetune.batch_size, lr=lr, scratch=False, seed=seed)
    c.evaluate_test = evaluate_test
    if variant != "finetune":
      units = selection[("pool_pretrained", seed)][PICKS[variant]]
      path = os.path.join(workdir, f"{variant}_seed{seed}_indices.npy")
      np.save(path, np.sort(pool_indices[np.isin(assignments, units)]))
      c.reuse.enabled = True
      c.reuse.weight = weight
      c.reuse.mode = "labelled"
      c.reuse.classes = tuple(cfg.pool_classes)
      c.reuse.indices_path = path
    return c

  def run_dir(variant, seed, lr, weight):
    tag = f"lr{lr:g}" + (f"_w{weight:g}" if variant != "finetune" else "")
    return os.path.join(workdir, "runs", variant, tag, f"seed{seed}")

  sweep: dict[str, list] = {}
  chosen: dict[str, dict[str, float]] = {}
  lr0, w0 = cfg.finetune.lr, cfg.reuse_weight
  lrs = [float(f"{lr0 * f:.6g}") for f in (1 / 3, 1.0, 3.0)]
  for variant in ("finetune", "uot_reuse"):
    runs = [(lr, w0, _run(variant_config(variant, 0, lr, w0, False), run_dir(variant, 0, lr, w0))) for lr in lrs]
    lr = max(runs, key=lambda r: (r[2]["best_val"], r[0] == lr0))[0]
    weight = w0
    if variant != "finetune":
      runs += [(lr, w, _run(variant_config(variant, 0, lr, w, False), run_dir(variant, 0, lr, w)))
               for w in cfg.reuse_weights if w != w0]
      weight = max([r for r in runs if r[0] == lr], key=lambda r: (r[2]["best_val"], r[1] == w0))[1]
    sweep[variant] = [{"lr": lr_, "weight": w_, "best_val": r["best_val"]} for lr_, w_, r in runs]
    chosen[variant] = {"lr": lr, "weight": weight}
  for variant in ("random_reuse", "greedy_reuse"):
    chosen[variant] = dict(chosen["uot_reuse"])
  results["sweep"], results["chosen"] = sweep, chosen

  finetune: dict[str, list[dict]] = {v: [] for v in cfg.variants}
  for seed in range(cfg.num_seeds):
    for variant in cfg.variants:
      lr, weight = chosen[variant]["lr"], chosen[variant]["weight"]
      out = _run(variant_config(variant, seed, lr, weight, True), run_dir(variant, seed, lr, weight))
      out["pool_images"] = 0 if variant == "finetune" else int(
          np.isin(assignments, selection[("pool_pretrained", seed)][PICKS[variant]]).sum())
      finetune[variant].append(out)
  results["finetune"] = finetune
  results["timings"] = timings
  with open(os.path.join(workdir, "results.json.tmp"), "w") as f:
    json.dump(results, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
  os.replace(os.path.join(workdir, "results.json.tmp"), os.path.join(workdir, "results.json"))
  table = format_tables(results, cfg, stats)
  with open(os.path.join(workdir, "results_table.md"), "w") as f:
    f.write(table)
  print(table, flush=True)


def _full(scores: np.ndarray, live: np.ndarray) -> np.ndarray:
  """Scores of the live units in the slots of all units (empty units rank last)."""
  out = np.full(len(live), float(np.min(scores)) - 1.0)
  out[live] = scores
  return out


def format_tables(results: dict, cfg, stats) -> str:
  """Recall and fine-tuning tables with seed intervals and paired differences."""
  names = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
  pool = results["pool"]
  lines = [f"# Pre-training data reuse: design `{cfg.design}`", "",
           f"Target: {', '.join(names[c] for c in cfg.target_classes)} at {cfg.finetune.sampling_rate:g}% of "
           f"train. Pool: {', '.join(names[c] for c in cfg.pool_classes)} ({pool['images']} images: "
           + ", ".join(f"{names[int(c)]} {n}" for c, n in pool["per_class"].items())   # str keys once read back
           + f"; the target's training images of every seed removed, {pool['removed_target_images']}). "
           f"Matching classes: {', '.join(names[c] for c in cfg.matching_classes)}. Model (a): "
           f"{cfg.pretrain.model} pretrained from scratch on the pool, pool test top-1 "
           f"{results['pretrain'].get('test_top1', float('nan')):.4f}.", "",
           "## Recall of matching units (K = number of matching units; mean over seeds [95%])", "",
           "| features | units | matching (K) | UOT | Greedy-OT | random draw | random expected | "
           "UOT − Greedy-OT (paired) | UOT − random expected (paired) |", "|---|---|---|---|---|---|---|---|---|"]
  for name, rows in results["recall"].items():
    u = results[f"units_{name}"]
    by = {m: {r["seed"]: r[m] for r in rows} for m in ("uot", "greedy_ot", "random", "random_expected")}
    cell = {m: stats.format_points(stats.mean_interval(list(v.values()))) for m, v in by.items()}
    d1 = stats.paired_difference(by["uot"], by["greedy_ot"])
    d2 = stats.paired_difference(by["uot"], by["random_expected"])
    lines.append(f"| {name} | {u['units']} | {u['matching_units']} | {cell['uot']} | {cell['greedy_ot']} | "
                 f"{cell['random']} | {cell['random_expected']} | {stats.format_points(d1, signed=True)} | "
                 f"{stats.format_points(d2, signed=True)} |")
  lines += ["", "(Recall in %.)", "",
            f"## Fine-tuning (a) on the target ({cfg.finetune.num_epochs} epochs; Eq. 6, pool labels; "
            "test top-1 %, mean [95%]; Δ paired by seed, `*` where the interval excludes 0)", "",
            "| variant | seeds | lr | λ | pool images (mean) | val | test top-1 | Δ vs finetune | Δ vs random_reuse |",
            "|---|---|---|---|---|---|---|---|---|"]
  ft = results["finetune"]
  by_seed = {v: {r["seed"]: r["test_top1"] for r in recs} for v, recs in ft.items()}
  for variant, recs in ft.items():
    test = stats.mean_interval([r["test_top1"] for r in recs])
    val = stats.mean_interval([r["best_val"] for r in recs])
    deltas = []
    for other in ("finetune", "random_reuse"):
      if other == variant or other not in by_seed:
        deltas.append("")
        continue
      d = stats.paired_difference(by_seed[variant], by_seed[other])
      deltas.append(stats.format_points(d, signed=True) + (" *" if d.excludes_zero else ""))
    ch = results["chosen"][variant]
    weight = "" if variant == "finetune" else f"{ch['weight']:g}"
    lines.append(f"| {variant} | {test.n} | {ch['lr']:g} | {weight} | "
                 f"{np.mean([r['pool_images'] for r in recs]):.0f} | {100 * val.mean:.2f} | "
                 f"{stats.format_points(test)} | {deltas[0]} | {deltas[1]} |")
  lines += ["", "## Sweep on validation (seed 0, test not evaluated; `chosen` marks the value every seed ran)", "",
            "| variant | lr | λ | best val | |", "|---|---|---|---|---|"]
  for variant, runs in results["sweep"].items():
    ch = results["chosen"][variant]
    for r in runs:
      mark = "chosen" if (r["lr"], r["weight"]) == (ch["lr"], ch["weight"]) else ""
      weight = "" if variant == "finetune" else f"{r['weight']:g}"   # fine-tuning has no λ
      lines.append(f"| {variant} | {r['lr']:g} | {weight} | {100 * r['best_val']:.2f} | {mark} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)

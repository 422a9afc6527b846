r"""Model patches (Mudrakarta et al., 2019): Table 1, Fig. 2 and Table 4 on any TFDS dataset.

  .venv/bin/python -m experiments.train --config experiments/configs/model_patches.py:table1 --workdir runs/patches_t1
  .venv/bin/python -m experiments.train --config experiments/configs/model_patches.py:fig2 --workdir runs/patches_f2
  .venv/bin/python -m experiments.plot_lr_sweep runs/patches_f2          # the Fig. 2 picture
  .venv/bin/python -m experiments.train --config experiments/configs/model_patches.py:table4 --workdir runs/patches_t4
  .venv/bin/python -m experiments.train --config experiments/configs/model_patches.py:table4_shared --workdir runs/patches_t4s

Arguments:
  table1          last layer (pretrained BatchNorm statistics); last layer + BN statistics
                  (re-estimated on the task: the paper's App. B.1 / Table 5 variant); S/B +
                  last layer; S/B only with a random fixed last layer; DW + last layer;
                  all (full fine-tuning).
  fig2            the learning-rate sweep 0.0045 ... 0.3645 (factor 3) for every table1
                  row: last layer, last layer + BN statistics, S/B + last layer, DW + last
                  layer, full fine-tuning and S/B with a random fixed last layer.
  table4          multitask across resolutions 96 ... 224 px: shared weights, one
                  scale-and-bias patch per resolution (its γ, β and BatchNorm statistics
                  private), last layer shared.
  table4_shared   the same with nothing private ("all shared"): one set of weights and one
                  set of BatchNorm statistics for every resolution (each step's task batches
                  update the shared running statistics one after another, in task order).
  table4_independent
                  Table 4's "independently trained" rows: full fine-tuning, one
                  model per resolution.
  The table4 arguments take an optional resolution list: ``table4,32,48,64,80,96``
  (Fashion-MNIST images are 28 px, so 96 ... 224 px are upsamplings of the same
  pixels; the smaller list is what this repository measured on a 2-core CPU).

Defaults follow the main job (EfficientNet-Lite0 from ImageNet, Fashion-MNIST at 5%,
64 px for table1/fig2, 10 epochs, SGD momentum, cosine).

BatchNorm statistics, as the paper defines each patch (each row sets ``bn_mode``):

* the scale-and-bias patch "corresponds to all the γ, β, μ, σ" (Sec. 2): S/B rows
  re-estimate the statistics on the task (``bn_mode="train"``) and ``patch.npz`` holds
  every BatchNorm mean and variance with the γ, β;
* transfer learning trains the patch "(and) optionally also the last layer. The rest of
  the parameters are left unchanged" (Sec. 2): the last-layer row and the depthwise row
  keep the pretrained statistics (``bn_mode="eval"``; App. B.1: the last layer "with
  frozen statistics"); ``patch.npz`` then holds no statistics;
* ``last_layer_bn_stats`` is App. B.1's "same as above + batchnorm statistics" (Table 5):
  the last layer trained while the statistics are re-estimated (``bn_mode="train"``);
* ``all`` (full fine-tuning) re-estimates them, as fine-tuning does.

Results name this in ``patch_bn_statistics`` (``task`` / ``pretrained``). Each patch run
saves ``patch.npz`` (the patch and the head it trained) and reports its size in results.json.
Expected numbers: ``experiments/results/patches_5 and patches_t4*/results_table.md``, three seeds at
hyper-parameters chosen on validation (``python -m experiments.evidence tables`` writes it
from the study's ledger; rows the study has not finished are empty there), and the
claims in ``experiments/results/README.md``. Earlier single-seed numbers, from before
the fixes of issue 23: ``experiments/results/HISTORY.md``.
"""

from experiments.configs import default

LR_SWEEP = (0.0045, 0.0135, 0.0405, 0.1215, 0.3645)   # 0.0045 x 3^k, the paper's Fig. 2 range
RESOLUTIONS = (96, 128, 160, 192, 224)

# Each row names its BatchNorm mode: statistics re-estimated ("train") exactly where the
# paper's patch holds them (see the module doc).
_ROWS = {
    "last_layer": {"baseline": "patch", "patch": {"selection": "head"}, "bn_mode": "eval"},
    "last_layer_bn_stats": {"baseline": "patch", "patch": {"selection": "head"}, "bn_mode": "train"},
    "sb_last_layer": {"baseline": "patch", "patch": {"selection": "scale_bias", "train_head": True},
                      "bn_mode": "train"},
    "sb_random_last_layer": {"baseline": "patch", "patch": {"selection": "scale_bias", "train_head": False},
                             "bn_mode": "train"},
    "dw_last_layer": {"baseline": "patch", "patch": {"selection": "depthwise", "train_head": True},
                      "bn_mode": "eval"},
    "all": {"baseline": "finetune", "bn_mode": "train"},
}


def _lr_name(lr: float) -> str:
  return f"lr{lr:g}".replace(".", "p")   # variant names may not hold dots


def get_config(arg: str = "table1"):
  name, *sizes = arg.split(",")
  try:
    resolutions = tuple(int(s) for s in sizes) or RESOLUTIONS
  except ValueError:
    raise ValueError(f"model_patches config {arg!r}: resolutions after the name must be integers, "
                     "e.g. 'table4,32,48,64'") from None
  arg = name
  c = default.get_config()
  c.dataset.sampling_rate = 5.0
  c.head_lr_mult = 1.0   # the paper trains the last layer at the patch's learning rate
  c.bn_mode = ""         # per row (table1/fig2); the multitask trainer re-estimates (table4)
  if arg == "table1":
    c.compare = {name: dict(row) for name, row in _ROWS.items()}
  elif arg == "fig2":
    c.compare = {f"{name}_{_lr_name(lr)}": dict(_ROWS[name], optimizer={"lr": lr})
                 for name in ("last_layer", "last_layer_bn_stats", "sb_last_layer", "dw_last_layer", "all",
                              "sb_random_last_layer")
                 for lr in LR_SWEEP}
  elif arg in ("table4", "table4_shared"):
    c.compare = {}
    c.baseline = "patch"
    c.patch.selection = "scale_bias" if arg == "table4" else "none"
    c.share_head = True
    c.tasks = {f"px{size}": {"image_size": size} for size in resolutions}
  elif arg == "table4_independent":
    c.compare = {f"px{size}": {"baseline": "finetune", "dataset": {"image_size": size}} for size in resolutions}
  else:
    raise ValueError(f"unknown model_patches config {arg!r}; expected table1, fig2, table4, table4_shared "
                     "or table4_independent")
  return c

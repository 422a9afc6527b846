r"""Pre-training data reuse on Fashion-MNIST halves (issue 7; papers/uot-data-reuse.txt).

Pool half (the "pre-training data"): T-shirt/top 0, Trouser 1, Coat 4, Sandal 5, Bag 8.
Target half: Pullover 2, Dress 3, Shirt 6, Sneaker 7, Ankle boot 9.
Units: cosine k-means clusters of the pool's train features. A unit "matches" the
target when its majority pool class shares a super-category with a target class
(tops {T-shirt, Coat} ~ {Pullover, Dress, Shirt}; footwear {Sandal} ~ {Sneaker,
Ankle boot}; Trouser and Bag match nothing). Recall (Table 4, adapted) = matching
units among the top-K by score / matching units, K = number of matching units.

Features: (a) a ResNet pretrained here from scratch on the pool half, (b) ImageNet
EfficientNet-Lite0. Fine-tuning (from model (a)) on the target half: fine-tune only,
random reuse (random units, as many pool images as UOT's), UOT reuse (top-K units),
Eq. 6 with the pool's class labels and λ = ``reuse_weight`` (0.3).

Run:

  .venv/bin/python -m experiments.data_reuse --config experiments/configs/data_reuse.py \
      --workdir runs/data_reuse             # full (see the sizes below)
  .venv/bin/python -m experiments.data_reuse --config experiments/configs/data_reuse.py:reduced \
      --workdir runs/data_reuse_reduced     # the reduced run whose numbers are below

Measured on the shared 2-core CPU (one seed; another job was running on the machine):

Full config (resnet26 pretrained from scratch on 15% of the pool half for 3 epochs at
32 px, pool test top-1 0.925; 50 clusters of 15% of the pool's train part = 3600
images; Lite0 at 64 px; fine-tuning 6 epochs at 5% = 1200 target images), 28 min 52 s:

  recall of matching units  | K  | UOT (cosine) | Greedy-OT | random (mean of 20)
  (a) pool-pretrained       | 31 | 0.839        | 0.806     | 0.608
  (b) Lite0 ImageNet        | 31 | 0.839        | 0.710     | 0.619

  fine-tune on the target half | pool images | best val | test top-1
  fine-tune only               | 0           | 0.7967   | 0.7706
  random reuse (λ = 0.3)       | 2219        | 0.7900   | 0.7752
  UOT reuse (λ = 0.3)          | 2219        | 0.7967   | 0.7666

UOT ranks matching units above Greedy-OT and random with both feature sources; the
three fine-tuning accuracies are within one point of each other (one seed, short
runs): no accuracy gain from reuse is shown here.

``:reduced`` (resnet_tiny pretrained on 10% of the pool half for 3 epochs, pool test
top-1 0.829; 30 clusters of 10% of the pool's train part; Lite0 at 32 px; fine-tuning
4 epochs at 5%), 6 min 37 s in all:

  recall of matching units  | K  | UOT (cosine) | Greedy-OT | random (mean of 20)
  (a) pool-pretrained       | 16 | 0.812        | 0.625     | 0.506
  (b) Lite0 ImageNet        | 20 | 0.750        | 0.600     | 0.685

  fine-tune on the target half | pool images | best val | test top-1
  fine-tune only               | 0           | 0.7500   | 0.7302
  random reuse (λ = 0.3)       | 1432        | 0.7533   | 0.7104
  UOT reuse (λ = 0.3)          | 1432        | 0.7467   | 0.7110
"""

import ml_collections

POOL_CLASSES = (0, 1, 4, 5, 8)
TARGET_CLASSES = (2, 3, 6, 7, 9)
# Pool class -> super-category; target class -> super-category (None: matches nothing).
POOL_GROUPS = {0: "tops", 1: None, 4: "tops", 5: "footwear", 8: None}
TARGET_GROUPS = {2: "tops", 3: "tops", 6: "tops", 7: "footwear", 9: "footwear"}


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pool_classes = POOL_CLASSES
  c.target_classes = TARGET_CLASSES
  c.image_size = 32
  c.progress = True

  # (a) pretraining on the pool half, from scratch.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.model = "resnet26"
  c.pretrain.sampling_rate = 15.0
  c.pretrain.num_epochs = 3
  c.pretrain.batch_size = 64
  c.pretrain.lr = 0.05

  # Selection.
  c.feature_sampling_rate = 15.0   # percent of the pool's train part embedded and clustered
  c.num_clusters = 50
  c.kmeans_iterations = 30
  c.uot = ml_collections.ConfigDict({"epsilon": 1.0, "tau_pool": 1.0, "tau_target": 100.0,
                                     "cost_scale": 0.01})
  c.lite0_image_size = 64           # (b) ImageNet EfficientNet-Lite0 features
  c.run_lite0 = True
  c.eval_batch_size = 250

  # Fine-tuning on the target half (from model (a)).
  c.finetune = ml_collections.ConfigDict()
  c.finetune.sampling_rate = 5.0
  c.finetune.num_epochs = 6
  c.finetune.batch_size = 32
  c.finetune.lr = 0.01
  c.reuse_weight = 0.3
  c.variants = ("finetune", "random_reuse", "uot_reuse")

  if arg == "reduced":
    c.pretrain.model = "resnet_tiny"
    c.pretrain.sampling_rate = 10.0
    c.pretrain.num_epochs = 3
    c.feature_sampling_rate = 10.0
    c.num_clusters = 30
    c.lite0_image_size = 32
    c.finetune.num_epochs = 4
  elif arg:
    raise ValueError(f"data_reuse.py: unknown argument {arg!r}; known: '' (full), 'reduced'")
  return c

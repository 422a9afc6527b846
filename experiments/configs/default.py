r"""The main job: ImageNet EfficientNet-Lite0 fine-tuned on Fashion-MNIST at a low sampling rate.

Run (after `bash scripts/setup.sh`):

  .venv/bin/python -m experiments.train --config experiments/configs/default.py --workdir runs/default

Trains a linear probe and full fine-tuning on 5% of the Fashion-MNIST training set
(stratified: 240 images per class) at 64 px, picks each run's checkpoint on
validation, evaluates the 10,000 test images once and prints a table. (At 1% the
two are within a point of each other on validation.)
Expected: about 4 minutes on 2 CPU cores; the fine-tuning row at three seeds is the
``finetune`` row of ``experiments/results/co_tuning_5/results_table.md`` (the same run).

The paper protocol, which every config in this directory built on this one
inherits (baselines, bi_tuning, co_tuning, model_patches, regularizers, spottune,
spottune_decathlon; not tiny.py, which starts from ``default_config()``, nor
data_reuse.py, a config of its own):

* ``optimizer.weight_decay_mode = "coupled"``: PyTorch SGD, weight decay added to
  the gradient before momentum, as in TLlib and the official Co-Tuning and
  SpotTune code (``torch.optim.SGD(..., momentum=0.9, weight_decay=5e-4)``).
* ``dataset.val_source = "full"``: validation is a fixed stratified 20% of the
  Fashion-MNIST train split (1,200 images per class, the same for every rate and
  seed), train is sampled from the other 80% (Co-Tuning Sec. 5; Bi-Tuning follows
  it). ``--config.dataset.val_source=sampled`` gives the low-data alternative
  (validation sampled at the training rate: 60 images per class at 5%).
"""

from ftjax.train.config import default_config


def get_config(arg: str = ""):
  del arg
  c = default_config()
  c.model = "efficientnet_lite0"
  c.pretrained = "efficientnet_lite0/imagenet"
  c.dataset.name = "fashion_mnist"
  c.dataset.sampling_rate = 5.0
  c.dataset.image_size = 64
  c.batch_size = 32
  c.eval_batch_size = 250
  c.num_epochs = 10
  c.optimizer.lr = 0.005
  c.optimizer.weight_decay = 5e-4
  c.optimizer.weight_decay_mode = "coupled"
  c.dataset.val_source = "full"
  c.dataset.val_fraction = 0.2
  c.compare = {
      "linear_probe": {"baseline": "linear_probe"},
      "finetune": {"baseline": "finetune"},
  }
  return c

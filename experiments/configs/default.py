r"""The main job: ImageNet EfficientNet-Lite0 fine-tuned on Fashion-MNIST at a low sampling rate.

Run (after `bash scripts/setup.sh`):

  .venv/bin/python -m experiments.train --config experiments/configs/default.py --workdir runs/default

Trains a linear probe and full fine-tuning on 1% of the Fashion-MNIST training set
(stratified: 48 images per class; validation 12 per class), picks each run's
checkpoint on validation, evaluates the 10,000 test images once and prints a table.
Expected on a 2-core CPU: see README ("The main job").
"""

from ftjax.train.config import default_config


def get_config(arg: str = ""):
  del arg
  c = default_config()
  c.model = "efficientnet_lite0"
  c.pretrained = "efficientnet_lite0/imagenet"
  c.dataset.name = "fashion_mnist"
  c.dataset.sampling_rate = 1.0
  c.dataset.image_size = 96
  c.batch_size = 32
  c.eval_batch_size = 250
  c.num_epochs = 8
  c.optimizer.lr = 0.01
  c.optimizer.weight_decay = 5e-4
  c.compare = {
      "linear_probe": {"baseline": "linear_probe"},
      "finetune": {"baseline": "finetune"},
  }
  return c

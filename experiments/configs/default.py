r"""The main job: ImageNet EfficientNet-Lite0 fine-tuned on Fashion-MNIST at a low sampling rate.

Run (after `bash scripts/setup.sh`):

  .venv/bin/python -m experiments.train --config experiments/configs/default.py --workdir runs/default

Trains a linear probe and full fine-tuning on 5% of the Fashion-MNIST training set
(stratified: 240 images per class; validation 60 per class) at 64 px, picks each
run's checkpoint on validation, evaluates the 10,000 test images once and prints a
table. (At 1% the two are within a point of each other on validation.)
Expected on a 2-core CPU: see README ("The main job").
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
  c.compare = {
      "linear_probe": {"baseline": "linear_probe"},
      "finetune": {"baseline": "finetune"},
  }
  return c

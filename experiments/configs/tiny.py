r"""A seconds-long run for tests and smoke checks: a tiny ResNet on 1% of Fashion-MNIST at 32 px.

  .venv/bin/python -m experiments.train --config experiments/configs/tiny.py --workdir /tmp/tiny

The argument adds a method to the cross-entropy: ``tiny.py:bi_tuning`` (small
queues, 16-d projector) is the run with method state (key encoder, queues).
"""

from ftjax.train.config import default_config


def get_config(arg: str = ""):
  c = default_config()
  c.model = "resnet_tiny"
  c.pretrained = ""
  c.baseline = "scratch"
  c.dataset.name = "fashion_mnist"
  c.dataset.sampling_rate = 1.0
  c.dataset.image_size = 32
  c.batch_size = 16
  c.eval_batch_size = 500
  c.num_steps = 24
  c.eval_every_steps = 8
  c.log_every_steps = 4
  c.optimizer.lr = 0.05
  c.progress = False
  if arg == "bi_tuning":
    c.losses = {"ce": {"weight": 1.0},
                "bi_tuning": {"weight": 1.0, "keys_per_class": 4, "projection_dim": 16}}
  elif arg:
    raise ValueError(f"tiny.py: unknown argument {arg!r}; known: '' (cross-entropy), 'bi_tuning'")
  return c

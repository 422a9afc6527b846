r"""The foundation baselines on one protocol: linear probe, last-k, fine-tune, from scratch.

  .venv/bin/python -m experiments.train --config experiments/configs/baselines.py:1 --workdir runs/baselines

The argument is the sampling rate in percent (default 5, as the main job). ``--config.num_seeds=3``
gives mean ± std over three seeds.
"""

from experiments.configs import default


def get_config(arg: str = ""):
  c = default.get_config()
  c.dataset.sampling_rate = float(arg) if arg else 5.0
  c.compare = {
      "linear_probe": {"baseline": "linear_probe"},
      "last_3": {"baseline": "last_k", "last_k": 3},
      "finetune": {"baseline": "finetune"},
      # From scratch needs a larger lr and no pretrained weights.
      "scratch": {"baseline": "scratch", "pretrained": "", "optimizer": {"lr": 0.05}},
  }
  return c

r"""SpotTune, the Table 2 protocol (SpotTune vs. fine-tuning baselines) on any TFDS dataset.

  .venv/bin/python -m experiments.train --config experiments/configs/spottune.py:5 --workdir runs/spottune_5

The argument is the sampling rate in percent (default 5). Model, data and optimizer are
those of ``default.py`` (ImageNet EfficientNet-Lite0 on Fashion-MNIST at 64 px);
``--config.dataset.name=...`` picks the dataset, ``spottune.py:5,resnet26`` uses a
ResNet (from scratch weights unless ``--config.pretrained`` names one).

SpotTune doubles the *routed* blocks: all residual blocks of a ResNet; the 9 residual
MBConv blocks (stride 1, equal channels) of Lite0. Rows (``compare``):

* ``finetune``: standard fine-tuning (plain model);
* ``feature_extractor``: frozen pretrained backbone, new head trained (the
  ``linear_probe`` baseline: BatchNorm on the pretrained statistics);
* ``last_1``, ``last_2``, ``last_3``: fine-tune the last k blocks of
  :func:`ftjax.models.block_prefixes` (for Lite0 the last "block" is the head conv; for a
  ResNet they are the last k residual blocks, as in the paper);
* ``spottune``: per-image policy, straight-through Gumbel-softmax (τ = 5) in training,
  deterministic (argmax) routing at test; the results also hold the test accuracy of the
  sampled routing and of routing every image through the fine-tuned blocks (the paper's
  "running fine-tuned blocks" variant), Fig. 3 and Fig. 4 and the decisions;
* ``global_k``: SpotTune + λ1 l_k + λ2 l_e (Eq. 7) with k = 3 (the paper's k; it gives
  no λ values: λ1 = λ2 = 1 here); the results give the blocks no test image fine-tunes
  and the parameter count with their trainable copies dropped;
* ``stochastic``: stochastic fine-tuning, a fixed random 50% of the routed blocks
  fine-tuned (the others use the frozen copies; mask from the seed-0 draw);
* ``random_policy``: the paper's random policy: the last 3 routed blocks always
  fine-tuned, the others Bernoulli(0.5) per image, in training and at test.

The policy network is a ResNet with 3 blocks of 64/128/256 channels on the image resized to
64 px, trained in the same jitted step as the model; its own learning rate is the shared
schedule times ``policy_lr_mult`` (its own parameter group; momentum and schedule shape shared).
Expected numbers (``spottune.py:5``, one seed, 10 epochs, Lite0 at 64 px, 84 min on 2 CPU
cores), test top-1 %: finetune 81.60, feature_extractor 80.93, last_1 69.50, last_2
77.52, last_3 77.97, spottune 80.44 (2.77 fine-tuned blocks per image), global_k 83.37,
stochastic 83.15, random_policy 82.11 (``experiments/results/spottune_5/``).
"""

from experiments.configs import default
from ftjax.methods import spottune as st

POLICY = {"policy_depth": 3, "policy_width": 64, "policy_image_size": 64, "temperature": 5.0}


def get_config(arg: str = ""):
  parts = [p for p in arg.split(",") if p] if arg else []
  c = default.get_config()
  c.dataset.sampling_rate = float(parts[0]) if parts else 5.0
  if len(parts) > 1:
    c.model = parts[1]
    if not c.pretrained.startswith(c.model + "/"):
      c.pretrained = ""
  num_routed = len(st.routed_block_names(c.model))
  ce = {"weight": 1.0}

  def spottune(**options):
    # The method owns the rules of its frozen copies and policy (the policy's group:
    # policy_lr_mult, here 1.0); the finetune baseline covers the rest.
    return {"losses": {"ce": dict(ce), "spottune": dict(POLICY, **options)}}

  c.compare = {
      "finetune": {"baseline": "finetune", "losses": {"ce": dict(ce)}},
      "feature_extractor": {"baseline": "linear_probe", "losses": {"ce": dict(ce)}},
      "last_1": {"baseline": "last_k", "last_k": 1, "losses": {"ce": dict(ce)}},
      "last_2": {"baseline": "last_k", "last_k": 2, "losses": {"ce": dict(ce)}},
      "last_3": {"baseline": "last_k", "last_k": 3, "losses": {"ce": dict(ce)}},
      "spottune": spottune(),
      "global_k": spottune(lambda1=1.0, lambda2=1.0, k=min(3, num_routed)),
      "stochastic": spottune(train_routing="fixed", eval_routing="fixed",
                             routing_mask=st.random_block_mask(num_routed, fraction=0.5, seed=0)),
      "random_policy": spottune(train_routing="random", eval_routing="random",
                                random_finetune_last=min(3, num_routed)),
  }
  return c

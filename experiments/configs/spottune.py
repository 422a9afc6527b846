r"""SpotTune, the Table 2 protocol (SpotTune vs. fine-tuning baselines) on any TFDS dataset.

  .venv/bin/python -m experiments.train --config experiments/configs/spottune.py:5 --workdir runs/spottune_5

The argument is the sampling rate in percent (default 5). Model, data and optimizer are
those of ``default.py`` (ImageNet EfficientNet-Lite0 on Fashion-MNIST at 64 px);
``--config.dataset.name=...`` picks the dataset, ``spottune.py:5,resnet26`` uses a
ResNet (from scratch weights unless ``--config.pretrained`` names one).

SpotTune doubles every block of the base (the paper: "we *freeze* the original block F_l
and create a new *trainable* block F̂_l" for every residual block of its ResNets): the 16
MBConv blocks of Lite0, residual or not (a block and its copy have the same output
shape, so Eq. 2's mix is defined for a downsampling block too), every residual block of
a ResNet. Rows (``compare``):

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
  fine-tuned (8 of Lite0's 16; the others use the frozen copies; mask from the seed-0
  draw, half rounded up for an odd count);
* ``random_policy``: the paper's random policy: the last 3 routed blocks always
  fine-tuned, the others Bernoulli(0.5) per image, in training and at test (fresh
  decisions for every test image: the key is folded with a hash of the image).

What trains besides the trainable copies follows the authors' code where the paper is
silent (``gyhui14/spottune``, ``main.py``; :func:`ftjax.methods.spottune.spottune_param_rules`):

    # freeze the original blocks
    flag = True
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d) and 'parallel_blocks' not in name:
            if flag is True:
                flag = False
            else:
                m.weight.requires_grad = False

i.e. every convolution outside the trainable copies is frozen except the first (the
stem conv trains; the frozen copies' convolutions and Lite's head conv are frozen), and
only convolutions: the BatchNorm layers everywhere (frozen copies included) train their
γ, β with the network's optimizer (``optim.SGD(filter(lambda p: p.requires_grad,
net.parameters()), ...)``) and, with ``net.train()``, normalise by batch statistics in
training (the frozen copies' running statistics are re-estimated too). The policy (the
authors' ``agent``) has its own optimizer, ``optim.SGD(agent.parameters(), lr=args.lr_agent,
momentum=0.9, weight_decay=0.001)`` with ``lr_agent`` 0.01 against the network's ``lr``
0.1: here ``policy_lr_mult=0.1``, ``policy_weight_decay=1e-3`` (momentum and the schedule's
shape are shared). A policy that no training step runs (``stochastic``,
``random_policy``) and the copies a fixed mask never uses are frozen, so
``trainable_parameters`` counts what training can change. The policy network is a ResNet
with 3 blocks of 64/128/256 channels on the image resized to 64 px.

Trainable parameters per row (Lite0, 10 classes; ``trainable_parameters`` in results):
    row                 trainable    of total
    feature_extractor      12,810   3,383,818  (head)
    finetune            3,383,818   3,383,818
    last_1 / 2 / 3        424,970 / 1,030,410 / 1,506,570 of 3,383,818
    spottune, global_k  4,251,082   7,579,210  trainable copies 2,957,920 + stem conv and BN
                                               928 + head BN 2,560 + frozen copies' BN
                                               39,392 + head 12,810 + policy 1,237,472;
                                               frozen: the copies' convolutions 2,918,528
                                               and the head conv 409,600
    stochastic            603,210   7,579,210  (the 8 chosen copies, no policy)
    random_policy       2,998,378   7,579,210  (no policy; the last 3 blocks' frozen
                                               copies are never run)

Global-k's compact size (its unused copies dropped) is in ``spottune_parameters_pruned``.

Before these fixes only Lite0's 9 residual blocks were routed, the frozen copies'
BatchNorm ran on pretrained statistics and the policy used the network's learning rate
and weight decay.
Expected numbers: ``experiments/results/spottune_5/results_table.md``, three seeds at
hyper-parameters chosen on validation (``python -m experiments.evidence tables`` writes it
from the study's ledger; rows the study has not finished are empty there), and the
claims in ``experiments/results/README.md``. Earlier single-seed numbers, from before
the fixes of issue 23: ``experiments/results/HISTORY.md``.
"""

from experiments.configs import default
from ftjax.methods import spottune as st

# The policy network (paper: ResNet of 64/128/256 channels for the Decathlon) and its own
# learning rate and weight decay (authors' code: lr_agent 0.01 vs lr 0.1; weight_decay 0.001).
POLICY = {"policy_depth": 3, "policy_width": 64, "policy_image_size": 64, "temperature": 5.0,
          "policy_lr_mult": 0.1, "policy_weight_decay": 1e-3}


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
    # The method owns the rules of its frozen copies, policy and the convolutions the
    # authors' code freezes; the finetune baseline covers the rest.
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

"""SpotTune (Guo et al., CVPR 2019): adaptive per-image fine-tuning, and its Global-k variant.

The model does the routing (:mod:`ftjax.methods.spottune.model`: frozen and trainable
copies of each routed block, a policy network, straight-through Gumbel-softmax
in training); the classification loss is the ``ce`` component. This component
adds the Global-k terms of Eq. 7, ``λ1 · l_k + λ2 · l_e`` (Eq. 5 and 6), on the
model's ``policy`` output, and reports how the policy routes::

  losses = {"ce": {"weight": 1.0}, "spottune": {}}                                   # SpotTune
  losses = {"ce": {"weight": 1.0}, "spottune": {"lambda1": 1.0, "lambda2": 1.0, "k": 3}}  # Global-k

With ``lambda1 = lambda2 = 0`` (plain SpotTune) the term is exactly 0.

How the model reaches the trainer: the method also carries the SpotTune
model options (policy depth/width/input size, temperature, routings, mask). The
trainer calls :meth:`SpotTune.wrap_model` right after building the plain
(pretrained) model; it returns the SpotTune model and variables built from it
(:func:`ftjax.methods.spottune.model.spottune_variables_from_pretrained`). The method
owns the rules of the parameters it adds and of those the authors' code freezes
(:func:`ftjax.methods.spottune.model.spottune_param_rules`: the frozen copies'
and the unrouted layers' convolutions except the stem's in group ``frozen``, the
frozen copies' BatchNorm γ, β in ``backbone``, the policy network in ``policy``
with its own learning-rate multiplier ``policy_lr_mult`` and weight decay
``policy_weight_decay``); the baseline's rules cover the trainable copies, the
stem, the remaining BatchNorm layers and the heads. It needs BatchNorm mode ``train`` and the
``gumbel`` rng stream. After the test evaluation :meth:`SpotTune.finalize` routes the test split,
records the accuracy of each inference routing, writes the decisions and the
paper's Fig. 3 and Fig. 4, and the parameter count with the unused fine-tuned
blocks dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.losses.spottune import block_usage, global_k_loss, policy_entropy_loss
from ftjax.core.batches import collect
from ftjax.core.errors import ConfigError
from ftjax.core.io import save_npy
from ftjax.methods.base import Method, RunContext, TermOutput
from ftjax.methods.spottune import model as model_lib
from ftjax.methods.spottune import plots
from ftjax.methods.spottune.model import (SpotTuneClassifier, _static_mask, create_spottune_model,
                                          spottune_variables_from_pretrained)


@dataclasses.dataclass(frozen=True)
class SpotTune(Method):
  """Global-k terms on the ``policy`` output, routing metrics, and the SpotTune model options.

  Attributes:
    weight: multiplier of the whole term in the step's sum.
    lambda1: λ1 of Eq. 7, weight of ``l_k`` (Eq. 5); 0 = plain SpotTune.
    lambda2: λ2 of Eq. 7, weight of ``l_e`` (Eq. 6).
    k: the number of blocks every image should fine-tune (paper: 3).
    policy_depth: residual blocks of the policy ResNet.
    policy_width: channels of the policy's first block (doubling per block).
    policy_image_size: input size of the policy (0 = the image as given).
    temperature: Gumbel-softmax temperature (reference code: 5).
    train_routing: routing in training (``"gumbel"``, or a baseline: ``"random"``,
      ``"fixed"``, ``"all_frozen"``, ``"all_finetuned"``).
    eval_routing: routing in evaluation (``"argmax"`` deterministic, ``"sample"``,
      or as above); recorded in the results.
    routing_mask: 0/1 per routed block for the ``"fixed"`` routing (``()`` = none).
    random_finetune_last: the ``"random"`` routing always fine-tunes these last blocks.
    prune_threshold: blocks used by at most this fraction of test images count as
      unused in :meth:`finalize` (0 = no image).
    first_routed_block: routing starts at this routable block; the stem and the
      blocks before it are frozen and not routed (Visual Decathlon ResNet-26: 4).
    policy_lr_mult: learning-rate multiplier of the policy network's group (the
      authors' code: ``lr_agent`` 0.01 against the network's ``lr`` 0.1, i.e. 0.1).
    policy_weight_decay: weight decay of the policy group (None: the optimizer's;
      the authors' code: 0.001).
    train_frozen_bn: the frozen copies' BatchNorm trains γ, β and normalises by
      batch statistics in training, as in the authors' code (True); False: it
      stays as pretrained (the paper's "left unchanged").

  Example:
    >>> st = SpotTune(lambda1=1.0, lambda2=1.0, k=3)
    >>> decisions = jnp.array([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]])   # [images, blocks]
    >>> term = st(outputs={"policy": decisions}, batch={}, state=(), params=None, rng=None)
    >>> float(term.metrics["finetuned_blocks"])
    2.5
  """
  weight: float = 1.0
  lambda1: float = 0.0
  lambda2: float = 0.0
  k: float = 3.0
  policy_depth: int = 3
  policy_width: int = 64
  policy_image_size: int = 64
  temperature: float = 5.0
  train_routing: Any = "gumbel"
  eval_routing: Any = "argmax"
  routing_mask: tuple[int, ...] = ()
  random_finetune_last: int = 0
  prune_threshold: float = 0.0
  first_routed_block: int = 0
  policy_lr_mult: float = 1.0
  policy_weight_decay: float | None = None
  train_frozen_bn: bool = True
  name: str = "spottune"
  outputs: tuple[str, ...] = ("policy",)
  bn_mode: str = "train"
  rng_streams: tuple[str, ...] = ("gumbel",)

  def __post_init__(self):
    for field in ("weight", "lambda1", "lambda2", "k", "prune_threshold", "first_routed_block"):
      if getattr(self, field) < 0:
        raise ValueError(f"spottune {field} must be >= 0, got {getattr(self, field)}")
    if not self.temperature > 0:
      raise ValueError(f"spottune temperature must be > 0, got {self.temperature}")
    for routing in (self.train_routing, self.eval_routing):
      if isinstance(routing, str) and routing != "fixed":
        _static_mask(routing, None, 1)  # raises on an unknown name

  def routing_options(self) -> dict[str, Any]:
    """Keyword arguments of :func:`ftjax.methods.spottune.model.create_spottune_model`."""
    return dict(policy_depth=self.policy_depth, policy_width=self.policy_width,
                policy_image_size=self.policy_image_size, temperature=self.temperature,
                train_routing=self.train_routing, eval_routing=self.eval_routing,
                routing_mask=tuple(self.routing_mask) or None,
                random_finetune_last=self.random_finetune_last,
                first_routed_block=self.first_routed_block, train_frozen_bn=self.train_frozen_bn)

  def param_rules(self, *, variables: Any) -> list[tuple[str, str]]:
    """The policy, the frozen copies and the convolutions the authors' code freezes (see the model)."""
    if variables is None:
      raise ConfigError("spottune needs the SpotTune model's variables to find the parameters it owns")
    return model_lib.spottune_param_rules(variables, train_frozen_bn=self.train_frozen_bn,
                                          train_routing=self.train_routing,
                                          routing_mask=tuple(self.routing_mask) or None,
                                          random_finetune_last=self.random_finetune_last)

  def param_groups(self) -> dict[str, dict[str, Any]]:
    policy: dict[str, Any] = {"lr_mult": float(self.policy_lr_mult)}
    if self.policy_weight_decay is not None:
      policy["weight_decay"] = float(self.policy_weight_decay)
    # "backbone": the frozen copies' BatchNorm trains with the network (its lr and decay).
    return {"frozen": {"frozen": True}, "policy": policy, "backbone": {}}

  def wrap_model(self, *, model: Any, variables: Any, rng: jax.Array) -> tuple[Any, Any]:
    """The SpotTune model over ``model`` and its variables (frozen + trainable copies, new policy).

    Args:
      model: the plain :class:`ftjax.models.ImageClassifier` (pretrained weights in
        ``variables``); a SpotTune model is returned unchanged.
      variables: its variables.
      rng: key of the policy initialisation.
    """
    if isinstance(model, SpotTuneClassifier):
      return model, variables
    if getattr(model, "projection_dim", 0):
      raise ValueError("spottune does not support a model with a projector (projection_dim > 0)")
    spot = create_spottune_model(model.model_name, num_classes=model.num_classes,
                                 keep_source_head=model.keep_source_head,
                                 num_source_classes=model.num_source_classes,
                                 dtype=getattr(model, "dtype", "float32"), **self.routing_options())
    return spot, spottune_variables_from_pretrained(spot, variables, rng=rng)

  def prepare(self, context: RunContext) -> "SpotTune":
    if context.bn_mode != "train":
      raise ValueError("spottune needs bn_mode 'train' (or ''): the step runs the model with train=False "
                       "in 'eval' mode, which would train with the evaluation routing")
    return self

  def init_state(self, *, variables: Any, rng: jax.Array) -> tuple:
    del rng
    if "policy" not in variables["params"] and "frozen_backbone" not in variables["params"]:
      raise ValueError("spottune needs a SpotTune model (no 'frozen_backbone' / 'policy' parameters "
                       "found): build it with create_spottune_model or let the trainer call wrap_model")
    return ()

  def __call__(self, *, outputs, batch, state, params, rng, source=None) -> TermOutput:
    del batch, params, rng, source
    decisions = outputs["policy"]
    if decisions.ndim != 2:
      raise ValueError(f"spottune needs the policy output [batch, blocks], got shape {decisions.shape}")
    loss = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    if self.lambda1:
      l_k = global_k_loss(decisions=decisions, k=self.k)
      loss = loss + self.lambda1 * l_k
      metrics["global_k"] = l_k
    if self.lambda2:
      l_e = policy_entropy_loss(decisions=decisions)
      loss = loss + self.lambda2 * l_e
      metrics["entropy"] = l_e
    hard = jax.lax.stop_gradient(decisions)
    metrics["finetuned_blocks"] = jnp.mean(jnp.sum(hard, axis=1))
    for j, v in enumerate(block_usage(decisions=hard)):
      metrics[f"usage/{j}"] = v
    return TermOutput(loss=loss, state=state, metrics=metrics)

  # --------------------------------------------------------------------------- after training

  def route(self, *, model: Any, variables: Any, dataset: Any, split: str, batch_size: int,
            routing: Any = None, seed: int = 0) -> tuple[np.ndarray, float]:
    """Decisions ``[N, L]`` and top-1 accuracy of ``split`` under ``routing`` (None: the model's eval one).

    Single process (the host's part of the split); sampled routings use keys
    ``fold_in(PRNGKey(seed), batch_index)``.
    """
    apply = jax.jit(lambda v, images, key: model.apply(v, images, train=False, outputs=("logits", "policy"),
                                                       routing=routing, rngs={"gumbel": key}))
    out, labels = collect(
        lambda batch, i: apply(variables, batch["image"], jax.random.fold_in(jax.random.PRNGKey(seed), i)),
        dataset.eval_batches(split, batch_size=batch_size))
    correct = float(np.sum(np.argmax(out["logits"], -1) == labels))
    return out["policy"], correct / max(float(len(labels)), 1.0)

  def finalize(self, context: RunContext) -> dict[str, Any]:
    """Routes the test split; writes decisions, Fig. 3 / Fig. 4 and the pruned size; returns results.

    Returns:
      ``spottune_eval_routing``, ``spottune_test_top1/<routing>`` for the eval
      routing and for ``argmax``/``sample``/``all_finetuned`` (the paper's
      "running fine-tuned blocks" variant), the mean number of fine-tuned blocks,
      the per-block usage, the unused blocks and the parameter counts with them
      dropped, and the files written.
    """
    if jax.process_count() > 1:
      logging.warning("spottune: finalize runs on one process only; skipped")
      return {}
    model, variables, dataset, workdir = context.model, context.variables, context.dataset, context.workdir
    batch_size, seed = int(context.eval_batch_size), int(context.seed)
    eval_routing = model.eval_routing
    decisions, top1 = self.route(model=model, variables=variables, dataset=dataset, split="test",
                                 batch_size=batch_size, routing=eval_routing, seed=seed)
    name = lambda r: r if isinstance(r, str) else "mask"
    results: dict[str, Any] = {"spottune_eval_routing": name(eval_routing),
                               f"spottune_test_top1/{name(eval_routing)}": top1}
    for routing in ("argmax", "sample", "all_finetuned"):
      if routing != eval_routing:
        results[f"spottune_test_top1/{routing}"] = self.route(
            model=model, variables=variables, dataset=dataset, split="test", batch_size=batch_size,
            routing=routing, seed=seed)[1]
    blocks = list(model.routed_blocks)
    size = model_lib.pruned_size(jax.device_get(variables["params"]), decisions, blocks,
                          threshold=self.prune_threshold)
    npy = save_npy(os.path.join(workdir, "spottune_decisions.npy"), decisions.astype(np.uint8))
    fig3 = plots.plot_block_usage(decisions, os.path.join(workdir, "spottune_block_usage.png"),
                               block_names=blocks)
    fig4 = plots.plot_finetuned_histogram(decisions, os.path.join(workdir, "spottune_finetuned_blocks.png"))
    results.update({
        "spottune_finetuned_blocks_mean": float(decisions.sum(axis=1).mean()),
        "spottune_block_usage": list(size.usage),
        "spottune_unused_blocks": list(size.unused_blocks),
        "spottune_parameters_total": size.total,
        "spottune_parameters_pruned": size.pruned,
        "spottune_parameters_pruned_without_policy": size.pruned_without_policy,
        "spottune_files": [npy, fig3, fig4],
    })
    return results

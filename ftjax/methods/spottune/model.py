"""SpotTune's model (Guo et al., CVPR 2019): per-image routing between frozen and fine-tuned blocks.

Every *routed* block ``l`` exists twice: a frozen copy ``F_l`` (the pretrained
block, BatchNorm always on its running statistics) and a trainable copy ``F̂_l``
initialised from the same weights. A small ResNet, the *policy network*, looks at
the image and gives logits ``[B, L, 2]`` (category 1 = fine-tuned); the decision
``I_l(x)`` picks the block (Eq. 2)::

  x_l = I_l(x) · F̂_l(x_{l-1}) + (1 - I_l(x)) · F_l(x_{l-1})

where each copy is the whole block as the base model defines it (its residual
shortcut, a projection shortcut at a downsampling block, and the final
activation included; with hard decisions this is exactly Eq. 2).

Routed blocks: every residual block of a ResNet (any depth, basic or
bottleneck), and the residual MBConv blocks (stride 1, equal channels) of an
EfficientNet-Lite; the other Lite blocks, the stems and Lite's head conv exist
once (trainable, under ``backbone``). With ``first_routed_block=i > 0`` routing
starts at the i-th of those blocks and everything before it (the stem and every
earlier block) is a frozen, unrouted feature extractor: the paper's Visual
Decathlon setting, where the first macro block (4 residual blocks) of ResNet-26
is frozen and only the later blocks are routed.

Parameter layout (``params`` and ``batch_stats``):

* ``backbone/...``: exactly the plain model's backbone names (stem, every block,
  Lite's head conv): the trainable copies, so pretrained weights and
  :func:`ftjax.models.block_prefixes` apply unchanged;
* ``frozen_backbone/<block>/...``: the frozen copies of the routed blocks;
  with ``first_routed_block > 0`` also the frozen prefix (``stem_conv``,
  ``stem_bn`` and the blocks before the first routed one), which then exists
  only here, not under ``backbone``;
* ``policy/...``: the policy network; ``head`` (and ``source_head``) as usual.

Routing (``routing=`` call argument, else the model's ``train_routing`` when
``train=True`` and ``eval_routing`` otherwise):

* ``"gumbel"``: training; straight-through Gumbel-softmax sample (hard forward,
  soft gradient), temperature ``temperature``; needs the ``"gumbel"`` rng;
* ``"sample"``: inference, a hard sample of the policy (``"gumbel"`` rng);
* ``"argmax"``: deterministic inference, the policy's more likely decision;
* ``"all_frozen"`` / ``"all_finetuned"``: every image takes the frozen /
  trainable copy (the policy is not run unless ``policy_logits`` is asked for);
* ``"random"``: Bernoulli(0.5) per image and block (the random-policy baseline;
  the last ``random_finetune_last`` routed blocks are always fine-tuned, as the
  paper's baseline does with 3); ``"gumbel"`` rng;
* ``"fixed"`` (with the ``routing_mask`` attribute) or a sequence of 0/1 per
  routed block: one fixed mask for every image (stochastic fine-tuning, or a
  Global-k model with its unused blocks dropped).

Static masks (``all_frozen``, ``all_finetuned``, fixed) compute only the chosen
copy of each block; the others compute both copies and mix them.

Example:
  >>> from ftjax.models import create_model
  >>> model = create_spottune_model("resnet_tiny", num_classes=10, policy_depth=1, policy_width=8)
  >>> plain = create_model("resnet_tiny", num_classes=10)
  >>> plain_vars = plain.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  >>> variables = spottune_variables_from_pretrained(model, plain_vars, rng=jax.random.key(1))
  >>> out = model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=False,
  ...                   outputs=("logits", "policy"))
  >>> out["policy"].shape
  (2, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.losses.spottune import gumbel_softmax
from ftjax.models.efficientnet_lite import (EFFICIENTNET_SPECS, LITE_MEAN, LITE_STD, EfficientNetBackbone,
                                            EfficientNetSpec)
from ftjax.models.layers import (BatchNorm, Conv, classifier_outputs, head_kernel_init, normalize_pixels,
                                 symmetric_padding)
from ftjax.models.resnet import (IMAGENET_MEAN, IMAGENET_STD, RESNET_SPECS, ResidualBlock, ResNetBackbone,
                                 ResNetSpec)

SPOTTUNE_OUTPUTS = ("features", "logits", "source_logits", "feature_maps", "policy", "policy_logits")
ROUTING_MODES = ("gumbel", "sample", "argmax", "all_frozen", "all_finetuned", "random", "fixed")
# Modes whose decisions depend on the image or on noise (both copies are computed).
DYNAMIC_MODES = ("gumbel", "sample", "argmax", "random")
RNG_MODES = ("gumbel", "sample", "random")
GUMBEL_RNG = "gumbel"


# ----------------------------------------------------------------------------- architecture


def _spec(base_name: str) -> ResNetSpec | EfficientNetSpec:
  if base_name in RESNET_SPECS:
    return RESNET_SPECS[base_name]
  if base_name in EFFICIENTNET_SPECS:
    return EFFICIENTNET_SPECS[base_name]
  known = ", ".join(tuple(RESNET_SPECS) + tuple(EFFICIENTNET_SPECS))
  raise ValueError(f"unknown SpotTune base model {base_name!r}; known: {known}")


def block_names(base_name: str) -> list[str]:
  """All blocks of the base backbone, input to output (``stage1_block0``..., ``blocks_0``...)."""
  return list(_spec(base_name).block_names())


def routed_block_names(base_name: str) -> list[str]:
  """The blocks SpotTune doubles: every ResNet block; the residual MBConv blocks of a Lite.

  Example:
    >>> routed_block_names("efficientnet_tiny")
    ['blocks_0', 'blocks_2']
  """
  spec = _spec(base_name)
  if isinstance(spec, ResNetSpec):
    return list(spec.block_names())
  names, channels = [], spec.stem_channels
  for i, block in enumerate(spec.blocks):
    if block.stride == 1 and block.out_channels == channels:
      names.append(f"blocks_{i}")
    channels = block.out_channels
  return names


def _backbone(spec: ResNetSpec | EfficientNetSpec, *, name: str) -> nn.Module:
  """The base model's backbone (its stem, blocks and head conv callable one by one), named ``name``."""
  cls = ResNetBackbone if isinstance(spec, ResNetSpec) else EfficientNetBackbone
  return cls(spec, name=name)


class PolicyNetwork(nn.Module):
  """A small ResNet giving the freeze / fine-tune logits ``[B, num_blocks, 2]``.

  The normalised image is first resized to ``image_size`` (0 = as given); then a
  3x3 stem of ``width`` channels and ``depth`` basic residual blocks of widths
  ``width * 2**i``, each of stride 2 (as the stages of the Visual Decathlon
  ResNet-26), global average pooling and a linear layer.
  The paper's policies: ResNet with 4 blocks of 64/128/256/512 channels (its
  Table 2) and 3 blocks of 64/128/256 (Visual Decathlon), i.e. ``width=64`` and
  ``depth=4`` or ``3``.

  Example:
    >>> logits, _ = PolicyNetwork(num_blocks=5, depth=1, width=8, image_size=16).init_with_output(
    ...     jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
    >>> logits.shape
    (2, 5, 2)
  """

  num_blocks: int
  depth: int = 3
  width: int = 64
  image_size: int = 64
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.image_size and (x.shape[1], x.shape[2]) != (self.image_size, self.image_size):
      x = jax.image.resize(x, (x.shape[0], self.image_size, self.image_size, x.shape[3]), "linear",
                           antialias=True)
    x = Conv(self.width, (3, 3), padding=symmetric_padding(3), name="stem_conv")(x)
    x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=self.bn_epsilon,
                     name="stem_bn")(x)
    x = nn.relu(x)
    for i in range(self.depth):
      x = ResidualBlock(self.width * 2**i, 2, False, self.bn_epsilon,
                        name=f"block{i}")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(2 * self.num_blocks, kernel_init=head_kernel_init, name="logits")(x)
    return logits.reshape(x.shape[0], self.num_blocks, 2)


# ----------------------------------------------------------------------------- the model


def _static_mask(routing: Any, routing_mask: Sequence[int] | None, num_blocks: int) -> tuple[int, ...] | None:
  """The per-block 0/1 mask of a static routing, or None for a dynamic one."""
  if isinstance(routing, str):
    if routing not in ROUTING_MODES:
      raise ValueError(f"unknown SpotTune routing {routing!r}; known: {', '.join(ROUTING_MODES)}, "
                       "or a sequence of 0/1 per routed block")
    if routing in DYNAMIC_MODES:
      return None
    if routing == "all_frozen":
      return (0,) * num_blocks
    if routing == "all_finetuned":
      return (1,) * num_blocks
    if routing_mask is None:
      raise ValueError("SpotTune routing 'fixed' needs the model's routing_mask (0/1 per routed block)")
    routing = routing_mask
  mask = tuple(int(v) for v in np.asarray(routing).reshape(-1))
  if len(mask) != num_blocks or any(v not in (0, 1) for v in mask):
    raise ValueError(f"a SpotTune routing mask needs {num_blocks} values of 0 or 1 (one per routed "
                     f"block), got {tuple(np.asarray(routing).reshape(-1).tolist())}")
  return mask


class SpotTuneClassifier(nn.Module):
  """A base backbone with frozen and trainable copies of its routed blocks, a policy and heads.

  Called like :class:`ftjax.models.ImageClassifier` (raw ``[0, 255]`` NHWC pixels,
  ``train=``, ``outputs=``) plus an optional ``routing=``; returns a dict with the
  requested outputs among ``features``, ``logits``, ``source_logits``,
  ``feature_maps`` and

  * ``policy``: ``[B, L]`` float decisions ``I_l(x)`` (1 = fine-tuned copy); in
    ``"gumbel"`` mode they carry the straight-through gradient;
  * ``policy_logits``: ``[B, L, 2]`` logits of the policy network.

  Build it with :func:`create_spottune_model`; the attributes are documented there.
  """

  base_name: str
  num_classes: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  policy_depth: int = 3
  policy_width: int = 64
  policy_image_size: int = 64
  temperature: float = 5.0
  train_routing: Any = "gumbel"
  eval_routing: Any = "argmax"
  routing_mask: tuple[int, ...] | None = None
  random_finetune_last: int = 0
  keep_source_head: bool = False
  num_source_classes: int = 1000
  min_image_size: int = 32
  first_routed_block: int = 0

  @property
  def model_name(self) -> str:
    return f"spottune_{self.base_name}"

  @property
  def routed_blocks(self) -> tuple[str, ...]:
    return tuple(routed_block_names(self.base_name)[self.first_routed_block:])

  @property
  def frozen_prefix(self) -> tuple[str, ...]:
    """Blocks before the first routed block (frozen, not routed); empty when routing starts at 0."""
    if not self.first_routed_block:
      return ()
    names = block_names(self.base_name)
    return tuple(names[:names.index(self.routed_blocks[0])])

  @property
  def all_outputs(self) -> tuple[str, ...]:
    """Every output this model can produce (init with these to get all parameters)."""
    return tuple(n for n in SPOTTUNE_OUTPUTS if n != "source_logits" or self.keep_source_head)

  def _check_inputs(self, images: jax.Array, outputs: Sequence[str]) -> None:
    if isinstance(outputs, str):
      raise ValueError(f"outputs must be a sequence of names, got the string {outputs!r}")
    for name in outputs:
      if name not in SPOTTUNE_OUTPUTS:
        raise ValueError(f"unknown output {name!r} of {self.model_name}; known: {', '.join(SPOTTUNE_OUTPUTS)}")
      if name == "source_logits" and not self.keep_source_head:
        raise ValueError(f"output 'source_logits' requested but {self.model_name} was created with "
                         "keep_source_head=False")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be NHWC with 3 channels, got shape {tuple(images.shape)}")
    size = min(images.shape[1], images.shape[2])
    if size < self.min_image_size:
      raise ValueError(f"image size {size} is too small for {self.model_name}; minimum {self.min_image_size}")

  def _decisions(self, mode: str, policy_logits: jax.Array | None, batch: int) -> jax.Array:
    num_blocks = len(self.routed_blocks)
    if mode in RNG_MODES and not self.has_rng(GUMBEL_RNG):
      raise ValueError(f"SpotTune routing {mode!r} needs randomness: call model.apply(..., "
                       f"rngs={{'{GUMBEL_RNG}': key}})")
    if mode == "gumbel":
      sample = gumbel_softmax(self.make_rng(GUMBEL_RNG), policy_logits, temperature=self.temperature, hard=True)
      return sample[..., 1]
    if mode == "sample":
      noise = jax.random.gumbel(self.make_rng(GUMBEL_RNG), policy_logits.shape, jnp.float32)
      return jnp.argmax(policy_logits.astype(jnp.float32) + noise, axis=-1).astype(jnp.float32)
    if mode == "argmax":
      return jnp.argmax(policy_logits, axis=-1).astype(jnp.float32)
    # random
    decisions = jax.random.bernoulli(self.make_rng(GUMBEL_RNG), 0.5, (batch, num_blocks)).astype(jnp.float32)
    keep = min(int(self.random_finetune_last), num_blocks)
    if keep:
      decisions = decisions.at[:, num_blocks - keep:].set(1.0)
    return decisions

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, outputs: Sequence[str] = ("logits",),
               routing: Any = None) -> dict[str, jax.Array]:
    self._check_inputs(images, outputs)
    routed = self.routed_blocks
    mode = routing if routing is not None else (self.train_routing if train else self.eval_routing)
    static = _static_mask(mode, self.routing_mask, len(routed))
    batch = images.shape[0]
    x = normalize_pixels(images, self.mean, self.std)

    policy_logits = None
    if static is None and mode != "random" or "policy_logits" in outputs:
      policy_logits = PolicyNetwork(len(routed), self.policy_depth, self.policy_width,
                                    self.policy_image_size, name="policy")(x, train=train)
    if static is None:
      decisions = self._decisions(mode, policy_logits, batch)
    else:
      decisions = jnp.broadcast_to(jnp.asarray(static, jnp.float32), (batch, len(routed)))

    backbone = _backbone(_spec(self.base_name), name="backbone")
    frozen = _backbone(_spec(self.base_name), name="frozen_backbone")
    prefix = self.frozen_prefix
    # A frozen prefix (stem and the blocks before the first routed one) runs the
    # frozen copy on its running statistics, like every frozen block.
    x = frozen.stem(x, train=False) if prefix else backbone.stem(x, train=train)
    feature_maps = {}
    for name in block_names(self.base_name):
      if name in prefix:
        x = frozen.block(name, x, train=False)
      elif name not in routed:
        x = backbone.block(name, x, train=train)
      else:
        j = routed.index(name)
        if static is not None:
          # Only the chosen copy runs; the frozen one always on running statistics.
          x = backbone.block(name, x, train=train) if static[j] else frozen.block(name, x, train=False)
        else:
          fine = backbone.block(name, x, train=train)
          kept = frozen.block(name, x, train=False)
          choice = decisions[:, j].astype(fine.dtype).reshape(batch, 1, 1, 1)
          x = choice * fine + (1.0 - choice) * kept
      feature_maps[name] = x
    x = backbone.head(x, train=train)
    if backbone.head_map:
      feature_maps[backbone.head_map] = x
    features = jnp.mean(x, axis=(1, 2))

    return classifier_outputs(outputs, features=features, feature_maps=feature_maps,
                              num_classes=self.num_classes, num_source_classes=self.num_source_classes,
                              extra={"policy": decisions, "policy_logits": policy_logits})


def create_spottune_model(
    base_name: str,
    *,
    num_classes: int,
    policy_depth: int = 3,
    policy_width: int = 64,
    policy_image_size: int = 64,
    temperature: float = 5.0,
    train_routing: Any = "gumbel",
    eval_routing: Any = "argmax",
    routing_mask: Sequence[int] | None = None,
    random_finetune_last: int = 0,
    keep_source_head: bool = False,
    num_source_classes: int = 1000,
    first_routed_block: int = 0,
) -> SpotTuneClassifier:
  """Builds a :class:`SpotTuneClassifier` over a ResNet or EfficientNet-Lite by name.

  Args:
    base_name: a ResNet (``resnet18``, ``resnet26``, ``resnet50``, ``resnet_tiny``)
      or EfficientNet-Lite (``efficientnet_lite0``, ``efficientnet_tiny``).
    num_classes: width of the target ``head``.
    policy_depth: residual blocks of the policy ResNet (paper: 4 for Table 2, 3 for
      the Visual Decathlon).
    policy_width: channels of its first block (doubling per block; paper: 64).
    policy_image_size: the policy sees the image resized to this size (0 = as given).
    temperature: τ of the training Gumbel-softmax (reference code: 5).
    train_routing: routing with ``train=True`` (default ``"gumbel"``); see the module doc.
    eval_routing: routing with ``train=False`` (default ``"argmax"``, deterministic;
      ``"sample"`` needs a ``"gumbel"`` rng).
    routing_mask: 0/1 per routed block for the ``"fixed"`` routing.
    random_finetune_last: in ``"random"`` routing, these last routed blocks are
      always fine-tuned (the paper's random-policy baseline: 3).
    keep_source_head: also build ``source_head``.
    num_source_classes: width of ``source_head``.
    first_routed_block: routing starts at this index of
      :func:`routed_block_names`; the stem and every block before it are frozen
      and not routed (``frozen_backbone``, running BatchNorm statistics). The
      paper's Visual Decathlon ResNet-26: 4 (its first macro block frozen).

  Returns:
    An unbound Linen module; input is NHWC raw pixels in ``[0, 255]``.

  Example:
    >>> model = create_spottune_model("resnet26", num_classes=10, policy_depth=3, policy_width=64)
    >>> len(model.routed_blocks)
    12
    >>> len(create_spottune_model("resnet26", num_classes=10, first_routed_block=4).routed_blocks)
    8
  """
  spec = _spec(base_name)
  if num_classes < 1 or num_source_classes < 1:
    raise ValueError(f"num_classes and num_source_classes must be >= 1, got {num_classes}, {num_source_classes}")
  if policy_depth < 1 or policy_width < 1:
    raise ValueError(f"policy_depth and policy_width must be >= 1, got {policy_depth}, {policy_width}")
  if policy_image_size < 0 or 0 < policy_image_size < 8:
    raise ValueError(f"policy_image_size must be 0 (as given) or >= 8, got {policy_image_size}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  routable = len(routed_block_names(base_name))
  if not 0 <= int(first_routed_block) < routable:
    raise ValueError(f"first_routed_block must be in [0, {routable}) for {base_name} ({routable} routable "
                     f"blocks), got {first_routed_block}")
  num_routed = routable - int(first_routed_block)
  mask = None if routing_mask is None else tuple(int(v) for v in routing_mask)
  for routing in (train_routing, eval_routing):
    _static_mask(routing if isinstance(routing, str) else tuple(routing), mask, num_routed)
  if not 0 <= random_finetune_last <= num_routed:
    raise ValueError(f"random_finetune_last must be in [0, {num_routed}], got {random_finetune_last}")
  if isinstance(spec, ResNetSpec):
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  else:
    mean, std = LITE_MEAN, LITE_STD
  as_static = lambda r: r if isinstance(r, str) else tuple(int(v) for v in r)
  return SpotTuneClassifier(
      base_name=base_name, num_classes=int(num_classes), mean=mean, std=std,
      policy_depth=int(policy_depth), policy_width=int(policy_width),
      policy_image_size=int(policy_image_size), temperature=float(temperature),
      train_routing=as_static(train_routing), eval_routing=as_static(eval_routing), routing_mask=mask,
      random_finetune_last=int(random_finetune_last), keep_source_head=bool(keep_source_head),
      num_source_classes=int(num_source_classes), first_routed_block=int(first_routed_block))


def random_block_mask(num_blocks: int, *, fraction: float = 0.5, seed: int = 0) -> tuple[int, ...]:
  """A fixed mask fine-tuning ``round(fraction * num_blocks)`` blocks chosen at random.

  The stochastic fine-tuning baseline of the paper's Table 2 (50% of the blocks).

  Example:
    >>> sum(random_block_mask(16, seed=3))
    8
  """
  if not 0.0 <= fraction <= 1.0 or num_blocks < 1:
    raise ValueError(f"need num_blocks >= 1 and fraction in [0, 1], got {num_blocks}, {fraction}")
  chosen = np.random.default_rng(seed).permutation(num_blocks)[: int(round(fraction * num_blocks))]
  mask = np.zeros(num_blocks, np.int64)
  mask[chosen] = 1
  return tuple(int(v) for v in mask)


# ----------------------------------------------------------------------------- variables and rules


def _tree_shapes(tree: Any) -> Any:
  return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def _copy_tree(tree: Any) -> Any:
  return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def spottune_variables_from_pretrained(model: SpotTuneClassifier, pretrained_variables: Any, *,
                                       rng: jax.Array) -> dict[str, Any]:
  """SpotTune variables from the plain model's (pretrained) variables.

  The plain backbone goes to ``backbone`` (the trainable copies, same names) and
  each routed block is copied again into ``frozen_backbone`` (parameters and
  BatchNorm statistics); a frozen prefix (``first_routed_block > 0``) goes only to
  ``frozen_backbone``; ``head``/``source_head`` are taken over; the policy
  network is initialised at random (one jitted init with the ``rbg`` generator
  seeded from ``rng``).

  Args:
    model: from :func:`create_spottune_model`.
    pretrained_variables: ``{"params": ..., "batch_stats": ...}`` of
      ``create_model(model.base_name, ...)`` (e.g. ``pretrained(...).variables``).
    rng: key for the policy initialisation.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` as NumPy arrays.

  Raises:
    ValueError: when the plain variables do not fit the model (names or shapes).
  """
  seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
  init_key = jax.random.key(seed, impl="rbg")
  size = model.min_image_size
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, size, size, 3), jnp.float32), train=False,
                                        outputs=model.all_outputs, routing="argmax"))
  variables = jax.tree.map(np.asarray, jax.device_get(dict(init(init_key))))
  plain = {k: dict(v) for k, v in dict(pretrained_variables).items()}
  out = {}
  for collection, tree in variables.items():
    tree = dict(tree)
    source = plain.get(collection, {})
    frozen_parts = dict(tree.get("frozen_backbone", {}))
    for name in ("backbone", "head", "source_head"):
      if name not in tree:
        continue
      if name not in source:
        raise ValueError(f"the pretrained variables have no {collection}/{name} for {model.model_name}")
      expected = tree[name]
      if name == "backbone":  # the frozen prefix exists only in frozen_backbone
        expected = dict(expected, **{k: v for k, v in frozen_parts.items() if k not in expected})
      if _tree_shapes(source[name]) != _tree_shapes(expected):
        raise ValueError(f"{collection}/{name} of the pretrained variables does not fit {model.model_name} "
                         "(different names or shapes: was it built from another base model or class count?)")
      if name == "backbone":
        tree[name] = {part: _copy_tree(v) for part, v in source[name].items() if part in tree[name]}
      else:
        tree[name] = _copy_tree(source[name])
    if frozen_parts:
      tree["frozen_backbone"] = {part: _copy_tree(source["backbone"][part]) for part in frozen_parts}
    out[collection] = tree
  return out


def spottune_rules() -> list[tuple[str, str]]:
  """:mod:`ftjax.core.paths` rules of a SpotTune model, in four groups.

  ``head`` (the new heads), ``backbone`` (the trainable copies, the stem and the
  other unrouted layers, and a kept ``source_head``), ``frozen`` (the
  ``frozen_backbone`` copies: give this group ``frozen=True``) and ``policy``
  (the policy network). The paper trains the policy with its own optimizer and
  learning rate; here it is its own parameter group inside the one optimizer, so
  its learning rate is the shared schedule times the group's ``lr_mult`` (see
  :func:`spottune_groups`); momentum and the schedule's shape are shared.

  Example:
    >>> from ftjax.core.paths import path_labels
    >>> params = {"backbone": {"w": 1.0}, "frozen_backbone": {"w": 1.0}, "policy": {"w": 1.0},
    ...           "head": {"w": 1.0}}
    >>> path_labels(params, spottune_rules())
    {'backbone': {'w': 'backbone'}, 'frozen_backbone': {'w': 'frozen'}, 'head': {'w': 'head'}, 'policy': {'w': 'policy'}}
  """
  return [("(?:head|projector)/.*", "head"),
          ("backbone/.*|source_head/.*", "backbone"),
          ("frozen_backbone/.*", "frozen"),
          ("policy/.*", "policy")]


def spottune_groups(*, head_lr_mult: float = 10.0, policy_lr_mult: float = 1.0,
                    policy_weight_decay: float | None = None) -> dict[str, dict[str, Any]]:
  """Group settings for :func:`spottune_rules` (mappings for ``config.groups``).

  Example:
    >>> spottune_groups(policy_lr_mult=0.1)["policy"]
    {'lr_mult': 0.1}
  """
  policy: dict[str, Any] = {"lr_mult": float(policy_lr_mult)}
  if policy_weight_decay is not None:
    policy["weight_decay"] = float(policy_weight_decay)
  return {"head": {"lr_mult": float(head_lr_mult)}, "backbone": {}, "frozen": {"frozen": True},
          "policy": policy}


# ----------------------------------------------------------------------------- Global-k pruning


class PrunedSize(NamedTuple):
  """Parameter counts of a SpotTune model with its unused fine-tuned blocks dropped."""
  unused_blocks: tuple[str, ...]   # routed blocks no image fine-tunes (v_l <= threshold)
  usage: tuple[float, ...]         # v_l per routed block
  total: int                       # all parameters (frozen + trainable copies + policy + heads)
  pruned: int                      # total minus the trainable copies of the unused blocks
  pruned_without_policy: int       # also without the policy network (a Global-k model needs none)


def unused_blocks(decisions: Any, block_names: Sequence[str], *, threshold: float = 0.0) -> list[str]:
  """Routed blocks whose fine-tuned copy is used by at most ``threshold`` of the images.

  Args:
    decisions: ``[N, L]`` 0/1 decisions (e.g. the ``policy`` output on a test set).
    block_names: the ``L`` routed block names (``model.routed_blocks``).
    threshold: largest usage fraction ``v_l`` counted as unused (``0``: no image).

  Example:
    >>> unused_blocks(np.array([[1, 0], [1, 0]]), ["a", "b"])
    ['b']
  """
  decisions = np.asarray(decisions, np.float64)
  if decisions.ndim != 2 or decisions.shape[1] != len(block_names):
    raise ValueError(f"decisions must be [N, {len(block_names)}] (one column per routed block), "
                     f"got shape {decisions.shape}")
  usage = decisions.mean(axis=0)
  return [name for name, v in zip(block_names, usage) if v <= threshold]


def pruned_size(params: Any, decisions: Any, block_names: Sequence[str], *, threshold: float = 0.0
                ) -> PrunedSize:
  """Parameter count without the trainable copies of the blocks no image uses (Global-k).

  Example:
    >>> params = {"backbone": {"stage1_block0": {"w": np.ones(10)}, "stage2_block0": {"w": np.ones(30)}},
    ...           "frozen_backbone": {"stage1_block0": {"w": np.ones(10)}, "stage2_block0": {"w": np.ones(30)}},
    ...           "head": {"w": np.ones(5)}}
    >>> decisions = np.array([[1, 0], [1, 0]])   # no image fine-tunes stage2_block0
    >>> size = pruned_size(params, decisions, ["stage1_block0", "stage2_block0"])
    >>> size.unused_blocks, size.total, size.pruned
    (('stage2_block0',), 85, 55)
  """
  unused = unused_blocks(decisions, block_names, threshold=threshold)
  count = lambda tree: int(sum(np.size(a) for a in jax.tree.leaves(tree)))
  total = count(params)
  dropped = sum(count(params["backbone"][name]) for name in unused)
  pruned = total - dropped
  policy = count(params.get("policy", {}))
  usage = tuple(float(v) for v in np.asarray(decisions, np.float64).mean(axis=0))
  return PrunedSize(tuple(unused), usage, total, pruned, pruned - policy)

"""SpotTune's model (Guo et al., CVPR 2019): per-image routing between frozen and fine-tuned blocks.

Every *routed* block ``l`` exists twice: a frozen copy ``F_l`` (the pretrained
block) and a trainable copy ``F̂_l`` initialised from the same weights. A small ResNet, the *policy network*, looks at
the image and gives logits ``[B, L, 2]`` (category 1 = fine-tuned); the decision
``I_l(x)`` picks the block (Eq. 2)::

  x_l = I_l(x) · F̂_l(x_{l-1}) + (1 - I_l(x)) · F_l(x_{l-1})

where each copy is the whole block as the base model defines it (its residual
shortcut, a projection shortcut at a downsampling block, and the final
activation included; with hard decisions this is exactly Eq. 2).

Routed blocks: every block of the base: every residual block of a ResNet (any
depth, basic or bottleneck) and every MBConv block of an EfficientNet-Lite,
residual or not (a block and its copy have the same output shape, so the mix of
Eq. 2 is defined for a downsampling or channel-changing block too). The stem and
Lite's head conv exist once, under ``backbone``. With ``first_routed_block=i > 0``
routing starts at the i-th block and everything before it (the stem and every
earlier block) is a frozen, unrouted feature extractor (parameters and
statistics): the paper's Visual Decathlon setting, where "we freeze the first
macro blocks (4 residual blocks) of the ResNet-26" (Sec. 4.1).

What trains follows the authors' code (``gyhui14/spottune``, ``main.py``), where
the paper is silent (:func:`spottune_rules`):

* "# freeze the original blocks": every convolution outside the trainable copies
  is frozen except the first one (``if flag is True: flag = False`` skips the stem
  conv, ``else: m.weight.requires_grad = False``): the frozen copies' convolutions
  and Lite's head conv are frozen, the stem conv trains;
* only ``nn.Conv2d`` weights are frozen, and ``net.train()`` runs the whole
  network in training mode: the BatchNorm layers of the frozen copies train their
  γ, β with the network's optimizer and normalise by batch statistics in training
  (running averages re-estimated on the task), like the stem's and the head's.
  ``train_frozen_bn=False`` keeps them as the paper's text has the frozen block,
  "left unchanged" (running statistics, γ, β frozen).

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

``"sample"`` and ``"random"`` draw each image's decisions from the ``"gumbel"`` key
folded with a hash of the image's pixels, so an evaluation that hands every batch
the same key (the trainer's eval step: ``PRNGKey(i)`` per stream) still gets fresh
decisions for every image and batch (and the same ones for the same image);
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

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.core import paths as paths_lib
from ftjax.losses.spottune import gumbel_softmax
from ftjax.methods.patches import structural_paths
from ftjax.models.efficientnet_lite import (EFFICIENTNET_SPECS, LITE_MEAN, LITE_STD, EfficientNetBackbone,
                                            EfficientNetSpec)
from ftjax.models.layers import (BatchNorm, Conv, classifier_outputs, compute_dtype, head_kernel_init,
                                 normalize_pixels, symmetric_padding)
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
  """The blocks SpotTune doubles: every block of the base (ResNet residual blocks, Lite MBConv blocks).

  Example:
    >>> routed_block_names("efficientnet_tiny")
    ['blocks_0', 'blocks_1', 'blocks_2', 'blocks_3']
  """
  return block_names(base_name)


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
  train_frozen_bn: bool = True
  dtype: Any = jnp.float32  # the backbone copies' computation dtype; the policy stays float32

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

  def _image_keys(self, images: jax.Array) -> jax.Array:
    """One key per image: the ``"gumbel"`` key folded with a hash of the image's pixels.

    The trainer's eval step gives every batch the same key; folding in the image
    makes sampled and random decisions differ across images and batches, and
    keeps them reproducible (the same image, key and routing give the same route).
    """
    key = self.make_rng(GUMBEL_RNG)
    return jax.vmap(lambda h: jax.random.fold_in(key, h))(image_hashes(images))

  def _decisions(self, mode: str, policy_logits: jax.Array | None, images: jax.Array) -> jax.Array:
    num_blocks = len(self.routed_blocks)
    if mode in RNG_MODES and not self.has_rng(GUMBEL_RNG):
      raise ValueError(f"SpotTune routing {mode!r} needs randomness: call model.apply(..., "
                       f"rngs={{'{GUMBEL_RNG}': key}})")
    if mode == "gumbel":
      sample = gumbel_softmax(self.make_rng(GUMBEL_RNG), policy_logits, temperature=self.temperature, hard=True)
      return sample[..., 1]
    if mode == "sample":
      keys = self._image_keys(images)
      noise = jax.vmap(lambda k: jax.random.gumbel(k, policy_logits.shape[1:], jnp.float32))(keys)
      return jnp.argmax(policy_logits.astype(jnp.float32) + noise, axis=-1).astype(jnp.float32)
    if mode == "argmax":
      return jnp.argmax(policy_logits, axis=-1).astype(jnp.float32)
    # random
    keys = self._image_keys(images)
    decisions = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (num_blocks,)))(keys).astype(jnp.float32)
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
      decisions = self._decisions(mode, policy_logits, images)
    else:
      decisions = jnp.broadcast_to(jnp.asarray(static, jnp.float32), (batch, len(routed)))

    backbone = _backbone(_spec(self.base_name), name="backbone")
    frozen = _backbone(_spec(self.base_name), name="frozen_backbone")
    prefix = self.frozen_prefix
    # A frozen prefix (stem and the blocks before the first routed one) runs the
    # frozen copy on its running statistics, like every frozen block.
    x = x.astype(compute_dtype(self.dtype))
    x = frozen.stem(x, train=False) if prefix else backbone.stem(x, train=train)
    # The frozen copies' BatchNorm: as the network's in training (the authors' code runs
    # net.train() over both copies) or always on running statistics (train_frozen_bn=False).
    frozen_train = train and self.train_frozen_bn
    feature_maps = {}
    for name in block_names(self.base_name):
      if name in prefix:
        x = frozen.block(name, x, train=False)
      elif name not in routed:
        x = backbone.block(name, x, train=train)
      else:
        j = routed.index(name)
        if static is not None:
          # Only the chosen copy runs.
          x = backbone.block(name, x, train=train) if static[j] else frozen.block(name, x, train=frozen_train)
        else:
          fine = backbone.block(name, x, train=train)
          kept = frozen.block(name, x, train=frozen_train)
          choice = decisions[:, j].astype(fine.dtype).reshape(batch, 1, 1, 1)
          x = choice * fine + (1.0 - choice) * kept
      feature_maps[name] = x
    x = backbone.head(x, train=train)
    if backbone.head_map:
      feature_maps[backbone.head_map] = x
    features = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)

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
    train_frozen_bn: bool = True,
    dtype: Any = "float32",
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
    train_frozen_bn: the frozen copies' BatchNorm layers normalise by batch
      statistics in training (running averages re-estimated), as the authors'
      code (``net.train()``); False: always on their running statistics.
    dtype: computation dtype of the backbone copies (``"float32"`` or ``"bfloat16"``,
      as :func:`ftjax.models.create_model`); the policy network, parameters,
      features and logits stay float32.

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
      num_source_classes=int(num_source_classes), first_routed_block=int(first_routed_block),
      train_frozen_bn=bool(train_frozen_bn), dtype=compute_dtype(dtype))


def image_hashes(images: jax.Array) -> jax.Array:
  """A ``uint32`` hash of each image's pixels, ``[B]`` (for per-image random keys).

  Example:
    >>> h = image_hashes(jnp.stack([jnp.zeros((4, 4, 3)), jnp.ones((4, 4, 3))]))
    >>> bool(h[0] != h[1])
    True
  """
  bits = jax.lax.bitcast_convert_type(images.astype(jnp.float32), jnp.uint32).reshape(images.shape[0], -1)
  position = jnp.arange(bits.shape[1], dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)
  mixed = (bits ^ (bits >> 16)) * jnp.uint32(0x85EBCA6B)
  mixed = (mixed ^ (mixed >> 13)) * (position | jnp.uint32(1))
  return jnp.sum(mixed, axis=1, dtype=jnp.uint32)   # wraps modulo 2**32


def random_block_mask(num_blocks: int, *, fraction: float = 0.5, seed: int = 0) -> tuple[int, ...]:
  """A fixed mask fine-tuning ``fraction`` of ``num_blocks`` blocks chosen at random.

  The stochastic fine-tuning baseline of the paper's Table 2 ("we randomly sample
  50% of the blocks"). The count is ``fraction * num_blocks`` rounded half up
  (9 blocks at 50%: 5), never Python's round-half-to-even (which gave 4 of 9).

  Example:
    >>> sum(random_block_mask(16, seed=3)), sum(random_block_mask(9, seed=3))
    (8, 5)
  """
  if not 0.0 <= fraction <= 1.0 or num_blocks < 1:
    raise ValueError(f"need num_blocks >= 1 and fraction in [0, 1], got {num_blocks}, {fraction}")
  count = int(np.floor(fraction * num_blocks + 0.5))
  chosen = np.random.default_rng(seed).permutation(num_blocks)[:count]
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


def _natural_key(name: str) -> list[Any]:
  """``blocks_2`` before ``blocks_10``: block names in forward order."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _alternation(names: Sequence[str]) -> str:
  return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _train_mask(train_routing: Any, routing_mask: Sequence[int] | None, num_blocks: int) -> tuple[int, ...] | None:
  """The 0/1 mask every training image follows under a static training routing (None: dynamic)."""
  return _static_mask(train_routing if isinstance(train_routing, str) else tuple(train_routing),
                      None if routing_mask is None else tuple(routing_mask), num_blocks)


def spottune_param_rules(variables: Any, *, train_frozen_bn: bool = True,
                         train_routing: Any = "gumbel", routing_mask: Sequence[int] | None = None,
                         random_finetune_last: int = 0) -> list[tuple[str, str]]:
  """The rules of the parameters SpotTune owns (claimed before the baseline's rules).

  Follows the authors' code (``gyhui14/spottune``, ``main.py``, "# freeze the
  original blocks": every ``nn.Conv2d`` outside ``parallel_blocks`` except the
  first gets ``requires_grad = False``; nothing else is frozen):

  * ``policy`` (group ``policy``), when the training routing is the policy's
    (``"gumbel"``); a routing that never runs it in training (``"random"``, a
    fixed mask) leaves it at its initialisation (``frozen``);
  * the frozen copies' BatchNorm γ, β: group ``backbone`` (trained with the
    network; ``train_frozen_bn=False``: ``frozen``);
  * ``frozen``: the frozen copies' convolutions, every convolution of an unrouted
    part of ``backbone`` except the stem's (Lite's ``head_conv``), the frozen
    prefix (``first_routed_block > 0``: stem and earlier blocks, statistics too),
    and the copies no training image uses (under a static training routing the
    trainable copy of a 0 block and the frozen copy of a 1 block; under
    ``"random"`` the frozen copies of the ``random_finetune_last`` blocks), so that
    the trainable-parameter count is what training can change.

  The rest (trainable copies, the stem, the stem's and the head's BatchNorm) is
  left to the baseline (``finetune``: group ``backbone``). Needs the SpotTune
  model's variables (the structure: which blocks are routed, which layers are
  BatchNorm, i.e. have running statistics).

  Example:
    >>> model = create_spottune_model("resnet_tiny", num_classes=3, policy_depth=1, policy_width=8)
    >>> shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False,
    ...                         outputs=model.all_outputs, routing="argmax"), jax.random.key(0))
    >>> [group for _, group in spottune_param_rules(shapes)]
    ['policy', 'backbone', 'frozen']
  """
  params = variables["params"]
  frozen_parts = set(params.get("frozen_backbone", {}))
  backbone_parts = set(params.get("backbone", {}))
  routed = sorted(frozen_parts & backbone_parts, key=_natural_key)   # forward order
  # The frozen prefix (frozen_parts - backbone_parts) is frozen whole by the frozen_backbone rule.
  unrouted = sorted(backbone_parts - frozen_parts, key=_natural_key)
  if not routed:
    raise ValueError("not a SpotTune model's variables: no block has both a frozen copy "
                     "(frozen_backbone/...) and a trainable one (backbone/...)")
  mask = _train_mask(train_routing, routing_mask, len(routed))
  always_finetuned = set()
  if isinstance(train_routing, str) and train_routing == "random" and random_finetune_last:
    always_finetuned = set(routed[len(routed) - min(int(random_finetune_last), len(routed)):])
  used_frozen = [b for j, b in enumerate(routed)
                 if (mask is None or not mask[j]) and b not in always_finetuned]
  unused_trainable = [b for j, b in enumerate(routed) if mask is not None and not mask[j]]
  flat = paths_lib.flatten_paths(params)

  train_policy = mask is None and isinstance(train_routing, str) and train_routing == "gumbel"
  rules: list[tuple[str, str]] = [("policy/.*", "policy" if train_policy else "frozen")]
  # The frozen copies' BatchNorm γ, β (found as the scale-and-bias patch finds them: layers
  # with running statistics), named by layer in the rule.
  bn_paths = sorted(p for p in structural_paths(params, batch_stats=variables.get("batch_stats"),
                                                selection="scale_bias")
                    if p.startswith("frozen_backbone/") and p.split("/")[1] in used_frozen)
  bn_regex = ""
  if train_frozen_bn and bn_paths:
    layers = sorted({p.rsplit("/", 2)[-2] for p in bn_paths})
    bn_regex = (f"frozen_backbone/{_alternation(used_frozen)}/(?:.*/)?{_alternation(layers)}"
                f"/(?:scale|bias)")
    matched = {p for p in flat if re.fullmatch(bn_regex, p)}
    if matched != set(bn_paths):
      raise ValueError(f"SpotTune's BatchNorm rule {bn_regex!r} disagrees with the model's structure: "
                       f"also matches {sorted(matched - set(bn_paths))}, misses {sorted(set(bn_paths) - matched)}")
    rules.append((bn_regex, "backbone"))
  # Convolutions of the unrouted parts of backbone, except the first (the stem's).
  conv_modules = sorted({p.rsplit("/", 1)[0] for p, leaf in flat.items()
                         if p.startswith("backbone/") and p.split("/")[1] in unrouted
                         and p.endswith("/kernel") and len(np.shape(leaf)) == 4
                         and p.split("/")[1] != "stem_conv"})
  frozen = ["frozen_backbone/.*" if not bn_regex else f"(?!(?:{bn_regex})$)frozen_backbone/.*"]
  frozen += [f"{re.escape(m)}/.*" for m in conv_modules]
  if unused_trainable:
    frozen.append(f"backbone/{_alternation(unused_trainable)}/.*")
  rules.append(("|".join(frozen), "frozen"))
  return rules


def spottune_rules(variables: Any, **options: Any) -> list[tuple[str, str]]:
  """All rules of a SpotTune model: :func:`spottune_param_rules`, then the ``finetune`` baseline.

  ``head`` (the new heads), ``backbone`` (the trainable copies, the stem, the
  stem's and head's BatchNorm, the frozen copies' BatchNorm γ, β, and a kept
  ``source_head``), ``frozen`` (give this group ``frozen=True``) and ``policy``
  (the policy network). The paper trains the policy with its own optimizer and
  learning rate; here it is its own parameter group inside the one optimizer, so
  its learning rate is the shared schedule times the group's ``lr_mult`` (see
  :func:`spottune_groups`); momentum and the schedule's shape are shared.
  ``options``: those of :func:`spottune_param_rules`.

  Example:
    >>> model = create_spottune_model("resnet_tiny", num_classes=3, policy_depth=1, policy_width=8)
    >>> shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False,
    ...                         outputs=model.all_outputs, routing="argmax"), jax.random.key(0))
    >>> labels = paths_lib.path_labels(shapes["params"], spottune_rules(shapes))  # each parameter once
    >>> sorted(set(jax.tree.leaves(labels)))
    ['backbone', 'frozen', 'head', 'policy']
  """
  return paths_lib.claim_first(spottune_param_rules(variables, **options),
                               [("(?:head|projector)/.*", "head"), ("backbone/.*|source_head/.*", "backbone")])


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

"""Flax models vs torch reference forwards, shapes, parameter paths and errors."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ftjax.models import MODEL_NAMES, block_prefixes, create_model, num_features
from ftjax.models.layers import Conv
from ftjax.models.torch_import import (
    efficientnet_lite0_variables_from_torch,
    resnet_variables_from_torch,
)
from ftjax.testing.torch_models import TorchEfficientNetLite0, TorchResNet, normalize_pixels


def _shapes(model, size=64):
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False, outputs=model.all_outputs), images)


def _init(model, images, outputs=None, seed=0):
  """Variables with the model's shapes filled by NumPy (positive BN variances).

  Random init under XLA compiles threefry for every parameter, which takes tens
  of seconds on a busy CPU; the shapes come from ``model.init`` via eval_shape.
  """
  outputs = model.all_outputs if outputs is None else outputs
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False, outputs=outputs), images)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1].key)
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.1
    return jnp.asarray(rng.normal(0.0, scale, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, variables, images, *, train=False, outputs=("logits",)):
  if train:
    fn = lambda v, x: model.apply(v, x, train=True, outputs=outputs, mutable=["batch_stats"])
  else:
    fn = lambda v, x: model.apply(v, x, train=False, outputs=outputs)
  return jax.jit(fn)(variables, images)


def _paths(tree) -> list[str]:
  return ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _randomize_bn(module: torch.nn.Module, seed: int) -> None:
  """Non-trivial BN statistics and affine params so a mis-mapped BN cannot pass."""
  gen = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      n = m.num_features
      m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
      m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
      m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
      m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def _numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _torch_forward(module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  x = normalize_pixels(torch.from_numpy(images).permute(0, 3, 1, 2), module.mean, module.std)
  with torch.no_grad():
    features = module.features(x)
    logits = (module.fc if hasattr(module, "fc") else module._fc)(features)
  return features.numpy(), logits.numpy()


def _random_pixels(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)


@pytest.mark.parametrize("name, size", [
    ("resnet18", 64), ("resnet_tiny", 32), pytest.param("resnet26", 32, marks=pytest.mark.slow)])
def test_resnet_import_matches_torch_eval(name, size):
  torch.manual_seed(0)
  reference = TorchResNet(name, num_classes=7)
  _randomize_bn(reference, seed=1)
  reference.eval()
  variables = resnet_variables_from_torch(_numpy_state_dict(reference), name=name)
  model = create_model(name, num_classes=3, keep_source_head=True, num_source_classes=7)
  images = _random_pixels((2, size, size, 3))
  # The importer leaves the target head out; give one so "logits" can be asked for too.
  variables["params"]["head"] = {"kernel": jnp.zeros((num_features(name), 3)), "bias": jnp.zeros(3)}
  out = _apply(model, variables, images, outputs=("features", "source_logits"))
  ref_features, ref_logits = _torch_forward(reference, images)
  for got, want in ((out["features"], ref_features), (out["source_logits"], ref_logits)):
    err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert err < 1e-4, err


@pytest.mark.slow
def test_resnet50_import_matches_torch_eval():
  torch.manual_seed(0)
  reference = TorchResNet("resnet50")
  _randomize_bn(reference, seed=2)
  reference.eval()
  variables = resnet_variables_from_torch(_numpy_state_dict(reference), name="resnet50")
  model = create_model("resnet50", num_classes=1000, keep_source_head=True)
  images = _random_pixels((2, 64, 64, 3))
  out = _apply(model, variables, images, outputs=("source_logits",))
  want = _torch_forward(reference, images)[1]
  assert np.abs(np.asarray(out["source_logits"]) - want).max() / np.abs(want).max() < 1e-4


def test_train_mode_batch_norm_matches_torch():
  torch.manual_seed(0)
  reference = TorchResNet("resnet_tiny", num_classes=5)
  _randomize_bn(reference, seed=3)
  variables = resnet_variables_from_torch(_numpy_state_dict(reference), name="resnet_tiny")
  model = create_model("resnet_tiny", num_classes=5, keep_source_head=True, num_source_classes=5)
  images = _random_pixels((4, 32, 32, 3), seed=4)
  out, updates = _apply(model, variables, images, train=True, outputs=("source_logits",))
  reference.train()
  x = normalize_pixels(torch.from_numpy(images).permute(0, 3, 1, 2), reference.mean, reference.std)
  with torch.no_grad():
    want = reference(x).numpy()
  assert np.abs(np.asarray(out["source_logits"]) - want).max() / np.abs(want).max() < 1e-4
  # Running means follow torch's momentum 0.1 (flax 0.9). (Running variances differ by
  # the n/(n-1) factor: torch stores the unbiased batch variance, flax the biased one.)
  got_mean = np.asarray(updates["batch_stats"]["backbone"]["stage2_block0"]["bn1"]["mean"])
  want_mean = reference.layer2[0].bn1.running_mean.numpy()
  old_mean = variables["batch_stats"]["backbone"]["stage2_block0"]["bn1"]["mean"]
  assert np.abs(got_mean - old_mean).max() > 1e-3  # the statistics did move
  assert np.abs(got_mean - want_mean).max() < 1e-4 * np.abs(want_mean).max() + 1e-6


@pytest.mark.parametrize("name", ["resnet_tiny", "efficientnet_tiny"])
def test_tiny_output_shapes(name):
  model = create_model(name, num_classes=4, keep_source_head=True, num_source_classes=6)
  images = _random_pixels((2, 40, 32, 3))
  variables = _init(model, images)
  out = _apply(model, variables, images, outputs=model.all_outputs)
  assert set(out) == {"features", "logits", "source_logits", "feature_maps"}
  dim = num_features(name)
  assert out["features"].shape == (2, dim)
  assert out["logits"].shape == (2, 4)
  assert out["source_logits"].shape == (2, 6)
  # Logits are the head applied to the pooled features.
  head = variables["params"]["head"]
  np.testing.assert_allclose(
      out["logits"], out["features"] @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
  maps = out["feature_maps"]
  last = list(maps.values())[-1]
  assert all(m.ndim == 4 and m.shape[0] == 2 for m in maps.values())
  # Features are the global average of the last feature map.
  np.testing.assert_allclose(out["features"], last.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  # Train mode returns the same keys and updates batch stats.
  out_train, updates = _apply(model, variables, images, train=True)
  assert set(out_train) == {"logits"}
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_feature_map_names_and_strides():
  model = create_model("efficientnet_tiny", num_classes=2)
  images = _random_pixels((1, 32, 32, 3))
  variables = _init(model, images)
  maps = _apply(model, variables, images, outputs=("feature_maps",))["feature_maps"]
  assert {k: v.shape for k, v in maps.items()} == {
      "blocks_0": (1, 16, 16, 8), "blocks_1": (1, 8, 8, 16), "blocks_2": (1, 8, 8, 16),
      "blocks_3": (1, 8, 8, 24), "head_conv": (1, 8, 8, 32)}
  model = create_model("resnet_tiny", num_classes=2)
  variables = _init(model, images)
  maps = _apply(model, variables, images, outputs=("feature_maps",))["feature_maps"]
  assert {k: v.shape for k, v in maps.items()} == {
      "stage1_block0": (1, 32, 32, 8), "stage2_block0": (1, 16, 16, 16)}


def test_only_requested_heads_are_built():
  model = create_model("resnet_tiny", num_classes=3, keep_source_head=True)
  images = _random_pixels((1, 32, 32, 3))
  assert set(jax.eval_shape(lambda: _init(model, images, ("features",)))["params"]) == {"backbone"}
  variables = jax.eval_shape(lambda: _init(model, images))
  assert set(variables["params"]) == {"backbone", "head", "source_head"}
  assert model.all_outputs == ("features", "logits", "source_logits", "feature_maps")
  assert "source_logits" not in create_model("resnet_tiny", num_classes=3).all_outputs


def test_errors():
  with pytest.raises(ValueError, match="unknown model 'resnet999'; known: resnet18"):
    create_model("resnet999", num_classes=2)
  with pytest.raises(ValueError, match="unknown model"):
    block_prefixes("vgg")
  model = create_model("efficientnet_lite0", num_classes=2)
  small = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match="image size 16 is too small for efficientnet_lite0; minimum 32"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), small, train=False))
  model = create_model("resnet_tiny", num_classes=2)
  images = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: _init(model, images))

  def apply(outputs, x=images):  # traced only: the errors come before any computation
    return jax.eval_shape(lambda v: model.apply(v, x, train=False, outputs=outputs), variables)

  with pytest.raises(ValueError, match="unknown output 'embeddings'"):
    apply(("embeddings",))
  with pytest.raises(ValueError, match="projection_dim=0"):  # Bi-Tuning's output needs a projector
    apply(("projection",))
  with pytest.raises(ValueError, match="keep_source_head=False"):
    apply(("source_logits",))
  with pytest.raises(ValueError, match="sequence of names"):
    apply("logits")
  with pytest.raises(ValueError, match="3 channels"):
    apply(("logits",), jnp.zeros((1, 32, 32, 1)))
  assert apply(("logits",))["logits"].shape == (1, 2)


def test_efficientnet_lite0_param_paths_and_count():
  model = create_model("efficientnet_lite0", num_classes=1000, keep_source_head=True)
  shapes = _shapes(model)
  backbone = shapes["params"]["backbone"]
  assert set(backbone) == {"stem_conv", "stem_bn", "head_conv", "head_bn"} | {
      f"blocks_{i}" for i in range(16)}
  assert set(backbone["blocks_0"]) == {"depthwise_conv", "depthwise_bn", "project_conv", "project_bn"}
  for i in range(1, 16):
    assert set(backbone[f"blocks_{i}"]) == {
        "expand_conv", "expand_bn", "depthwise_conv", "depthwise_bn", "project_conv", "project_bn"}
  assert backbone["blocks_3"]["depthwise_conv"]["kernel"].shape == (5, 5, 1, 144)
  assert set(backbone["stem_bn"]) == {"scale", "bias"}
  assert set(shapes["batch_stats"]["backbone"]["stem_bn"]) == {"mean", "var"}
  # Independent count: the checkpoint layout's parameters (no BN statistics) per block.
  rows = [(3, 1, 1, 16), (3, 2, 6, 24), (3, 1, 6, 24), (5, 2, 6, 40), (5, 1, 6, 40),
          (3, 2, 6, 80), (3, 1, 6, 80), (3, 1, 6, 80), (5, 1, 6, 112), (5, 1, 6, 112),
          (5, 1, 6, 112), (5, 2, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192), (5, 1, 6, 192),
          (3, 1, 6, 320)]
  count, cin = 3 * 3 * 3 * 32 + 2 * 32, 32
  for k, _, e, cout in rows:
    mid = cin * e
    count += (cin * mid + 2 * mid if e != 1 else 0) + k * k * mid + 2 * mid + mid * cout + 2 * cout
    cin = cout
  count += cin * 1280 + 2 * 1280
  head = 1280 * 1000 + 1000
  params = shapes["params"]
  assert _count(params["backbone"]) == count == 3_371_008
  assert _count(params["head"]) == _count(params["source_head"]) == head == 1_281_000
  # 4.65M with the 1000-way head (DESIGN's "4.69M" rounds the published figure).
  assert _count(params["backbone"]) + head == 4_652_008


def test_resnet_param_paths_and_counts():
  shapes = _shapes(create_model("resnet50", num_classes=1000))
  backbone = shapes["params"]["backbone"]
  assert set(backbone["stage1_block0"]) == {
      "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"}
  assert "downsample_conv" not in backbone["stage1_block1"]
  # Stride on the 3x3 conv (torchvision v1.5): visible as 3x3 conv2 in every bottleneck.
  assert backbone["stage2_block0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert backbone["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
  assert _count(shapes["params"]) == 25_557_032  # torchvision resnet50
  shapes18 = _shapes(create_model("resnet18", num_classes=1000))
  assert _count(shapes18["params"]) == 11_689_512  # torchvision resnet18
  assert set(shapes18["params"]["backbone"]["stage1_block0"]) == {"conv1", "bn1", "conv2", "bn2"}
  shapes26 = _shapes(create_model("resnet26", num_classes=10))
  assert sorted(k for k in shapes26["params"]["backbone"] if k.startswith("stage")) == sorted(
      f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(4))
  assert num_features("resnet26") == 256 and num_features("resnet50") == 2048


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_block_prefixes_partition_backbone(name):
  prefixes = block_prefixes(name)
  shapes = _shapes(create_model(name, num_classes=2))
  backbone_paths = [p for p in _paths(shapes["params"]) if p.startswith("backbone/")]
  for path in backbone_paths:
    hits = [p for p in prefixes if re.match(f"(?:{p})/", path)]
    assert len(hits) == 1, (path, hits)
  used = {p for p in prefixes if any(re.match(f"(?:{p})/", q) for q in backbone_paths)}
  assert used == set(prefixes)
  assert not any(re.match(f"(?:{p})/", "head/kernel") for p in prefixes)
  # Every BatchNorm (the only modules with batch stats) is named ...bn or ...bnN.
  for path in _paths(shapes["batch_stats"]):
    assert re.search(r"(^|_)bn\d*$", path.split("/")[-2]), path


def test_block_prefixes_order():
  prefixes = block_prefixes("efficientnet_lite0")
  assert prefixes[0] == "backbone/stem_conv|backbone/stem_bn"
  assert prefixes[1:17] == [f"backbone/blocks_{i}" for i in range(16)]
  assert prefixes[-1] == "backbone/head_conv|backbone/head_bn"
  assert block_prefixes("resnet18")[1:3] == ["backbone/stage1_block0", "backbone/stage1_block1"]


def test_conv_matches_flax_conv():
  x = jnp.asarray(_random_pixels((2, 9, 9, 6)) / 255)
  for kwargs in ({"padding": "SAME", "strides": (2, 2)},
                 {"padding": ((1, 1), (1, 1)), "strides": (2, 2)},
                 {"padding": "SAME", "feature_group_count": 6},
                 {"padding": "VALID", "use_bias": True}):
    ours = Conv(6, (3, 3), **kwargs)
    theirs = nn.Conv(6, (3, 3), **{"use_bias": False, **kwargs})
    shapes = jax.eval_shape(ours.init, jax.random.key(1), x)
    assert shapes == jax.eval_shape(theirs.init, jax.random.key(1), x)
    variables = jax.tree.map(lambda s: jnp.asarray(np.random.default_rng(0).normal(size=s.shape),
                                                   jnp.float32), shapes)
    np.testing.assert_allclose(jax.jit(ours.apply)(variables, x), jax.jit(theirs.apply)(variables, x),
                               rtol=1e-5, atol=1e-5)


def test_importer_rejects_unused_and_missing_keys():
  state = _numpy_state_dict(TorchResNet("resnet_tiny", num_classes=3))
  with pytest.raises(ValueError, match="unused keys.*layer9.0.extra.weight"):
    resnet_variables_from_torch({**state, "layer9.0.extra.weight": np.zeros(1)}, name="resnet_tiny")
  broken = dict(state)
  del broken["layer2.0.downsample.1.running_var"]
  with pytest.raises(ValueError, match="missing.*stage2_block0/downsample_bn/var"):
    resnet_variables_from_torch(broken, name="resnet_tiny")
  with pytest.raises(ValueError, match="shape mismatch"):
    resnet_variables_from_torch(
        {**state, "conv1.weight": np.zeros((8, 3, 5, 5), np.float32)}, name="resnet_tiny")
  with pytest.raises(ValueError, match="unknown ResNet"):
    resnet_variables_from_torch(state, name="efficientnet_lite0")
  lite = _numpy_state_dict(TorchEfficientNetLite0(num_classes=10))
  variables = efficientnet_lite0_variables_from_torch(lite)
  assert variables["params"]["source_head"]["kernel"].shape == (1280, 10)
  np.testing.assert_array_equal(
      variables["params"]["backbone"]["blocks_1"]["depthwise_conv"]["kernel"][:, :, 0, 5],
      lite["_blocks.1._depthwise_conv.weight"][5, 0])
  del lite["_blocks.15._bn1.running_mean"]
  with pytest.raises(ValueError, match="missing.*blocks_15/depthwise_bn/mean"):
    efficientnet_lite0_variables_from_torch(lite)

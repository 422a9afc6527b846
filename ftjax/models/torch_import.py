"""Convert torch ``state_dict``s (as NumPy arrays) to ftjax variables.

No torch needed: pass ``{key: tensor.numpy()}``. Layout conversions: conv
weights OIHW -> HWIO, depthwise ``(C, 1, kh, kw)`` -> ``(kh, kw, 1, C)``, Dense
``(out, in)`` -> ``(in, out)``; BatchNorm ``weight/bias/running_mean/running_var``
-> ``scale/bias`` params and ``mean/var`` batch stats (``num_batches_tracked`` is
dropped). The checkpoint's classifier becomes ``source_head``.

Every key must be used and every backbone/source-head variable of the ftjax model
must be filled with the right shape, else ValueError lists the offenders.

Example:
  >>> from ftjax.testing.torch_models import TorchResNet
  >>> torch_model = TorchResNet("resnet_tiny", num_classes=7)
  >>> sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  >>> variables = resnet_variables_from_torch(sd, name="resnet_tiny")
  >>> model = create_model("resnet_tiny", num_classes=10, keep_source_head=True, num_source_classes=7)
  >>> variables["params"]["source_head"]["kernel"].shape[1]
  7
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models.factory import create_model
from ftjax.models.resnet import RESNET_SPECS

_BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}

# A key rule returns (flax module path, leaf key, layout) or None.
_Target = tuple[str, str, str]


def _convert(array: np.ndarray, layout: str) -> np.ndarray:
  # Always copy: arrays from ``tensor.numpy()`` share memory with the torch module,
  # which would otherwise change our variables in place (e.g. BN running stats).
  array = np.array(array, dtype=np.float32, copy=True)
  if layout == "conv":  # OIHW -> HWIO; depthwise (C,1,kh,kw) -> (kh,kw,1,C) is the same transpose
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  if layout == "dense":
    return np.ascontiguousarray(array.T)
  return array


def _layer_target(flax_module: str, field: str, kind: str) -> _Target | None:
  """Target of ``<torch layer>.<field>`` when the torch layer maps to ``flax_module``."""
  if kind == "conv":
    return (flax_module, "kernel", "conv") if field == "weight" else None
  if kind == "dense":
    return {"weight": (flax_module, "kernel", "dense"),
            "bias": (flax_module, "bias", "vector")}.get(field)
  if field in _BN_FIELDS:
    return (flax_module, field, "bn")
  return None


def _assemble(
    state_dict: Mapping[str, np.ndarray],
    rule: Callable[[str], _Target | None],
    expected: dict,
    what: str,
) -> dict:
  """Applies ``rule`` to every key and checks the result against ``expected`` shapes."""
  flat: dict[tuple[str, ...], np.ndarray] = {}
  unused = []
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    target = rule(key)
    if target is None:
      unused.append(key)
      continue
    module, field, layout = target
    if layout == "bn":
      collection, leaf = _BN_FIELDS[field]
      layout = "vector"
    else:
      collection, leaf = "params", field
    path = (collection, *module.split("/"), leaf)
    flat[path] = _convert(value, layout)
  if unused:
    raise ValueError(f"unused keys in the {what} state_dict: {', '.join(sorted(unused))}")

  expected_flat = {
      tuple(str(getattr(k, "key", k)) for k in path): leaf.shape
      for path, leaf in jax.tree_util.tree_leaves_with_path(expected)
  }
  missing = sorted("/".join(p) for p in expected_flat if p not in flat)
  extra = sorted("/".join(p) for p in flat if p not in expected_flat)
  if missing or extra:
    raise ValueError(
        f"{what} state_dict does not match the model: missing {missing or 'none'}; "
        f"unexpected {extra or 'none'}")
  bad = [f"{'/'.join(p)}: got {flat[p].shape}, expected {s}"
         for p, s in expected_flat.items() if flat[p].shape != tuple(s)]
  if bad:
    raise ValueError(f"{what} state_dict shape mismatch: {'; '.join(bad)}")

  variables: dict = {}
  for path, value in flat.items():
    node = variables
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return variables


def _expected_shapes(model_name: str, num_source_classes: int) -> dict:
  """Shapes of the backbone + source_head variables of ``model_name``."""

  model = create_model(model_name, num_classes=1, keep_source_head=True,
                       num_source_classes=num_source_classes)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False, outputs=model.all_outputs), images)
  shapes = dict(shapes)
  shapes["params"] = {k: v for k, v in shapes["params"].items() if k != "head"}
  return shapes


def _num_classes(state_dict: Mapping[str, np.ndarray], key: str, what: str) -> int:
  if key not in state_dict:
    raise ValueError(f"{what} state_dict has no classifier {key!r}; missing keys: {key}")
  return int(np.shape(state_dict[key])[0])


def resnet_variables_from_torch(state_dict: Mapping[str, np.ndarray], *, name: str) -> dict:
  """torchvision-layout ResNet ``state_dict`` -> ``{"params", "batch_stats"}``.

  Args:
    state_dict: torchvision keys (``conv1.weight``, ``bn1.*``,
      ``layer1.0.conv1.weight``, ``layer1.0.downsample.0/1.*``, ``fc.*``) to arrays.
    name: a ResNet name of :func:`ftjax.models.create_model`.

  Returns:
    Variables with ``backbone`` and ``source_head`` (from ``fc``); no target ``head``.
  """
  if name not in RESNET_SPECS:
    raise ValueError(f"unknown ResNet {name!r}; known: {', '.join(RESNET_SPECS)}")

  def rule(key: str) -> _Target | None:
    layer, _, field = key.rpartition(".")
    if layer == "conv1":
      return _layer_target("backbone/stem_conv", field, "conv")
    if layer == "bn1":
      return _layer_target("backbone/stem_bn", field, "bn")
    if layer == "fc":
      return _layer_target("source_head", field, "dense")
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)", layer)
    if m is None:
      return None
    stage, block, sub = m.groups()
    module = f"backbone/stage{stage}_block{block}/"
    if sub == "downsample.0":
      return _layer_target(module + "downsample_conv", field, "conv")
    if sub == "downsample.1":
      return _layer_target(module + "downsample_bn", field, "bn")
    return _layer_target(module + sub, field, "conv" if sub.startswith("conv") else "bn")

  expected = _expected_shapes(name, _num_classes(state_dict, "fc.weight", name))
  return _assemble(state_dict, rule, expected, name)


def efficientnet_lite0_variables_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
  """EfficientNet-PyTorch-layout Lite0 ``state_dict`` -> ``{"params", "batch_stats"}``.

  Keys: ``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv/_bn0/_depthwise_conv/
  _bn1/_project_conv/_bn2``, ``_conv_head``, ``_bn1``, ``_fc`` (-> ``source_head``).
  """
  block_layers = {
      "_expand_conv": ("expand_conv", "conv"), "_bn0": ("expand_bn", "bn"),
      "_depthwise_conv": ("depthwise_conv", "conv"), "_bn1": ("depthwise_bn", "bn"),
      "_project_conv": ("project_conv", "conv"), "_bn2": ("project_bn", "bn"),
  }
  top_layers = {
      "_conv_stem": ("backbone/stem_conv", "conv"), "_bn0": ("backbone/stem_bn", "bn"),
      "_conv_head": ("backbone/head_conv", "conv"), "_bn1": ("backbone/head_bn", "bn"),
      "_fc": ("source_head", "dense"),
  }

  def rule(key: str) -> _Target | None:
    layer, _, field = key.rpartition(".")
    if layer in top_layers:
      return _layer_target(*top_layers[layer][:1], field, top_layers[layer][1])
    m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+)", layer)
    if m is None or m.group(2) not in block_layers:
      return None
    sub, kind = block_layers[m.group(2)]
    return _layer_target(f"backbone/blocks_{m.group(1)}/{sub}", field, kind)

  name = "efficientnet_lite0"
  expected = _expected_shapes(name, _num_classes(state_dict, "_fc.weight", name))
  return _assemble(state_dict, rule, expected, name)

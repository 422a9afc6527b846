"""Model patches (Mudrakarta et al., 2019, "K for the price of 1"): a small set of
parameters trained on a task while the rest of a shared base stays fixed.

The selections below find those parameters from the structure of the pytree (so
they work on any model) and turn them into ordinary rules
(:mod:`ftjax.core.paths`), so a patch is trained through the same
``optax.partition`` and exactly-once check as everything else. The
:class:`ModelPatch` method trains a patch (``losses = {"ce": ..., "patch":
{"selection": "scale_bias"}}``; ``baseline = "patch"`` is a shorthand that adds
it from ``config.patch``) and saves it on its own after training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from ftjax.core.paths import flatten_paths, path_str
from ftjax.core.errors import ConfigError
from ftjax.core.io import save_npz
from ftjax.methods.base import Method, RunContext

SELECTIONS = ("scale_bias", "depthwise", "head", "all")
NEW_HEADS = "(?:head|projector)/.*"   # randomly initialised layers on top of the base


def _parents(paths: Sequence[str]) -> set[str]:
  return {p.rsplit("/", 1)[0] for p in paths if "/" in p}


def structural_paths(params: Any, *, batch_stats: Any = None, selection: str) -> list[str]:
  """Parameter paths of one selection, found from the pytree's structure.

  * ``scale_bias``: ``scale`` and ``bias`` of every BatchNorm layer, i.e. of every
    module that also has running statistics (``mean``) in ``batch_stats``.
  * ``depthwise``: every depthwise kernel: a 4-D HWIO ``kernel`` with one input
    channel per group and several output channels (``[k, k, 1, C]``).
  * ``head``: the new target head (and Bi-Tuning's projector, when present).
  * ``all``: every parameter.
  """
  flat = flatten_paths(params)
  if selection == "scale_bias":
    if not batch_stats:
      raise ValueError("the scale_bias selection needs the model's batch_stats to find its "
                       "BatchNorm layers; this model has none")
    bn_modules = _parents([p for p in flatten_paths(batch_stats) if p.endswith("/mean")])
    return [p for p in flat if p.rsplit("/", 1)[0] in bn_modules and p.rsplit("/", 1)[-1] in ("scale", "bias")]
  if selection == "depthwise":
    return [p for p, leaf in flat.items() if p.endswith("/kernel") and getattr(leaf, "ndim", 0) == 4
            and leaf.shape[2] == 1 and leaf.shape[3] > 1]
  if selection == "head":
    return [p for p in flat if re.fullmatch(NEW_HEADS, p)]
  if selection == "all":
    return list(flat)
  raise ValueError(f"unknown patch selection {selection!r}; known: {', '.join(SELECTIONS)} "
                   f"(and unions such as 'scale_bias+head')")


def parse_selection(selection: str | Sequence[str]) -> list[str]:
  """``"scale_bias+head"`` or ``["scale_bias", "head"]`` -> ``["scale_bias", "head"]``."""
  parts = selection.split("+") if isinstance(selection, str) else list(selection)
  parts = [p.strip() for p in parts if p.strip()]
  if not parts:
    raise ValueError("empty patch selection; use one of " + ", ".join(SELECTIONS))
  for p in parts:
    if p not in SELECTIONS:
      raise ValueError(f"unknown patch selection {p!r}; known: {', '.join(SELECTIONS)}")
  return parts


def selection_regex(params: Any, *, batch_stats: Any = None, selection: str | Sequence[str]) -> str:
  """A readable regex that fully matches exactly the parameters of ``selection``.

  The regex names layer *kinds* (e.g. ``(?:.*/)?(?:bn1|bn2|stem_bn)/(?:scale|bias)``)
  rather than listing every path, so the rule log stays short; it is checked
  against the structural selection and a ValueError names any parameter on
  which the two disagree (a non-BatchNorm layer named like one, say).
  """
  parts = parse_selection(selection)
  if "all" in parts:
    return ".*"
  regexes, expected = [], set()
  for part in parts:
    paths = structural_paths(params, batch_stats=batch_stats, selection=part)
    expected.update(paths)
    if part == "head":
      regexes.append(NEW_HEADS)
      continue
    if not paths:
      raise ValueError(f"the {part} selection matches no parameter of this model")
    layer_names = sorted({p.rsplit("/", 2)[-2] for p in paths})
    leaves = sorted({p.rsplit("/", 1)[-1] for p in paths})
    regexes.append(f"(?:.*/)?(?:{'|'.join(map(re.escape, layer_names))})/(?:{'|'.join(leaves)})")
  regex = "|".join(regexes)
  matched = {p for p in flatten_paths(params) if re.fullmatch(regex, p)}
  if matched != expected:
    extra, missing = sorted(matched - expected), sorted(expected - matched)
    raise ValueError(f"selection {'+'.join(parts)}: layer-name regex {regex!r} disagrees with the "
                     f"model's structure; also matches {extra}, misses {missing}")
  return regex


def patch_rules(params: Any, *, batch_stats: Any = None, selection: str | Sequence[str],
                train_head: bool = True) -> list[tuple[str, str]]:
  """Rules that train a patch (group ``patch``), the head (``head``) and freeze the rest.

  Args:
    params, batch_stats: the model's variables.
    selection: e.g. ``"scale_bias"``, ``"depthwise"``, ``"scale_bias+depthwise"``.
    train_head: train the new head (the paper's "+ last layer"); False leaves it
      at its random initialisation (the "random fixed last layer" row). A
      selection that names ``head`` trains it either way.

  Returns:
    ``(regex, group)`` rules covering every parameter exactly once.

  Example:
    >>> from ftjax import models
    >>> from ftjax.core.paths import group_sizes, path_labels
    >>> model = models.create_model("resnet_tiny", num_classes=3)
    >>> v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    >>> rules = patch_rules(v["params"], batch_stats=v["batch_stats"], selection="scale_bias")
    >>> labels = path_labels(v["params"], rules)
    >>> sorted(group_sizes(v["params"], labels))
    ['frozen', 'head', 'patch']
  """
  claimed = _claimed_rules(params, batch_stats=batch_stats, selection=selection, train_head=train_head)
  if claimed == [(".*", "patch")]:
    return claimed
  return claimed + [("".join(f"(?!(?:{regex})$)" for regex, _ in claimed) + ".*", "frozen")]


def _claimed_rules(params: Any, *, batch_stats: Any, selection: str | Sequence[str],
                   train_head: bool) -> list[tuple[str, str]]:
  """The patch's rule and the head's rule (the rest is frozen by the caller)."""
  parts = parse_selection(selection)
  if "all" in parts:
    return [(".*", "patch")]
  train_head = train_head or "head" in parts
  body_parts = [p for p in parts if p != "head"]
  # The target head only: a method that adds a head (Bi-Tuning's projector) claims it itself.
  head_rule = ("head/.*", "head" if train_head else "frozen")
  if not body_parts:
    return [head_rule]
  body = selection_regex(params, batch_stats=batch_stats, selection=body_parts)
  return [(body, "patch"), head_rule]


class Patch(NamedTuple):
  """A trained patch: its parameters (and BatchNorm statistics), by '/'-path."""
  params: dict[str, np.ndarray]
  batch_stats: dict[str, np.ndarray]
  info: dict[str, Any]


class PatchSize(NamedTuple):
  parameters: int       # scalar parameters in the patch (statistics not counted)
  bytes: int            # bytes of every array stored (parameters and statistics)
  percent: float        # parameters as % of the model's parameters


def extract_patch(variables: Mapping[str, Any], labels: Any, *, groups: Sequence[str] = ("patch", "head"),
                  include_batch_stats: bool = True, info: Mapping[str, Any] | None = None) -> Patch:
  """The parameters labelled with one of ``groups`` (plus, optionally, all BatchNorm statistics).

  With BatchNorm statistics re-estimated on the task (the paper's scale-and-bias
  patch), the statistics belong to the patch: ``include_batch_stats=True``.
  """
  params = flatten_paths(variables["params"])
  label_of = dict(zip(params, jax.tree.leaves(labels)))
  kept = {p: np.asarray(v) for p, v in params.items() if label_of[p] in groups}
  if not kept:
    raise ValueError(f"no parameter is labelled {list(groups)}; labels used: {sorted(set(label_of.values()))}")
  stats = {p: np.asarray(v) for p, v in flatten_paths(variables.get("batch_stats", {})).items()} \
      if include_batch_stats else {}
  return Patch(kept, stats, dict(info or {}))


def patch_size(patch: Patch, base_params: Any) -> PatchSize:
  total = sum(int(np.size(v)) for v in jax.tree.leaves(base_params))
  n = sum(int(v.size) for v in patch.params.values())
  nbytes = sum(int(v.nbytes) for v in patch.params.values()) + sum(
      int(v.nbytes) for v in patch.batch_stats.values())
  return PatchSize(n, nbytes, 100.0 * n / max(total, 1))


def save_patch(path: str | os.PathLike, patch: Patch) -> str:
  """Writes ``patch`` to one ``.npz`` file, atomically (a killed write leaves no partial file)."""
  path = os.fspath(path)
  arrays = {f"params/{k}": v for k, v in patch.params.items()}
  arrays.update({f"batch_stats/{k}": v for k, v in patch.batch_stats.items()})
  arrays["__info__"] = np.asarray(json.dumps(patch.info, sort_keys=True))
  return save_npz(path, **arrays)


def load_patch(path: str | os.PathLike) -> Patch:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"patch file {path!r} does not exist")
  with np.load(path, allow_pickle=False) as z:
    params = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("params/")}
    stats = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("batch_stats/")}
    info = json.loads(str(z["__info__"])) if "__info__" in z.files else {}
  return Patch(params, stats, info)


def apply_patch(base_variables: Mapping[str, Any], patch: Patch) -> dict[str, Any]:
  """A copy of ``base_variables`` with the patch's arrays in place.

  Raises:
    ValueError: a patch path the base lacks, or a shape that differs (names them).
  """
  out = {}
  for collection, entries in (("params", patch.params), ("batch_stats", patch.batch_stats)):
    if collection not in base_variables:
      if entries:
        raise ValueError(f"the patch has {collection} but the base variables do not")
      continue
    flat, treedef = jax.tree_util.tree_flatten_with_path(base_variables[collection])
    names = [path_str(p) for p, _ in flat]
    unknown = sorted(set(entries) - set(names))
    if unknown:
      raise ValueError(f"patch {collection} not in the base model: {', '.join(unknown)}")
    leaves = []
    for name, (_, leaf) in zip(names, flat):
      if name in entries:
        if tuple(entries[name].shape) != tuple(np.shape(leaf)):
          raise ValueError(f"patch {collection} {name} has shape {entries[name].shape}, "
                           f"the base has {np.shape(leaf)}")
        leaves.append(np.asarray(entries[name], dtype=np.asarray(leaf).dtype))
      else:
        leaves.append(leaf)
    out[collection] = jax.tree_util.tree_unflatten(treedef, leaves)
  for collection, value in base_variables.items():
    out.setdefault(collection, value)
  return out


def holds_statistics(selection: str | Sequence[str]) -> bool:
  """Whether a patch of ``selection`` holds the BatchNorm statistics (re-estimated on the task).

  The paper's scale-and-bias patch is "all the γ, β, μ, σ" (Sec. 2), so a selection with
  ``scale_bias`` (or ``all``: full fine-tuning) re-estimates them; every other parameter,
  statistics included, is "left unchanged" (Sec. 2, transfer learning): a last-layer or
  depthwise patch runs on the pretrained statistics.

  Example:
    >>> holds_statistics("scale_bias+head"), holds_statistics("depthwise"), holds_statistics("head")
    (True, False, False)
  """
  parts = parse_selection(selection)
  return "scale_bias" in parts or "all" in parts


@dataclasses.dataclass(frozen=True)
class ModelPatch(Method):
  """Train only a patch (± the last layer); the rest of the pretrained model stays fixed.

  The method owns the rules of the patch (group ``patch``) and of the head
  (``head``, or ``frozen`` for the paper's "random fixed last layer"); the
  baseline's rules cover the rest (``baseline = "patch"`` freezes it).

  BatchNorm statistics follow the paper's definition of the patch
  (:func:`holds_statistics`): a scale-and-bias patch re-estimates them on the task
  (BatchNorm mode ``train``) and they belong to the patch; a last-layer or
  depthwise patch keeps the pretrained ones (mode ``eval``: App. B.1 "fine-tuning
  with frozen statistics"). ``bn_statistics="task"`` re-estimates them anyway (the
  paper's Table 5 row "last layer + batchnorm statistics"), ``"pretrained"``
  keeps them; ``config.bn_mode`` overrides all of this. After training the chosen
  checkpoint's patch is written on its own (``patch.npz``: the patch, the head and,
  when they were re-estimated, every BatchNorm mean and variance; apply it to the
  base with :func:`apply_patch`).

  Attributes:
    selection: ``scale_bias``, ``depthwise``, ``head``, ``all``, or a union
      such as ``"scale_bias+depthwise"``.
    train_head: train the new head (the paper's "+ last layer").
    bn_statistics: ``"auto"`` (as the patch's definition), ``"task"`` or ``"pretrained"``.
  """
  selection: str = "scale_bias"
  train_head: bool = True
  bn_statistics: str = "auto"
  weight: float = 0.0
  name: str = "patch"

  @property
  def bn_mode(self) -> str:  # type: ignore[override]
    if self.bn_statistics == "task":
      return "train"
    if self.bn_statistics == "pretrained":
      return "eval"
    return "train" if holds_statistics(self.selection) else "eval"

  def __post_init__(self):
    parse_selection(self.selection)  # raises on an unknown selection
    if self.bn_statistics not in ("auto", "task", "pretrained"):
      raise ConfigError(f"patch bn_statistics must be 'auto', 'task' or 'pretrained', got {self.bn_statistics!r}")

  def param_rules(self, *, variables: Any) -> list[tuple[str, str]]:
    if variables is None:
      raise ConfigError("the patch baseline needs the model's variables to find its patch parameters")
    return _claimed_rules(variables["params"], batch_stats=variables.get("batch_stats"),
                          selection=self.selection, train_head=self.train_head)

  def param_groups(self) -> dict[str, dict[str, Any]]:
    return {"patch": {}, "frozen": {"frozen": True}}

  def finalize(self, context: RunContext) -> dict[str, Any]:
    """Extracts the chosen checkpoint's patch, saves ``patch.npz``, returns its size."""
    dataset = context.dataset
    patch = extract_patch(
        jax.device_get(context.variables), context.labels, include_batch_stats=context.bn_mode == "train",
        info={"model": context.model_name, "pretrained": context.pretrained, "selection": self.selection,
              "train_head": self.train_head, "dataset": dataset.name, "num_classes": dataset.num_classes,
              "image_size": context.image_size,
              "bn_statistics": "task" if context.bn_mode == "train" else "pretrained"})
    size = patch_size(patch, context.base_variables["params"])
    if jax.process_index() == 0 and context.workdir:
      save_patch(os.path.join(context.workdir, "patch.npz"), patch)
    return {"patch_parameters": size.parameters, "patch_bytes": size.bytes, "patch_percent": size.percent,
            "patch_bn_statistics": "task" if patch.batch_stats else "pretrained"}

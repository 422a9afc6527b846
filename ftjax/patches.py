"""Regex rules over parameter paths: which parameters train, and how.

A *rule* is a ``(regex, group)`` pair; a parameter whose "/"-joined path
(e.g. ``backbone/blocks_3/depthwise_bn/scale``) fully matches the regex belongs
to ``group``. Every parameter must match exactly one rule: a parameter that no
rule covers, or that two rules cover, is an error that names the paths, so a
typo in a rule can never silently freeze (or train) a layer.

The labels feed :func:`optax.partition` (see :mod:`ftjax.train.optim`).

Example:
  >>> rules = [("head/.*", "head"), ("backbone/.*", "backbone")]
  >>> labels = path_labels(params, rules)   # same tree as params, str leaves
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

Rules = Sequence[tuple[str, str]]


def path_str(path: tuple[Any, ...]) -> str:
  """'/'-joined names of a ``jax.tree_util`` key path."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  return "/".join(parts)


def param_paths(tree: Any) -> list[str]:
  """All leaf paths of ``tree`` in flattening order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class RuleError(ValueError):
  """A parameter is covered by no rule or by more than one."""


def path_labels(params: Any, rules: Rules, *, log: bool = False) -> Any:
  """Maps each parameter to the group of the one rule that matches its path.

  Args:
    params: parameter pytree (nested dicts).
    rules: ``(regex, group)`` pairs; regexes are matched with ``re.fullmatch``.
    log: log one line per rule with how many parameters it matched.

  Returns:
    A pytree with the structure of ``params`` whose leaves are group names.

  Raises:
    RuleError: naming every uncovered path and every path matched twice.
  """
  compiled = [(re.compile(regex), group) for regex, group in rules]
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  labels, uncovered, doubly = [], [], []
  counts = [0] * len(compiled)
  sizes = [0] * len(compiled)
  for path, leaf in flat:
    name = path_str(path)
    hits = [i for i, (rx, _) in enumerate(compiled) if rx.fullmatch(name)]
    if not hits:
      uncovered.append(name)
      labels.append(None)
      continue
    if len(hits) > 1:
      doubly.append(f"{name} (rules {', '.join(repr(rules[i][0]) for i in hits)})")
    counts[hits[0]] += 1
    sizes[hits[0]] += int(getattr(leaf, "size", 1))
    labels.append(compiled[hits[0]][1])
  problems = []
  if uncovered:
    problems.append(f"{len(uncovered)} parameter(s) match no rule: {', '.join(uncovered)}")
  if doubly:
    problems.append(f"{len(doubly)} parameter(s) match several rules: {'; '.join(doubly)}")
  if problems:
    raise RuleError("; ".join(problems))
  if log:
    for (regex, group), n, size in zip(rules, counts, sizes):
      logging.info("rule %-40r -> %-10s matches %4d arrays, %10d parameters", regex, group, n, size)
  return jax.tree_util.tree_unflatten(treedef, labels)


def group_sizes(params: Any, labels: Any) -> dict[str, int]:
  """Number of scalar parameters in each group."""
  sizes: dict[str, int] = {}
  for leaf, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
    sizes[label] = sizes.get(label, 0) + int(leaf.size)
  return sizes


def check_groups(labels: Any, groups: Mapping[str, Any]) -> None:
  """Every label used by the rules must have a group configuration."""
  missing = sorted(set(jax.tree.leaves(labels)) - set(groups))
  if missing:
    raise RuleError(f"rules use group(s) {missing} that have no configuration; configured: {sorted(groups)}")


# ----------------------------------------------------------------------------- model patches
#
# Mudrakarta et al. (2019), "K for the price of 1": a *patch* is a small set of
# parameters trained on a task while the rest of a shared base stays fixed. The
# selections below find those parameters from the structure of the pytree (so
# they work on any model) and turn them into ordinary rules above, so a patch is
# trained through the same optax.partition and exactly-once check as everything
# else.

SELECTIONS = ("scale_bias", "depthwise", "head", "all")
NEW_HEADS = "(?:head|projector)/.*"   # randomly initialised layers on top of the base


def _parents(paths: Sequence[str]) -> set[str]:
  return {p.rsplit("/", 1)[0] for p in paths if "/" in p}


def flatten_paths(tree: Any) -> dict[str, Any]:
  """``{"a/b/c": leaf}`` of a pytree, keyed by :func:`path_str` (inverse: :func:`unflatten_paths`)."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_paths(flat: dict[str, Any]) -> dict[str, Any]:
  """Nested dicts from ``{"a/b/c": leaf}`` (the inverse of flattening by :func:`path_str`)."""
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    *parents, last = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf
  return tree


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
    >>> rules = patch_rules(v["params"], batch_stats=v["batch_stats"], selection="scale_bias")
    >>> labels = path_labels(v["params"], rules, log=True)
  """
  parts = parse_selection(selection)
  if "all" in parts:
    return [(".*", "patch")]
  train_head = train_head or "head" in parts
  body_parts = [p for p in parts if p != "head"]
  head_rule = (NEW_HEADS, "head" if train_head else "frozen")
  if not body_parts:
    return [head_rule, (f"(?!{NEW_HEADS}$).*", "frozen")]
  body = selection_regex(params, batch_stats=batch_stats, selection=body_parts)
  return [(body, "patch"), head_rule, (f"(?!(?:{body})$)(?!{NEW_HEADS}$).*", "frozen")]


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
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path), suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


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

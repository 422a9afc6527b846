"""Parameter paths and regex rules over them: which parameters train, and how.

A *rule* is a ``(regex, group)`` pair; a parameter whose "/"-joined path
(e.g. ``backbone/blocks_3/depthwise_bn/scale``) fully matches the regex belongs
to ``group``. Every parameter must match exactly one rule: a parameter that no
rule covers, or that two rules cover, is an error that names the paths, so a
typo in a rule can never silently freeze (or train) a layer.

The labels feed :func:`optax.partition` (see :mod:`ftjax.train.optim`).

Example:
  >>> params = {"head": {"kernel": np.ones(2)}, "backbone": {"conv": {"kernel": np.ones(3)}}}
  >>> rules = [("head/.*", "head"), ("backbone/.*", "backbone")]
  >>> path_labels(params, rules)   # same tree as params, str leaves
  {'backbone': {'conv': {'kernel': 'backbone'}}, 'head': {'kernel': 'head'}}
  >>> flatten_paths(params)["backbone/conv/kernel"].shape
  (3,)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np  # noqa: F401  (the module docstring's example uses it)

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


def claim_first(first: Rules, rest: Rules) -> list[tuple[str, str]]:
  """``first`` followed by ``rest`` restricted to the paths no rule of ``first`` matches.

  A method's own rules claim their parameters first; the baseline's rules then
  cover the rest. The result is an ordinary rule list, so the exactly-once
  check of :func:`path_labels` still applies within each part.

  Example:
    >>> claim_first([("policy/.*", "policy")], [(".*", "all")])
    [('policy/.*', 'policy'), ('(?!(?:policy/.*)$)(?:.*)', 'all')]
  """
  first = [tuple(r) for r in first]
  if not first:
    return [tuple(r) for r in rest]
  claimed = "|".join(regex for regex, _ in first)
  return first + [(f"(?!(?:{claimed})$)(?:{regex})", group) for regex, group in rest]

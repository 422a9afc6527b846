"""A config's seeds trained as one jitted program, vmapped over a leading seed axis.

With ``config.vmap_seeds = True``, :func:`ftjax.train.report.run_all` trains the
``num_seeds`` seeds of each variant together (:func:`train_and_evaluate_seeds`):

* Each seed is set up exactly as a serial seed (:func:`ftjax.train.setup.setup_run`
  in ``<variant>/seed<N>``): its own sampled subset, head initialisation, method
  preparation and state, and rngs. The states are stacked on a new leading axis
  (the method states, Bi-Tuning's queues included, with them).
* One train step, the serial step function vmapped over that axis, takes a
  stacked batch: each seed's own input pipeline (its subset, augmentation and
  order) gives its slice, so the seeds see what they see serially.
* Validation and the test run per seed with the serial evaluation step on that
  seed's variables; the best checkpoint is chosen per seed on its validation
  split; the methods' analyses (``finalize``) run per seed. Each seed's
  ``metrics.jsonl`` and ``results.json`` are written in its own directory as for
  a serial seed; the record adds ``"vmap_seeds": true``.
* The stacked train state and the stacked best variables are one checkpoint under
  ``<variant>/seeds<first>-<last>/checkpoints``; a killed run resumes from it as a
  serial run does from its own.

The seeds must train for the same number of steps and validate at the same steps
(one program steps them together): when their subsets give different epoch lengths
the run is refused with a :class:`~ftjax.core.errors.ConfigError` asking for
``num_steps``/``eval_every_steps`` (no masking: a masked seed would not be the
serial run it stands for).

A method whose preparation gives each seed different arrays (a relationship
learned on that seed's subset) has them passed into the step as vmapped operands;
a prepared value that differs between seeds and is not numeric is refused, one
line, as that method cannot run vmapped.

Numbers: on CPU the kernels of :mod:`ftjax.ops` (oneDNN convolutions, max pool,
channel sums) run each seed's call in turn under ``vmap`` (``vmap_method=
"sequential"``, the seeds' weights differ), and the tiny run's vmapped seeds equal
its serial seeds bitwise (tests/test_vmap_seeds.py). Where XLA batches the seeds'
ops itself (``FTJAX_CONV_IMPL=xla``, GPUs, TPUs) they agree up to float32 rounding,
which SGD amplifies over steps.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from ftjax.core.errors import ConfigError
from ftjax.train import sharding as shd
from ftjax.train.loop import finish_run, fit, train_batches, validate_run
from ftjax.train.metrics import MetricWriter
from ftjax.train.setup import Run, semantic_config, setup_run
from ftjax.train.workdir_lock import hold_workdir


def stacked_dir_name(seeds: Sequence[int]) -> str:
  """The directory of the stacked checkpoint of ``seeds`` under the variant's directory.

  Example:
    >>> stacked_dir_name([0, 1, 2])
    'seeds0-2'
  """
  return f"seeds{int(seeds[0])}-{int(seeds[-1])}"


def stack(trees: Sequence[Any]) -> Any:
  """The trees with a new leading axis (one entry per tree) on every leaf.

  Example:
    >>> stack([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])["w"].shape
    (2, 2)
  """
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree: Any, index: int) -> Any:
  """Entry ``index`` of every leaf's leading axis."""
  return jax.tree.map(lambda leaf: leaf[index], tree)


def stacked_batch_sharding(mesh) -> NamedSharding:
  """A stacked batch ``[seeds, rows, ...]``: rows sharded on ``"data"``, seeds whole on every device."""
  return shd.batch_sharding(mesh, row_axis=1)


def stacked_global_batch(local_batch: dict[str, Any], mesh) -> dict[str, jax.Array]:
  """Process-local stacked batch ``[seeds, local rows, ...]`` -> global arrays (rows on ``"data"``)."""
  return shd.global_batch(local_batch, mesh, row_axis=1)


def _stack_host(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The seeds' host batches as one batch with a leading seed axis (nested dicts per leaf)."""
  out = {}
  for name, first in batches[0].items():
    values = [b[name] for b in batches]
    out[name] = _stack_host(values) if isinstance(first, dict) else np.stack(values)
  return out


class SeedWriters:
  """The metric writers of the seeds, fed rows with a leading seed axis.

  :meth:`write` gives seed ``i`` entry ``i`` of every value that has the seed
  axis and the same number for every other value (the learning rate), so each
  seed's ``metrics.jsonl`` holds what a serial run writes.
  """

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    count = len(self.writers)
    for i, writer in enumerate(self.writers):
      writer.write(step, split, {key: (np.asarray(v)[i] if np.ndim(v) >= 1 and np.shape(v)[0] == count else v)
                                 for key, v in values.items()})

  def truncate_after(self, step: int) -> None:
    for writer in self.writers:
      writer.truncate_after(step)

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


# ----------------------------------------------------------------------------- methods


def _same(a: Any, b: Any) -> bool:
  """Whether two prepared values are equal (arrays by value, pytrees leaf by leaf)."""
  if a is b:
    return True
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  if tree_a != tree_b:
    return False
  for x, y in zip(leaves_a, leaves_b):
    if isinstance(x, (np.ndarray, jax.Array)) or isinstance(y, (np.ndarray, jax.Array)):
      x, y = np.asarray(x), np.asarray(y)
      if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=True):
        return False
      continue
    try:
      if not bool(x == y):
        return False
    except Exception:  # noqa: BLE001 - not comparable: treated as different
      return False
  return True


def _numeric(value: Any) -> bool:
  """Whether ``value`` is a number or a numeric array (it can ride a vmapped axis)."""
  if isinstance(value, (np.ndarray, jax.Array)):
    return bool(np.issubdtype(np.asarray(value).dtype, np.number))
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


class MethodFields(NamedTuple):
  """The prepared values of the seeds' methods that differ between seeds.

  Attributes:
    layouts: per method, ``{field: (treedef, seed 0's leaves)}`` of each differing field.
    values: per method, ``{field: {leaf index: the seeds' leaves stacked}}``: the
      leaves that differ, the vmapped operands of the step.
  """
  layouts: list[dict[str, tuple[Any, list[Any]]]]
  values: list[dict[str, dict[str, np.ndarray]]]


def split_methods(per_seed: Sequence[Sequence[Any]]) -> tuple[list[Any], MethodFields]:
  """The seeds' prepared methods as one template each and the values that differ, stacked.

  Args:
    per_seed: ``per_seed[i]`` is seed ``i``'s list of prepared methods.

  Returns:
    ``(templates, fields)``: seed 0's methods, and the leaves of their dataclass
    fields whose prepared values differ between seeds (Co-Tuning's relationship
    and calibration, DELTA's channel weights), stacked on a leading seed axis;
    :func:`with_fields` puts one seed's leaves into a template.

  Raises:
    ConfigError: the seeds have different methods, or a method's prepared value
      differs between seeds where it is not numeric or changes shape (it cannot be
      vmapped).
  """
  templates = list(per_seed[0])
  fields = MethodFields([], [])
  for j, template in enumerate(templates):
    versions = [methods[j] for methods in per_seed]
    if any(type(m) is not type(template) or m.name != template.name for m in versions):
      raise ConfigError("vmap_seeds: the seeds' runs have different methods")
    layouts: dict[str, tuple[Any, list[Any]]] = {}
    values: dict[str, dict[str, np.ndarray]] = {}
    if dataclasses.is_dataclass(template):
      for field in dataclasses.fields(template):
        seeds_values = [getattr(m, field.name) for m in versions]
        if all(_same(seeds_values[0], v) for v in seeds_values[1:]):
          continue
        flat = [jax.tree.flatten(v) for v in seeds_values]
        treedef = flat[0][1]
        refuse = ConfigError(
            f"vmap_seeds: method {template.name!r} prepares {field.name!r} differently for each seed "
            f"where it is not a number or numeric array of one shape, so the seeds cannot share one "
            f"vmapped step; train them serially (vmap_seeds=False)")
        if any(tree != treedef for _, tree in flat[1:]):
          raise refuse
        stacked = {}
        for index, leaves in enumerate(zip(*(leaves for leaves, _ in flat))):
          if all(_same(leaves[0], leaf) for leaf in leaves[1:]):
            continue
          if not all(_numeric(leaf) for leaf in leaves) or len({np.shape(leaf) for leaf in leaves}) > 1:
            raise refuse
          stacked[str(index)] = np.stack([np.asarray(leaf) for leaf in leaves])
        layouts[field.name] = (treedef, list(flat[0][0]))
        values[field.name] = stacked
    elif not all(_same(template, m) for m in versions[1:]):
      raise ConfigError(f"vmap_seeds: method {template.name!r} differs between seeds after preparation "
                        f"(it is not a dataclass whose fields could be vmapped); train the seeds "
                        f"serially (vmap_seeds=False)")
    fields.layouts.append(layouts)
    fields.values.append(values)
  return templates, fields


def with_fields(method: Any, layouts: dict[str, tuple[Any, list[Any]]],
                values: dict[str, dict[str, Any]]) -> Any:
  """A copy of ``method`` holding one seed's ``values`` (leaves by index into ``layouts``).

  No ``__init__``: the values may be traced, which a method's own checks could not take.
  """
  if not layouts:
    return method
  out = copy.copy(method)
  for name, (treedef, leaves) in layouts.items():
    leaves = list(leaves)
    for index, value in values[name].items():
      leaves[int(index)] = value
    object.__setattr__(out, name, jax.tree.unflatten(treedef, leaves))
  return out


# ----------------------------------------------------------------------------- the stacked run


def _check_stackable(runs: Sequence[Run]) -> None:
  """ConfigErrors for seeds that cannot step together (steps, model, parameter groups)."""
  first = runs[0]
  for run in runs[1:]:
    seed = run.config.seed
    if (run.total_steps, run.eval_every) != (first.total_steps, first.eval_every):
      raise ConfigError(
          f"vmap_seeds: seed {first.config.seed} trains {first.total_steps} steps validating every "
          f"{first.eval_every}, seed {seed} {run.total_steps} every {run.eval_every} (their sampled "
          f"subsets have different epoch lengths); set num_steps and eval_every_steps, or vmap_seeds=False")
    if run.model != first.model:
      raise ConfigError(f"vmap_seeds: seed {seed}'s model differs from seed {first.config.seed}'s")
    if not _same(run.training.labels, first.training.labels) or run.training.groups != first.training.groups:
      raise ConfigError(f"vmap_seeds: seed {seed}'s parameter groups differ from seed {first.config.seed}'s")
    if jax.tree.structure(run.training.state) != jax.tree.structure(first.training.state):
      raise ConfigError(f"vmap_seeds: seed {seed}'s train state has another structure than seed "
                        f"{first.config.seed}'s")


def stack_training(runs: Sequence[Run]):
  """One :class:`ftjax.train.setup.Training` for the seeds of ``runs``, stacked.

  Its state is the seeds' states on a leading axis, its source the seeds' frozen
  source models (stacked when they differ, else shared) and its ``train_step``
  the serial step function vmapped over the seed axis and jitted over the mesh
  (state replicated and donated, batch rows on ``"data"``).
  """
  _check_stackable(runs)
  first = runs[0].training
  mesh = first.mesh
  state = stack([run.training.state for run in runs])
  state = jax.device_put(state, shd.state_sharding(mesh, state))
  sources = [run.training.source for run in runs]
  shared_source = all(_same(sources[0], s) for s in sources[1:])
  source = sources[0] if shared_source else jax.device_put(stack(sources), shd.replicated(mesh))
  templates, fields = split_methods([run.methods for run in runs])
  method_values = jax.device_put(fields.values, shd.replicated(mesh))

  def seed_step(seed_state, batch, seed_source, seed_values):
    methods = [with_fields(m, layouts, values)
               for m, layouts, values in zip(templates, fields.layouts, seed_values)]
    return first.make_step(methods)(seed_state, batch, seed_source)

  state_shardings = shd.state_sharding(mesh, state)
  jitted = jax.jit(jax.vmap(seed_step, in_axes=(0, 0, None if shared_source else 0, 0)),
                   in_shardings=(state_shardings, stacked_batch_sharding(mesh), shd.replicated(mesh),
                                 shd.replicated(mesh)),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))

  def train_step(stacked_state, batch, stacked_source):
    return jitted(stacked_state, batch, stacked_source, method_values)

  return first._replace(state=state, source=source, train_step=train_step)


def stacked_semantic(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, Any]:
  """The config record of the stacked checkpoint: the seeds' semantic config with ``seed`` their list."""
  semantic = semantic_config(configs[0])
  semantic["seed"] = [int(c.seed) for c in configs]
  return semantic


def _refuse_serial_checkpoints(run_dirs: Sequence[str]) -> None:
  for run_dir in run_dirs:
    directory = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory)):
      raise ConfigError(f"{run_dir} holds a serial run's checkpoints; a vmapped run of its seed keeps its "
                        f"checkpoint beside it; use a new --workdir (or vmap_seeds=False to resume it)")


def train_and_evaluate_seeds(configs: Sequence[ml_collections.ConfigDict], variant_dir: str
                             ) -> list[dict[str, Any]]:
  """Trains the seeds of ``configs`` (one config per seed, equal but for ``seed``) as one vmapped program.

  Seed ``s`` writes ``variant_dir/seed<s>/`` (metrics, results, the methods'
  files) as a serial run; the stacked checkpoint is in
  ``variant_dir/seeds<first>-<last>/checkpoints``, and a run finding it resumes.
  Holds the lock of every one of these directories.

  Returns:
    The seeds' results records, in order (each with ``"vmap_seeds": True``).

  Raises:
    ConfigError: the seeds cannot step together (different step counts, a method
      whose preparation is not vmappable), a checkpoint of another config, or a
      seed directory with a serial run's checkpoints.
    RunError, FloatingPointError: as :func:`ftjax.train.loop.train_and_evaluate`.
  """
  configs = list(configs)
  seeds = [int(c.seed) for c in configs]
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"vmap_seeds: the seeds must differ, got {seeds}")
  run_dirs = [os.path.join(variant_dir, f"seed{s}") for s in seeds]
  stacked_workdir = os.path.abspath(os.path.join(variant_dir, stacked_dir_name(seeds)))
  with contextlib.ExitStack() as locks:
    for directory in (stacked_workdir, *run_dirs):
      locks.enter_context(hold_workdir(directory))
    _refuse_serial_checkpoints(run_dirs)
    runs = [setup_run(c, d) for c, d in zip(configs, run_dirs)]
    training = stack_training(runs)
    writers = SeedWriters([MetricWriter(run.workdir, tensorboard=run.config.tensorboard) for run in runs])
    # Every seed is evaluated by one compiled evaluation step (the seeds' models are equal).
    eval_step = runs[0].training.eval_step

    def batch_stream(start_step: int) -> Iterator[dict[str, Any]]:
      for batches in zip(*(train_batches(run, start_step) for run in runs)):
        yield _stack_host(batches)

    def validate(state):
      scored = [validate_run(run, eval_step, unstack(state.variables, i)) for i, run in enumerate(runs)]
      return (np.asarray([metric for metric, _ in scored], np.float32),
              {key: np.asarray([row[key] for _, row in scored]) for key in scored[0][1]})

    fitted = fit(config=configs[0], workdir=stacked_workdir, training=training, total_steps=runs[0].total_steps,
                 eval_every=runs[0].eval_every, batch_stream=batch_stream, validate=validate, writer=writers,
                 semantic=stacked_semantic(configs), put_batch=stacked_global_batch, num_seeds=len(runs))
    return [finish_run(run, best=unstack(fitted.best, i), step=fitted.step, writer=writers.writers[i],
                       extra={"vmap_seeds": True})
            for i, run in enumerate(runs)]

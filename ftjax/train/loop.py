"""The trainer: one config and one seed in, a trained model and honest numbers out.

Checkpoints and hyper-parameters are chosen on the validation split; the test
split is evaluated once, at the end, with the checkpoint that scored best on
validation.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ftjax.core.errors import ConfigError, RunError, check_labels
from ftjax.core.io import write_json
from ftjax.data.pipeline import prefetch_to_device
from ftjax.train import sharding as shd
from ftjax.train import step as step_lib
from ftjax.train.checkpoint import Checkpointer
from ftjax.train.preemption import PreemptionWatch, Preempted
from ftjax.train.workdir_lock import hold_workdir
from ftjax.train.config import default_config
from ftjax.train.metrics import MetricWriter
from ftjax.train.setup import semantic_config, setup_run

# Version of the train state's layout in checkpoints. 2: the frozen pretrained
# model is no longer part of the method state (it is rebuilt on resume).
STATE_LAYOUT = 2


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def evaluate(eval_step, variables, dataset, split: str, *, batch_size: int, mesh) -> dict[str, float]:
  totals = None
  for batch in dataset.eval_batches(split, batch_size=batch_size):
    out = eval_step(variables, shd.global_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    raise ValueError(f"the {split} split of {dataset.name} is empty")
  return step_lib.summarize_eval(jax.device_get(totals))


def _same_config(stored: Any, current: Any, default: Any) -> bool:
  """Whether a checkpoint's config ``stored`` describes the run ``current``.

  A key that ``stored`` lacks but whose current value is its default (a setting
  added to ftjax after the checkpoint was written, left at its neutral value)
  does not make the configs differ, so upgrading ftjax does not strand runs.
  """
  if not (isinstance(stored, dict) and isinstance(current, dict)):
    return stored == current
  default = default if isinstance(default, dict) else {}
  for key in set(stored) | set(current):
    if key not in current:
      return False
    if key not in stored:
      if key not in default or current[key] != default[key]:
        return False
    elif not _same_config(stored[key], current[key], default.get(key)):
      return False
  return True


# ----------------------------------------------------------------------------- train


class Fitted(NamedTuple):
  """What :func:`fit` returns: the final state and the checkpoint chosen on validation."""
  state: Any
  best: Any          # {"params", "batch_stats", "metric", "step"}
  step: int


def fit(*, config: ml_collections.ConfigDict, workdir: str, training: Any, total_steps: int, eval_every: int,
        batch_stream: Callable[[int], Iterator[dict[str, Any]]],
        validate: Callable[[Any], tuple[Any, dict[str, Any]]], writer: Any,
        semantic: dict[str, Any] | None = None,
        put_batch: Callable[[dict[str, Any], Any], Any] = shd.global_batch,
        num_seeds: int = 0) -> Fitted:
  """The one training loop: resume, train, log, validate, keep the best, checkpoint.

  Args:
    config: the run config (its semantic part is checked against a checkpoint's).
    workdir: the run directory (checkpoints under ``workdir/checkpoints``).
    training: a :class:`ftjax.train.setup.Training` (state, source, jitted step, schedule, mesh).
    total_steps: steps to train in all.
    eval_every: validate (and checkpoint) every this many steps, and at the end.
    batch_stream: ``start_step -> iterator`` of host batches (label-checked, mixed).
    validate: ``variables -> (metric, row)``: the selection metric and the row logged as ``val``.
    writer: the run's metric writer (``write``, ``truncate_after``).
    semantic: the config record checkpoints carry and are checked against (default:
      :func:`ftjax.train.setup.semantic_config` of ``config``).
    put_batch: ``(host batch, mesh) -> device batch``.
    num_seeds: 0: one run. ``S > 0``: ``S`` seeds stacked on a leading axis
      (:mod:`ftjax.train.vmap_seeds`): the state, the step's metrics, ``validate``'s
      metric and row carry that axis, and the best checkpoint is kept per seed.
  """
  mesh = training.mesh
  state = training.state
  # Scalars too live on the mesh (replicated): multi-process checkpoints cannot
  # hold arrays that sit on one process's device.
  seeds_shape = (num_seeds,) if num_seeds else ()
  best = jax.device_put({"params": _copy(state.params), "batch_stats": _copy(state.batch_stats),
                         "metric": np.full(seeds_shape, -1.0, np.float32),
                         "step": np.zeros(seeds_shape, np.int32)}, shd.replicated(mesh))
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
  semantic = semantic_config(config) if semantic is None else semantic
  state, best, step = _resume(ckpt, writer, state=state, best=best, semantic=semantic, workdir=workdir)

  progress = None
  if config.progress and jax.process_index() == 0:
    from tqdm.auto import tqdm
    # "<variant>/seed<N>": which run of a comparison this bar is.
    name = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(workdir))), os.path.basename(workdir))
    progress = tqdm(total=total_steps, initial=step, desc=name, unit="step", dynamic_ncols=True)
  # Batches go to the devices config.prefetch steps ahead: their copies (and the host
  # pipeline's next batches) overlap the running step instead of waiting for it.
  batches = prefetch_to_device(batch_stream(step), put=lambda batch: put_batch(batch, mesh),
                               size=config.get("prefetch", 2))
  t0, images = time.time(), 0
  try:
    with PreemptionWatch() as watch:
      while step < total_steps:
        state, metrics = training.train_step(state, next(batches), training.source)
        step += 1
        images += config.batch_size
        # Asked at every step, in every process (the processes agree on the step to stop at).
        stop = watch.should_stop(step)
        evaluate_now = step % eval_every == 0 or step == total_steps
        if step % config.log_every_steps == 0 or evaluate_now or stop:
          host = jax.device_get(metrics)
          if not np.all(np.isfinite(host["loss"])):
            loss = float(host["loss"]) if np.ndim(host["loss"]) == 0 else np.asarray(host["loss"]).tolist()
            raise FloatingPointError(_non_finite_message(loss, step, ckpt))
          host["lr"] = training.schedule(step - 1)
          host["images_per_s"] = images / max(time.time() - t0, 1e-9)
          if step % config.log_every_steps == 0 or evaluate_now:
            writer.write(step, "train", host)
          if progress is not None:
            # The mean over seeds when they are stacked.
            postfix = {"loss": f"{float(np.mean(host['loss'])):.3f}"}
            if "accuracy" in host:
              postfix["acc"] = f"{float(np.mean(host['accuracy'])):.2f}"
            progress.set_postfix(**postfix)
        if evaluate_now:
          metric, row = validate(state)
          writer.write(step, "val", row)
          best = _keep_best(best, state, metric, step, mesh)
        if evaluate_now or stop:
          ckpt.save(step, state=state, best=best, record=checkpoint_record(semantic, step))
        if progress is not None:
          progress.update(1)
        if stop:
          ckpt.wait()
          raise Preempted(step=step, signum=watch.stop_signal(), directory=ckpt.directory)
  finally:
    if progress is not None:
      progress.close()
    ckpt.close()
  return Fitted(state=state, best=best, step=step)


def _keep_best(best: Any, state: Any, metric: Any, step: int, mesh: Any) -> Any:
  """``best`` with the state's variables where ``metric`` beats the best so far.

  ``metric`` is a number (one run) or one per seed (a stacked run): then each
  seed's entry of the stacked best variables is replaced where that seed improved.
  """
  if np.ndim(metric) == 0:
    if metric > float(best["metric"]):
      return jax.device_put({"params": _copy(state.params), "batch_stats": _copy(state.batch_stats),
                             "metric": np.float32(metric), "step": np.int32(step)}, shd.replicated(mesh))
    return best
  best_metric, best_step = (np.asarray(x) for x in jax.device_get((best["metric"], best["step"])))
  improved = np.asarray(metric, np.float32) > best_metric
  if not improved.any():
    return best

  def pick(new, old):
    # jnp.where writes new buffers: the state's are donated to the next step.
    return jnp.where(jnp.asarray(improved).reshape((-1,) + (1,) * (np.ndim(new) - 1)), new, old)

  return jax.device_put({
      "params": jax.tree.map(pick, state.params, best["params"]),
      "batch_stats": jax.tree.map(pick, state.batch_stats, best["batch_stats"]),
      "metric": np.where(improved, np.asarray(metric, np.float32), best_metric).astype(np.float32),
      "step": np.where(improved, np.int32(step), best_step).astype(np.int32)}, shd.replicated(mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` (one seed) into ``workdir``, resuming if a checkpoint is there.

  Holds ``workdir``'s lock (:mod:`ftjax.train.workdir_lock`) throughout: a second
  job on the same directory refuses.

  Returns the results record (also written to ``workdir/results.json``).

  Raises:
    ConfigError: a bad config, or a checkpoint of another config or state layout.
    RunError: the workdir is locked by another job, no checkpoint restores, a
      checkpoint write failed, or the run was preempted (:class:`Preempted`).
    FloatingPointError: the loss became non-finite.
  """
  if config.get("vmap_seeds", False):
    raise ConfigError("vmap_seeds=True trains a config's seeds together: run it with "
                      "ftjax.train.report.run_all (experiments/train.py), or set vmap_seeds=False")
  with hold_workdir(workdir):
    return _train_and_evaluate(config, workdir)


def train_batches(run: Any, start_step: int) -> Iterator[dict[str, Any]]:
  """The host train batches of ``run`` (a :class:`ftjax.train.setup.Run`) from ``start_step``:
  label-checked, with the methods' extra rows mixed in."""
  config, dataset = run.config, run.dataset
  batches = dataset.train_batches(batch_size=config.batch_size, start_step=start_step,
                                  views=run.context.views)
  extra = [(m, m.extra_batches(batch_size=config.batch_size, start_step=start_step)) for m in run.methods]
  extra = [(m, stream) for m, stream in extra if stream is not None]
  for batch in batches:
    check_labels(batch["label"], dataset.num_classes)
    for m, stream in extra:
      batch = m.mix_batch(batch=batch, extra=next(stream))
    yield batch


def validate_run(run: Any, eval_step: Callable, variables: Any) -> tuple[float, dict[str, float]]:
  """``(selection metric, val row)`` of ``variables`` on ``run``'s validation split."""
  config = run.config
  val = evaluate(eval_step, variables, run.dataset, "val", batch_size=config.eval_batch_size,
                 mesh=run.training.mesh)
  return val[config.selection_metric], val


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  run = setup_run(config, workdir)
  training = run.training
  writer = MetricWriter(run.workdir, tensorboard=config.tensorboard)
  fitted = fit(config=config, workdir=run.workdir, training=training, total_steps=run.total_steps,
               eval_every=run.eval_every, batch_stream=lambda start: train_batches(run, start),
               validate=lambda state: validate_run(run, training.eval_step, state.variables), writer=writer)
  return finish_run(run, best=fitted.best, step=fitted.step, writer=writer)


def finish_run(run: Any, *, best: Any, step: int, writer: MetricWriter,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Tests ``run``'s best checkpoint once, runs the methods' analyses, writes ``results.json``.

  Args:
    run: the :class:`ftjax.train.setup.Run`.
    best: its best variables chosen on validation (``params``, ``batch_stats``, ``metric``, ``step``).
    step: the steps trained.
    writer: its metric writer (closed here).
    extra: entries added to the results record (a stacked run's ``vmap_seeds``).

  Returns:
    The results record.
  """
  config, workdir, dataset, training = run.config, run.workdir, run.dataset, run.training
  mesh = training.mesh
  best_vars = {"params": best["params"]}
  if best["batch_stats"]:
    best_vars["batch_stats"] = best["batch_stats"]
  results = {
      "seed": config.seed,
      "best_val": float(best["metric"]),
      "best_step": int(best["step"]),
      "selection_metric": config.selection_metric,
      "num_train": dataset.num_examples["train"],
      "num_val": dataset.num_examples["val"],
      "steps": step,
      "trainable_parameters": sum(n for g, n in training.sizes.items() if g not in training.frozen),
      "total_parameters": sum(training.sizes.values()),
      **(extra or {}),
  }
  if not config.get("evaluate_test", True):
    # A sweep run: validation only. No test figures, no after-training analyses
    # (SpotTune's routing statistics read the test split).
    writer.close()
    results["test_evaluated"] = False
    if jax.process_index() == 0:
      write_json(os.path.join(workdir, "results.json"), results)
    return results
  test = evaluate(training.eval_step, best_vars, dataset, "test", batch_size=config.eval_batch_size, mesh=mesh)
  writer.write(step, "test", test)
  writer.close()
  results.update({"test_top1": test["top1"], "test_mean_per_class": test["mean_per_class"],
                  "num_test": int(test["count"])})
  # The methods' after-training analyses (SpotTune's routing of the test split, a patch's file).
  final = run.context._replace(variables=best_vars, labels=training.labels, base_variables=run.variables)
  for m in run.methods:
    results.update(m.finalize(final))
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "results.json"), results)
  return results


def _resume(ckpt: Checkpointer, writer: MetricWriter, *, state: Any, best: Any, semantic: dict[str, Any],
            workdir: str) -> tuple[Any, Any, int]:
  """``(state, best, step)`` from the newest checkpoint of ``workdir`` that restores.

  Each checkpoint's record (state layout, config) is checked before its arrays
  are read: a checkpoint of another config or layout is refused, not taken for
  a damaged one. When a checkpoint's record or arrays cannot be read but an
  older checkpoint restores, the newer ones are damaged: each is reported by
  name and moved aside (:meth:`Checkpointer.move_aside`, never deleted). When
  none restores, nothing is moved (the cause may be this program rather than
  the files) and one error names them. No checkpoint at all: ``state`` and
  ``best`` as given.

  Raises:
    ConfigError: a checkpoint of another config or an older state layout.
    RunError: there are checkpoints and none of them restores.
  """
  failed: list[tuple[int, BaseException]] = []
  for start in ckpt.all_steps():
    try:
      record = ckpt.read_record(start)
    except Exception as e:  # noqa: BLE001 - any read failure: this checkpoint may be damaged
      failed.append((start, e))
      continue
    check_record(record, semantic=semantic, workdir=workdir, directory=ckpt.directory)
    try:
      restored_state, restored_best, _ = ckpt.restore(start, state=state, best=best)
    except Exception as e:  # noqa: BLE001
      failed.append((start, e))
      continue
    for step, error in failed:
      _set_aside(ckpt, step, error)
    writer.truncate_after(start)
    logging.info("resumed from step %d", start)
    return restored_state, restored_best, _step_of(restored_state)
  if failed:
    reasons = "; ".join(f"step {step}: {_reason(error)}" for step, error in failed)
    raise RunError(f"no checkpoint in {ckpt.directory} restores ({reasons[:600]}); they are left as they "
                   f"are: move them away (or use a new --workdir) to start over")
  writer.truncate_after(0)  # a killed run that never checkpointed starts over
  return state, best, _step_of(state)


def _step_of(state: Any) -> int:
  """The state's step (a stacked state's seeds all stand at the same step)."""
  return int(np.max(jax.device_get(state.step)))


def _reason(error: BaseException) -> str:
  """The first line of the innermost cause (the reader's own error, not Orbax's wrapper)."""
  while error.__cause__ is not None:
    error = error.__cause__
  first = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {first[:300]}"


def _set_aside(ckpt: Checkpointer, step: int, error: BaseException) -> str:
  target = ckpt.move_aside(step)
  logging.warning("checkpoint %s does not restore (%s) but an older one does; moved it to %s (kept) and "
                  "resuming from the older one", os.path.join(ckpt.directory, str(step)), _reason(error),
                  target)
  return target


def _non_finite_message(loss: Any, step: int, ckpt: Checkpointer) -> str:
  """The one-line error of a non-finite loss (``loss``: a number, or a list with one per seed)."""
  steps = ckpt.all_steps()
  where = (f"the last checkpoint is step {steps[0]} in {ckpt.directory}" if steps
           else "no checkpoint was written yet")
  return f"non-finite loss {loss} at step {step}; {where} (lower optimizer.lr?)"


def checkpoint_record(semantic: dict[str, Any], step: int) -> dict[str, Any]:
  """The JSON record saved with every checkpoint: the state layout, the run's config, the step."""
  return {"layout": STATE_LAYOUT, "config": semantic, "step": int(step)}


def check_record(record: dict[str, Any], *, semantic: dict[str, Any] | None, workdir: str,
                 directory: str) -> None:
  """Refuses a checkpoint of another state layout or (``semantic`` given) another config."""
  layout = record.get("layout", 1)
  if layout != STATE_LAYOUT:
    raise ConfigError(f"{workdir} holds a checkpoint in state layout {layout} (an older ftjax: the "
                      f"pretrained model was kept in the method state); this version reads layout "
                      f"{STATE_LAYOUT}; use a new --workdir (or delete {directory}) to start over")
  if semantic is not None and not _same_config(record.get("config"), semantic,
                                               semantic_config(default_config())):
    raise ConfigError(f"{workdir} holds a checkpoint of a different config; use a new --workdir "
                      f"(or delete {directory}) to start over")

r"""Trains a config: ``python -m experiments.train --config experiments/configs/default.py --workdir DIR``.

Any field can be overridden: ``--config.dataset.sampling_rate=5 --config.num_epochs=3``.
A config with ``compare`` variants trains each and prints a results table.
The console shows warnings and ftjax's own lines; ``--verbosity=0`` adds the INFO logs
of ftjax and the libraries, ``--verbosity=1`` DEBUG (absl's convention).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from ftjax.core import console

config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally `:arg`.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0's coordinator "
                    "(default $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes (default $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index (default $JAX_PROCESS_ID).")
flags.DEFINE_bool("distributed_auto", False, "Let JAX detect the cluster (Slurm, Cloud TPU pod slice, MPI).")
flags.DEFINE_integer("heartbeat_timeout", 30, "Seconds after which a silent peer process counts as dead.")
flags.DEFINE_bool("retain_host_memory", True, "Keep freed host memory for reuse (ftjax.host_memory): XLA:CPU "
                  "steps stop page-faulting their buffers in again; the process keeps its peak heap.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Quiet by default (warnings and ftjax's own lines); before TensorFlow's import, whose
  # C++ log level is read then.
  console.configure(console.verbosity_from_flags(FLAGS))
  if FLAGS.retain_host_memory:
    # Before JAX runs anything: threads that already own a malloc arena keep it.
    from ftjax import host_memory
    host_memory.retain_freed_host_memory()
  # Heavy imports after flag parsing so that --help and flag errors are instant.
  from ftjax.train import distributed
  try:
    distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                           process_id=FLAGS.process_id, auto=FLAGS.distributed_auto,
                           heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
  except ValueError as e:
    print(f"ftjax: error: {e}", file=sys.stderr)
    sys.exit(2)
  from ftjax.core.errors import RunError
  from ftjax.train import report
  from ftjax.train.preemption import Preempted
  from ftjax.train.workdir_lock import hold_workdir
  try:
    # One job per workdir (process 0 holds the lock for a multi-process job); each
    # run directory inside is locked again by the trainer, for library callers.
    with hold_workdir(FLAGS.workdir):
      console.say(_plan_line(FLAGS.config))
      if FLAGS.config.get("tasks"):
        from ftjax.methods import multitask
        print(multitask.train_multitask(FLAGS.config, FLAGS.workdir)["table"], flush=True)
      else:
        report.run_all(FLAGS.config, FLAGS.workdir)
      checkpoints = "<variant>/seeds<first>-<last>/" if FLAGS.config.get("vmap_seeds") else "<variant>/seed<N>/"
      console.say(f"ftjax: results in {FLAGS.workdir}/ (results_table.md, results.json; each seed's "
                  f"metrics.jsonl in <variant>/seed<N>/, checkpoints in {checkpoints})")
  except Preempted as e:
    print(f"ftjax: {e}", file=sys.stderr, flush=True)  # every process: each one's log says where it stopped
    sys.exit(e.exit_code)
  except (ValueError, KeyError, FileNotFoundError, FloatingPointError, ImportError, RunError, OSError) as e:
    # User errors and run faults (a locked workdir, no checkpoint that restores, a full
    # disk) are one line; the traceback goes to the debug log only.
    logging.debug("error", exc_info=True)
    print(f"ftjax: error: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)


def _plan_line(config) -> str:
  """What this command runs and where: one line before the progress bars."""
  source = config_flags.get_config_filename(FLAGS["config"])
  if config.get("tasks"):
    what = f"{len(config.tasks)} tasks trained together ({', '.join(sorted(config.tasks))})"
  else:
    from ftjax.train import report
    names = list(report.variant_configs(config))
    what = f"{len(names)} variant{'s' * (len(names) != 1)} ({', '.join(names)})"
  seeds = config.get("num_seeds", 1)
  return f"ftjax: {source}: {what} x {seeds} seed{'s' * (seeds != 1)} -> {FLAGS.workdir}"


def _one_line(error: BaseException) -> str:
  lines = [line for line in str(error).strip().splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _parse_flags(argv):
  """absl's parser, with config errors (an unknown --config.key, a bad value) on one line."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.to_dict()  # the config file loads lazily: surface its errors here
    return rest
  except OSError as e:
    print(f"ftjax: error: {str(e).splitlines()[0]}: " + " ".join(str(e).split()[-6:]), file=sys.stderr)
    sys.exit(2)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip()
    if message[:1] in "'\"" and message[-1:] == message[:1]:
      message = message[1:-1]
    for arg in argv[1:]:
      name = arg.split("=", 1)[0].lstrip("-")
      if name.startswith("config.") and name.rsplit(".", 1)[-1] in message:
        message = f"unknown or invalid config field --{name}: {message}"
        break
    print(f"ftjax: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

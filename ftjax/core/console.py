"""The console of ftjax's command-line tools: quiet by default, absl's ``--verbosity`` for more.

By default a command prints warnings, errors and ftjax's own few lines (what runs,
where its outputs go, the table) around the progress bars. The libraries under it
(JAX, TensorFlow, TFDS, Orbax) log dozens of INFO lines per run: the backends JAX
did not find, TFDS's dataset-info reads, each checkpoint save, TensorFlow's C++
start-up notes. Those are hidden at the default verbosity and shown with absl's
convention:

* ``--verbosity=-1`` (the default of ftjax's commands): warnings and errors;
* ``--verbosity=0``: also INFO lines, ftjax's (parameter-rule matches, resumes)
  and the libraries'; Orbax's per-save chatter stays out;
* ``--verbosity=1``: DEBUG lines too, Orbax's included.
"""

from __future__ import annotations

import logging
import os
import re
import sys

DEFAULT_VERBOSITY = -1  # absl's WARNING



def verbosity_from_flags(flag_values) -> int:
  """absl's ``--verbosity`` when given on the command line, else :data:`DEFAULT_VERBOSITY`.

  absl's own default is 0 (INFO); ftjax's commands default to warnings. The flag is
  set to the result so that absl's handler and ``FLAGS.verbosity`` agree.
  """
  if not flag_values["verbosity"].present:
    flag_values.verbosity = DEFAULT_VERBOSITY
  return flag_values.verbosity


def configure(verbosity: int) -> None:
  """Applies ``verbosity`` (absl's levels) to the libraries' loggers.

  Call it after flag parsing and before TensorFlow or TFDS is imported (the C++ log
  level is read at that import); below INFO it imports TensorFlow itself, dropping the
  C++ INFO lines that TensorFlow 2.21 prints regardless of that level. An explicit
  ``TF_CPP_MIN_LOG_LEVEL`` in the environment is kept.

  Args:
    verbosity: absl's verbosity: -1 warnings, 0 INFO, 1 DEBUG (and above).
  """
  from absl import logging as absl_logging
  # TensorFlow's C++ log ("oneDNN custom operations are on", ...) reads this once, at
  # TensorFlow's first import: 1 drops its INFO lines and keeps warnings, 0 keeps all.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if verbosity < 0 else "0")
  if verbosity < 0:
    import_without_cpp_info_lines("tensorflow")
  absl_logging.set_verbosity(verbosity)
  level = absl_logging.converter.absl_to_standard(verbosity)
  # Python loggers of JAX, TFDS and Orbax propagate to the root logger, where absl's
  # handler writes to stderr: the root level decides what of theirs shows.
  logging.getLogger().setLevel(level)
  if verbosity <= 0:
    absl_logging.get_absl_handler().addFilter(_NoOrbaxInfo())


# An INFO line of absl's C++ log ("I" MMDD time, or "I0000 00:00:<epoch seconds>" before
# absl is initialised), and the line absl prints ahead of log lines before that.
_CPP_INFO_LINE = re.compile(rb"^I\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
_ABSL_PRE_INIT_LINE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def import_without_cpp_info_lines(module: str) -> None:
  """Imports ``module`` (when installed) with absl C++ INFO lines dropped from stderr.

  TensorFlow 2.21 logs through absl's C++ log before that log is initialised, where
  ``TF_CPP_MIN_LOG_LEVEL`` has no effect: on CPUs with AVX-512 VNNI/BF16 each of its two
  libraries prints "oneDNN custom operations are on" at import. Everything the import
  writes to file descriptor 2 goes to a temporary file and comes back afterwards without
  those lines (warnings, errors and Python's own output pass unchanged).
  """
  if module in sys.modules:
    return
  import importlib
  import importlib.util
  import tempfile
  if importlib.util.find_spec(module) is None:  # the library runs without TensorFlow
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      importlib.import_module(module)
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().splitlines(keepends=True)
              if not _CPP_INFO_LINE.match(line) and line.rstrip() != _ABSL_PRE_INIT_LINE]
      if kept:
        os.write(2, b"".join(kept))


class _NoOrbaxInfo(logging.Filter):
  """Drops Orbax's INFO lines (several per checkpoint save) below DEBUG verbosity."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def say(message: str) -> None:
  """One of ftjax's own console lines (what runs, where outputs go): stdout, process 0 only."""
  try:
    import jax
    if jax.process_index() != 0:
      return
  except Exception:  # noqa: BLE001 - before JAX's distributed runtime exists: every process is "0"
    pass
  print(message, file=sys.stdout, flush=True)

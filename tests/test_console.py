"""The command-line console: quiet by default, absl's --verbosity for more (issue 28)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

# absl's log-line prefix: level letter, MMDD, time, thread, file:line]
LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+):\d+\]")


def _run_tiny(workdir, *flags) -> list[str]:
  """The tiny config for 2 steps as a user runs it: no test-only environment (JAX_PLATFORMS,
  TF_CPP_MIN_LOG_LEVEL), so the TPU probe and TensorFlow's C++ log behave as on a user's
  machine. Returns the console's lines with the progress bars' redraws removed."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py", f"--workdir={workdir}",
       "--config.num_steps=2", "--config.eval_every_steps=2", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  text = (proc.stdout + "\n" + proc.stderr).replace("\r", "\n")
  return [line for line in text.splitlines() if line.strip() and "step/s" not in line and "?step" not in line]


def test_default_console_is_warnings_and_ftjax_lines(tmp_path, fashion_mnist_ready):
  lines = _run_tiny(tmp_path / "quiet")
  info = [line for line in lines if (m := LOG_LINE.match(line)) and m.group(1) == "I"]
  assert not info, "INFO lines at the default verbosity:\n" + "\n".join(info)
  assert not any("oneDNN custom operations" in line or "libtpu" in line for line in lines), lines
  assert lines[0].startswith("ftjax: experiments/configs/tiny.py: 1 variant (run) x 1 seed -> "), lines
  assert lines[-1].startswith(f"ftjax: results in {tmp_path / 'quiet'}/"), lines
  assert any(line.startswith("| run | 1 |") for line in lines), lines
  # Everything else printed is the table: one screen in all.
  assert len(lines) <= 12, "\n".join(lines)


@pytest.mark.slow
def test_verbosity_zero_shows_info_logs(tmp_path, fashion_mnist_ready):
  lines = _run_tiny(tmp_path / "verbose", "--verbosity=0")
  sources = {m.group(2) for line in lines if (m := LOG_LINE.match(line)) and m.group(1) == "I"}
  assert "setup.py" in sources, sources       # ftjax's own INFO (parameter groups)
  assert "dataset_info.py" in sources or "reader.py" in sources, sources  # TFDS's
  # Orbax's per-save chatter (checkpoint_manager.py, async_checkpointer.py, ...) stays out below DEBUG.
  assert not sources & {"checkpoint_manager.py", "async_checkpointer.py", "checkpointer.py"}, sources

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


NOISY_MODULE = r'''
import os, sys
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
os.write(2, b"I0000 00:00:1796516785.661153   11445 port.cc:153] oneDNN custom operations are on.\n")
os.write(2, b"I1205 10:11:12.345678   11445 cpu_feature_guard.cc:210] an INFO line after init\n")
os.write(2, b"W0000 00:00:1796516785.661153   11445 port.cc:160] a C++ warning\n")
print("a Python warning line", file=sys.stderr)
'''


def test_info_lines_that_tensorflow_prints_at_import_are_dropped_and_the_rest_kept(tmp_path):
  """TensorFlow 2.21 on AVX-512 VNNI CPUs prints absl C++ INFO lines at import whatever
  TF_CPP_MIN_LOG_LEVEL says; a stand-in module prints the same kinds of lines."""
  (tmp_path / "noisy_library.py").write_text(NOISY_MODULE)
  script = ("from ftjax.core import console; import sys\n"
            "console.import_without_cpp_info_lines('noisy_library')\n"
            "assert 'noisy_library' in sys.modules\n"
            "console.import_without_cpp_info_lines('no_such_library_here')\n"
            "print('after', file=sys.stderr)\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.splitlines() == ["W0000 00:00:1796516785.661153   11445 port.cc:160] a C++ warning",
                                      "a Python warning line", "after"], proc.stderr

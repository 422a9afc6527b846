"""Fault injection (issue 27): preemption, damaged checkpoints and caches, a second job on a
workdir, failed checkpoint writes, bad values, and the messages of each.

Runs are experiments/configs/tiny.py (a tiny ResNet on 1% of Fashion-MNIST, 24 steps,
evaluated every 8). Where a run resumes, its final parameters are compared with an
uninterrupted run's: bitwise in one process, within tests/test_multiprocess.py's
tolerance for 2 processes x 2 devices.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import typing

import numpy as np
import pytest

from conftest import ROOT, run_python

TINY = "experiments/configs/tiny.py"
# A train row every 2 steps.
FAST = ["--config.log_every_steps=2"]


def _train_cmd(workdir, *overrides):
  return ["-m", "experiments.train", f"--config={TINY}", f"--workdir={workdir}", *FAST, *overrides]


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.update(extra)
  return env


def _params(run_dir, step=None):
  import jax
  from ftjax.train.checkpoint import load_checkpoint_arrays
  ckpt = load_checkpoint_arrays(str(run_dir), step)
  return ckpt["step"], [np.asarray(x) for x in jax.tree.leaves(ckpt["state"]["params"])], ckpt["record"]


def _rows(run_dir):
  """The metric rows, without the throughput (a timing)."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  for row in rows:
    row.pop("images_per_s", None)
  return rows


def _last_line(stderr: str) -> str:
  lines = [line for line in stderr.strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _wait_for_train_row(proc, run_dir, step, timeout=400):
  """Waits until ``metrics.jsonl`` of ``run_dir`` has a train row at ``step`` or later."""
  deadline = time.time() + timeout
  path = os.path.join(run_dir, "metrics.jsonl")
  while time.time() < deadline:
    if os.path.exists(path):
      rows = [r for r in _rows(run_dir) if r["split"] == "train"]
      if rows and rows[-1]["step"] >= step:
        return rows[-1]["step"]
    assert proc.poll() is None, "the run ended before the signal"
    time.sleep(0.05)
  pytest.fail(f"no train row at step {step} within {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_mnist_ready):
  """An uninterrupted tiny run (its directory; seed0 inside)."""
  workdir = tmp_path_factory.mktemp("reference") / "w"
  run_python(_train_cmd(workdir))
  return workdir / "seed0"


def _assert_same_run(run_dir, ref_dir):
  (step, params, _), (ref_step, ref_params, _) = _params(run_dir), _params(ref_dir)
  assert step == ref_step == 24
  assert len(params) == len(ref_params) > 0
  for a, b in zip(params, ref_params):
    np.testing.assert_array_equal(a, b)
  assert _rows(run_dir) == _rows(ref_dir)


# ----------------------------------------------------------------------------- 1. preemption


def test_preemption_watch_turns_a_signal_into_a_stop_at_the_next_step():
  from ftjax.train.preemption import PreemptionWatch, Preempted
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionWatch() as watch:
    assert not watch.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled at once in the main thread: no exit
    assert watch.should_stop(2) and watch.stop_signal() == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
  error = Preempted(step=13, signum=signal.SIGINT, directory="/w/checkpoints")
  assert error.exit_code == 130 and "same command resumes" in str(error)


def test_sigterm_mid_epoch_checkpoints_the_step_reached(tmp_path, fashion_mnist_ready):
  workdir = tmp_path / "w"
  proc = subprocess.Popen([sys.executable, *_train_cmd(workdir)], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    seen = _wait_for_train_row(proc, workdir / "seed0", 2)  # before the first evaluation (step 8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  last = _last_line(err)
  assert "stopped by SIGTERM at step" in last and "the same command resumes" in last, err[-3000:]
  assert "Traceback" not in err
  stopped = int(last.split("at step ")[1].split(";")[0])
  step, _, record = _params(workdir / "seed0")
  assert step == record["step"] == stopped >= seen
  assert step < 24
  # The state restores to that step (the optimizer's step counter included).
  from ftjax.train.checkpoint import load_checkpoint_arrays
  assert int(load_checkpoint_arrays(str(workdir / "seed0"))["state"]["step"]) == stopped


@pytest.mark.slow
def test_sigterm_then_the_same_command_ends_like_an_uninterrupted_run(tmp_path, reference):
  workdir = tmp_path / "w"
  proc = subprocess.Popen([sys.executable, *_train_cmd(workdir)], cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_train_row(proc, workdir / "seed0", 10)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the same as SIGTERM
    _, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
  stopped, _, _ = _params(workdir / "seed0")
  assert 10 <= stopped < 24
  again = run_python(_train_cmd(workdir, "--verbosity=0"))  # "resumed from step" is an INFO line
  assert "resumed from step" in again.stderr
  _assert_same_run(workdir / "seed0", reference)


MP_STEPS = ["--config.dataset.num_shards=2"]


def _launch_cmd(workdir, log_dir):
  return [sys.executable, "-m", "experiments.launch_local", "--num_processes=2", "--devices_per_process=2",
          f"--log_dir={log_dir}", "--grace=5", "--", *_train_cmd(workdir, *MP_STEPS)]


@pytest.mark.slow
def test_two_processes_agree_on_the_preemption_step_and_resume(tmp_path, fashion_mnist_ready):
  env = _env()
  env.pop("XLA_FLAGS")
  full = subprocess.run(_launch_cmd(tmp_path / "full", tmp_path / "logs_full"), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]

  workdir, logs = tmp_path / "w", tmp_path / "logs"
  launcher = subprocess.Popen(_launch_cmd(workdir, logs), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_train_row(launcher, workdir / "seed0", 10)
    # Process 0 holds the workdir (and its run directory) for the job.
    from ftjax.train.workdir_lock import holder
    pids = [int(x) for x in (logs / "pids.txt").read_text().split()]
    for locked in (workdir, workdir / "seed0"):
      record = holder(str(locked))
      assert record["pid"] == pids[0] and record["job"].startswith("launch_local:"), record
    launcher.send_signal(signal.SIGTERM)  # the launcher passes it on to both processes
    _, err = launcher.communicate(timeout=300)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "the same command resumes" in _last_line(err), err[-3000:]
  # Both processes stopped at one step, the step of the checkpoint.
  stops = []
  for i in range(2):
    text = (logs / f"process_{i}.log").read_text() if i else err
    stops += [int(line.split("at step ")[1].split(";")[0]) for line in text.splitlines()
              if "stopped by SIGTERM at step" in line]
  step, _, _ = _params(workdir / "seed0")
  assert stops and set(stops) == {step} and step < 24, (stops, step)

  again = subprocess.run(_launch_cmd(workdir, logs), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  (s, params, _), (s_ref, ref, _) = _params(workdir / "seed0"), _params(tmp_path / "full" / "seed0")
  assert s == s_ref == 24
  for a, b in zip(params, ref):  # the multi-process tolerance of tests/test_multiprocess.py
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- 2. corruption


def _small_state(value: float):
  import jax.numpy as jnp
  from ftjax.train.state import TrainState
  params = {"w": jnp.full((3, 2), value, jnp.float32), "b": jnp.arange(2, dtype=jnp.float32) + value}
  return TrainState(step=jnp.asarray(int(value), jnp.int32), params=params, batch_stats={},
                    opt_state={"m": jnp.zeros((3, 2))}, method_state={}, rng=jnp.zeros((2,), jnp.uint32))


def _best(state):
  import jax.numpy as jnp
  return {"params": state.params, "batch_stats": {}, "metric": jnp.float32(0.5), "step": jnp.asarray(state.step)}


def _save_steps(workdir, steps, semantic):
  from ftjax.train.checkpoint import Checkpointer
  from ftjax.train.loop import checkpoint_record
  ckpt = Checkpointer(str(workdir), keep=5)
  for step in steps:
    state = _small_state(float(step))
    ckpt.save(step, state=state, best=_best(state), record=checkpoint_record(semantic, step))
  ckpt.close()


def _damage_arrays(step_dir):
  """Overwrites every stored chunk of the checkpoint's train state with 100 random bytes."""
  chunks = [os.path.join(root, f) for root, _, files in os.walk(os.path.join(step_dir, "state"))
            for f in files if os.path.basename(root) == "d"]
  assert chunks
  rng = np.random.default_rng(0)
  for path in chunks:
    with open(path, "wb") as f:
      f.write(rng.bytes(100))


def _resume(workdir, semantic):
  from ftjax.train.checkpoint import Checkpointer
  from ftjax.train.loop import _resume as resume
  from ftjax.train.metrics import MetricWriter
  ckpt = Checkpointer(str(workdir), keep=5)
  template = _small_state(0.0)
  try:
    return resume(ckpt, MetricWriter(str(workdir), tensorboard=False), state=template, best=_best(template),
                  semantic=semantic, workdir=str(workdir))
  finally:
    ckpt.close()


@pytest.mark.parametrize("damage", ["arrays", "record", "item_missing"])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_restores(tmp_path, damage, caplog):
  semantic = {"lr": 0.1}
  _save_steps(tmp_path, [4, 8], semantic)
  latest = tmp_path / "checkpoints" / "8"
  if damage == "arrays":
    _damage_arrays(latest)
  elif damage == "record":
    (latest / "record" / "metadata").write_text('{"layout": 2, "conf')
  else:
    shutil.rmtree(latest / "state")
  files_before = sorted(str(p.relative_to(latest)) for p in latest.rglob("*"))
  with caplog.at_level(logging.WARNING):
    state, best, step = _resume(tmp_path, semantic)
  assert step == 4 and int(state.step) == 4
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.full((3, 2), 4.0, np.float32))
  np.testing.assert_array_equal(np.asarray(best["params"]["b"]), np.array([4.0, 5.0], np.float32))
  # Reported by name, moved aside whole (not deleted).
  moved = tmp_path / "checkpoints_unreadable" / "8"
  assert not latest.exists() and moved.is_dir()
  assert sorted(str(p.relative_to(moved)) for p in moved.rglob("*")) == files_before
  assert any(str(latest) in r.getMessage() and "does not restore" in r.getMessage() for r in caplog.records)


def test_no_restorable_checkpoint_is_one_error_and_nothing_is_moved(tmp_path):
  from ftjax.core.errors import RunError
  semantic = {"lr": 0.1}
  _save_steps(tmp_path, [4, 8], semantic)
  for step in (4, 8):
    _damage_arrays(tmp_path / "checkpoints" / str(step))
  with pytest.raises(RunError) as info:
    _resume(tmp_path, semantic)
  message = str(info.value)
  assert "\n" not in message and f"no checkpoint in {tmp_path / 'checkpoints'} restores (step 8: " in message
  assert "; step 4: " in message and "move them away (or use a new --workdir) to start over" in message
  # None restores: the cause may be the program, so the files stay where they are.
  assert not (tmp_path / "checkpoints_unreadable").exists()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]


def test_another_config_or_layout_is_refused_before_any_array_is_read(tmp_path):
  """A checkpoint of another config is not corrupt: refused as today, nothing moved aside
  (its arrays are damaged too, so reading them would fail)."""
  from ftjax.core.errors import ConfigError
  _save_steps(tmp_path, [4, 8], {"lr": 0.1})
  _damage_arrays(tmp_path / "checkpoints" / "8")
  with pytest.raises(ConfigError, match="holds a checkpoint of a different config; use a new --workdir"):
    _resume(tmp_path, {"lr": 0.2})
  record = tmp_path / "checkpoints" / "8" / "record" / "metadata"
  stored = json.loads(record.read_text())
  del stored["layout"]
  record.write_text(json.dumps(stored))
  with pytest.raises(ConfigError, match="checkpoint in state layout 1"):
    _resume(tmp_path, {"lr": 0.1})
  assert not (tmp_path / "checkpoints_unreadable").exists()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]


@pytest.mark.slow
def test_a_run_with_a_damaged_latest_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, reference):
  workdir = tmp_path / "w"
  shutil.copytree(reference.parent, workdir)
  run_dir = workdir / "seed0"
  _damage_arrays(run_dir / "checkpoints" / "24")
  os.remove(run_dir / "results.json")
  proc = run_python(_train_cmd(workdir, "--verbosity=0"))  # "resumed from step" is an INFO line
  assert "checkpoints/24 does not restore" in proc.stderr and "resumed from step 16" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert (run_dir / "checkpoints_unreadable" / "24").is_dir()
  _assert_same_run(run_dir, reference)


def test_a_relationship_cache_with_other_numbers_is_ignored(tmp_path):
  from ftjax.methods.co_tuning import relationship as rel
  matrix = np.random.default_rng(0).dirichlet(np.ones(5), size=3).astype(np.float32)
  path, sidecar = str(tmp_path / "r.npy"), str(tmp_path / "r.json")
  key = {"dataset": "x", "approach": "direct"}
  rel.save_cached(path, sidecar, matrix, key)
  np.testing.assert_array_equal(rel.load_cached(path, sidecar, key), matrix)
  damaged = matrix.copy()
  damaged[1, 2] += 1e-3
  np.save(path, damaged)  # same shape and key, other numbers
  assert rel.load_cached(path, sidecar, key) is None
  with open(path, "wb") as f:  # cut short
    f.write(b"\x93NUMPY")
  assert rel.load_cached(path, sidecar, key) is None


def test_feature_cache_is_checked_against_its_content_hash_and_rebuilt(tmp_path, caplog):
  import jax
  from ftjax.models import create_model
  from ftjax.selection.features import extract_features, load_cached_features
  model = create_model("resnet_tiny", num_classes=3)
  # One jitted init with the "rbg" generator (as ftjax.train.setup.build_model): seconds less.
  variables = jax.jit(lambda key: model.init(key, np.zeros((1, 32, 32, 3), np.float32), train=False))(
      jax.random.key(0, impl="rbg"))
  rng = np.random.default_rng(1)
  batches = [{"image": rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32),
              "label": np.arange(4) % 3, "mask": np.ones(4, bool)} for _ in range(2)]
  path, key = str(tmp_path / "f.npz"), "resnet_tiny/demo"
  feats, labels = extract_features(model=model, variables=variables, batches=batches, cache_path=path,
                                   cache_key=key)
  with np.load(path) as z:
    stored = dict(z)
  assert "content_sha256" in stored
  # Other numbers under the same key and hash: refused, and extract_features computes them again.
  np.savez(path, **dict(stored, features=stored["features"] + 1.0))
  with caplog.at_level(logging.WARNING):
    assert load_cached_features(path, key) is None
  assert any("does not match its content hash" in r.getMessage() for r in caplog.records)
  again, again_labels = extract_features(model=model, variables=variables, batches=batches, cache_path=path,
                                         cache_key=key)
  np.testing.assert_array_equal(again, feats)
  np.testing.assert_array_equal(again_labels, labels)
  np.testing.assert_array_equal(load_cached_features(path, key)[0], feats)
  # A file from before the hash was stored is still read; a truncated one is rebuilt.
  np.savez(path, **{k: v for k, v in stored.items() if k != "content_sha256"})
  np.testing.assert_array_equal(load_cached_features(path, key)[0], feats)
  with open(path, "r+b") as f:
    f.truncate(100)
  assert load_cached_features(path, key) is None


def test_converted_weights_cache_is_checked_and_rebuilt(tmp_path, caplog):
  from ftjax.core.paths import flatten_paths
  from ftjax.models import registry
  source = registry._SOURCES["efficientnet_lite0/imagenet"]
  if importlib.util.find_spec(source.package) is None:
    pytest.fail(f"the weights package {source.pip_name} is not installed (scripts/setup.sh installs it)")
  name = "efficientnet_lite0/imagenet"
  first = flatten_paths(registry._load_variables(name, source, tmp_path))
  (cache_file,) = [p for p in tmp_path.iterdir() if p.suffix == ".npz"]
  assert (tmp_path / (cache_file.name + ".sha256")).exists()
  # Damage one array's bytes inside the zip (same size): the hash no longer matches.
  data = bytearray(cache_file.read_bytes())
  data[len(data) // 2] ^= 0xFF
  cache_file.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING):
    second = flatten_paths(registry._load_variables(name, source, tmp_path))
  assert any("do not match their recorded sha256" in r.getMessage() for r in caplog.records)
  assert set(second) == set(first)
  for k in first:
    np.testing.assert_array_equal(np.asarray(second[k]), np.asarray(first[k]))
  # An older cache (no sidecar) is read as it is, and its hash recorded.
  os.remove(tmp_path / (cache_file.name + ".sha256"))
  third = flatten_paths(registry._load_variables(name, source, tmp_path))
  assert (tmp_path / (cache_file.name + ".sha256")).exists()
  np.testing.assert_array_equal(np.asarray(third[k]), np.asarray(first[k]))


# ----------------------------------------------------------------------------- 3. one writer per workdir

HOLD = r"""
import sys, time
from ftjax.train.workdir_lock import hold_workdir
with hold_workdir(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def _holder(workdir, job):
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT, env=_env(FTJAX_JOB_ID=job),
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_job_refuses_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
  import socket
  from ftjax.train.workdir_lock import WorkdirLocked, hold_workdir, holder
  proc = _holder(tmp_path, "job-17")
  try:
    with pytest.raises(WorkdirLocked) as info:
      with hold_workdir(str(tmp_path)):
        pass
    message = str(info.value)
    assert "\n" not in message
    assert f"job job-17 (host {socket.gethostname()}, pid {proc.pid}" in message
    assert "use another --workdir" in message
  finally:
    proc.kill()  # SIGKILL: no clean-up, the lock file stays
    proc.wait()
  assert holder(str(tmp_path))["pid"] == proc.pid
  with caplog.at_level(logging.WARNING):
    with hold_workdir(str(tmp_path)):
      assert holder(str(tmp_path))["pid"] == os.getpid()
      with hold_workdir(str(tmp_path)):  # the same job again (a run directory of its workdir)
        pass
      assert holder(str(tmp_path))["pid"] == os.getpid()
  assert any(f"pid {proc.pid}" in r.getMessage() and "no longer running" in r.getMessage()
             for r in caplog.records)
  assert holder(str(tmp_path)) is None  # released on exit


def test_two_trainers_on_one_workdir(tmp_path, fashion_mnist_ready):
  workdir = tmp_path / "w"
  proc = _holder(workdir, "first-job")  # a job holding the workdir, as a running trainer does
  try:
    second = run_python(_train_cmd(workdir), check=False)
  finally:
    proc.kill()
    proc.wait()
  assert second.returncode == 2
  last = _last_line(second.stderr)
  assert last.startswith("ftjax: error: ") and "in use by job first-job" in last and f"pid {proc.pid}" in last
  assert "Traceback" not in second.stderr
  assert not (workdir / "seed0").exists()  # refused before writing anything


def test_the_trainer_holds_its_run_directory(tmp_path, fashion_mnist_ready):
  """Library callers (``train_and_evaluate``) lock the run directory too."""
  from experiments.configs import tiny
  from ftjax.train.loop import train_and_evaluate
  from ftjax.train.workdir_lock import WorkdirLocked
  proc = _holder(tmp_path / "run", "other")
  try:
    config = tiny.get_config()
    with pytest.raises(WorkdirLocked, match="in use by job other"):
      train_and_evaluate(config, str(tmp_path / "run"))
  finally:
    proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------- 4. write failures

INJECT = r"""
import errno, os
from etils import epath
_write_text = type(epath.Path("/")).write_text
def write_text(self, *args, **kwargs):
  # A full disk while the record of checkpoint {step} is written.
  if "/checkpoints/{step}." in str(self) and "/record" in str(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
  return _write_text(self, *args, **kwargs)
type(epath.Path("/")).write_text = write_text
"""


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
  from etils import epath
  from ftjax.train.checkpoint import Checkpointer, CheckpointWriteError
  path_class = type(epath.Path("/"))
  original = path_class.write_text
  exec(INJECT.replace("{step}", "8"), {})  # the write layer Orbax's files go through
  try:
    ckpt = Checkpointer(str(tmp_path), keep=1)
    state = _small_state(4.0)
    ckpt.save(4, state=state, best=_best(state), record={"step": 4})
    state8 = _small_state(8.0)
    with pytest.raises(CheckpointWriteError) as info:
      ckpt.save(8, state=state8, best=_best(state8), record={"step": 8})
      ckpt.wait()  # the background write fails
  finally:
    path_class.write_text = original
  try:
    ckpt.close()
  except CheckpointWriteError:
    pass
  message = str(info.value)
  assert "\n" not in message and "step 8" in message and "No space left on device" in message
  assert "the previous checkpoint (step 4) is intact" in message
  assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == ["4"]
  _, params, record = _params(tmp_path)
  assert record == {"step": 4}
  np.testing.assert_array_equal(params[1], np.full((3, 2), 4.0, np.float32))


ENOSPC_RUN = INJECT + r"""
import sys
from absl import app
from experiments import train
sys.argv = ["train", *sys.argv[1:]]
app.run(train.main, flags_parser=train._parse_flags)
"""


@pytest.mark.slow
def test_a_full_disk_stops_the_trainer_in_one_line_and_the_run_resumes_after(tmp_path, reference):
  workdir = tmp_path / "w"
  proc = run_python(["-c", ENOSPC_RUN.replace("{step}", "16"), *_train_cmd(workdir)[2:]], check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = _last_line(proc.stderr)
  assert "writing the checkpoint of step 16" in last and "No space left on device" in last, last
  assert "the previous checkpoint (step 8) is intact" in last
  assert "Traceback" not in proc.stderr
  step, _, _ = _params(workdir / "seed0")
  assert step == 8
  run_python(_train_cmd(workdir))  # disk space back: the same command resumes
  _assert_same_run(workdir / "seed0", reference)


# ----------------------------------------------------------------------------- 5. values


@pytest.mark.parametrize("field, value, message", [
    ("optimizer.lr", -1.0, "optimizer.lr must be finite and > 0, got -1.0"),
    ("optimizer.lr", math.inf, "optimizer.lr must be finite and > 0, got inf"),
    ("optimizer.momentum", 1.0, "optimizer.momentum must be in [0, 1), got 1.0"),
    ("optimizer.weight_decay", -1e-4, "optimizer.weight_decay must be finite and >= 0"),
    ("optimizer.decay_factor", 0.0, "optimizer.decay_factor must be finite and > 0"),
    ("optimizer.boundaries", (0.5, -1.0), "optimizer.boundaries must be a list of numbers > 0"),
    ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
    ("eval_batch_size", -5, "eval_batch_size must be an integer >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints must be an integer >= 1"),
    ("log_every_steps", 0, "log_every_steps must be an integer >= 1"),
    ("head_lr_mult", float("nan"), "head_lr_mult must be finite and >= 0, got nan"),
    ("dataset.val_fraction", 1.0, "dataset.val_fraction must be in (0, 1)"),
    ("dataset.sampling_rate", 101.0, "dataset.sampling_rate must be in (0, 100]"),
    ("dataset.crop_scale", (0.9, 0.5), "dataset.crop_scale must be a pair (low, high)"),
    ("reuse.weight", -0.3, "reuse.weight must be finite and >= 0"),
    ("losses.ce.weight", -1.0, "losses.ce.weight must be finite and >= 0"),
    ("losses.ce.label_smoothing", 1.5, "losses.ce.label_smoothing must be in [0, 1]"),
    ("losses.bi_tuning.temperature", 0.0, "losses.bi_tuning.temperature must be finite and > 0"),
    ("losses.bi_tuning.keys_per_class", 0, "losses.bi_tuning.keys_per_class must be an integer >= 1"),
    ("losses.bi_tuning.momentum", 1.5, "losses.bi_tuning.momentum must be in [0, 1]"),
    ("losses.co_tuning.weight", -2.3, "losses.co_tuning.weight must be finite and >= 0"),
    ("losses.lwf.temperature", -3.0, "losses.lwf.temperature must be finite and > 0"),
    ("losses.bss.k", 0, "losses.bss.k must be an integer >= 1"),
    ("losses.delta.alpha", -0.01, "losses.delta.alpha must be finite and >= 0"),
    ("losses.spottune.prune_threshold", 2.0, "losses.spottune.prune_threshold must be in [0, 1]"),
    ("groups.head.lr_mult", -1.0, "groups.head.lr_mult must be finite and >= 0"),
])
def test_every_numeric_field_is_checked_with_a_one_line_error(field, value, message):
  import ml_collections
  from experiments.configs import tiny
  from ftjax.core.errors import ConfigError
  from ftjax.train.setup import validate_config
  config = tiny.get_config()
  validate_config(config)  # the config as given is fine
  *parents, last = field.split(".")
  with config.unlocked():
    node = config
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[last] = value
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  assert message in str(info.value) and "\n" not in str(info.value)


def test_every_numeric_option_of_every_method_has_a_rule():
  """Each numeric constructor field of each built-in method has a rule in METHOD_FIELDS, its
  default passes it, and a value on the wrong side fails it."""
  from ftjax.methods.registry import _FACTORIES
  from ftjax.train import config as config_lib
  missing = []
  for name, factory in _FACTORIES.items():
    hints = typing.get_type_hints(factory)
    rules = config_lib.METHOD_FIELDS.get(name, {})
    for field in dataclasses.fields(factory):
      kind = hints.get(field.name)
      if not field.init or kind is bool or kind not in (int, float, float | None, tuple[float, float]):
        continue
      if field.name not in rules:
        missing.append(f"{name}.{field.name}")
        continue
      rule = rules[field.name]
      config_lib.check_value(field.name, field.default, rule)
      bad = {config_lib.POSITIVE: 0.0, config_lib.NON_NEGATIVE: -1.0, config_lib.INT_POSITIVE: 0,
             config_lib.INT_NON_NEGATIVE: -1, config_lib.UNIT: 1.5, config_lib.OPEN_UNIT: 1.0,
             config_lib.PERCENT: 0.0, config_lib.CROP: (0.9, 0.1), config_lib.MOMENTUM: 1.0}
      with pytest.raises(ValueError, match=f"{field.name} must be"):
        config_lib.check_value(field.name, bad[rule.replace(config_lib.OPTIONAL, "")], rule)
  assert not missing, f"numeric method options without a value rule: {missing}"


def test_a_negative_learning_rate_is_refused_on_the_command_line(tmp_path):
  proc = run_python(_train_cmd(tmp_path / "w", "--config.optimizer.lr=-1"), check=False)
  assert proc.returncode == 2
  assert _last_line(proc.stderr) == "ftjax: error: optimizer.lr must be finite and > 0, got -1.0"
  assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- 6. messages


def test_a_non_finite_loss_names_the_last_checkpoint_or_says_there_is_none(tmp_path):
  from ftjax.train.checkpoint import Checkpointer
  from ftjax.train.loop import _non_finite_message
  ckpt = Checkpointer(str(tmp_path), keep=2)
  assert _non_finite_message(float("nan"), 4, ckpt) == (
      "non-finite loss nan at step 4; no checkpoint was written yet (lower optimizer.lr?)")
  state = _small_state(8.0)
  ckpt.save(8, state=state, best=_best(state), record={"step": 8})
  ckpt.wait()
  message = _non_finite_message(float("inf"), 12, ckpt)
  ckpt.close()
  assert message == (f"non-finite loss inf at step 12; the last checkpoint is step 8 in "
                     f"{tmp_path / 'checkpoints'} (lower optimizer.lr?)")


@pytest.mark.slow
def test_a_diverging_run_stops_in_one_line_naming_no_checkpoint(tmp_path, fashion_mnist_ready):
  proc = run_python(_train_cmd(tmp_path / "w", "--config.optimizer.lr=1e30", "--config.log_every_steps=1"),
                    check=False)
  assert proc.returncode == 2
  last = _last_line(proc.stderr)
  assert last.startswith("ftjax: error: non-finite loss") and "no checkpoint was written yet" in last, last
  assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- torn metrics line


def _metric_lines(*steps):
  return "".join(json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) + "\n" for s in steps)


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
  """SIGKILL while appending leaves a last line without its newline: resume drops it."""
  from ftjax.train.metrics import MetricWriter, read_metrics
  path = tmp_path / "metrics.jsonl"
  path.write_text(_metric_lines(2, 4, 6) + '{"step": 8, "split": "tr')
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  with caplog.at_level(logging.WARNING):
    writer.truncate_after(6)
  assert "torn last line" in caplog.text
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [2, 4, 6]
  writer.write(8, "train", {"loss": 0.125})  # appends on a line of its own
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [2, 4, 6, 8]


def test_a_damaged_metrics_line_before_the_end_is_an_error(tmp_path):
  from ftjax.train.metrics import MetricWriter
  path = tmp_path / "metrics.jsonl"
  path.write_text(_metric_lines(2) + "garbage\n" + _metric_lines(4))
  with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
    MetricWriter(str(tmp_path), tensorboard=False).truncate_after(4)
  assert path.read_text() == _metric_lines(2) + "garbage\n" + _metric_lines(4)  # nothing lost

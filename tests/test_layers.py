"""ftjax's layers, checked from the source: imports run one way.

- No import circle between ftjax's modules (imports inside functions count).
- ftjax/train imports no particular method: only the contract (ftjax.methods.base),
  the registry and the package.
- ftjax/models imports no loss and no method; ftjax/ops imports no model, loss,
  method or trainer; ftjax/core imports nothing else of ftjax.
- Models, losses, methods and the run setup import and train a step without
  TensorFlow (a subprocess in which importing it fails).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from conftest import ROOT, run_python

PACKAGE = pathlib.Path(ROOT) / "ftjax"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
  """The ftjax module ``name`` refers to (a module, or the package that defines the name)."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  """``{module: {ftjax modules it imports}}``, from every import statement in the source."""
  modules = _modules()
  graph: dict[str, set[str]] = {name: set() for name in modules}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
        targets = [f"{base}.{alias.name}" for alias in node.names]
      for target in targets:
        if target.split(".")[0] != "ftjax":
          continue
        resolved = _resolve(target, modules)
        if resolved and resolved != name:
          graph[name].add(resolved)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle as ``[a, b, ..., a]``, or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_cycle_finder_finds_a_planted_circle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_reads_imports_inside_functions(tmp_path):
  graph = import_graph()
  # ftjax.train.setup imports the TFDS pipeline inside a function only.
  assert "ftjax.data" in graph["ftjax.train.setup"]


def test_no_import_circle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import circle: " + " -> ".join(cycle)


def _violations(graph, source_prefix: str, allowed) -> list[str]:
  return sorted(f"{src} imports {dst}" for src, targets in graph.items()
                if src == source_prefix or src.startswith(source_prefix + ".")
                for dst in targets if not allowed(dst))


def test_trainer_imports_no_particular_method():
  contract = {"ftjax.methods", "ftjax.methods.base", "ftjax.methods.registry"}
  bad = _violations(import_graph(), "ftjax.train",
                    lambda dst: not dst.startswith("ftjax.methods") or dst in contract)
  assert not bad, bad


@pytest.mark.parametrize("layer, forbidden", [
    ("ftjax.models", ("ftjax.losses", "ftjax.methods", "ftjax.train")),
    ("ftjax.ops", ("ftjax.models", "ftjax.losses", "ftjax.methods", "ftjax.train")),
    ("ftjax.losses", ("ftjax.methods", "ftjax.train")),
    ("ftjax.core", ("ftjax.ops", "ftjax.models", "ftjax.losses", "ftjax.methods", "ftjax.train",
                    "ftjax.data", "ftjax.selection")),
])
def test_layers_import_downwards(layer, forbidden):
  bad = _violations(import_graph(), layer,
                    lambda dst: not any(dst == f or dst.startswith(f + ".") for f in forbidden))
  assert not bad, bad


def test_layer_rules_catch_a_planted_import():
  graph = {"ftjax.models.resnet": {"ftjax.methods.spottune"}}
  assert _violations(graph, "ftjax.models", lambda dst: not dst.startswith("ftjax.methods")) == [
      "ftjax.models.resnet imports ftjax.methods.spottune"]


NO_TENSORFLOW = r"""
import sys, importlib.abc

class NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
      raise ImportError(f"{name} is not installed here")
    return None

sys.meta_path.insert(0, NoTensorFlow())
import jax, jax.numpy as jnp, numpy as np
import ftjax.models, ftjax.losses, ftjax.methods, ftjax.train.setup, ftjax.train.step
from ftjax import methods, models
from ftjax.train import setup
try:
  import tensorflow
except ImportError:
  pass
else:
  raise SystemExit("tensorflow imported despite the blocker")

model = models.create_model("resnet_tiny", num_classes=3)
variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False,
                                                outputs=model.all_outputs))
ms = methods.build_methods({"ce": {"weight": 1.0}, "l2_sp": {}, "bss": {}})
from ftjax.train.optim import GroupConfig
training = setup.init_training(model=model, variables=variables, methods=ms, rules=[(".*", "all")],
                               groups={"all": GroupConfig()}, num_classes=3,
                               schedule=lambda step: 0.01, method_rng=jax.random.PRNGKey(1),
                               state_rng=jax.random.PRNGKey(2))
rng = np.random.default_rng(0)
batch = {"image": rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32), "label": np.array([0, 1, 2, 0])}
state, metrics = training.train_step(training.state, batch, training.source)
assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])), metrics
assert "tensorflow" not in sys.modules and "tensorflow_datasets" not in sys.modules
print("ok", float(metrics["loss"]))
"""


def test_library_trains_a_step_without_tensorflow():
  out = run_python(["-c", NO_TENSORFLOW]).stdout
  assert out.strip().splitlines()[-1].startswith("ok ")

"""The package's layers, read from its source: the library (kernels, losses, objective, taps, models)
imports nothing from the trainer or the tools, the trainer nothing from the tools, and no module imports
another in a circle (function-level imports count too). Importing the library in a fresh process loads
no checkpointing, TensorFlow, plotting or SciPy."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nst_jax"
LAYERS = {"library": 0, "trainer": 1, "tools": 2}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
  parts = module.split(".")
  if len(parts) > 1 and parts[1] in ("trainer", "tools"):
    return parts[1]
  return "tools" if module == "nst_jax.__main__" else "library"


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The nst_jax modules that `path` imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names if alias.name.startswith("nst_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nst_jax"):
      for alias in node.names:  # `from nst_jax.trainer import config_lib` imports a module.
        candidate = f"{node.module}.{alias.name}"
        found.add(candidate if candidate in modules else node.module)
  return found


def _graph() -> dict[str, set[str]]:
  paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  modules = set(paths)
  graph = {}
  for name, path in paths.items():
    package_inits = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    graph[name] = {m for m in _imports(path, modules)
                   if m in modules and m not in package_inits and m != name}
  return graph


def test_the_graph_is_read():
  graph = _graph()
  assert "nst_jax.trainer.train_loop" in graph and "nst_jax.tools.sweep" in graph
  assert "nst_jax.trainer.config_lib" in graph["nst_jax.trainer.train_loop"]
  assert "nst_jax.kernels" in graph["nst_jax.losses"]


def test_no_module_imports_a_higher_layer():
  upward = [f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
            for module, targets in _graph().items() for target in targets
            if LAYERS[_layer(target)] > LAYERS[_layer(module)]]
  assert not upward, "\n".join(upward)


def test_no_import_cycles():
  graph, state, cycles = _graph(), {}, []

  def visit(module, stack):
    state[module] = "open"
    for target in sorted(graph[module]):
      if state.get(target) == "open":
        cycles.append(" -> ".join([*stack[stack.index(target):], target]))
      elif target not in state:
        visit(target, [*stack, target])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("module", ["nst_jax.losses", "nst_jax.kernels", "nst_jax.models",
                                    "nst_jax.objective", "nst_jax.taps"])
def test_the_library_imports_light(module):
  code = (f"import sys, {module}; "
          "heavy = ('orbax', 'tensorflow', 'matplotlib', 'scipy', 'nst_jax.trainer', 'nst_jax.tools'); "
          "print(sorted({m.split('.')[0] if not m.startswith('nst_jax') else m for m in sys.modules "
          "if m.startswith(heavy)}))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        cwd=PACKAGE.parent, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "[]", f"importing {module} loaded {done.stdout.strip()}"

"""The notebooks in notebooks/: committed without outputs and in step with their jupytext `.py` sources,
and run top to bottom by nbclient in their small setting (NST_JAX_NOTEBOOK_SMALL=1), in a kernel of this
test's own Python, from a temporary directory, with every run written under a temporary folder. Values
the notebooks print are checked against tests/np_reference.py's NumPy double sums."""

import os
import pathlib
import re
import sys
import time

import jax
import jupytext
import nbformat
import numpy as np
import pytest
from ipykernel import kernelspec
from nbclient import NotebookClient

from tests import np_reference

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart", "kernels")
CELL_TIMEOUT_S = 600  # The quickstart's sweep cell trains two students: minutes on a loaded 2-core CPU.
KERNEL_NAME = "nst-jax-notebook-test"


def _cells(nb):
  return [(cell.cell_type, cell.source) for cell in nb.cells]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs_and_paired_with_its_source(name):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  nbformat.validate(nb)
  for index, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{name}.ipynb cell {index} has outputs: strip them (jupytext --sync notebooks/{name}.py).")
  assert nb.metadata.kernelspec.name == "python3"  # What Colab and a plain Jupyter start.
  assert _cells(jupytext.read(NOTEBOOKS / f"{name}.py")) == _cells(nb), (
      f"{name}.ipynb and {name}.py differ: edit the .py and run `jupytext --sync notebooks/{name}.py`.")


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """A kernelspec for this interpreter in a temporary prefix, found through JUPYTER_PATH; the kernel's
  environment: this test session's (conftest's XLA_FLAGS and JAX_PLATFORMS, the shared compilation
  cache) plus the notebooks' small switch and workdir."""
  prefix = tmp_path_factory.mktemp("jupyter")
  spec_dir = kernelspec.install(kernel_name=KERNEL_NAME, prefix=str(prefix))
  old = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = str(pathlib.Path(spec_dir).parents[1])
  env = {**os.environ, "NST_JAX_NOTEBOOK_SMALL": "1", "PYTHONUNBUFFERED": "1",
         "NST_JAX_NOTEBOOK_WORKDIR": str(tmp_path_factory.mktemp("workdirs"))}
  yield env
  if old is None:
    del os.environ["JUPYTER_PATH"]
  else:
    os.environ["JUPYTER_PATH"] = old


def _run(name, env, cwd):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S, allow_errors=False,
                          resources={"metadata": {"path": str(cwd)}})
  started = time.perf_counter()
  try:
    client.execute(env=env)  # Raises CellExecutionError, with the cell and its traceback, on any error.
  finally:
    nbformat.write(nb, cwd / f"{name}.executed.ipynb")  # For reading what it printed.
  print(f"{name}.ipynb: {time.perf_counter() - started:.1f} s, executed copy in {cwd}")
  return nb


def _text(nb):
  """Every text output (streams, and text/markdown or text/plain of displays) of the notebook."""
  parts = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      if output.output_type == "stream":
        parts.append(output.text)
      elif "data" in output:
        parts.append(output.data.get("text/markdown", output.data.get("text/plain", "")))
  return "\n".join(parts)


def _images(nb):
  return sum("image/png" in output.get("data", {}) for cell in nb.cells for output in cell.get("outputs", []))


def test_kernel_is_this_interpreter(kernel_env):
  spec = pathlib.Path(os.environ["JUPYTER_PATH"], "kernels", KERNEL_NAME, "kernel.json").read_text()
  assert sys.executable in spec


@pytest.mark.slow  # trains a teacher and two students
def test_quickstart_runs_in_its_small_setting(kernel_env, tmp_path):
  nb = _run("quickstart", kernel_env, tmp_path)
  text = _text(nb)
  assert f"nst_jax from {pathlib.Path(np_reference.__file__).parents[1] / 'nst_jax'}" in text

  # 1. The toy sets: rebuilt here from the same keys, the table's values against the double sums.
  X = np.asarray(jax.random.normal(jax.random.key(0), (40, 8)))
  fresh = np.asarray(jax.random.normal(jax.random.key(1), (40, 8)))
  params = {"linear": {}, "polynomial": {"degree": 2, "c": 0.0}, "gaussian": {}}
  for name, kw in params.items():
    row = re.search(rf"^\| {name} \| (.+) \|$", text, re.M)
    assert row, f"no row for {name} in the toy-set table:\n{text}"
    values = [float(v) for v in row.group(1).split(" | ")]
    expected = [np_reference.mmd2(X, Y, name, **kw) for Y in (X, fresh, X + 0.25, X + 0.5, X + 1.0)]
    np.testing.assert_allclose(values, expected, rtol=2e-3, atol=1e-5, err_msg=name)
  identity = dict(re.findall(r"(\w+) ([-+.\de]+)", re.search(r"MMD\^2 at identity: (.*)", text).group(1)))
  assert set(identity) == set(params) and all(abs(float(v)) < 1e-5 for v in identity.values())

  # 2. The NST loss of the two maps, for each kernel, and the gradient check's two numbers.
  student = np.maximum(np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 8, 16))), 0)
  teacher = np.maximum(np.asarray(jax.random.normal(jax.random.key(3), (2, 4, 4, 32))), 0)
  for name in params:
    printed = re.search(rf"^ *{name}: NST (\S+), student against itself (\S+)$", text, re.M)
    assert printed, f"no NST line for {name}:\n{text}"
    np.testing.assert_allclose(float(printed.group(1)), np_reference.nst(student, teacher, name), rtol=1e-3)
    assert abs(float(printed.group(2))) < 1e-5
  autodiff, numeric = map(float, re.search(r"autodiff (\S+), central difference (\S+)", text).groups())
  np.testing.assert_allclose(autodiff, numeric, rtol=2e-2, atol=1e-5)

  # 3. The sweep's table has the teacher's and both students' rows, each from one finished run.
  for method in ("ce", "kd_nst", "teacher"):
    row = re.search(rf"^\| {method} \| 1 \| (\d+\.\d+) \|", text, re.M)
    assert row and 0 <= float(row.group(1)) <= 100, f"no finished {method} row in the table:\n{text}"
  root = pathlib.Path(kernel_env["NST_JAX_NOTEBOOK_WORKDIR"], "digits_small")
  assert (root / "results.md").exists() and (root / "kd_nst" / "seed0" / "results.json").exists()
  assert _images(nb) >= 4, "curves, MMD per layer, selectivity maps and t-SNE: four figures expected"


@pytest.mark.slow  # a notebook kernel, every method of every kernel, timings, the figure
def test_kernels_notebook_runs_in_its_small_setting(kernel_env, tmp_path):
  nb = _run("kernels", kernel_env, tmp_path)
  text = _text(nb)
  worst = float(re.search(r"largest difference from the definition: (\S+)", text).group(1))
  assert worst < 1e-5
  # Every method of every kernel, biased and unbiased: 6 cases x 2 estimators, 2 to 3 methods each.
  assert len(re.findall(r"^\| (linear|polynomial|gaussian) \|.*\| (biased|unbiased) \|", text, re.M)) == 30
  timings = re.findall(r"^\| .+ \| (linear|polynomial|gaussian) \| (\w+) \| (\d+\.\d+) \|$", text, re.M)
  assert {method for _, method, _ in timings} == {"mean", "spatial", "gram", "vmap", "definition"}
  assert all(float(ms) > 0 for _, _, ms in timings)

  # The picture: one code cell draws it, and its two tables hold the numbers drawn.
  [figure_cell] = [cell for cell in nb.cells if cell.cell_type == "code" and "display(fig)" in cell.source]
  assert any("image/png" in output.get("data", {}) for output in figure_cell.outputs), "no figure drawn"
  assert _images(nb) == 1

  # (a) MMD^2 as Y = X' + s drifts from X: X and X' rebuilt here from the notebook's keys and small sizes.
  X = np.asarray(jax.random.normal(jax.random.key(4), (32, 16)), np.float64)
  fresh = np.asarray(jax.random.normal(jax.random.key(5), (32, 16)), np.float64)
  header = r"^\| s \(n = 32, D = 16\) \| linear MMD² \| polynomial MMD² \| gaussian MMD² \|$"
  assert re.search(header, text, re.M), f"no drift table for n = 32, D = 16:\n{text}"
  drift = np.array([[float(v) for v in row] for row in re.findall(
      r"^\| (\d+\.\d+) \| ([-+.\de]+) \| ([-+.\de]+) \| ([-+.\de]+) \|$", text, re.M)])
  np.testing.assert_allclose(drift[:, 0], np.linspace(0.0, 2.0, 9))
  shifted = [fresh + s for s in drift[:, 0]]
  # Linear kernel, biased: the squared distance between the two means, in closed form.
  np.testing.assert_allclose(drift[:, 1], [np.sum((X.mean(0) - Y.mean(0)) ** 2) for Y in shifted], rtol=1e-4)
  for column, (name, kw) in enumerate((("polynomial", {"degree": 2, "c": 0.0}), ("gaussian", {})), start=2):
    expected = [np_reference.mmd2(X, Y, name, **kw) for Y in shifted]
    np.testing.assert_allclose(drift[:, column], expected, rtol=2e-3, atol=1e-5, err_msg=name)
  # What the Markdown promises: near 0 at s = 0 (sampling noise only), growing with s.
  assert np.all(np.diff(drift[:, 1:], axis=0) > 0), drift
  assert np.all(drift[0, 1:] < 0.1 * drift[-1, 1:]), drift

  # (b) The timing table: a positive time for every channel count, kernel and form.
  forms = [f"{k}: {form}" for k in ("linear", "polynomial", "gaussian") for form in ("auto", "vmap")]
  assert re.search(r"^\| C \(batch 2, 8x8\), ms \| " + re.escape(" | ".join(forms)) + r" \|$", text, re.M)
  sweep = re.findall(r"^\| (\d+) \| (.+) \|$", text, re.M)
  assert [int(c) for c, _ in sweep] == [16, 32, 64], sweep
  assert all(len(times.split(" | ")) == len(forms) and all(float(ms) > 0 for ms in times.split(" | "))
             for _, times in sweep), sweep

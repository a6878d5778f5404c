"""The README's kernel snippet, saved as a script and run from a temporary directory (as a researcher
who imports nst_jax into their own code would), prints every value it computes; the values are checked
against the NumPy double sums of tests/np_reference.py."""

import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import np_reference

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  if not blocks:
    pytest.fail("README.md has no python snippet")
  return blocks[0]


def test_readme_snippet_runs_as_a_script_from_anywhere(tmp_path):
  script = tmp_path / "snippet.py"
  script.write_text(_snippet())
  # A clean environment: nst_jax must be importable because it is installed (pip install -e .),
  # not because the repository is on the path.
  env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)}
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, ("run `pip install -e .` (the README's set-up) first?\n" + proc.stderr)
  printed = dict(re.findall(r"^(\w+) = (.+)$", proc.stdout, re.M))
  assert set(printed) == {"nst_polynomial", "nst_grad_shape", "mmd2_gaussian", "mmd2_linear_unbiased",
                          "mmd2_polynomial_x_x", "kd_uniform"}, proc.stdout

  key_s, key_t = jax.random.split(jax.random.key(0))  # the snippet's inputs, rebuilt here
  student = np.maximum(np.asarray(jax.random.normal(key_s, (8, 16, 16, 32))), 0)
  teacher = np.maximum(np.asarray(jax.random.normal(key_t, (8, 16, 16, 64))), 0)
  x = np.asarray(jax.random.normal(key_s, (10, 5)))
  y = np.asarray(jax.random.normal(key_t, (7, 5))) + 1.0
  np.testing.assert_allclose(float(printed["nst_polynomial"]), np_reference.nst(student, teacher), rtol=1e-4)
  assert printed["nst_grad_shape"] == "(8, 16, 16, 32)"
  sigma2 = np_reference.sigma2_heuristic(x, y)
  np.testing.assert_allclose(float(printed["mmd2_gaussian"]),
                             np_reference.mmd2(x, y, "gaussian", sigma2=sigma2), rtol=1e-4)
  np.testing.assert_allclose(float(printed["mmd2_linear_unbiased"]),
                             np_reference.mmd2(x, y, "linear", unbiased=True), rtol=1e-4, atol=1e-6)
  assert abs(float(printed["mmd2_polynomial_x_x"])) < 1e-5
  assert abs(float(printed["kd_uniform"])) < 1e-6

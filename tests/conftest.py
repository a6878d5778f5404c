"""Test-session setup: 8 fake CPU devices, set before JAX initialises its backends."""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

# Must happen before the first `import jax` anywhere in the test session.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Make `import nst_jax` work from a plain checkout without installing the package.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

# One persistent compilation cache for the session, shared with the runs the tests start as child
# processes (launch.py, the sweep, multi-process runs), which compile the same programs again and again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="nst_jax_test_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


import pytest  # noqa: E402 -- after the environment set-up above, which must precede any JAX import.


@pytest.fixture(scope="module")
def fast_compilation():
  """For modules about values, not speed (`pytestmark = pytest.mark.usefixtures("fast_compilation")`):
  XLA's optimisation passes would cost most of their time."""
  import jax  # noqa: PLC0415 -- imported here so that conftest itself never starts JAX early.

  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)

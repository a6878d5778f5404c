"""What a run directory's `run.json` says about the code and the machine that produced it.

`describe(config)` gathers it: the git commit of the checkout that holds this `nst_jax` package and
whether its tracked files differ from that commit, the command line, the Python and package versions,
the JAX backend, device kind and counts, the process count, the environment variables that change
numerics or device placement, and the seed. The training loop adds the start, end and wall time of the
run and of each of its stages, and writes the whole with `write`, which replaces the file atomically.

Nothing here may stop a run: a missing git, a package that is not installed or a checkout that is not a
git repository give None for that entry, never an exception.
"""

import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys

import jax

# Distribution names whose versions every record has (None where one is not installed).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections")
# Recorded only when the run imported them: they are data/logging helpers a run may not load at all.
OPTIONAL_PACKAGES = {"tensorflow_datasets": "tensorflow-datasets", "tensorflow": "tensorflow"}
# Settings that change what XLA computes or where it runs (XLA_FLAGS carries the deterministic-GPU switch).
ENVIRONMENT = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION",
               "CUDA_VISIBLE_DEVICES", "TPU_VISIBLE_CHIPS", "XLA_PYTHON_CLIENT_MEM_FRACTION")

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
  try:
    done = subprocess.run(["git", "-C", str(_PACKAGE_DIR), *args], capture_output=True, text=True,
                          timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict:
  """{"commit": sha, "dirty": bool} of the checkout holding this package; both None outside one.

  The package file must be tracked by that repository: an installed copy that merely sits inside some
  other repository (a virtual environment within a checkout, say) has no commit of its own.
  """
  if _git("ls-files", "--error-unmatch", "__init__.py") is None:
    return {"commit": None, "dirty": None}
  commit = _git("rev-parse", "HEAD")
  # Untracked files (workdirs, caches) are not code the run used, so only tracked changes count.
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": None if status is None else bool(status)}


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def package_versions() -> dict[str, str | None]:
  """Versions of `PACKAGES`, plus those of `OPTIONAL_PACKAGES` that this process has imported."""
  versions = {name: _version(name) for name in PACKAGES}
  for module, distribution in OPTIONAL_PACKAGES.items():
    if module in sys.modules:
      # tensorflow may be installed as tensorflow-cpu: the module knows its own version either way.
      versions[distribution] = getattr(sys.modules[module], "__version__", None) or _version(distribution)
  return versions


def describe(config) -> dict:
  """The code, machine and seed of a run with `config` (an ml_collections.ConfigDict), as a JSON-able dict."""
  devices = jax.devices()
  return {
      "git": git_state(),
      "command": list(sys.argv),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "packages": package_versions(),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "process_count": jax.process_count(),
      "environment": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ},
      "seed": int(config.seed),
  }


def write(path: str | os.PathLike, record: dict) -> None:
  """Writes `record` as JSON to `path` via a temporary file and a rename: readers never see half a file."""
  path = os.fspath(path)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)

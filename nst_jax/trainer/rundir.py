"""The run directory: the files a run writes into its workdir and how they are read back.

    <workdir>/config.json    the run's config (paths made absolute)           `CONFIG`
    <workdir>/run.json       code, packages, devices, timings (`describe`)    `RUN`
    <workdir>/results.json   accuracies and history; `"finished": true` marks a finished run   `RESULTS`
    <workdir>/checkpoints/   Orbax checkpoints (`trainer.checkpoints`)
    <workdir>/log.txt, tensorboard/, eval_<name>.json, curves.png

Every file here is written atomically (`write_json`, `write_text`, `write_bytes`: a temporary file,
then a rename), so a reader, a crash or a kill never leaves half a file. `is_finished`,
`read_results`, `read_config` and `read_json` read a run back.

`describe(config)` gathers what `run.json` says about the code and the machine: the git commit of the
checkout that holds this `nst_jax` package and whether its tracked files differ from that commit, the
command line, the Python and package versions, the JAX backend, device kind and counts, the process
count, the environment variables that change numerics or device placement, and the seed. The training
loop adds the start, end and wall time of the run and of each of its stages.

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

CONFIG, RUN, RESULTS = "config.json", "run.json", "results.json"

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]  # the nst_jax package


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


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename: readers never see half a file."""
  path = os.fspath(path)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, payload) -> None:
  """`payload` as indented JSON with sorted keys, written atomically."""
  write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict | None:
  """A JSON object file, or None where it is missing or unreadable."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def read_results(workdir: str | os.PathLike) -> dict | None:
  """The results.json of a finished run in `workdir`, else None (missing, unreadable or unfinished)."""
  results = read_json(os.path.join(workdir, RESULTS))
  return results if results is not None and results.get("finished") else None


def is_finished(workdir: str | os.PathLike) -> bool:
  """Whether the run in `workdir` finished: its results.json says so (the mark every stage checks)."""
  return read_results(workdir) is not None


def read_config(workdir: str | os.PathLike) -> dict:
  """The run's config.json as a dict ({} where it is missing or unreadable)."""
  return read_json(os.path.join(workdir, CONFIG)) or {}

"""The run directory: the files a run writes into its workdir and how they are read back.

    <workdir>/config.json    the run's config (paths made absolute)           `CONFIG`
    <workdir>/run.json       code, packages, devices, timings (`describe`)    `RUN`
    <workdir>/results.json   accuracies and history; `"finished": true` marks a finished run   `RESULTS`
    <workdir>/checkpoints/   Orbax checkpoints (`trainer.checkpoints`)
    <workdir>/log.txt, tensorboard/, eval_<name>.json, curves.png
    <workdir>/.lock          held by the one process that runs in the workdir (`lock`)   `LOCK`

Every file here is written atomically (`write_json`, `write_text`, `write_bytes`: a temporary file,
then a rename), so a reader, a crash or a kill never leaves half a file. `is_finished`,
`read_results`, `read_config` and `read_json` read a run back.

`describe(config)` gathers what `run.json` says about the code and the machine: the git commit of the
checkout that holds this `nst_jax` package and whether its tracked files differ from that commit, the
command line, the Python and package versions, the JAX backend, device kind and counts, the process
count, the environment variables that change numerics or device placement, and the seed. The training
loop adds the start, end and wall time of the run and of each of its stages.

One run per workdir: `lock(workdir)` takes an exclusive `fcntl.flock` on `<workdir>/.lock` (the pid and
host of the holder written inside) before a run writes anything there; a second command on the same
workdir gets `WorkdirBusy` naming them. The operating system releases the lock when the holding process
ends in any way (SIGKILL included), so a killed run never leaves a stale lock; the file itself stays and
means nothing without a holder. The sweep checks its runs' workdirs and its root with the same lock.

File-system failures (`os_error_line`): an `OSError` met while a run reads or writes its folders becomes
one line naming the path that failed, what that path is to the run (its workdir, the teacher's workdir,
the data cache, ...) and what to do.

Nothing here may stop a run: a missing git, a package that is not installed or a checkout that is not a
git repository give None for that entry, never an exception.
"""

import errno
import fcntl
import importlib.metadata
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping

import jax

# Distribution names whose versions every record has (None where one is not installed).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections")
# Recorded only when the run imported them: they are data/logging helpers a run may not load at all.
OPTIONAL_PACKAGES = {"tensorflow_datasets": "tensorflow-datasets", "tensorflow": "tensorflow"}
# Settings that change what XLA computes or where it runs (XLA_FLAGS carries the deterministic-GPU switch).
ENVIRONMENT = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "JAX_DEFAULT_MATMUL_PRECISION",
               "CUDA_VISIBLE_DEVICES", "TPU_VISIBLE_CHIPS", "XLA_PYTHON_CLIENT_MEM_FRACTION")

CONFIG, RUN, RESULTS = "config.json", "run.json", "results.json"
IMPORTED = "imported_models"  # config.json's record of the user's model files (not a config key)
LOCK = ".lock"  # hidden: readers of results.json and exports never meet it

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
      **_imported_models(config),
  }


def _imported_models(config) -> dict:
  """{"models": {role: {"name", "module", "file", "sha256"}}} for a student or teacher that is not a zoo
  model (an import path or a registered name: `models.source_record`), {} when both are zoo models."""
  from nst_jax import models  # Here: the run directory's other readers need no models.

  records = {}
  for role in ("student", "teacher"):
    name = config.get(role, {}).get("model", "")  # A partial config (a test's, a tool's) may lack one.
    try:
      record = models.source_record(name) if name else None
    except (ValueError, ImportError, OSError) as error:  # Nothing here may stop a run.
      record = {"name": name, "error": str(error)}
    if record is not None:
      records[role] = record
  return {"models": records} if records else {}


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename: readers never see half a file. An
  OSError without a file name (a full disk fails the write, not the open) gets `path` as its name."""
  path = os.fspath(path)
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as error:
    if error.filename is None and error.errno is not None:
      raise OSError(error.errno, error.strerror or os.strerror(error.errno), path) from error
    raise


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


def config_record(config) -> dict:
  """What config.json holds: the config as JSON and, for a model imported from the user's own code, its
  module file and SHA-256 under `IMPORTED` (the same records as run.json's "models"), so the run can be
  repeated with the very code it ran."""
  record = json.loads(config.to_json_best_effort())
  imported = _imported_models(config)
  if imported:
    record[IMPORTED] = imported["models"]
  return record


def read_config(workdir: str | os.PathLike) -> dict:
  """The run's config as a dict, without the `IMPORTED` record ({} where config.json is missing or
  unreadable)."""
  record = read_json(os.path.join(workdir, CONFIG)) or {}
  record.pop(IMPORTED, None)
  return record


# One run per workdir.


class RunDirError(Exception):
  """A run directory the run cannot use: one line naming the path and what to do."""


class WorkdirBusy(RunDirError):
  """Another process holds the workdir's lock."""


class RunLock:
  """The held lock of one workdir (`lock`); `release()` (or leaving the `with` block) lets it go."""

  def __init__(self, workdir: str, fd: int | None):
    self.workdir, self._fd = workdir, fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing the descriptor drops the flock.
      self._fd = None

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def _holder_text(path: str) -> str:
  try:
    with open(path) as f:
      holder = json.load(f)
    return f"pid {holder['pid']} on host {holder['host']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not yet written its pid"  # It took the lock a moment ago.


def lock(workdir: str | os.PathLike, *, what: str = "run") -> RunLock:
  """Takes the exclusive lock of `workdir` (created if missing) for this process, or raises
  `WorkdirBusy` naming the holder's pid and host; `what` names the holder's kind in that line ("run",
  "sweep"). The lock lasts until `release()` or until this process ends."""
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise WorkdirBusy(f"{workdir} is in use by another {what} ({_holder_text(path)}); wait for it to end "
                      "or stop it, or give another --workdir.") from None
  except BaseException:
    os.close(fd)
    raise
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
  return RunLock(workdir, fd)


def is_locked(workdir: str | os.PathLike) -> str | None:
  """Who holds `workdir`'s lock ("pid N on host H"), or None when nobody does (or there is no workdir).
  Creates nothing."""
  path = os.path.join(os.fspath(workdir), LOCK)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return _holder_text(path)
  finally:
    os.close(fd)
  return None


# File-system failures as one line.

_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there (old workdirs, caches) or use a folder on another "
                  "disk; a run resumes from its last checkpoint",
    errno.EDQUOT: "the disk quota is used up: free space there or use a folder on another disk; a run "
                  "resumes from its last checkpoint",
    errno.EACCES: "no permission to write there: use a folder you can write, or change its permissions",
    errno.EPERM: "not permitted there: use a folder you can write, or change its permissions",
    errno.EROFS: "the file system is read-only: use a folder on a writable disk",
    errno.ENOTDIR: "a file stands where a folder is needed: move the file or choose another path",
    errno.EEXIST: "something else already exists there: move it or choose another path",
    errno.EISDIR: "a folder stands where a file is needed: move it or choose another path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
    errno.ENOENT: "a folder on the way does not exist",
}
FILE_SYSTEM_ERRNOS = frozenset(_ADVICE)


def find_os_error(error: BaseException | None) -> OSError | None:
  """The first file-system OSError (an errno of `FILE_SYSTEM_ERRNOS`) in `error`'s chain of causes:
  Orbax and TensorStore re-raise a failed write as their own exception types."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in FILE_SYSTEM_ERRNOS:
      return error
    error = error.__cause__ or error.__context__
  return None


def _within(path: str, place: str) -> bool:
  """Whether `path` is `place`, inside it, or one of its parent folders (creating `place` failed there)."""
  path, place = os.path.abspath(path), os.path.abspath(place)
  return path == place or path.startswith(place.rstrip("/") + "/") or place.startswith(path.rstrip("/") + "/")


def os_error_line(error: OSError, places: Mapping[str, str], fallback: str | None = None) -> str:
  """One line for a file-system `error`: the path that failed, which of `places` ({description: path},
  e.g. {"the workdir (--workdir)": "/x/run"}) it belongs to, the system's words and what to do.
  `fallback` is the path named when the error carries none (a write that failed on a full disk)."""
  path = os.fspath(error.filename) if error.filename is not None else fallback
  matches = [(len(p), name) for name, p in places.items() if p and path and _within(path, p)]
  role = f" ({max(matches)[1]})" if matches else ""
  reason = error.strerror or os.strerror(error.errno)
  where = f"{path}{role}" if path else "a file"
  return f"cannot use {where}: {reason} [{errno.errorcode.get(error.errno, error.errno)}]; " \
         f"{_ADVICE.get(error.errno, 'check the path')}."


def check_writable(path: str | os.PathLike, description: str) -> None:
  """Raises RunDirError (one line) when `path` cannot become a writable folder: an existing ancestor is
  a file or not writable by this process. Creates nothing."""
  path = os.path.abspath(os.fspath(path))
  probe = path
  while not os.path.lexists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    code = errno.ENOTDIR
  elif not os.access(probe, os.W_OK | os.X_OK):
    code = errno.EACCES
  else:
    return
  raise RunDirError(os_error_line(OSError(code, os.strerror(code), probe), {description: path}))

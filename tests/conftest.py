"""Test-session set-up and the fixtures shared across modules.

* 8 fake CPU devices, set before JAX initialises its backends; a persistent compilation cache for this
  process (`pytest_configure`).
* `fast_compilation`: XLA's optimisation passes off, for modules about values rather than speed.
* `tiny_sweep` (session): `configs/tiny.py` swept by the real command (`ce` and `kd_nst`, seeds 0 and 1,
  one shared teacher, SIGKILLed once mid-run and resumed), trained once for the whole session (for every
  xdist worker) and read by the sweep, viz and seeds tests; every test that uses it is marked `slow` here.
* `tiny_image_folder` (session): a class-folder tree of JPEGs written from scikit-learn's digits, the
  stand-in for `../shared/data/cifar10/train` where that folder is absent.

Tests that train real runs are marked `slow`: `pytest -q` (pyproject.toml's addopts) leaves them out,
`pytest -q -m slow` runs only them, `pytest -q -m ""` runs everything. `-n 2` (pytest-xdist, as in the
README's commands) runs two worker processes, each test module whole on one of them.
"""

import atexit
import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# Must happen before the first `import jax` anywhere in the test session.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Make `import nst_jax` work from a plain checkout without installing the package.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import pytest  # noqa: E402 -- after the environment set-up above, which must precede any JAX import.


def pytest_configure(config):
  """`-n N` (pytest-xdist) sends each test module whole to one worker (`--dist loadfile`) unless
  `--dist` says otherwise, so that module fixtures are built once. Then one persistent compilation cache
  for this test process only (each xdist worker has its own). It is not handed to the runs the tests
  start as child processes: JAX writes a cache entry in place, so a child killed mid-write (the SIGKILL
  tests) or two children compiling one program at once (sweeps with --jobs 2, multi-process runs) can
  leave a truncated entry, and XLA aborts the next process that loads it."""
  if config.pluginmanager.hasplugin("xdist") and config.getoption("dist", "no") == "load":
    config.option.dist = "loadfile"  # `load`, xdist's default for `-n N`, would split modules.
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return  # The user's own cache, as JAX reads it.
  import jax  # noqa: PLC0415 -- after XLA_FLAGS above; importing JAX does not start its backends.

  cache = tempfile.mkdtemp(prefix="nst_jax_test_cache_")
  atexit.register(shutil.rmtree, cache, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="module")
def fast_compilation():
  """For modules about values, not speed (`pytestmark = pytest.mark.usefixtures("fast_compilation")`):
  XLA's optimisation passes would cost most of their time."""
  import jax  # noqa: PLC0415 -- imported here so that conftest itself never starts JAX early.

  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


# ----------------------------------------------------------------------------------------------------
# configs/tiny.py swept once per session.

TINY_CONFIG = _ROOT / "configs" / "tiny.py"
TINY_METHODS, TINY_SEEDS = ("ce", "kd_nst"), (0, 1)
TINY_RUNS = tuple((method, seed) for seed in TINY_SEEDS for method in TINY_METHODS)  # the sweep's order
# An override every run records in its config.json and sweep.json, and that changes no number: the
# teacher (which overrides do not reach) and ce/seed0 stay the same config, seed and arithmetic.
TINY_OVERRIDES = ("--config.logging.keep_checkpoints=2",)


# Tests that use these fixtures train real runs, whatever their module: they are marked `slow`.
SLOW_FIXTURES = frozenset({"tiny_sweep"})


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: the mark must be there by then
def pytest_collection_modifyitems(items):
  for item in items:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@dataclasses.dataclass(frozen=True)
class TinySweep:
  """A finished sweep root `root` (`<method>/seed<k>`, `teacher`, `sweep.json`, tables and curves) made by
  the sweep command with `config`, `methods`, `seeds` and `overrides`, and how it came about: `killed`
  ({"steps": ce/seed0's committed checkpoint steps, "finished": whether it had finished} when the first
  command was SIGKILLed), the console of the command that resumed it (`resumed_out`), of the same
  command once more (`rerun_out`, every run skipped), and each run's results.json modification time
  before that rerun (`mtimes`, {(method, seed): st_mtime})."""

  root: pathlib.Path
  killed: dict
  resumed_out: str
  rerun_out: str
  mtimes: dict
  config: pathlib.Path = TINY_CONFIG
  methods: tuple[str, ...] = TINY_METHODS
  seeds: tuple[int, ...] = TINY_SEEDS
  overrides: tuple[str, ...] = TINY_OVERRIDES

  def workdir(self, method: str, seed: int) -> pathlib.Path:
    return self.root / method / f"seed{seed}"

  def results(self, method: str, seed: int) -> dict:
    return json.loads((self.workdir(method, seed) / "results.json").read_text())


def committed_steps(workdir) -> list[int]:
  """The checkpoint steps Orbax has committed in a run's workdir (temporary folders left out)."""
  path = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def _start_tiny_sweep(root: pathlib.Path) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device per run
  command = [sys.executable, "-m", "nst_jax.tools.sweep", "--config", str(TINY_CONFIG),
             "--methods", ",".join(TINY_METHODS), "--seeds", ",".join(map(str, TINY_SEEDS)),
             "--root", str(root), "--jobs", "2", *TINY_OVERRIDES]
  return subprocess.Popen(command, cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)  # its own process group, to kill it whole


@contextlib.contextmanager
def _exclusive(lock_file: pathlib.Path):
  """Holds an exclusive lock on `lock_file` (created if needed) for the block: one process at a time."""
  with open(lock_file, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> TinySweep:
  """The sweep command on configs/tiny.py, SIGKILLed (with its runs) once ce/seed0 has a checkpoint, run
  again to the end (it resumes), and run a third time (it skips every finished run).

  Built once per test session: under pytest-xdist the first worker that needs it builds it in the
  session's shared temporary folder while the others wait on a lock, then read its record."""
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # `popen-gwN` per worker
  record = shared / "tiny_sweep.json"
  with _exclusive(shared / "tiny_sweep.lock"):
    if record.exists():
      saved = json.loads(record.read_text())
      return TinySweep(pathlib.Path(saved["root"]), saved["killed"], saved["resumed_out"],
                       saved["rerun_out"], {(m, k): t for m, k, t in saved["mtimes"]})
    sweep = _build_tiny_sweep(shared / "tiny_sweep" / "root")
    record.write_text(json.dumps({"root": str(sweep.root), "killed": sweep.killed,
                                  "resumed_out": sweep.resumed_out, "rerun_out": sweep.rerun_out,
                                  "mtimes": [[m, k, t] for (m, k), t in sweep.mtimes.items()]}))
    return sweep


def _build_tiny_sweep(root: pathlib.Path) -> TinySweep:
  started = time.perf_counter()
  proc = _start_tiny_sweep(root)
  first = root / "ce" / "seed0"
  deadline = time.time() + 600
  while not committed_steps(first) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.communicate(timeout=60)
  killed = {"steps": committed_steps(first), "finished": (first / "results.json").exists()}
  proc = _start_tiny_sweep(root)
  resumed_out, _ = proc.communicate(timeout=1200)
  assert proc.returncode == 0, resumed_out
  mtimes = {run: (root / run[0] / f"seed{run[1]}" / "results.json").stat().st_mtime for run in TINY_RUNS}
  proc = _start_tiny_sweep(root)
  rerun_out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, rerun_out
  print(f"tiny_sweep fixture: {time.perf_counter() - started:.0f} s")
  return TinySweep(root, killed, resumed_out, rerun_out, mtimes)


# ----------------------------------------------------------------------------------------------------
# A tiny image folder, where ../shared/data/cifar10/train is absent.

SHARED_CIFAR10 = _ROOT.parent / "shared" / "data" / "cifar10" / "train"


@dataclasses.dataclass(frozen=True)
class ImageFolder:
  """A class-folder tree `path/<class>/<NNNN>.<ext>`: `files_per_class` files per class, numbered from 0."""

  path: pathlib.Path
  classes: tuple[str, ...]
  files_per_class: int
  ext: str = "jpg"

  def file(self, cls: str, index: int) -> pathlib.Path:
    return self.path / cls / f"{index:04d}.{self.ext}"


TINY_FOLDER_PER_CLASS = 60


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> ImageFolder:
  """scikit-learn's digits as a CIFAR-like folder: classes `0` to `9`, the first 60 digits of each class
  in scikit-learn's order, grey levels scaled to 0..255, enlarged 4x (nearest) to 32x32, each channel a
  different gain so the three differ, saved as JPEG (quality 95) like the shared CIFAR-10 copies."""
  import numpy as np  # noqa: PLC0415 -- kept out of conftest's import time.
  from PIL import Image  # noqa: PLC0415
  from sklearn.datasets import load_digits  # noqa: PLC0415

  folder = ImageFolder(tmp_path_factory.mktemp("tiny_image_folder") / "train", tuple("0123456789"),
                       TINY_FOLDER_PER_CLASS)
  bunch = load_digits()
  gains = np.array([1.0, 0.8, 0.6])
  for label, cls in enumerate(folder.classes):
    (folder.path / cls).mkdir(parents=True)
    for i, index in enumerate(np.flatnonzero(bunch.target == label)[:folder.files_per_class]):
      grey = np.kron(bunch.images[index] * 255.0 / 16.0, np.ones((4, 4)))
      pixels = np.round(grey[..., None] * gains).astype(np.uint8)
      Image.fromarray(pixels).save(folder.file(cls, i), quality=95)
  return folder


@pytest.fixture(scope="session")
def shared_cifar10_folder() -> ImageFolder:
  """The shared CIFAR-10 training folder (JPEGs 0000-4999 per class); skips where it is absent."""
  if not SHARED_CIFAR10.is_dir():
    pytest.skip(f"the shared CIFAR-10 folder {SHARED_CIFAR10} is absent here (the tiny image folder "
                "variant of this test runs instead)")
  return ImageFolder(SHARED_CIFAR10, ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                      "horse", "ship", "truck"), 5000)


"""run.json's description of code and machine: fields against what the test session knows independently
(8 fake CPU devices from conftest, git's own answers, the packages' own __version__)."""

import json
import shutil
import subprocess
import sys
import types

import flax
import jax
import ml_collections
import numpy as np
import pytest

from nst_jax.trainer import rundir

ROOT = rundir._PACKAGE_DIR.parent


def _config(seed=7):
  return ml_collections.ConfigDict({"seed": seed})


def test_describe_records_machine_command_and_seed(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_gpu_deterministic_ops=true")
  monkeypatch.setattr(sys, "argv", ["launch.py", "--config", "configs/digits.py", "--workdir", "w"])
  record = json.loads(json.dumps(rundir.describe(_config(7))))  # JSON-able as it is
  assert record["seed"] == 7
  assert record["command"] == ["launch.py", "--config", "configs/digits.py", "--workdir", "w"]
  assert record["backend"] == "cpu" and record["device_count"] == 8 and record["local_device_count"] == 8
  assert record["process_count"] == 1 and record["device_kind"] == "cpu"
  assert "--xla_gpu_deterministic_ops=true" in record["environment"]["XLA_FLAGS"]
  assert record["python"] == ".".join(map(str, sys.version_info[:3]))
  packages = record["packages"]
  assert packages["jax"] == jax.__version__ and packages["numpy"] == np.__version__
  assert packages["flax"] == flax.__version__
  assert set(rundir.PACKAGES) <= set(packages)


def test_optional_packages_only_where_imported(monkeypatch):
  monkeypatch.delitem(sys.modules, "tensorflow_datasets", raising=False)
  monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
  assert "tensorflow-datasets" not in rundir.package_versions()
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(__version__="4.9.10"))
  assert rundir.package_versions()["tensorflow-datasets"] == "4.9.10"


@pytest.mark.skipif(shutil.which("git") is None, reason="no git on this machine")
def test_git_commit_of_this_checkout():
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
  if head.returncode != 0:
    pytest.skip("the package is not in a git checkout here")
  assert rundir.git_state()["commit"] == head.stdout.strip()


def _git(repo, *args):
  subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                 capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="no git on this machine")
def test_git_dirty_counts_tracked_changes_only(tmp_path, monkeypatch):
  package = tmp_path / "repo" / "pkg"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("x = 1\n")
  _git(tmp_path / "repo", "init", "-q")
  _git(tmp_path / "repo", "add", "pkg/__init__.py")
  _git(tmp_path / "repo", "commit", "-q", "-m", "first")
  monkeypatch.setattr(rundir, "_PACKAGE_DIR", package)
  state = rundir.git_state()
  assert len(state["commit"]) == 40 and state["dirty"] is False
  (package / "untracked.txt").write_text("not code the run used\n")
  assert rundir.git_state()["dirty"] is False
  (package / "__init__.py").write_text("x = 2\n")
  assert rundir.git_state()["dirty"] is True


def test_git_state_outside_a_checkout_is_none(tmp_path, monkeypatch):
  (tmp_path / "__init__.py").write_text("")
  monkeypatch.setattr(rundir, "_PACKAGE_DIR", tmp_path)
  assert rundir.git_state() == {"commit": None, "dirty": None}
  monkeypatch.setenv("PATH", str(tmp_path))  # No git executable at all.
  assert rundir.git_state() == {"commit": None, "dirty": None}


def test_write_replaces_the_file_whole(tmp_path):
  path = tmp_path / "run.json"
  path.write_text("{half a file")
  rundir.write_json(path, {"seed": 3, "stages": [{"name": "student", "wall_s": 1.5}]})
  assert json.loads(path.read_text()) == {"seed": 3, "stages": [{"name": "student", "wall_s": 1.5}]}
  assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left behind



# One run per workdir: the lock, held by another process.

_HOLDER = """
import sys, time
from nst_jax.trainer import rundir
held = rundir.lock(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def _hold(workdir):
  """A child process holding `workdir`'s lock (as a run in progress does)."""
  import os
  import signal  # noqa: F401 -- used by the callers through the returned process
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], env=env, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_lock_names_the_holder_and_a_sigkill_frees_it(tmp_path):
  import signal
  import socket

  workdir = tmp_path / "run"
  holder = _hold(workdir)
  try:
    assert rundir.is_locked(workdir) == f"pid {holder.pid} on host {socket.gethostname()}"
    with pytest.raises(rundir.WorkdirBusy) as info:
      rundir.lock(workdir)
    assert str(info.value) == (f"{workdir} is in use by another run (pid {holder.pid} on host "
                               f"{socket.gethostname()}); wait for it to end or stop it, or give another "
                               "--workdir.")
  finally:
    holder.send_signal(signal.SIGKILL)  # No chance to clean up: the OS releases the lock.
    holder.wait(timeout=30)
  assert rundir.is_locked(workdir) is None
  with rundir.lock(workdir) as held:
    assert json.loads((workdir / rundir.LOCK).read_text())["pid"] == __import__("os").getpid()
    assert held.workdir == str(workdir)
  assert rundir.is_locked(workdir) is None and rundir.is_locked(tmp_path / "never") is None
  assert not (tmp_path / "never").exists()  # asking creates nothing


def test_file_system_errors_are_one_line_naming_path_and_role(tmp_path):
  import errno

  places = {"the workdir, --workdir": "/w/runs/student", "the teacher's workdir": "/w/runs/teacher"}
  # Creating the workdir failed at a parent folder: still the workdir's error.
  line = rundir.os_error_line(PermissionError(errno.EACCES, "Permission denied", "/w/runs"), places)
  assert line.startswith("cannot use /w/runs (the workdir, --workdir): Permission denied [EACCES]; no "
                         "permission to write there")
  line = rundir.os_error_line(OSError(errno.EACCES, "Permission denied", "/w/runs/teacher/x"), places)
  assert "(the teacher's workdir)" in line
  full = rundir.os_error_line(OSError(errno.ENOSPC, "No space left on device"), places,
                              fallback="/w/runs/student")
  assert "/w/runs/student (the workdir, --workdir): No space left on device [ENOSPC]; the disk is" in full
  assert "\n" not in full and "\n" not in line
  # Orbax wraps the OSError of a failed write: the chain is searched.
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert rundir.find_os_error(outer).errno == errno.ENOSPC
  assert rundir.find_os_error(ValueError("x")) is None


def test_check_writable_and_a_full_disk_name_the_path(tmp_path, monkeypatch):
  import errno

  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(rundir.RunDirError, match=rf"cannot use {afile} \(the workdir\): Not a directory "
                                               r"\[ENOTDIR\]; a file stands where a folder is needed"):
    rundir.check_writable(afile / "run", "the workdir")
  rundir.check_writable(tmp_path / "new" / "run", "the workdir")  # creatable
  assert not (tmp_path / "new").exists()

  real_open = open

  class _Full:
    def __init__(self, f):
      self.f = f

    def write(self, data):
      raise OSError(errno.ENOSPC, "No space left on device")  # as write(2) fails on a full disk

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  monkeypatch.setattr(rundir, "open", lambda path, mode="r": _Full(real_open(path, mode)), raising=False)
  with pytest.raises(OSError) as info:
    rundir.write_json(tmp_path / "results.json", {"a": 1})
  assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "results.json")
  assert not (tmp_path / "results.json").exists()

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


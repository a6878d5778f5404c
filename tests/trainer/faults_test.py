"""Faults outside the config, with real training processes (digits, tiny models): two commands on one
workdir, a damaged newest checkpoint, a damaged teacher checkpoint."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nst_jax import models
from nst_jax.trainer import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TINY = ["--config.schedule.epochs=2", "--config.schedule.decay_epochs=(1,)",
        "--config.schedule.batch_size=64", "--config.logging.tensorboard=False",
        "--config.student.model=resnet8", "--config.data.image_size=8",
        "--config.logging.checkpoint_every_steps=7", "--config.logging.keep_checkpoints=5"]


def _tracebacks(out: str) -> list[str]:
  """The traceback headers and exception lines in `out` (a damaged checkpoint is one line, never these)."""
  return [ln for ln in out.splitlines()
          if ln.startswith("Traceback") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]


def _launch(workdir, *overrides, config="configs/digits.py"):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device per run
  return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--config", config, "--workdir",
                           str(workdir), *TINY, *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _final_state(workdir):
  model = models.get_model("resnet8", num_classes=10)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 8, 8, 1)), train=False))
  return checkpoints.load_variables(workdir, template)


def _assert_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("alone") / "run"
  out, _ = _launch(workdir).communicate(timeout=600)
  assert "done: last top-1" in out, out
  return workdir


def test_a_second_command_on_the_same_workdir_stops_at_once(alone, tmp_path):
  workdir = tmp_path / "run"
  first = _launch(workdir)
  deadline = time.time() + 120
  while not (workdir / ".lock").exists() and time.time() < deadline:
    time.sleep(0.1)
  started = time.time()
  second = _launch(workdir)
  out, _ = second.communicate(timeout=60)
  assert time.time() - started < 30 and second.returncode == 1, out
  [line] = [ln for ln in out.splitlines() if ln.strip()]
  assert line.startswith(f"nst_jax: {workdir} is in use by another run (pid {first.pid} on host "), out
  out, _ = first.communicate(timeout=600)
  assert first.returncode == 0 and "Orbax" not in out and "Traceback" not in out, out
  _assert_bitwise_equal(_final_state(workdir), _final_state(alone))  # the same result as alone


def _damage(step_dir, how):
  if how == "truncated":
    for path in (step_dir / "state" / "d").iterdir():
      os.truncate(path, path.stat().st_size // 2)
  else:
    (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncated", "no_metadata"])
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(alone, tmp_path, how):
  workdir = tmp_path / "run"
  shutil.copytree(alone, workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  (workdir / "results.json").unlink()  # as if stopped after its last checkpoint, before the end
  _damage(workdir / "checkpoints" / str(steps[-1]), how)
  proc = _launch(workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  [warning] = [ln for ln in out.splitlines() if f"checkpoint {steps[-1]} cannot be read" in ln]
  assert warning.startswith(f"checkpoint {steps[-1]} cannot be read"), out
  assert f"moved aside to {workdir / 'checkpoints' / str(steps[-1])}.damaged" in warning
  assert f"resumed from step {steps[-2]} " in out and not _tracebacks(out), out
  assert (workdir / "checkpoints" / f"{steps[-1]}.damaged").is_dir()
  _assert_bitwise_equal(_final_state(workdir), _final_state(alone))  # the same as uninterrupted


def test_a_damaged_teacher_checkpoint_is_one_line_naming_the_teacher(alone, tmp_path):
  teacher = tmp_path / "teacher"
  shutil.copytree(alone, teacher)
  last = max(int(p.name) for p in (teacher / "checkpoints").iterdir() if p.name.isdigit())
  _damage(teacher / "checkpoints" / str(last), "truncated")
  proc = _launch(tmp_path / "student", f"--config.teacher.workdir={teacher}",
                 "--config.teacher.model=resnet8", "--config.distill.kd_weight=1.0",
                 "--config.teacher.config=")
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 1, out
  lines = [ln for ln in out.splitlines() if ln.startswith("nst_jax: ")]
  where = teacher / "checkpoints" / str(last)
  assert lines and lines[-1].startswith(f"nst_jax: The teacher checkpoint {where} cannot be read "
                                        "(ValueError: OUT_OF_RANGE"), out
  assert not _tracebacks(out) and not (tmp_path / "student").exists()

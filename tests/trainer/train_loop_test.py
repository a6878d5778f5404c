"""End-to-end tests of launch.py / train_and_evaluate: a teacher trained first and a KD+NST student on
scikit-learn's digits, exact resume after SIGKILL, a clean stop on SIGTERM, clear config errors, TFDS
mock data, and JPEG folders (tests/conftest.py's tiny one, and the shared CIFAR-10 folder where it
exists). Every test that trains is marked slow; two of the config-error cases stay in the default run.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nst_jax import models
from nst_jax.trainer import checkpoints, config_lib, train_loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "configs" / "default.py"
FAST = ["--config.schedule.epochs=2", "--config.schedule.decay_epochs=(1,)",
        "--config.logging.log_every_steps=10", "--config.logging.checkpoint_every_steps=5",
        "--config.logging.tensorboard=False"]  # importing TensorFlow costs seconds per run
KD_NST = ["--config.teacher.model=resnet8", "--config.distill.ce_weight=0.1",
          "--config.distill.kd_weight=0.9", "--config.distill.nst.weight=50",
          "--config.distill.nst.layers=stage2:stage2,stage3:stage3", "--config.schedule.epochs=1"]


def _launch(workdir, *overrides, config=DEFAULT, cwd=None):
  """launch.py by absolute path from a directory that is not the repository (a new user's set-up)."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device per run
  cwd = cwd or pathlib.Path(workdir).parent
  os.makedirs(cwd, exist_ok=True)
  command = [sys.executable, str(ROOT / "launch.py"), f"--config={config}", f"--workdir={workdir}", *FAST,
             *overrides]
  return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _final_variables(workdir, model_name="resnet8"):
  model = models.get_model(model_name, num_classes=10)
  x = jax.numpy.zeros((1, 32, 32, 1))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return checkpoints.load_variables(workdir, template)


def _committed_steps(workdir):
  path = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def _wait_for_checkpoint(workdir, proc, timeout=300):
  deadline = time.time() + timeout
  while not _committed_steps(workdir) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  assert _committed_steps(workdir), f"no checkpoint in {workdir}"


def _assert_bitwise_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  code, out = _finish(_launch(workdir, "--config.logging.tensorboard=True"))
  assert code == 0, out
  return workdir, out


@pytest.mark.slow
def test_supervised_run_writes_results_config_and_events(uninterrupted):
  workdir, out = uninterrupted
  results = json.loads((workdir / "results.json").read_text())
  assert results["finished"] and [e["epoch"] for e in results["epochs"]] == [1, 2]
  assert results["last_top1"] == results["epochs"][-1]["top1"] > 10.0 + 5  # well above chance (10 %)
  assert results["best_top1"] == max(e["top1"] for e in results["epochs"])
  assert results["best_top5"] == max(e["top5"] for e in results["epochs"])
  assert results["best_epoch"] == max(results["epochs"], key=lambda e: e["top1"])["epoch"]
  # The epoch's train metrics are the means of the logged window means, weighted by their steps (a
  # window ends at every log or save step: 5, 10, 15, 20 and 22 in the first epoch).
  windows = [(int(m[1]), float(m[2])) for m in re.finditer(r"^step (\d+)/44 .*train_loss=([\d.e+-]+)", out,
                                                           re.M)]
  ends = [step for step, _ in windows if step <= 22]
  assert ends == [5, 10, 15, 20, 22]
  sizes = np.diff([0, *ends])
  np.testing.assert_allclose(results["epochs"][0]["train"]["train_loss"],
                             np.dot(sizes, [loss for _, loss in windows[:len(ends)]]) / 22, rtol=1e-3)
  config = json.loads((workdir / "config.json").read_text())
  assert config["student"]["model"] == "resnet8" and config["schedule"]["epochs"] == 2
  record = json.loads((workdir / "run.json").read_text())
  assert record["stage"] == "student" and record["wall_s"] > 0 and record["seed"] == 0
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert "steps/s" in out and "ETA" in out and "train_ce_loss" in out
  assert f"results in {workdir / 'results.json'}" in out.splitlines()[-1]
  # Saved every 5 steps, at the epoch ends (22) and at the end (44); the last 3 are kept.
  assert _committed_steps(workdir) == [35, 40, 44]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  workdir = tmp_path / "run"
  proc = _launch(workdir)
  _wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  killed_at = _committed_steps(workdir)
  assert killed_at and killed_at[-1] < 44 and not (workdir / "results.json").exists()
  code, out = _finish(_launch(workdir))
  assert code == 0, out
  assert f"resumed from step {killed_at[-1]}" in out
  _assert_bitwise_equal(_final_variables(workdir), _final_variables(reference))


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_like_sigterm(tmp_path):
  workdir = tmp_path / "run"
  proc = _launch(workdir, "--config.schedule.epochs=20")
  _wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGINT)
  code, out = _finish(proc, timeout=120)
  assert code == 128 + signal.SIGINT, out
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
  stopped_at = int(out.split("SIGINT: saved step ")[1].split()[0])
  assert _committed_steps(workdir)[-1] == stopped_at < 20 * 22
  assert "run the same command to resume" in out


TINY_TEACHER = """
import importlib.util
spec = importlib.util.spec_from_file_location("default", {default!r})
default = importlib.util.module_from_spec(spec)
spec.loader.exec_module(default)

def get_config():
  config = default.get_config()
  config.schedule.epochs, config.schedule.decay_epochs = 2, (1,)
  config.logging.checkpoint_every_steps = 5
  config.logging.tensorboard = False
  return config
"""


def _distil(root, teacher_config):
  """The KD + NST student in root/student, its teacher (trained first) beside it in root/teacher."""
  return _launch(root / "student", *KD_NST, "--config.teacher.workdir=teacher",
                 f"--config.teacher.config={teacher_config}")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  root = tmp_path_factory.mktemp("distilled")
  teacher_config = root / "tiny_teacher.py"
  teacher_config.write_text(TINY_TEACHER.format(default=str(DEFAULT)))
  code, out = _finish(_distil(root, teacher_config))
  assert code == 0, out
  return root, teacher_config, out


@pytest.mark.slow
def test_distillation_trains_its_teacher_first_as_a_stage(distilled):
  root, _, out = distilled
  assert out.index("nst_jax teacher stage") < out.index("nst_jax student stage")
  teacher_results = json.loads((root / "teacher" / "results.json").read_text())
  student_results = json.loads((root / "student" / "results.json").read_text())
  assert teacher_results["finished"] and len(teacher_results["epochs"]) == 2
  assert student_results["teacher"]["top1"] == pytest.approx(teacher_results["last_top1"])
  assert "train_nst_stage3-stage3_loss" in out and "train_kd_loss" in out
  stages = json.loads((root / "student" / "run.json").read_text())["stages"]
  assert [s["name"] for s in stages] == ["teacher", "student"] and stages[0]["steps"] == 44
  assert not re.search(r"^(W\d{4} |WARNING:absl)", out, re.M), out  # the teacher load is silent


@pytest.mark.slow
def test_sigterm_in_the_teacher_stage_then_rerun_equals_an_uninterrupted_run(distilled, tmp_path):
  reference_root, teacher_config, _ = distilled
  proc = _distil(tmp_path, teacher_config)
  _wait_for_checkpoint(tmp_path / "teacher", proc)
  proc.send_signal(signal.SIGTERM)
  code, out = _finish(proc, timeout=120)
  assert code == 128 + signal.SIGTERM, out
  assert "SIGTERM: saved step" in out and "teacher stage" in out.splitlines()[-1] + out
  assert not (tmp_path / "teacher" / "results.json").exists()  # the teacher did not finish...
  assert not (tmp_path / "student").exists()  # ...so the student never started
  code, out = _finish(_distil(tmp_path, teacher_config))
  assert code == 0, out
  assert "resumed from step" in out.split("nst_jax student stage")[0]  # the teacher resumed
  _assert_bitwise_equal(_final_variables(tmp_path / "teacher"), _final_variables(reference_root / "teacher"))
  _assert_bitwise_equal(_final_variables(tmp_path / "student"), _final_variables(reference_root / "student"))


@pytest.mark.slow
def test_finished_teacher_is_found_from_another_directory_and_not_retrained(distilled, tmp_path):
  root, teacher_config, _ = distilled
  code, out = _finish(_launch(root / "student_2", *KD_NST, "--config.teacher.workdir=teacher",
                              f"--config.teacher.config={teacher_config}", "--config.schedule.epochs=1",
                              cwd=tmp_path))
  assert code == 0, out
  assert "teacher stage" not in out and "nst_jax student stage" in out


# Each case is a process of its own (seconds to start): the default run keeps the first (an unknown key
# and its suggestion) and the last (a teacher tap, checked before any stage trains); the slow run all.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("overrides,message", [
    (["--config.student.modle=resnet8"], "unknown config key 'student.modle'. Did you mean: student.model?"),
    pytest.param(["--config.optim.lr=0.1"], "unknown config key 'optim.lr'.", marks=_SLOW),
    pytest.param(["--config.schedule.epochs=two"],
                 "config.schedule.epochs: expected a value of type int, got 'two'.", marks=_SLOW),
    pytest.param(["--config.optim.learning_rate=abc"],
                 "config.optim.learning_rate: expected a value of type float, got 'abc'.", marks=_SLOW),
    pytest.param(["--config.student.model=resnet9"], "config.student.model: unknown value 'resnet9'.",
                 marks=_SLOW),
    pytest.param(["--config.distill.nst.kernel=rbf"], "config.distill.nst.kernel: unknown value 'rbf'.",
                 marks=_SLOW),
    pytest.param(["--config.schedule.epochs=0"], "config.schedule.epochs must be an integer >= 1, got 0.",
                 marks=_SLOW),
    pytest.param(["--config.optim.learning_rate=-0.1"], "config.optim.learning_rate must be > 0, got -0.1.",
                 marks=_SLOW),
    pytest.param(["--config.schedule.batch_size=0"], "config.schedule.batch_size must be an integer >= 1",
                 marks=_SLOW),
    pytest.param(["--config.data.name=digitz"], "digitz", marks=_SLOW),
    ([*KD_NST, "--config.teacher.workdir=t", "--config.distill.nst.layers=stage1:stage9"],
     "teacher layer 'stage9' is not a tap of the teacher model"),
])
def test_bad_config_is_one_line_and_leaves_no_workdir(tmp_path, overrides, message):
  workdir = tmp_path / "run"
  code, out = _finish(_launch(workdir, *overrides), timeout=300)
  assert code != 0
  assert message in out and "Traceback" not in out, out
  assert len(out.strip().splitlines()) <= 2, out  # one line (and at most a JAX banner)
  assert not workdir.exists()


def test_non_finite_loss_stops_with_the_step_and_terms():
  with pytest.raises(FloatingPointError, match=r"Non-finite loss at step 7: \{'train_nst_loss': nan\}"):
    train_loop._check_finite({"train_ce_loss": 2.3, "train_nst_loss": float("nan")}, 7)
  train_loop._check_finite({"train_ce_loss": 2.3}, 7)


@pytest.mark.slow
def test_bfloat16_compute_with_pmap(tmp_path):
  config = config_lib.load_config_file(str(ROOT / "configs" / "default.py"))
  config.dtype, config.parallel = "bfloat16", "pmap"
  config.schedule.epochs, config.schedule.batch_size, config.schedule.decay_epochs = 2, 64, (1,)
  results = train_loop.train_and_evaluate(config, str(tmp_path / "run"))
  # Two epochs of digits: well above chance (10 %) once the BatchNorm running statistics have settled.
  assert results["finished"] and results["last_top1"] > 15.0
  assert "8 device(s)" in (tmp_path / "run" / "log.txt").read_text()


@pytest.mark.slow
def test_mock_tfds_cifar10_end_to_end(tmp_path):
  import tensorflow_datasets as tfds

  config = config_lib.load_config_file(str(ROOT / "configs" / "default.py"))
  config.data.name, config.data.eval_split, config.data.augment = "cifar10", "test", "cifar"
  config.data.cache_dir = str(tmp_path / "cache")
  config.schedule.epochs, config.schedule.batch_size, config.schedule.decay_epochs = 1, 16, ()
  with tfds.testing.mock_data(num_examples=64):
    results = train_loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["finished"] and results["epochs"][0]["epoch"] == 1


@pytest.mark.slow
def test_mock_imagenet_through_the_tf_data_pipeline(tmp_path):
  import tensorflow_datasets as tfds

  config = config_lib.load_config_file(str(ROOT / "configs" / "default.py"))
  config.data.name, config.data.eval_split, config.data.augment = "imagenet2012", "validation", "imagenet"
  config.data.image_size = 32  # the zoo's CIFAR ResNets at 32 px keep the test small
  config.schedule.epochs, config.schedule.batch_size, config.schedule.decay_epochs = 1, 16, ()
  with tfds.testing.mock_data(num_examples=48):
    results = train_loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["finished"] and results["epochs"][0]["epoch"] == 1
  log = (tmp_path / "run" / "log.txt").read_text()
  assert "imagenet2012 (tfds pipeline), 3 steps per epoch, 1000 classes" in log


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_image_folder", "shared_cifar10_folder"])
def test_loss_goes_down_on_a_jpeg_folder(which, request, tmp_path):
  """conftest's tiny folder of digits, and real CIFAR-10 images where the shared folder exists."""
  folder = request.getfixturevalue(which).path
  config = config_lib.load_config_file(str(ROOT / "configs" / "default.py"))
  config.data.name, config.data.path = "image_folder", str(folder)
  config.data.limit_per_class, config.data.validation_per_class = 32, 8
  config.data.augment, config.data.cache_dir = "none", str(tmp_path / "cache")
  config.schedule.epochs, config.schedule.batch_size, config.schedule.decay_epochs = 12, 32, ()
  config.optim.learning_rate, config.logging.log_every_steps = 0.05, 1
  results = train_loop.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [float(line.split("train_loss=")[1].split(",")[0].split()[0])
            for line in (tmp_path / "run" / "log.txt").read_text().splitlines() if "train_loss=" in line]
  assert len(losses) == 120  # 12 epochs x (320 // 32) steps
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses
  assert results["finished"]

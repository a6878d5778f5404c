"""End-to-end tests of launch.py / train_and_evaluate: a teacher trained first and a KD+NST student on
scikit-learn's digits, exact resume after SIGKILL, a clean stop on SIGTERM, clear config errors, TFDS
mock data, and real CIFAR-10 images from the shared folder.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nst_jax import checkpoints, models, train_loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR_FOLDER = ROOT / ".." / "shared" / "data" / "cifar10" / "train"
FAST = ["--config.schedule.epochs=2", "--config.schedule.decay_epochs=(1,)",
        "--config.logging.log_every_steps=10", "--config.logging.checkpoint_every_steps=5"]


def _launch(workdir, *overrides, config="configs/default.py"):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device per run
  return subprocess.Popen([sys.executable, "launch.py", f"--config={config}", f"--workdir={workdir}",
                           *FAST, *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _final_variables(workdir, model_name="resnet8"):
  model = models.get_model(model_name, num_classes=10)
  x = jax.numpy.zeros((1, 32, 32, 1))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return checkpoints.load_teacher_variables(workdir, template)


def _committed_steps(workdir):
  path = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def _assert_bitwise_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = _launch(workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return workdir, out


def test_supervised_run_writes_results_config_and_events(uninterrupted):
  workdir, out = uninterrupted
  results = json.loads((workdir / "results.json").read_text())
  assert results["finished"] and len(results["epochs"]) == 2
  assert results["last_top1"] == results["epochs"][-1]["top1"] > 10.0 + 5  # well above chance (10 %)
  assert results["best_top1"] == max(e["top1"] for e in results["epochs"])
  config = json.loads((workdir / "config.json").read_text())
  assert config["student"]["model"] == "resnet8" and config["schedule"]["epochs"] == 2
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert "steps/s" in out and "ETA" in out and "train_ce_loss" in out
  assert _committed_steps(workdir)[-1] == 44  # 2 epochs x 22 steps (1438 // 64), saved at the end


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  proc = _launch(tmp_path)
  deadline = time.time() + 300
  while not _committed_steps(tmp_path) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  killed_at = _committed_steps(tmp_path)
  assert killed_at and killed_at[-1] < 44 and not (tmp_path / "results.json").exists()
  resumed = _launch(tmp_path)
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out
  assert f"resumed from step {killed_at[-1]}" in out
  _assert_bitwise_equal(_final_variables(tmp_path), _final_variables(reference))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = _launch(tmp_path, "--config.schedule.epochs=20")
  deadline = time.time() + 300
  while not _committed_steps(tmp_path) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "SIGTERM: saved step" in out
  stopped_at = int(out.split("SIGTERM: saved step ")[1].split()[0])
  assert _committed_steps(tmp_path)[-1] == stopped_at < 20 * 22


TINY_TEACHER = """
import importlib.util
spec = importlib.util.spec_from_file_location("default", {default!r})
default = importlib.util.module_from_spec(spec)
spec.loader.exec_module(default)

def get_config():
  config = default.get_config()
  config.schedule.epochs, config.schedule.decay_epochs = 1, ()
  return config
"""


def test_distillation_trains_its_teacher_first(tmp_path):
  teacher_dir, teacher_config = tmp_path / "teacher", tmp_path / "tiny_teacher.py"
  teacher_config.write_text(TINY_TEACHER.format(default=str(ROOT / "configs" / "default.py")))
  proc = _launch(tmp_path / "student", "--config.teacher.model=resnet8",
                 f"--config.teacher.workdir={teacher_dir}", f"--config.teacher.config={teacher_config}",
                 "--config.distill.ce_weight=0.1", "--config.distill.kd_weight=0.9",
                 "--config.distill.nst.weight=50", "--config.schedule.epochs=1")
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert "is not trained yet: training it first" in out
  teacher_results = json.loads((teacher_dir / "results.json").read_text())
  student_results = json.loads((tmp_path / "student" / "results.json").read_text())
  assert student_results["teacher"]["top1"] == pytest.approx(teacher_results["last_top1"])
  assert "train_nst_stage3-stage3_loss" in out and "train_kd_loss" in out


@pytest.mark.parametrize("overrides,message", [
    (["--config.student.modle=resnet8"], "modle"),
    (["--config.schedule.epochs=two"], "epochs"),
    (["--config.student.model=resnet9"], "Unknown model 'resnet9'. Valid names:"),
    (["--config.distill.nst.kernel=rbf", "--config.distill.nst.weight=1",
      "--config.teacher.model=resnet8"], "Unknown kernel 'rbf'. Valid kernels"),
    (["--config.schedule.batch_size=0"], "does not divide"),
])
def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path, overrides, message):
  proc = _launch(tmp_path, *overrides)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert message in out and "Traceback" not in out, out


def test_non_finite_loss_stops_with_the_step_and_terms():
  with pytest.raises(FloatingPointError, match=r"Non-finite loss at step 7: \{'train_nst_loss': nan\}"):
    train_loop._check_finite({"train_ce_loss": 2.3, "train_nst_loss": float("nan")}, 7)
  train_loop._check_finite({"train_ce_loss": 2.3}, 7)


def test_bfloat16_compute_with_pmap(tmp_path):
  config = train_loop.load_config_file(str(ROOT / "configs" / "default.py"))
  config.dtype, config.parallel = "bfloat16", "pmap"
  config.schedule.epochs, config.schedule.batch_size, config.schedule.decay_epochs = 2, 64, (1,)
  results = train_loop.train_and_evaluate(config, str(tmp_path / "run"))
  # Two epochs of digits: well above chance (10 %) once the BatchNorm running statistics have settled.
  assert results["finished"] and results["last_top1"] > 15.0
  assert "8 device(s)" in (tmp_path / "run" / "log.txt").read_text()


def test_mock_tfds_cifar10_end_to_end(tmp_path):
  import tensorflow_datasets as tfds

  config = train_loop.load_config_file(str(ROOT / "configs" / "default.py"))
  config.data.name, config.data.eval_split, config.data.augment = "cifar10", "test", "cifar"
  config.data.cache_dir = str(tmp_path / "cache")
  config.schedule.epochs, config.schedule.batch_size, config.schedule.decay_epochs = 1, 16, ()
  with tfds.testing.mock_data(num_examples=64):
    results = train_loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["finished"] and results["epochs"][0]["epoch"] == 1


def test_mock_imagenet_through_the_tf_data_pipeline(tmp_path):
  import tensorflow_datasets as tfds

  config = train_loop.load_config_file(str(ROOT / "configs" / "default.py"))
  config.data.name, config.data.eval_split, config.data.augment = "imagenet2012", "validation", "imagenet"
  config.data.image_size = 32  # the zoo's CIFAR ResNets at 32 px keep the test small
  config.schedule.epochs, config.schedule.batch_size, config.schedule.decay_epochs = 1, 16, ()
  with tfds.testing.mock_data(num_examples=48):
    results = train_loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["finished"] and results["epochs"][0]["epoch"] == 1
  log = (tmp_path / "run" / "log.txt").read_text()
  assert "imagenet2012 (tf.data), 3 steps per epoch, 1000 classes" in log


@pytest.mark.skipif(not CIFAR_FOLDER.is_dir(), reason=f"shared CIFAR-10 folder {CIFAR_FOLDER} is absent")
def test_loss_goes_down_on_real_cifar_images(tmp_path):
  config = train_loop.load_config_file(str(ROOT / "configs" / "default.py"))
  config.data.name, config.data.path = "image_folder", str(CIFAR_FOLDER)
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

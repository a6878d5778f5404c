"""Tests of nst_jax.trainer.config_lib: layer pairs from the command line, range and choice checks (one per
case of the issue), path rules, and the nearest-key suggestion."""

import os
import pathlib

import pytest

from configs import default
from nst_jax.trainer import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


CASES = [
    ("optim.learning_rate", -0.1, r"config.optim.learning_rate must be > 0, got -0.1"),
    ("optim.learning_rate", 0.0, r"config.optim.learning_rate must be > 0"),
    ("schedule.epochs", 0, r"config.schedule.epochs must be an integer >= 1, got 0"),
    ("schedule.batch_size", 0, r"config.schedule.batch_size must be an integer >= 1"),
    ("distill.temperature", 0.0, r"config.distill.temperature must be > 0"),
    ("distill.kd_weight", -1.0, r"config.distill.kd_weight must be >= 0, got -1.0"),
    ("distill.nst.weight", -50.0, r"config.distill.nst.weight must be >= 0"),
    ("dtype", "float16", r"config.dtype: unknown value 'float16'. Valid values: float32, bfloat16"),
    ("parallel", "pjit", r"config.parallel: unknown value 'pjit'. Valid values: jit, pmap"),
    ("conv_impl", "cudnn", r"config.conv_impl: unknown value 'cudnn'. Valid values: auto, xla"),
    ("student.model", "resnet8x5", r"config.student.model: unknown value 'resnet8x5'.*Did you mean: "
     r"resnet8x4"),
    ("distill.nst.kernel", "gauss", r"Valid values: linear, polynomial, poly, gaussian.*Did you mean: "
     r"gaussian"),
    ("distill.nst.layers", "stage1", r"config.distill.nst.layers must be student_tap:teacher_tap pairs"),
    ("distill.fitnet.layer", "a:b,c:d", r"config.distill.fitnet.layer must be exactly one"),
    ("data.name", "digitz", r"digitz"),
    ("logging.log_every_steps", 0, r"config.logging.log_every_steps must be an integer >= 1"),
]


@pytest.mark.parametrize("key, value, message", CASES)
def test_check_names_the_key_and_the_valid_range(key, value, message):
  config = default.get_config()
  config_lib.check(config)  # the default is valid
  config = config_lib.apply_overrides(config, {key: value})
  with pytest.raises(config_lib.ConfigError, match=message) as error:
    config_lib.check(config)
  assert "\n" not in str(error.value)  # one line


def test_unknown_data_name_is_one_line_naming_the_project_sources():
  config = config_lib.apply_overrides(default.get_config(), {"data.name": "cifar_10"})
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.check(config)
  message = str(error.value)
  assert "\n" not in message and len(message) < 400
  for name in ("digits", "image_folder", "cifar10", "cifar100", "imagenet2012"):
    assert name in message


def test_teacher_needs_a_workdir():
  config = config_lib.apply_overrides(default.get_config(), {"teacher.model": "resnet20"})
  with pytest.raises(config_lib.ConfigError, match=r"config.teacher.workdir must name"):
    config_lib.check(config)


def test_apply_overrides_rejects_unknown_keys_with_a_suggestion():
  with pytest.raises(config_lib.ConfigError, match=r"Unknown config key 'optim.learnin_rate'. "
                                                    r"Did you mean: optim.learning_rate\?"):
    config_lib.apply_overrides(default.get_config(), {"optim.learnin_rate": 1.0})


def test_suggest():
  valid = config_lib.flat_keys(default.get_config())
  assert "optim.learning_rate" in valid and "distill.nst.layers" in valid and len(valid) > 40
  assert config_lib.suggest("optim.lr_rate", valid).startswith(" Did you mean: optim.learning_rate")
  assert config_lib.suggest("distill.nst.layer", valid).startswith(" Did you mean: distill.nst.layers")
  assert config_lib.suggest("zzzzzz", valid) == ""


def test_resolve_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mydata").mkdir()
  config = config_lib.apply_overrides(default.get_config(), {
      "teacher.model": "resnet20", "teacher.workdir": "digits", "teacher.config": "configs/digits.py:x",
      "data.path": "mydata", "data.cache_dir": "../shared/data"})
  resolved = config_lib.resolve_paths(config, "runs/student")
  assert resolved.teacher.workdir == str(tmp_path / "runs" / "digits")  # beside the student's workdir
  assert resolved.teacher.config == str(ROOT / "configs" / "digits.py") + ":x"  # from the repository
  assert resolved.data.path == str(tmp_path / "mydata")  # exists in the current directory
  assert resolved.data.cache_dir == os.path.normpath(ROOT / ".." / "shared" / "data")  # else the repository
  missing = config_lib.apply_overrides(config, {"data.path": "nowhere/data"})
  assert config_lib.resolve_paths(missing, "x").data.path == str(ROOT / "nowhere" / "data")
  absolute = config_lib.apply_overrides(config, {"teacher.workdir": "/elsewhere/t"})
  assert config_lib.resolve_paths(absolute, "x").teacher.workdir == "/elsewhere/t"


def test_load_config_file_with_argument_and_missing_file():
  config = config_lib.load_config_file(str(ROOT / "configs" / "cifar10_folder.py") + ":ce")
  assert config.distill.kd_weight == 0.0 and config.teacher.model == ""
  with pytest.raises(config_lib.ConfigError, match=r"Config file 'nope.py' does not exist"):
    config_lib.load_config_file("nope.py")

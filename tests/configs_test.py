"""Tests of configs/: every experiment config loads as launch.py loads it, declares exactly default.py's
keys, and every name in it resolves: models, dataset and splits, kernel, resize policy, objective, the
layer taps (found with `jax.eval_shape` on the dataset's image size, nothing computed), and the teacher
run it distils from. Config-string files (`configs/x.py:METHOD`) are checked for every listed method.
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from nst_jax import kernels, losses, models, objective
from nst_jax.trainer import config_lib, parallel, train
from nst_jax.trainer.data import device_pipeline, sources

# ml_collections loads config files with the deprecated SourceFileLoader.load_module.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
# Leading underscore: helper modules, not configs.
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))

DATASETS = (*sources.list_sources(), "imagenet2012")
SPLITS = {"digits": ("train", "validation", "all"), "image_folder": ("train", "validation", "all"),
          "cifar10": ("train", "test"), "cifar100": ("train", "test"),
          "imagenet2012": ("train", "validation")}
CHANNELS = {"digits": 1}  # Every other dataset is RGB.
AUGMENTATIONS = ("none", "cifar", "imagenet")
PIPELINES = ("auto", "device", "tfds")


def _load_module(path: pathlib.Path):
  """Imports a config file by path, as the trainer does for `teacher.config`."""
  spec = importlib.util.spec_from_file_location(f"configs_test_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _cases():
  cases = []
  for path in CONFIG_FILES:
    methods = getattr(_load_module(path), "METHODS", ())
    cases += [pytest.param(path, None, id=path.stem)]
    cases += [pytest.param(path, m, id=f"{path.stem}:{m}") for m in methods]
  return cases


CASES = _cases()


def _launch_parse(path: pathlib.Path, method: str | None) -> ml_collections.ConfigDict:
  """The config exactly as `launch.py --config path[:method]` gets it: a locked config-file flag."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True)
  flag_values(["launch.py", f"--config={path}" + (f":{method}" if method else "")])
  return flag_values.config


def _leaves(config, prefix=""):
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


@functools.cache
def _default_leaves():
  return _leaves(_load_module(CONFIG_DIR / "default.py").get_config())


@functools.cache
def _taps(model_name: str, image_size: int, channels: int) -> dict[str, tuple[int, ...]]:
  """Tap name -> (H, W, C), from shapes only. The pre-activation ResNets are traced with `scan_blocks`
  (same taps, see `test_scanned_preact_resnet_has_the_unrolled_taps`): ResNet-1001 unrolled takes ~20 s."""
  kwargs = {"scan_blocks": True} if model_name.startswith("preact_resnet") else {}
  model = models.get_model(model_name, num_classes=10, **kwargs)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  (_, features), _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
  return {name: tuple(f.shape[1:]) for name, f in features.items()}


def _model_taps(config, model_name):
  return _taps(model_name, config.data.image_size, CHANNELS.get(config.data.name, 3))


def _active_pairs(config) -> list[tuple[str, tuple[str, str]]]:
  """The (term, (student tap, teacher tap)) pairs with a weight > 0, read from the config's strings."""
  d = config.distill
  terms = [("nst", d.nst.weight, d.nst.layers), ("at", d.at.weight, d.at.layers),
           ("fitnet", d.fitnet.weight, d.fitnet.layer)]
  return [(term, tuple(pair.split(":"))) for term, weight, layers in terms if weight > 0
          for pair in layers.split(",")]


def test_config_files_are_found():
  names = {p.stem for p in CONFIG_FILES}
  assert {"default", "digits", "digits_kd_nst", "cifar10_folder", "cifar10_folder_teacher"} <= names
  assert len([c for c in CASES if c.values[1] is not None]) >= 4 * 6 + 2 * 10 + 8


@pytest.mark.parametrize("path, method", CASES)
def test_loads_locked_with_exactly_the_default_keys(path, method):
  config = _launch_parse(path, method)
  assert isinstance(config, ml_collections.ConfigDict) and config.is_locked
  leaves, default = _leaves(config), _default_leaves()
  assert sorted(leaves) == sorted(default), set(leaves) ^ set(default)
  for key, value in leaves.items():  # ConfigDict casts int -> float and list <-> tuple on assignment.
    assert type(value) is type(default[key]), (key, value, default[key])


@pytest.mark.parametrize("path, method", CASES)
def test_names_resolve(path, method, tmp_path):
  config = _launch_parse(path, method)
  d = config.data
  assert d.name in DATASETS
  for split in (d.train_split, d.eval_split):
    assert split.split("[")[0] in SPLITS[d.name], (d.name, split)
  assert d.eval_split != d.train_split
  assert d.pipeline in PIPELINES and d.augment in AUGMENTATIONS
  if d.pipeline == "device":
    assert d.augment in device_pipeline.AUGMENTATIONS
  if d.name == "image_folder":
    assert d.path and not pathlib.Path(d.path).is_absolute() and d.validation_per_class > 0
  assert d.image_size > 0
  assert (len(d.mean) == len(d.std) == CHANNELS.get(d.name, 3)) if d.mean else d.name in sources.MEAN_STD
  assert config.dtype in ("float32", "bfloat16") and config.parallel in parallel.MODES
  assert config.teacher.batchnorm in train.TEACHER_BATCHNORM_MODES

  if d.name == "image_folder" and not pathlib.Path(d.path).is_dir():
    # The image folder lies outside the repository (../shared/data) and may be absent here; the check
    # below only needs a folder, so an empty one stands in for it and the rest is checked all the same.
    d.path = str(tmp_path)
  config_lib.check(config)
  assert config.student.model in models.list_models()
  kernels.get_kernel(config.distill.nst.kernel)
  assert config.distill.nst.resize in losses.RESIZE_POLICIES
  obj = objective.Objective.from_config(config.distill)
  student_taps = _model_taps(config, config.student.model)
  if not config.teacher.model:
    obj.check_taps(list(student_taps), None)  # Raises if any term needs a teacher.
    return
  assert config.teacher.model in models.list_models()
  teacher_taps = _model_taps(config, config.teacher.model)
  obj.check_taps(list(student_taps), list(teacher_taps))
  assert obj.needs_teacher
  for term, (s, t) in _active_pairs(config):
    assert s in student_taps and t in teacher_taps, (term, s, t)
    (hs, ws, _), (ht, wt, _) = student_taps[s], teacher_taps[t]
    if term == "fitnet":  # objective.HintRegressor: equal sizes, or the student's twice the teacher's.
      assert (hs, ws) in ((ht, wt), (2 * ht, 2 * wt)), (term, s, t)
    else:  # Every config here pairs maps of equal size, so no term relies on the resize policy.
      assert (hs, ws) == (ht, wt), (term, s, t, student_taps[s], teacher_taps[t])


@pytest.mark.parametrize("path, method", CASES)
def test_teacher_is_a_supervised_run_of_its_config_on_the_same_data(path, method):
  config = _launch_parse(path, method)
  t = config.teacher
  if not t.model:
    assert t.config == "" and t.workdir == ""
    return
  teacher_file = ROOT / t.config
  assert teacher_file.is_file(), t.config
  assert teacher_file.parent == CONFIG_DIR and not teacher_file.name.startswith("_")
  assert t.workdir == teacher_file.stem  # Relative: beside the student's workdir (config_lib rules).
  teacher_config = _load_module(teacher_file).get_config()
  assert teacher_config.student.model == t.model
  assert teacher_config.teacher.model == ""
  assert teacher_config.data.to_dict() == config.data.to_dict()


@pytest.mark.parametrize("path, method", CASES)
def test_schedule_is_sane(path, method):
  config = _launch_parse(path, method)
  s, o = config.schedule, config.optim
  assert s.batch_size > 0 and s.epochs > 0 and 0 < s.decay_factor <= 1
  assert list(s.decay_epochs) == sorted(set(s.decay_epochs))
  assert all(0 < e < s.epochs for e in s.decay_epochs)
  assert o.learning_rate > 0 and 0 <= o.momentum < 1 and o.weight_decay >= 0
  assert o.momentum > 0 or not o.nesterov
  assert all(v > 0 for v in (config.logging.log_every_steps, config.logging.eval_every_epochs,
                             config.logging.checkpoint_every_steps, config.logging.keep_checkpoints))


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if p.stem != "default"], ids=lambda p: p.stem)
def test_docstring_gives_command_data_runtime_and_expected_result(path):
  doc = _load_module(path).__doc__
  assert f"python launch.py --config configs/{path.name}" in doc
  assert "--workdir workdirs/" in doc
  for word in ("Data", "Runtime", "Expected"):
    assert word in doc, word


def test_unknown_method_names_the_valid_ones():
  path = CONFIG_DIR / "cifar100_resnet32x4_to_resnet8x4.py"
  with pytest.raises(flags.IllegalFlagValueError, match="Unknown method 'nts'. Valid methods: .*kd_nst"):
    _launch_parse(path, "nts")


def test_repdistiller_rows():
  """nst-method.md §7: the RepDistiller protocol and the weights of each row."""
  path = CONFIG_DIR / "cifar100_resnet32x4_to_resnet8x4.py"
  weights = {"ce": (1.0, 0.0, 0.0, 0.0, 0.0), "kd": (0.1, 0.9, 0.0, 0.0, 0.0),
             "fitnet": (1.0, 0.0, 0.0, 100.0, 0.0), "at": (1.0, 0.0, 0.0, 0.0, 1000.0),
             "nst": (1.0, 0.0, 50.0, 0.0, 0.0), "kd_nst": (0.1, 0.9, 50.0, 0.0, 0.0)}
  for method, expected in weights.items():
    c = _launch_parse(path, method)
    d = c.distill
    assert (d.ce_weight, d.kd_weight, d.nst.weight, d.fitnet.weight, d.at.weight) == expected, method
    assert (d.temperature, d.nst.kernel, d.nst.degree, d.nst.c) == (4.0, "polynomial", 2, 0.0)
    assert d.nst.layers == "stage1:stage1,stage2:stage2,stage3:stage3"
    assert d.fitnet.layer == "stage2:stage2"
    assert (c.data.name, c.data.eval_split, c.data.augment) == ("cifar100", "test", "cifar")
    assert (c.optim.learning_rate, c.optim.momentum, c.optim.nesterov, c.optim.weight_decay) == (
        0.05, 0.9, False, 5e-4)
    assert (c.schedule.batch_size, c.schedule.epochs, tuple(c.schedule.decay_epochs)) == (
        64, 240, (150, 180, 210))
    assert c.teacher.batchnorm == "running"
  vgg = _launch_parse(CONFIG_DIR / "cifar100_vgg13_to_vgg8.py", "nst").distill.nst.layers
  assert vgg == "stage1:stage1,stage2:stage2,stage3:stage3,stage4:stage4"


def test_official_imagenet_recipe():
  """nst-method.md §6-7: the official code's ImageNet settings and layer pair."""
  c = _launch_parse(CONFIG_DIR / "imagenet_preact_resnet101_to_inception_bn.py", "kd_nst")
  assert (c.student.model, c.teacher.model, c.teacher.batchnorm) == (
      "inception_bn", "preact_resnet101", "batch")
  assert (c.data.name, c.data.image_size, c.data.augment) == ("imagenet2012", 224, "imagenet")
  assert (c.optim.learning_rate, c.optim.momentum, c.optim.nesterov, c.optim.weight_decay) == (
      0.1, 0.9, True, 1e-4)
  assert (c.schedule.batch_size, c.schedule.epochs, tuple(c.schedule.decay_epochs)) == (
      512, 100, (30, 60, 90))
  d = c.distill
  assert (d.ce_weight, d.kd_weight, d.temperature, d.nst.weight, d.nst.kernel) == (
      1.0, 1.0, 4.0, 50.0, "polynomial")
  assert d.nst.layers == "in5b:final_bn"


def test_scanned_preact_resnet_has_the_unrolled_taps():
  """`_taps` traces preact ResNets with scan_blocks=True; the taps must not depend on it."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  unrolled = models.get_model("preact_resnet164", num_classes=10)
  (_, features), _ = jax.eval_shape(lambda x: unrolled.init_with_output(jax.random.key(0), x, train=False), x)
  assert {k: tuple(v.shape[1:]) for k, v in features.items()} == _taps("preact_resnet164", 32, 3)

"""Tests for nst_jax.tools.convert: PyTorch checkpoints of every supported model, the errors, the export,
the CLI.

Equivalence: for every supported name, the PyTorch statement of the architecture in tests/torch_models.py
(written from the architecture, with the original module names), with random weights and randomised
BatchNorm statistics, is saved to a file, imported with `convert.from_torch`, and its logits and every
tap are compared with the nst_jax model's in eval mode: max |jax - torch| / max |torch| <= 1e-5 per
tensor, float32, 2 images of 32 x 32 (the CIFAR resolution; for torchvision's ResNets the smallest size
at which every stride-2 stage still halves its input, down to 1 x 1 in stage 4). The file format rotates
over the models (raw .pth; RepDistiller's `{"model": ...}` wrapper with DataParallel's `module.` prefix
in PyTorch's pre-1.6 (non-zip) format, as its published teachers are; .safetensors) and one test reads
one model in every format. One training-mode forward compares outputs and the updated running
statistics (PyTorch's momentum and unbiased variance). These need PyTorch and skip without it; the
error, export and command-line tests need only NumPy and safetensors.
"""

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file as save_safetensors

from nst_jax import models
from nst_jax.tools import convert
from nst_jax.trainer import checkpoints, rundir

try:
  import torch
except ImportError:
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (pip install -r "
                                 "requirements-torch.txt): the comparisons with PyTorch are skipped")

NUM_CLASSES = 10
TOL = 1e-5
FORMATS = ("pth", "pth_repdistiller", "safetensors")
CIFAR_FAMILY = [name for name in convert.SUPPORTED if name not in ("resnet18", "resnet34", "resnet50",
                                                                   "resnet101")]
# One model per architecture family and block kind in the default run; the other depths and widths of
# the same code (resnet14-110, resnet32x4, wrn_16_1/40_x, vgg11-19, resnet34/101) in the slow run.
EVAL_DEFAULT = ("resnet8", "resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                "ResNet50", "resnet18", "resnet50")


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  # The comparisons are about values, not speed: XLA's optimisation passes would triple compile times,
  # and PyTorch's thread pool, on a loaded 2-core machine, makes a 2-image forward take seconds.
  jax.config.update("jax_disable_most_optimizations", True)
  threads = torch.get_num_threads() if torch is not None else None
  if torch is not None:
    torch.set_num_threads(1)
  yield
  jax.config.update("jax_disable_most_optimizations", False)
  if torch is not None:
    torch.set_num_threads(threads)


@functools.cache
def _apply(name: str, train: bool):
  model = models.get_model(name, NUM_CLASSES)
  return jax.jit(functools.partial(model.apply, train=train, mutable=["batch_stats"]))


def _torch_model(name: str, seed: int):
  """The PyTorch statement with its default random weights and random BatchNorm affines and statistics."""
  from tests import torch_models

  torch.manual_seed(seed)
  model = torch_models.build(name, NUM_CLASSES)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  return model


def _images(batch=2, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, 3, 32, 32)).astype(np.float32)


def _save(state_dict, fmt: str, directory) -> str:
  path = os.path.join(directory, f"model.{'safetensors' if fmt == 'safetensors' else 'pth'}")
  if fmt == "pth":
    torch.save(state_dict, path)
  elif fmt == "pth_repdistiller":  # RepDistiller's train_teacher.py under DataParallel, PyTorch 1.0's format.
    torch.save({"epoch": 240, "model": {f"module.{k}": v for k, v in state_dict.items()},
                "accuracy": torch.tensor(79.42), "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5}]}},
               path, _use_new_zipfile_serialization=False)
  else:
    save_safetensors({k: v.numpy() for k, v in state_dict.items()}, path)
  return path


def _nhwc(t):
  array = t.detach().numpy()
  return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def _relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def assert_matches(jax_out, torch_out, tol=TOL):
  """Logits and every tap of the nst_jax model against the PyTorch statement's, NCHW -> NHWC."""
  (logits, features), (torch_logits, torch_taps) = jax_out, torch_out
  assert set(features) == set(torch_taps), f"taps {sorted(features)} vs {sorted(torch_taps)}"
  errors = {"logits": _relative_error(logits, _nhwc(torch_logits))}
  errors.update({tap: _relative_error(features[tap], _nhwc(t)) for tap, t in torch_taps.items()})
  worst = max(errors, key=errors.get)
  assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.2e} > {tol:.0e} ({errors})"


@needs_torch
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in EVAL_DEFAULT else pytest.mark.slow)
                                  for n in sorted(convert.SUPPORTED)])
def test_eval_matches_pytorch(name, tmp_path):
  index = sorted(convert.SUPPORTED).index(name)
  model = _torch_model(name, seed=index).eval()
  x = _images(seed=index)
  with torch.no_grad():
    expected = model(torch.from_numpy(x))
  variables = convert.from_torch(name, _save(model.state_dict(), FORMATS[index % 3], tmp_path), NUM_CLASSES)
  out, state = _apply(name, False)(variables, x.transpose(0, 2, 3, 1))
  assert_matches(out, expected)
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])


@needs_torch
@pytest.mark.parametrize("name", ["resnet8x4", "MobileNetV2"])
def test_train_mode_matches_pytorch(name):
  # Batch statistics (MobileNetV2: depthwise convolutions, 2 x 2 maps at the end) and the running
  # statistics after one step: momentum 0.1 and the unbiased batch variance in both.
  model = _torch_model(name, seed=1).train()
  variables = convert.from_torch(name, model.state_dict(), NUM_CLASSES)
  x = _images(batch=4, seed=1)
  with torch.no_grad():
    expected = model(torch.from_numpy(x))
  out, state = _apply(name, True)(variables, x.transpose(0, 2, 3, 1))
  # Normalising by batch statistics of 4 images amplifies float32 rounding more than eval mode does.
  assert_matches(out, expected, tol=1e-4)
  updated = convert.from_torch(name, model.state_dict(), NUM_CLASSES)["batch_stats"]
  errors = jax.tree.map(_relative_error, state["batch_stats"], updated)
  assert max(jax.tree.leaves(errors)) <= TOL


@needs_torch
def test_every_format_gives_the_same_variables(tmp_path):
  model = _torch_model("resnet8x4", seed=2)
  state_dict = model.state_dict()
  reference = convert.from_torch("resnet8x4", state_dict, NUM_CLASSES)
  sources = {"state_dict of numpy arrays": {k: v.numpy() for k, v in state_dict.items()},
             "DataParallel prefix": {f"module.{k}": v for k, v in state_dict.items()}}
  for fmt in FORMATS:
    directory = tmp_path / fmt
    directory.mkdir()
    sources[fmt] = _save(state_dict, fmt, directory)
  for source, value in sources.items():
    got = convert.from_torch("resnet8x4", value, NUM_CLASSES)
    assert jax.tree.structure(got) == jax.tree.structure(reference), source
    jax.tree.map(functools.partial(np.testing.assert_array_equal, err_msg=source), got, reference)
  # The layouts themselves, on one tensor of each kind: conv OIHW -> HWIO, linear (out, in) -> (in, out).
  np.testing.assert_array_equal(reference["params"]["layer1_0"]["conv2"]["Conv_0"]["kernel"][1, 2, 3, 4],
                                state_dict["layer1.0.conv2.weight"][4, 3, 1, 2])
  np.testing.assert_array_equal(reference["params"]["fc"]["Dense_0"]["kernel"][5, 7],
                                state_dict["fc.weight"][7, 5])
  np.testing.assert_array_equal(reference["batch_stats"]["bn1"]["BatchNorm_0"]["var"],
                                state_dict["bn1.running_var"])
  formats = [convert.read_checkpoint(sources[f])[1] for f in FORMATS]
  assert formats == ["torch zip", "torch legacy", "safetensors"]


@needs_torch
def test_grouped_and_depthwise_kernels_keep_their_groups():
  # ShuffleV1's first unit: grouped 1x1 conv3 (groups 3) and depthwise 3x3 conv2.
  state_dict = _torch_model("ShuffleV1", seed=3).state_dict()
  unit = convert.from_torch("ShuffleV1", state_dict, NUM_CLASSES)["params"]["stage2_unit1"]
  depthwise = state_dict["layer2.1.conv2.weight"]  # (C, 1, 3, 3)
  grouped = state_dict["layer2.1.conv3.weight"]  # (480, 120 / 3, 1, 1)
  assert depthwise.shape[1] == 1 and grouped.shape == (480, 40, 1, 1)
  np.testing.assert_array_equal(unit["conv2"]["Conv_0"]["kernel"], depthwise.numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(unit["conv3"]["Conv_0"]["kernel"][0, 0], grouped.numpy()[:, :, 0, 0].T)


@needs_torch
def test_corrupted_tensor_is_caught():
  # Mistakes a converter could make, each one tensor: a 3x3 kernel with its spatial axes swapped, and a
  # running variance off by 1% in one channel. The comparison must see both.
  model = _torch_model("resnet8", seed=4).eval()
  x = _images(seed=4)
  with torch.no_grad():
    expected = model(torch.from_numpy(x))
  variables = convert.from_torch("resnet8", model.state_dict(), NUM_CLASSES)
  assert_matches(_apply("resnet8", False)(variables, x.transpose(0, 2, 3, 1))[0], expected)

  swapped = jax.tree.map(np.array, variables)
  kernel = swapped["params"]["layer2_0"]["conv1"]["Conv_0"]
  kernel["kernel"] = kernel["kernel"].transpose(1, 0, 2, 3).copy()
  off = jax.tree.map(np.array, variables)
  off["batch_stats"]["layer1_0"]["bn2"]["BatchNorm_0"]["var"][3] *= 1.01
  for corrupted in (swapped, off):
    with pytest.raises(AssertionError, match="relative error"):
      assert_matches(_apply("resnet8", False)(corrupted, x.transpose(0, 2, 3, 1))[0], expected)


@needs_torch
def test_exported_state_dict_loads_strictly_into_pytorch():
  # A student trained here, evaluated in PyTorch: nst_jax variables exported, loaded with strict=True.
  from tests import torch_models

  x = _images(seed=5).transpose(0, 2, 3, 1)
  variables = _random_variables("wrn_16_2", seed=5)
  model = torch_models.build("wrn_16_2", NUM_CLASSES).eval()
  exported = convert.to_torch("wrn_16_2", variables)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  with torch.no_grad():
    expected = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
  assert_matches(_apply("wrn_16_2", False)(variables, x)[0], expected)


# -- Without PyTorch: the export round trip, the errors, the command line ------------------------------


def _random_variables(name, num_classes=NUM_CLASSES, seed=0):
  """Variables a network can run on: He-normal kernels, positive scales and variances, small offsets."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    kind, shape = path[-1].key, leaf.shape
    if kind == "kernel":
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    elif kind in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.uniform(-0.2, 0.2, shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, convert._template(name, num_classes))


@pytest.mark.parametrize("name", CIFAR_FAMILY)
def test_to_torch_round_trip(name):
  variables = _random_variables(name)
  state = convert.to_torch(name, variables)
  bn_count = sum(k.endswith(".running_var") for k in state)
  assert sum(k.endswith(".num_batches_tracked") for k in state) == bn_count > 0
  back = convert.from_torch(name, state, NUM_CLASSES)
  jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_to_torch_names_and_layouts():
  # Hand-picked entries of RepDistiller's resnet8 state_dict.
  variables = _random_variables("resnet8")
  state = convert.to_torch("resnet8", variables)
  p, s = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(state["layer2.0.downsample.0.weight"],
                                p["layer2_0"]["downsample_conv"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(state["layer3.0.downsample.1.running_mean"],
                                s["layer3_0"]["downsample_bn"]["BatchNorm_0"]["mean"])
  np.testing.assert_array_equal(state["fc.weight"], p["fc"]["Dense_0"]["kernel"].T)
  assert state["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
  assert state["fc.weight"].shape == (NUM_CLASSES, 64)


def _state(name="resnet8", num_classes=NUM_CLASSES):
  return convert.to_torch(name, _random_variables(name, num_classes))


def test_unknown_model_lists_the_supported_ones():
  with pytest.raises(convert.ConversionError, match=r"Cannot convert model 'resnet9'. Supported: resnet8, "
                     r"resnet14, .*ResNet50, resnet18, resnet34, resnet50, resnet101\."):
    convert.from_torch("resnet9", {}, NUM_CLASSES)
  with pytest.raises(convert.ConversionError, match=r"Cannot convert model 'preact_resnet164'"):
    convert.to_torch("preact_resnet164", {})


def test_missing_and_unexpected_keys_are_named():
  state = _state()
  del state["layer1.0.bn1.running_var"]
  state["layer4.0.conv1.weight"] = np.zeros((1, 1, 3, 3), np.float32)
  with pytest.raises(convert.ConversionError, match=r"does not fit resnet8 .*1 missing keys: "
                     r"layer1.0.bn1.running_var; 1 unexpected keys: layer4.0.conv1.weight\."):
    convert.from_torch("resnet8", state, NUM_CLASSES)


def test_checkpoint_of_another_depth_lists_its_keys():
  with pytest.raises(convert.ConversionError,
                     match=r"does not fit resnet8 .*unexpected keys: layer1.1.bn1.bias, .*\(\d+ more\)"):
    convert.from_torch("resnet8", _state("resnet20"), NUM_CLASSES)


def test_shape_mismatch_names_entry_expected_and_found():
  state = _state()
  state["layer2.0.conv2.weight"] = np.zeros((32, 32, 1, 1), np.float32)
  with pytest.raises(convert.ConversionError, match=r"Checkpoint entry layer2.0.conv2.weight: expected "
                     r"shape \(32, 32, 3, 3\) for resnet8 \(nst_jax params/layer2_0/conv2/Conv_0/kernel "
                     r"\(3, 3, 32, 32\)\), found \(32, 32, 1, 1\)\."):
    convert.from_torch("resnet8", state, NUM_CLASSES)


def test_class_count_mismatch():
  with pytest.raises(convert.ConversionError, match=r"The checkpoint has 100 classes \(fc.weight is "
                     r"\(100, 64\)\), but num_classes is 10\."):
    convert.from_torch("resnet8", _state(num_classes=100), NUM_CLASSES)


def test_non_numeric_entry_and_non_mapping():
  state = _state()
  state["fc.bias"] = np.array(["a"] * NUM_CLASSES)
  with pytest.raises(convert.ConversionError, match=r"'fc.bias' is not a numeric tensor"):
    convert.from_torch("resnet8", state, NUM_CLASSES)
  with pytest.raises(convert.ConversionError, match=r"must be a state_dict .*got list"):
    convert.from_torch("resnet8", [1, 2], NUM_CLASSES)


def test_pth_without_pytorch_says_what_to_do(tmp_path, monkeypatch):
  path = tmp_path / "teacher.pth"
  path.write_bytes(b"PK\x03\x04 not read")
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now fails.
  with pytest.raises(convert.ConversionError, match=r"needs PyTorch: pip install -r requirements-torch.txt, "
                     r"or save the state_dict as .safetensors"):
    convert.read_checkpoint(path)


@needs_torch
def test_repdistiller_last_checkpoint_with_its_options(tmp_path):
  # RepDistiller's `<model>_last.pth`: {"opt": argparse.Namespace, "model": ..., "optimizer": ...}.
  import argparse

  state_dict = {k: torch.from_numpy(v) for k, v in _state().items()}
  path = tmp_path / "resnet8_last.pth"
  torch.save({"opt": argparse.Namespace(model="resnet8", learning_rate=0.05), "model": state_dict,
              "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5}]}}, path)
  variables = convert.from_torch("resnet8", path, NUM_CLASSES)
  np.testing.assert_array_equal(variables["params"]["fc"]["Dense_0"]["bias"], state_dict["fc.bias"])


@needs_torch
def test_other_pickled_objects_are_refused(tmp_path):
  import fractions

  path = tmp_path / "teacher.pth"
  torch.save({"model": {}, "ratio": fractions.Fraction(1, 3)}, path)
  with pytest.raises(convert.ConversionError,
                     match=r"weights_only=True\) failed: .*Re-save just the state_dict"):
    convert.read_checkpoint(path)


def test_missing_file():
  with pytest.raises(convert.ConversionError, match=r"Checkpoint file 'nowhere.pth' does not exist"):
    convert.read_checkpoint("nowhere.pth")


def _convert_cli(tmp_path, *extra, name="resnet8"):
  checkpoint = tmp_path / "teacher.safetensors"
  variables = _random_variables(name, seed=7)
  save_safetensors(convert.to_torch(name, variables), str(checkpoint))
  workdir = tmp_path / "teacher_run"
  results = convert.main(["--model", name, "--num_classes", str(NUM_CLASSES), "--checkpoint", str(checkpoint),
                          "--workdir", str(workdir), *extra])
  return variables, checkpoint, workdir, results


def test_cli_writes_a_finished_teacher_run(tmp_path):
  variables, checkpoint, workdir, results = _convert_cli(tmp_path)
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "results.json", "run.json"]
  with open(workdir / "results.json") as f:
    assert json.load(f) == results
  assert results == {"finished": True, "source": "converted", "last_top1": None, "last_top5": None,
                     "best_top1": None, "best_top5": None, "best_epoch": 0, "epochs": [], "eval_count": None}
  with open(workdir / "config.json") as f:
    config = json.load(f)
  assert (config["student"]["model"], config["teacher"]["model"], config["data"]["name"]) == (
      "resnet8", "", "digits")
  with open(workdir / "run.json") as f:
    run = json.load(f)
  assert run["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
  assert (run["source"], run["format"], run["model"], run["num_classes"]) == (
      str(checkpoint), "safetensors", "resnet8", NUM_CLASSES)

  # What a distillation run does with it: the teacher's variables, exactly, through the Checkpointer.
  loaded = checkpoints.load_variables(str(workdir), convert._template("resnet8", NUM_CLASSES))
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  assert rundir.is_finished(str(workdir))


def test_cli_refuses_to_replace_a_run_unless_told(tmp_path, capsys):
  _convert_cli(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    _convert_cli(tmp_path)
  assert exit_info.value.code == 2
  assert "already holds a checkpoint: give a new --workdir, or --overwrite" in capsys.readouterr().err
  variables, _, workdir, _ = _convert_cli(tmp_path, "--overwrite")
  loaded = checkpoints.load_variables(str(workdir), convert._template("resnet8", NUM_CLASSES))
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_cli_errors_are_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit):
    convert.main(["--model", "resnet8", "--num_classes", "100", "--checkpoint", str(tmp_path / "none.pth"),
                  "--workdir", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert err.strip().count("\n") == 0 and "Checkpoint file" in err and "does not exist" in err
  assert not os.path.exists(tmp_path / "run")


def test_cli_evaluate_records_the_accuracy(tmp_path, monkeypatch):
  # The evaluation itself is nst_jax.tools.evaluate's (tested there); here: what it is given and what is kept.
  from nst_jax.tools import evaluate

  calls = []

  def fake_evaluate(config, variables):
    calls.append((config.student.model, config.teacher.model, variables))
    return {"top1": 71.25, "top5": 90.5, "count": 80}

  monkeypatch.setattr(evaluate, "evaluate_variables", fake_evaluate)
  variables, _, workdir, results = _convert_cli(tmp_path, "--evaluate", "--config",
                                                "configs/cifar100_resnet32x4.py")
  (model, teacher, given), = calls
  assert (model, teacher) == ("resnet8", "")
  jax.tree.map(np.testing.assert_array_equal, given, variables)
  assert (results["last_top1"], results["last_top5"], results["best_top1"], results["eval_count"]) == (
      71.25, 90.5, 71.25, 80)
  with open(workdir / "config.json") as f:
    config = json.load(f)
  assert (config["data"]["name"], config["schedule"]["epochs"], config["student"]["model"]) == (
      "cifar100", 240, "resnet8")
  with open(workdir / "run.json") as f:
    assert json.load(f)["evaluated"] == "test"


def test_cli_evaluate_on_data_that_does_not_fit(tmp_path, capsys):
  # The default config's data are scikit-learn's digits: one channel, where the checkpoint has three.
  with pytest.raises(SystemExit) as exit_info:
    _convert_cli(tmp_path, "--evaluate")
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.strip().count("\n") == 0
  assert ("--evaluate: the data of configs/default.py (digits) does not fit resnet8 with 10 classes; give "
          "--config the config of the checkpoint's dataset.") in err
  assert "params/conv1/Conv_0/kernel: shape (3, 3, 1, 16) expected, (3, 3, 3, 16)" in err
  assert not os.path.exists(tmp_path / "teacher_run")


def test_converted_teacher_needs_no_teacher_stage(tmp_path):
  # A distillation command pointed at the converted run plans the student's stage only.
  from nst_jax.trainer import config_lib, train_loop

  _, _, workdir, _ = _convert_cli(tmp_path, name="resnet20")
  config = config_lib.load_config_file("configs/default.py")
  config.teacher.model = "resnet20"
  config.teacher.workdir = str(workdir)
  config.student.model = "resnet8"
  config.distill.kd_weight = 0.9
  stages = train_loop.plan(config, str(tmp_path / "student"))
  assert [stage.name for stage in stages] == ["student"]
  assert stages[0].config.teacher.workdir == str(workdir)


def test_converted_variables_fit_the_model_apply():
  # The returned tree is exactly what the zoo model's apply takes (no extra or missing collection).
  variables = convert.from_torch("ShuffleV2", _state("ShuffleV2"), NUM_CLASSES)
  assert sorted(variables) == ["batch_stats", "params"]
  shapes = jax.eval_shape(lambda v: _apply("ShuffleV2", False)(v, jnp.zeros((2, 32, 32, 3))), variables)
  assert shapes[0][0].shape == (2, NUM_CLASSES)

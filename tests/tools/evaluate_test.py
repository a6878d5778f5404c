"""Tests of nst_jax.tools.evaluate on a 1-epoch resnet8 run on a 10-class JPEG folder (200 training
images, 300 held out), trained once per folder: the tiny folder of digits that tests/conftest.py writes,
and the shared CIFAR-10 folder where it exists (skipped with a message elsewhere). The command on the
held-out split and the library on a folder with two classes at another image size, each against an
independent count (the images decoded with Pillow, resized and normalised in NumPy with the training
files' own statistics, the model applied directly); unknown classes and the error paths."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from nst_jax import models
from nst_jax.tools import evaluate
from nst_jax.trainer import checkpoints
from tests.trainer.data.resize_reference import bilinear_resize

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAIN_PER_CLASS, HELD_OUT_PER_CLASS = 20, 30


def _decode(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


# Values, not speed (tests/conftest.py); every test reads a trained run.
pytestmark = [pytest.mark.usefixtures("fast_compilation"), pytest.mark.slow]


@pytest.fixture(scope="module", params=["tiny_image_folder", "shared_cifar10_folder"])
def run(request, tmp_path_factory):
  images = request.getfixturevalue(request.param)  # conftest's ImageFolder; the shared one may skip
  folder, classes = images.path.resolve(), images.classes
  tmp = tmp_path_factory.mktemp("evaluate")
  workdir = tmp / "run"
  # Trained by the command in a process of its own (one CPU device): in this test process, after other
  # modules' tests, XLA has been seen to abort in the first training step.
  overrides = {"data.name": "image_folder", "data.path": folder, "data.cache_dir": tmp / "cache",
               "data.validation_per_class": HELD_OUT_PER_CLASS, "data.limit_per_class": TRAIN_PER_CLASS,
               "data.image_size": 32, "data.augment": "cifar",
               "data.mean": "()", "data.std": "()",  # normalised with the training split's own statistics
               "student.model": "resnet8", "schedule.epochs": 1, "schedule.decay_epochs": "()",
               "schedule.batch_size": 64, "logging.checkpoint_every_steps": 1000,
               "logging.tensorboard": False}
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / 'default.py'}",
             f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]
  proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr

  model = models.get_model("resnet8", 10)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False))
  variables = checkpoints.load_variables(workdir, template)
  train_pixels = np.stack([_decode(images.file(c, i)) for c in classes
                           for i in range(TRAIN_PER_CLASS)]).astype(np.float64) / 255
  mean, std = train_pixels.mean((0, 1, 2)), train_pixels.std((0, 1, 2))
  return {"workdir": workdir, "folder": folder, "images": images, "model": model, "variables": variables,
          "mean": mean, "std": std}


def _reference(run, images: np.ndarray, labels: np.ndarray) -> dict:
  """Top-1 / top-5 counts of the model on uint8 images, and how many of those decisions are within float
  noise (the margin at rank 1 / 2 or 5 / 6 under 1e-4), which the pipeline's float32 arithmetic may
  decide either way."""
  x = ((images / 255.0 - run["mean"]) / run["std"]).astype(np.float32)
  logits = np.asarray(run["model"].apply(run["variables"], x, train=False)[0], np.float64)
  order = np.argsort(-logits, axis=1)
  ranked = np.take_along_axis(logits, order, axis=1)
  return {"top1": int(np.sum(order[:, 0] == labels)),
          "top5": int(np.sum(np.any(order[:, :5] == labels[:, None], axis=1))),
          "close1": int(np.sum(ranked[:, 0] - ranked[:, 1] < 1e-4)),
          "close5": int(np.sum(ranked[:, 4] - ranked[:, 5] < 1e-4)), "count": len(labels)}


def _assert_matches(result, want):
  assert result["count"] == want["count"]
  assert abs(result["top1"] * want["count"] / 100 - want["top1"]) <= want["close1"] + 1e-6, (result, want)
  assert abs(result["top5"] * want["count"] / 100 - want["top5"]) <= want["close5"] + 1e-6, (result, want)


def test_command_on_the_held_out_split(run, capsys):
  workdir = run["workdir"]
  result = evaluate.main(["--workdir", str(workdir), "--split", "validation"])
  printed = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(printed) == result == json.loads((workdir / "eval_validation.json").read_text())
  assert set(result) == {"top1", "top5", "count"}
  files, classes = run["images"].files_per_class, run["images"].classes
  held_out = range(files - HELD_OUT_PER_CLASS, files)
  images = np.stack([_decode(run["images"].file(c, i)) for c in classes for i in held_out])
  _assert_matches(result, _reference(run, images, np.repeat(np.arange(10), HELD_OUT_PER_CLASS)))
  # The same split and preprocessing as the run's own last evaluation.
  results = json.loads((workdir / "results.json").read_text())
  assert (result["top1"], result["top5"]) == (results["last_top1"], results["last_top5"])


def test_folder_with_fewer_classes_and_another_image_size(run, tmp_path):
  folder = tmp_path / "two_classes"
  images, labels = [], []
  files, classes = run["images"].files_per_class, run["images"].classes
  for cls in (classes[8], classes[3]):  # labels 8 and 3 in the run, by name (ship and cat in CIFAR-10)
    (folder / cls).mkdir(parents=True)
    for i in range(files - 20, files):
      source = run["images"].file(cls, i)
      if i % 2:  # half at 40x40 (lossless PNG), half the 32x32 JPEG itself
        big = Image.open(source).convert("RGB").resize((40, 40), Image.BICUBIC)
        big.save(folder / cls / f"{i:04d}.png")
        images.append(bilinear_resize(np.asarray(big)[None], (32, 32))[0])
      else:
        shutil.copy(source, folder / cls / source.name)
        images.append(_decode(source))
      labels.append(classes.index(cls))
  result = evaluate.evaluate_run(str(run["workdir"]), image_folder=str(folder))
  assert json.loads((run["workdir"] / "eval_two_classes.json").read_text()) == result
  order = np.argsort(labels, kind="stable")  # the pipeline reads classes in name order: 3, then 8
  _assert_matches(result, _reference(run, np.stack(images)[order], np.asarray(labels)[order]))


def test_unknown_class_is_named(run, tmp_path):
  images = run["images"]
  for cls in (images.classes[3], "unicorn"):
    (tmp_path / cls).mkdir()
    shutil.copy(images.file(images.classes[3], images.files_per_class - 1), tmp_path / cls / "a.jpg")
  valid = re.escape(f"Valid class names: {', '.join(images.classes)}.")
  with pytest.raises(SystemExit, match=r"'unicorn' that the run's label set does not have\. " + valid):
    evaluate.main(["--workdir", str(run["workdir"]), "--image_folder", str(tmp_path)])


def test_error_paths(run, tmp_path):
  workdir = run["workdir"]

  def fails(*args, match):
    with pytest.raises(SystemExit, match=match) as err:
      evaluate.main(["--workdir", *map(str, args)])
    assert str(err.value).startswith("nst_jax.tools.evaluate: ")

  fails(tmp_path / "nowhere", match="does not exist")
  (tmp_path / "empty").mkdir()
  fails(tmp_path / "empty", match="has no config.json")
  unfinished = tmp_path / "unfinished"
  shutil.copytree(workdir, unfinished)
  (unfinished / "results.json").write_text(json.dumps({"finished": False}))
  fails(unfinished, match="has not finished")
  fails(workdir, "--image_folder", tmp_path / "no_such_folder", match="no_such_folder.* does not exist")
  fails(workdir, "--config.data.nmae=digits", match=r"Unknown config key 'data.nmae'. Did you mean: data.nam")
  fails(workdir, "--config.student.model=resnet20", match=r"only config.data.\* can be changed")
  fails(workdir, "--config.data.image_size=big", match="image_size: expected a value of type int, got 'big'")
  fails(workdir, "--split", "test", match="Unknown split 'test' for image_folder")

  other = tmp_path / "other_model"
  shutil.copytree(workdir, other)
  config = json.loads((other / "config.json").read_text())
  config["student"]["model"] = "resnet20"
  (other / "config.json").write_text(json.dumps(config))
  fails(other, match=r"does not fit resnet20 with 10 classes .* Mismatching entries: .*missing in the")

  variables = jax.tree.map(np.asarray, run["variables"])
  fc = variables["params"]["fc"]["Dense_0"]
  fc["kernel"], fc["bias"] = fc["kernel"][:, :9], fc["bias"][:9]
  with pytest.raises(ValueError, match=r"params/fc/Dense_0/kernel: shape \(64, 10\) expected, \(64, 9\)"):
    evaluate.evaluate_variables(evaluate.load_run(str(workdir)), variables)

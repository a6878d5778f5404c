"""Tests of nst_jax.trainer.data.pipelines: config validation messages, `build` on digits and on an image
folder
(resizing and normalisation checked against NumPy), and `build_eval` on a folder with fewer classes and
other image sizes, labelled by class name."""

import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from PIL import Image

from configs import default
from nst_jax.trainer import data
from nst_jax.trainer.data import sources
from tests.trainer.data import augment_reference as ref
from tests.trainer.data.resize_reference import bilinear_resize

CLASSES = ("ant", "bee", "cat")


def _config(**data_values):
  config = default.get_config()
  config.schedule.batch_size = 8
  for key, value in data_values.items():
    setattr(config.data, key, value)
  return config


def _write_tree(root: pathlib.Path, sizes: dict[str, list[tuple[int, int]]], seed: int) -> dict:
  """root/<class>/<i>.png of random RGB pixels, sizes as (height, width); returns {class: [arrays]}."""
  rng = np.random.default_rng(seed)
  written = {}
  for cls, shapes in sizes.items():
    (root / cls).mkdir(parents=True)
    written[cls] = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in shapes]
    for i, pixels in enumerate(written[cls]):
      Image.fromarray(pixels).save(root / cls / f"{i:02d}.png")
  return written


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """A 3-class training tree of 6x6 images: 5 per class, the last 2 held out for validation."""
  root = tmp_path_factory.mktemp("tree")
  return root, _write_tree(root, {c: [(6, 6)] * 5 for c in CLASSES}, seed=0)


def _tree_config(tree, tmp_path, image_size):
  root, _ = tree
  return _config(name="image_folder", path=str(root), validation_per_class=2, image_size=image_size,
                 cache_dir=str(tmp_path / "cache"))


def _eval_arrays(pipeline):
  batches = list(pipeline.eval_batches())
  mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
  return (np.concatenate([b["image"] for b in batches])[mask],
          np.concatenate([b["label"] for b in batches])[mask])


# ----------------------------------------------------------------------------------------------------
# check_config


def test_misspelt_name_is_one_line_naming_the_project_sources():
  with pytest.raises(ValueError) as err:
    data.build(_config(name="cifar11"), None)
  message = str(err.value)
  assert "\n" not in message and len(message) < 250, message
  assert "'cifar11'" in message and "config.data.pipeline='tfds'" in message
  assert "digits, image_folder, cifar10, cifar100, imagenet2012" in message
  assert "mnist" not in message  # not TFDS's own list of every dataset


@pytest.mark.parametrize("values, match", [
  ({"pipeline": "stream"}, r"config.data.pipeline: unknown value 'stream'. Valid values: auto, device, tfds"),
  ({"augment": "imagenet"}, r"config.data.augment: unknown value 'imagenet'. Valid values: none, cifar "),
  ({"pipeline": "tfds", "name": "cifar10", "augment": "autoaugment"}, r"Valid values: imagenet, cifar, none"),
  ({"pipeline": "device", "name": "imagenet2012"}, r"Valid values: cifar10, cifar100, digits, image_folder "),
  ({"pipeline": "tfds", "name": "digits"}, r"'digits' is not a TFDS dataset"),
  ({"name": "image_folder"}, r"config.data.path must name the class-folder tree"),
  ({"mean": (0.5, 0.5, 0.5), "std": (0.2,)}, r"the same length .* got 3 and 1"),
])
def test_bad_data_config_is_one_line(values, match):
  with pytest.raises(ValueError, match=match) as err:
    data.check_config(_config(**values).data)
  assert "\n" not in str(err.value)


def test_pipeline_kinds(tmp_path):
  kinds = {(p, n): data.check_config(_config(pipeline=p, name=n, path=str(tmp_path)).data) for p, n in
           [("auto", "digits"), ("auto", "cifar10"), ("auto", "image_folder"), ("auto", "imagenet2012"),
            ("tfds", "cifar10"), ("tfds", "mnist"), ("device", "cifar100")]}
  assert kinds == {("auto", "digits"): "device", ("auto", "cifar10"): "device",
                   ("auto", "image_folder"): "device", ("auto", "imagenet2012"): "tfds",
                   ("tfds", "cifar10"): "tfds", ("tfds", "mnist"): "tfds", ("device", "cifar100"): "device"}


def test_unknown_tfds_name_is_one_line():
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match=r"^TFDS has no dataset named 'cifar11' \(tfds.list_builders") as err:
    sources.prepared_tfds_builder("cifar11")
  assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------
# build


def test_build_digits_resized_and_normalised():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  run = data.build(_config(image_size=16, augment="none"), mesh)
  mean, std = sources.MEAN_STD["digits"]
  assert (run.num_classes, run.class_names, run.image_shape) == (10, tuple("0123456789"), (16, 16, 1))
  assert run.pipeline == "device"
  np.testing.assert_allclose((run.mean, run.std), (mean, std), rtol=1e-6)
  assert run.train.steps_per_epoch == 1438 // 8
  batch = run.train.batch(0)
  assert batch["image"].shape == (8, 16, 16, 1) and batch["image"].sharding.spec == PartitionSpec("data")
  # Validation: the digits' last fifth of every class, upsampled 8 -> 16 and normalised, checked in NumPy.
  images, labels = _eval_arrays(run.eval)
  validation = sources.load("digits", "validation")
  np.testing.assert_array_equal(labels, validation.labels)
  pixels = ref.denormalize(images, mean, std)
  want = bilinear_resize(validation.images, (16, 16)).astype(int)
  assert np.abs(pixels.astype(int) - want).max() <= 1 and np.mean(pixels == want) > 0.99


def test_image_folder_is_normalised_with_the_training_split_statistics(tree, tmp_path):
  _, written = tree
  run = data.build(_tree_config(tree, tmp_path, image_size=0), None)
  assert run.class_names == CLASSES and run.image_shape == (6, 6, 3)
  train_pixels = np.stack([a for c in CLASSES for a in written[c][:3]]).astype(np.float64) / 255
  mean, std = train_pixels.mean((0, 1, 2)), train_pixels.std((0, 1, 2))
  np.testing.assert_allclose(run.mean, mean, rtol=1e-5)
  np.testing.assert_allclose(run.std, std, rtol=1e-5)
  images, labels = _eval_arrays(run.eval)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(3), 2))
  validation = np.stack([a for c in CLASSES for a in written[c][3:]])
  np.testing.assert_allclose(images, ref.normalize(validation, mean, std), atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# build_eval


def test_eval_folder_with_fewer_classes_and_other_sizes(tree, tmp_path):
  config = _tree_config(tree, tmp_path, image_size=8)
  run = data.build(config, None)
  folder = tmp_path / "new"
  new = _write_tree(folder, {"cat": [(8, 8), (12, 10)], "ant": [(5, 5), (8, 8), (30, 20)]}, seed=7)
  evaluation = data.build_eval(config, None, image_folder=str(folder))
  assert evaluation.train is None
  assert (evaluation.num_classes, evaluation.class_names, evaluation.image_shape) == (3, CLASSES, (8, 8, 3))
  assert (evaluation.mean, evaluation.std) == (run.mean, run.std)  # the training split's statistics
  images, labels = _eval_arrays(evaluation.eval)
  np.testing.assert_array_equal(labels, [0, 0, 0, 2, 2])  # by name: ant is label 0, cat label 2
  pixels = ref.denormalize(images, run.mean, run.std).astype(int)
  for got, source in zip(pixels, [*new["ant"], *new["cat"]], strict=True):
    if source.shape[:2] == (8, 8):
      np.testing.assert_array_equal(got, source)  # already the training size: not resized
    else:
      assert np.abs(got - bilinear_resize(source[None], (8, 8))[0]).max() <= 1


def test_eval_split_of_the_run(tree, tmp_path):
  config = _tree_config(tree, tmp_path, image_size=0)
  _, written = tree
  images, labels = _eval_arrays(data.build_eval(config, None, split="train").eval)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(3), 3))
  run = data.build(config, None)
  np.testing.assert_allclose(images, ref.normalize(np.stack([a for c in CLASSES for a in written[c][:3]]),
                                                   run.mean, run.std), atol=1e-5)


def test_eval_folder_errors(tree, tmp_path):
  config = _tree_config(tree, tmp_path, image_size=0)
  folder = tmp_path / "unknown"
  _write_tree(folder, {"ant": [(6, 6)], "dog": [(6, 6)]}, seed=1)
  with pytest.raises(ValueError, match=r"class folder\(s\) 'dog' .* Valid class names: ant, bee, cat\."):
    data.build_eval(config, None, image_folder=str(folder))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.build_eval(config, None, image_folder=str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="not both"):
    data.build_eval(config, None, image_folder=str(folder), split="validation")
  with pytest.raises(ValueError, match="in-memory runs only"):
    data.build_eval(_config(name="imagenet2012"), None, image_folder=str(folder))

"""Tests of nst_jax.trainer.data.sources: the registry, digits, image folders (PNG trees, JPEG folders
laid out like the shared CIFAR-10 copy: tests/conftest.py's tiny one and, where it exists, the shared one)
and TFDS reading, against arrays computed independently with scikit-learn, Pillow and TFDS."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from nst_jax.trainer.data import sources


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="Unknown dataset 'cifar11'") as err:
    sources.load("cifar11", "train")
  for name in ("cifar10", "cifar100", "digits", "image_folder"):
    assert name in str(err.value)
  assert sources.list_sources() == ["cifar10", "cifar100", "digits", "image_folder"]


def test_unknown_split_lists_valid_splits():
  with pytest.raises(ValueError, match="Valid splits: train, validation, all"):
    sources.load("digits", "test")


# ----------------------------------------------------------------------------------------------------
# digits


def test_digits_split_is_the_last_fifth_of_every_class():
  from sklearn.datasets import load_digits

  bunch = load_digits()
  train, val = sources.load("digits", "train"), sources.load("digits", "validation")
  counts = np.bincount(bunch.target)
  expected_val = np.round(0.2 * counts).astype(int)
  assert len(train) + len(val) == 1797
  np.testing.assert_array_equal(np.bincount(val.labels, minlength=10), expected_val)
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), counts - expected_val)
  # Balanced: every class is 20% +- 0.5 example of its own size in validation.
  assert np.all(np.abs(np.bincount(val.labels) / counts - 0.2) <= 0.5 / counts.min())

  # Validation = the last expected_val[c] indices of class c in scikit-learn's order; train the rest,
  # both in the original order; pixels rescaled 0..16 -> 0..255.
  val_idx = np.sort(
    np.concatenate([np.flatnonzero(bunch.target == c)[-k:] for c, k in enumerate(expected_val)])
  )
  train_idx = np.setdiff1d(np.arange(1797), val_idx)
  pixels = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  np.testing.assert_array_equal(val.images, pixels[val_idx])
  np.testing.assert_array_equal(train.images, pixels[train_idx])
  np.testing.assert_array_equal(train.labels, bunch.target[train_idx])
  assert train.images.dtype == np.uint8 and train.images.shape[1:] == (8, 8, 1)
  assert train.labels.dtype == np.int32 and train.num_classes == 10
  assert train.class_names == tuple("0123456789") and train.images.max() == 255

  whole = sources.load("digits", "all")
  assert len(whole) == 1797
  mean, std = sources.channel_stats(whole.images)
  np.testing.assert_allclose((mean, std), sources.MEAN_STD["digits"], atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# image_folder on a generated PNG tree (PNG: lossless, so pixels are exact)


def _write_tree(root: pathlib.Path, counts: dict[str, int], size=(6, 5), seed=0) -> dict:
  """Writes root/<class>/img_<i>.png of random RGB pixels; returns {class: {file name: array}}."""
  rng = np.random.default_rng(seed)
  written = {}
  for cls, n in counts.items():
    (root / cls).mkdir(parents=True)
    written[cls] = {}
    for i in range(n):
      pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
      name = f"img_{i}.png"
      Image.fromarray(pixels).save(root / cls / name)
      written[cls][name] = pixels
    (root / cls / "notes.txt").write_text("not an image")
  return written


def test_image_folder_classes_splits_and_pixels(tmp_path):
  root = tmp_path / "tree"
  # Out-of-order class names and 11-12 files so that name order ("img_10" < "img_2") matters.
  written = _write_tree(root, {"cat": 12, "ant": 11, "bee": 11})
  kwargs = dict(path=root, validation_per_class=3, cache_dir=tmp_path / "cache")
  train = sources.load("image_folder", "train", **kwargs)
  val = sources.load("image_folder", "validation", **kwargs)
  small = sources.load("image_folder", "train", limit_per_class=2, **kwargs)

  assert train.class_names == ("ant", "bee", "cat") and train.num_classes == 3
  exp_train, exp_val, exp_small = [], [], []
  for label, cls in enumerate(("ant", "bee", "cat")):
    names = sorted(written[cls])  # by name: img_0, img_1, img_10, img_11?, img_2, ...
    exp_train += [(written[cls][n], label) for n in names[:-3]]
    exp_val += [(written[cls][n], label) for n in names[-3:]]
    exp_small += [(written[cls][n], label) for n in names[:2]]
  for ds, expected in ((train, exp_train), (val, exp_val), (small, exp_small)):
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images, np.stack([p for p, _ in expected]))
    np.testing.assert_array_equal(ds.labels, [label for _, label in expected])
  assert len(val) == 9 and len(train) == 34 - 9 and len(small) == 6

  gray = sources.load("image_folder", "validation", grayscale=True, **kwargs)
  assert gray.images.shape == (9, 5, 6, 1)
  # Pillow's ITU-R 601-2 luma: L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded.
  luma = np.stack([p for p, _ in exp_val]).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(gray.images[..., 0], luma, atol=1.0)


def test_image_folder_second_load_reads_the_cache(tmp_path):
  root = tmp_path / "tree"
  written = _write_tree(root, {"a": 3, "b": 3})
  kwargs = dict(path=root, cache_dir=tmp_path / "cache")
  first = sources.load("image_folder", "all", **kwargs)
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
  # Same names, new pixels: a cached load still returns the old ones, an uncached one the new ones.
  Image.fromarray(np.zeros_like(written["a"]["img_0.png"])).save(root / "a" / "img_0.png")
  np.testing.assert_array_equal(sources.load("image_folder", "all", **kwargs).images, first.images)
  fresh = sources.load("image_folder", "all", cache=False, **kwargs)
  assert fresh.images[0].max() == 0 and np.array_equal(fresh.images[1:], first.images[1:])
  # Other options are another cache entry.
  sources.load("image_folder", "validation", validation_per_class=1, **kwargs)
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_image_folder_errors(tmp_path):
  missing = tmp_path / "no" / "such" / "folder"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    sources.load("image_folder", "train", path=missing, cache=False)
  root = tmp_path / "tree"
  _write_tree(root, {"a": 3, "b": 2})
  with pytest.raises(ValueError, match="Class 'b' has 2 images"):
    sources.load("image_folder", "train", path=root, validation_per_class=2, cache=False)
  Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(root / "b" / "img_9.png")
  with pytest.raises(ValueError, match="must have one size"):
    sources.load("image_folder", "all", path=root, cache=False)


@pytest.mark.parametrize("which", ["tiny_image_folder", "shared_cifar10_folder"])
def test_cifar_like_jpeg_folder(which, request, tmp_path):
  """10 classes of 32x32 JPEGs named 0000, 0001, ...: tests/conftest.py's tiny folder of digits, and the
  shared CIFAR-10 folder (5,000 per class) where it exists."""
  images = request.getfixturevalue(which)
  folder, classes, files = images.path, images.classes, images.files_per_class
  kwargs = dict(path=folder, validation_per_class=10, limit_per_class=20, cache_dir=tmp_path)
  train = sources.load("image_folder", "train", **kwargs)
  val = sources.load("image_folder", "validation", **kwargs)
  assert train.class_names == classes and train.num_classes == 10
  assert train.images.shape == (200, 32, 32, 3) and val.images.shape == (100, 32, 32, 3)
  np.testing.assert_array_equal(train.labels, np.repeat(np.arange(10), 20))
  np.testing.assert_array_equal(val.labels, np.repeat(np.arange(10), 10))
  # Train is files 0000-0019 of each class, validation the last ten, decoded here with Pillow.
  for label in (0, 9):
    for i, k in ((0, 0), (19, 19)):
      expected = np.asarray(Image.open(images.file(classes[label], k)).convert("RGB"))
      np.testing.assert_array_equal(train.images[label * 20 + i], expected)
    for i, k in ((0, files - 10), (9, files - 1)):
      expected = np.asarray(Image.open(images.file(classes[label], k)).convert("RGB"))
      np.testing.assert_array_equal(val.images[label * 10 + i], expected)


# ----------------------------------------------------------------------------------------------------
# TFDS


def test_cifar10_from_mock_tfds_and_its_cache(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tensorflow")
  with tfds.testing.mock_data(num_examples=12):
    ds = sources.load("cifar10", "train", cache_dir=tmp_path)
    reference = list(tfds.as_numpy(tfds.load("cifar10", split="train")))
  assert ds.images.shape == (12, 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32 and ds.num_classes == 10 and len(ds.class_names) == 10
  np.testing.assert_array_equal(ds.images, np.stack([ex["image"] for ex in reference]))
  np.testing.assert_array_equal(ds.labels, [ex["label"] for ex in reference])
  # Outside the mock there is no cifar10 anywhere: only the cache can answer.
  cached = sources.load("cifar10", "train", cache_dir=tmp_path, download=False)
  np.testing.assert_array_equal(cached.images, ds.images)


def test_tfds_array_record_read_without_tensorflow_path(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tensorflow")  # only to prepare the data
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
  labels = np.array([0, 2, 1, 2, 0, 1, 1])
  tfds.dataset_builders.store_as_tfds_dataset(
    name="nst_sources_tiny",
    version="1.0.0",
    features=tfds.features.FeaturesDict(
      {
        "image": tfds.features.Image(shape=(4, 4, 3)),
        "label": tfds.features.ClassLabel(names=["x", "y", "z"]),
      }
    ),
    split_datasets={"train": [(i, {"image": images[i], "label": labels[i]}) for i in range(7)]},
    data_dir=tmp_path / "tfds",
    file_format="array_record",
    disable_shuffling=True,
  )
  ds = sources.load_tfds("nst_sources_tiny", "train[1:6]", data_dir=tmp_path / "tfds", cache_dir=tmp_path)
  np.testing.assert_array_equal(ds.images, images[1:6])
  np.testing.assert_array_equal(ds.labels, labels[1:6])
  assert ds.class_names == ("x", "y", "z")


def test_missing_tfds_data_says_how_to_get_it(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(RuntimeError, match=r"tfds build cifar100 --data_dir=DIR") as err:
    sources.load("cifar100", "train", data_dir=tmp_path / "empty", download=False, cache=False)
  assert str(tmp_path / "empty") in str(err.value)

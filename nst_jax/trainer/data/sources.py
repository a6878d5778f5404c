"""Datasets that fit in memory, loaded by name into NumPy arrays.

`load(name, split, **options)` returns an `ArrayDataset`: uint8 NHWC images, int32 labels, the number of
classes and their names. This module owns where data comes from and how it is held out; it knows nothing
about devices or augmentation (see `device_pipeline`). Sources:

* `digits`: scikit-learn's 1,797 8x8 handwritten digits (ships with scikit-learn, no download). Pixel
  values 0..16 are rescaled to uint8 0..255 (round(v * 255 / 16)). Splits `train` / `validation`: a fixed
  stratified carve-out, the last `validation_fraction` (default 20%, rounded) of every class in the
  dataset's own order go to `validation`, the rest to `train`. No randomness is involved, so the split is
  the same on every machine and for every seed. `all` is the whole set.
* `image_folder`: a class-folder tree `<path>/<class>/<image>` (e.g. `../shared/data/cifar10/train`),
  decoded with Pillow. Classes are the sub-folders sorted by name; files in a class are sorted by name.
  `validation` is the LAST `validation_per_class` files of every class; `train` is the files before
  them, optionally only the first `limit_per_class` of those (for small runs; the validation set does not
  depend on the limit, so results stay comparable). All images must have one size.
* `cifar10` / `cifar100`: the TFDS datasets (any TFDS split string, e.g. `train`, `test`,
  `train[:45000]`), read once into arrays through `tfds.data_source` when the data was prepared as
  array_record (no TensorFlow needed) or else `tfds.as_numpy` of the whole split (TensorFlow needed).
  `load_tfds` does the same for any TFDS image-classification dataset; `prepared_tfds_builder` (shared
  with the tf.data pipeline) prepares a TFDS builder or says in one message how to get the data.

`read_labelled_images(path, class_names)` reads a class-folder tree of any image sizes for evaluation,
labelling each image by the index of its class NAME in a run's label set.

Decoded `image_folder` and TFDS splits are cached as `.npz` files under `cache_dir` (default
`$NST_JAX_CACHE_DIR` or `~/.cache/nst_jax`), keyed by the path or data_dir and every option that changes
the arrays (for image folders: the resolved path, the split, the colour mode and the list of chosen
files), so the second load is a file read. A cached TFDS split is read without importing TFDS or
TensorFlow at all. Pixels rewritten in place under unchanged file names are not detected: pass
`cache=False` or delete the cache file.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

# Bump when the cached arrays of a given key would change (decoding, split rules).
_CACHE_VERSION = 1

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

# Per-channel mean and std in 0..1 units, for `device_pipeline` / `tfds_pipeline` normalisation.
# CIFAR values are RepDistiller's (CIFAR-100) and the usual torchvision ones (CIFAR-10, std over all
# pixels); digits were computed on the whole set with `channel_stats`.
MEAN_STD = {
  "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
  "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  "digits": ((0.3053,), (0.3759,)),
}


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """One split in memory: `images` uint8 (N, H, W, C), `labels` int32 (N,) in [0, num_classes)."""

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}.")
    if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
      raise ValueError(
        f"labels must be int32 of shape {self.images.shape[:1]}, got {self.labels.dtype} {self.labels.shape}."
      )
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes.")
    if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
      raise ValueError(f"labels outside [0, {self.num_classes}).")

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 NHWC images, in 0..1 units (for normalisation)."""
  x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))


# ----------------------------------------------------------------------------------------------------
# The registry.


def load(name: str, split: str, **options) -> ArrayDataset:
  """Loads split `split` of the source registered as `name`; options are the source's own."""
  if name not in _SOURCES:
    raise ValueError(f"Unknown dataset {name!r}. Valid names: {', '.join(sorted(_SOURCES))}.")
  return _SOURCES[name](split, **options)


def list_sources() -> list[str]:
  """All registered source names, sorted."""
  return sorted(_SOURCES)


def _check_split(split: str, valid: Sequence[str], source: str):
  if split not in valid:
    raise ValueError(f"Unknown split {split!r} for {source}. Valid splits: {', '.join(valid)}.")


def _tail_per_class(labels: np.ndarray, tail_sizes: Callable[[int], int]) -> np.ndarray:
  """Boolean mask of the last tail_sizes(n_c) indices (in order) of every class c."""
  mask = np.zeros(labels.shape, bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    k = tail_sizes(idx.size)
    if k:
      mask[idx[-k:]] = True
  return mask


# ----------------------------------------------------------------------------------------------------
# digits


def load_digits(split: str, validation_fraction: float = 0.2) -> ArrayDataset:
  """scikit-learn's digits as 8x8x1 uint8 images; see the module docstring for the split."""
  from sklearn import datasets  # Lazy: scikit-learn is only needed for this source.

  _check_split(split, ("train", "validation", "all"), "digits")
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
  bunch = datasets.load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  held_out = _tail_per_class(labels, lambda n: int(round(validation_fraction * n)))
  if split != "all":
    keep = held_out if split == "validation" else ~held_out
    images, labels = images[keep], labels[keep]
  return ArrayDataset(images, labels, 10, tuple(str(d) for d in range(10)))


# ----------------------------------------------------------------------------------------------------
# The .npz cache.


def _cache_path(cache_dir: str | os.PathLike | None, source: str, key: dict) -> pathlib.Path:
  if cache_dir is None:
    cache_dir = os.environ.get("NST_JAX_CACHE_DIR", pathlib.Path.home() / ".cache" / "nst_jax")
  digest = hashlib.sha256(json.dumps({**key, "version": _CACHE_VERSION}, sort_keys=True).encode())
  return pathlib.Path(cache_dir) / f"{source}-{digest.hexdigest()[:20]}.npz"


def _read_cache(path: pathlib.Path) -> ArrayDataset | None:
  if not path.exists():
    return None
  with np.load(path) as f:
    names = tuple(str(n) for n in f["class_names"])
    return ArrayDataset(f["images"], f["labels"], len(names), names)


def _write_cache(path: pathlib.Path, ds: ArrayDataset):
  path.parent.mkdir(parents=True, exist_ok=True)
  # Write-then-rename: a killed run or a concurrent reader never sees a half-written file.
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.savez(f, images=ds.images, labels=ds.labels, class_names=np.array(ds.class_names))
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# image_folder


def _list_image_folder(root: pathlib.Path) -> tuple[list[str], list[list[str]]]:
  """Class names (sorted sub-folders) and, per class, its image file names sorted by name."""
  if not root.is_dir():
    raise FileNotFoundError(
      f"Image folder {str(root)!r} (resolved: {root.resolve()}) does not exist or is not a directory. "
      "Expected a class-folder tree <path>/<class name>/<image file>."
    )
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
  if not classes:
    raise FileNotFoundError(f"Image folder {str(root)!r} has no class sub-folders.")
  files = []
  for c in classes:
    names = sorted(
      e.name
      for e in os.scandir(root / c)
      if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not names:
      raise FileNotFoundError(f"Class folder {str(root / c)!r} has no image files ({IMAGE_EXTENSIONS}).")
    files.append(names)
  return classes, files


def _decode(path: pathlib.Path, mode: str) -> np.ndarray:
  """One image file as a uint8 (H, W, C) array in Pillow mode `mode` ("RGB" or "L")."""
  from PIL import Image  # Lazy: only image folders need Pillow.

  with Image.open(path) as im:
    arr = np.asarray(im.convert(mode))
  return arr[..., None] if arr.ndim == 2 else arr


def _parallel_map(fn: Callable[[int], None], n: int, workers: int | None):
  """fn(0), ..., fn(n - 1) on a thread pool; re-raises the first error."""
  # Pillow releases the GIL while decoding, so threads overlap file reads and decoding.
  workers = workers or min(16, 2 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    # Chunked so that scheduling overhead stays small next to 32x32 decodes.
    chunks = [range(s, min(s + 256, n)) for s in range(0, n, 256)]
    for _ in pool.map(lambda r: [fn(i) for i in r], chunks):
      pass


def _decode_images(paths: list[pathlib.Path], mode: str, workers: int | None) -> np.ndarray:
  """Decodes `paths` with Pillow into one uint8 (N, H, W, C) array; all images must share one size."""
  first = _decode(paths[0], mode)
  out = np.empty((len(paths), *first.shape), np.uint8)

  def fill(i):
    arr = _decode(paths[i], mode)
    if arr.shape != first.shape:
      raise ValueError(
        f"{paths[i]} is {arr.shape[1]}x{arr.shape[0]}, but {paths[0]} is "
        f"{first.shape[1]}x{first.shape[0]}: all images of an image folder must have one size."
      )
    out[i] = arr

  _parallel_map(fill, len(paths), workers)
  return out


def read_labelled_images(
  path: str | os.PathLike, class_names: Sequence[str], grayscale: bool = False, workers: int | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
  """Every image of a class-folder tree `<path>/<class>/<image>`, labelled by class NAME.

  For evaluating a trained run on new images: the label of `<path>/<c>/...` is the index of `c` in
  `class_names` (the run's label set), so the folder may hold any subset of the classes, and images of
  any sizes (returned as a list of uint8 (H, W, C) arrays, in class then file-name order, with the int32
  labels). A class folder whose name is not in `class_names` is a ValueError naming it. Not cached.
  """
  root = pathlib.Path(path)
  classes, files = _list_image_folder(root)
  unknown = [c for c in classes if c not in class_names]
  if unknown:
    raise ValueError(
      f"Image folder {str(root)!r} has class folder(s) {', '.join(map(repr, unknown))} that the run's label "
      f"set does not have. Valid class names: {', '.join(class_names)}."
    )
  paths, labels = [], []
  for c, names in zip(classes, files, strict=True):
    paths += [root / c / n for n in names]
    labels += [list(class_names).index(c)] * len(names)
  images = [None] * len(paths)

  def fill(i):
    images[i] = _decode(paths[i], "L" if grayscale else "RGB")

  _parallel_map(fill, len(paths), workers)
  return images, np.asarray(labels, np.int32)


def load_image_folder(
  split: str,
  path: str | os.PathLike,
  validation_per_class: int = 0,
  limit_per_class: int | None = None,
  grayscale: bool = False,
  cache: bool = True,
  cache_dir: str | os.PathLike | None = None,
  workers: int | None = None,
) -> ArrayDataset:
  """A class-folder image tree; see the module docstring for the split rules.

  Args:
    split: `train` (all but the last `validation_per_class` files of each class), `validation` (those
      last files) or `all`.
    path: the root folder, containing one sub-folder per class.
    validation_per_class: how many files per class (the last ones, by sorted name) are held out.
    limit_per_class: keep only the first this-many `train` files of each class (None: all).
    grayscale: decode to one channel ("L") instead of RGB.
    cache, cache_dir: read/write the decoded split as an .npz (see the module docstring).
    workers: decoding threads (default: 2 per CPU, at most 16).
  """
  _check_split(split, ("train", "validation", "all"), "image_folder")
  root = pathlib.Path(path)
  classes, files = _list_image_folder(root)
  if validation_per_class < 0 or (limit_per_class is not None and limit_per_class < 1):
    raise ValueError("validation_per_class must be >= 0 and limit_per_class >= 1 (or None).")
  for c, names in zip(classes, files, strict=True):
    if validation_per_class >= len(names):
      raise ValueError(
        f"Class {c!r} has {len(names)} images, too few to hold out validation_per_class="
        f"{validation_per_class} and keep any for training."
      )

  rel_paths, labels = [], []
  for label, (c, names) in enumerate(zip(classes, files, strict=True)):
    n_train = len(names) - validation_per_class
    if split == "train":
      chosen = names[: n_train if limit_per_class is None else min(limit_per_class, n_train)]
    elif split == "validation":
      chosen = names[n_train:]
    else:
      chosen = names
    rel_paths += [f"{c}/{n}" for n in chosen]
    labels += [label] * len(chosen)

  key = {
    "path": str(root.resolve()),
    "split": split,
    "mode": "L" if grayscale else "RGB",
    # The chosen file list itself: adding, removing or renaming files invalidates the entry.
    "files": hashlib.sha256("\n".join(rel_paths).encode()).hexdigest(),
  }
  cache_file = _cache_path(cache_dir, "image_folder", key)
  if cache and (cached := _read_cache(cache_file)) is not None:
    return cached
  if not rel_paths:
    raise ValueError(f"Split {split!r} of {str(root)!r} is empty (validation_per_class=0?).")
  images = _decode_images([root / p for p in rel_paths], "L" if grayscale else "RGB", workers)
  ds = ArrayDataset(images, np.asarray(labels, np.int32), len(classes), tuple(classes))
  if cache:
    _write_cache(cache_file, ds)
  return ds


# ----------------------------------------------------------------------------------------------------
# TFDS


def _tfds_missing_message(name: str, data_dir, manual_dir, err: BaseException | None) -> str:
  where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  reason = f" Preparing it failed with: {type(err).__name__}: {err}." if err else ""
  if name.startswith("imagenet2012"):
    how = (
      "ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
      "ILSVRC2012_img_val.tar (from image-net.org) in a directory MANUAL and pass manual_dir=MANUAL "
      f"(currently {manual_dir!r}), or run `tfds build {name} --manual_dir=MANUAL --data_dir=DIR` and "
      "pass data_dir=DIR."
    )
  else:
    how = (
      f"To get it: on a machine with internet run\n    tfds build {name} --data_dir=DIR "
      "--file_format=array_record\n(array_record lets nst_jax read it without TensorFlow), copy DIR to "
      "this machine and pass data_dir=DIR (or set TFDS_DATA_DIR=DIR)."
    )
  return f"TFDS dataset {name!r} is not prepared in {where} and could not be prepared.{reason}\n{how}"


def prepared_tfds_builder(name: str, data_dir: str | None = None, manual_dir: str | None = None,
                          download: bool = True):
  """The TFDS builder of `name`, prepared (downloaded, or built from `manual_dir`) when it is not yet.

  An unknown name is one line (TFDS's own error lists every registered dataset); a dataset that is
  missing and cannot be prepared is a RuntimeError that says how to get it.
  """
  import tensorflow_datasets as tfds  # Lazy: only TFDS sources need it.

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"TFDS has no dataset named {name!r} (tfds.list_builders() lists the ones it "
                     "knows).") from None
  if not builder.is_prepared():
    if not download:
      raise RuntimeError(_tfds_missing_message(name, data_dir, manual_dir, None))
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as err:  # Network, DNS, checksum, missing manual files: one actionable message.
      raise RuntimeError(_tfds_missing_message(name, data_dir, manual_dir, err)) from err
  return builder


def _read_tfds_split(builder, split: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds

  if builder.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
    source = builder.as_data_source(split=split)
    n = len(source)
    first = source[0]
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, 1024):
      for i, ex in enumerate(source.__getitems__(range(start, min(start + 1024, n)))):
        images[start + i], labels[start + i] = ex["image"], ex[label_key]
    return images, labels
  # tfrecord (the `tfds build` default) needs TensorFlow. Read in chunks, not with batch_size=-1: that
  # sizes one batch from the split metadata, and aborted the process (std::length_error) under
  # tfds.testing.mock_data, which has none.
  images, labels = [], []
  for chunk in tfds.as_numpy(builder.as_dataset(split=split).batch(4096)):
    images.append(chunk["image"])
    labels.append(chunk[label_key])
  return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32)


def load_tfds(
  name: str,
  split: str,
  data_dir: str | os.PathLike | None = None,
  download: bool = True,
  label_key: str = "label",
  cache: bool = True,
  cache_dir: str | os.PathLike | None = None,
) -> ArrayDataset:
  """Any TFDS image-classification split (features `image` and `label_key`) as arrays, cached."""
  data_dir = None if data_dir is None else str(pathlib.Path(data_dir).resolve())
  key = {"name": name, "split": split, "data_dir": data_dir, "label_key": label_key}
  cache_file = _cache_path(cache_dir, "tfds", key)
  if cache and (cached := _read_cache(cache_file)) is not None:
    return cached

  builder = prepared_tfds_builder(name, data_dir, download=download)  # Lazy TFDS: a cached split needs none.
  images, labels = _read_tfds_split(builder, split, label_key)
  names = tuple(builder.info.features[label_key].names)
  ds = ArrayDataset(images, labels, len(names), names)
  if cache:
    _write_cache(cache_file, ds)
  return ds


def _tfds_source(tfds_name: str) -> Callable[..., ArrayDataset]:
  def loader(split: str, **options) -> ArrayDataset:
    return load_tfds(tfds_name, split, **options)

  loader.__doc__ = f"TFDS {tfds_name!r} as arrays; options as `load_tfds`."
  return loader


_SOURCES: dict[str, Callable[..., ArrayDataset]] = {
  "digits": load_digits,
  "image_folder": load_image_folder,
  "cifar10": _tfds_source("cifar10"),
  "cifar100": _tfds_source("cifar100"),
}

"""A run's input pipelines from its config: `build(config, mesh) -> Data`, the data package's entry point.

Routing (`config.data.pipeline`): `device` holds the dataset in memory and batches it on the devices
(`device_pipeline`, no TensorFlow); `tfds` streams it through tf.data (`tfds_pipeline`); `auto` streams
`imagenet2012` and holds the others in memory. `check_config` validates `data.pipeline`, `data.name`,
`data.augment` and an image folder's path before anything is loaded, each with a one-line error that
lists the valid values and the nearest ones to a misspelt value.

In memory: the splits come from `sources.load` and are resized once on the host to `data.image_size`
square (bilinear, `resize_images`) when their size differs. Normalisation (`normalisation`):
`data.mean` / `data.std` when given, else the dataset's entry in `sources.MEAN_STD`, else the per-channel
statistics of the (resized) TRAINING split, so an evaluation of the run on other data must use the
training data's values, which `build_eval` does.

Streaming: images of `data.image_size` (default 224), evaluation resized to 256 / 224 of that first;
normalised with `data.mean` / `data.std` or `sources.MEAN_STD`, else not at all (x / 255).

Paths in `config.data` (`path`, `data_dir`, `manual_dir`, `cache_dir`) are used as given: the caller
resolves them.
"""

import dataclasses
import difflib
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nst_jax.trainer.data import device_pipeline, sources, tfds_pipeline

# The project's data sources: the in-memory ones of `sources`, and ImageNet, streamed.
SOURCES = ("digits", "image_folder", "cifar10", "cifar100", "imagenet2012")
PIPELINES = ("auto", "device", "tfds")
_TFDS_SOURCES = ("cifar10", "cifar100", "imagenet2012")
_STREAMED_BY_AUTO = ("imagenet2012",)

Pipeline = device_pipeline.DevicePipeline | tfds_pipeline.TfdsPipeline


@dataclasses.dataclass(frozen=True)
class Data:
  """The input side of a run.

  Attributes:
    train: the training pipeline (`iterate(start_step)`, `steps_per_epoch`); None from `build_eval`.
    eval: the evaluation pipeline (`eval_batches()`, exact with `mask`).
    num_classes, class_names: the run's label set (the training split's), in label order.
    image_shape: (H, W, C) of the images the models see.
    pipeline: "device" (in memory) or "tfds" (tf.data streaming).
    mean, std: the per-channel normalisation applied, in 0..1 units.
  """

  train: Pipeline | None
  eval: Pipeline
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  pipeline: str
  mean: tuple[float, ...]
  std: tuple[float, ...]


def _check_choice(value, valid, key: str, note: str = ""):
  if value not in valid:
    close = difflib.get_close_matches(str(value), list(map(str, valid)), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"{key}: unknown value {value!r}. Valid values: {', '.join(map(str, valid))}{note}."
                     + hint)


def check_config(data: ml_collections.ConfigDict) -> str:
  """Validates `config.data`'s choices; returns the pipeline kind, "device" or "tfds"."""
  _check_choice(data.pipeline, PIPELINES, "config.data.pipeline")
  in_memory = sources.list_sources()
  if data.pipeline == "auto":
    _check_choice(data.name, SOURCES, "config.data.name",
                  " (any other TFDS dataset needs config.data.pipeline='tfds')")
    kind = "tfds" if data.name in _STREAMED_BY_AUTO else "device"
  elif data.pipeline == "device":
    _check_choice(data.name, in_memory, "config.data.name",
                  " (the in-memory sources of config.data.pipeline='device')")
    kind = "device"
  else:
    if data.name in in_memory and data.name not in _TFDS_SOURCES:
      raise ValueError(f"config.data.name: {data.name!r} is not a TFDS dataset, but config.data.pipeline="
                       f"'tfds' reads TFDS datasets ({', '.join(_TFDS_SOURCES)} or any other TFDS name); "
                       "use config.data.pipeline='auto' for it.")
    kind = "tfds"
  augmentations = tfds_pipeline.PREPROCESSING if kind == "tfds" else device_pipeline.AUGMENTATIONS
  _check_choice(data.augment, augmentations, "config.data.augment",
                f" (for the {'tf.data' if kind == 'tfds' else 'in-memory'} pipeline)")
  if data.name == "image_folder" and not data.path:
    raise ValueError("config.data.path must name the class-folder tree for config.data.name='image_folder'.")
  if data.name == "image_folder" and "://" not in data.path and not os.path.isdir(data.path):
    raise ValueError(f"config.data.path: {data.path!r} is not a folder (config.data.name='image_folder' "
                     "reads one sub-folder of images per class).")
  if len(data.mean) != len(data.std):
    raise ValueError(f"config.data.mean and config.data.std must have the same length (one value per "
                     f"channel), got {len(data.mean)} and {len(data.std)}.")
  return kind


def normalisation(data: ml_collections.ConfigDict, train_images: np.ndarray | None = None
                  ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
  """The run's (mean, std) in 0..1 units: `data.mean`/`data.std`, else `sources.MEAN_STD[data.name]`,
  else the statistics of `train_images` (the training split as the models see it); (None, None), i.e.
  x / 255 only, when none of them is available (a streamed dataset without known statistics)."""
  if data.mean:
    return tuple(data.mean), tuple(data.std)
  if data.name in sources.MEAN_STD:
    return sources.MEAN_STD[data.name]
  if train_images is not None:
    return sources.channel_stats(train_images)
  return None, None


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 NHWC images resized to `size` = (H, W): bilinear (antialiased when shrinking), rounded."""
  resized = jax.image.resize(jnp.asarray(images, jnp.float32), (len(images), *size, images.shape[-1]),
                             "bilinear")
  return np.asarray(jnp.clip(jnp.round(resized), 0, 255), np.uint8)


def _load_arrays(data: ml_collections.ConfigDict, split: str) -> sources.ArrayDataset:
  options = {}
  if data.name == "image_folder":
    options = {"path": data.path, "validation_per_class": data.validation_per_class,
               "limit_per_class": data.limit_per_class or None}
  elif data.name in ("cifar10", "cifar100"):
    options = {"data_dir": data.data_dir or None}
  if data.cache_dir and data.name != "digits":
    options["cache_dir"] = data.cache_dir
  dataset = sources.load(data.name, split, **options)
  size = (data.image_size, data.image_size)
  if data.image_size and dataset.image_shape[:2] != size:
    # Once, on the host, so that the zoo's 32x32 models can run small images.
    dataset = dataclasses.replace(dataset, images=resize_images(dataset.images, size))
  return dataset


def _labelled_folder(path: str, like: sources.ArrayDataset) -> sources.ArrayDataset:
  """Every image of a class-folder tree, labelled by class name in `like`'s label set and resized to
  `like`'s image size the way the training data was."""
  images, labels = sources.read_labelled_images(path, like.class_names, grayscale=like.image_shape[-1] == 1)
  out = np.empty((len(images), *like.image_shape), np.uint8)
  by_shape = {}
  for i, image in enumerate(images):
    by_shape.setdefault(image.shape, []).append(i)
  for shape, index in by_shape.items():
    batch = np.stack([images[i] for i in index])
    out[index] = batch if shape[:2] == like.image_shape[:2] else resize_images(batch, like.image_shape[:2])
  return sources.ArrayDataset(out, labels, like.num_classes, like.class_names)


def _in_memory(config, mesh, eval_split: str | None, image_folder: str | None, with_train: bool,
               global_batch: int) -> Data:
  d = config.data
  train = _load_arrays(d, d.train_split)
  mean, std = normalisation(d, train.images)
  if image_folder is not None:
    evaluation = _labelled_folder(image_folder, train)
  else:
    evaluation = _load_arrays(d, eval_split or d.eval_split)
    if evaluation.class_names != train.class_names:
      raise ValueError(f"The evaluation split's classes {evaluation.class_names} are not the training "
                       f"split's {train.class_names}.")
  kwargs = {"mean": mean, "std": std, "mesh": mesh, "seed": config.seed, "global_batch": global_batch}
  eval_pipe = device_pipeline.DevicePipeline(evaluation, augment="none", **kwargs)
  return Data(
    train=device_pipeline.DevicePipeline(train, augment=d.augment, **kwargs) if with_train else None,
    eval=eval_pipe, num_classes=train.num_classes, class_names=train.class_names,
    image_shape=train.image_shape, pipeline="device", mean=_floats(eval_pipe.mean),
    std=_floats(eval_pipe.std))


def _streaming(config, mesh, eval_split: str | None, with_train: bool, global_batch: int) -> Data:
  d = config.data
  size = d.image_size or 224
  mean, std = normalisation(d)
  kwargs = {"global_batch": global_batch, "seed": config.seed, "image_size": size,
            "resize_size": round(size * 256 / 224), "mean": mean, "std": std, "mesh": mesh,
            "data_dir": d.data_dir or None, "manual_dir": d.manual_dir or None, "preprocess": d.augment}
  evaluation = tfds_pipeline.TfdsPipeline(d.name, split=eval_split or d.eval_split, **kwargs)
  train = tfds_pipeline.TfdsPipeline(d.name, split=d.train_split, **kwargs) if with_train else None
  return Data(train=train, eval=evaluation, num_classes=evaluation.num_classes,
              class_names=evaluation.class_names, image_shape=evaluation.image_shape, pipeline="tfds",
              mean=_floats(evaluation.mean), std=_floats(evaluation.std))


def _floats(values: np.ndarray) -> tuple[float, ...]:
  return tuple(float(v) for v in values)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None) -> Data:
  """The run's training and evaluation pipelines (`config.data`, `config.seed`, the global batch
  `config.schedule.batch_size`), batches sharded over `mesh`'s `data` axis (None: one device)."""
  kind = check_config(config.data)
  if kind == "tfds":
    return _streaming(config, mesh, None, True, config.schedule.batch_size)
  return _in_memory(config, mesh, None, None, True, config.schedule.batch_size)


def build_eval(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None, *,
               split: str | None = None, image_folder: str | None = None,
               global_batch: int | None = None) -> Data:
  """An evaluation pipeline with the run's own evaluation preprocessing (`train` is None).

  `split`: a split of the run's dataset (default `config.data.eval_split`); `image_folder`: a
  class-folder tree whose class names are all in the run's label set (any subset, any image sizes:
  resized as the training data was); at most one of them. Normalised with the run's values, which may
  be the training split's statistics (see `normalisation`), so the training split is read too (from
  its cache). `global_batch` defaults to `config.schedule.batch_size`.
  """
  if split is not None and image_folder is not None:
    raise ValueError("Give a split or an image folder to evaluate on, not both.")
  kind = check_config(config.data)
  global_batch = global_batch or config.schedule.batch_size
  if kind == "tfds":
    if image_folder is not None:
      raise ValueError("Evaluating an image folder is supported for in-memory runs only; this run "
                       f"streams {config.data.name!r} through tf.data (data.pipeline='tfds'): give a split.")
    return _streaming(config, mesh, split, False, global_batch)
  return _in_memory(config, mesh, split, image_folder, False, global_batch)

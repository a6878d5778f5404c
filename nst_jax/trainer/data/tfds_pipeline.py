"""The tf.data streaming input pipeline, for datasets that do not fit in memory (ImageNet).

`TfdsPipeline` reads one split of a TFDS dataset (`imagenet2012` from a manual download directory,
`cifar10`, `cifar100`, or any image-classification dataset with `image` and `label` features), decodes
(and, for ImageNet, crops) on the host with tf.data, and yields global batches as `jax.Array`s sharded
along the mesh's `data` axis: the same `{'image', 'label'[, 'mask']}` dicts as
`device_pipeline.DevicePipeline`, so a trainer can use either. TensorFlow and TFDS are imported only
inside functions, so the rest of nst_jax imports and runs without them.

* Per-host sharding: each process reads `tfds.split_for_jax_process(split)` (an even, disjoint part of
  the split) and produces its `global_batch / process_count` rows of every global batch; the arrays are
  assembled with `jax.make_array_from_process_local_data`, so each process transfers only its own rows
  to its own devices. Every host takes the same number of batches:
  `steps_per_epoch = (N // process_count) // local_batch`.
* Preprocessing (`preprocess=`): `imagenet` (training: random-resized crop with scale (0.08, 1) and
  aspect ratio (3/4, 4/3) from TF's bounding-box sampler, falling back to the whole image, bilinear
  (antialiased) resize to `image_size`, horizontal flip with p = 0.5; evaluation: resize the shorter side
  to `resize_size` = 256 as torchvision does (longer side truncated), then centre crop `image_size` =
  224), on the host; `cifar` (training: zero-pad 4, random crop, flip; evaluation: none), on the devices
  with `device_pipeline.cifar_augment`, the in-memory pipeline's own function (uint8 pixels cross to the
  devices, a quarter of the float32 bytes); `none`. Then `(x / 255 - mean) / std` per channel on the
  devices (`device_pipeline.normalize`), each device on its own rows (`device_pipeline.per_shard`).
* Determinism: epoch e is read with file and buffer shuffling seeded from (seed, e, process index); the
  ImageNet crop of example i of the host's stream uses the stateless seed (seed', i), the cifar crop of
  row r of step s the key fold_in(fold_in(k_augment, s), r) as in `device_pipeline`, so the stream is a
  function of the seed. Resume is exact too: `iterate(start_step)` rebuilds epoch `start_step //
  steps_per_epoch` and skips the consumed examples before decoding (they are still read, up to one
  epoch of records).
* Evaluation (`eval_batches()`): the host's part in order, padded to the same number of full batches on
  every host with zero images, label 0 and `mask` 0 (real examples have mask 1).
* Prefetch: tf.data prefetches decoded batches; `device_prefetch` batches are transferred ahead.
"""

import collections
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nst_jax.trainer import parallel
from nst_jax.trainer.data import device_pipeline, sources

PREPROCESSING = ("imagenet", "cifar", "none")


def _tf():
  """Imports TensorFlow, hiding any GPU from it so it never takes accelerator memory from JAX."""
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Devices were already initialised (by an earlier call): nothing to hide now.
    pass
  return tf


def _seed_int(*entropy: int) -> int:
  """A 31-bit seed mixed from integers (epoch, process, stream), so that streams do not overlap."""
  return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0] >> 1)


# ----------------------------------------------------------------------------------------------------
# Per-example preprocessing (TensorFlow ops; the building blocks of the pipeline, tested on their own).


def _decode(image_bytes, channels: int):
  tf = _tf()
  return tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)


def _image_shape(image_bytes, channels: int):
  """(height, width) without decoding the pixels of a JPEG."""
  tf = _tf()
  return tf.cond(
    tf.io.is_jpeg(image_bytes),
    lambda: tf.image.extract_jpeg_shape(image_bytes)[:2],
    lambda: tf.shape(_decode(image_bytes, channels))[:2],
  )


def random_resized_crop(
  image_bytes, seed, image_size: int, channels: int = 3, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
):
  """Random-resized crop + flip of an encoded image: float32 (image_size, image_size, C) in 0..255."""
  tf = _tf()
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  shape = _image_shape(image_bytes, channels)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.concat([shape, [channels]], 0),
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
    seed=crop_seed,
    min_object_covered=0.0,  # torchvision has no coverage constraint
    aspect_ratio_range=ratio,
    area_range=scale,
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  crop = tf.cond(
    tf.io.is_jpeg(image_bytes),
    # Decodes only the window: most of the JPEG's pixels are never materialised.
    lambda: tf.image.decode_and_crop_jpeg(image_bytes, window, channels=channels),
    lambda: tf.slice(_decode(image_bytes, channels), [begin[0], begin[1], 0], [size[0], size[1], -1]),
  )
  image = tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=True)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def resize_center_crop(image_bytes, image_size: int, resize_size: int, channels: int = 3):
  """torchvision's Resize(resize_size) + CenterCrop(image_size): float32 (image_size, image_size, C)."""
  tf = _tf()
  image = _decode(image_bytes, channels)
  h, w = tf.unstack(tf.shape(image)[:2])
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  # torchvision: the shorter side becomes resize_size, the longer int(resize_size * long / short).
  new_long = tf.cast(
    tf.cast(resize_size, tf.int64) * tf.cast(long, tf.int64) // tf.cast(short, tf.int64), tf.int32
  )
  new_h, new_w = tf.cond(h <= w, lambda: (resize_size, new_long), lambda: (new_long, resize_size))
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
  # torchvision's centre crop offset: int(round((size - crop) / 2)).
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2), tf.int32)
  return image[top : top + image_size, left : left + image_size]


# ----------------------------------------------------------------------------------------------------
# The pipeline.


class TfdsPipeline:
  """Batches of one TFDS split streamed through tf.data; see the module docstring.

  Args:
    name: the TFDS name (`imagenet2012`, `cifar10`, ...).
    split: a TFDS split string (`train`, `validation`, `train[:90%]`, ...).
    global_batch: examples per batch over all hosts; must divide by the mesh's `data` size and by the
      number of processes.
    seed: the training stream's seed.
    preprocess: `imagenet`, `cifar` or `none` (see the module docstring).
    image_size, resize_size: the `imagenet` output size and evaluation resize.
    mean, std: per-channel normalisation in 0..1 units (default 0 and 1).
    mesh, axis: the global mesh and its batch axis; None: one device.
    dtype: the images' output dtype.
    data_dir, manual_dir, download: where TFDS data lives / where manual downloads are; whether to try
      preparing the dataset when it is missing.
    shuffle_buffer: examples in the tf.data shuffle buffer (encoded, so ~110 KB each for ImageNet).
    device_prefetch: batches transferred to the devices ahead of use.
    process_index, process_count: this host's place (default: JAX's). Overriding them is for tests; with
      a mesh they must match JAX's.
    label_key, channels: the label feature and the decoded channel count.
    pad: zero padding of the `cifar` crop.
  """

  def __init__(
    self,
    name: str,
    *,
    split: str,
    global_batch: int,
    seed: int = 0,
    preprocess: str = "imagenet",
    image_size: int = 224,
    resize_size: int = 256,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mesh: Mesh | None = None,
    axis: str = "data",
    dtype="float32",
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = True,
    shuffle_buffer: int = 10_000,
    device_prefetch: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
    label_key: str = "label",
    channels: int = 3,
    pad: int = 4,
  ):
    if preprocess not in PREPROCESSING:
      raise ValueError(f"Unknown preprocessing {preprocess!r}. Valid: {', '.join(PREPROCESSING)}.")
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    parallel.check_global_batch(global_batch, 1 if mesh is None else mesh.shape[axis])
    if global_batch % self.process_count:  # Implied by the device count on an even multi-process mesh.
      raise ValueError(f"The global batch size {global_batch} does not divide by the {self.process_count} "
                       "processes.")
    self.name, self.split, self.seed = name, split, int(seed)
    self.global_batch = global_batch
    self.local_batch = global_batch // self.process_count
    self.preprocess, self.image_size, self.resize_size = preprocess, image_size, resize_size
    self.mean = device_pipeline.channel_constants(mean, 0.0, channels, "mean")
    self.std = device_pipeline.channel_constants(std, 1.0, channels, "std")
    self.dtype = jnp.dtype(dtype)
    self.shuffle_buffer, self.device_prefetch = shuffle_buffer, device_prefetch
    self.label_key, self.channels, self.pad = label_key, channels, pad
    self.mesh = mesh
    self._sharding = (
      NamedSharding(mesh, PartitionSpec(axis))
      if mesh is not None
      else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    )
    # The device side of every batch: augmentation (cifar) and normalisation, each device on its own
    # rows, the same code as `device_pipeline`.
    batch, step = PartitionSpec(axis), PartitionSpec()
    self._train_fn = device_pipeline.per_shard(self._train_rows, mesh, axis, (batch, batch, step))
    self._eval_fn = device_pipeline.per_shard(self._eval_rows, mesh, axis, (batch, batch, batch))

    import tensorflow_datasets as tfds

    _tf()
    self._builder = sources.prepared_tfds_builder(name, data_dir, manual_dir, download)
    self._host_split = tfds.split_for_jax_process(
      split, process_index=self.process_index, process_count=self.process_count
    )
    self.num_examples = self._split_size(split)
    self.steps_per_epoch = (self.num_examples // self.process_count) // self.local_batch

  @property
  def num_classes(self) -> int:
    """The number of classes of the label feature."""
    return int(self._builder.info.features[self.label_key].num_classes)

  @property
  def class_names(self) -> tuple[str, ...]:
    """The label feature's class names, in label order."""
    return tuple(self._builder.info.features[self.label_key].names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """The (H, W, C) of the output images."""
    if self.preprocess == "imagenet":
      return (self.image_size, self.image_size, self.channels)
    shape = tuple(self._builder.info.features["image"].shape[:2])
    if None in shape:
      raise ValueError(
        f"{self.name!r} images have no fixed size {shape}: use preprocess='imagenet' to crop them."
      )
    return (*shape, self.channels)

  def _split_size(self, split) -> int:
    try:
      return int(self._builder.info.splits[split].num_examples)
    except KeyError:  # No split metadata (e.g. under tfds.testing.mock_data): ask the dataset itself.
      return int(self._read(split, shuffle_seed=None).cardinality())

  def _read(self, split, shuffle_seed: int | None):
    import tensorflow_datasets as tfds

    return self._builder.as_dataset(
      split=split,
      # Ordered datasets (disable_shuffling=True) refuse file shuffling; the buffer still shuffles them.
      shuffle_files=shuffle_seed is not None and not self._builder.info.disable_shuffling,
      # Decoding is ours: it happens after skipping, and ImageNet crops decode only the window.
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, add_tfds_id=False),
    )

  def _train_image(self, image_bytes, seed):
    """Host-side pixels in 0..255: float32 crops for imagenet, the decoded uint8 image otherwise (the
    cifar crop and flip are done on the devices)."""
    if self.preprocess == "imagenet":
      return random_resized_crop(image_bytes, seed, self.image_size, self.channels)
    return _decode(image_bytes, self.channels)

  def _eval_image(self, image_bytes):
    if self.preprocess == "imagenet":
      return resize_center_crop(image_bytes, self.image_size, self.resize_size, self.channels)
    return _decode(image_bytes, self.channels)

  def _train_rows(self, shard, num_shards, images, labels, step):
    if self.preprocess == "cifar":
      first = shard * (self.global_batch // num_shards)  # this shard's first row in the global batch
      images = device_pipeline.cifar_augment(images, self.seed, step, first, self.pad)
    return {"image": device_pipeline.normalize(images, self.mean, self.std, self.dtype), "label": labels}

  def _eval_rows(self, shard, num_shards, images, labels, mask):
    del shard, num_shards
    x = device_pipeline.normalize(images, self.mean, self.std, self.dtype)
    return {"image": jnp.where(mask[:, None, None, None] > 0, x, jnp.zeros((), self.dtype)),
            "label": labels, "mask": mask}

  # --------------------------------------------------------------------------------------------------

  def train_dataset(self, epoch: int, skip_batches: int = 0):
    """The tf.data pipeline of this host's part of epoch `epoch`, its first `skip_batches` skipped:
    {'image': pixels in 0..255, 'label'} in local batches, before the device side."""
    tf = _tf()
    examples = self.steps_per_epoch * self.local_batch
    order_seed = _seed_int(self.seed, epoch, self.process_index, 0)
    augment_seed = _seed_int(self.seed, self.process_index, 1)
    ds = self._read(self._host_split, shuffle_seed=order_seed)
    ds = ds.shuffle(self.shuffle_buffer, seed=order_seed, reshuffle_each_iteration=False)
    ds = ds.take(examples).enumerate(start=epoch * examples).skip(skip_batches * self.local_batch)
    shape = self.image_shape

    def prepare(index, ex):
      image = self._train_image(ex["image"], tf.stack([tf.constant(augment_seed, tf.int64), index]))
      return {"image": tf.ensure_shape(image, shape), "label": tf.cast(ex[self.label_key], tf.int32)}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(self.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def eval_dataset(self):
    """The tf.data pipeline of this host's part in order, padded to `num_eval_batches()` full batches
    (pixels in 0..255 with `mask`, before the device side)."""
    tf = _tf()
    total = self.num_eval_batches() * self.local_batch
    shape = self.image_shape
    pixel_dtype = tf.float32 if self.preprocess == "imagenet" else tf.uint8

    def prepare(ex):
      return {
        "image": tf.ensure_shape(self._eval_image(ex["image"]), shape),
        "label": tf.cast(ex[self.label_key], tf.int32),
        "mask": tf.constant(1.0),
      }

    padding = tf.data.Dataset.from_tensors(
      {"image": tf.zeros(shape, pixel_dtype), "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0)}
    ).repeat()
    ds = self._read(self._host_split, shuffle_seed=None).take(total)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.concatenate(padding).take(total)
    return ds.batch(self.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def num_eval_batches(self) -> int:
    # The largest host part (even_splits gives the first N % P hosts one extra example) sets the count
    # for every host, so all hosts run the same number of evaluation steps.
    return math.ceil(math.ceil(self.num_examples / self.process_count) / self.local_batch)

  # --------------------------------------------------------------------------------------------------

  def _to_global(self, local: np.ndarray) -> jax.Array:
    """This process's rows -> the global batch array: each process transfers only its own rows, to its
    own devices (no process ever holds the whole global batch)."""
    if self.mesh is None:
      return jax.device_put(local, self._sharding)
    return jax.make_array_from_process_local_data(self._sharding, local)

  def _prefetched(self, device_batches) -> Iterator[dict[str, jax.Array]]:
    # Transfers and the device side are asynchronous: keeping a few in flight overlaps them with the
    # train step.
    queue = collections.deque()
    for batch in device_batches:
      queue.append(batch)
      if len(queue) > self.device_prefetch:
        yield queue.popleft()
    while queue:
      yield queue.popleft()

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, jax.Array]]:
    """Global training batches of steps start_step, start_step + 1, ... (forever if num_steps is None)."""
    import tensorflow_datasets as tfds

    if self.steps_per_epoch == 0:
      raise ValueError(
        f"{self.name!r} {self.split!r} has {self.num_examples} examples, fewer than one global batch "
        f"({self.global_batch}) per epoch."
      )

    def local_batches():
      epoch, skip = divmod(start_step, self.steps_per_epoch)
      remaining = num_steps
      while remaining is None or remaining > 0:
        ds = self.train_dataset(epoch, skip)
        if remaining is not None:
          ds = ds.take(remaining)
          remaining -= min(remaining, self.steps_per_epoch - skip)
        yield from tfds.as_numpy(ds)
        epoch, skip = epoch + 1, 0

    def device_batches():
      for step, local in enumerate(local_batches(), start=start_step):
        # The step is a host scalar, the same on every process (the augmentation keys depend on it).
        yield self._train_fn(self._to_global(local["image"]), self._to_global(local["label"]), np.int32(step))

    return self._prefetched(device_batches())

  def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
    """Global evaluation batches with `mask`, the split in order (per host), the last ones padded."""
    import tensorflow_datasets as tfds

    return self._prefetched(
      self._eval_fn(*(self._to_global(local[k]) for k in ("image", "label", "mask")))
      for local in tfds.as_numpy(self.eval_dataset())
    )

"""The TensorFlow-free input pipeline for datasets that fit in accelerator memory.

`DevicePipeline` places an `ArrayDataset`'s uint8 images and labels on the devices once (replicated over
a 1-D `data` mesh, or on one device when no mesh is given) and makes every batch with one jitted
program: gather, augment, normalise. The output is a global batch sharded along `data`
(`NamedSharding(mesh, P('data'))`), ready for a jitted train step with the batch sharded the same way.
Nothing runs on the host per step but the dispatch, which is why this path keeps CIFAR-sized models fed
where a host-side tf.data pipeline would not.

Determinism and resume. The training batch at step `s` is a pure function of `(seed, s)`:

* epoch `e = s // steps_per_epoch`; the epoch's order is `jax.random.permutation(fold_in(k_order, e), N)`
  and step `s` takes positions `(s % steps_per_epoch) * B ... + B` of it (the last `N % B` examples of
  each epoch's order are dropped, so each epoch sees every example at most once, and the `N - N % B`
  others exactly once);
* example `i` of the batch is augmented with key `fold_in(fold_in(k_augment, s), i)`,

where `k_order, k_augment = split(key(seed))`: two streams, so that epoch 3's order and step 3's
augmentation are not drawn from one key. The data position to checkpoint is therefore just the step,
and a resumed run sees exactly the batches of an uninterrupted one. Each device computes its own rows
(under `shard_map`, so the program has no collectives), and an example's key depends only on its row in
the global batch, so the batch is bitwise the same on 1, 4 or 8 devices.

Augmentations: `none`, and `cifar` (RepDistiller's torchvision recipe: zero-pad 4 pixels, random
crop back to the original size with a uniform offset in [0, 8] per axis, horizontal flip with p = 0.5;
the zero padding is black in pixel space, before normalisation, as in torchvision). Normalisation is
`(x / 255 - mean) / std` per channel, with mean/std in 0..1 units (see `sources.MEAN_STD`).

The pieces are module functions that the tf.data pipeline uses too: `cifar_augment`, `normalize` and
`per_shard` (a jitted program in which every device makes only its own rows).

Evaluation: `eval_batches()` walks the split in order; the last batch is padded to full size with
all-zero images, label 0 and `mask` 0 (1 for real examples), so metrics summed with the mask and divided
by the mask's sum are exact.

Multi-host: give a mesh over all processes' devices. Every process holds the whole dataset (the same
arrays), places it replicated, and runs the same jitted program; each process then computes only the
shards of the global batch that live on its own devices, which is correct because the inputs are
replicated and every row is a pure function of (seed, step, row). No host-to-host traffic is involved.
"""

import functools
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from nst_jax.trainer import parallel
from nst_jax.trainer.data.sources import ArrayDataset

AUGMENTATIONS = ("none", "cifar")

Batch = dict[str, jax.Array]


def random_crop_flip(image: jax.Array, key: jax.Array, pad: int) -> jax.Array:
  """Zero-pads an (H, W, C) image by `pad`, crops a random (H, W) window, flips it with p = 0.5."""
  key_crop, key_flip = jax.random.split(key)
  offsets = jax.random.randint(key_crop, (2,), 0, 2 * pad + 1)
  padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  crop = jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), image.shape)
  return jnp.where(jax.random.bernoulli(key_flip), crop[:, ::-1], crop)


def stream_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(order key, augmentation key) of a training stream: two streams, so that epoch 3's order and step
  3's augmentation are not drawn from one key.

  Call it inside traced functions: a key array captured from outside would be committed to one device,
  which a program over a multi-device (or multi-host) mesh cannot use.
  """
  order_key, augment_key = jax.random.split(jax.random.key(seed))
  return order_key, augment_key


def cifar_augment(images: jax.Array, seed: int, step: jax.Array, first_row: jax.Array, pad: int) -> jax.Array:
  """`random_crop_flip` of rows `first_row, first_row + 1, ...` of step `step`'s global batch.

  Row i gets the key fold_in(fold_in(augment key, step), i) wherever it is computed, so a batch does
  not depend on the number of devices or processes that compute it.
  """
  step_key = jax.random.fold_in(stream_keys(seed)[1], step)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, first_row + jnp.arange(len(images)))
  return jax.vmap(random_crop_flip, in_axes=(0, 0, None))(images, keys, pad)


def normalize(images: jax.Array, mean: np.ndarray, std: np.ndarray, dtype) -> jax.Array:
  """(x / 255 - mean) / std per channel, from pixels in 0..255 (any dtype)."""
  x = images.astype(jnp.float32) * (1.0 / 255.0)
  return ((x - mean) / std).astype(dtype)


def channel_constants(values: Sequence[float] | None, default: float, channels: int, name: str) -> np.ndarray:
  """Per-channel mean or std as a float32 vector of length `channels` (one value is broadcast)."""
  out = np.asarray(default if values is None else values, np.float32).reshape(-1)
  if out.size not in (1, channels):
    raise ValueError(f"{name} has {out.size} values for images with {channels} channels; give one per "
                     "channel (or one for all).")
  out = np.broadcast_to(out, (channels,))
  if name == "std" and np.any(out <= 0):
    raise ValueError(f"std must be positive, got {out}.")
  return out


def per_shard(rows_fn: Callable, mesh: Mesh | None, axis: str, in_specs, device: jax.Device | None = None):
  """jit of rows_fn(shard, num_shards, *args) -> this shard's rows, returned as one global batch.

  Under shard_map every device computes only its own rows, from its copy (replicated specs) or its
  shard (batch specs) of the inputs, so the program has no collectives by construction, and with a
  mesh over several processes each process computes only its own devices' rows. (Left to the SPMD
  partitioner, the evaluation gather became an all-gather across devices: cross-host traffic on a
  multi-host mesh, and it hung 8 fake CPU devices when several such programs were in flight.)
  `mesh=None`: one device, `device` (default: the first).
  """
  if mesh is None:
    sharding = SingleDeviceSharding(device or jax.devices()[0])
    return jax.jit(lambda *args: rows_fn(0, 1, *args), out_shardings=sharding)
  num_shards = mesh.shape[axis]
  fn = jax.shard_map(lambda *args: rows_fn(jax.lax.axis_index(axis), num_shards, *args), mesh=mesh,
                     in_specs=in_specs, out_specs=PartitionSpec(axis))
  return jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec(axis)))


class DevicePipeline:
  """Batches of one in-memory split, made on the devices; see the module docstring.

  Args:
    dataset: the split (e.g. from `sources.load`).
    global_batch: examples per batch over all devices and hosts; must divide by the mesh's `data` size.
    seed: the training stream's seed.
    augment: `none` or `cifar` (training batches only; evaluation never augments).
    mean, std: per-channel normalisation in 0..1 units; one value per image channel (default 0 and 1:
      just x / 255).
    mesh: a mesh with a `data` axis (replicated dataset, batch sharded along it); None: one device.
    axis: the batch axis name in `mesh`.
    dtype: the images' output dtype (e.g. jnp.bfloat16).
    device: the device when `mesh` is None (default: the first one).
    pad: zero padding of the `cifar` crop.
  """

  def __init__(
    self,
    dataset: ArrayDataset,
    *,
    global_batch: int,
    seed: int = 0,
    augment: str = "none",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mesh: Mesh | None = None,
    axis: str = "data",
    dtype=jnp.float32,
    device: jax.Device | None = None,
    pad: int = 4,
  ):
    if augment not in AUGMENTATIONS:
      raise ValueError(f"Unknown augmentation {augment!r}. Valid: {', '.join(AUGMENTATIONS)}.")
    if mesh is not None and axis not in mesh.axis_names:
      raise ValueError(f"The mesh has axes {mesh.axis_names}; the batch axis {axis!r} is not one of them.")
    channels = dataset.images.shape[-1]
    self.mean = channel_constants(mean, 0.0, channels, "mean")
    self.std = channel_constants(std, 1.0, channels, "std")
    self.dataset = dataset
    self.seed = int(seed)
    self.augment = augment
    self.dtype = dtype
    self.pad = pad
    self.mesh = mesh
    self.axis = axis
    self._num_shards = 1 if mesh is None else mesh.shape[axis]
    parallel.check_global_batch(global_batch, self._num_shards)
    self.global_batch = int(global_batch)
    self.steps_per_epoch = len(dataset) // self.global_batch

    # Placed once. make_array_from_process_local_data with a replicated sharding is the multi-host-safe
    # form of device_put: every process passes the same full arrays and keeps its own devices' copies.
    if mesh is None:
      self._replicated = SingleDeviceSharding(device or jax.devices()[0])
      self._images = jax.device_put(dataset.images, self._replicated)
      self._labels = jax.device_put(dataset.labels, self._replicated)
    else:
      self._replicated = NamedSharding(mesh, PartitionSpec())
      self._images = jax.make_array_from_process_local_data(self._replicated, dataset.images)
      self._labels = jax.make_array_from_process_local_data(self._replicated, dataset.labels)

    self._shard_fn = functools.partial(per_shard, mesh=mesh, axis=axis, in_specs=PartitionSpec(),
                                       device=device)
    self._permutation_fn = jax.jit(self._permutation, out_shardings=self._replicated)
    self._train_fn = self._shard_fn(self._train_rows)
    self._eval_fns = {}
    self._cached_order = (None, None)  # (epoch, permutation): one permutation per epoch, not per step.

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.dataset.image_shape

  # --------------------------------------------------------------------------------------------------
  # Training batches.

  def _permutation(self, epoch):
    return jax.random.permutation(jax.random.fold_in(stream_keys(self.seed)[0], epoch), len(self.dataset))

  def _train_rows(self, shard, num_shards, images, labels, order, position, step) -> Batch:
    rows = self.global_batch // num_shards
    first = shard * rows  # this shard's first row in the global batch
    index = jax.lax.dynamic_slice_in_dim(order, position * self.global_batch + first, rows)
    x, y = jnp.take(images, index, axis=0), jnp.take(labels, index, axis=0)
    if self.augment == "cifar":
      x = cifar_augment(x, self.seed, step, first, self.pad)
    return {"image": normalize(x, self.mean, self.std, self.dtype), "label": y}

  def epoch_order(self, epoch: int) -> jax.Array:
    """The dataset indices in the order epoch `epoch` visits them (before dropping the remainder)."""
    if self._cached_order[0] != epoch:
      self._cached_order = (epoch, self._permutation_fn(self._scalar(epoch)))
    return self._cached_order[1]

  def batch(self, step: int) -> Batch:
    """The training batch of step `step`: {'image': (B, H, W, C) dtype, 'label': (B,) int32}."""
    if self.steps_per_epoch == 0:
      raise ValueError(
        f"The split has {len(self.dataset)} examples, fewer than one global batch ({self.global_batch})."
      )
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    epoch, position = divmod(int(step), self.steps_per_epoch)
    # int32 scalars: one compiled program for every step. They are the same on every process, which is
    # what a program over a multi-process mesh requires of host inputs.
    return self._train_fn(
      self._images, self._labels, self.epoch_order(epoch), self._scalar(position), self._scalar(step)
    )

  def _scalar(self, value: int) -> jax.Array:
    # An explicit transfer of 4 bytes: the only host-to-device traffic of a steady-state step (a bare
    # NumPy scalar would be an implicit one, which `jax.transfer_guard("disallow")` rejects).
    return jax.device_put(np.int32(value), self._replicated)

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[Batch]:
    """Training batches of steps start_step, start_step + 1, ... (forever when num_steps is None)."""
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield self.batch(step)
      step += 1

  # --------------------------------------------------------------------------------------------------
  # Evaluation batches.

  def _eval_rows(self, shard, num_shards, images, labels, start, *, batch: int) -> Batch:
    rows = batch // num_shards
    index = start + shard * rows + jnp.arange(rows)
    valid = index < len(self.dataset)
    index = jnp.where(valid, index, 0)
    x = normalize(jnp.take(images, index, axis=0), self.mean, self.std, self.dtype)
    x = jnp.where(valid[:, None, None, None], x, jnp.zeros((), self.dtype))
    y = jnp.where(valid, jnp.take(labels, index, axis=0), 0)
    return {"image": x, "label": y, "mask": valid.astype(jnp.float32)}

  def num_eval_batches(self, global_batch: int | None = None) -> int:
    return math.ceil(len(self.dataset) / (global_batch or self.global_batch))

  def eval_batches(self, global_batch: int | None = None) -> Iterator[Batch]:
    """The split in order, in batches of `global_batch` (default: the pipeline's), each with a `mask`.

    Every batch has the full size; the last one is padded with zero images, label 0 and mask 0.
    """
    b = global_batch or self.global_batch
    parallel.check_global_batch(b, self._num_shards)
    if b not in self._eval_fns:
      self._eval_fns[b] = self._shard_fn(functools.partial(self._eval_rows, batch=b))
    for i in range(self.num_eval_batches(b)):
      yield self._eval_fns[b](self._images, self._labels, np.int32(i * b))

"""Tests of nst_jax.trainer.data.device_pipeline on 8 fake CPU devices: epochs, determinism and resume,
augmentation and normalisation (checked by NumPy search and arithmetic), evaluation padding, sharding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec

from nst_jax.trainer.data import device_pipeline, sources
from tests.trainer.data import augment_reference as ref

MEAN, STD = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
N, BATCH = 50, 16  # 3 steps per epoch, 2 examples dropped from each epoch


@pytest.fixture(scope="module")
def dataset():
  rng = np.random.default_rng(0)
  # Pixels 1..255: a zero-padded border is never confused with image content.
  images = rng.integers(1, 256, (N, 10, 10, 3), dtype=np.uint8)
  return sources.ArrayDataset(images, (np.arange(N) % 5).astype(np.int32), 5, tuple("abcde"))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
  return Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Explicit,))


@pytest.fixture(scope="module")
def plain(dataset, mesh):
  return device_pipeline.DevicePipeline(dataset, global_batch=BATCH, seed=3, mean=MEAN, std=STD, mesh=mesh)


@pytest.fixture(scope="module")
def augmented(dataset, mesh):
  return device_pipeline.DevicePipeline(
    dataset, global_batch=BATCH, seed=3, augment="cifar", mean=MEAN, std=STD, mesh=mesh
  )


def _indices(batch, dataset) -> np.ndarray:
  """Dataset index of every image of an unaugmented batch, by exact pixel match."""
  pixels = ref.denormalize(batch["image"], MEAN, STD)
  hits = np.all(pixels[:, None] == dataset.images[None], axis=(2, 3, 4))
  assert np.all(hits.sum(1) == 1)
  return hits.argmax(1)


def test_batch_types_and_sharding(plain, dataset):
  batch = plain.batch(0)
  assert batch["image"].shape == (BATCH, 10, 10, 3) and batch["image"].dtype == jnp.float32
  assert batch["label"].shape == (BATCH,) and batch["label"].dtype == jnp.int32
  for x in batch.values():
    assert x.sharding.spec == PartitionSpec("data") and len(x.sharding.device_set) == 8
    assert x.addressable_shards[0].data.shape[0] == BATCH // 8
  # Normalisation: exactly (x / 255 - mean) / std of the gathered images.
  index = _indices(batch, dataset)
  np.testing.assert_allclose(batch["image"], ref.normalize(dataset.images[index], MEAN, STD), atol=1e-6)
  np.testing.assert_array_equal(batch["label"], dataset.labels[index])


def test_every_example_once_per_epoch(plain, dataset):
  assert plain.steps_per_epoch == N // BATCH == 3
  epochs = []
  for epoch in range(2):
    index = np.concatenate([_indices(plain.batch(3 * epoch + s), dataset) for s in range(3)])
    assert len(set(index.tolist())) == 3 * BATCH  # no repeats; N % BATCH = 2 dropped
    epochs.append(index)
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_batch_is_a_pure_function_of_seed_and_step(augmented, dataset, mesh):
  run = [np.asarray(b["image"]) for b in augmented.iterate(0, 7)]  # crosses two epoch boundaries
  fresh = device_pipeline.DevicePipeline(
    dataset, global_batch=BATCH, seed=3, augment="cifar", mean=MEAN, std=STD, mesh=mesh
  )
  # Resume: a new pipeline asked for step 5, or started at step 4, gives the uninterrupted batches.
  np.testing.assert_array_equal(fresh.batch(5)["image"], run[5])
  for got, want in zip(fresh.iterate(4, 3), run[4:], strict=True):
    np.testing.assert_array_equal(got["image"], want)
  np.testing.assert_array_equal(augmented.batch(2)["image"], run[2])  # going back in time too
  assert not np.array_equal(run[1], run[2])
  other_seed = device_pipeline.DevicePipeline(
    dataset, global_batch=BATCH, seed=4, augment="cifar", mean=MEAN, std=STD, mesh=mesh
  )
  assert not np.array_equal(other_seed.batch(5)["image"], run[5])
  # One device, or four on a mesh with Auto axes, instead of eight: the same bits.
  single = device_pipeline.DevicePipeline(
    dataset, global_batch=BATCH, seed=3, augment="cifar", mean=MEAN, std=STD
  )
  batch = single.batch(5)
  assert batch["image"].sharding.device_set == {jax.devices()[0]}
  np.testing.assert_array_equal(batch["image"], run[5])
  four = Mesh(np.array(jax.devices()[:4]), ("data",))
  batch = device_pipeline.DevicePipeline(
    dataset, global_batch=BATCH, seed=3, augment="cifar", mean=MEAN, std=STD, mesh=four
  ).batch(5)
  assert len(batch["image"].sharding.device_set) == 4
  np.testing.assert_array_equal(batch["image"], run[5])


def test_cifar_augmentation_is_a_padded_window_and_a_flip(augmented, dataset):
  found = []
  for step in range(3):  # one epoch: 48 distinct sources
    batch = augmented.batch(step)
    crops = ref.recover_crops(ref.denormalize(batch["image"], MEAN, STD), dataset.images, pad=4)
    np.testing.assert_array_equal(batch["label"], dataset.labels[[i for i, *_ in crops]])
    found += crops
  assert len({i for i, *_ in found}) == 48
  offsets = np.array([(dy, dx) for _, dy, dx, _ in found])
  flips = np.mean([f for *_, f in found])
  assert offsets.min() == 0 and offsets.max() == 8  # offsets span the padded range
  assert len(set(offsets[:, 0])) >= 7 and len(set(offsets[:, 1])) >= 7
  assert 0.3 < flips < 0.7


def test_eval_batches_are_in_order_and_padded_with_a_mask(plain, dataset):
  for global_batch, sizes in ((16, [16, 16, 16, 2]), (24, [24, 24, 2]), (8, [8] * 6 + [2])):
    batches = list(plain.eval_batches(global_batch))
    assert plain.num_eval_batches(global_batch) == len(sizes)
    assert [int(b["mask"].sum()) for b in batches] == sizes
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, np.arange(len(mask)) < N)
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_allclose(images[:N], ref.normalize(dataset.images, MEAN, STD), atol=1e-6)
    np.testing.assert_array_equal(labels[:N], dataset.labels)
    assert not images[N:].any() and not labels[N:].any()  # padding: zero images, label 0
    for b in batches:
      assert all(x.sharding.spec == PartitionSpec("data") for x in b.values())

def test_eval_batches_never_augment(augmented, dataset):
  images = np.concatenate([b["image"] for b in augmented.eval_batches()])[:N]
  np.testing.assert_allclose(images, ref.normalize(dataset.images, MEAN, STD), atol=1e-6)


def test_bfloat16_output_and_grayscale(mesh):
  digits = sources.load("digits", "validation")
  mean, std = sources.MEAN_STD["digits"]
  pipe = device_pipeline.DevicePipeline(
    digits, global_batch=64, mean=mean, std=std, mesh=mesh, dtype=jnp.bfloat16
  )
  batch = next(pipe.eval_batches())
  assert batch["image"].dtype == jnp.bfloat16 and batch["image"].shape == (64, 8, 8, 1)
  np.testing.assert_allclose(
    np.asarray(batch["image"], np.float32), ref.normalize(digits.images[:64], mean, std), atol=2e-2
  )


def test_batch_programs_have_no_collectives(augmented, plain):
  """Each device computes its own rows: no cross-device (or cross-host) traffic in the data programs."""
  step = augmented._train_fn.lower(
    augmented._images, augmented._labels, augmented.epoch_order(0), np.int32(0), np.int32(0)
  )
  next(plain.eval_batches(16))
  evaluation = plain._eval_fns[16].lower(plain._images, plain._labels, np.int32(0))
  for lowered in (step, evaluation):
    hlo = lowered.compile().as_text()
    assert not re.search(r"all-gather|all-reduce|collective-permute|all-to-all", hlo)


def test_errors(dataset, mesh):
  with pytest.raises(ValueError, match=r"global batch size 12 does not divide by the 8 devices"):
    device_pipeline.DevicePipeline(dataset, global_batch=12, mesh=mesh)
  pipe = device_pipeline.DevicePipeline(dataset, global_batch=64, mesh=mesh)
  with pytest.raises(ValueError, match="50 examples, fewer than one global batch"):
    pipe.batch(0)
  with pytest.raises(ValueError, match=r"global batch size 20 does not divide by the 8 devices"):
    next(pipe.eval_batches(20))
  with pytest.raises(ValueError, match="Valid: none, cifar"):
    device_pipeline.DevicePipeline(dataset, global_batch=8, augment="autoaugment")
  with pytest.raises(ValueError, match="'batch' is not one of them"):
    device_pipeline.DevicePipeline(dataset, global_batch=8, mesh=mesh, axis="batch")

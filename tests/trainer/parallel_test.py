"""Tests of nst_jax.trainer.parallel: where state, teacher and batches live in each mode, and that the steady
state of a training step moves nothing between host and devices (or between devices outside the
compiled program)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from nst_jax import models, objective
from nst_jax.trainer import data, parallel, train


def _digits_config(batch=16):
  config = default.get_config()
  config.schedule.batch_size = batch
  return config


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_steady_state_steps_make_no_transfers(mode):
  mesh = parallel.make_mesh()
  runner = parallel.Runner(mode, mesh)
  pipes = data.build(_digits_config(), mesh)
  axis = runner.axis_name
  student = models.get_model("resnet8", pipes.num_classes, axis_name=axis)
  teacher = models.get_model("resnet8", pipes.num_classes, axis_name=axis)
  sample = jnp.zeros((1, *pipes.image_shape))
  obj = objective.Objective(kd_weight=1.0, nst_weight=1.0, nst_layers=(("stage3", "stage3"),))
  lr = train.step_schedule(0.05, pipes.train.steps_per_epoch, (), 0.1)
  state = train.create_train_state(student, train.make_optimizer(lr, 0.9, False, 5e-4), sample,
                                   jax.random.key(0))
  t_vars = runner.put_replicated(teacher.init(jax.random.key(1), sample, train=False))
  state = runner.put_replicated(state)
  step = runner.compile_train(train.train_body(train.Models(student, teacher), obj, lr))
  batches = pipes.train.iterate(0)
  for _ in range(2):  # Compilation and the pipeline's first batches may transfer.
    state, metrics = step(state, t_vars, runner.put_batch(next(batches)))
  jax.block_until_ready(metrics)
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      state, metrics = step(state, t_vars, runner.put_batch(next(batches)))
    jax.block_until_ready(metrics)
  assert np.isfinite(runner.metrics_to_host(metrics)["train_loss"])


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_layouts(mode):
  mesh = parallel.make_mesh()
  runner = parallel.Runner(mode, mesh)
  n = len(jax.devices())
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  placed = runner.put_replicated(tree)["w"]
  if mode == "jit":
    assert placed.shape == (2, 3) and placed.sharding.is_fully_replicated
  else:  # One slice per device, each device holding only its own copy.
    assert placed.shape == (n, 2, 3)
    assert {s.data.shape for s in placed.addressable_shards} == {(1, 2, 3)}
    assert {s.device for s in placed.addressable_shards} == set(jax.devices())
  back = runner.get_replicated(runner.put_replicated(tree))["w"]
  assert back.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(back), tree["w"])
  batch = {"x": np.arange(n * 4, dtype=np.float32).reshape(n * 2, 2)}
  split = runner.put_batch(batch)["x"]
  if mode == "jit":
    assert split.shape == (n * 2, 2)
  else:  # Device d holds rows 2d and 2d + 1, as its own slice of the global batch.
    assert split.shape == (n, 2, 2)
    for shard in split.addressable_shards:
      d = shard.index[0].start
      np.testing.assert_array_equal(np.asarray(shard.data)[0], batch["x"][2 * d:2 * d + 2])
  assert runner.metrics_to_host({"m": runner.put_replicated({"v": np.float32(3.5)})["v"]}) == {"m": 3.5}

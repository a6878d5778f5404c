"""Tests for nst_jax.models.layers.BatchNorm against a float64 NumPy statement of PyTorch's BatchNorm2d.

PyTorch (`torch.nn.BatchNorm2d`, momentum 0.1, eps 1e-5) in training normalises with the batch mean and
the *biased* batch variance, and moves the running statistics towards the batch mean and the *unbiased*
variance, sum((x - mean)^2) / (n - 1) with n the elements per channel. The reference below is that rule
written in NumPy; with a device axis, n and the moments are those of the whole (global) batch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nst_jax.models import layers

EPS, MOMENTUM = 1e-5, 0.1


def _inputs(shape=(4, 3, 5, 6), seed=0):
  """Activations with a large per-channel mean and unequal spreads, and random variables."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = rng.normal(3.0, 1.0, c) + rng.uniform(0.2, 2.0, c) * rng.normal(size=shape)
  variables = {
      "params": {"BatchNorm_0": {"scale": rng.uniform(0.5, 1.5, c), "bias": rng.uniform(-0.5, 0.5, c)}},
      "batch_stats": {"BatchNorm_0": {"mean": rng.uniform(-1, 1, c), "var": rng.uniform(0.5, 2.0, c)}},
  }
  return x, variables


def _to_jax(x, variables):
  return jnp.asarray(x, jnp.float32), jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)


def _reference(x, variables, train):
  """PyTorch's BatchNorm2d rule in float64 on NHWC `x`: (output, new running mean, new running var)."""
  x = np.asarray(x, np.float64)
  p, s = variables["params"]["BatchNorm_0"], variables["batch_stats"]["BatchNorm_0"]
  if not train:
    return (x - s["mean"]) / np.sqrt(s["var"] + EPS) * p["scale"] + p["bias"], s["mean"], s["var"]
  flat = x.reshape(-1, x.shape[-1])
  n = flat.shape[0]
  mean = flat.sum(axis=0) / n
  biased = ((flat - mean) ** 2).sum(axis=0) / n
  unbiased = ((flat - mean) ** 2).sum(axis=0) / (n - 1)
  out = (x - mean) / np.sqrt(biased + EPS) * p["scale"] + p["bias"]
  return out, (1 - MOMENTUM) * s["mean"] + MOMENTUM * mean, (1 - MOMENTUM) * s["var"] + MOMENTUM * unbiased


def _apply(module, variables, x, train):
  out, state = module.apply(variables, x, train=train, mutable=["batch_stats"])
  stats = state["batch_stats"]["BatchNorm_0"]
  return out, stats["mean"], stats["var"]


def _check(got, expected):
  """(output, running mean, running var) against the reference; outputs are O(1), from float32 inputs
  with a mean of about 3, so their absolute error is float32 rounding of x - mean, about 1e-6."""
  for name, g, e, atol in zip(("output", "running mean", "running var"), got, expected, (1e-5, 1e-6, 1e-6),
                              strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=atol, err_msg=name)


@pytest.mark.parametrize("train", [False, True])
def test_matches_pytorch_rule(train):
  x, variables = _inputs()
  got = _apply(layers.BatchNorm(), *reversed(_to_jax(x, variables)), train=train)
  _check(got, _reference(x, variables, train))


def test_running_var_is_unbiased_not_biased():
  # At n = 2 the two conventions differ by a factor 2 in the batch term: a hand-computed case.
  # One channel, values 1 and 3: mean 2, biased variance 1, unbiased variance 2.
  x = jnp.array([[[[1.0]]], [[[3.0]]]])
  variables = {"params": {"BatchNorm_0": {"scale": jnp.ones(1), "bias": jnp.zeros(1)}},
               "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(1), "var": jnp.ones(1)}}}
  out, mean, var = _apply(layers.BatchNorm(), variables, x, train=True)
  np.testing.assert_allclose(mean, [0.2], rtol=1e-6)
  np.testing.assert_allclose(var, [0.9 * 1.0 + 0.1 * 2.0], rtol=1e-6)
  np.testing.assert_allclose(out.ravel(), [-1 / np.sqrt(1 + EPS), 1 / np.sqrt(1 + EPS)], rtol=1e-6)


def test_init_and_eval_leave_running_statistics():
  x, variables = _inputs()
  x, variables = _to_jax(x, variables)
  fresh = layers.BatchNorm().init(jax.random.key(0), x, train=True)
  np.testing.assert_array_equal(fresh["batch_stats"]["BatchNorm_0"]["mean"], np.zeros(6))
  np.testing.assert_array_equal(fresh["batch_stats"]["BatchNorm_0"]["var"], np.ones(6))
  _, mean, var = _apply(layers.BatchNorm(), variables, x, train=False)
  np.testing.assert_array_equal(mean, variables["batch_stats"]["BatchNorm_0"]["mean"])
  np.testing.assert_array_equal(var, variables["batch_stats"]["BatchNorm_0"]["var"])


def test_one_value_per_channel_in_training_is_an_error():
  x, variables = _to_jax(*_inputs(shape=(1, 1, 1, 3)))
  with pytest.raises(ValueError, match=r"more than one value per channel, got input shape \(1, 1, 1, 3\)"):
    _apply(layers.BatchNorm(), variables, x, train=True)


def test_bfloat16_activations_float32_statistics():
  x, variables = _inputs()
  xj, vj = _to_jax(x, variables)
  out, mean, var = _apply(layers.BatchNorm(dtype=jnp.bfloat16), vj, xj.astype(jnp.bfloat16), train=True)
  assert out.dtype == jnp.bfloat16 and mean.dtype == jnp.float32 and var.dtype == jnp.float32
  expected = _reference(np.asarray(xj.astype(jnp.bfloat16), np.float64), variables, train=True)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected[0], rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(var, expected[2], rtol=1e-5)


def _shard_map_step(variables, x, devices):
  mesh = jax.make_mesh((devices,), ("batch",), devices=jax.devices()[:devices])
  step = functools.partial(_apply, layers.BatchNorm(axis_name="batch"), train=True)
  sharded = jax.shard_map(lambda v, x: step(v, x), mesh=mesh, in_specs=(P(), P("batch")),
                          out_specs=(P("batch"), P(), P()))
  return jax.jit(sharded)(jax.device_put(variables, NamedSharding(mesh, P())),
                          jax.device_put(x, NamedSharding(mesh, P("batch"))))


def test_axis_name_uses_the_global_batch_shard_map():
  # 4 devices x 1 image of 2 x 2 pixels: n = 4 per device, 16 in all; the local n would give
  # 16/15 x 4/3 = 1.42 times too large a batch term in the running variance.
  x, variables = _inputs(shape=(4, 2, 2, 3), seed=1)
  got = _shard_map_step(*reversed(_to_jax(x, variables)), devices=4)
  _check(got, _reference(x, variables, True))


def test_axis_name_uses_the_global_batch_pmap():
  # One value per channel on each device: trainable only because n counts all 4 devices.
  x, variables = _inputs(shape=(4, 1, 1, 3), seed=2)
  xj, vj = _to_jax(x, variables)
  step = jax.pmap(functools.partial(_apply, layers.BatchNorm(axis_name="batch"), train=True),
                  axis_name="batch", in_axes=(None, 0), devices=jax.devices()[:4])
  out, mean, var = step(vj, xj.reshape(4, 1, 1, 1, 3))
  expected = _reference(x, variables, True)
  for device in range(4):
    _check((out.reshape(x.shape), mean[device], var[device]), expected)

"""Tests for nst_jax.models.vgg: shapes, exact parameter counts, BatchNorm modes, dtype, jit.

Reference parameter counts (num_classes=100, 32x32 inputs) are PyTorch's
`sum(p.numel() for p in m.parameters())` of a re-statement of HobbitLong/RepDistiller
`models/vgg.py` with `batch_norm=True` (the `_bn` variants RepDistiller's model zoo registers as
`vgg8` ... `vgg19`: biased 3x3 convolutions, BatchNorm, the configs S / A / B / D / E, a 512 -> 100
classifier), run with PyTorch 2.13; the Flax model reproduced that re-statement's logits and every
tap to <2e-5 (relative) after a weight transfer, in eval and train mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nst_jax.models import vgg

BATCH = 2
EPS = 1e-5

# name: PyTorch parameter count with num_classes=100 (see the module docstring).
PARAM_COUNTS = {
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
}

# The same for every config: widths 64 / 128 / 256 / 512 / 512, pools after blocks 0, 1, 2.
_SHAPES_32 = {
    "stem": (2, 32, 32, 64),
    "stage1": (2, 16, 16, 128),
    "stage2": (2, 8, 8, 256),
    "stage3": (2, 4, 4, 512),
    "stage4": (2, 4, 4, 512),
    "pooled": (2, 512),
}
# 64x64 inputs get RepDistiller's extra pool after block 3.
_SHAPES_64 = {
    "stem": (2, 64, 64, 64),
    "stage1": (2, 32, 32, 128),
    "stage2": (2, 16, 16, 256),
    "stage3": (2, 8, 8, 512),
    "stage4": (2, 4, 4, 512),
    "pooled": (2, 512),
}


def _with_preact(shapes):
  shapes = dict(shapes)
  for i in (1, 2, 3, 4):
    shapes[f"stage{i}_preact"] = shapes[f"stage{i}"]
  return shapes


def _images(seed=0, batch=BATCH):
  return jax.random.normal(jax.random.key(seed), (batch, 32, 32, 3), jnp.float32)


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _random_variables(model, x, seed=0):
  """Variables with the model's structure, drawn in NumPy.

  A real `model.init` compiles every initialiser and takes seconds on CPU; random BatchNorm affines
  and running statistics also make the BatchNorm checks stricter than the fresh (1, 0, 0, 1).
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":  # He fan-out for convolutions, 1/sqrt(fan_in) for dense layers.
      fan = shape[-1] * np.prod(shape[:-2]) if len(shape) == 4 else 2 * shape[0]
      value = rng.normal(0.0, np.sqrt(2.0 / fan), shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.uniform(-0.2, 0.2, shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _batch_norm(x, mean, var, bn_params):
  return (x - mean) / np.sqrt(var + EPS) * bn_params["scale"] + bn_params["bias"]


def _shapes(model, size):
  x = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=False)

  return jax.eval_shape(init_and_apply, x)


def test_registry_names():
  assert sorted(vgg.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  variables, (logits, features) = _shapes(vgg.MODELS[name](num_classes=100), 32)
  assert _num_params(variables["params"]) == PARAM_COUNTS[name]
  assert logits.shape == (2, 100)
  assert {k: v.shape for k, v in features.items()} == _with_preact(_SHAPES_32)


def test_64px_inputs_pool_after_block3():
  variables, (logits, features) = _shapes(vgg.MODELS["vgg8"](num_classes=100), 64)
  assert _num_params(variables["params"]) == PARAM_COUNTS["vgg8"]
  assert logits.shape == (2, 100)
  assert {k: v.shape for k, v in features.items()} == _with_preact(_SHAPES_64)


@pytest.fixture(scope="module")
def vgg8():
  model = vgg.MODELS["vgg8"](num_classes=100)
  x = _images()
  return model, _random_variables(model, x), x


def _stem_parts(variables, state):
  conv = np.asarray(state["intermediates"]["block0"]["conv0"]["__call__"][0], np.float64)
  bn = variables["params"]["block0"]["bn0"]["BatchNorm_0"]
  return conv, bn, variables["batch_stats"]["block0"]["bn0"]["BatchNorm_0"]


def _check_head(features, logits, variables):
  for i in (1, 2, 3, 4):
    preact = np.asarray(features[f"stage{i}_preact"])
    np.testing.assert_array_equal(features[f"stage{i}"], np.maximum(preact, 0))
    assert preact.min() < 0
  np.testing.assert_allclose(features["pooled"], np.asarray(features["stage4"]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  fc = variables["params"]["classifier"]["Dense_0"]
  np.testing.assert_allclose(logits, np.asarray(features["pooled"]) @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-5)


def test_eval_uses_running_stats_and_leaves_them(vgg8):
  model, variables, x = vgg8
  (logits, features), state = model.apply(variables, x, train=False,
                                          mutable=["batch_stats", "intermediates"],
                                          capture_intermediates=True)
  conv, bn, running = _stem_parts(variables, state)
  expected = np.maximum(_batch_norm(conv, running["mean"], running["var"], bn), 0)
  np.testing.assert_allclose(features["stem"], expected, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
  _check_head(features, logits, variables)


def test_train_uses_batch_stats_and_updates_them(vgg8):
  model, variables, x = vgg8
  (logits, features), state = model.apply(variables, x, train=True,
                                          mutable=["batch_stats", "intermediates"],
                                          capture_intermediates=True)
  conv, bn, old = _stem_parts(variables, state)
  mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
  np.testing.assert_allclose(features["stem"], np.maximum(_batch_norm(conv, mean, var, bn), 0),
                             rtol=1e-4, atol=1e-4)
  new = state["batch_stats"]["block0"]["bn0"]["BatchNorm_0"]
  # PyTorch's momentum 0.1; the variance tolerance covers biased vs unbiased batch estimates.
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-3)
  _check_head(features, logits, variables)

  eval_logits, _ = model.apply(variables, x, train=False)
  assert not np.allclose(logits, eval_logits, atol=1e-3)


def test_bfloat16_activations_float32_params(vgg8):
  ref_model, variables, x = vgg8
  model = vgg.MODELS["vgg8"](num_classes=100, dtype=jnp.bfloat16)
  bf16_variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(1), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_variables["params"]))
  logits, features = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert logits.dtype == jnp.bfloat16
  assert all(f.dtype == jnp.bfloat16 for f in features.values())
  ref_logits, _ = ref_model.apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(logits, np.float32), ref_logits, rtol=0.1, atol=0.1)


def test_jit_matches_eager(vgg8):
  model, variables, x = vgg8
  eager = model.apply(variables, x, train=False)
  jitted = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  # XLA fuses differently under jit: equal up to float32 rounding.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4), jitted, eager)


def test_axis_name_syncs_batch_norm_across_devices():
  # Two devices with half the batch each must match one device with the whole batch.
  model = vgg.MODELS["vgg8"](num_classes=10, axis_name="batch")
  single = vgg.MODELS["vgg8"](num_classes=10)
  x = _images(seed=2, batch=4)
  variables = _random_variables(single, x)
  mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2])

  def step(v, x):
    (logits, _), state = model.apply(v, x, train=True, mutable=["batch_stats"])
    return logits, state

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
  logits, state = jax.jit(sharded)(
      jax.device_put(variables, NamedSharding(mesh, P())),
      jax.device_put(x, NamedSharding(mesh, P("batch"))))
  (whole, _), whole_state = single.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(logits, whole, rtol=1e-4, atol=1e-4)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), state,
               whole_state)

"""Tests for nst_jax.models.cifar_resnet: shapes, exact parameter counts, BatchNorm modes, dtype.

Reference parameter counts (num_classes=100, 32x32 inputs) are PyTorch's
`sum(p.numel() for p in m.parameters())` of a re-statement of HobbitLong/RepDistiller
`models/resnet.py` (BasicBlock ResNet, same widths, downsample rule, stem and fc), run with PyTorch
2.13; the Flax model reproduced that re-statement's logits and every tap to <5e-5 (relative) after
a weight transfer, in eval and train mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nst_jax.models import cifar_resnet

BATCH = 2
EPS = 1e-5

# name: PyTorch parameter count with num_classes=100 (see the module docstring).
PARAM_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
}

_PLAIN_SHAPES = {
    "stem": (2, 32, 32, 16),
    "stage1": (2, 32, 32, 16),
    "stage2": (2, 16, 16, 32),
    "stage3": (2, 8, 8, 64),
    "pooled": (2, 64),
}
_X4_SHAPES = {
    "stem": (2, 32, 32, 32),
    "stage1": (2, 32, 32, 64),
    "stage2": (2, 16, 16, 128),
    "stage3": (2, 8, 8, 256),
    "pooled": (2, 256),
}


def _expected_taps(name):
  shapes = dict(_X4_SHAPES if name.endswith("x4") else _PLAIN_SHAPES)
  for i in (1, 2, 3):
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


def test_registry_names():
  assert sorted(cifar_resnet.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  model = cifar_resnet.MODELS[name](num_classes=100)
  x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=False)

  variables, (logits, features) = jax.eval_shape(init_and_apply, x)
  assert _num_params(variables["params"]) == PARAM_COUNTS[name]
  assert logits.shape == (2, 100)
  assert {k: v.shape for k, v in features.items()} == _expected_taps(name)


@pytest.fixture(scope="module")
def resnet8():
  model = cifar_resnet.MODELS["resnet8"](num_classes=100)
  x = _images()
  return model, _random_variables(model, x), x


def test_eval_uses_running_stats_and_leaves_them(resnet8):
  model, variables, x = resnet8
  (logits, features), state = model.apply(variables, x, train=False,
                                          mutable=["batch_stats", "intermediates"],
                                          capture_intermediates=True)
  stem_conv = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
  running = variables["batch_stats"]["bn1"]["BatchNorm_0"]
  bn = variables["params"]["bn1"]["BatchNorm_0"]
  expected = np.maximum(_batch_norm(stem_conv, running["mean"], running["var"], bn), 0)
  np.testing.assert_allclose(features["stem"], expected, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
  _check_head(features, logits, variables)


def test_train_uses_batch_stats_and_updates_them(resnet8):
  model, variables, x = resnet8
  (logits, features), state = model.apply(variables, x, train=True,
                                          mutable=["batch_stats", "intermediates"],
                                          capture_intermediates=True)
  stem_conv = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
  mean, var = stem_conv.mean(axis=(0, 1, 2)), stem_conv.var(axis=(0, 1, 2))
  bn = variables["params"]["bn1"]["BatchNorm_0"]
  np.testing.assert_allclose(features["stem"], np.maximum(_batch_norm(stem_conv, mean, var, bn), 0),
                             rtol=1e-4, atol=1e-4)
  old = variables["batch_stats"]["bn1"]["BatchNorm_0"]
  new = state["batch_stats"]["bn1"]["BatchNorm_0"]
  # PyTorch's momentum 0.1; the variance tolerance covers biased vs unbiased batch estimates.
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-3)
  _check_head(features, logits, variables)

  eval_logits, _ = model.apply(variables, x, train=False)
  assert not np.allclose(logits, eval_logits, atol=1e-3)


def _check_head(features, logits, variables):
  for i in (1, 2, 3):
    preact = np.asarray(features[f"stage{i}_preact"])
    np.testing.assert_array_equal(features[f"stage{i}"], np.maximum(preact, 0))
    assert preact.min() < 0
  np.testing.assert_allclose(features["pooled"], np.asarray(features["stage3"]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  fc = variables["params"]["fc"]["Dense_0"]
  np.testing.assert_allclose(logits, np.asarray(features["pooled"]) @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-5)


def test_bfloat16_activations_float32_params(resnet8):
  _, variables, x = resnet8
  model = cifar_resnet.MODELS["resnet8"](num_classes=100, dtype=jnp.bfloat16)
  bf16_variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(1), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_variables["params"]))
  logits, features = model.apply(variables, x, train=False)
  assert logits.dtype == jnp.bfloat16
  assert all(f.dtype == jnp.bfloat16 for f in features.values())
  ref_logits, _ = resnet8[0].apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(logits, np.float32), ref_logits, rtol=0.1, atol=0.1)


def test_jit_matches_eager(resnet8):
  model, variables, x = resnet8
  eager = model.apply(variables, x, train=False)
  jitted = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  # XLA fuses differently under jit: equal up to float32 rounding.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4), jitted, eager)


def test_axis_name_syncs_batch_norm_across_devices():
  # Two devices with half the batch each must match one device with the whole batch.
  model = cifar_resnet.MODELS["resnet8"](num_classes=10, axis_name="batch")
  single = cifar_resnet.MODELS["resnet8"](num_classes=10)
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

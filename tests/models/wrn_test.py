"""Tests for nst_jax.models.wrn: shapes, exact parameter counts, tap definitions, BatchNorm modes.

Reference parameter counts (num_classes=100, 32x32 inputs) are PyTorch's
`sum(p.numel() for p in m.parameters())` of a re-statement of HobbitLong/RepDistiller
`models/wrn.py` (pre-activation blocks, 1x1 shortcut on the activated input when the width
changes, final BN-ReLU, fc), run with PyTorch 2.13; the Flax model reproduced that re-statement's
logits and every tap (including RepDistiller's `preact=True` features) to <1e-5 (relative) after a
weight transfer, in eval and train mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nst_jax.models import wrn

BATCH = 2
EPS = 1e-5

# name: PyTorch parameter count with num_classes=100 (see the module docstring).
PARAM_COUNTS = {
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
}

# Stage widths by widen factor; spatial sizes 32 / 16 / 8 at 32x32 inputs.
_STAGE_SHAPES = {
    1: {"stage1": (2, 32, 32, 16), "stage2": (2, 16, 16, 32), "stage3": (2, 8, 8, 64)},
    2: {"stage1": (2, 32, 32, 32), "stage2": (2, 16, 16, 64), "stage3": (2, 8, 8, 128)},
}
_POOLED = {1: (2, 64), 2: (2, 128)}

# The BatchNorm that consumes each stage's output (it gives `stage{i}_preact`).
_CONSUMER_BN = {1: "block2_0/bn1", 2: "block3_0/bn1", 3: "bn1"}


def _expected_taps(name):
  k = int(name.split("_")[-1])
  shapes = {"stem": (2, 32, 32, 16), "pooled": _POOLED[k]}
  for tap, shape in _STAGE_SHAPES[k].items():
    shapes[tap] = shapes[f"{tap}_preact"] = shapes[f"{tap}_relu"] = shape
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


def _bn(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree["BatchNorm_0"]


def _batch_norm(x, mean, var, bn_params):
  return (x - mean) / np.sqrt(var + EPS) * bn_params["scale"] + bn_params["bias"]


def test_registry_names():
  assert sorted(wrn.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  model = wrn.MODELS[name](num_classes=100)
  x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=False)

  variables, (logits, features) = jax.eval_shape(init_and_apply, x)
  assert _num_params(variables["params"]) == PARAM_COUNTS[name]
  assert logits.shape == (2, 100)
  assert {k: v.shape for k, v in features.items()} == _expected_taps(name)


@pytest.fixture(scope="module")
def wrn_16_1():
  model = wrn.MODELS["wrn_16_1"](num_classes=100)
  x = _images()
  return model, _random_variables(model, x), x


def _check_relu_and_head(features, logits, variables):
  # The stem is a bare convolution: no activation.
  assert np.asarray(features["stem"]).min() < 0
  for i in (1, 2, 3):
    preact = np.asarray(features[f"stage{i}_preact"])
    assert np.asarray(features[f"stage{i}"]).min() < 0  # a residual sum, not a post-ReLU map
    assert preact.min() < 0
    np.testing.assert_array_equal(features[f"stage{i}_relu"], np.maximum(preact, 0))
  np.testing.assert_allclose(features["pooled"],
                             np.asarray(features["stage3_relu"]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  fc = variables["params"]["fc"]["Dense_0"]
  np.testing.assert_allclose(logits, np.asarray(features["pooled"]) @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-5)


def test_eval_preact_is_consumer_bn_with_running_stats(wrn_16_1):
  model, variables, x = wrn_16_1
  (logits, features), state = model.apply(variables, x, train=False, mutable=["batch_stats"])
  for i, path in _CONSUMER_BN.items():
    running = _bn(variables["batch_stats"], path)
    stage = np.asarray(features[f"stage{i}"], np.float64)
    expected = _batch_norm(stage, running["mean"], running["var"], _bn(variables["params"], path))
    np.testing.assert_allclose(features[f"stage{i}_preact"], expected, rtol=1e-4, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
  _check_relu_and_head(features, logits, variables)


def test_train_preact_uses_batch_stats_and_updates_each_bn_once(wrn_16_1):
  model, variables, x = wrn_16_1
  (logits, features), state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  for i, path in _CONSUMER_BN.items():
    stage = np.asarray(features[f"stage{i}"], np.float64)
    mean, var = stage.mean(axis=(0, 1, 2)), stage.var(axis=(0, 1, 2))
    expected = _batch_norm(stage, mean, var, _bn(variables["params"], path))
    np.testing.assert_allclose(features[f"stage{i}_preact"], expected, rtol=1e-4, atol=1e-4)
    # One momentum-0.1 update (RepDistiller's recomputation would apply two).
    old, new = _bn(variables["batch_stats"], path), _bn(state["batch_stats"], path)
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-3)
  _check_relu_and_head(features, logits, variables)

  eval_logits, _ = model.apply(variables, x, train=False)
  assert not np.allclose(logits, eval_logits, atol=1e-3)


def test_bfloat16_activations_float32_params(wrn_16_1):
  ref_model, variables, x = wrn_16_1
  model = wrn.MODELS["wrn_16_1"](num_classes=100, dtype=jnp.bfloat16)
  bf16_variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(1), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_variables["params"]))
  logits, features = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert logits.dtype == jnp.bfloat16
  assert all(f.dtype == jnp.bfloat16 for f in features.values())
  ref_logits, _ = ref_model.apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(logits, np.float32), ref_logits, rtol=0.1, atol=0.1)


def test_jit_matches_eager(wrn_16_1):
  model, variables, x = wrn_16_1
  eager = model.apply(variables, x, train=False)
  jitted = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  # XLA fuses differently under jit: equal up to float32 rounding.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4), jitted, eager)


def test_axis_name_syncs_batch_norm_across_devices():
  # Two devices with half the batch each must match one device with the whole batch.
  model = wrn.MODELS["wrn_16_1"](num_classes=10, axis_name="batch")
  single = wrn.MODELS["wrn_16_1"](num_classes=10)
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

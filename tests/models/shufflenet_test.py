"""Tests for nst_jax.models.shufflenet: shapes, exact parameter counts, taps, BatchNorm modes, dtype.

Reference parameter counts (num_classes=100, 32x32 inputs) are PyTorch's
`sum(p.numel() for p in m.parameters())` of re-statements of HobbitLong/RepDistiller
`models/ShuffleNetv1.py` (`ShuffleV1`: out_planes 240/480/960, blocks 4/8/4, groups 3) and
`models/ShuffleNetv2.py` (`ShuffleV2`: net_size 1), run with PyTorch 2.13. After a weight transfer the
Flax models reproduced those re-statements' logits and every tap (including the `preact=True` ones) to
<1e-6 (eval) / 3e-5 (train) relative error.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax.models import shufflenet

BATCH = 2
EPS = 1e-5

# name: PyTorch parameter count with num_classes=100 (see the module docstring).
PARAM_COUNTS = {
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}

# Taps at 32x32 input, batch 2 (NHWC).
TAP_SHAPES = {
    "ShuffleV1": {
        "stem": (2, 32, 32, 24),
        "stage1": (2, 16, 16, 240),
        "stage1_preact": (2, 16, 16, 240),
        "stage2": (2, 8, 8, 480),
        "stage2_preact": (2, 8, 8, 480),
        "stage3": (2, 4, 4, 960),
        "stage3_preact": (2, 4, 4, 960),
        "pooled": (2, 960),
    },
    "ShuffleV2": {
        "stem": (2, 32, 32, 24),
        "stage1": (2, 16, 16, 116),
        "stage1_preact": (2, 16, 16, 116),
        "stage2": (2, 8, 8, 232),
        "stage2_preact": (2, 8, 8, 232),
        "stage3": (2, 4, 4, 464),
        "stage3_preact": (2, 4, 4, 464),
        "head": (2, 4, 4, 1024),
        "pooled": (2, 1024),
    },
}

# BatchNorm layers: V1 stem + 16 units x 3; V2 stem + 3 down units x 5 + 13 basic units x 3 + head.
BATCH_NORM_COUNTS = {"ShuffleV1": 49, "ShuffleV2": 56}


def _images(seed=0, batch=BATCH):
  return jax.random.normal(jax.random.key(seed), (batch, 32, 32, 3), jnp.float32)


def _random_variables(model, x, seed=0):
  """Variables with the model's structure drawn in NumPy (a real init compiles for tens of seconds).

  Random BatchNorm affines and running statistics make the BatchNorm checks stricter than (1, 0, 0, 1).
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":  # He fan-out for convolutions, 1/sqrt(fan_in) for the classifier.
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


def _torch_channel_shuffle(x_nhwc, groups):
  """PyTorch's shuffle, literally: NCHW view (N, g, C/g, H, W), swap the two channel axes, flatten."""
  x = np.transpose(np.asarray(x_nhwc), (0, 3, 1, 2))
  n, c, h, w = x.shape
  x = x.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
  return np.transpose(x, (0, 2, 3, 1))


def test_registry_names():
  assert sorted(shufflenet.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  model = shufflenet.MODELS[name](num_classes=100)
  x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=False)

  variables, (logits, features) = jax.eval_shape(init_and_apply, x)
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"])) == PARAM_COUNTS[name]
  assert logits.shape == (2, 100)
  assert {k: v.shape for k, v in features.items()} == TAP_SHAPES[name]


def test_shufflev1_grouped_convs():
  model = shufflenet.MODELS["ShuffleV1"](num_classes=100)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)["params"]

  def kernel(unit, conv):
    return params[unit][conv]["Conv_0"]["kernel"].shape

  # The unit fed by the 24-channel stem has an ungrouped first 1x1 conv; its branch is 240 - 24 wide.
  assert kernel("stage1_unit0", "conv1") == (1, 1, 24, 54)
  assert kernel("stage1_unit0", "conv2") == (3, 3, 1, 54)
  assert kernel("stage1_unit0", "conv3") == (1, 1, 18, 216)
  # Later units: 3 groups in both 1x1 convs (input channels per group in the kernel).
  assert kernel("stage1_unit1", "conv1") == (1, 1, 80, 60)
  assert kernel("stage1_unit1", "conv3") == (1, 1, 20, 240)
  assert kernel("stage2_unit0", "conv1") == (1, 1, 80, 60)
  assert kernel("stage2_unit0", "conv3") == (1, 1, 20, 240)
  assert kernel("stage3_unit3", "conv3") == (1, 1, 80, 960)


@pytest.mark.parametrize("groups", [2, 3])
def test_channel_shuffle_matches_pytorch_order(groups):
  x = np.arange(2 * 3 * 1 * 12, dtype=np.float32).reshape(2, 3, 1, 12)
  np.testing.assert_array_equal(shufflenet.channel_shuffle(jnp.asarray(x), groups),
                                _torch_channel_shuffle(x, groups))
  # Channel k of group g moves to position k * groups + g.
  np.testing.assert_array_equal(shufflenet.channel_shuffle(jnp.arange(6), 2), [0, 3, 1, 4, 2, 5])


@pytest.fixture(scope="module", params=sorted(PARAM_COUNTS))
def run(request):
  model = shufflenet.MODELS[request.param](num_classes=100)
  x = _images()
  variables = _random_variables(model, x)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  eval_out, eval_state = apply(variables, x, train=False, mutable=("batch_stats",))
  train_out, train_state = apply(variables, x, train=True, mutable=("batch_stats",))
  return dict(name=request.param, model=model, variables=variables, x=x, eval=eval_out,
              eval_state=eval_state, train=train_out, train_state=train_state)


def _stem_conv(run):
  kernel = run["variables"]["params"]["stem_conv"]["Conv_0"]["kernel"]
  return np.asarray(run["x"], np.float64) @ np.asarray(kernel[0, 0], np.float64)  # 1x1 conv.


def test_eval_uses_running_stats_and_leaves_them(run):
  logits, features = run["eval"]
  running = run["variables"]["batch_stats"]["stem_bn"]["BatchNorm_0"]
  bn = run["variables"]["params"]["stem_bn"]["BatchNorm_0"]
  expected = np.maximum(_batch_norm(_stem_conv(run), running["mean"], running["var"], bn), 0)
  np.testing.assert_allclose(features["stem"], expected, rtol=1e-4, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, run["eval_state"]["batch_stats"],
               run["variables"]["batch_stats"])
  _check_taps(run["name"], features, logits, run["variables"])


def test_train_uses_batch_stats_and_updates_them(run):
  logits, features = run["train"]
  conv = _stem_conv(run)
  mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
  bn = run["variables"]["params"]["stem_bn"]["BatchNorm_0"]
  np.testing.assert_allclose(features["stem"], np.maximum(_batch_norm(conv, mean, var, bn), 0),
                             rtol=1e-4, atol=1e-4)
  old = run["variables"]["batch_stats"]["stem_bn"]["BatchNorm_0"]
  new = run["train_state"]["batch_stats"]["stem_bn"]["BatchNorm_0"]
  # PyTorch's momentum 0.1; the variance tolerance covers biased vs unbiased batch estimates.
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=2e-3)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), run["train_state"]["batch_stats"],
                         run["variables"]["batch_stats"])
  assert all(jax.tree.leaves(changed))
  _check_taps(run["name"], features, logits, run["variables"])
  assert not np.allclose(logits, run["eval"][0], atol=1e-3)


def _check_taps(name, features, logits, variables):
  for i in (1, 2, 3):
    preact = np.asarray(features[f"stage{i}_preact"])
    assert preact.min() < 0
    if name == "ShuffleV1":
      expected = np.maximum(preact, 0)
    else:  # RepDistiller's V2 preact is taken before the unit's channel shuffle.
      expected = _torch_channel_shuffle(np.maximum(preact, 0), 2)
    np.testing.assert_array_equal(features[f"stage{i}"], expected)
  last = features["stage3"] if name == "ShuffleV1" else features["head"]
  np.testing.assert_allclose(features["pooled"], np.asarray(last).mean(axis=(1, 2)), rtol=1e-5,
                             atol=1e-6)
  fc = variables["params"]["classifier"]["Dense_0"]
  np.testing.assert_allclose(logits, np.asarray(features["pooled"]) @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-4)


def test_bfloat16_activations_float32_params():
  x = _images()
  model = shufflenet.MODELS["ShuffleV1"](num_classes=100, dtype=jnp.bfloat16)
  variables = _random_variables(shufflenet.MODELS["ShuffleV1"](num_classes=100), x)
  bf16_variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(1), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_variables["params"]))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(bf16_variables["batch_stats"]))
  logits, features = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert logits.dtype == jnp.bfloat16
  assert all(f.dtype == jnp.bfloat16 for f in features.values())


@pytest.mark.parametrize("run", ["ShuffleV1"], indirect=True)  # One model is enough here.
def test_jit_matches_eager(run):
  eager = run["model"].apply(run["variables"], run["x"], train=False)
  # XLA fuses differently under jit: equal up to float32 rounding.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4), run["eval"], eager)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_axis_name_reaches_every_batch_norm(name):
  # Recorded from the module calls, so a BatchNorm built without `axis_name` would show up without
  # paying for a cross-device run.
  model = shufflenet.MODELS[name](num_classes=100, axis_name="batch")
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      seen.append(context.module.axis_name)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  assert seen == ["batch"] * BATCH_NORM_COUNTS[name]

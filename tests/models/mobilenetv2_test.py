"""Tests for nst_jax.models.mobilenetv2: shapes, exact parameter count, BatchNorm modes, dtype, jit.

The reference parameter count (num_classes=100, 32x32 inputs) is PyTorch's
`sum(p.numel() for p in m.parameters())` of a re-statement of HobbitLong/RepDistiller
`models/mobilenetv2.py` (`mobile_half` = mobilenetv2_T_w(T=6, W=0.5), registered there as
'MobileNetV2'), run with PyTorch 2.13. After a weight transfer the Flax model reproduced that
re-statement's logits and every tap to <1e-6 (eval) / 5e-5 (train) relative error.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax.models import mobilenetv2

BATCH = 2
EPS = 1e-5

PARAM_COUNT = 812_836  # PyTorch re-statement of RepDistiller's mobile_half, num_classes=100.

# Taps at 32x32 input, batch 2 (NHWC); the stage ends follow RepDistiller's f1..f4 (after inverted
# residual groups 1, 2, 4 and 6 of widths 12, 16, 48, 160 at width multiplier 0.5).
TAP_SHAPES = {
    "stem": (2, 16, 16, 16),
    "stage1": (2, 16, 16, 12),
    "stage1_preact": (2, 16, 16, 12),
    "stage2": (2, 8, 8, 16),
    "stage2_preact": (2, 8, 8, 16),
    "stage3": (2, 4, 4, 48),
    "stage3_preact": (2, 4, 4, 48),
    "stage4": (2, 2, 2, 160),
    "stage4_preact": (2, 2, 2, 160),
    "head": (2, 2, 2, 1280),
    "pooled": (2, 1280),
}


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


def _conv_nhwc(x, kernel, stride, pad):
  """Plain NumPy convolution (HWIO kernel, symmetric zero padding) in float64."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      out = out + x[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :] @ kernel[i, j]
  return out


def _batch_norm(x, mean, var, bn_params):
  return (x - mean) / np.sqrt(var + EPS) * bn_params["scale"] + bn_params["bias"]


def test_registry_names():
  assert sorted(mobilenetv2.MODELS) == ["MobileNetV2"]


def test_shapes_and_param_count():
  model = mobilenetv2.MODELS["MobileNetV2"](num_classes=100)
  x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=False)

  variables, (logits, features) = jax.eval_shape(init_and_apply, x)
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"])) == PARAM_COUNT
  assert logits.shape == (2, 100)
  assert {k: v.shape for k, v in features.items()} == TAP_SHAPES


def test_width_follows_repdistiller_table():
  # Widths 8, 12, 16, 32, 48, 80, 160 per group; group 0 has expansion 1 (but still its 1x1 expand).
  model = mobilenetv2.MODELS["MobileNetV2"](num_classes=100)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)["params"]

  def kernel(block, conv):
    return params[block][conv]["Conv_0"]["kernel"].shape

  assert params["stem_conv"]["Conv_0"]["kernel"].shape == (3, 3, 3, 16)
  assert kernel("group0_block0", "conv_expand") == (1, 1, 16, 16)
  assert kernel("group0_block0", "conv_project") == (1, 1, 16, 8)
  assert kernel("group1_block0", "conv_expand") == (1, 1, 8, 48)
  assert kernel("group1_block0", "conv_depthwise") == (3, 3, 1, 48)
  assert kernel("group6_block0", "conv_project") == (1, 1, 480, 160)
  assert params["head_conv"]["Conv_0"]["kernel"].shape == (1, 1, 160, 1280)
  assert sorted(k for k in params if k.startswith("group")) == sorted(
      f"group{g}_block{j}" for g, n in enumerate((1, 2, 3, 4, 3, 3, 1)) for j in range(n))


@pytest.fixture(scope="module")
def mobilenet():
  model = mobilenetv2.MODELS["MobileNetV2"](num_classes=100)
  x = _images()
  variables = _random_variables(model, x)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  eval_out, eval_state = apply(variables, x, train=False, mutable=("batch_stats",))
  train_out, train_state = apply(variables, x, train=True, mutable=("batch_stats",))
  return dict(model=model, variables=variables, x=x, eval=eval_out, eval_state=eval_state,
              train=train_out, train_state=train_state)


def _stem_conv(run):
  kernel = run["variables"]["params"]["stem_conv"]["Conv_0"]["kernel"]
  return _conv_nhwc(run["x"], kernel, stride=2, pad=1)


def test_eval_uses_running_stats_and_leaves_them(mobilenet):
  run = mobilenet
  logits, features = run["eval"]
  running = run["variables"]["batch_stats"]["stem_bn"]["BatchNorm_0"]
  bn = run["variables"]["params"]["stem_bn"]["BatchNorm_0"]
  expected = np.maximum(_batch_norm(_stem_conv(run), running["mean"], running["var"], bn), 0)
  np.testing.assert_allclose(features["stem"], expected, rtol=1e-4, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, run["eval_state"]["batch_stats"],
               run["variables"]["batch_stats"])
  _check_taps(features, logits, run["variables"])


def test_train_uses_batch_stats_and_updates_them(mobilenet):
  run = mobilenet
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
  # Every BatchNorm's running statistics move in training.
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), run["train_state"]["batch_stats"],
                         run["variables"]["batch_stats"])
  assert all(jax.tree.leaves(changed))
  _check_taps(features, logits, run["variables"])
  assert not np.allclose(logits, run["eval"][0], atol=1e-3)


def _check_taps(features, logits, variables):
  # Linear bottlenecks: the pre-activation taps are the stage outputs themselves, and signed.
  for i in (1, 2, 3, 4):
    np.testing.assert_array_equal(features[f"stage{i}_preact"], features[f"stage{i}"])
    assert np.asarray(features[f"stage{i}"]).min() < 0
  assert np.asarray(features["head"]).min() >= 0
  np.testing.assert_allclose(features["pooled"], np.asarray(features["head"]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  fc = variables["params"]["classifier"]["Dense_0"]
  np.testing.assert_allclose(logits, np.asarray(features["pooled"]) @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-4)


def test_bfloat16_activations_float32_params(mobilenet):
  variables, x = mobilenet["variables"], mobilenet["x"]
  model = mobilenetv2.MODELS["MobileNetV2"](num_classes=100, dtype=jnp.bfloat16)
  bf16_variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(1), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_variables["params"]))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(bf16_variables["batch_stats"]))
  logits, features = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert logits.dtype == jnp.bfloat16
  assert all(f.dtype == jnp.bfloat16 for f in features.values())
  ref_logits = np.asarray(mobilenet["eval"][0])
  np.testing.assert_allclose(np.asarray(logits, np.float32), ref_logits, rtol=0.1,
                             atol=0.1 * np.abs(ref_logits).max())


def test_jit_matches_eager(mobilenet):
  model, variables, x = mobilenet["model"], mobilenet["variables"], mobilenet["x"]
  eager = model.apply(variables, x, train=False)
  # XLA fuses differently under jit: equal up to float32 rounding.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4), mobilenet["eval"],
               eager)


def test_axis_name_reaches_every_batch_norm():
  # 53 BatchNorms: stem, 17 inverted residuals x 3, head. Recorded from the module calls, so a
  # BatchNorm built without `axis_name` would show up without paying for a cross-device run.
  model = mobilenetv2.MODELS["MobileNetV2"](num_classes=100, axis_name="batch")
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      seen.append(context.module.axis_name)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  assert seen == ["batch"] * 53

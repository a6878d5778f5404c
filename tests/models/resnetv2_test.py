"""Tests for nst_jax.models.resnetv2: shapes, exact parameter count, blocks, BatchNorm modes, dtype.

The reference parameter count (num_classes=100, 32x32 inputs) is PyTorch's
`sum(p.numel() for p in m.parameters())` of a re-statement of HobbitLong/RepDistiller
`models/resnetv2.py` (`ResNet50` = ResNet(Bottleneck, [3, 4, 6, 3])), run with PyTorch 2.13. After a
weight transfer the Flax model reproduced that re-statement's logits and every tap (including the
`preact=True` ones) to <1e-6 (eval) / 6e-5 (train) relative error.

ResNet-50 itself is only traced (jax.eval_shape) to keep this file fast; the numerical checks run the
same `ResNet` class with one block per stage and width 4.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nst_jax.models import resnetv2

BATCH = 2
EPS = 1e-5

PARAM_COUNT = 23_705_252  # PyTorch re-statement of RepDistiller's ResNet50, num_classes=100.

# ResNet-50 taps at 32x32 input, batch 2 (NHWC).
TAP_SHAPES = {
    "stem": (2, 32, 32, 64),
    "stage1": (2, 32, 32, 256),
    "stage1_preact": (2, 32, 32, 256),
    "stage2": (2, 16, 16, 512),
    "stage2_preact": (2, 16, 16, 512),
    "stage3": (2, 8, 8, 1024),
    "stage3_preact": (2, 8, 8, 1024),
    "stage4": (2, 4, 4, 2048),
    "stage4_preact": (2, 4, 4, 2048),
    "pooled": (2, 2048),
}

# The small test network: one bottleneck per stage, stage widths 4 / 8 / 16 / 32 (outputs x4).
TINY_TAP_SHAPES = {
    "stem": (2, 32, 32, 4),
    "stage1": (2, 32, 32, 16),
    "stage1_preact": (2, 32, 32, 16),
    "stage2": (2, 16, 16, 32),
    "stage2_preact": (2, 16, 16, 32),
    "stage3": (2, 8, 8, 64),
    "stage3_preact": (2, 8, 8, 64),
    "stage4": (2, 4, 4, 128),
    "stage4_preact": (2, 4, 4, 128),
    "pooled": (2, 128),
}


def _tiny(**kwargs):
  return resnetv2.ResNet(num_classes=10, stage_sizes=(1, 1, 1, 1), width=4, **kwargs)


def _images(seed=0, batch=BATCH, size=32, channels=3):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels), jnp.float32)


def _random_variables(model, *args, seed=0, **kwargs):
  """Variables with the model's structure drawn in NumPy (a real init compiles for tens of seconds).

  Random BatchNorm affines and running statistics make the BatchNorm checks stricter than (1, 0, 0, 1).
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False, **kwargs), jax.random.key(0),
                          *args)
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


def _conv_nhwc(x, kernel, stride=1):
  """Plain NumPy convolution (HWIO kernel, "same" zero padding for odd kernels) in float64."""
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  pad = kh // 2
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
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
  assert sorted(resnetv2.MODELS) == ["ResNet50"]


def test_shapes_and_param_count():
  model = resnetv2.MODELS["ResNet50"](num_classes=100)
  x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=False)

  variables, (logits, features) = jax.eval_shape(init_and_apply, x)
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"])) == PARAM_COUNT
  assert logits.shape == (2, 100)
  assert {k: v.shape for k, v in features.items()} == TAP_SHAPES

  params = variables["params"]
  assert sorted(k for k in params if k.startswith("stage")) == sorted(
      f"stage{i + 1}_block{j}" for i, n in enumerate((3, 4, 6, 3)) for j in range(n))
  # Projection shortcuts exactly where RepDistiller has them: every stage's first block (stage 1's
  # too, 64 -> 256 channels at stride 1), nowhere else.
  with_shortcut = sorted(k for k in params if "shortcut_conv" in params.get(k, {}))
  assert with_shortcut == ["stage1_block0", "stage2_block0", "stage3_block0", "stage4_block0"]
  assert params["stem_conv"]["Conv_0"]["kernel"].shape == (3, 3, 3, 64)
  assert params["stage1_block0"]["shortcut_conv"]["Conv_0"]["kernel"].shape == (1, 1, 64, 256)
  assert params["stage3_block0"]["conv2"]["Conv_0"]["kernel"].shape == (3, 3, 256, 256)
  assert params["classifier"]["Dense_0"]["kernel"].shape == (2048, 100)


def test_bottleneck_matches_numpy():
  # A strided block with projection shortcut: 1x1 - BN - ReLU - 3x3/2 - BN - ReLU - 1x1 - BN, plus
  # 1x1/2 conv - BN; the stride sits on the 3x3 conv.
  block = resnetv2.Bottleneck(width=4, strides=2)
  x = _images(seed=3, size=8, channels=8)
  variables = _random_variables(block, x)
  out, preact = block.apply(variables, x, train=False)
  p, s = variables["params"], variables["batch_stats"]

  def conv_bn(name, y, stride=1):
    y = _conv_nhwc(y, p[f"conv{name}" if name.isdigit() else f"{name}_conv"]["Conv_0"]["kernel"],
                   stride)
    bn = f"bn{name}" if name.isdigit() else f"{name}_bn"
    stats = s[bn]["BatchNorm_0"]
    return _batch_norm(y, stats["mean"], stats["var"], p[bn]["BatchNorm_0"])

  y = np.maximum(conv_bn("1", x), 0)
  y = np.maximum(conv_bn("2", y, stride=2), 0)
  expected = conv_bn("3", y) + conv_bn("shortcut", x, stride=2)
  np.testing.assert_allclose(preact, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out, np.maximum(preact, 0))
  assert out.shape == (2, 4, 4, 16)


def test_identity_shortcut_when_shape_is_kept():
  block = resnetv2.Bottleneck(width=4, strides=1)
  x = _images(seed=4, size=4, channels=16)
  variables = _random_variables(block, x)
  assert sorted(variables["params"]) == ["bn1", "bn2", "bn3", "conv1", "conv2", "conv3"]
  zero_branch = jax.tree.map(np.array, variables)
  zero_branch["params"]["bn3"]["BatchNorm_0"]["scale"][:] = 0.0
  zero_branch["params"]["bn3"]["BatchNorm_0"]["bias"][:] = 0.0
  _, preact = block.apply(zero_branch, x, train=False)
  np.testing.assert_allclose(preact, x, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  model = _tiny()
  x = _images()
  variables = _random_variables(model, x)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  eval_out, eval_state = apply(variables, x, train=False, mutable=("batch_stats",))
  train_out, train_state = apply(variables, x, train=True, mutable=("batch_stats",))
  return dict(model=model, variables=variables, x=x, eval=eval_out, eval_state=eval_state,
              train=train_out, train_state=train_state)


def _stem_conv(run):
  return _conv_nhwc(run["x"], run["variables"]["params"]["stem_conv"]["Conv_0"]["kernel"])


def test_tiny_shapes(tiny):
  logits, features = tiny["eval"]
  assert logits.shape == (2, 10)
  assert {k: v.shape for k, v in features.items()} == TINY_TAP_SHAPES


def test_eval_uses_running_stats_and_leaves_them(tiny):
  logits, features = tiny["eval"]
  running = tiny["variables"]["batch_stats"]["stem_bn"]["BatchNorm_0"]
  bn = tiny["variables"]["params"]["stem_bn"]["BatchNorm_0"]
  expected = np.maximum(_batch_norm(_stem_conv(tiny), running["mean"], running["var"], bn), 0)
  np.testing.assert_allclose(features["stem"], expected, rtol=1e-4, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, tiny["eval_state"]["batch_stats"],
               tiny["variables"]["batch_stats"])
  _check_taps(features, logits, tiny["variables"])


def test_train_uses_batch_stats_and_updates_them(tiny):
  logits, features = tiny["train"]
  conv = _stem_conv(tiny)
  mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
  bn = tiny["variables"]["params"]["stem_bn"]["BatchNorm_0"]
  np.testing.assert_allclose(features["stem"], np.maximum(_batch_norm(conv, mean, var, bn), 0),
                             rtol=1e-4, atol=1e-4)
  old = tiny["variables"]["batch_stats"]["stem_bn"]["BatchNorm_0"]
  new = tiny["train_state"]["batch_stats"]["stem_bn"]["BatchNorm_0"]
  # PyTorch's momentum 0.1; the variance tolerance covers biased vs unbiased batch estimates.
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=2e-3)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), tiny["train_state"]["batch_stats"],
                         tiny["variables"]["batch_stats"])
  assert all(jax.tree.leaves(changed))
  _check_taps(features, logits, tiny["variables"])
  assert not np.allclose(logits, tiny["eval"][0], atol=1e-3)


def _check_taps(features, logits, variables):
  for i in (1, 2, 3, 4):
    preact = np.asarray(features[f"stage{i}_preact"])
    np.testing.assert_array_equal(features[f"stage{i}"], np.maximum(preact, 0))
    assert preact.min() < 0
  np.testing.assert_allclose(features["pooled"], np.asarray(features["stage4"]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  fc = variables["params"]["classifier"]["Dense_0"]
  np.testing.assert_allclose(logits, np.asarray(features["pooled"]) @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-4)


def test_bfloat16_activations_float32_params(tiny):
  model = _tiny(dtype=jnp.bfloat16)
  x = tiny["x"]
  bf16_variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(1), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16_variables["params"]))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(bf16_variables["batch_stats"]))
  logits, features = jax.jit(functools.partial(model.apply, train=False))(tiny["variables"], x)
  assert logits.dtype == jnp.bfloat16
  assert all(f.dtype == jnp.bfloat16 for f in features.values())
  ref = np.asarray(tiny["eval"][0])
  np.testing.assert_allclose(np.asarray(logits, np.float32), ref, rtol=0.1,
                             atol=0.1 * np.abs(ref).max())


def test_jit_matches_eager(tiny):
  eager = tiny["model"].apply(tiny["variables"], tiny["x"], train=False)
  # XLA fuses differently under jit: equal up to float32 rounding.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4), tiny["eval"],
               eager)


def test_axis_name_reaches_every_batch_norm():
  # ResNet-50 has 53 BatchNorms: stem, 16 blocks x 3, 4 projection shortcuts. Recorded from the
  # module calls, so a BatchNorm built without `axis_name` would show up without running anything.
  model = resnetv2.MODELS["ResNet50"](num_classes=100, axis_name="batch")
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      seen.append(context.module.axis_name)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  assert seen == ["batch"] * 53


def test_axis_name_syncs_batch_norm_across_devices():
  # Two devices with half the batch each must match one device with the whole batch.
  model = _tiny(axis_name="batch")
  single = _tiny()
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
  (whole, _), whole_state = jax.jit(functools.partial(single.apply, train=True,
                                                      mutable=["batch_stats"]))(variables, x)
  np.testing.assert_allclose(logits, whole, rtol=1e-4, atol=1e-4)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), state,
               whole_state)

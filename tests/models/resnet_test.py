"""Tests for nst_jax.models.resnet: shapes, exact parameter counts, BatchNorm modes, dtype, jit.

The 224 px ImageNet models are only traced (jax.eval_shape); real forward passes use resnet18 on
32 x 32 inputs, where the network is just as well defined (stage 4 is 1 x 1). Outside this suite,
resnet18 and resnet50 reproduced a PyTorch re-statement's logits and every tap after a weight transfer
(64 px, random BN statistics): relative error < 1e-6 in eval mode, < 3e-4 in train mode (batch 2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax.models import resnet

EPS = 1e-5

# torchvision's published model table (`num_params`, 1000 classes); a minimal PyTorch re-statement of
# torchvision's ResNet / BasicBlock / Bottleneck counted the same with PyTorch 2.13.
PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
}

_BASIC_SHAPES = {
    "stem": (2, 112, 112, 64),
    "stage1": (2, 56, 56, 64),
    "stage2": (2, 28, 28, 128),
    "stage3": (2, 14, 14, 256),
    "stage4": (2, 7, 7, 512),
    "pooled": (2, 512),
}
_BOTTLENECK_SHAPES = {
    "stem": (2, 112, 112, 64),
    "stage1": (2, 56, 56, 256),
    "stage2": (2, 28, 28, 512),
    "stage3": (2, 14, 14, 1024),
    "stage4": (2, 7, 7, 2048),
    "pooled": (2, 2048),
}


def _expected_taps(name):
  shapes = dict(_BASIC_SHAPES if name in ("resnet18", "resnet34") else _BOTTLENECK_SHAPES)
  for i in (1, 2, 3, 4):
    shapes[f"stage{i}_preact"] = shapes[f"stage{i}"]
  return shapes


def _variables(model, x, seed=0):
  """Init-equivalent variables without running `init` (its RNG compiles slowly on CPU).

  BatchNorm scale 1 / bias 0 and running mean 0 / var 1 as after `init`; He-normal kernels.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    kind = path[-1].key
    if kind in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    if kind in ("bias", "mean"):
      return np.zeros(leaf.shape, np.float32)
    fan_out = leaf.shape[-1] * int(np.prod(leaf.shape[-4:-2])) if leaf.ndim >= 4 else leaf.shape[-1]
    return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_out)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _batch_norm(x, mean, var):
  return (x - mean) / np.sqrt(var + EPS)


def test_registry_names():
  assert sorted(resnet.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  model = resnet.MODELS[name](num_classes=1000)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=False)

  variables, (logits, features) = jax.eval_shape(init_and_apply, x)
  assert _num_params(variables["params"]) == PARAM_COUNTS[name]
  assert logits.shape == (2, 1000)
  assert {k: v.shape for k, v in features.items()} == _expected_taps(name)


@pytest.fixture(scope="module")
def resnet18():
  model = resnet.MODELS["resnet18"](num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3), jnp.float32)
  variables = _variables(model, x)
  return model, variables, x


@functools.cache
def _apply_fn(model, train):
  def apply(variables, x):
    return model.apply(variables, x, train=train, mutable=["batch_stats", "intermediates"],
                       capture_intermediates=lambda mdl, _: mdl.name == "conv1")
  return jax.jit(apply)


def test_small_forward_shapes(resnet18):
  model, variables, x = resnet18
  (logits, features), _ = _apply_fn(model, False)(variables, x)
  assert logits.shape == (2, 10)
  assert {k: v.shape for k, v in features.items()} == {
      "stem": (2, 16, 16, 64),
      "stage1": (2, 8, 8, 64), "stage1_preact": (2, 8, 8, 64),
      "stage2": (2, 4, 4, 128), "stage2_preact": (2, 4, 4, 128),
      "stage3": (2, 2, 2, 256), "stage3_preact": (2, 2, 2, 256),
      "stage4": (2, 1, 1, 512), "stage4_preact": (2, 1, 1, 512),
      "pooled": (2, 512),
  }


def test_eval_uses_running_stats_and_leaves_them(resnet18):
  model, variables, x = resnet18
  (logits, features), state = _apply_fn(model, False)(variables, x)
  stem_conv = np.asarray(state["intermediates"]["conv1"]["__call__"][0])
  # Fresh running statistics (mean 0, var 1), BN scale 1 and bias 0.
  np.testing.assert_allclose(features["stem"], np.maximum(_batch_norm(stem_conv, 0.0, 1.0), 0),
                             rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
  _check_head(features, logits, variables)


def test_train_uses_batch_stats_and_updates_them(resnet18):
  model, variables, x = resnet18
  (logits, features), state = _apply_fn(model, True)(variables, x)
  stem_conv = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
  mean, var = stem_conv.mean(axis=(0, 1, 2)), stem_conv.var(axis=(0, 1, 2))
  np.testing.assert_allclose(features["stem"], np.maximum(_batch_norm(stem_conv, mean, var), 0),
                             rtol=1e-4, atol=1e-4)
  stats = state["batch_stats"]["bn1"]["BatchNorm_0"]
  # PyTorch momentum 0.1 from (0, 1); the variance tolerance covers biased vs unbiased estimates.
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-3)
  _check_head(features, logits, variables)

  (eval_logits, _), _ = _apply_fn(model, False)(variables, x)
  assert not np.allclose(logits, eval_logits, atol=1e-3)


def _check_head(features, logits, variables):
  for i in (1, 2, 3, 4):
    np.testing.assert_array_equal(features[f"stage{i}"], np.maximum(features[f"stage{i}_preact"], 0))
    assert np.asarray(features[f"stage{i}_preact"]).min() < 0
  np.testing.assert_allclose(features["pooled"], np.asarray(features["stage4"]).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  fc = variables["params"]["fc"]["Dense_0"]
  np.testing.assert_allclose(logits, np.asarray(features["pooled"]) @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-5)


def test_bfloat16_activations_float32_params():
  model = resnet.MODELS["resnet50"](num_classes=1000, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=True, mutable=["batch_stats"])

  variables, ((logits, features), state) = jax.eval_shape(init_and_apply, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state["batch_stats"]))
  assert logits.dtype == jnp.bfloat16
  assert all(f.dtype == jnp.bfloat16 for f in features.values())


def test_jit_matches_eager(resnet18):
  model, variables, x = resnet18
  jitted, _ = _apply_fn(model, False)(variables, x)
  eager = model.apply(variables, x, train=False)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), jitted, eager)

"""Tests for nst_jax.models.inception_bn: shapes, exact parameter counts, BatchNorm modes, dtype, jit.

Reference parameter counts are `sum(p.numel() for p in m.parameters() if p.requires_grad)` of a minimal
PyTorch re-statement of TuSimple/neuron-selectivity-transfer `symbol/inception_bn.py` (biased
convolutions, MXNet's default; `bn_data` with its scale frozen; PyTorch 2.13). Without `bn_data` it
counts 11,295,240 at 1000 classes, osmr/imgclsmob's published BN-Inception count. The 224 px model is
only traced; real forward passes use `inception_bn_cifar` at 32 px. Outside this suite, both models
(inception_bn at 97 px, exercising the round-down pools) reproduced that PyTorch re-statement's logits
and every tap after a weight transfer: relative error < 2e-6 in eval mode, < 2e-4 in train mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax.models import inception_bn
from tests.models import model_testing

# (name, num_classes): (input size, PyTorch parameter count); see the module docstring.
PARAM_COUNTS = {
    ("inception_bn", 1000): (224, 11_295_243),
    ("inception_bn_cifar", 10): (32, 10_272_810),
    ("inception_bn_cifar", 100): (32, 10_365_060),
}

# Block output channels, from the official symbol's branch widths.
_CHANNELS = {"3a": 256, "3b": 320, "3c": 576, "4a": 576, "4b": 576, "4c": 608, "4d": 608,
             "4e": 1056, "5a": 1024, "5b": 1024}
# Block resolution: ImageNet 224 px (MXNet pools round down: 112 -> 55 -> 27) and CIFAR 32 px.
_SIZE = {"inception_bn": {"3": 27, "4": 14, "5": 7}, "inception_bn_cifar": {"3": 32, "4": 16, "5": 8}}


def _expected_taps(name):
  size = _SIZE[name]
  shapes = {"stem": (2, 55, 55, 192) if name == "inception_bn" else (2, 32, 32, 192),
            "pooled": (2, 1024)}
  for block, channels in _CHANNELS.items():
    # 3c and 4e downsample: 3c's output is at the 4x resolution, 4e's at the 5x one.
    res = {"3c": size["4"], "4e": size["5"]}.get(block, size[block[0]])
    shapes[f"in{block}"] = shapes[f"in{block}_relu"] = (2, res, res, channels)
  for stage, block in enumerate(("3b", "4d", "5b"), start=1):
    shapes[f"stage{stage}"] = shapes[f"stage{stage}_preact"] = shapes[f"in{block}"]
  return shapes


def test_expected_taps_are_the_documented_sizes():
  # Spot-check the table above against the architecture's headline numbers.
  assert _expected_taps("inception_bn")["in5b"] == (2, 7, 7, 1024)
  assert _expected_taps("inception_bn_cifar")["stage1"] == (2, 32, 32, 320)
  assert _expected_taps("inception_bn_cifar")["in4e"] == (2, 8, 8, 1056)


def _max_pool_3x3_s2_p1(x):
  """NumPy max pool, 3x3 window, stride 2, padding 1 that never wins."""
  x = np.pad(np.asarray(x, np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  windows = [x[:, i:i + 2 * out_h:2, j:j + 2 * out_w:2] for i in range(3) for j in range(3)]
  return np.max(windows, axis=0)


def test_registry_names():
  assert sorted(inception_bn.MODELS) == ["inception_bn", "inception_bn_cifar"]


@pytest.mark.parametrize("name,num_classes", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name, num_classes):
  size, count = PARAM_COUNTS[name, num_classes]
  model = inception_bn.MODELS[name](num_classes=num_classes)
  variables = model_testing.check_trace(model, count, (2, num_classes), _expected_taps(name), size=size)
  params = variables["params"]
  # The official symbol keeps MXNet's default conv bias; bn_data (fix_gamma=True) has no scale.
  assert params["in5b"]["proj"]["conv"]["Conv_0"]["bias"].shape == (128,)
  if name == "inception_bn":
    assert jax.tree.map(jnp.shape, params["bn_data"]) == {"BatchNorm_0": {"bias": (3,)}}
  else:
    assert "bn_data" not in params


_STEM_CONV = ("conv_2", "conv")


@pytest.fixture(scope="module")
def cifar_model():
  # Init-like variables (fresh BatchNorm statistics); jitted, capturing the stem convolution's output.
  model = inception_bn.MODELS["inception_bn_cifar"](num_classes=10)
  x = model_testing.images()
  variables = model_testing.numpy_variables(model, x, init_like=True)
  return model_testing.run_eval_and_train(model, x, variables, capture=_STEM_CONV)


def test_eval_uses_running_stats_and_leaves_them(cifar_model):
  # Fresh running statistics (mean 0, var 1), BN scale 1 and bias 0.
  logits, features = model_testing.check_stem_batch_norm(cifar_model, False, "conv_2/bn", tol=1e-5)
  assert model_testing.tap_shapes(features) == _expected_taps("inception_bn_cifar")
  _check_taps(features, logits, cifar_model["variables"])


def test_train_uses_batch_stats_and_updates_them(cifar_model):
  # Momentum 0.1 from the fresh (0, 1).
  logits, features = model_testing.check_stem_batch_norm(cifar_model, True, "conv_2/bn")
  _check_taps(features, logits, cifar_model["variables"])


def _check_taps(features, logits, variables):
  for block in _CHANNELS:
    model_testing.check_relu(features, f"in{block}", f"in{block}_relu")
  for stage, block in enumerate(("3b", "4d", "5b"), start=1):
    np.testing.assert_array_equal(features[f"stage{stage}"], features[f"in{block}_relu"])
    np.testing.assert_array_equal(features[f"stage{stage}_preact"], features[f"in{block}"])
  # Reduction blocks end with the raw 3x3/2 max pool of their (rectified) input.
  np.testing.assert_array_equal(features["in3c"][..., -320:],
                                _max_pool_3x3_s2_p1(features["in3b_relu"]))
  np.testing.assert_array_equal(features["in4e"][..., -608:],
                                _max_pool_3x3_s2_p1(features["in4d_relu"]))
  model_testing.check_head(features, logits, variables, last="in5b_relu", fc="fc1")


def test_bfloat16_activations_float32_params():
  model = inception_bn.MODELS["inception_bn"](num_classes=1000, dtype=jnp.bfloat16)
  model_testing.check_bfloat16_traced(model, 224)


def test_jit_matches_eager(cifar_model):
  model_testing.check_jit_matches_eager(cifar_model, tol=1e-5)

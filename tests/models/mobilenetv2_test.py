"""Tests for nst_jax.models.mobilenetv2: shapes, exact parameter count, BatchNorm modes, dtype, jit.

The reference parameter count (num_classes=100, 32x32 inputs) is PyTorch's
`sum(p.numel() for p in m.parameters())` of a re-statement of HobbitLong/RepDistiller
`models/mobilenetv2.py` (`mobile_half` = mobilenetv2_T_w(T=6, W=0.5), registered there as
'MobileNetV2'), run with PyTorch 2.13. After a weight transfer the Flax model reproduced that
re-statement's logits and every tap to <1e-6 (eval) / 5e-5 (train) relative error.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax.models import mobilenetv2
from tests.models import model_testing

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


def test_registry_names():
  assert sorted(mobilenetv2.MODELS) == ["MobileNetV2"]


def test_shapes_and_param_count():
  model = mobilenetv2.MODELS["MobileNetV2"](num_classes=100)
  model_testing.check_trace(model, PARAM_COUNT, (2, 100), TAP_SHAPES)


def test_width_follows_repdistiller_table():
  # Widths 8, 12, 16, 32, 48, 80, 160 per group; group 0 has expansion 1 (but still its 1x1 expand).
  model = mobilenetv2.MODELS["MobileNetV2"](num_classes=100)
  params = model_testing.init_shapes(model, model_testing.image_spec(batch=1))["params"]

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
  x = model_testing.images()
  return model_testing.run_eval_and_train(model, x, model_testing.numpy_variables(model, x))


def _stem_conv(run):
  kernel = run["variables"]["params"]["stem_conv"]["Conv_0"]["kernel"]
  return model_testing.conv_nhwc(run["x"], kernel, stride=2)


def test_eval_uses_running_stats_and_leaves_them(mobilenet):
  logits, features = model_testing.check_stem_batch_norm(mobilenet, False, "stem_bn", _stem_conv(mobilenet))
  _check_taps(features, logits, mobilenet["variables"])


def test_train_uses_batch_stats_and_updates_them(mobilenet):
  # Every BatchNorm's running statistics move in training.
  logits, features = model_testing.check_stem_batch_norm(mobilenet, True, "stem_bn", _stem_conv(mobilenet),
                                                         every_bn_moves=True)
  _check_taps(features, logits, mobilenet["variables"])


def _check_taps(features, logits, variables):
  # Linear bottlenecks: the pre-activation taps are the stage outputs themselves, and signed.
  for i in (1, 2, 3, 4):
    np.testing.assert_array_equal(features[f"stage{i}_preact"], features[f"stage{i}"])
    assert np.asarray(features[f"stage{i}"]).min() < 0
  assert np.asarray(features["head"]).min() >= 0
  model_testing.check_head(features, logits, variables, last="head", fc="classifier", atol=1e-4)


def test_bfloat16_activations_float32_params(mobilenet):
  model = mobilenetv2.MODELS["MobileNetV2"](num_classes=100, dtype=jnp.bfloat16)
  model_testing.check_bfloat16(model, mobilenet, ref_atol=0.1 * np.abs(mobilenet["eval"][0]).max())


def test_jit_matches_eager(mobilenet):
  model_testing.check_jit_matches_eager(mobilenet)


def test_axis_name_reaches_every_batch_norm():
  # 53 BatchNorms: stem, 17 inverted residuals x 3, head.
  model_testing.check_axis_name_reaches_every_batch_norm(
      mobilenetv2.MODELS["MobileNetV2"](num_classes=100, axis_name="batch"), 53)

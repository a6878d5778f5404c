"""Tests for nst_jax.models.resnetv2: shapes, exact parameter count, blocks, BatchNorm modes, dtype.

The reference parameter count (num_classes=100, 32x32 inputs) is PyTorch's
`sum(p.numel() for p in m.parameters())` of a re-statement of HobbitLong/RepDistiller
`models/resnetv2.py` (`ResNet50` = ResNet(Bottleneck, [3, 4, 6, 3])), run with PyTorch 2.13. After a
weight transfer the Flax model reproduced that re-statement's logits and every tap (including the
`preact=True` ones) to <1e-6 (eval) / 6e-5 (train) relative error.

ResNet-50 itself is only traced (jax.eval_shape) to keep this file fast; the numerical checks run the
same `residual.ResNet` body with one bottleneck per stage and width 4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax.models import residual, resnetv2
from tests.models import model_testing

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
  return residual.ResNet(block=residual.Bottleneck, stage_sizes=(1, 1, 1, 1), stage_features=(4, 8, 16, 32),
                         stem_features=4, num_classes=10, **kwargs)


def test_registry_names():
  assert sorted(resnetv2.MODELS) == ["ResNet50"]


def test_shapes_and_param_count():
  model = resnetv2.MODELS["ResNet50"](num_classes=100)
  variables = model_testing.check_trace(model, PARAM_COUNT, (2, 100), TAP_SHAPES)
  params = variables["params"]
  assert sorted(k for k in params if k.startswith("layer")) == sorted(
      f"layer{i + 1}_{j}" for i, n in enumerate((3, 4, 6, 3)) for j in range(n))
  # Projection shortcuts exactly where RepDistiller has them: every stage's first block (stage 1's
  # too, 64 -> 256 channels at stride 1), nowhere else.
  with_shortcut = sorted(k for k in params if "downsample_conv" in params.get(k, {}))
  assert with_shortcut == ["layer1_0", "layer2_0", "layer3_0", "layer4_0"]
  assert params["conv1"]["Conv_0"]["kernel"].shape == (3, 3, 3, 64)
  assert params["layer1_0"]["downsample_conv"]["Conv_0"]["kernel"].shape == (1, 1, 64, 256)
  assert params["layer3_0"]["conv2"]["Conv_0"]["kernel"].shape == (3, 3, 256, 256)
  assert params["fc"]["Dense_0"]["kernel"].shape == (2048, 100)


def test_bottleneck_matches_numpy():
  # A strided block with projection shortcut: 1x1 - BN - ReLU - 3x3/2 - BN - ReLU - 1x1 - BN, plus
  # 1x1/2 conv - BN; the stride sits on the 3x3 conv.
  block = residual.Bottleneck(features=4, strides=2)
  x = model_testing.images(seed=3, size=8, channels=8)
  variables = model_testing.numpy_variables(block, x)
  out, preact = block.apply(variables, x, train=False)
  p, s = variables["params"], variables["batch_stats"]

  def conv_bn(name, y, stride=1):
    conv = f"conv{name}" if name.isdigit() else f"{name}_conv"
    y = model_testing.conv_nhwc(y, p[conv]["Conv_0"]["kernel"], stride)
    bn = f"bn{name}" if name.isdigit() else f"{name}_bn"
    stats = s[bn]["BatchNorm_0"]
    return model_testing.batch_norm(y, stats["mean"], stats["var"], p[bn]["BatchNorm_0"])

  y = np.maximum(conv_bn("1", x), 0)
  y = np.maximum(conv_bn("2", y, stride=2), 0)
  expected = conv_bn("3", y) + conv_bn("downsample", x, stride=2)
  np.testing.assert_allclose(preact, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out, np.maximum(preact, 0))
  assert out.shape == (2, 4, 4, 16)


def test_identity_shortcut_when_shape_is_kept():
  block = residual.Bottleneck(features=4, strides=1)
  x = model_testing.images(seed=4, size=4, channels=16)
  variables = model_testing.numpy_variables(block, x)
  assert sorted(variables["params"]) == ["bn1", "bn2", "bn3", "conv1", "conv2", "conv3"]
  zero_branch = jax.tree.map(np.array, variables)
  zero_branch["params"]["bn3"]["BatchNorm_0"]["scale"][:] = 0.0
  zero_branch["params"]["bn3"]["BatchNorm_0"]["bias"][:] = 0.0
  _, preact = block.apply(zero_branch, x, train=False)
  np.testing.assert_allclose(preact, x, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  model = _tiny()
  x = model_testing.images()
  return model_testing.run_eval_and_train(model, x, model_testing.numpy_variables(model, x))


def _stem_conv(run):
  return model_testing.conv_nhwc(run["x"], run["variables"]["params"]["conv1"]["Conv_0"]["kernel"])


def test_tiny_shapes(tiny):
  logits, features = tiny["eval"]
  assert logits.shape == (2, 10)
  assert model_testing.tap_shapes(features) == TINY_TAP_SHAPES


def test_eval_uses_running_stats_and_leaves_them(tiny):
  logits, features = model_testing.check_stem_batch_norm(tiny, False, "bn1", _stem_conv(tiny))
  _check_taps(features, logits, tiny["variables"])


def test_train_uses_batch_stats_and_updates_them(tiny):
  logits, features = model_testing.check_stem_batch_norm(tiny, True, "bn1", _stem_conv(tiny),
                                                         every_bn_moves=True)
  _check_taps(features, logits, tiny["variables"])


def _check_taps(features, logits, variables):
  for i in (1, 2, 3, 4):
    model_testing.check_relu(features, f"stage{i}_preact", f"stage{i}")
  model_testing.check_head(features, logits, variables, last="stage4", fc="fc", atol=1e-4)


def test_bfloat16_activations_float32_params(tiny):
  model_testing.check_bfloat16(_tiny(dtype=jnp.bfloat16), tiny, ref_atol=0.1 * np.abs(tiny["eval"][0]).max())


def test_jit_matches_eager(tiny):
  model_testing.check_jit_matches_eager(tiny)


def test_axis_name_reaches_every_batch_norm():
  # ResNet-50 has 53 BatchNorms: stem, 16 blocks x 3, 4 projection shortcuts.
  model = resnetv2.MODELS["ResNet50"](num_classes=100, axis_name="batch")
  model_testing.check_axis_name_reaches_every_batch_norm(model, 53)


def test_axis_name_syncs_batch_norm_across_devices():
  single = _tiny()
  x = model_testing.images(seed=2, batch=4)
  variables = model_testing.numpy_variables(single, x)
  model_testing.check_axis_name_syncs_batch_norm(_tiny(axis_name="batch"), single, x, variables, jit=True)

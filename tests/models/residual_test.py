"""Tests for nst_jax.models.residual: the BasicBlock against NumPy, the stem and depth errors.

The Bottleneck's NumPy check is in resnetv2_test.py and the whole networks' in the family tests
(cifar_resnet, resnetv2, resnet), which all build `residual.ResNet`.
"""

import numpy as np
import pytest

from nst_jax.models import cifar_resnet, residual
from tests.models import model_testing


def test_basic_block_matches_numpy():
  # A strided, widening block: conv3x3/2 - BN - ReLU - conv3x3 - BN, plus the 1x1/2 conv - BN projection.
  block = residual.BasicBlock(features=6, strides=2)
  x = model_testing.images(seed=5, size=8, channels=4)
  variables = model_testing.numpy_variables(block, x)
  out, preact = block.apply(variables, x, train=False)
  p, s = variables["params"], variables["batch_stats"]

  def conv_bn(conv, bn, y, stride=1):
    y = model_testing.conv_nhwc(y, p[conv]["Conv_0"]["kernel"], stride)
    stats = s[bn]["BatchNorm_0"]
    return model_testing.batch_norm(y, stats["mean"], stats["var"], p[bn]["BatchNorm_0"])

  y = np.maximum(conv_bn("conv1", "bn1", x, stride=2), 0)
  expected = conv_bn("conv2", "bn2", y) + conv_bn("downsample_conv", "downsample_bn", x, stride=2)
  assert preact.shape == (2, 4, 4, 6)
  np.testing.assert_allclose(preact, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out, np.maximum(preact, 0))


def test_basic_block_identity_shortcut_has_no_projection():
  block = residual.BasicBlock(features=4)
  x = model_testing.images(seed=6, size=4, channels=4)
  assert sorted(model_testing.init_shapes(block, x)["params"]) == ["bn1", "bn2", "conv1", "conv2"]


def test_unknown_stem_lists_the_valid_ones():
  model = residual.ResNet(block=residual.BasicBlock, stage_sizes=(1,), stage_features=(4,), num_classes=3,
                          stem="tiny")
  with pytest.raises(ValueError, match=r"Unknown ResNet stem 'tiny'. Valid stems: cifar, imagenet."):
    model_testing.init_shapes(model, model_testing.image_spec(8))


def test_cifar_depth_must_be_6n_plus_2():
  with pytest.raises(ValueError, match=r"depth = 6n \+ 2 with n >= 1, got 12"):
    cifar_resnet.cifar_resnet(12, (16, 16, 32, 64), num_classes=10)

"""The model registry: every name the model-zoo issue lists resolves, unknown names list the valid ones."""

import jax
import jax.numpy as jnp
import pytest

from nst_jax import models

# Every registered name, in the order `list_models` promises (Python's string order: capitals first,
# "resnet110" before "resnet14"), written out by hand. By family: RepDistiller's CIFAR networks
# (resnet8 ... resnet110, resnet8x4, resnet32x4, wrn_*, vgg*, MobileNetV2, ShuffleV1, ShuffleV2,
# ResNet50), the paper's CIFAR networks (preact_resnet164, preact_resnet1001, inception_bn_cifar) and the
# ImageNet ones (inception_bn, preact_resnet101, resnet18, resnet34, resnet50, resnet101).
EXPECTED_SORTED = [
    "MobileNetV2", "ResNet50", "ShuffleV1", "ShuffleV2",
    "inception_bn", "inception_bn_cifar",
    "preact_resnet1001", "preact_resnet101", "preact_resnet164",
    "resnet101", "resnet110", "resnet14", "resnet18", "resnet20", "resnet32", "resnet32x4", "resnet34",
    "resnet44", "resnet50", "resnet56", "resnet8", "resnet8x4",
    "vgg11", "vgg13", "vgg16", "vgg19", "vgg8",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
]


def test_list_models_is_every_name_sorted():
  assert models.list_models() == EXPECTED_SORTED


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet9'. Valid names: .*resnet8x4.*wrn_40_2"):
    models.get_model("resnet9", num_classes=10)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_common_interface(name):
  """(logits, features) with the common tap names, the dtype and axis_name options accepted."""
  model = models.get_model(name, num_classes=7, dtype=jnp.bfloat16, axis_name=None)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  logits, features = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(x.shape), train=False),
                                    variables)
  assert logits.shape == (2, 7) and logits.dtype == jnp.bfloat16
  assert {"stage1", "stage1_preact", "stage2", "stage3", "pooled"} <= set(features)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))

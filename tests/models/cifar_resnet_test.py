"""Tests for nst_jax.models.cifar_resnet: shapes, exact parameter counts, BatchNorm modes, dtype.

Reference parameter counts (num_classes=100, 32x32 inputs) are PyTorch's
`sum(p.numel() for p in m.parameters())` of a re-statement of HobbitLong/RepDistiller
`models/resnet.py` (BasicBlock ResNet, same widths, downsample rule, stem and fc), run with PyTorch
2.13; the Flax model reproduced that re-statement's logits and every tap to <5e-5 (relative) after
a weight transfer, in eval and train mode.
"""

import jax.numpy as jnp
import pytest

from nst_jax.models import cifar_resnet
from tests.models import model_testing

# name: PyTorch parameter count with num_classes=100 (see the module docstring).
PARAM_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
}

_PLAIN_SHAPES = {
    "stem": (2, 32, 32, 16),
    "stage1": (2, 32, 32, 16),
    "stage2": (2, 16, 16, 32),
    "stage3": (2, 8, 8, 64),
    "pooled": (2, 64),
}
_X4_SHAPES = {
    "stem": (2, 32, 32, 32),
    "stage1": (2, 32, 32, 64),
    "stage2": (2, 16, 16, 128),
    "stage3": (2, 8, 8, 256),
    "pooled": (2, 256),
}


def _expected_taps(name):
  return model_testing.with_stage_aliases(_X4_SHAPES if name.endswith("x4") else _PLAIN_SHAPES)


def test_registry_names():
  assert sorted(cifar_resnet.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  model_testing.check_trace(cifar_resnet.MODELS[name](num_classes=100), PARAM_COUNTS[name], (2, 100),
                            _expected_taps(name))


@pytest.fixture(scope="module")
def resnet8():
  # Un-jitted, capturing the stem convolution's output.
  model = cifar_resnet.MODELS["resnet8"](num_classes=100)
  x = model_testing.images()
  variables = model_testing.numpy_variables(model, x)
  return model_testing.run_eval_and_train(model, x, variables, capture=("conv1",), jit=False)


def test_eval_uses_running_stats_and_leaves_them(resnet8):
  logits, features = model_testing.check_stem_batch_norm(resnet8, False, "bn1", tol=1e-5)
  _check_head(features, logits, resnet8["variables"])


def test_train_uses_batch_stats_and_updates_them(resnet8):
  logits, features = model_testing.check_stem_batch_norm(resnet8, True, "bn1")
  _check_head(features, logits, resnet8["variables"])


def _check_head(features, logits, variables):
  for i in (1, 2, 3):
    model_testing.check_relu(features, f"stage{i}_preact", f"stage{i}")
  model_testing.check_head(features, logits, variables, last="stage3", fc="fc")


def test_bfloat16_activations_float32_params(resnet8):
  model = cifar_resnet.MODELS["resnet8"](num_classes=100, dtype=jnp.bfloat16)
  model_testing.check_bfloat16(model, resnet8, ref_atol=0.1, jit=False)


def test_jit_matches_eager(resnet8):
  model_testing.check_jit_matches_eager(resnet8)


def test_axis_name_syncs_batch_norm_across_devices():
  model = cifar_resnet.MODELS["resnet8"](num_classes=10, axis_name="batch")
  single = cifar_resnet.MODELS["resnet8"](num_classes=10)
  x = model_testing.images(seed=2, batch=4)
  model_testing.check_axis_name_syncs_batch_norm(model, single, x, model_testing.numpy_variables(single, x))

"""Tests for nst_jax.models.vgg: shapes, exact parameter counts, BatchNorm modes, dtype, jit.

Reference parameter counts (num_classes=100, 32x32 inputs) are PyTorch's
`sum(p.numel() for p in m.parameters())` of a re-statement of HobbitLong/RepDistiller
`models/vgg.py` with `batch_norm=True` (the `_bn` variants RepDistiller's model zoo registers as
`vgg8` ... `vgg19`: biased 3x3 convolutions, BatchNorm, the configs S / A / B / D / E, a 512 -> 100
classifier), run with PyTorch 2.13; the Flax model reproduced that re-statement's logits and every
tap to <2e-5 (relative) after a weight transfer, in eval and train mode.
"""

import jax.numpy as jnp
import pytest

from nst_jax.models import vgg
from tests.models import model_testing

# name: PyTorch parameter count with num_classes=100 (see the module docstring).
PARAM_COUNTS = {
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
}

# The same for every config: widths 64 / 128 / 256 / 512 / 512, pools after blocks 0, 1, 2.
_SHAPES_32 = {
    "stem": (2, 32, 32, 64),
    "stage1": (2, 16, 16, 128),
    "stage2": (2, 8, 8, 256),
    "stage3": (2, 4, 4, 512),
    "stage4": (2, 4, 4, 512),
    "pooled": (2, 512),
}
# 64x64 inputs get RepDistiller's extra pool after block 3.
_SHAPES_64 = {
    "stem": (2, 64, 64, 64),
    "stage1": (2, 32, 32, 128),
    "stage2": (2, 16, 16, 256),
    "stage3": (2, 8, 8, 512),
    "stage4": (2, 4, 4, 512),
    "pooled": (2, 512),
}

_STEM_CONV = ("block0", "conv0")


def test_registry_names():
  assert sorted(vgg.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  model_testing.check_trace(vgg.MODELS[name](num_classes=100), PARAM_COUNTS[name], (2, 100),
                            model_testing.with_stage_aliases(_SHAPES_32))


def test_64px_inputs_pool_after_block3():
  model_testing.check_trace(vgg.MODELS["vgg8"](num_classes=100), PARAM_COUNTS["vgg8"], (2, 100),
                            model_testing.with_stage_aliases(_SHAPES_64), size=64)


@pytest.fixture(scope="module")
def vgg8():
  # Un-jitted, capturing the stem convolution's output.
  model = vgg.MODELS["vgg8"](num_classes=100)
  x = model_testing.images()
  variables = model_testing.numpy_variables(model, x)
  return model_testing.run_eval_and_train(model, x, variables, capture=_STEM_CONV, jit=False)


def _check_head(features, logits, variables):
  for i in (1, 2, 3, 4):
    model_testing.check_relu(features, f"stage{i}_preact", f"stage{i}")
  model_testing.check_head(features, logits, variables, last="stage4", fc="classifier")


def test_eval_uses_running_stats_and_leaves_them(vgg8):
  logits, features = model_testing.check_stem_batch_norm(vgg8, False, "block0/bn0", tol=1e-5)
  _check_head(features, logits, vgg8["variables"])


def test_train_uses_batch_stats_and_updates_them(vgg8):
  logits, features = model_testing.check_stem_batch_norm(vgg8, True, "block0/bn0")
  _check_head(features, logits, vgg8["variables"])


def test_bfloat16_activations_float32_params(vgg8):
  model = vgg.MODELS["vgg8"](num_classes=100, dtype=jnp.bfloat16)
  model_testing.check_bfloat16(model, vgg8, ref_atol=0.1)


def test_jit_matches_eager(vgg8):
  model_testing.check_jit_matches_eager(vgg8)


def test_axis_name_syncs_batch_norm_across_devices():
  model = vgg.MODELS["vgg8"](num_classes=10, axis_name="batch")
  single = vgg.MODELS["vgg8"](num_classes=10)
  x = model_testing.images(seed=2, batch=4)
  model_testing.check_axis_name_syncs_batch_norm(model, single, x, model_testing.numpy_variables(single, x))

"""Tests for nst_jax.models.wrn: shapes, exact parameter counts, tap definitions, BatchNorm modes.

Reference parameter counts (num_classes=100, 32x32 inputs) are PyTorch's
`sum(p.numel() for p in m.parameters())` of a re-statement of HobbitLong/RepDistiller
`models/wrn.py` (pre-activation blocks, 1x1 shortcut on the activated input when the width
changes, final BN-ReLU, fc), run with PyTorch 2.13; the Flax model reproduced that re-statement's
logits and every tap (including RepDistiller's `preact=True` features) to <1e-5 (relative) after a
weight transfer, in eval and train mode.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax.models import wrn
from tests.models import model_testing

# name: PyTorch parameter count with num_classes=100 (see the module docstring).
PARAM_COUNTS = {
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
}

# Stage widths by widen factor; spatial sizes 32 / 16 / 8 at 32x32 inputs.
_STAGE_SHAPES = {
    1: {"stage1": (2, 32, 32, 16), "stage2": (2, 16, 16, 32), "stage3": (2, 8, 8, 64)},
    2: {"stage1": (2, 32, 32, 32), "stage2": (2, 16, 16, 64), "stage3": (2, 8, 8, 128)},
}
_POOLED = {1: (2, 64), 2: (2, 128)}

# The BatchNorm that consumes each stage's output (it gives `stage{i}_preact`).
_CONSUMER_BN = {1: "block2_0/bn1", 2: "block3_0/bn1", 3: "bn1"}


def _expected_taps(name):
  k = int(name.split("_")[-1])
  shapes = {"stem": (2, 32, 32, 16), "pooled": _POOLED[k], **_STAGE_SHAPES[k]}
  return model_testing.with_stage_aliases(shapes, ("_preact", "_relu"))


def test_registry_names():
  assert sorted(wrn.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  model_testing.check_trace(wrn.MODELS[name](num_classes=100), PARAM_COUNTS[name], (2, 100),
                            _expected_taps(name))


@pytest.fixture(scope="module")
def wrn_16_1():
  model = wrn.MODELS["wrn_16_1"](num_classes=100)
  x = model_testing.images()
  return model_testing.run_eval_and_train(model, x, model_testing.numpy_variables(model, x), jit=False)


def _check_relu_and_head(features, logits, variables):
  # The stem is a bare convolution: no activation.
  assert np.asarray(features["stem"]).min() < 0
  for i in (1, 2, 3):
    assert np.asarray(features[f"stage{i}"]).min() < 0  # a residual sum, not a post-ReLU map
    model_testing.check_relu(features, f"stage{i}_preact", f"stage{i}_relu")
  model_testing.check_head(features, logits, variables, last="stage3_relu", fc="fc")


def test_eval_preact_is_consumer_bn_with_running_stats(wrn_16_1):
  logits, features = model_testing.mode_outputs(wrn_16_1, train=False)
  for i, path in _CONSUMER_BN.items():
    model_testing.check_batch_norm(wrn_16_1, features[f"stage{i}_preact"], features[f"stage{i}"], path)
  _check_relu_and_head(features, logits, wrn_16_1["variables"])


def test_train_preact_uses_batch_stats_and_updates_each_bn_once(wrn_16_1):
  logits, features = model_testing.mode_outputs(wrn_16_1, train=True)
  for i, path in _CONSUMER_BN.items():
    # One momentum-0.1 update (RepDistiller's recomputation would apply two).
    model_testing.check_batch_norm(wrn_16_1, features[f"stage{i}_preact"], features[f"stage{i}"], path,
                                   train=True)
  _check_relu_and_head(features, logits, wrn_16_1["variables"])


def test_bfloat16_activations_float32_params(wrn_16_1):
  model = wrn.MODELS["wrn_16_1"](num_classes=100, dtype=jnp.bfloat16)
  model_testing.check_bfloat16(model, wrn_16_1, ref_atol=0.1)


def test_jit_matches_eager(wrn_16_1):
  model_testing.check_jit_matches_eager(wrn_16_1)


def test_axis_name_syncs_batch_norm_across_devices():
  model = wrn.MODELS["wrn_16_1"](num_classes=10, axis_name="batch")
  single = wrn.MODELS["wrn_16_1"](num_classes=10)
  x = model_testing.images(seed=2, batch=4)
  model_testing.check_axis_name_syncs_batch_norm(model, single, x, model_testing.numpy_variables(single, x))

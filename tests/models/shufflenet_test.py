"""Tests for nst_jax.models.shufflenet: shapes, exact parameter counts, taps, BatchNorm modes, dtype.

Reference parameter counts (num_classes=100, 32x32 inputs) are PyTorch's
`sum(p.numel() for p in m.parameters())` of re-statements of HobbitLong/RepDistiller
`models/ShuffleNetv1.py` (`ShuffleV1`: out_planes 240/480/960, blocks 4/8/4, groups 3) and
`models/ShuffleNetv2.py` (`ShuffleV2`: net_size 1), run with PyTorch 2.13. After a weight transfer the
Flax models reproduced those re-statements' logits and every tap (including the `preact=True` ones) to
<1e-6 (eval) / 3e-5 (train) relative error.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax.models import shufflenet
from tests.models import model_testing

# name: PyTorch parameter count with num_classes=100 (see the module docstring).
PARAM_COUNTS = {
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}

# Taps at 32x32 input, batch 2 (NHWC).
TAP_SHAPES = {
    "ShuffleV1": {
        "stem": (2, 32, 32, 24),
        "stage1": (2, 16, 16, 240),
        "stage1_preact": (2, 16, 16, 240),
        "stage2": (2, 8, 8, 480),
        "stage2_preact": (2, 8, 8, 480),
        "stage3": (2, 4, 4, 960),
        "stage3_preact": (2, 4, 4, 960),
        "pooled": (2, 960),
    },
    "ShuffleV2": {
        "stem": (2, 32, 32, 24),
        "stage1": (2, 16, 16, 116),
        "stage1_preact": (2, 16, 16, 116),
        "stage2": (2, 8, 8, 232),
        "stage2_preact": (2, 8, 8, 232),
        "stage3": (2, 4, 4, 464),
        "stage3_preact": (2, 4, 4, 464),
        "head": (2, 4, 4, 1024),
        "pooled": (2, 1024),
    },
}

# BatchNorm layers: V1 stem + 16 units x 3; V2 stem + 3 down units x 5 + 13 basic units x 3 + head.
BATCH_NORM_COUNTS = {"ShuffleV1": 49, "ShuffleV2": 56}


def _torch_channel_shuffle(x_nhwc, groups):
  """PyTorch's shuffle, literally: NCHW view (N, g, C/g, H, W), swap the two channel axes, flatten."""
  x = np.transpose(np.asarray(x_nhwc), (0, 3, 1, 2))
  n, c, h, w = x.shape
  x = x.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
  return np.transpose(x, (0, 2, 3, 1))


def test_registry_names():
  assert sorted(shufflenet.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  model_testing.check_trace(shufflenet.MODELS[name](num_classes=100), PARAM_COUNTS[name], (2, 100),
                            TAP_SHAPES[name])


def test_shufflev1_grouped_convs():
  model = shufflenet.MODELS["ShuffleV1"](num_classes=100)
  params = model_testing.init_shapes(model, model_testing.image_spec(batch=1))["params"]

  def kernel(unit, conv):
    return params[unit][conv]["Conv_0"]["kernel"].shape

  # The unit fed by the 24-channel stem has an ungrouped first 1x1 conv; its branch is 240 - 24 wide.
  assert kernel("stage1_unit0", "conv1") == (1, 1, 24, 54)
  assert kernel("stage1_unit0", "conv2") == (3, 3, 1, 54)
  assert kernel("stage1_unit0", "conv3") == (1, 1, 18, 216)
  # Later units: 3 groups in both 1x1 convs (input channels per group in the kernel).
  assert kernel("stage1_unit1", "conv1") == (1, 1, 80, 60)
  assert kernel("stage1_unit1", "conv3") == (1, 1, 20, 240)
  assert kernel("stage2_unit0", "conv1") == (1, 1, 80, 60)
  assert kernel("stage2_unit0", "conv3") == (1, 1, 20, 240)
  assert kernel("stage3_unit3", "conv3") == (1, 1, 80, 960)


@pytest.mark.parametrize("groups", [2, 3])
def test_channel_shuffle_matches_pytorch_order(groups):
  x = np.arange(2 * 3 * 1 * 12, dtype=np.float32).reshape(2, 3, 1, 12)
  np.testing.assert_array_equal(shufflenet.channel_shuffle(jnp.asarray(x), groups),
                                _torch_channel_shuffle(x, groups))
  # Channel k of group g moves to position k * groups + g.
  np.testing.assert_array_equal(shufflenet.channel_shuffle(jnp.arange(6), 2), [0, 3, 1, 4, 2, 5])


@pytest.fixture(scope="module", params=sorted(PARAM_COUNTS))
def run(request):
  model = shufflenet.MODELS[request.param](num_classes=100)
  x = model_testing.images()
  run = model_testing.run_eval_and_train(model, x, model_testing.numpy_variables(model, x))
  return dict(name=request.param, **run)


def _stem_conv(run):
  kernel = run["variables"]["params"]["stem_conv"]["Conv_0"]["kernel"]
  return model_testing.conv_nhwc(run["x"], kernel)  # 1x1 conv.


def test_eval_uses_running_stats_and_leaves_them(run):
  logits, features = model_testing.check_stem_batch_norm(run, False, "stem_bn", _stem_conv(run))
  _check_taps(run["name"], features, logits, run["variables"])


def test_train_uses_batch_stats_and_updates_them(run):
  logits, features = model_testing.check_stem_batch_norm(run, True, "stem_bn", _stem_conv(run),
                                                         every_bn_moves=True)
  _check_taps(run["name"], features, logits, run["variables"])


def _check_taps(name, features, logits, variables):
  for i in (1, 2, 3):
    preact = np.asarray(features[f"stage{i}_preact"])
    assert preact.min() < 0
    if name == "ShuffleV1":
      expected = np.maximum(preact, 0)
    else:  # RepDistiller's V2 preact is taken before the unit's channel shuffle.
      expected = _torch_channel_shuffle(np.maximum(preact, 0), 2)
    np.testing.assert_array_equal(features[f"stage{i}"], expected)
  last = "stage3" if name == "ShuffleV1" else "head"
  model_testing.check_head(features, logits, variables, last=last, fc="classifier", atol=1e-4)


@pytest.mark.parametrize("run", ["ShuffleV1"], indirect=True)  # One model is enough here.
def test_bfloat16_activations_float32_params(run):
  model = shufflenet.MODELS["ShuffleV1"](num_classes=100, dtype=jnp.bfloat16)
  model_testing.check_bfloat16(model, run)


@pytest.mark.parametrize("run", ["ShuffleV1"], indirect=True)  # One model is enough here.
def test_jit_matches_eager(run):
  model_testing.check_jit_matches_eager(run)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_axis_name_reaches_every_batch_norm(name):
  model = shufflenet.MODELS[name](num_classes=100, axis_name="batch")
  model_testing.check_axis_name_reaches_every_batch_norm(model, BATCH_NORM_COUNTS[name])

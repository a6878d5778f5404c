"""Tests for nst_jax.models.preact_resnet: shapes, exact parameter counts, scan, BatchNorm, dtype, jit.

Reference parameter counts are `sum(p.numel() for p in m.parameters() if p.requires_grad)` of a minimal
PyTorch re-statement of the architecture (tornadomeet/ResNet `symbol_resnet.py` units, He et al.'s
CIFAR stem; PyTorch 2.13), and agree with osmr/imgclsmob's published tables: PreResNet-164(BN)
1,703,258 and PreResNet-1001 10,327,706 on CIFAR-10 (He et al. print 1.7 M and 10.2 M), PreResNet-101
44,541,608 on ImageNet, to which `preact_resnet101` adds the 3 offsets of its `bn_data` input BatchNorm.
Only CIFAR models at 32 px run for real; preact_resnet1001 and the 224 px model are only traced.
Outside this suite, preact_resnet164 (32 px) and preact_resnet101 (64 px), unrolled, reproduced that
PyTorch re-statement's logits and every tap after a weight transfer: relative error < 1e-6 in eval
mode, < 7e-4 in train mode (batch 2); `test_scan_matches_unrolled_units` ties the scanned layout to it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax.models import preact_resnet
from tests.models import model_testing

# name: (input size, num_classes, PyTorch parameter count); see the module docstring.
PARAM_COUNTS = {
    "preact_resnet164": (32, 10, 1_703_258),
    "preact_resnet1001": (32, 10, 10_327_706),
    "preact_resnet101": (224, 1000, 44_541_611),
}

_CIFAR_SHAPES = {
    "stem": (2, 32, 32, 16),
    "stage1": (2, 32, 32, 64),
    "stage2": (2, 16, 16, 128),
    "stage3": (2, 8, 8, 256),
    "final_bn": (2, 8, 8, 256),
    "final_relu": (2, 8, 8, 256),
    "pooled": (2, 256),
}
_IMAGENET_SHAPES = {
    "stem": (2, 112, 112, 64),
    "stage1": (2, 56, 56, 256),
    "stage2": (2, 28, 28, 512),
    "stage3": (2, 14, 14, 1024),
    "stage4": (2, 7, 7, 2048),
    "final_bn": (2, 7, 7, 2048),
    "final_relu": (2, 7, 7, 2048),
    "pooled": (2, 2048),
}


def _expected_taps(name):
  shapes = _IMAGENET_SHAPES if name == "preact_resnet101" else _CIFAR_SHAPES
  return model_testing.with_stage_aliases(shapes, ("_preact", "_relu"))


def test_registry_names():
  assert sorted(preact_resnet.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  size, num_classes, count = PARAM_COUNTS[name]
  # The 1001-layer net is traced scanned (same parameter count and taps; the layouts are tied together by
  # test_scan_matches_unrolled_units): unrolled, its two traces alone cost ~20 s of CI time.
  kwargs = {"scan_blocks": True} if name == "preact_resnet1001" else {}
  model_testing.check_trace(preact_resnet.MODELS[name](num_classes=num_classes, **kwargs), count,
                            (2, num_classes), _expected_taps(name), size=size)


def test_unrolled_layout_has_the_same_parameters():
  resnet164 = preact_resnet.MODELS["preact_resnet164"]
  scanned, _ = model_testing.trace(resnet164(num_classes=10, scan_blocks=True))
  unrolled, _ = model_testing.trace(resnet164(num_classes=10, scan_blocks=False))
  num_params = model_testing.num_params
  assert num_params(unrolled["params"]) == num_params(scanned["params"]) == 1_703_258
  assert scanned["params"]["stage1_units"]["unit"]["conv2"]["Conv_0"]["kernel"].shape == (
      17, 3, 3, 16, 16)
  assert unrolled["params"]["stage1_unit18"]["conv2"]["Conv_0"]["kernel"].shape == (3, 3, 16, 16)


def _unstack(scanned, stage_sizes):
  """Scanned variables -> the unrolled layout (`stage{i}_units[j - 2]` -> `stage{i}_unit{j}`)."""
  out = {k: v for k, v in scanned.items() if not k.endswith("_units")}
  for stage, n in enumerate(stage_sizes, start=1):
    for j in range(2, n + 1):
      out[f"stage{stage}_unit{j}"] = jax.tree.map(lambda a, j=j: a[j - 2],
                                                   scanned[f"stage{stage}_units"]["unit"])
  return out


def test_scan_matches_unrolled_units():
  kwargs = dict(stage_sizes=(3, 2), stage_features=(32, 64), num_classes=10)
  scanned = preact_resnet.PreActResNet(scan_blocks=True, **kwargs)
  unrolled = preact_resnet.PreActResNet(scan_blocks=False, **kwargs)
  x = model_testing.images(seed=3, size=16)
  variables = model_testing.numpy_variables(scanned, x, init_like=True)
  as_unrolled = {col: _unstack(v, (3, 2)) for col, v in variables.items()}
  for train in (False, True):
    out_s, state_s = model_testing.apply_fn(scanned, train)(variables, x)
    out_u, state_u = model_testing.apply_fn(unrolled, train)(as_unrolled, x)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), out_s, out_u)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 _unstack(state_s["batch_stats"], (3, 2)), state_u["batch_stats"])


@pytest.fixture(scope="module")
def resnet164():
  # Init-like variables (fresh BatchNorm statistics), jitted.
  # Scanned (no longer the default) so that the training test sees stacked statistics move.
  model = preact_resnet.MODELS["preact_resnet164"](num_classes=10, scan_blocks=True)
  x = model_testing.images()
  return model_testing.run_eval_and_train(model, x, model_testing.numpy_variables(model, x, init_like=True))


def test_eval_uses_running_stats_and_leaves_them(resnet164):
  logits, features = model_testing.mode_outputs(resnet164, train=False)
  assert model_testing.tap_shapes(features) == _expected_taps("preact_resnet164")
  # Fresh running statistics (mean 0, var 1), BN scale 1 and bias 0.
  for i in (1, 2, 3):  # `_preact` is the consuming BatchNorm (next stage's first, or the final one).
    expected = model_testing.batch_norm(np.asarray(features[f"stage{i}"]), 0, 1)
    np.testing.assert_allclose(features[f"stage{i}_preact"], expected, rtol=1e-5, atol=1e-5)
  _check_taps(features, logits, resnet164["variables"])


def test_train_uses_batch_stats_and_updates_them(resnet164):
  logits, features = model_testing.mode_outputs(resnet164, train=True)
  # The final BatchNorm; momentum 0.1 from the fresh (0, 1).
  model_testing.check_batch_norm(resnet164, features["final_bn"], features["stage3"], "bn1", train=True)
  # Every unit's statistics moved, the scanned (stacked) ones included.
  state = resnet164["train_state"]
  scanned = state["batch_stats"]["stage2_units"]["unit"]["bn1"]["BatchNorm_0"]["mean"]
  assert scanned.shape == (17, 128)
  assert np.all(np.abs(np.asarray(scanned)).max(axis=1) > 0)
  _check_taps(features, logits, resnet164["variables"])


def _check_taps(features, logits, variables):
  for i in (1, 2, 3):
    # No activation ends a pre-activation stage: `_preact` is the consuming BatchNorm's output.
    model_testing.check_relu(features, f"stage{i}_preact", f"stage{i}_relu")
  np.testing.assert_array_equal(features["stage3_preact"], features["final_bn"])
  assert np.asarray(features["stage3"]).min() < 0
  model_testing.check_relu(features, "final_bn", "final_relu")
  model_testing.check_head(features, logits, variables, last="final_relu", fc="fc1")


def test_input_batch_norm_learns_only_an_offset():
  # MXNet's fix_gamma=True: bn_data has an offset but no scale, and normalises the raw input.
  model = preact_resnet.PreActResNet(stage_sizes=(1, 1, 1, 1), stage_features=(16, 16, 32, 32),
                                     num_classes=10, stem_features=16, imagenet_stem=True,
                                     input_bn=True)
  x = 50.0 + 20.0 * model_testing.images(seed=4)
  variables = model_testing.numpy_variables(model, x, init_like=True)
  assert jax.tree.map(jnp.shape, variables["params"]["bn_data"]) == {"BatchNorm_0": {"bias": (3,)}}
  (_, features), state = model_testing.apply_fn(model, True, capture=("bn_data",))(variables, x)
  assert features["stem"].shape == (2, 16, 16, 16)
  assert features["stage4"].shape == (2, 1, 1, 32)
  normalised = np.asarray(state["intermediates"]["bn_data"]["__call__"][0])
  raw = np.asarray(x, np.float64)
  expected = model_testing.batch_norm(raw, raw.mean(axis=(0, 1, 2)), raw.var(axis=(0, 1, 2)))
  np.testing.assert_allclose(normalised, expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_activations_float32_params():
  model = preact_resnet.MODELS["preact_resnet101"](num_classes=1000, dtype=jnp.bfloat16)
  model_testing.check_bfloat16_traced(model, 224)


def test_jit_matches_eager(resnet164):
  model_testing.check_jit_matches_eager(resnet164, tol=1e-5)


def test_axis_name_syncs_batch_norm_across_devices():
  # Scanned units included.
  kwargs = dict(stage_sizes=(2, 2), stage_features=(16, 32), num_classes=10, scan_blocks=True)
  model = preact_resnet.PreActResNet(axis_name="batch", **kwargs)
  single = preact_resnet.PreActResNet(**kwargs)
  x = model_testing.images(seed=2, batch=4, size=8)
  variables = model_testing.numpy_variables(single, x, init_like=True)
  model_testing.check_axis_name_syncs_batch_norm(model, single, x, variables, jit=True)

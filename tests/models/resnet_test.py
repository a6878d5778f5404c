"""Tests for nst_jax.models.resnet: shapes, exact parameter counts, BatchNorm modes, dtype, jit.

The 224 px ImageNet models are only traced (jax.eval_shape); real forward passes use resnet18 on
32 x 32 inputs, where the network is just as well defined (stage 4 is 1 x 1). Outside this suite,
resnet18 and resnet50 reproduced a PyTorch re-statement's logits and every tap after a weight transfer
(64 px, random BN statistics): relative error < 1e-6 in eval mode, < 3e-4 in train mode (batch 2).
"""

import jax.numpy as jnp
import pytest

from nst_jax.models import resnet
from tests.models import model_testing

# torchvision's published model table (`num_params`, 1000 classes); a minimal PyTorch re-statement of
# torchvision's ResNet / BasicBlock / Bottleneck counted the same with PyTorch 2.13.
PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
}

_BASIC_SHAPES = {
    "stem": (2, 112, 112, 64),
    "stage1": (2, 56, 56, 64),
    "stage2": (2, 28, 28, 128),
    "stage3": (2, 14, 14, 256),
    "stage4": (2, 7, 7, 512),
    "pooled": (2, 512),
}
_BOTTLENECK_SHAPES = {
    "stem": (2, 112, 112, 64),
    "stage1": (2, 56, 56, 256),
    "stage2": (2, 28, 28, 512),
    "stage3": (2, 14, 14, 1024),
    "stage4": (2, 7, 7, 2048),
    "pooled": (2, 2048),
}


def _expected_taps(name):
  basic = name in ("resnet18", "resnet34")
  return model_testing.with_stage_aliases(_BASIC_SHAPES if basic else _BOTTLENECK_SHAPES)


def test_registry_names():
  assert sorted(resnet.MODELS) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_shapes_and_param_count(name):
  model_testing.check_trace(resnet.MODELS[name](num_classes=1000), PARAM_COUNTS[name], (2, 1000),
                            _expected_taps(name), size=224)


@pytest.fixture(scope="module")
def resnet18():
  # Init-like variables (fresh BatchNorm statistics); jitted, capturing the stem convolution's output.
  model = resnet.MODELS["resnet18"](num_classes=10)
  x = model_testing.images()
  variables = model_testing.numpy_variables(model, x, init_like=True)
  return model_testing.run_eval_and_train(model, x, variables, capture=("conv1",))


def test_small_forward_shapes(resnet18):
  logits, features = resnet18["eval"]
  assert logits.shape == (2, 10)
  assert model_testing.tap_shapes(features) == {
      "stem": (2, 16, 16, 64),
      "stage1": (2, 8, 8, 64), "stage1_preact": (2, 8, 8, 64),
      "stage2": (2, 4, 4, 128), "stage2_preact": (2, 4, 4, 128),
      "stage3": (2, 2, 2, 256), "stage3_preact": (2, 2, 2, 256),
      "stage4": (2, 1, 1, 512), "stage4_preact": (2, 1, 1, 512),
      "pooled": (2, 512),
  }


def test_eval_uses_running_stats_and_leaves_them(resnet18):
  # Fresh running statistics (mean 0, var 1), BN scale 1 and bias 0.
  logits, features = model_testing.check_stem_batch_norm(resnet18, False, "bn1", tol=1e-5)
  _check_head(features, logits, resnet18["variables"])


def test_train_uses_batch_stats_and_updates_them(resnet18):
  # Momentum 0.1 from the fresh (0, 1).
  logits, features = model_testing.check_stem_batch_norm(resnet18, True, "bn1")
  _check_head(features, logits, resnet18["variables"])


def _check_head(features, logits, variables):
  for i in (1, 2, 3, 4):
    model_testing.check_relu(features, f"stage{i}_preact", f"stage{i}")
  model_testing.check_head(features, logits, variables, last="stage4", fc="fc")


def test_bfloat16_activations_float32_params():
  model_testing.check_bfloat16_traced(resnet.MODELS["resnet50"](num_classes=1000, dtype=jnp.bfloat16), 224)


def test_jit_matches_eager(resnet18):
  model_testing.check_jit_matches_eager(resnet18, tol=1e-5)

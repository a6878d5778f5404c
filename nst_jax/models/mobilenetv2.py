"""MobileNetV2 for CIFAR as in RepDistiller (`models/mobilenetv2.py`, the `mobile_half` student).

RepDistiller registers `mobile_half` under the name `MobileNetV2`: expansion ratio T = 6 and width
multiplier 0.5 over the standard MobileNetV2 table, with a stride-2 3x3 stem (so a 32 x 32 image is 16 x 16
after the stem) and the first two inverted-residual groups at stride 1. At width 0.5 the channels are

    stem 16 | groups (t, c, n, s): (1, 8, 1, 1) (6, 12, 2, 1) (6, 16, 3, 2) (6, 32, 4, 2) (6, 48, 3, 1)
    (6, 80, 3, 2) (6, 160, 1, 1) | 1x1 head conv 1280 | global average pool | linear.

Two quirks of RepDistiller's version are kept so that parameter counts and weights carry over: every
inverted residual has the 1x1 expansion convolution, even when t = 1 (the canonical MobileNetV2 drops it),
and the head width stays 1280 for width multipliers <= 1. With num_classes=100 the network has 812,836
parameters. RepDistiller pools with `AvgPool2d(input_size // 16, ceil_mode=True)`, which for its inputs
(sides a multiple of 32) is the global mean over the final map; it is written as the global mean here.

Feature taps (`features` dict), following RepDistiller's `is_feat=True` list [f0, ..., f5]:

* `stem`: the stem conv-BN-ReLU output (f0), 16 x 16 x 16 at 32 x 32 input.
* `stage1`: after inverted-residual groups 0-1 (f1), 16 x 16 x 12.
* `stage2`: after group 2 (f2), 8 x 8 x 16.
* `stage3`: after groups 3-4 (f3), 4 x 4 x 48.
* `stage4`: after groups 5-6 (f4), 2 x 2 x 160.
* `stage{i}_preact`: identical to `stage{i}`. A MobileNetV2 block ends in a *linear* bottleneck (1x1 conv
  and BatchNorm, no ReLU, plus the identity shortcut when shapes allow), so a stage output has no final
  activation to come "before". RepDistiller ignores `preact=True` for this network and returns the same
  list, and its `get_bn_before_relu` points at the same linear-bottleneck BatchNorms.
* `head`: the 1x1 head conv-BN-ReLU output before pooling, 2 x 2 x 1280 (extra tap).
* `pooled`: the (B, 1280) vector fed to the classifier (f5).
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nst_jax.models import layers

Dtype = Any

# (channels c, repeats n, first stride s) per inverted-residual group, before width scaling. Group 0
# uses expansion 1, the others the model's `expand_ratio` (T).
_GROUPS = (
    (16, 1, 1),
    (24, 2, 1),
    (32, 3, 2),
    (64, 4, 2),
    (96, 3, 1),
    (160, 3, 2),
    (320, 1, 1),
)
# RepDistiller's f1..f4 are taken after these groups (0-based), which fixes the four stages.
_STAGE_ENDS = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
  """Expand (1x1) - depthwise 3x3 - linear project (1x1), each with BatchNorm; ReLU after the first two.

  Owns one block's three convolutions and BatchNorms. The identity shortcut is added when the block keeps
  both resolution and width. The output is linear (no ReLU).
  """

  features: int
  strides: int
  expand_ratio: int
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    in_features = x.shape[-1]
    hidden = in_features * self.expand_ratio
    conv = functools.partial(layers.Conv, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)

    y = conv(hidden, kernel_size=1, name="conv_expand")(x)
    y = nn.relu(norm(name="bn_expand")(y, train))
    y = conv(hidden, kernel_size=3, strides=self.strides, groups=hidden, name="conv_depthwise")(y)
    y = nn.relu(norm(name="bn_depthwise")(y, train))
    y = conv(self.features, kernel_size=1, name="conv_project")(y)
    y = norm(name="bn_project")(y, train)
    if self.strides == 1 and in_features == self.features:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """RepDistiller's CIFAR MobileNetV2: stem, seven inverted-residual groups, 1x1 head, pool, classifier."""

  num_classes: int
  expand_ratio: int = 6
  width_mult: float = 0.5
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)
    features = {}

    x = layers.Conv(int(32 * self.width_mult), kernel_size=3, strides=2, dtype=self.dtype,
                    name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x, train))
    features["stem"] = x

    stage = 1
    for g, (c, n, s) in enumerate(_GROUPS):
      for j in range(n):
        x = InvertedResidual(
            features=int(c * self.width_mult),
            strides=s if j == 0 else 1,
            expand_ratio=1 if g == 0 else self.expand_ratio,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name=f"group{g}_block{j}",
        )(x, train)
      if g in _STAGE_ENDS:
        features[f"stage{stage}"] = x
        features[f"stage{stage}_preact"] = x  # Linear bottleneck: nothing to take "before" (docstring).
        stage += 1

    # RepDistiller keeps 1280 head channels unless the network is widened.
    head_features = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    x = layers.Conv(head_features, kernel_size=1, dtype=self.dtype, name="head_conv")(x)
    x = nn.relu(norm(name="head_bn")(x, train))
    features["head"] = x

    x = layers.global_avg_pool(x)
    features["pooled"] = x
    # RepDistiller initialises this classifier with normal(0, 0.01) weights (zero bias).
    logits = layers.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                          name="classifier")(x)
    return logits, features


MODELS: dict[str, Callable[..., nn.Module]] = {
    # RepDistiller's model_dict['MobileNetV2'] is mobile_half = mobilenetv2_T_w(T=6, W=0.5).
    "MobileNetV2": functools.partial(MobileNetV2, expand_ratio=6, width_mult=0.5),
}

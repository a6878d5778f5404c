"""ShuffleNet v1 and v2 for CIFAR as in RepDistiller (`models/ShuffleNetv1.py`, `models/ShuffleNetv2.py`).

Both keep RepDistiller's CIFAR adaptation: a 1x1 conv-BN-ReLU stem to 24 channels with no downsampling and
no max-pool, three stages that each halve the resolution (32 -> 16 -> 8 -> 4 at 32 x 32 input), global
average pooling and a linear classifier. RepDistiller pools with `avg_pool2d(out, 4)`, the global mean for
its 32 x 32 inputs; it is written as the global mean here.

`ShuffleV1` (groups = 3): stages of 4 / 8 / 4 bottleneck units with 240 / 480 / 960 output channels. A unit
is grouped 1x1 conv (bottleneck width = out / 4) - BN - ReLU - channel shuffle - depthwise 3x3 - BN - ReLU -
grouped 1x1 conv - BN, then ReLU(branch + x) at stride 1, or ReLU(concat(branch, AvgPool3x3/2(x))) in the
first (stride-2) unit of a stage, whose branch therefore produces out - in channels. As in RepDistiller,
the first unit of the network (24 stem channels) uses an ungrouped first 1x1 conv. Note that, as in
RepDistiller, the depthwise conv is followed by a ReLU (the ShuffleNet paper has none there).
949,258 parameters with num_classes=100.

`ShuffleV2` (net_size = 1): stages of one down-sampling unit plus 3 / 7 / 3 basic units with
116 / 232 / 464 channels, then a 1x1 conv-BN-ReLU to 1024 channels. A basic unit splits the channels in
half, passes the first half through and transforms the second (1x1 - BN - ReLU - depthwise 3x3 - BN -
1x1 - BN - ReLU), concatenates [pass-through, branch] and shuffles with 2 groups. The down-sampling unit
concatenates two stride-2 branches (depthwise 3x3 - BN - 1x1 - BN - ReLU | 1x1 - BN - ReLU - depthwise 3x3
- BN - 1x1 - BN - ReLU) and shuffles. 1,355,528 parameters with num_classes=100.

Feature taps (`features` dict), following RepDistiller's `is_feat=True, preact=True` lists:

* `stem`: the stem conv-BN-ReLU output (f0), 32 x 32 x 24 at 32 x 32 input.
* `stage{i}` (i = 1, 2, 3): the output of stage i's last unit (f1..f3): V1 16 x 16 x 240, 8 x 8 x 480,
  4 x 4 x 960; V2 16 x 16 x 116, 8 x 8 x 232, 4 x 4 x 464.
* `stage{i}_preact`: what RepDistiller returns for `preact=True`. V1: the last unit's residual sum before
  its final ReLU, so `stage{i} == relu(stage{i}_preact)`. V2: concat(pass-through half, branch before its
  final ReLU) *before the channel shuffle*, so `stage{i} == channel_shuffle(relu(stage{i}_preact), 2)`
  (the pass-through half is already non-negative); the channel order differs from `stage{i}`.
* `head` (V2 only, extra tap): the 1x1 conv-BN-ReLU output before pooling, 4 x 4 x 1024.
* `pooled`: the vector fed to the classifier (f4): (B, 960) for V1, (B, 1024) for V2.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nst_jax.models import layers

Dtype = Any

_STEM_FEATURES = 24


def channel_shuffle(x, groups: int):
  """ShuffleNet's channel shuffle on NHWC, in PyTorch's channel order.

  PyTorch views channels as (groups, C // groups) and transposes to (C // groups, groups); doing the same
  on the last axis keeps converted weights and channel-indexed taps identical.
  """
  *lead, channels = x.shape
  x = x.reshape(*lead, groups, channels // groups)
  x = jnp.swapaxes(x, -1, -2)
  return x.reshape(*lead, channels)


class ShuffleV1Unit(nn.Module):
  """One ShuffleNet v1 bottleneck unit; returns (output, pre-ReLU output).

  Owns the unit's three convolutions and BatchNorms. `features` is the branch width: the full output width
  at stride 1, output minus input width at stride 2 (the pooled input is concatenated).
  """

  features: int
  strides: int
  groups: int
  first_groups: int  # Groups of the first 1x1 conv (and its shuffle): 1 on the 24-channel stem output.
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    mid = self.features // 4
    conv = functools.partial(layers.Conv, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)

    y = conv(mid, kernel_size=1, groups=self.first_groups, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y, train))
    y = channel_shuffle(y, self.first_groups)
    y = conv(mid, kernel_size=3, strides=self.strides, groups=mid, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y, train))
    y = conv(self.features, kernel_size=1, groups=self.groups, name="conv3")(y)
    y = norm(name="bn3")(y, train)
    if self.strides == 2:
      preact = jnp.concatenate([y, layers.avg_pool(x, 3, 2, padding=1)], axis=-1)
    else:
      preact = y + x
    return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
  """RepDistiller's CIFAR ShuffleNet v1: 1x1 stem, three stages of shuffle units, pool, classifier."""

  num_classes: int
  stage_features: tuple[int, ...] = (240, 480, 960)
  stage_sizes: tuple[int, ...] = (4, 8, 4)
  groups: int = 3
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    features = {}
    x = layers.Conv(_STEM_FEATURES, kernel_size=1, dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="stem_bn")(x, train))
    features["stem"] = x

    for i, (out_features, size) in enumerate(zip(self.stage_features, self.stage_sizes, strict=True)):
      for j in range(size):
        in_features = x.shape[-1]
        x, preact = ShuffleV1Unit(
            features=out_features - in_features if j == 0 else out_features,
            strides=2 if j == 0 else 1,
            groups=self.groups,
            # RepDistiller's rule is "in_planes == 24", i.e. only the unit fed by the stem.
            first_groups=1 if in_features == _STEM_FEATURES else self.groups,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name=f"stage{i + 1}_unit{j}",
        )(x, train)
      features[f"stage{i + 1}"] = x
      features[f"stage{i + 1}_preact"] = preact

    x = layers.global_avg_pool(x)
    features["pooled"] = x
    logits = layers.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return logits, features


class ShuffleV2BasicUnit(nn.Module):
  """One ShuffleNet v2 basic (stride-1) unit; returns (shuffled output, unshuffled pre-ReLU output).

  Owns the transformed half's three convolutions and BatchNorms; the other half passes through.
  """

  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    split = x.shape[-1] // 2
    passthrough, y = x[..., :split], x[..., split:]
    width = y.shape[-1]
    conv = functools.partial(layers.Conv, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)

    y = conv(width, kernel_size=1, name="conv1")(y)
    y = nn.relu(norm(name="bn1")(y, train))
    y = conv(width, kernel_size=3, groups=width, name="conv2")(y)
    y = norm(name="bn2")(y, train)
    y = conv(width, kernel_size=1, name="conv3")(y)
    y = norm(name="bn3")(y, train)
    preact = jnp.concatenate([passthrough, y], axis=-1)
    out = channel_shuffle(jnp.concatenate([passthrough, nn.relu(y)], axis=-1), 2)
    return out, preact


class ShuffleV2DownUnit(nn.Module):
  """The ShuffleNet v2 down-sampling unit: two stride-2 branches of `features // 2` channels, shuffled."""

  features: int
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    in_features = x.shape[-1]
    mid = self.features // 2
    conv = functools.partial(layers.Conv, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)

    left = conv(in_features, kernel_size=3, strides=2, groups=in_features, name="conv1")(x)
    left = norm(name="bn1")(left, train)
    left = conv(mid, kernel_size=1, name="conv2")(left)
    left = nn.relu(norm(name="bn2")(left, train))

    right = conv(mid, kernel_size=1, name="conv3")(x)
    right = nn.relu(norm(name="bn3")(right, train))
    right = conv(mid, kernel_size=3, strides=2, groups=mid, name="conv4")(right)
    right = norm(name="bn4")(right, train)
    right = conv(mid, kernel_size=1, name="conv5")(right)
    right = nn.relu(norm(name="bn5")(right, train))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """RepDistiller's CIFAR ShuffleNet v2: 1x1 stem, three stages, 1x1 head conv, pool, classifier."""

  num_classes: int
  stage_features: tuple[int, ...] = (116, 232, 464)
  stage_sizes: tuple[int, ...] = (3, 7, 3)
  head_features: int = 1024
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)
    features = {}
    x = layers.Conv(_STEM_FEATURES, kernel_size=1, dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x, train))
    features["stem"] = x

    for i, (out_features, size) in enumerate(zip(self.stage_features, self.stage_sizes, strict=True)):
      x = ShuffleV2DownUnit(out_features, dtype=self.dtype, axis_name=self.axis_name,
                            name=f"stage{i + 1}_down")(x, train)
      for j in range(size):
        x, preact = ShuffleV2BasicUnit(dtype=self.dtype, axis_name=self.axis_name,
                                       name=f"stage{i + 1}_unit{j}")(x, train)
      features[f"stage{i + 1}"] = x
      features[f"stage{i + 1}_preact"] = preact

    x = layers.Conv(self.head_features, kernel_size=1, dtype=self.dtype, name="head_conv")(x)
    x = nn.relu(norm(name="head_bn")(x, train))
    features["head"] = x

    x = layers.global_avg_pool(x)
    features["pooled"] = x
    logits = layers.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return logits, features


MODELS: dict[str, Callable[..., nn.Module]] = {
    # RepDistiller's ShuffleV1: cfg out_planes (240, 480, 960), num_blocks (4, 8, 4), groups 3.
    "ShuffleV1": functools.partial(ShuffleNetV1, stage_features=(240, 480, 960), stage_sizes=(4, 8, 4),
                                   groups=3),
    # RepDistiller's ShuffleV2: ShuffleNetV2(net_size=1), out_channels (116, 232, 464, 1024),
    # num_blocks (3, 7, 3).
    "ShuffleV2": functools.partial(ShuffleNetV2, stage_features=(116, 232, 464), stage_sizes=(3, 7, 3),
                                   head_features=1024),
}

"""Post-activation residual blocks and the ResNet body shared by three families.

RepDistiller's CIFAR ResNets (`cifar_resnet`), RepDistiller's CIFAR `ResNet50` (`resnetv2`) and
torchvision's ImageNet ResNets (`resnet`) are one network (He et al. 2015) with different stems, stage
counts and widths: a stem, stages of residual blocks whose first block strides by 2 (except in stage 1),
a global average pool and a linear classifier. This module holds that network once:

* `BasicBlock`: conv3x3 (stride) - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU.
* `Bottleneck`: conv1x1 - BN - ReLU - conv3x3 (stride, torchvision's "v1.5" and RepDistiller's
  placement) - BN - ReLU - conv1x1 (x4 channels) - BN, plus the shortcut, then ReLU.
* The shortcut is the identity, or a 1x1 strided convolution + BN (`downsample_conv` /
  `downsample_bn`) whenever the block changes the stride or the width.
* `ResNet`: the "cifar" stem (3x3 stride-1 conv-BN-ReLU) or the "imagenet" stem (7x7 stride-2
  conv-BN-ReLU, then a 3x3 stride-2 max pool with padding 1), the stages, the pool and `fc`.

Module names follow torchvision's (`conv1`, `bn1`, `layer{i}_{j}` for block j of stage i, 1-based i and
0-based j, `downsample_*`, `fc`), so PyTorch weights of all three families map one to one.

Every block returns (output after its final ReLU, the residual sum before it); `ResNet` records them
as the taps `stage{i}` and `stage{i}_preact` of each stage's last block, after `stem` (the stem's
activated output, before any max pool), and before `pooled` (the (B, C) vector fed to `fc`).
"""

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from nst_jax.models import layers

Dtype = Any

STEMS = ("cifar", "imagenet")


def _shortcut(x, out_features: int, strides: int, train: bool, conv, norm):
  """Identity, or the 1x1 conv + BN projection when the stride or the width changes."""
  if strides == 1 and x.shape[-1] == out_features:
    return x
  y = conv(out_features, 1, strides, name="downsample_conv")(x)
  return norm(name="downsample_bn")(y, train)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers and a shortcut; returns (output after ReLU, residual sum before it)."""

  expansion: ClassVar[int] = 1

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(layers.Conv, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)

    y = conv(self.features, 3, self.strides, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y, train))
    y = conv(self.features, 3, name="conv2")(y)
    y = norm(name="bn2")(y, train)

    preact = y + _shortcut(x, self.features, self.strides, train, conv, norm)
    return nn.relu(preact), preact


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand x4, each with BN; returns (output, residual sum)."""

  expansion: ClassVar[int] = 4

  features: int  # The bottleneck width; the block outputs `expansion * features` channels.
  strides: int = 1
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(layers.Conv, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)
    out_features = self.features * self.expansion

    y = conv(self.features, 1, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y, train))
    y = conv(self.features, 3, self.strides, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y, train))
    y = conv(out_features, 1, name="conv3")(y)
    y = norm(name="bn3")(y, train)

    preact = y + _shortcut(x, out_features, self.strides, train, conv, norm)
    return nn.relu(preact), preact


class ResNet(nn.Module):
  """Stem, stages of `block`s (stride 1 in stage 1, 2 at the start of every later one), pool and `fc`.

  `stage_features[i]` is the `features` of stage i + 1's blocks (a Bottleneck's inner width);
  `stem_features` the stem convolution's output channels.
  """

  block: type[nn.Module]
  stage_sizes: Sequence[int]
  stage_features: Sequence[int]
  num_classes: int
  stem_features: int = 64
  stem: str = "cifar"
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    if self.stem not in STEMS:
      raise ValueError(f"Unknown ResNet stem {self.stem!r}. Valid stems: {', '.join(STEMS)}.")
    if len(self.stage_sizes) != len(self.stage_features):
      raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and stage_features "
                       f"{tuple(self.stage_features)} must have the same length.")
    features = {}
    imagenet = self.stem == "imagenet"
    x = layers.Conv(self.stem_features, 7 if imagenet else 3, 2 if imagenet else 1, dtype=self.dtype,
                    name="conv1")(x)
    x = layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="bn1")(x, train)
    x = nn.relu(x)
    features["stem"] = x
    if imagenet:
      x = layers.max_pool(x, 3, 2, padding=1)

    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.stage_features, strict=True),
                                                start=1):
      for i in range(num_blocks):
        strides = 2 if stage > 1 and i == 0 else 1
        x, preact = self.block(width, strides, dtype=self.dtype, axis_name=self.axis_name,
                               name=f"layer{stage}_{i}")(x, train)
      features[f"stage{stage}"] = x
      features[f"stage{stage}_preact"] = preact

    x = layers.global_avg_pool(x)
    features["pooled"] = x
    logits = layers.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return logits, features

"""torchvision's ImageNet ResNets: `resnet18`, `resnet34`, `resnet50`, `resnet101`.

Architecture (torchvision `models/resnet.py`, the "v1.5" layout): a 7x7/2 convolution + BatchNorm + ReLU
stem, a 3x3/2 max pool (padding 1), four stages of post-activation residual blocks with widths
64 / 128 / 256 / 512 and strides 1 / 2 / 2 / 2, a global average pool and a fully connected classifier.
`resnet18` / `resnet34` use BasicBlocks (two 3x3 convolutions, [2, 2, 2, 2] / [3, 4, 6, 3] blocks);
`resnet50` / `resnet101` use Bottlenecks (1x1 reduce, 3x3, 1x1 expand x4, [3, 4, 6, 3] / [3, 4, 23, 3]
blocks) with the stride on the 3x3 convolution (v1.5; the original paper strided the first 1x1). A
stage's first block gets a 1x1 convolution + BN shortcut whenever it changes the stride or the width.
Parameter counts equal torchvision's at every `num_classes`; module names follow torchvision's
(`conv1`, `bn1`, `layer{i}_{j}`, `downsample_conv` / `downsample_bn`, `fc`) so weights map one to one.

Feature taps:

* `stem`: the stem conv-BN-ReLU output, before the max pool, (B, 112, 112, 64) at 224 px.
* `stage{i}` (i = 1 ... 4): output of stage i after its last block's final ReLU.
* `stage{i}_preact`: the last block's residual sum before that ReLU (RepDistiller's `preact=True`).
* `pooled`: the globally averaged (B, 512 * expansion) vector fed to `fc`.

Spatial sizes for 224 px inputs: stages 1 / 2 / 3 / 4 at 56 / 28 / 14 / 7; channels 64 / 128 / 256 / 512
(BasicBlock) or 256 / 512 / 1024 / 2048 (Bottleneck).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from nst_jax.models import layers

Dtype = Any


def _shortcut(x, out_features: int, strides: int, train: bool, conv, norm):
  """Identity, or torchvision's 1x1 conv + BN `downsample` when the stride or width changes."""
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
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand x4, each with BN; returns (output, residual sum)."""

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
  """The whole network: 7x7/2 stem, max pool, four stages of `block`s, global pool and `fc`."""

  block: type[nn.Module]
  stage_sizes: Sequence[int]
  num_classes: int
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    features = {}
    x = layers.Conv(64, 7, 2, dtype=self.dtype, name="conv1")(x)
    x = layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="bn1")(x, train)
    x = nn.relu(x)
    features["stem"] = x
    x = layers.max_pool(x, 3, 2, padding=1)

    for stage, num_blocks in enumerate(self.stage_sizes, start=1):
      width = 64 * 2 ** (stage - 1)
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


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2)),
    "resnet34": functools.partial(ResNet, block=BasicBlock, stage_sizes=(3, 4, 6, 3)),
    "resnet50": functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3)),
    "resnet101": functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 23, 3)),
}

"""RepDistiller's CIFAR ResNets (BasicBlock): `resnet8` ... `resnet110`, `resnet8x4`, `resnet32x4`.

Architecture (HobbitLong/RepDistiller `models/resnet.py`, itself after fb.resnet.torch): a 3x3
stem convolution + BatchNorm + ReLU, three stages of n = (depth - 2) / 6 post-activation
BasicBlocks (conv3x3-BN-ReLU-conv3x3-BN, add the shortcut, ReLU) with strides 1 / 2 / 2, an 8x8
average pool and a fully connected classifier. Widths (stem, stage1, stage2, stage3) are
(16, 16, 32, 64) for the plain networks and (32, 64, 128, 256) for the `x4` ones; a stage's first
block gets a 1x1 convolution + BN shortcut whenever it changes the stride or the width (so the `x4`
networks have one in stage 1 too).
The 8x8 pool sizes the networks for 32x32 inputs (CIFAR), like the original.

Feature taps (RepDistiller's `is_feat` list is [stem, stage1, stage2, stage3, pooled]; `preact=True`
swaps in the `_preact` versions):

* `stem`: stem conv-BN-ReLU output, (B, 32, 32, w0).
* `stage{i}` (i = 1, 2, 3): output of stage i after its last block's final ReLU.
* `stage{i}_preact`: the last block's residual sum before that ReLU (RepDistiller's `preact=True`).
* `pooled`: the average-pooled (B, w3) vector fed to `fc`.

Spatial sizes for 32x32 inputs: stages 1 / 2 / 3 at 32 / 16 / 8.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nst_jax.models import layers

Dtype = Any


class BasicBlock(nn.Module):
  """One post-activation residual block; returns (output after ReLU, residual sum before it)."""

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(layers.Conv, self.features, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)

    y = conv(3, self.strides, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y, train))
    y = conv(3, name="conv2")(y)
    y = norm(name="bn2")(y, train)

    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(1, self.strides, name="downsample_conv")(x)
      shortcut = norm(name="downsample_bn")(shortcut, train)

    preact = y + shortcut
    return nn.relu(preact), preact


class CifarResNet(nn.Module):
  """The whole network: stem, three stages of BasicBlocks, 8x8 average pool and `fc`.

  `widths` is (stem, stage1, stage2, stage3), RepDistiller's `num_filters`.
  """

  depth: int
  widths: Sequence[int]
  num_classes: int
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    if (self.depth - 2) % 6 != 0:
      raise ValueError(f"BasicBlock CIFAR ResNets need depth = 6n + 2, got {self.depth}.")
    blocks_per_stage = (self.depth - 2) // 6
    features = {}

    x = layers.Conv(self.widths[0], 3, dtype=self.dtype, name="conv1")(x)
    x = layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="bn1")(x, train)
    x = nn.relu(x)
    features["stem"] = x

    for stage, (width, stride) in enumerate(zip(self.widths[1:], (1, 2, 2), strict=True), start=1):
      for i in range(blocks_per_stage):
        x, preact = BasicBlock(width, stride if i == 0 else 1, dtype=self.dtype,
                               axis_name=self.axis_name, name=f"layer{stage}_{i}")(x, train)
      features[f"stage{stage}"] = x
      features[f"stage{stage}_preact"] = preact

    # PyTorch's AvgPool2d(8) then flatten; a single 1x1 cell at CIFAR resolution.
    x = layers.avg_pool(x, 8, 8)
    x = x.reshape(x.shape[0], -1)
    features["pooled"] = x
    logits = layers.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return logits, features


_PLAIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": functools.partial(CifarResNet, depth=d, widths=_PLAIN)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": functools.partial(CifarResNet, depth=8, widths=_X4),
    "resnet32x4": functools.partial(CifarResNet, depth=32, widths=_X4),
}

"""RepDistiller's Wide ResNets for CIFAR: `wrn_16_1`, `wrn_16_2`, `wrn_40_1`, `wrn_40_2`.

Architecture (HobbitLong/RepDistiller `models/wrn.py`, after Zagoruyko and Komodakis): a bare
3x3 stem convolution to 16 channels (no BatchNorm or ReLU of its own), three stages of
n = (depth - 4) / 6 pre-activation blocks with widths 16k / 32k / 64k and strides 1 / 2 / 2, a
final BatchNorm + ReLU, an 8x8 average pool and a fully connected classifier (k is the widen
factor). A block computes a = ReLU(BN(x)), y = conv3x3(ReLU(BN(conv3x3(a)))) and returns
y + shortcut, where the shortcut is x itself when the width is unchanged and a 1x1 convolution of
the *activated* input a otherwise (so in a width-changing block the BN-ReLU is shared by both
paths). Dropout is omitted: RepDistiller's constructors leave its rate at 0. The 8x8 pool sizes
the networks for 32x32 inputs (CIFAR).

Feature taps. A pre-activation network has no activation at the end of a stage: the stage output
is a residual sum, and the BN-ReLU that activates it belongs to whatever consumes it (the next
stage's first block, or the final BN-ReLU after stage 3). The taps follow RepDistiller's
`forward(is_feat=True)`:

* `stem`: the stem convolution's output, (B, 32, 32, 16); no activation (RepDistiller's f0).
* `stage{i}` (i = 1, 2, 3): stage i's raw output, the last block's residual sum before any
  BN-ReLU. This is RepDistiller's `is_feat` feature with `preact=False`, the one its feature
  losses (NST, AT, FitNet, ...) distill, so a WRN `stage{i}` is *not* a post-ReLU map, unlike the
  other families.
* `stage{i}_preact`: that output through the BatchNorm that consumes it, before its ReLU: the first
  block's `bn1` of stage i + 1 for i = 1, 2 and the final `bn1` for i = 3. This is RepDistiller's
  `preact=True` feature (`get_bn_before_relu`). RepDistiller recomputes it by calling those
  BatchNorms a second time, which in training updates their running statistics twice; here it is
  the value the network itself computes, and each BatchNorm runs once.
* `stage{i}_relu` (extra): ReLU of `stage{i}_preact`, the activated stage output that the next
  stage's convolutions (or, for i = 3, the pool) actually see.
* `pooled`: the average-pooled (B, 64k) vector fed to `fc`.

Spatial sizes for 32x32 inputs: stages 1 / 2 / 3 at 32 / 16 / 8.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nst_jax.models import layers

Dtype = Any


class WideBasicBlock(nn.Module):
  """One pre-activation block; returns (residual sum, BN(x) before its ReLU: the input's preact)."""

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(layers.Conv, self.features, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)

    input_preact = norm(name="bn1")(x, train)
    a = nn.relu(input_preact)
    y = conv(3, self.strides, name="conv1")(a)
    y = nn.relu(norm(name="bn2")(y, train))
    y = conv(3, name="conv2")(y)

    if x.shape[-1] == self.features:
      shortcut = x
    else:
      shortcut = conv(1, self.strides, name="conv_shortcut")(a)
    return y + shortcut, input_preact


class WideResNet(nn.Module):
  """The whole network: stem conv, three stages of pre-activation blocks, BN-ReLU, pool, `fc`."""

  depth: int
  widen_factor: int
  num_classes: int
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    if (self.depth - 4) % 6 != 0:
      raise ValueError(f"Wide ResNets need depth = 6n + 4, got {self.depth}.")
    blocks_per_stage = (self.depth - 4) // 6
    k = self.widen_factor
    features = {}

    x = layers.Conv(16, 3, dtype=self.dtype, name="conv1")(x)
    features["stem"] = x

    widths = (16 * k, 32 * k, 64 * k)
    for stage, (width, stride) in enumerate(zip(widths, (1, 2, 2), strict=True), start=1):
      for i in range(blocks_per_stage):
        x, input_preact = WideBasicBlock(width, stride if i == 0 else 1, dtype=self.dtype,
                                         axis_name=self.axis_name,
                                         name=f"block{stage}_{i}")(x, train)
        if stage > 1 and i == 0:
          # The first block of this stage normalises the previous stage's output.
          features[f"stage{stage - 1}_preact"] = input_preact
      features[f"stage{stage}"] = x

    preact = layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="bn1")(x, train)
    features["stage3_preact"] = preact
    x = nn.relu(preact)
    for stage in (1, 2, 3):
      features[f"stage{stage}_relu"] = nn.relu(features[f"stage{stage}_preact"])

    # F.avg_pool2d(out, 8) then flatten; a single 1x1 cell at CIFAR resolution.
    x = layers.avg_pool(x, 8, 8)
    x = x.reshape(x.shape[0], -1)
    features["pooled"] = x
    logits = layers.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return logits, features


MODELS: dict[str, Callable[..., nn.Module]] = {
    f"wrn_{d}_{k}": functools.partial(WideResNet, depth=d, widen_factor=k)
    for d in (16, 40) for k in (1, 2)
}

"""ResNet-50 for CIFAR as in RepDistiller (`models/resnetv2.py`, the `ResNet50` teacher).

Despite the file name this is a standard post-activation ResNet (He et al. 2015), not the pre-activation
"ResNet v2": ImageNet stage widths with a CIFAR stem. A 3x3 stride-1 conv-BN-ReLU stem to 64 channels
(no max-pool), four stages of bottleneck blocks [3, 4, 6, 3] with widths 64 / 128 / 256 / 512 (outputs
x4 = 256 / 512 / 1024 / 2048) and first strides 1 / 2 / 2 / 2, global average pooling and a linear
classifier. A bottleneck is 1x1 - BN - ReLU - 3x3 (stride) - BN - ReLU - 1x1 - BN, plus a shortcut
(identity, or 1x1 strided conv + BN when the shape changes), then ReLU. The stride sits on the 3x3 conv.
23,705,252 parameters with num_classes=100. RepDistiller's optional zero-initialised last BatchNorm
(`zero_init_residual`) is off by default there and is not reproduced.

Feature taps (`features` dict), following RepDistiller's `is_feat=True, preact=True` list:

* `stem`: the stem conv-BN-ReLU output (f0), 32 x 32 x 64 at 32 x 32 input.
* `stage{i}` (i = 1..4): stage i's output (f1..f4): 32 x 32 x 256, 16 x 16 x 512, 8 x 8 x 1024,
  4 x 4 x 2048.
* `stage{i}_preact`: the last block's residual sum (last BN output + shortcut) before its final ReLU.
* `pooled`: the (B, 2048) vector fed to the classifier (f5).
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nst_jax.models import layers

Dtype = Any

_EXPANSION = 4


class Bottleneck(nn.Module):
  """One bottleneck block; returns (output, residual sum before the final ReLU).

  Owns the block's three convolutions and BatchNorms and, when the shape changes, the projection shortcut.
  """

  width: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    out_features = self.width * _EXPANSION
    conv = functools.partial(layers.Conv, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)

    y = conv(self.width, kernel_size=1, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y, train))
    y = conv(self.width, kernel_size=3, strides=self.strides, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y, train))
    y = conv(out_features, kernel_size=1, name="conv3")(y)
    y = norm(name="bn3")(y, train)

    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = conv(out_features, kernel_size=1, strides=self.strides, name="shortcut_conv")(x)
      shortcut = norm(name="shortcut_bn")(shortcut, train)
    preact = y + shortcut
    return nn.relu(preact), preact


class ResNet(nn.Module):
  """RepDistiller's resnetv2.ResNet with bottleneck blocks: 3x3 stem, four stages, pool, classifier.

  `width` is the first stage's bottleneck width (64 in RepDistiller; stage i uses width * 2**(i-1)).
  """

  num_classes: int
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    features = {}
    x = layers.Conv(self.width, kernel_size=3, dtype=self.dtype, name="stem_conv")(x)
    x = nn.relu(layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="stem_bn")(x, train))
    features["stem"] = x

    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        x, preact = Bottleneck(
            width=self.width * 2**i,
            strides=2 if i > 0 and j == 0 else 1,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name=f"stage{i + 1}_block{j}",
        )(x, train)
      features[f"stage{i + 1}"] = x
      features[f"stage{i + 1}_preact"] = preact

    x = layers.global_avg_pool(x)
    features["pooled"] = x
    logits = layers.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return logits, features


MODELS: dict[str, Callable[..., nn.Module]] = {
    # RepDistiller's ResNet50 = ResNet(Bottleneck, [3, 4, 6, 3]).
    "ResNet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), width=64),
}

"""RepDistiller's CIFAR VGGs with BatchNorm: `vgg8`, `vgg11`, `vgg13`, `vgg16`, `vgg19`.

Architecture (HobbitLong/RepDistiller `models/vgg.py`; its model zoo maps these names to the `_bn`
variants): five blocks of 3x3 convolutions (with bias) each followed by BatchNorm and ReLU, 2x2
max pools after blocks 0, 1 and 2, a global average pool and one fully connected layer
(512 -> classes); the VGG fully connected head is gone. A fourth max pool after block 3 runs only
for 64x64 inputs, as in RepDistiller, so at 32x32 blocks 3 and 4 both run at 4x4. Block widths:

* `vgg8` (cfg S): [64], [128], [256], [512], [512]
* `vgg11` (cfg A): [64], [128], [256, 256], [512, 512], [512, 512]
* `vgg13` (cfg B): [64, 64], [128, 128], [256, 256], [512, 512], [512, 512]
* `vgg16` (cfg D): [64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3
* `vgg19` (cfg E): [64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4

Feature taps (RepDistiller's `is_feat` list is [stem, stage1, ..., stage4, pooled]):

* `stem`: block 0's output after its ReLU, before the first pool, (B, 32, 32, 64).
* `stage{i}` (i = 1, ..., 4): block i's output after its last ReLU, before any pool.
* `stage{i}_preact`: block i's last BatchNorm output, before that ReLU (RepDistiller's
  `preact=True`).
* `pooled`: the globally averaged (B, 512) vector fed to `classifier`.

Spatial sizes for 32x32 inputs: stem 32, stages 1 / 2 / 3 / 4 at 16 / 8 / 4 / 4.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nst_jax.models import layers

Dtype = Any


class VGGBlock(nn.Module):
  """conv3x3-BN-ReLU repeated; the last ReLU is left to the caller, which taps the preact."""

  widths: Sequence[int]
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    for j, width in enumerate(self.widths):
      if j > 0:
        x = nn.relu(x)
      x = layers.Conv(width, 3, use_bias=True, dtype=self.dtype, name=f"conv{j}")(x)
      x = layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name=f"bn{j}")(x, train)
    return x


class VGG(nn.Module):
  """The whole network: five `VGGBlock`s with max pools between them, global pool, `classifier`."""

  config: Sequence[Sequence[int]]
  num_classes: int
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    block = functools.partial(VGGBlock, dtype=self.dtype, axis_name=self.axis_name)
    input_size = x.shape[1]
    features = {}

    x = nn.relu(block(self.config[0], name="block0")(x, train))
    features["stem"] = x
    x = layers.max_pool(x, 2, 2)

    for i in range(1, 5):
      x = block(self.config[i], name=f"block{i}")(x, train)
      features[f"stage{i}_preact"] = x
      x = nn.relu(x)
      features[f"stage{i}"] = x
      # RepDistiller pools after blocks 0-2 always, after block 3 only for 64x64 inputs.
      if i < 3 or (i == 3 and input_size == 64):
        x = layers.max_pool(x, 2, 2)

    x = layers.global_avg_pool(x)
    features["pooled"] = x
    logits = layers.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return logits, features


CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}

MODELS: dict[str, Callable[..., nn.Module]] = {
    name: functools.partial(VGG, config=config) for name, config in CONFIGS.items()
}

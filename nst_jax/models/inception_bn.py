"""Inception-BN (Ioffe and Szegedy 2015), the official NST student: `inception_bn`, `inception_bn_cifar`.

Architecture as in TuSimple/neuron-selectivity-transfer `symbol/inception_bn.py` (MXNet):

* `bn_data`: a BatchNorm on the input with MXNet's `fix_gamma=True` (scale pinned to 1, only the offset
  learns), which normalises raw pixels.
* Stem: 7x7/2 conv (64) -> 3x3/2 max pool -> 1x1 conv (64) -> 3x3 conv (192) -> 3x3/2 max pool. The
  pools have no padding and round down (MXNet's "valid" convention), so 224 px gives 112 / 55 / 27.
* Ten inception blocks. Type A (3a, 3b, 4a-4d, 5a, 5b) concatenates four stride-1 branches: 1x1; 1x1
  reduce -> 3x3; 1x1 reduce -> 3x3 -> 3x3; a 3x3 pool (average, padding counted, except max in 5b)
  -> 1x1 projection. Type B (3c, 4e) halves the resolution: 1x1 reduce -> 3x3/2; 1x1 reduce -> 3x3 ->
  3x3/2; a 3x3/2 max pool of the input, all padded by 1. Channels out: 3a 256, 3b 320, 3c 576, 4a 576,
  4b 576, 4c 608, 4d 608, 4e 1056, 5a 1024, 5b 1024.
* Global average pool (the symbol's 7x7 pool at 224 px) and a fully connected classifier `fc1`.

Every convolution is conv-BN-ReLU, and the convolutions keep their biases: the symbol never sets
MXNet's `no_bias`, whose default is False. That gives 11,295,243 parameters at 1000 classes: osmr's
BN-Inception (11,295,240, also with conv biases) plus the 3 `bn_data` offsets. MXNet's BatchNorm epsilon
is 2e-5 here; `layers.BatchNorm` uses PyTorch's 1e-5.

`inception_bn_cifar`: the paper does not describe its CIFAR variant. This one keeps every inception
block and the stem's 1x1 / 3x3 convolutions but makes the first convolution a 3x3/1 (padding 1) and
drops both stem max pools and `bn_data` (CIFAR inputs arrive normalised), so a 32 px image stays
32 x 32 up to block 3c and the blocks run at 32 / 16 / 8 instead of 27 / 14 / 7. The 3x3 first
convolution saves 7,680 weights (and `bn_data` 3): 10,272,810 parameters at 10 classes, 10,365,060
at 100.

Feature taps (spatial sizes at 224 px / CIFAR 32 px):

* `stem`: the stem's last activation, the 3x3 conv-BN-ReLU before the second max pool, (B, 55, 55, 192)
  / (B, 32, 32, 192).
* `in3a` ... `in5b`: each block's concatenated branch outputs before the branches' final ReLU: the
  pre-ReLU BatchNorm outputs, plus the max-pool branch in 3c / 4e (its input is already rectified).
  `in5b`, (B, 7, 7, 1024) at 224 px, is the official NST student layer (the symbol's `in5b_bn`).
* `in3a_relu` ... `in5b_relu`: each block's output, ReLU of the above, what the next block reads.
* `stage{i}` / `stage{i}_preact`: blocks grouped by resolution, the downsampling block opening a stage
  as in a ResNet: stage 1 = 3a, 3b (320 channels, 27 / 32 px); stage 2 = 3c, 4a-4d (608, 14 / 16 px);
  stage 3 = 4e, 5a, 5b (1024, 7 / 8 px). `stage{i}` is the last block's `_relu` tap, `stage{i}_preact`
  its pre-ReLU tap (so `stage3_preact` is `in5b`). This lines stages up with the ResNet teachers'
  last three stages at both resolutions.
* `pooled`: the globally averaged (B, 1024) vector fed to `fc1`.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nst_jax.models import layers

Dtype = Any

# (name, type, branch widths): A = (1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3, pool, proj),
# B = (3x3 reduce, 3x3, double 3x3 reduce, double 3x3); widths from the official symbol.
_BLOCKS = (
    ("3a", "A", (64, 64, 64, 64, 96, "avg", 32)),
    ("3b", "A", (64, 64, 96, 64, 96, "avg", 64)),
    ("3c", "B", (128, 160, 64, 96)),
    ("4a", "A", (224, 64, 96, 96, 128, "avg", 128)),
    ("4b", "A", (192, 96, 128, 96, 128, "avg", 128)),
    ("4c", "A", (160, 128, 160, 128, 160, "avg", 128)),
    ("4d", "A", (96, 128, 192, 160, 192, "avg", 128)),
    ("4e", "B", (128, 192, 192, 256)),
    ("5a", "A", (352, 192, 320, 160, 224, "avg", 128)),
    ("5b", "A", (352, 192, 320, 192, 224, "max", 128)),
)
# The last block of each stage (see the module docstring).
_STAGE_ENDS = ("3b", "4d", "5b")


class ConvBN(nn.Module):
  """The symbol's `ConvFactory` without its ReLU: a biased convolution and BatchNorm (pre-ReLU out)."""

  features: int
  kernel_size: int = 1
  strides: int = 1
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.Conv(self.features, self.kernel_size, self.strides, use_bias=True, dtype=self.dtype,
                    name="conv")(x)
    return layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="bn")(x, train)


class InceptionA(nn.Module):
  """Four stride-1 branches; returns the concatenation of their pre-ReLU outputs."""

  num_1x1: int
  num_3x3_reduce: int
  num_3x3: int
  num_double_3x3_reduce: int
  num_double_3x3: int
  pool: str  # "avg" or "max"
  num_proj: int
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    cbn = functools.partial(ConvBN, dtype=self.dtype, axis_name=self.axis_name)

    b1 = cbn(self.num_1x1, name="1x1")(x, train)
    b2 = nn.relu(cbn(self.num_3x3_reduce, name="3x3_reduce")(x, train))
    b2 = cbn(self.num_3x3, 3, name="3x3")(b2, train)
    b3 = nn.relu(cbn(self.num_double_3x3_reduce, name="double_3x3_reduce")(x, train))
    b3 = nn.relu(cbn(self.num_double_3x3, 3, name="double_3x3_0")(b3, train))
    b3 = cbn(self.num_double_3x3, 3, name="double_3x3_1")(b3, train)
    pool = layers.avg_pool if self.pool == "avg" else layers.max_pool
    b4 = cbn(self.num_proj, name="proj")(pool(x, 3, 1, padding=1), train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionB(nn.Module):
  """Two strided conv branches and a strided max pool; returns the concatenation before ReLU."""

  num_3x3_reduce: int
  num_3x3: int
  num_double_3x3_reduce: int
  num_double_3x3: int
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    cbn = functools.partial(ConvBN, dtype=self.dtype, axis_name=self.axis_name)

    b1 = nn.relu(cbn(self.num_3x3_reduce, name="3x3_reduce")(x, train))
    b1 = cbn(self.num_3x3, 3, 2, name="3x3")(b1, train)
    b2 = nn.relu(cbn(self.num_double_3x3_reduce, name="double_3x3_reduce")(x, train))
    b2 = nn.relu(cbn(self.num_double_3x3, 3, name="double_3x3_0")(b2, train))
    b2 = cbn(self.num_double_3x3, 3, 2, name="double_3x3_1")(b2, train)
    # The input is a block output (already rectified), so the ReLU the caller applies leaves this
    # branch unchanged, exactly as the symbol concatenates the raw pool.
    b3 = layers.max_pool(x, 3, 2, padding=1)
    return jnp.concatenate([b1, b2, b3], axis=-1)


class InceptionBN(nn.Module):
  """The whole network: optional `bn_data`, stem, ten inception blocks, global pool and `fc1`.

  `cifar_stem` swaps the 7x7/2 first convolution and both stem max pools for a 3x3/1 convolution.
  """

  num_classes: int
  cifar_stem: bool = False
  input_bn: bool = True
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    cbn = functools.partial(ConvBN, dtype=self.dtype, axis_name=self.axis_name)
    features = {}

    if self.input_bn:
      # MXNet's fix_gamma=True input BatchNorm: offset only.
      x = layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, use_scale=False,
                           name="bn_data")(x, train)
    if self.cifar_stem:
      x = nn.relu(cbn(64, 3, name="conv_1")(x, train))
    else:
      x = nn.relu(cbn(64, 7, 2, name="conv_1")(x, train))
      x = layers.max_pool(x, 3, 2)
    x = nn.relu(cbn(64, 1, name="conv_2_red")(x, train))
    x = nn.relu(cbn(192, 3, name="conv_2")(x, train))
    features["stem"] = x
    if not self.cifar_stem:
      x = layers.max_pool(x, 3, 2)

    stage = 1
    for name, kind, widths in _BLOCKS:
      block = InceptionA if kind == "A" else InceptionB
      preact = block(*widths, dtype=self.dtype, axis_name=self.axis_name, name=f"in{name}")(x, train)
      x = nn.relu(preact)
      features[f"in{name}"] = preact
      features[f"in{name}_relu"] = x
      if name in _STAGE_ENDS:
        features[f"stage{stage}"] = x
        features[f"stage{stage}_preact"] = preact
        stage += 1

    x = layers.global_avg_pool(x)
    features["pooled"] = x
    logits = layers.Dense(self.num_classes, dtype=self.dtype, name="fc1")(x)
    return logits, features


MODELS: dict[str, Callable[..., nn.Module]] = {
    "inception_bn": InceptionBN,
    "inception_bn_cifar": functools.partial(InceptionBN, cifar_stem=True, input_bn=False),
}

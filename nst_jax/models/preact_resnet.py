"""Pre-activation bottleneck ResNets: `preact_resnet164`, `preact_resnet1001` (CIFAR), `preact_resnet101`.

He et al. 2016, "Identity Mappings in Deep Residual Networks", in the MXNet layout of tornadomeet/ResNet
(`symbol_resnet.py`), whose ImageNet ResNet-101 is the official NST teacher (TuSimple's code sets its
BatchNorm epsilon "to match tornadomeet's teacher model"). Every residual unit is a bottleneck of three
BN-ReLU-conv steps (1x1 to width / 4, 3x3, 1x1 to width) added to its shortcut; nothing follows the
sum. A stage's first unit applies its first BN-ReLU once and feeds the result to both the residual
branch and a 1x1 projection shortcut (He et al.'s "both preact" units); later units use the identity.
The stride sits on the 3x3 convolution, as in tornadomeet's and fb.resnet.torch's code (KaimingHe's
Torch release strides the first 1x1; parameter counts do not depend on it). After the last stage come
a final BN-ReLU, a global average pool and a fully connected classifier. Convolutions have no bias.

* CIFAR (`preact_resnet164`, `preact_resnet1001`): a 3x3 convolution to 16 channels (no BN or ReLU: the
  first unit's pre-activation is its activation), then 3 stages of (depth - 2) / 9 units (18 / 111)
  with bottleneck widths 16 / 32 / 64, outputs 64 / 128 / 256, strides 1 / 2 / 2. Parameters at
  num_classes = 10: 1,703,258 and 10,327,706. He et al. print 1.7 M and 10.2 M; the exact 1001-layer
  count is 10.33 M (osmr/imgclsmob's PreResNet-1001 table gives the same 10,327,706).
* ImageNet (`preact_resnet101`): tornadomeet's input BatchNorm `bn_data` (MXNet `fix_gamma=True`: the
  scale is pinned to 1 and only the offset learns, which normalises raw pixels), a 7x7/2 convolution to
  64 channels with BN-ReLU, a 3x3/2 max pool (padding 1), then [3, 4, 23, 3] units with outputs
  256 / 512 / 1024 / 2048 and strides 1 / 2 / 2 / 2; 44,541,611 parameters at 1000 classes (the
  count of osmr/imgclsmob's PreResNet-101, 44,541,608, plus the 3 `bn_data` offsets). `input_bn=False`
  drops `bn_data`. MXNet's BatchNorm epsilon is 2e-5; `layers.BatchNorm` uses PyTorch's 1e-5.

By default every unit is its own submodule `stage{i}_unit{j}` (tornadomeet's names, j = 1 ... n).
`scan_blocks=True` runs each stage's identity units with `nn.scan` instead: one traced unit per stage,
its parameters and batch statistics stacked along a leading axis of length n - 1 under
`stage{i}_units` (the first unit of each stage stays `stage{i}_unit1`). That makes the 333-unit
ResNet-1001 trace in half a second instead of about 20 s, but on XLA:CPU the scanned backward pass is
slow: a batch-64 training step of `preact_resnet164` took 33.6 s scanned against 3.05 s unrolled on the
2-core development machine (forward alone is not affected). Hence unrolled by default; measure both on
your accelerator before training the 1001-layer teacher scanned.

Feature taps:

* `stem`: CIFAR: the first convolution's output (the network applies no activation there). ImageNet:
  the stem conv-BN-ReLU output before the max pool, (B, 112, 112, 64) at 224 px.
* `stage{i}`: the raw residual sum that ends stage i. Pre-activation networks have no activation at a
  stage end (the shortcut carries the sum unchanged); the BN-ReLU that activates it belongs to the
  unit that consumes it. So, as for the Wide ResNets:
* `stage{i}_preact`: stage i's output through the BatchNorm that consumes it, before its ReLU: the
  first BatchNorm of stage i + 1's first unit, or the final BatchNorm after the last stage.
* `stage{i}_relu`: ReLU of `stage{i}_preact`, the activated map the next convolutions see.
* `final_bn` / `final_relu`: the last stage's `_preact` / `_relu` under the names of the official
  code (tornadomeet's `bn1`): (B, 7, 7, 2048) at 224 px for `preact_resnet101`, the official NST
  teacher layer.
* `pooled`: the globally averaged (B, C) vector fed to `fc1`.

Spatial sizes: CIFAR 32 px: stages at 32 / 16 / 8 with 64 / 128 / 256 channels; ImageNet 224 px:
stages at 56 / 28 / 14 / 7 with 256 / 512 / 1024 / 2048 channels.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nst_jax.models import layers

Dtype = Any


class PreActBottleneck(nn.Module):
  """One pre-activation bottleneck unit; returns (the residual sum, its first BatchNorm's output).

  Nothing follows the sum. The first BatchNorm's output is the pre-ReLU activation of the unit's input,
  which the network taps as the previous stage's `_preact` when the unit opens a stage.

  `project` makes it a stage's first unit: a 1x1 (strided) projection shortcut fed, like the residual
  branch, by the unit's first BN-ReLU. Otherwise the shortcut is the raw input.
  """

  features: int  # Output channels; the bottleneck width is features // 4.
  strides: int = 1
  project: bool = False
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(layers.Conv, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)
    width = self.features // 4

    input_preact = norm(name="bn1")(x, train)
    act = nn.relu(input_preact)
    y = conv(width, 1, name="conv1")(act)
    y = nn.relu(norm(name="bn2")(y, train))
    y = conv(width, 3, self.strides, name="conv2")(y)
    y = nn.relu(norm(name="bn3")(y, train))
    y = conv(self.features, 1, name="conv3")(y)

    shortcut = conv(self.features, 1, self.strides, name="sc")(act) if self.project else x
    return y + shortcut, input_preact


class _ScannedUnit(nn.Module):
  """An identity unit in `nn.scan`'s (carry, x) -> (carry, y) form; `train` is a static attribute."""

  features: int
  train: bool
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, _):
    unit = PreActBottleneck(self.features, dtype=self.dtype, axis_name=self.axis_name, name="unit")
    return unit(x, self.train)[0], None


class PreActResNet(nn.Module):
  """The whole network: stem, stages of pre-activation bottlenecks, final BN-ReLU, global pool, `fc`.

  `stage_sizes` counts units per stage, `stage_features` their output channels; `imagenet_stem` picks
  the 7x7/2 conv-BN-ReLU + max-pool stem over the CIFAR 3x3 convolution.
  """

  stage_sizes: Sequence[int]
  stage_features: Sequence[int]
  num_classes: int
  stem_features: int = 16
  imagenet_stem: bool = False
  input_bn: bool = False
  scan_blocks: bool = False
  dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(layers.BatchNorm, dtype=self.dtype, axis_name=self.axis_name)
    features = {}

    if self.input_bn:
      # MXNet's fix_gamma=True input BatchNorm: offset only.
      x = layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, use_scale=False,
                           name="bn_data")(x, train)
    if self.imagenet_stem:
      x = layers.Conv(self.stem_features, 7, 2, dtype=self.dtype, name="conv0")(x)
      x = nn.relu(norm(name="bn0")(x, train))
      features["stem"] = x
      x = layers.max_pool(x, 3, 2, padding=1)
    else:
      x = layers.Conv(self.stem_features, 3, dtype=self.dtype, name="conv0")(x)
      features["stem"] = x

    stages = zip(self.stage_sizes, self.stage_features, strict=True)
    for stage, (num_units, width) in enumerate(stages, start=1):
      unit = functools.partial(PreActBottleneck, width, dtype=self.dtype, axis_name=self.axis_name)
      x, input_preact = unit(strides=1 if stage == 1 else 2, project=True,
                             name=f"stage{stage}_unit1")(x, train)
      if stage > 1:
        features[f"stage{stage - 1}_preact"] = input_preact
      if self.scan_blocks and num_units > 1:
        units = nn.scan(_ScannedUnit, variable_axes={"params": 0, "batch_stats": 0},
                        split_rngs={"params": True}, length=num_units - 1)
        x, _ = units(width, train, dtype=self.dtype, axis_name=self.axis_name,
                     name=f"stage{stage}_units")(x, None)
      else:
        for j in range(2, num_units + 1):
          x, _ = unit(name=f"stage{stage}_unit{j}")(x, train)
      features[f"stage{stage}"] = x

    x = norm(name="bn1")(x, train)
    features["final_bn"] = features[f"stage{len(self.stage_sizes)}_preact"] = x
    x = nn.relu(x)
    features["final_relu"] = x
    for stage in range(1, len(self.stage_sizes) + 1):
      features[f"stage{stage}_relu"] = nn.relu(features[f"stage{stage}_preact"])
    x = layers.global_avg_pool(x)
    features["pooled"] = x
    logits = layers.Dense(self.num_classes, dtype=self.dtype, name="fc1")(x)
    return logits, features


def _cifar(depth: int) -> Callable[..., nn.Module]:
  if (depth - 2) % 9 != 0:
    raise ValueError(f"Bottleneck CIFAR ResNets need depth = 9n + 2, got {depth}.")
  n = (depth - 2) // 9
  return functools.partial(PreActResNet, stage_sizes=(n, n, n), stage_features=(64, 128, 256))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet164": _cifar(164),
    "preact_resnet1001": _cifar(1001),
    "preact_resnet101": functools.partial(
        PreActResNet, stage_sizes=(3, 4, 23, 3), stage_features=(256, 512, 1024, 2048),
        stem_features=64, imagenet_stem=True, input_bn=True),
}

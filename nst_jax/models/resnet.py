"""torchvision's ImageNet ResNets: `resnet18`, `resnet34`, `resnet50`, `resnet101`.

Architecture (torchvision `models/resnet.py`, the "v1.5" layout): a 7x7/2 convolution + BatchNorm + ReLU
stem, a 3x3/2 max pool (padding 1), four stages of post-activation residual blocks with widths
64 / 128 / 256 / 512 and strides 1 / 2 / 2 / 2, a global average pool and a fully connected classifier.
`resnet18` / `resnet34` use BasicBlocks (two 3x3 convolutions, [2, 2, 2, 2] / [3, 4, 6, 3] blocks);
`resnet50` / `resnet101` use Bottlenecks (1x1 reduce, 3x3, 1x1 expand x4, [3, 4, 6, 3] / [3, 4, 23, 3]
blocks) with the stride on the 3x3 convolution (v1.5; the original paper strided the first 1x1). A
stage's first block gets a 1x1 convolution + BN shortcut whenever it changes the stride or the width.
The network is `residual.ResNet` with the "imagenet" stem. Parameter counts equal torchvision's at every
`num_classes`; module names follow torchvision's (`conv1`, `bn1`, `layer{i}_{j}`, `downsample_conv` /
`downsample_bn`, `fc`) so weights map one to one.

Feature taps:

* `stem`: the stem conv-BN-ReLU output, before the max pool, (B, 112, 112, 64) at 224 px.
* `stage{i}` (i = 1 ... 4): output of stage i after its last block's final ReLU.
* `stage{i}_preact`: the last block's residual sum before that ReLU (RepDistiller's `preact=True`).
* `pooled`: the globally averaged (B, 512 * expansion) vector fed to `fc`.

Spatial sizes for 224 px inputs: stages 1 / 2 / 3 / 4 at 56 / 28 / 14 / 7; channels 64 / 128 / 256 / 512
(BasicBlock) or 256 / 512 / 1024 / 2048 (Bottleneck).
"""

import functools
from collections.abc import Callable

import flax.linen as nn

from nst_jax.models import residual

_torchvision = functools.partial(residual.ResNet, stage_features=(64, 128, 256, 512), stem_features=64,
                                 stem="imagenet")

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": functools.partial(_torchvision, block=residual.BasicBlock, stage_sizes=(2, 2, 2, 2)),
    "resnet34": functools.partial(_torchvision, block=residual.BasicBlock, stage_sizes=(3, 4, 6, 3)),
    "resnet50": functools.partial(_torchvision, block=residual.Bottleneck, stage_sizes=(3, 4, 6, 3)),
    "resnet101": functools.partial(_torchvision, block=residual.Bottleneck, stage_sizes=(3, 4, 23, 3)),
}

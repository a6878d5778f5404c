"""ResNet-50 for CIFAR as in RepDistiller (`models/resnetv2.py`, the `ResNet50` teacher).

Despite the file name this is a standard post-activation ResNet (He et al. 2015), not the pre-activation
"ResNet v2": ImageNet stage widths with a CIFAR stem. A 3x3 stride-1 conv-BN-ReLU stem to 64 channels
(no max-pool), four stages of bottleneck blocks [3, 4, 6, 3] with widths 64 / 128 / 256 / 512 (outputs
x4 = 256 / 512 / 1024 / 2048) and first strides 1 / 2 / 2 / 2, global average pooling and a linear
classifier. A bottleneck is 1x1 - BN - ReLU - 3x3 (stride) - BN - ReLU - 1x1 - BN, plus a shortcut
(identity, or 1x1 strided conv + BN when the shape changes), then ReLU. The stride sits on the 3x3 conv.
The network is `residual.ResNet` with the "cifar" stem and `residual.Bottleneck`s (torchvision's module
names: RepDistiller's `shortcut` is `downsample_*` and its `linear` is `fc` here).
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

import flax.linen as nn

from nst_jax.models import residual

MODELS: dict[str, Callable[..., nn.Module]] = {
    # RepDistiller's ResNet50 = ResNet(Bottleneck, [3, 4, 6, 3]).
    "ResNet50": functools.partial(residual.ResNet, block=residual.Bottleneck, stage_sizes=(3, 4, 6, 3),
                                  stage_features=(64, 128, 256, 512), stem_features=64, stem="cifar"),
}

"""RepDistiller's CIFAR ResNets (BasicBlock): `resnet8` ... `resnet110`, `resnet8x4`, `resnet32x4`.

Architecture (HobbitLong/RepDistiller `models/resnet.py`, itself after fb.resnet.torch): a 3x3
stem convolution + BatchNorm + ReLU, three stages of n = (depth - 2) / 6 post-activation
BasicBlocks (conv3x3-BN-ReLU-conv3x3-BN, add the shortcut, ReLU) with strides 1 / 2 / 2, an 8x8
average pool and a fully connected classifier. Widths (stem, stage1, stage2, stage3) are
(16, 16, 32, 64) for the plain networks and (32, 64, 128, 256) for the `x4` ones; a stage's first
block gets a 1x1 convolution + BN shortcut whenever it changes the stride or the width (so the `x4`
networks have one in stage 1 too). The network is `residual.ResNet` with the "cifar" stem and
`residual.BasicBlock`s. RepDistiller's 8x8 average pool is the global average at the 32x32 inputs the
networks are built for; here it is the global average at every input size.

Feature taps (RepDistiller's `is_feat` list is [stem, stage1, stage2, stage3, pooled]; `preact=True`
swaps in the `_preact` versions):

* `stem`: stem conv-BN-ReLU output, (B, 32, 32, w0).
* `stage{i}` (i = 1, 2, 3): output of stage i after its last block's final ReLU.
* `stage{i}_preact`: the last block's residual sum before that ReLU (RepDistiller's `preact=True`).
* `pooled`: the average-pooled (B, w3) vector fed to `fc`.

Spatial sizes for 32x32 inputs: stages 1 / 2 / 3 at 32 / 16 / 8.
"""

from collections.abc import Callable, Sequence

import flax.linen as nn

from nst_jax.models import residual


def cifar_resnet(depth: int, widths: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
  """The BasicBlock CIFAR ResNet of `depth` = 6n + 2; `widths` is (stem, stage1, stage2, stage3),
  RepDistiller's `num_filters`. `kwargs` (dtype, axis_name) go to `residual.ResNet`."""
  if (depth - 2) % 6 != 0 or depth < 8:
    raise ValueError(f"BasicBlock CIFAR ResNets need depth = 6n + 2 with n >= 1, got {depth}.")
  blocks_per_stage = (depth - 2) // 6
  return residual.ResNet(block=residual.BasicBlock, stage_sizes=(blocks_per_stage,) * 3,
                         stage_features=tuple(widths[1:]), stem_features=widths[0], stem="cifar",
                         num_classes=num_classes, **kwargs)


_PLAIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


def _named(depth: int, widths: Sequence[int]) -> Callable[..., nn.Module]:
  return lambda num_classes, **kwargs: cifar_resnet(depth, widths, num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": _named(d, _PLAIN) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _named(8, _X4),
    "resnet32x4": _named(32, _X4),
}

"""PyTorch statements of the architectures `nst_jax.tools.convert` imports, for its equivalence tests.

Written for these tests from the architectures' descriptions (RepDistiller's CIFAR models, torchvision's
ImageNet ResNets), not from nst_jax's Flax code: each network is the plain PyTorch form, NCHW, with the
module attribute names of the original implementations so that `state_dict()` has the keys real
checkpoints have. `forward(x)` returns `(logits, taps)` with nst_jax's tap names (NCHW maps, (B, C)
vectors), computed the way the originals compute their `is_feat` features. `build(name, num_classes)`
builds the network of a zoo name.

Not a test module: imported by tests/convert_test.py, which skips when PyTorch is not installed.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin, cout, k, stride=1, groups=1, bias=False):
  return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


def _run_stages(stages, x, taps, preact_taps=True):
  """Runs each nn.Sequential of blocks returning (out, preact); taps stage{i} and stage{i}_preact."""
  for i, stage in enumerate(stages, start=1):
    for block in stage:
      x, pre = block(x)
    taps[f"stage{i}"] = x
    if preact_taps:
      taps[f"stage{i}_preact"] = pre
  return x


# -- Post-activation ResNets: RepDistiller resnet.py / resnetv2.py, torchvision resnet.py -------------


class Basic(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, projection):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
    self._projection = projection
    if stride != 1 or cin != planes:
      setattr(self, projection, nn.Sequential(_conv(cin, planes, 1, stride), nn.BatchNorm2d(planes)))

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    shortcut = getattr(self, self._projection, None)
    pre = y + (x if shortcut is None else shortcut(x))
    return F.relu(pre), pre


class Bottle(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, projection):
    super().__init__()
    cout = 4 * planes
    self.conv1, self.bn1 = _conv(cin, planes, 1), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)  # v1.5 stride
    self.conv3, self.bn3 = _conv(planes, cout, 1), nn.BatchNorm2d(cout)
    self._projection = projection
    if stride != 1 or cin != cout:
      setattr(self, projection, nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout)))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = getattr(self, self._projection, None)
    pre = y + (x if shortcut is None else shortcut(x))
    return F.relu(pre), pre


class ResNet(nn.Module):
  """`stem`: "cifar" (3x3/1) or "imagenet" (7x7/2 + 3x3/2 max pool); `names`: (projection, classifier)."""

  def __init__(self, block, sizes, planes, stem_width, num_classes, stem="cifar",
               names=("downsample", "fc")):
    super().__init__()
    imagenet = stem == "imagenet"
    self.conv1 = nn.Conv2d(3, stem_width, 7 if imagenet else 3, 2 if imagenet else 1, 3 if imagenet else 1,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(stem_width)
    self._imagenet, self._fc = imagenet, names[1]
    cin = stem_width
    for i, (n, p) in enumerate(zip(sizes, planes, strict=True), start=1):
      blocks = []
      for j in range(n):
        blocks.append(block(cin, p, 2 if i > 1 and j == 0 else 1, names[0]))
        cin = p * block.expansion
      setattr(self, f"layer{i}", nn.Sequential(*blocks))
    self._stages = len(sizes)
    setattr(self, names[1], nn.Linear(cin, num_classes))

  def forward(self, x):
    taps = {}
    x = F.relu(self.bn1(self.conv1(x)))
    taps["stem"] = x
    if self._imagenet:
      x = F.max_pool2d(x, 3, 2, 1)
    x = _run_stages([getattr(self, f"layer{i}") for i in range(1, self._stages + 1)], x, taps)
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    taps["pooled"] = x
    return getattr(self, self._fc)(x), taps


# -- RepDistiller wrn.py ------------------------------------------------------------------------------


class WideBlock(nn.Module):
  """Pre-activation: a = ReLU(BN(x)); conv-BN-ReLU-conv on a; plus x, or a 1x1 conv of a."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, cout, 3, stride)
    self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv(cout, cout, 3)
    self.convShortcut = None if cin == cout else _conv(cin, cout, 1, stride)

  def forward(self, x):
    pre = self.bn1(x)
    a = F.relu(pre)
    y = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return y + (x if self.convShortcut is None else self.convShortcut(a)), pre


class _Layer(nn.Module):
  def __init__(self, blocks):
    super().__init__()
    self.layer = nn.Sequential(*blocks)


class WRN(nn.Module):
  def __init__(self, depth, k, num_classes):
    super().__init__()
    n = (depth - 4) // 6
    widths = (16, 16 * k, 32 * k, 64 * k)
    self.conv1 = _conv(3, 16, 3)
    for i in (1, 2, 3):
      stride = 1 if i == 1 else 2
      blocks = [WideBlock(widths[i - 1] if j == 0 else widths[i], widths[i], stride if j == 0 else 1)
                for j in range(n)]
      setattr(self, f"block{i}", _Layer(blocks))
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    x = self.conv1(x)
    taps = {"stem": x}
    for i in (1, 2, 3):
      for j, block in enumerate(getattr(self, f"block{i}").layer):
        x, pre = block(x)
        if i > 1 and j == 0:  # The BN that consumes the previous stage's sum.
          taps[f"stage{i - 1}_preact"] = pre
      taps[f"stage{i}"] = x
    taps["stage3_preact"] = self.bn1(x)
    for i in (1, 2, 3):
      taps[f"stage{i}_relu"] = F.relu(taps[f"stage{i}_preact"])
    x = torch.flatten(F.avg_pool2d(taps["stage3_relu"], 8), 1)
    taps["pooled"] = x
    return self.fc(x), taps


# -- RepDistiller vgg.py (the _bn variants) -----------------------------------------------------------

VGG_CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
  def __init__(self, config, num_classes):
    super().__init__()
    cin = 3
    for b, widths in enumerate(config):
      mods = []
      for w in widths:
        mods += [_conv(cin, w, 3, bias=True), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
      setattr(self, f"block{b}", nn.Sequential(*mods[:-1]))  # The block's last ReLU is the caller's.
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    size = x.shape[2]
    x = F.relu(self.block0(x))
    taps = {"stem": x}
    x = F.max_pool2d(x, 2)
    for b in range(1, 5):
      x = getattr(self, f"block{b}")(x)
      taps[f"stage{b}_preact"] = x
      x = F.relu(x)
      taps[f"stage{b}"] = x
      if b < 3 or (b == 3 and size == 64):
        x = F.max_pool2d(x, 2)
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    taps["pooled"] = x
    return self.classifier(x), taps


# -- RepDistiller mobilenetv2.py (mobile_half: T = 6, width 0.5) ----------------------------------------


class InvertedResidual(nn.Module):
  def __init__(self, cin, cout, stride, t):
    super().__init__()
    hidden = cin * t
    self.conv = nn.Sequential(
        _conv(cin, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(),
        _conv(hidden, hidden, 3, stride, groups=hidden), nn.BatchNorm2d(hidden), nn.ReLU(),
        _conv(hidden, cout, 1), nn.BatchNorm2d(cout))
    self._residual = stride == 1 and cin == cout

  def forward(self, x):
    return x + self.conv(x) if self._residual else self.conv(x)


class MobileNetV2(nn.Module):
  GROUPS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))  # (t, c, n, s) at width 1

  def __init__(self, num_classes, width=0.5):
    super().__init__()
    cin = int(32 * width)
    self.conv1 = nn.Sequential(_conv(3, cin, 3, 2), nn.BatchNorm2d(cin), nn.ReLU())
    self.blocks = nn.ModuleList()
    for t, c, n, s in self.GROUPS:
      group = []
      for j in range(n):
        group.append(InvertedResidual(cin, int(c * width), s if j == 0 else 1, t))
        cin = int(c * width)
      self.blocks.append(nn.Sequential(*group))
    self.conv2 = nn.Sequential(_conv(cin, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU())
    self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

  def forward(self, x):
    x = self.conv1(x)
    taps = {"stem": x}
    for g, group in enumerate(self.blocks):
      x = group(x)
      if g in (1, 2, 4, 6):
        stage = (1, 2, 4, 6).index(g) + 1
        taps[f"stage{stage}"] = taps[f"stage{stage}_preact"] = x
    x = self.conv2(x)
    taps["head"] = x
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    taps["pooled"] = x
    return self.classifier(x), taps


# -- RepDistiller ShuffleNetv1.py / ShuffleNetv2.py -------------------------------------------------------


def shuffle(x, groups):
  b, c, h, w = x.shape
  return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleV1Unit(nn.Module):
  def __init__(self, cin, cout, stride, groups):
    super().__init__()
    mid = cout // 4
    self._g1 = 1 if cin == 24 else groups
    self._stride = stride
    self.conv1, self.bn1 = _conv(cin, mid, 1, groups=self._g1), nn.BatchNorm2d(mid)
    self.conv2, self.bn2 = _conv(mid, mid, 3, stride, groups=mid), nn.BatchNorm2d(mid)
    self.conv3, self.bn3 = _conv(mid, cout, 1, groups=groups), nn.BatchNorm2d(cout)

  def forward(self, x):
    y = shuffle(F.relu(self.bn1(self.conv1(x))), self._g1)
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    pre = torch.cat([y, F.avg_pool2d(x, 3, 2, 1)], 1) if self._stride == 2 else y + x
    return F.relu(pre), pre


class ShuffleV1(nn.Module):
  def __init__(self, num_classes, planes=(240, 480, 960), sizes=(4, 8, 4), groups=3):
    super().__init__()
    self.conv1, self.bn1 = _conv(3, 24, 1), nn.BatchNorm2d(24)
    cin = 24
    for i, (p, n) in enumerate(zip(planes, sizes, strict=True), start=1):
      units = []
      for j in range(n):
        units.append(ShuffleV1Unit(cin, p - cin if j == 0 else p, 2 if j == 0 else 1, groups))
        cin = p
      setattr(self, f"layer{i}", nn.Sequential(*units))
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    taps = {"stem": x}
    x = _run_stages([self.layer1, self.layer2, self.layer3], x, taps)
    x = torch.flatten(F.avg_pool2d(x, 4), 1)
    taps["pooled"] = x
    return self.linear(x), taps


class ShuffleV2Down(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    mid = cout // 2
    self.conv1, self.bn1 = _conv(cin, cin, 3, 2, groups=cin), nn.BatchNorm2d(cin)
    self.conv2, self.bn2 = _conv(cin, mid, 1), nn.BatchNorm2d(mid)
    self.conv3, self.bn3 = _conv(cin, mid, 1), nn.BatchNorm2d(mid)
    self.conv4, self.bn4 = _conv(mid, mid, 3, 2, groups=mid), nn.BatchNorm2d(mid)
    self.conv5, self.bn5 = _conv(mid, mid, 1), nn.BatchNorm2d(mid)

  def forward(self, x):
    left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    right = F.relu(self.bn3(self.conv3(x)))
    right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
    return shuffle(torch.cat([left, right], 1), 2), None


class ShuffleV2Basic(nn.Module):
  def __init__(self, channels):
    super().__init__()
    c = channels // 2
    self.conv1, self.bn1 = _conv(c, c, 1), nn.BatchNorm2d(c)
    self.conv2, self.bn2 = _conv(c, c, 3, groups=c), nn.BatchNorm2d(c)
    self.conv3, self.bn3 = _conv(c, c, 1), nn.BatchNorm2d(c)

  def forward(self, x):
    half = x.shape[1] // 2
    keep, y = x[:, :half], x[:, half:]
    y = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(y)))))))
    return shuffle(torch.cat([keep, F.relu(y)], 1), 2), torch.cat([keep, y], 1)


class ShuffleV2(nn.Module):
  def __init__(self, num_classes, planes=(116, 232, 464), sizes=(3, 7, 3), head=1024):
    super().__init__()
    self.conv1, self.bn1 = _conv(3, 24, 1), nn.BatchNorm2d(24)
    cin = 24
    for i, (p, n) in enumerate(zip(planes, sizes, strict=True), start=1):
      setattr(self, f"layer{i}", nn.Sequential(ShuffleV2Down(cin, p), *[ShuffleV2Basic(p) for _ in range(n)]))
      cin = p
    self.conv2, self.bn2 = _conv(cin, head, 1), nn.BatchNorm2d(head)
    self.linear = nn.Linear(head, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    taps = {"stem": x}
    x = _run_stages([self.layer1, self.layer2, self.layer3], x, taps)
    x = F.relu(self.bn2(self.conv2(x)))
    taps["head"] = x
    x = torch.flatten(F.avg_pool2d(x, 4), 1)
    taps["pooled"] = x
    return self.linear(x), taps


# -- By zoo name ----------------------------------------------------------------------------------------


def build(name: str, num_classes: int) -> nn.Module:
  cifar_resnets = {f"resnet{d}": d for d in (8, 14, 20, 32, 44, 56, 110)}
  if name in cifar_resnets:
    n = (cifar_resnets[name] - 2) // 6
    return ResNet(Basic, (n,) * 3, (16, 32, 64), 16, num_classes)
  if name in ("resnet8x4", "resnet32x4"):
    n = (int(name[len("resnet"):-2]) - 2) // 6
    return ResNet(Basic, (n,) * 3, (64, 128, 256), 32, num_classes)
  if name == "ResNet50":
    return ResNet(Bottle, (3, 4, 6, 3), (64, 128, 256, 512), 64, num_classes, names=("shortcut", "linear"))
  torchvision = {"resnet18": (Basic, (2, 2, 2, 2)), "resnet34": (Basic, (3, 4, 6, 3)),
                 "resnet50": (Bottle, (3, 4, 6, 3)), "resnet101": (Bottle, (3, 4, 23, 3))}
  if name in torchvision:
    block, sizes = torchvision[name]
    return ResNet(block, sizes, (64, 128, 256, 512), 64, num_classes, stem="imagenet")
  if name.startswith("wrn_"):
    _, depth, k = name.split("_")
    return WRN(int(depth), int(k), num_classes)
  if name in VGG_CONFIGS:
    return VGG(VGG_CONFIGS[name], num_classes)
  others = {"MobileNetV2": MobileNetV2, "ShuffleV1": ShuffleV1, "ShuffleV2": ShuffleV2}
  if name in others:
    return others[name](num_classes)
  raise ValueError(f"No PyTorch statement of {name!r}.")

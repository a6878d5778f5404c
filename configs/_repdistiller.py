"""The RepDistiller CIFAR-100 protocol, shared by the `cifar100_*` configs.

RepDistiller: Tian et al., "Contrastive Representation Distillation", ICLR 2020, and its code,
github.com/HobbitLong/RepDistiller, whose CIFAR-100 table benchmarks NST against KD, FitNet and AT.

Training (teachers, baseline students and distilled students alike, as RepDistiller's
`train_teacher.py` / `train_student.py`): SGD with momentum 0.9 (not Nesterov), weight decay 5e-4,
batch 64, 240 epochs, learning rate 0.05 (0.01 for MobileNetV2 / ShuffleNet students) x0.1 at epochs
150, 180 and 210; 4-pixel zero-pad crop + horizontal flip; RepDistiller's CIFAR-100 mean and std (the
`cifar100` entry of `sources.MEAN_STD`, used when `data.mean` / `data.std` are empty); trained on the
50,000 training images and evaluated on the 10,000 test images (RepDistiller reports the last epoch's
test accuracy). The teacher runs with its running BatchNorm statistics (`model_t.eval()`).

Methods (RepDistiller's `train_student.py` `-r` / `-a` / `-b` for each row of its table):

| method | objective |
| --- | --- |
| `ce` | CE (the baseline student: no teacher) |
| `kd` | 0.1 CE + 0.9 KD (T = 4) |
| `fitnet` | CE + 100 FitNet at one hint pair (`--hint_layer 2`, RepDistiller's default) |
| `at` | CE + 1000 * sum of AT over the feature pairs (p = 2) |
| `nst` | CE + 50 * sum of NST over the feature pairs (polynomial kernel, d = 2, c = 0) |
| `kd_nst` | 0.1 CE + 0.9 KD + 50 * sum of NST (not in RepDistiller: its KD row plus its NST term) |

Layers: RepDistiller's AT and NST use `feat[1:-1]` of `model(x, is_feat=True, preact=False)` and FitNet
`feat[2]`; `PAIRS` spells out the equivalent taps per pair (see the pair configs' docstrings).
"""

import ml_collections

from configs import _common

METHODS = ("ce", "kd", "fitnet", "at", "nst", "kd_nst")
DEFAULT_METHOD = "nst"

# RepDistiller's learning rate is 0.01 instead of 0.05 for these students.
_LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")

_THREE_STAGES = (("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3"))

# (teacher, student) -> (AT / NST pairs = RepDistiller's feat[1:-1], FitNet pair = feat[2]). CIFAR
# ResNets: stage outputs after their ReLU. WRNs: the stages' raw residual sums, which is what
# RepDistiller's WRN returns as feat[1..3] (no BN-ReLU after a pre-activation stage); `wrn.py`'s
# `stage{i}`. VGGs: feat[1:-1] has four maps, blocks 1-4 after their ReLU (16 / 8 / 4 / 4 px).
PAIRS = {
    ("resnet32x4", "resnet8x4"): (_THREE_STAGES, ("stage2", "stage2")),
    ("wrn_40_2", "wrn_16_2"): (_THREE_STAGES, ("stage2", "stage2")),
    ("resnet56", "resnet20"): (_THREE_STAGES, ("stage2", "stage2")),
    ("vgg13", "vgg8"): (_THREE_STAGES + (("stage4", "stage4"),), ("stage2", "stage2")),
}


def teacher_name(teacher: str) -> str:
  """The teacher's config file stem (and workdir name): `cifar100_<teacher>`."""
  return f"cifar100_{teacher}"


def _protocol(model: str) -> ml_collections.ConfigDict:
  config = _common.base()
  config.data.name = "cifar100"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.image_size = 32
  config.data.augment = "cifar"
  config.data.mean, config.data.std = (), ()  # sources.MEAN_STD["cifar100"]: RepDistiller's values.
  config.student.model = model
  config.optim.learning_rate = 0.01 if model in _LOW_LR_STUDENTS else 0.05
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 5e-4
  config.schedule.batch_size = 64
  config.schedule.epochs = 240
  config.schedule.decay_epochs = (150, 180, 210)
  config.schedule.decay_factor = 0.1
  return config


def teacher_config(teacher: str) -> ml_collections.ConfigDict:
  """Supervised training of `teacher` (RepDistiller's `train_teacher.py`)."""
  return _protocol(teacher)


def student_config(teacher: str, student: str, method: str) -> ml_collections.ConfigDict:
  """`student` trained with `method`; every method but `ce` distils from the `teacher_config` run."""
  if (teacher, student) not in PAIRS:
    raise ValueError(f"No layer choice for {teacher} -> {student}. Pairs: {', '.join(map(str, PAIRS))}.")
  config = _protocol(student)
  feature_layers, hint_layer = PAIRS[teacher, student]
  terms = _common.set_method(config, method, METHODS, kd_weights=(0.1, 0.9), feature_layers=feature_layers,
                             hint_layer=hint_layer)
  if terms:
    _common.use_teacher(config, teacher_name(teacher), teacher, batchnorm="running")
  return config

"""CIFAR-10 from the shared image folder, step 2: resnet8 distilled from resnet20 with KD + NST.

Command (from the repository root); it first trains the teacher (`configs/cifar10_folder_teacher.py`)
as its own stage in `workdirs/cifar10_folder_teacher`, beside this run's workdir, when that run has not
finished:

    python launch.py --config configs/cifar10_folder.py --workdir workdirs/cifar10_folder

The config string picks another method for comparison, e.g. the plain resnet8 baseline (no teacher):

    python launch.py --config configs/cifar10_folder.py:ce --workdir workdirs/cifar10_folder_ce

Methods: `kd_nst` (the default), `kd` (CE + KD), `nst` (CE + 50 NST), `ce`.

Data: as the teacher's (`configs/cifar10_folder_teacher.py`): `../shared/data/cifar10/train`, 20,000
training images (the first 2,000 per class) and the 5,000 held-out validation images (the last 500 per
class), 4-pixel pad + crop + flip, CIFAR-10's mean and std.

Objective: the paper's best recipe, CE + 1.0 KD (T = 4; the official code's "KD weight 16 at T = 4")
+ 50 * NST (polynomial kernel, d = 2, c = 0) summed over `stage1`, `stage2`, `stage3`: both networks
have widths 16 / 32 / 64 at 32 / 16 / 8 px, and the taps are the stage outputs after their final ReLU,
as RepDistiller's NST row. The teacher uses its running BatchNorm statistics. Optimizer and schedule as
the teacher's: SGD momentum 0.9, weight decay 5e-4, batch 64, lr 0.05 x0.1 at epochs 6 and 8 of 10.

Runtime, measured once (2026-11-28, 2-core development CPU, seed 0): 24 min 25 s for this command with
the teacher trained first (teacher ~14 min), 5 min 38 s for `:ce`.

Expected validation accuracy: no published number for this setup. Measured once each (seed 0,
2026-11-28, 2-core CPU), top-1 on the 5,000 held-out images after 10 epochs: teacher resnet20 76.36 %;
student resnet8 with `kd_nst` 74.28 % (best 74.52 %), with `ce` (no teacher) 68.82 %. Wall time: 24 min 25 s
for this command with the teacher trained first (teacher ~14 min), 5 min 38 s for `:ce`. One seed, so the
5.5-point gap is a single observation, not a mean.
"""

from configs import _common, cifar10_folder_teacher

METHODS = ("kd_nst", "kd", "nst", "ce")

_STAGES = [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]


def get_config(method: str = "kd_nst"):
  config = cifar10_folder_teacher.get_config()
  config.student.model = "resnet8"
  if _common.set_method(config, method, METHODS, kd_weights=(1.0, 1.0), feature_layers=_STAGES,
                        hint_layer=("stage2", "stage2")):
    _common.use_teacher(config, "cifar10_folder_teacher", "resnet20")
  return config

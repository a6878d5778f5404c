"""The offline default, step 2: resnet8 distilled from the digits teacher with KD + NST.

Command (from the repository root); it first trains the teacher (`configs/digits.py`) in
`workdirs/digits` when that has no checkpoint yet:

    python launch.py --config configs/digits_kd_nst.py --workdir workdirs/digits_kd_nst

The config string picks another method for comparison, e.g. the plain resnet8 baseline (no teacher):
`configs/digits_kd_nst.py:ce`. Methods: `kd_nst` (the default), `kd`, `nst`, `ce`.

Data: as `configs/digits.py`: scikit-learn's digits resized to 32x32, one channel, 1,438 training and
359 validation images, no augmentation.

Objective: the paper's best recipe, CE + 1.0 KD (T = 4; the official code's "KD weight 16 at T = 4")
+ 50 * NST (polynomial kernel, d = 2, c = 0) summed over `stage1`, `stage2`, `stage3`: both networks
are RepDistiller CIFAR ResNets with widths 16 / 32 / 64 at 32 / 16 / 8 px, and the taps are the stage
outputs after their final ReLU, as RepDistiller's NST row. The teacher uses its running BatchNorm
statistics. Recipe otherwise `configs/default.py`'s: SGD momentum 0.9, weight decay 5e-4, batch 64,
lr 0.05 x0.1 at epochs 20 and 25 of 30 (660 steps).

Runtime: about 2.5 minutes on the 2-core development CPU for this run, about 6 minutes with the
teacher's run first; estimated, not measured. From the README's `bench/models.py` at batch 64, resnet8's
forward+backward runs at 671 img/s and resnet20's forward at 1,063 img/s, so a distillation step of 64
images takes about 0.16 s and the 660 steps about 1.8 minutes, plus evaluations and compilation (the
NST terms on these small maps cost little next to the two networks).

Expected validation accuracy: no published number for this setup. Measured once (seed 0, 2026-11-28):
98.05 % top-1 after 30 epochs (best 98.33 %), teacher 97.49 %; 5 min 18 s for teacher and student
together. No CE-only resnet8 run was made, so this does not show a distillation gain.
"""

from configs import _common

METHODS = ("kd_nst", "kd", "nst", "ce")

_STAGES = [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]


def get_config(method: str = "kd_nst"):
  config = _common.base()
  config.student.model = "resnet8"
  if _common.set_method(config, method, METHODS, kd_weights=(1.0, 1.0), feature_layers=_STAGES,
                        hint_layer=("stage2", "stage2")):
    _common.use_teacher(config, "digits", "resnet20")
  return config

"""The offline default, step 1: the teacher, resnet20 trained on scikit-learn's digits (no download).

Command (from the repository root):

    python launch.py --config configs/digits.py --workdir workdirs/digits

`configs/digits_kd_nst.py` reads this run from `workdirs/digits` and, when it has no checkpoint yet,
runs it there first, so the offline job is that one command.

Data: scikit-learn's 1,797 8x8 grey-level digits (they ship with scikit-learn), resized once to 32x32
(`data.image_size`) because the RepDistiller ResNets are built for 32 px; one channel, normalised with
the digits' own mean and std (`sources.MEAN_STD`), no augmentation. The fixed stratified split holds the
last 20 % of every class out: 1,438 training and 359 validation images; accuracy is on the 359.

Recipe: `configs/default.py`'s: SGD momentum 0.9, weight decay 5e-4, batch 64, lr 0.05 x0.1 at epochs
20 and 25 of 30; 22 steps per epoch, 660 steps.

Runtime: about 3.5 minutes on the 2-core development CPU, estimated, not measured: resnet20's
forward+backward runs at 234 img/s at batch 64 there (README, `bench/models.py`), so the 660 steps of 64
images take about 3 minutes, plus 30 evaluations of 359 images (about 10 s at 1,063 img/s) and the
compilation.

Expected validation accuracy: no published number for this setup. Measured once (seed 0, 2026-11-28, as
the first half of `configs/digits_kd_nst.py`'s command): 97.49 % top-1 after 30 epochs (best 98.05 %).
"""

from configs import _common


def get_config():
  config = _common.base()
  config.student.model = "resnet20"
  return config

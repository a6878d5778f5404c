"""The offline default, step 1: the teacher, resnet20 trained on scikit-learn's digits (no download).

Command (from the repository root):

    python launch.py --config configs/digits.py --workdir workdirs/digits

`configs/digits_kd_nst.py` reads this run from `workdirs/digits` (beside its own workdir) and, when
this run has not finished, trains or resumes it there first as its own stage, so the offline job is that
one command.

Data: scikit-learn's 1,797 8x8 grey-level digits (they ship with scikit-learn), resized once to 32x32
(`data.image_size`) because the RepDistiller ResNets are built for 32 px; one channel, normalised with
the digits' own mean and std (`sources.MEAN_STD`), no augmentation. The fixed stratified split holds the
last 20 % of every class out: 1,438 training and 359 validation images; accuracy is on the 359.

Recipe: `configs/default.py`'s: SGD momentum 0.9, weight decay 5e-4, batch 64, lr 0.05 x0.1 at epochs
20 and 25 of 30; 22 steps per epoch, 660 steps.

Runtime on a 2-core CPU with nothing else running: 4.0-4.4 min for this run as the teacher stage of
`configs/digits_kd_nst.py`'s command (`run.json`'s stage timings, six runs on 2026-12-03).

Expected validation accuracy: no published number for this setup. Measured (seed 0): 98.05 % top-1
after 30 epochs, best 98.61 % at epoch 21 (2026-12-01); 97.49 % (best 98.05 %) on 2026-11-28 with the
same seed on another CPU of this kind, before BatchNorm followed PyTorch's running-variance rule: runs
repeat bitwise on one machine, not across CPU types.
"""

from configs import _common


def get_config():
  config = _common.base()
  config.student.model = "resnet20"
  return config

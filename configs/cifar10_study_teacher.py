"""The CIFAR-10 study's teacher: resnet20 on the study's 10,000 images (`configs/cifar10_study.py`).

Command (from the repository root; the study's sweep trains it in `<root>/teacher` itself):

    python launch.py --config configs/cifar10_study_teacher.py --workdir workdirs/cifar10_study_teacher

Data: `configs/cifar10_folder_teacher.py`'s, on half its training images: `../shared/data/cifar10/train`,
the first 1,000 files per class (10,000 images) trained on, the last 500 per class (5,000 images) held
out for every reported number; pad + crop + flip.

Recipe: `configs/cifar10_folder_teacher.py`'s: SGD momentum 0.9, weight decay 5e-4, batch 64, lr 0.05
x0.1 at epochs 6 and 8 of 10 (1,560 steps).

Runtime on a 2-core CPU shared with other runs: about 23 minutes, as the first stage of the study's sweep
(in two parts: stopped by SIGTERM at step 1,023 and resumed; `run.json` keeps the 9.8 min of the second
part).

Expected validation accuracy: no published number for this setup; measured once (seed 0, 2026-12-02):
66.20 % top-1 after 10 epochs (the README's Results section).
"""

from configs import cifar10_folder_teacher

TRAIN_PER_CLASS = 1000


def get_config():
  config = cifar10_folder_teacher.get_config()
  config.data.limit_per_class = TRAIN_PER_CLASS
  return config

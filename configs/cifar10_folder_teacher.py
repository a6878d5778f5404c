"""CIFAR-10 from the shared image folder, step 1: the teacher, resnet20, sized for a 2-core CPU.

Command (from the repository root, so that `../shared/data/cifar10/train` is the shared folder):

    python launch.py --config configs/cifar10_folder_teacher.py --workdir workdirs/cifar10_folder_teacher

`configs/cifar10_folder.py` reads this run from `workdirs/cifar10_folder_teacher` and, when it has no
checkpoint yet, runs it there first.

Data: the class-folder tree `../shared/data/cifar10/train` (JPEG copies of CIFAR-10's training images,
5,000 per class). Per class the last 500 files (by name) are held out as the validation split (5,000
images, where accuracy is measured) and the first 2,000 of the others are trained on (20,000 images), to
fit the time budget. Decoded once with Pillow and cached as .npz. 4-pixel pad + crop + flip; normalised
with CIFAR-10's mean and std (`sources.MEAN_STD["cifar10"]`, not recomputed on the subset, so the
student and teacher runs normalise alike whatever the subset).

Recipe: RepDistiller's optimizer (SGD momentum 0.9, weight decay 5e-4, batch 64, lr 0.05) on a short
schedule: 10 epochs of 312 steps, lr x0.1 at epochs 6 and 8.

Runtime, measured once (2026-11-28, 2-core development CPU, seed 0): about 14 minutes, as the first
stage of `configs/cifar10_folder.py`'s command, decoding the 25,000 JPEGs included.

Expected validation accuracy: no published number for this setup. Measured once (seed 0, 2026-11-28,
as the first half of `configs/cifar10_folder.py`'s command): 76.36 % top-1 after 10 epochs, in about
14 minutes.
"""

from configs import _common
from nst_jax.trainer.data import sources


def get_config():
  config = _common.base()
  config.data.name = "image_folder"
  config.data.path = "../shared/data/cifar10/train"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.validation_per_class = 500
  config.data.limit_per_class = 2000
  config.data.image_size = 32
  config.data.augment = "cifar"
  config.data.mean, config.data.std = sources.MEAN_STD["cifar10"]
  config.student.model = "resnet20"
  config.optim.learning_rate = 0.05
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.schedule.batch_size = 64
  config.schedule.epochs = 10
  config.schedule.decay_epochs = (6, 8)
  config.schedule.decay_factor = 0.1
  return config

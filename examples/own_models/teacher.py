"""The teacher run of the own-models example: `my_models:Teacher` trained on scikit-learn's digits.

    PYTHONPATH=examples/own_models nst-jax-train --config examples/own_models/teacher.py \
      --workdir workdirs/own_teacher

`kd_nst.py` trains this run first, as its own stage, when it has not finished. `teacher.py:quick`:
one epoch (checkpoints every 10 steps), a check that everything runs.
"""

from configs import _common


def get_config(arg: str = ""):
  config = _common.base()
  config.student.model = "my_models:Teacher"  # package.module:attr, the module on PYTHONPATH
  config.data.image_size = 16  # digits are 8x8: 16 px leave three blocks 16 / 8 / 4 px maps
  config.schedule.epochs = 1 if arg == "quick" else 15
  config.schedule.decay_epochs = () if arg == "quick" else (10,)
  if arg == "quick":
    config.logging.checkpoint_every_steps = 10  # a resumable point inside the one epoch
  config.logging.tensorboard = False
  return config

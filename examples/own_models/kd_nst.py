"""The own-models example: `my_models:Student` distilled from `my_models:Teacher` with KD + NST.

    PYTHONPATH=examples/own_models nst-jax-train --config examples/own_models/kd_nst.py \
      --workdir workdirs/own_kd_nst

trains the teacher first (`teacher.py`, in `workdirs/own_teacher`, beside this run's workdir) when that
run has not finished, then the student. The NST layer pairs name the models' submodules by module path
(student_path:teacher_path); `python -m nst_jax.tools.taps my_models:Student --image_shape 16,16,1`
lists them. `kd_nst.py:quick`: one epoch per stage, a check that everything runs.
"""

import os

from configs import _common

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str = ""):
  config = _common.base()
  config.student.model = "my_models:Student"
  config.teacher.model = "my_models:Teacher"
  config.teacher.config = os.path.join(HERE, "teacher.py") + (":quick" if arg == "quick" else "")
  config.teacher.workdir = "own_teacher"  # beside this run's workdir
  config.data.image_size = 16
  config.distill.ce_weight = 1.0
  config.distill.kd_weight = 1.0
  config.distill.nst.weight = 50.0
  # Student path : teacher path; both pairs at one scale (16 x 16 and 8 x 8 maps at 16 px inputs).
  config.distill.nst.layers = "ConvBlock_0:block1,ConvBlock_1:block2"
  config.schedule.epochs = 1 if arg == "quick" else 15
  config.schedule.decay_epochs = () if arg == "quick" else (10,)
  config.logging.tensorboard = False
  return config

"""A tiny setting that trains in seconds: resnet8 on scikit-learn's digits at 16 px, one epoch. The test
suite's trained runs use it (`tests/conftest.py`), and it is the quickest way to try every command.

Commands (from the repository root): the supervised run (method `ce`, the default), then a student
distilled from it with KD + NST:

    python launch.py --config configs/tiny.py --workdir workdirs/tiny
    python launch.py --config configs/tiny.py:kd_nst --workdir workdirs/tiny_kd_nst

The teacher of `:kd_nst` is this file's own `ce` run (resnet8 too), read from `workdirs/tiny` beside the
student's workdir; when that run has not finished, the student's command trains it there first, as its
own stage. A sweep of both methods over two seeds, with one shared teacher:

    python -m nst_jax.tools.sweep --config configs/tiny.py --methods ce,kd_nst --seeds 0,1 \
      --root workdirs/tiny_sweep --jobs 2

Methods: `ce` (the default, no teacher) and `kd_nst` (CE + 1.0 KD at T = 4 + 50 NST with the polynomial
kernel, summed over `stage1`, `stage2` and `stage3` of both networks, at 16 / 8 / 4 px).

Data: scikit-learn's 1,797 8x8 digits (no download), the fixed split of `configs/digits.py` (1,438
training, 359 validation images), resized once to 16x16: the smallest size at which resnet8's three
stages halve their maps down to 4x4. One channel, the digits' own mean and std, no augmentation.

Recipe: `configs/default.py`'s optimizer (SGD momentum 0.9, lr 0.05, weight decay 5e-4, batch 64); one
epoch of 22 steps, no decay; a checkpoint every 5 steps (so that a stopped run has one to resume from);
no TensorBoard files (importing TensorFlow would cost seconds per run).

Runtime, measured on the 2-core development CPU: 57 s for the sweep command above (five runs: teacher,
2 x `ce`, 2 x `kd_nst`), SIGKILLed once mid-run and resumed as the test suite's fixture does; most of a
run's wall time is Python start-up and compilation.

Expected validation accuracy: no published number for this setup. One epoch is far from converged: a
check of the whole pipeline, not a result (`configs/digits.py` trains 30 epochs). Measured once
(the sweep command above): teacher 58.22 % top-1; `ce` 56.27 ± 2.76 % over seeds 0 and 1;
`kd_nst` 10.03 % (chance): one epoch is too short for a student under the NST term's weight of 50.
"""

from configs import _common

METHODS = ("ce", "kd_nst")

_STAGES = [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]


def get_config(method: str = "ce"):
  config = _common.base()
  config.student.model = "resnet8"
  config.data.image_size = 16
  config.schedule.epochs = 1
  config.schedule.decay_epochs = ()
  config.logging.log_every_steps = 11
  config.logging.checkpoint_every_steps = 5
  config.logging.tensorboard = False
  if _common.set_method(config, method, METHODS, kd_weights=(1.0, 1.0), feature_layers=_STAGES,
                        hint_layer=("stage2", "stage2")):
    _common.use_teacher(config, "tiny", "resnet8")
  return config

r"""The CIFAR-10 study: does NST help a resnet8 student of a resnet20 teacher, with which kernel, and with KD?

Command (from the repository root; the README's Results section shows the table it produced):

    python -m nst_jax.tools.sweep --config configs/cifar10_study.py --methods ce,kd,nst,kd_nst \
      --seeds 0,1,2 --root workdirs/cifar10_study --config.logging.tensorboard=False
    python -m nst_jax.tools.sweep --report --root workdirs/cifar10_study --export results/cifar10_folder

(`logging.tensorboard=False` only skips TensorFlow's import, ~16 s per run; the results are the same.)

The sweep trains the teacher once, in `workdirs/cifar10_study/teacher`, with
`configs/cifar10_study_teacher.py` (its own seed 0), then every method with seed 0, then seed 1, then
seed 2. `--methods` may add any of the other methods below; the protocol stays the same. One run alone
(here `nst` with seed 1; its teacher is trained first in `workdirs/cifar10_study_teacher` when that run
has not finished):

    python launch.py --config configs/cifar10_study.py:nst --workdir workdirs/cifar10_study_nst \
      --config.seed=1

The protocol, fixed before the first run and not tuned on its results:
* Data, recipe and schedule: `configs/cifar10_study_teacher.py`'s, for the teacher and for every
  method: `../shared/data/cifar10/train`, 10,000 training images (the first 1,000 per class), the 5,000
  held-out validation images (the last 500 per class) for every reported number and for nothing else
  (no early stopping, no choice of weights; "best" in the tables is chosen on that same split and is
  optimistic for that reason); pad + crop + flip; SGD momentum 0.9, weight decay 5e-4, batch 64,
  lr 0.05 x0.1 at epochs 6 and 8 of 10 (1,560 steps). Sized so that the required grid (4 methods x 3
  seeds, and the teacher) fits in about two hours of the 2-core development CPU on a slow day (a first
  start with 20,000 images, the folder configs' size, ran at 3.7 steps/s for `ce` under the day's load:
  about 3.5 hours for the grid; it was stopped in its first epoch and the size halved before any
  result was seen).
* Teacher resnet20 (widths 16 / 32 / 64, 0.27 M parameters), student resnet8 (0.08 M): RepDistiller's
  CIFAR ResNets. A stronger teacher (resnet56, about 3x resnet20's step time) would not fit the budget.
* Objectives (`configs/_common.py`'s `set_method`): the paper's CIFAR recipe where it gives one: KD is
  CE + 1.0 KD at T = 4 (the official "KD weight 16 at T = 4"); NST weight 50 (the official code's) at
  each of the three stage outputs (`stage1`, `stage2`, `stage3`, after their final ReLU, as RepDistiller's
  NST row; 32 / 16 / 8 px, the same widths in both networks, so nothing is resized or projected), with
  the polynomial kernel (d = 2, c = 0) unless the name says `linear` or `gaussian` (bandwidth: the
  per-image heuristic, `nst.sigma2 = 0`); AT 1000 over the same three stages and FitNet 100 at `stage2`
  (RepDistiller's weights; the paper gives none for CIFAR). The teacher uses its running BatchNorm
  statistics.

Runtime, measured (2026-12-02, 2-core development CPU shared with the test suite, two runs at a time):
`ce` 6.0 min alone and 10.1 min beside another run, `kd` 11.7-13.7, `nst` 12.5-13.4, `kd_nst` 10.0-13.7
min beside another run; 92 min for the required grid's sweep with its teacher.

Expected validation accuracy: no published number for this setup. Measured (last top-1, mean ± std over
seeds 0-2, 2026-12-02): `ce` 61.92 ± 0.26, `kd` 64.69 ± 0.24, `nst` 65.19 ± 0.13, `kd_nst` 65.59 ± 0.25;
teacher 66.20. The other methods (2026-12-03, from a retrained teacher at 66.82): `nst_linear` 63.75 ±
0.44, `nst_gaussian` 65.70 ± 0.10 (seed 0 of both from the first teacher), `fitnet` 64.13 ± 0.20, `at`
63.22 ± 0.59, `kd_fitnet` 66.38 ± 0.34, `kd_fitnet_nst` 65.54 ± 0.31 (`results/cifar10_folder/`).

The paper's CIFAR-10 numbers (Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", arXiv 1707.01219: the CIFAR-10 column of its table of error rates for ResNet-1001 ->
Inception-BN) are `REFERENCE` below, as data for the sweep's `reference` column: top-1 accuracy, %, 100 -
the table's error, with the table cell each comes from (this study's `nst` is the table's polynomial-kernel
NST row). They are NOT expectations for this study: a different teacher (ResNet-1001; this study's is
resnet20) and student (Inception-BN), all 50,000 images and a 164-epoch schedule.

The methods and their objectives:

| method | objective |
| --- | --- |
| `ce` | CE |
| `kd` | CE + KD (T = 4) |
| `nst` | CE + 50 NST (polynomial) |
| `kd_nst` | CE + KD + 50 NST (polynomial) |
| `nst_linear` | CE + 50 NST (linear) |
| `nst_gaussian` | CE + 50 NST (Gaussian) |
| `at` | CE + 1000 AT |
| `fitnet` | CE + 100 FitNet |
| `kd_fitnet` | CE + KD + 100 FitNet |
| `kd_fitnet_nst` | CE + KD + 100 FitNet + 50 NST (polynomial) |
"""

from configs import _common, cifar10_study_teacher
from configs import cifar10_preact_resnet1001_to_inception_bn_cifar as _paper_cifar10

REQUIRED = ("ce", "kd", "nst", "kd_nst")
METHODS = REQUIRED + ("nst_linear", "nst_gaussian", "at", "fitnet", "kd_fitnet", "kd_fitnet_nst")

_STAGES = [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]

# The paper's claims this study can test, as (method, against, claim): `python -m nst_jax.tools.sweep
# --report` writes each one's difference in the paper and here, with Welch's p, to `claims.md`.
CLAIMS = (
    ("nst", "ce", "NST helps the student"),
    ("nst", "kd", "NST beats KD"),
    ("kd_nst", "kd", "NST adds to KD"),
    ("kd_nst", "nst", "KD adds to NST"),
    ("nst", "nst_linear", "the polynomial kernel beats the linear"),
    ("nst", "nst_gaussian", "the polynomial kernel beats the Gaussian"),
    ("nst_gaussian", "nst_linear", "the Gaussian kernel beats the linear"),
    ("nst", "fitnet", "NST beats FitNet"),
    ("nst", "at", "NST beats AT"),
    ("kd_nst", "kd_fitnet", "KD + NST beats KD + FitNet"),
    ("kd_fitnet_nst", "kd_nst", "FitNet added to KD + NST does not help"),
    ("kd_fitnet_nst", "kd_fitnet", "NST added to KD + FitNet does not help"),
)

# The published top-1 accuracy (%) of each method and of the teacher in the paper's CIFAR-10 runs (not
# this study's setup), under this study's method names (its `nst` is the paper's `nst_poly`): 100 - the
# paper's error rate, with its source, which names that error and its table cell.
REFERENCE = {method: _paper_cifar10.REFERENCE["nst_poly" if method == "nst" else method]
             for method in METHODS + ("teacher",)}


def get_config(method: str = "kd_nst"):
  config = cifar10_study_teacher.get_config()
  config.student.model = "resnet8"
  if _common.set_method(config, method, METHODS, kd_weights=(1.0, 1.0), feature_layers=_STAGES,
                        hint_layer=("stage2", "stage2")):
    _common.use_teacher(config, "cifar10_study_teacher", "resnet20")
  return config

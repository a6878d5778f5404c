r"""The NST paper's CIFAR-10 runs: preact_resnet1001 -> inception_bn_cifar; the method is the config string.

Command (from the repository root; METHOD is one of ce, kd, fitnet, at, nst_linear, nst_poly, nst_gaussian,
kd_fitnet, kd_nst, kd_fitnet_nst; without `:METHOD` the config is `kd_nst`, the paper's best):

    python launch.py --config configs/cifar10_preact_resnet1001_to_inception_bn_cifar.py:METHOD \
      --workdir workdirs/cifar10_preact_resnet1001_to_inception_bn_cifar_METHOD

Every method but `ce` distils from the teacher run in `workdirs/cifar10_preact_resnet1001`; until that run
has finished, the command first trains (or resumes) the teacher there with
`configs/cifar10_preact_resnet1001.py`.

Data: TFDS `cifar10`: the 50,000 training images, 4-pixel pad + crop + flip; evaluated on the 10,000 test
images.

Recipe: `configs/_paper.py` (this project takes none from the paper for its CIFAR runs): He et al. 2016's
CIFAR recipe for the teacher's family, for every run alike: SGD momentum 0.9, weight decay 1e-4, batch 128,
lr 0.1 x0.1 at epochs 82 / 123 of 164. The teacher runs its BatchNorm on batch statistics, as the authors'
(ImageNet) code does. KD is CE + 1.0 KD at T = 4 (the official "KD weight 16 at T = 4"); NST weight 50 per
layer pair (the official code's); FitNet 100 and AT 1000 (RepDistiller's).

Layers (both networks at 32 / 16 / 8 px, so nothing is resized): NST and AT sum over three pairs of
pre-ReLU BatchNorm outputs, the official code's kind of map: the student's blocks 3b, 4d and 5b (`in3b`,
`in4d`, `in5b`: the last block at each resolution, 320 / 608 / 1024 channels) against the teacher's
`stage1_preact`, `stage2_preact` and `final_bn` (each stage's output through the BatchNorm that
consumes it, 64 / 128 / 256 channels; `final_bn` is the official teacher layer). FitNet regresses
`in4d_relu` (16 x 16 x 608) onto the teacher's `stage2_relu` (16 x 16 x 128): post-ReLU, because the
regressor ends in a ReLU.

Runtime: not measured. On the 2-core development CPU inception_bn_cifar trains at 4.9 img/s
(forward+backward, batch 64, README), so even `ce` takes about 20 days for the 164 epochs, and the
teacher's forward (about 24 img/s by depth scaling of preact_resnet164) adds about a fifth: accelerator
jobs (`python bench/step.py --teacher preact_resnet1001 --student inception_bn_cifar` there).

Expected test accuracy: the paper's table of CIFAR-10 / CIFAR-100 error rates for ResNet-1001 ->
Inception-BN (Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
arXiv 1707.01219), CIFAR-10 column: its "student" row for `ce`, the method's row for the others and its
"teacher" row for the teacher. The published numbers (top-1 accuracy, %, 100 - the table's error, with the
table cell each comes from) are `REFERENCE` below; `python -m nst_jax.tools.sweep --report` puts them
beside the results. Independent re-implementations report NST gains well below the paper's (RepDistiller's
CIFAR-100 table, for one: Tian et al., "Contrastive Representation Distillation", ICLR 2020,
github.com/HobbitLong/RepDistiller).

| method | objective |
| --- | --- |
| `ce` | CE |
| `kd` | CE + KD (T = 4) |
| `fitnet` | CE + 100 FitNet |
| `at` | CE + 1000 AT |
| `nst_linear` | CE + 50 NST (linear) |
| `nst_poly` | CE + 50 NST (polynomial) |
| `nst_gaussian` | CE + 50 NST (Gaussian) |
| `kd_fitnet` | CE + KD + 100 FitNet |
| `kd_nst` | CE + KD + 50 NST (polynomial) |
| `kd_fitnet_nst` | CE + KD + 100 FitNet + 50 NST (polynomial) |
"""

from configs import _paper

METHODS = _paper.CIFAR_METHODS

# The published top-1 accuracy (%) of each method and of the teacher: 100 - the paper's error rate,
# with its source, which names that error and its table cell (column and row).
_SOURCE = "NST paper, CIFAR-10 table (ResNet-1001 -> Inception-BN), 100 - error"
REFERENCE = {
    "ce": (94.20, f"{_SOURCE} 5.80 of row student"),
    "kd": (95.53, f"{_SOURCE} 4.47 of row KD"),
    "fitnet": (95.25, f"{_SOURCE} 4.75 of row FitNet"),
    "at": (95.36, f"{_SOURCE} 4.64 of row AT"),
    "nst_linear": (95.13, f"{_SOURCE} 4.87 of row NST linear"),
    "nst_poly": (95.61, f"{_SOURCE} 4.39 of row NST polynomial"),
    "nst_gaussian": (95.52, f"{_SOURCE} 4.48 of row NST Gaussian"),
    "kd_fitnet": (95.46, f"{_SOURCE} 4.54 of row KD + FitNet"),
    "kd_nst": (95.79, f"{_SOURCE} 4.21 of row KD + NST (poly)"),
    "kd_fitnet_nst": (95.46, f"{_SOURCE} 4.54 of row KD + FitNet + NST"),
    "teacher": (95.96, f"{_SOURCE} 4.04 of row teacher"),
}


def get_config(method: str = _paper.DEFAULT_METHOD):
  return _paper.cifar_student_config("cifar10", method)

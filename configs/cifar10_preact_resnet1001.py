r"""The NST paper's CIFAR-10 teacher: preact_resnet1001 (He et al. 2016), supervised.

Command (from the repository root):

    python launch.py --config configs/cifar10_preact_resnet1001.py \
      --workdir workdirs/cifar10_preact_resnet1001

`configs/cifar10_preact_resnet1001_to_inception_bn_cifar.py` reads this run from
`workdirs/cifar10_preact_resnet1001` and, until this run has finished, first trains or resumes it there.

Data: TFDS `cifar10` (downloaded by TFDS on first use, or already prepared under `data.data_dir`): the
50,000 training images, 4-pixel pad + crop + flip; evaluated on the 10,000 test images.

Recipe: `configs/_paper.py`. This project takes none from the paper for its CIFAR runs, so this is He et
al. 2016's recipe for this network: SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 x0.1 at epochs
82 / 123 of 164 (their 32k / 48k / 64k iterations); 63,960 steps. Their 400-iteration warm-up at lr 0.01
has no key in `configs/default.py` and is left out.

Runtime: not measured. On the 2-core development CPU the unrolled network's training step did not even
finish compiling in the README benchmark; scaling preact_resnet164's measured 21.7 img/s
(forward+backward, batch 64, README) by depth (111 / 18 units per stage) gives about 3.5 img/s, i.e.
about 28 days for the 164 epochs: an accelerator job (measure with `python bench/step.py --student
preact_resnet1001 --method ce` there).

Expected test accuracy: the teacher row, CIFAR-10 column, of the paper's table of CIFAR-10 and CIFAR-100
error rates for ResNet-1001 -> Inception-BN (Huang and Wang, "Like What You Like: Knowledge Distill via
Neuron Selectivity Transfer", arXiv 1707.01219). The published number (top-1 accuracy, %, 100 - the table's
error, with the table cell it comes from) is `REFERENCE` below; `python -m nst_jax.tools.sweep --report`
puts it beside the result. For comparison He et al. 2016 ("Identity Mappings in Deep Residual Networks")
report 4.92 % CIFAR-10 error for this network with this recipe; the paper's teacher is better, trained by a
recipe this project does not have.
"""

from configs import _paper

# The published top-1 accuracy (%) of this teacher: 100 - the paper's error rate, with its source,
# which names that error and its table cell (column and row).
REFERENCE = (95.96, "NST paper, CIFAR-10 table (ResNet-1001 -> Inception-BN), 100 - error "
             "4.04 of row teacher")


def get_config():
  return _paper.cifar_teacher_config("cifar10")

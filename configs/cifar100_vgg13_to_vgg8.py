r"""RepDistiller CIFAR-100, teacher vgg13 -> student vgg8; the method is the config-string argument.

Command (from the repository root; METHOD is one of ce, kd, fitnet, at, nst, kd_nst; without
`:METHOD` the config is `nst`):

    python launch.py --config configs/cifar100_vgg13_to_vgg8.py:METHOD \
      --workdir workdirs/cifar100_vgg13_to_vgg8_METHOD

Every method but `ce` distils from the teacher run in `workdirs/cifar100_vgg13`; when that has no
checkpoint yet, the run first trains the teacher there with `configs/cifar100_vgg13.py`.

Data: TFDS `cifar100`: the 50,000 training images, 4-pixel pad + crop + flip; evaluated on the 10,000
test images.

Recipe: `configs/_repdistiller.py` (RepDistiller's protocol, github.com/HobbitLong/RepDistiller): SGD
momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr 0.05 x0.1 at epochs 150 / 180 / 210; the teacher
with its running BatchNorm statistics.

Layers. The VGGs have four stages, and RepDistiller's feat[1:-1] for them is all four (blocks 1-4 after
their last ReLU, before any pool): NST and AT sum over `stage1` ... `stage4` of both networks, at
16 / 8 / 4 / 4 px with 128 / 256 / 512 / 512 channels on both sides (at 32 px input blocks 3 and 4 both
run at 4 x 4; the fourth pool runs only for 64 px inputs). So the VGG rows have four NST terms, not
three. FitNet regresses the student's `stage2` (8 x 8 x 256) onto the teacher's `stage2`
(RepDistiller's `--hint_layer 2`).

Runtime: not measured on an accelerator yet (there, `python bench/step.py --teacher vgg13
--student vgg8` gives the step time per method; a run is 187,440 steps). On the 2-core development
CPU, from the README's `bench/models.py` images/s at batch 64:

    vgg13 fwd+bwd 70.3, fwd 291.3 img/s; vgg8 fwd+bwd 203.8, fwd 898.1 img/s

and a distillation step costing the student's forward+backward plus the teacher's forward, the 187,440
steps of 64 images plus 240 evaluations of 10,000 take about 0.7 days for `ce` and 1.2 days for the
distillation methods, plus the feature loss (at most 82 ms per step: NST over resnet32x4 -> resnet8x4's
stage shapes, the widest here, README) and the teacher's own run if it is not trained yet: GPU jobs.

Expected test accuracy (%, last epoch, one run): RepDistiller's CIFAR-100 table (Tian et al., "Contrastive
Representation Distillation", ICLR 2020), row vgg13 -> vgg8: its student column for `ce`, the method's own
column for the others and its teacher column for the teacher. The published numbers (top-1 accuracy, %,
with the table cell each comes from) are `REFERENCE` below; `python -m nst_jax.tools.sweep --report` puts
them beside the results.

| method | objective |
| --- | --- |
| `ce` | CE |
| `kd` | 0.1 CE + 0.9 KD (T = 4) |
| `fitnet` | CE + 100 FitNet |
| `at` | CE + 1000 AT |
| `nst` | CE + 50 NST (polynomial) |
| `kd_nst` | 0.1 CE + 0.9 KD + 50 NST: no published number (RepDistiller never ran KD + NST) |
"""

from configs import _repdistiller

METHODS = _repdistiller.METHODS

# The published top-1 accuracy (%) of each method and of the teacher, with its source: the row and
# column of RepDistiller's CIFAR-100 table it comes from.
_SOURCE = "RepDistiller CIFAR-100 table, row vgg13 -> vgg8 (last epoch, one run)"
REFERENCE = {
    "ce": (70.36, f"{_SOURCE}, student column"),
    "kd": (72.98, f"{_SOURCE}, KD column"),
    "fitnet": (71.02, f"{_SOURCE}, FitNet column"),
    "at": (71.43, f"{_SOURCE}, AT column"),
    "nst": (71.53, f"{_SOURCE}, NST column"),
    "teacher": (74.64, f"{_SOURCE}, teacher column"),
}


def get_config(method: str = _repdistiller.DEFAULT_METHOD):
  return _repdistiller.student_config("vgg13", "vgg8", method)

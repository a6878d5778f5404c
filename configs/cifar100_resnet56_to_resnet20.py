r"""RepDistiller CIFAR-100, teacher resnet56 -> student resnet20; the method is the config-string argument.

Command (from the repository root; METHOD is one of ce, kd, fitnet, at, nst, kd_nst; without
`:METHOD` the config is `nst`):

    python launch.py --config configs/cifar100_resnet56_to_resnet20.py:METHOD \
      --workdir workdirs/cifar100_resnet56_to_resnet20_METHOD

Every method but `ce` distils from the teacher run in `workdirs/cifar100_resnet56`; when that has no
checkpoint yet, the run first trains the teacher there with `configs/cifar100_resnet56.py`.

Data: TFDS `cifar100`: the 50,000 training images, 4-pixel pad + crop + flip; evaluated on the 10,000
test images.

Recipe: `configs/_repdistiller.py` (RepDistiller's protocol, github.com/HobbitLong/RepDistiller): SGD
momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr 0.05 x0.1 at epochs 150 / 180 / 210; the teacher
with its running BatchNorm statistics.

Layers. NST and AT sum over `stage1`, `stage2`, `stage3` of both networks: each stage's output after its
final ReLU (RepDistiller's feat[1..3] with `preact=False`), at 32 / 16 / 8 px with 16 / 32 / 64
channels on both sides. FitNet regresses the student's `stage2` onto the teacher's `stage2`
(RepDistiller's `--hint_layer 2`).

Runtime: not measured on an accelerator yet (there, `python bench/step.py --teacher resnet56
--student resnet20` gives the step time per method; a run is 187,440 steps). On the 2-core development
CPU, from the README's `bench/models.py` images/s at batch 64:

    resnet56 fwd+bwd 64.6, fwd 301.4 img/s; resnet20 fwd+bwd 234.1, fwd 1063.1 img/s

and a distillation step costing the student's forward+backward plus the teacher's forward, the 187,440
steps of 64 images plus 240 evaluations of 10,000 take about 0.6 days for `ce` and 1.1 days for the
distillation methods, plus the feature loss (at most 82 ms per step: NST over resnet32x4 -> resnet8x4's
stage shapes, the widest here, README) and the teacher's own run if it is not trained yet: GPU jobs.

Expected test accuracy (%, last epoch, one run): RepDistiller's CIFAR-100 table (Tian et al., "Contrastive
Representation Distillation", ICLR 2020), row resnet56 -> resnet20: its student column for `ce`, the
method's own column for the others and its teacher column for the teacher. The published numbers (top-1
accuracy, %, with the table cell each comes from) are `REFERENCE` below;
`python -m nst_jax.tools.sweep --report` puts them beside the results.

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
_SOURCE = "RepDistiller CIFAR-100 table, row resnet56 -> resnet20 (last epoch, one run)"
REFERENCE = {
    "ce": (69.06, f"{_SOURCE}, student column"),
    "kd": (70.66, f"{_SOURCE}, KD column"),
    "fitnet": (69.21, f"{_SOURCE}, FitNet column"),
    "at": (70.55, f"{_SOURCE}, AT column"),
    "nst": (69.60, f"{_SOURCE}, NST column"),
    "teacher": (72.34, f"{_SOURCE}, teacher column"),
}


def get_config(method: str = _repdistiller.DEFAULT_METHOD):
  return _repdistiller.student_config("resnet56", "resnet20", method)

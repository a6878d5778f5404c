r"""RepDistiller CIFAR-100, teacher resnet32x4 -> student resnet8x4; the method is the config-string argument.

Command (from the repository root; METHOD is one of ce, kd, fitnet, at, nst, kd_nst; without
`:METHOD` the config is `nst`):

    python launch.py --config configs/cifar100_resnet32x4_to_resnet8x4.py:METHOD \
      --workdir workdirs/cifar100_resnet32x4_to_resnet8x4_METHOD

Every method but `ce` distils from the teacher run in `workdirs/cifar100_resnet32x4`; when that has no
checkpoint yet, the run first trains the teacher there with `configs/cifar100_resnet32x4.py`.

Data: TFDS `cifar100`: the 50,000 training images, 4-pixel pad + crop + flip; evaluated on the 10,000
test images.

Recipe: `configs/_repdistiller.py` (RepDistiller's protocol, github.com/HobbitLong/RepDistiller): SGD
momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr 0.05 x0.1 at epochs 150 / 180 / 210; the teacher
with its running BatchNorm statistics.

Layers. NST and AT sum over `stage1`, `stage2`, `stage3` of both networks: each stage's output after its
final ReLU (RepDistiller's feat[1..3] with `preact=False`), at 32 / 16 / 8 px with 64 / 128 / 256
channels on both sides, so no resizing happens. FitNet regresses the student's `stage2` (16 x 16 x 128)
onto the teacher's `stage2` (RepDistiller's `--hint_layer 2`).

Runtime: not measured on an accelerator yet (there, `python bench/step.py --teacher resnet32x4
--student resnet8x4` gives the step time per method; a run is 187,440 steps). On the 2-core development
CPU, from the README's `bench/models.py` images/s at batch 64:

    resnet32x4 fwd+bwd 16.0, fwd 81.6 img/s; resnet8x4 fwd+bwd 85.5, fwd 333.2 img/s

and a distillation step costing the student's forward+backward plus the teacher's forward, the 187,440
steps of 64 images plus 240 evaluations of 10,000 take about 1.7 days for `ce` and 3.4 days for the
distillation methods, plus the feature loss (at most 82 ms per step: NST over resnet32x4 -> resnet8x4's
stage shapes, the widest here, README) and the teacher's own run if it is not trained yet: GPU jobs.

Expected test accuracy (%, last epoch, one run): RepDistiller's CIFAR-100 table (Tian et al., "Contrastive
Representation Distillation", ICLR 2020), row resnet32x4 -> resnet8x4: its student column for `ce`, the
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
_SOURCE = "RepDistiller CIFAR-100 table, row resnet32x4 -> resnet8x4 (last epoch, one run)"
REFERENCE = {
    "ce": (72.50, f"{_SOURCE}, student column"),
    "kd": (73.33, f"{_SOURCE}, KD column"),
    "fitnet": (73.50, f"{_SOURCE}, FitNet column"),
    "at": (73.44, f"{_SOURCE}, AT column"),
    "nst": (73.30, f"{_SOURCE}, NST column"),
    "teacher": (79.42, f"{_SOURCE}, teacher column"),
}


def get_config(method: str = _repdistiller.DEFAULT_METHOD):
  return _repdistiller.student_config("resnet32x4", "resnet8x4", method)

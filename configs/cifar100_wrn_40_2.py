"""RepDistiller CIFAR-100 teacher: wrn_40_2, supervised (RepDistiller's `train_teacher.py`).

Command (from the repository root):

    python launch.py --config configs/cifar100_wrn_40_2.py --workdir workdirs/cifar100_wrn_40_2

The distillation config `configs/cifar100_wrn_40_2_to_wrn_16_2.py` (every method but `ce`) reads this run
from `workdirs/cifar100_wrn_40_2` and, until this run has finished, first trains or resumes it there.

Data: TFDS `cifar100` (downloaded by TFDS on first use, or already prepared under `data.data_dir`): the
50,000 training images, 4-pixel pad + crop + flip; evaluated on the 10,000 test images.

Recipe: `configs/_repdistiller.py` (RepDistiller's protocol, github.com/HobbitLong/RepDistiller): SGD
momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr 0.05 x0.1 at epochs 150 / 180 / 210; 187,440
steps.

Runtime: not measured on an accelerator yet (there, `python bench/step.py --student wrn_40_2 --method ce`
gives the step time; multiply by 187,440). On the 2-core development CPU, from the
README's `bench/models.py` images/s at batch 64:

    wrn_40_2 fwd+bwd 37.5, fwd 226.1 img/s

the 187,440 steps of 64 images plus 240 evaluations of 10,000 take about 3.8 days: a GPU job.

Expected test accuracy (%, last epoch, one run): RepDistiller's CIFAR-100 table (Tian et al., "Contrastive
Representation Distillation", ICLR 2020), row wrn_40_2 -> wrn_16_2, teacher column. The published number
(top-1 accuracy, %, with the table cell it comes from) is `REFERENCE` below;
`python -m nst_jax.tools.sweep --report` puts it beside the result.
"""

from configs import _repdistiller

# The published top-1 accuracy (%) of this teacher, with its source: the row and column of
# RepDistiller's CIFAR-100 table it comes from.
REFERENCE = (75.61, "RepDistiller CIFAR-100 table, row wrn_40_2 -> wrn_16_2, teacher column "
             "(last epoch, one run)")


def get_config():
  return _repdistiller.teacher_config("wrn_40_2")

r"""The NST paper's ImageNet runs: preact_resnet101 -> inception_bn; the method is the config string.

Command (from the repository root; METHOD is one of ce, kd, fitnet, at, nst, kd_fitnet, kd_at, kd_nst;
without `:METHOD` the config is `kd_nst`; DIR holds the manually downloaded ILSVRC2012 tar files):

    python launch.py --config configs/imagenet_preact_resnet101_to_inception_bn.py:METHOD \
      --workdir workdirs/imagenet_preact_resnet101_to_inception_bn_METHOD --config.data.manual_dir=DIR

Every method but `ce` distils from the teacher run in `workdirs/imagenet_preact_resnet101`. Train that
first with its own command (`configs/imagenet_preact_resnet101.py`): a run that finds no teacher
checkpoint trains the teacher from that file as it is, without this command's `data.manual_dir`.

Data: TFDS `imagenet2012` streamed with tf.data (needs TensorFlow): random-resized crop to 224 + flip,
resize 256 / centre crop 224 for evaluation on the 50,000 validation images; ImageNet's mean and std.

Recipe: `configs/_paper.py`, the official NST recipe (the paper's and its authors' code's:
github.com/TuSimple/neuron-selectivity-transfer): batch 512, Nesterov momentum 0.9, weight decay 1e-4, lr
0.1 x0.1 at epochs 30 / 60 / 90, 100 epochs (250,200 steps); the teacher's BatchNorm on batch statistics,
as the official code. KD: CE + 1.0 KD at T = 4 (the official "KD weight 16 at T = 4"); NST: weight 50,
polynomial kernel (d = 2, c = 0); FitNet 100 and AT 1000 (RepDistiller's weights,
github.com/HobbitLong/RepDistiller, as for CIFAR).

Layers: NST is the official single pair, the student's `in5b` (block 5b's pre-ReLU BatchNorm outputs,
7 x 7 x 1024) against the teacher's `final_bn` (the final BatchNorm before the last ReLU, 7 x 7 x 2048).
AT sums over that pair and the 14 x 14 one below it, `in4d` (608 channels) against the teacher's
`stage3_preact` (1024), both pre-ReLU like the NST pair. FitNet regresses `in4d_relu` onto the teacher's
`stage3_relu` (14 x 14; post-ReLU because the regressor ends in a ReLU). The student's first stage
(27 px) has no teacher map of its size (56 / 28), so no pair uses it.

Runtime: not measured (no 224 px step has been timed on any machine yet): an accelerator job; a step
costs the student's forward+backward and the teacher's forward on 512 images, 250,200 steps.

Expected validation accuracy: the paper's ImageNet results for ResNet-101 -> Inception-BN (Huang and Wang,
"Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", arXiv 1707.01219), which it gives
as top-1 / top-5 error: its "student" row for `ce`, the method's row for the others and its teacher for the
teacher. The published numbers (top-1 accuracy, %, 100 - the top-1 error, with the row each comes from and
its top-5 error) are `REFERENCE` below; `python -m nst_jax.tools.sweep --report` puts them beside the
results.

| method | objective |
| --- | --- |
| `ce` | CE |
| `kd` | CE + KD |
| `fitnet` | CE + 100 FitNet |
| `at` | CE + 1000 AT |
| `nst` | CE + 50 NST |
| `kd_fitnet` | CE + KD + 100 FitNet |
| `kd_at` | CE + KD + 1000 AT |
| `kd_nst` | CE + KD + 50 NST |
"""

from configs import _paper

METHODS = _paper.IMAGENET_METHODS

# The published top-1 accuracy (%) of each method and of the teacher: 100 - the paper's top-1 error,
# with its source, which names that error, its row and the top-5 error beside it.
_SOURCE = "NST paper, ImageNet (ResNet-101 -> Inception-BN), 100 - top-1 error"
REFERENCE = {
    "ce": (74.26, f"{_SOURCE} 25.74 of row student (top-5 error 8.07)"),
    "kd": (75.44, f"{_SOURCE} 24.56 of row KD (top-5 error 7.35)"),
    "fitnet": (74.70, f"{_SOURCE} 25.30 of row FitNet (top-5 error 7.93)"),
    "at": (74.90, f"{_SOURCE} 25.10 of row AT (top-5 error 7.61)"),
    "nst": (75.18, f"{_SOURCE} 24.82 of row NST (top-5 error 7.58)"),
    "kd_fitnet": (75.52, f"{_SOURCE} 24.48 of row KD + FitNet (top-5 error 7.27)"),
    "kd_at": (75.36, f"{_SOURCE} 24.64 of row KD + AT (top-5 error 7.26)"),
    "kd_nst": (75.66, f"{_SOURCE} 24.34 of row KD + NST (top-5 error 7.11)"),
    "teacher": (77.32, f"{_SOURCE} 22.68 of row teacher (top-5 error 6.58)"),
}


def get_config(method: str = _paper.DEFAULT_METHOD):
  return _paper.imagenet_student_config(method)

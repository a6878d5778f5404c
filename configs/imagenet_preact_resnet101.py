r"""The NST paper's ImageNet teacher: pre-activation ResNet-101 (tornadomeet's MXNet layout), supervised.

Command (from the repository root; DIR holds the manually downloaded ILSVRC2012 tar files, see the
TFDS `imagenet2012` page):

    python launch.py --config configs/imagenet_preact_resnet101.py \
      --workdir workdirs/imagenet_preact_resnet101 --config.data.manual_dir=DIR

`configs/imagenet_preact_resnet101_to_inception_bn.py` reads this run from
`workdirs/imagenet_preact_resnet101`. Train it with this command first: a student run that finds no
checkpoint there trains the teacher from this file as it is, without the student's command-line
overrides such as `data.manual_dir`.

Data: TFDS `imagenet2012` (1,281,167 training images, 1,000 classes; evaluated on the 50,000 validation
images), streamed with tf.data (`data.pipeline = "tfds"`, needs TensorFlow): random-resized crop to
224 + flip for training, resize 256 / centre crop 224 for evaluation, ImageNet's mean and std.

Recipe: `configs/_paper.py`, the official NST recipe (the paper's and its authors' code's:
github.com/TuSimple/neuron-selectivity-transfer) used for the teacher too: batch 512, Nesterov momentum
0.9, weight decay 1e-4, lr 0.1 x0.1 at epochs 30 / 60 / 90, 100 epochs; 2,502 steps per epoch, 250,200
steps.

Runtime: not measured (no 224 px step has been timed on any machine yet): an accelerator job; measure
the step time on yours and multiply by 250,200.

Expected validation accuracy: the teacher of the paper's ImageNet results for ResNet-101 -> Inception-BN
(Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", arXiv
1707.01219), which the paper gives as top-1 / top-5 error. The published number (top-1 accuracy, %, 100 -
the top-1 error, with the row it comes from and its top-5 error) is `REFERENCE` below;
`python -m nst_jax.tools.sweep --report` puts it beside the result. That teacher was tornadomeet's released
model, trained by its own recipe, so this run is not guaranteed to reach it.
"""

from configs import _paper

# The published top-1 accuracy (%) of this teacher: 100 - the paper's top-1 error, with its source,
# which names that error, its row and the top-5 error beside it.
REFERENCE = (77.32, "NST paper, ImageNet (ResNet-101 -> Inception-BN), 100 - top-1 error 22.68 "
             "of row teacher (top-5 error 6.58)")


def get_config():
  return _paper.imagenet_teacher_config()

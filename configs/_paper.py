"""The NST paper's runs, shared by the `*_preact_resnet1001*` and `imagenet_*` configs.

The paper: Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", arXiv
1707.01219; its authors' code (MXNet, ImageNet only): github.com/TuSimple/neuron-selectivity-transfer.

CIFAR-10 / CIFAR-100: teacher `preact_resnet1001`, student `inception_bn_cifar`. This project takes no
CIFAR training recipe from the paper, so every CIFAR run here (teacher, baseline student, distilled
students) uses He et al. 2016's recipe for these pre-activation ResNets on CIFAR ("Identity Mappings in
Deep Residual Networks", the paper that defines the teacher architecture): SGD momentum 0.9, weight decay
1e-4, batch 128, lr 0.1 x0.1 after 32k and 48k of 64k iterations, i.e. 164 epochs of 390 steps with decays
at epochs 82 and 123; 4-pixel pad + crop + flip; each dataset's own mean and std; the 50,000 training
images, evaluated on the 10,000 test images. He et al. also warm up ResNet-1001 at lr 0.01 for its first
400 iterations; `configs/default.py` has no warm-up key, so these configs cannot express it.

ImageNet: teacher `preact_resnet101`, student `inception_bn`, the official recipe (the paper's and its
code's): batch 512, Nesterov momentum 0.9, lr 0.1 x0.1 at epochs 30 / 60 / 90, 100 epochs, weight decay
1e-4; random-resized crop 224 + flip, resize 256 / centre 224 for evaluation; the teacher's BatchNorm on
batch statistics, as the official code. The teacher run uses the same recipe (the paper's teacher was
tornadomeet's released ResNet-101, trained elsewhere).

Objectives (weights: the official code's for KD and NST, RepDistiller's for FitNet and AT):

* `kd`: CE + 1.0 KD at T = 4, the official code's "KD weight 16 at T = 4" (`losses.kd` has the T^2).
* `nst*`: + 50 * NST per layer pair (the official code's weight) with the kernel the name says; `nst`,
  `kd_nst` and `kd_fitnet_nst` use the paper's polynomial kernel (d = 2, c = 0). The Gaussian's
  bandwidth is the per-image heuristic (`nst.sigma2 = 0`). The official code has the polynomial kernel
  only, so no per-kernel weight is taken from it: 50 for all three.
* `fitnet`: + 100 FitNet, `at`: + 1000 * sum of AT (RepDistiller's weights,
  github.com/HobbitLong/RepDistiller; this project takes none from the paper).
* Combinations add their terms to CE + 1.0 KD.

The CIFAR teacher also runs its BatchNorm on batch statistics: the paper's CIFAR code is not public,
and its authors' ImageNet code does so.

Layers (see `CIFAR_LAYERS` / `IMAGENET_LAYERS`): NST and AT use the official code's kind of map, the
pre-ReLU BatchNorm output, matched at equal spatial size; FitNet's regressor ends in a ReLU, so it
regresses onto the teacher's post-ReLU map.
"""

import ml_collections

from configs import _common

CIFAR_METHODS = ("ce", "kd", "fitnet", "at", "nst_linear", "nst_poly", "nst_gaussian", "kd_fitnet", "kd_nst",
                 "kd_fitnet_nst")
IMAGENET_METHODS = ("ce", "kd", "fitnet", "at", "nst", "kd_fitnet", "kd_at", "kd_nst")
DEFAULT_METHOD = "kd_nst"  # The paper's best recipe.

# CIFAR, both networks at 32 / 16 / 8 px: the student's Inception blocks that end each resolution
# (3b, 4d, 5b; `inception_bn.py`'s stage{i}_preact) against the BatchNorm that consumes each teacher
# stage (`preact_resnet.py`'s stage{i}_preact; the last one is the final BN, the official teacher layer).
CIFAR_LAYERS = {
    "features": (("in3b", "stage1_preact"), ("in4d", "stage2_preact"), ("in5b", "final_bn")),
    "hint": ("in4d_relu", "stage2_relu"),  # 16 x 16: 608 -> 128 channels.
}
# ImageNet, 224 px: NST is the official single pair, in5b (7 x 7 x 1024) vs final_bn (7 x 7 x 2048). AT
# adds the 14 x 14 pair below it (student in4d, 608 channels, vs teacher stage 3, 1024); FitNet hints
# at that 14 x 14 level (the student's stage 1, 27 px, has no teacher map of its size: 56 / 28).
IMAGENET_LAYERS = {
    "nst": (("in5b", "final_bn"),),
    "features": (("in4d", "stage3_preact"), ("in5b", "final_bn")),
    "hint": ("in4d_relu", "stage3_relu"),
}

CIFAR_TEACHER, CIFAR_STUDENT = "preact_resnet1001", "inception_bn_cifar"
IMAGENET_TEACHER, IMAGENET_STUDENT = "preact_resnet101", "inception_bn"


def _cifar(dataset: str, model: str) -> ml_collections.ConfigDict:
  if dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"Unknown CIFAR dataset {dataset!r}: cifar10 or cifar100.")
  config = _common.base()
  config.data.name = dataset
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.image_size = 32
  config.data.augment = "cifar"
  config.data.mean, config.data.std = (), ()  # The dataset's own, from sources.MEAN_STD.
  config.student.model = model
  config.optim.learning_rate = 0.1
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 1e-4
  config.schedule.batch_size = 128
  config.schedule.epochs = 164
  config.schedule.decay_epochs = (82, 123)
  config.schedule.decay_factor = 0.1
  return config


def cifar_teacher_config(dataset: str) -> ml_collections.ConfigDict:
  """Supervised ResNet-1001 on `dataset`."""
  return _cifar(dataset, CIFAR_TEACHER)


def cifar_student_config(dataset: str, method: str) -> ml_collections.ConfigDict:
  """Inception-BN on `dataset` with `method`, distilled from `cifar_teacher_config(dataset)`'s run."""
  config = _cifar(dataset, CIFAR_STUDENT)
  terms = _common.set_method(config, method, CIFAR_METHODS, kd_weights=(1.0, 1.0),
                             feature_layers=CIFAR_LAYERS["features"], hint_layer=CIFAR_LAYERS["hint"])
  if terms:
    _common.use_teacher(config, f"{dataset}_{CIFAR_TEACHER}", CIFAR_TEACHER, batchnorm="batch")
  return config


def _imagenet(model: str) -> ml_collections.ConfigDict:
  config = _common.base()
  config.data.name = "imagenet2012"
  config.data.pipeline = "tfds"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.manual_dir = ""  # Placeholder: the folder with the ILSVRC2012 tar files (command line).
  config.data.image_size = 224
  config.data.augment = "imagenet"
  config.data.mean, config.data.std = (), ()  # sources.MEAN_STD["imagenet2012"].
  config.student.model = model
  config.optim.learning_rate = 0.1
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 1e-4
  config.schedule.batch_size = 512
  config.schedule.epochs = 100
  config.schedule.decay_epochs = (30, 60, 90)
  config.schedule.decay_factor = 0.1
  config.logging.log_every_steps = 100
  config.logging.checkpoint_every_steps = 2500  # About one epoch (2,502 steps).
  return config


def imagenet_teacher_config() -> ml_collections.ConfigDict:
  """Supervised pre-activation ResNet-101 on ImageNet."""
  return _imagenet(IMAGENET_TEACHER)


def imagenet_student_config(method: str) -> ml_collections.ConfigDict:
  """Inception-BN on ImageNet with `method`, distilled from `imagenet_teacher_config()`'s run."""
  config = _imagenet(IMAGENET_STUDENT)
  terms = _common.set_method(config, method, IMAGENET_METHODS, kd_weights=(1.0, 1.0),
                             feature_layers=IMAGENET_LAYERS["features"], hint_layer=IMAGENET_LAYERS["hint"],
                             nst_layers=IMAGENET_LAYERS["nst"])
  if terms:
    _common.use_teacher(config, f"imagenet_{IMAGENET_TEACHER}", IMAGENET_TEACHER, batchnorm="batch")
  return config

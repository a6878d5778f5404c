"""Default configuration: declares every key the trainer reads, grouped, with working defaults.

Experiment configs import this module, call `get_config()` and override what they change. Keys whose
value must come from the experiment or the command line are placeholders (empty strings): a run with
`teacher.model == ""` is plain supervised training (teachers and baseline students); one with a teacher
distils.

The defaults describe the offline job: a small CNN pair on scikit-learn's digits, which needs no
download. Objective:

    gamma * CE + alpha * KD(T) + sum over nst.layers of beta * NST(kernel) + fitnet.weight * FitNet
      + at.weight * sum over at.layers of AT
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "float32"      # Compute dtype of both models: "float32" or "bfloat16".
  config.parallel = "jit"       # "jit" (global-view jit over a 1-D data mesh) or "pmap".
  config.conv_impl = "auto"     # "auto": exact faster convolutions and gradients on CPU; "xla": XLA's own.

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"   # "digits", "image_folder", "cifar10", "cifar100", "imagenet2012".
  config.data.pipeline = "auto"  # "device" (in memory, no TF), "tfds" (tf.data streaming), "auto".
  config.data.train_split = "train"
  config.data.eval_split = "validation"  # TFDS cifar: "test"; imagenet2012: "validation".
  config.data.path = ""         # image_folder: the class-folder tree (relative: cwd, else repository).
  config.data.data_dir = ""     # TFDS data directory ("" = TFDS's default).
  config.data.manual_dir = ""   # imagenet2012: where the manually downloaded tar files are.
  config.data.cache_dir = ""    # Where decoded arrays are cached ("" = the source's default).
  config.data.validation_per_class = 0  # image_folder: last N images of every class held out.
  config.data.limit_per_class = 0       # image_folder: use only the first N per class (0 = all).
  config.data.image_size = 32   # In-memory data is resized to this once, if different (0 = keep).
  config.data.augment = "none"  # "none", "cifar" (pad-4 crop + flip) or "imagenet".
  config.data.mean = ()         # Per-channel normalisation in [0, 1] units; () = the dataset's own.
  config.data.std = ()

  config.teacher = ml_collections.ConfigDict()
  config.teacher.model = ""     # "" = no teacher: supervised training.
  config.teacher.workdir = ""   # The teacher's run directory (relative: beside the student's workdir).
  config.teacher.config = ""    # The teacher run's config file (relative: to the repository), used to
                                # train the teacher first when its run has not finished.
  config.teacher.batchnorm = "running"  # "running" (PyTorch re-implementations) or "batch" (official).

  config.student = ml_collections.ConfigDict()
  config.student.model = "resnet8"

  config.distill = ml_collections.ConfigDict()
  config.distill.ce_weight = 1.0        # gamma
  config.distill.kd_weight = 0.0        # alpha
  config.distill.temperature = 4.0
  config.distill.nst = ml_collections.ConfigDict()
  config.distill.nst.weight = 0.0       # beta, applied to each layer pair
  config.distill.nst.layers = "stage3:stage3"  # student_tap:teacher_tap pairs, comma-separated
  config.distill.nst.kernel = "polynomial"
  config.distill.nst.degree = 2
  config.distill.nst.c = 0.0
  config.distill.nst.sigma2 = 0.0       # Gaussian bandwidth; 0 = the per-image heuristic.
  config.distill.nst.resize = "pool"
  config.distill.nst.unbiased = False
  config.distill.fitnet = ml_collections.ConfigDict()
  config.distill.fitnet.weight = 0.0
  config.distill.fitnet.layer = "stage2:stage2"  # one student_tap:teacher_tap pair
  config.distill.at = ml_collections.ConfigDict()
  config.distill.at.weight = 0.0
  config.distill.at.p = 2.0
  config.distill.at.layers = "stage1:stage1,stage2:stage2,stage3:stage3"

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 0.05
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 5e-4

  config.schedule = ml_collections.ConfigDict()
  config.schedule.batch_size = 64       # Global batch, over all devices and hosts.
  config.schedule.epochs = 30
  config.schedule.decay_epochs = (20, 25)
  config.schedule.decay_factor = 0.1

  config.logging = ml_collections.ConfigDict()
  config.logging.log_every_steps = 50
  config.logging.eval_every_epochs = 1
  config.logging.checkpoint_every_steps = 500
  config.logging.checkpoint_every_epochs = 1      # Also at every epoch end (0 = off).
  config.logging.checkpoint_every_minutes = 10.0  # And this long after the last save (0 = off).
  config.logging.keep_checkpoints = 3
  config.logging.tensorboard = True     # TensorBoard event files (where TensorFlow is installed).
  return config

"""Input data: `build(config, mesh) -> Data`, the run's pipelines from its config (`pipelines`), and the
pieces it is made of.

* `pipelines`: `build`, `build_eval` (the run's evaluation preprocessing on another split or image
  folder), `check_config`, `normalisation`, `resize_images`, `Data`.
* `sources`: `load(name, split, **options) -> ArrayDataset` for datasets that fit in memory (`digits`,
  `image_folder`, `cifar10`, `cifar100`), as uint8 NHWC NumPy arrays, decoded once and cached; image
  folders labelled by class name (`read_labelled_images`); the TFDS builder preparation.
* `device_pipeline`: `DevicePipeline`, the default for in-memory datasets: arrays on the devices,
  shuffled, augmented and normalised by jitted JAX code, batch of step s a pure function of (seed, s).
  Needs no TensorFlow. Its augmentation and normalisation also serve the tf.data pipeline.
* `tfds_pipeline`: `TfdsPipeline`, tf.data streaming for datasets that do not fit in memory
  (`imagenet2012`). Needs TensorFlow and TFDS, imported only when it is used.

Importing this package imports JAX but neither TensorFlow nor TFDS.
"""

from nst_jax.trainer.data.pipelines import Data, build, build_eval, check_config, normalisation

__all__ = ["Data", "build", "build_eval", "check_config", "normalisation"]

"""Input data: where datasets come from (`sources`) and the two ways of batching them.

* `sources`: `load(name, split, **options) -> ArrayDataset` for datasets that fit in memory (`digits`,
  `image_folder`, `cifar10`, `cifar100`), as uint8 NHWC NumPy arrays, decoded once and cached.
* `device_pipeline`: `DevicePipeline`, the default for in-memory datasets: arrays on the devices,
  shuffled, augmented and normalised by jitted JAX code, batch of step s a pure function of (seed, s).
  Needs no TensorFlow.
* `tfds_pipeline`: `TfdsPipeline`, tf.data streaming for datasets that do not fit in memory
  (`imagenet2012`). Needs TensorFlow and TFDS, imported only when it is used.

Importing this package imports none of them, and so neither JAX, TensorFlow nor TFDS:

    from nst_jax.data import sources, device_pipeline
"""

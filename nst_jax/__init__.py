"""nst_jax: knowledge distillation by Neuron Selectivity Transfer in JAX/Flax.

Importing the package has no side effects; import the modules you need:

    from nst_jax import kernels, losses
"""

__version__ = "0.4.0"  # pyproject.toml reads it from here

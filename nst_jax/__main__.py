"""`python -m nst_jax --config ... --workdir ...`: the same command line as launch.py (nst_jax/cli.py)."""

from nst_jax import cli

cli.run()

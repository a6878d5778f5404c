"""`python -m nst_jax --config ... --workdir ...`: the command line of launch.py (nst_jax/tools/cli.py)."""

from nst_jax.tools import cli

cli.run()

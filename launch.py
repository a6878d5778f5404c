"""Runs one nst_jax experiment (the same as `python -m nst_jax` and `nst-jax-train`):

    python launch.py --config configs/<name>.py[:METHOD] --workdir <dir> [--config.a.b=value ...]

Works from any directory. See `nst_jax/tools/cli.py` for the flags (multi-process runs included).
"""

from nst_jax.tools import cli

if __name__ == "__main__":
  cli.run()

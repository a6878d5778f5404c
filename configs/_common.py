"""Pieces shared by the experiment configs; not a config itself (the leading underscore keeps it out of
`--config` use and out of `tests/configs_test.py`'s glob).

* `base()`: `configs/default.py`'s config, locked before any override, so that overriding a key that
  does not exist is an error at load time instead of a silent new key the trainer never reads.
* `use_teacher(config, name, model)`: the teacher fields, by the one naming rule every config follows:
  the run of `configs/<name>.py` lives in a workdir called `<name>` beside the student's workdir (a
  relative `teacher.workdir` is resolved against the folder holding the student's workdir, see
  `nst_jax/trainer/config_lib.py`). A distillation run loads the teacher from there, or, when that run
  has not finished (no `results.json` marked finished), first trains or resumes it there with
  `configs/<name>.py` as its own stage of the same command.
* `set_method(config, method, ...)`: the objective of a method named as in the published tables.
"""

from collections.abc import Sequence

import ml_collections

from configs import default
from nst_jax import objective

# Method-name suffix -> `config.distill.nst.kernel` (`nst_linear`, `nst_poly`, `nst_gaussian`).
KERNELS = {"linear": "linear", "poly": "polynomial", "gaussian": "gaussian"}
TERMS = ("kd", "fitnet", "at", "nst")

Pairs = Sequence[tuple[str, str]]


def base() -> ml_collections.ConfigDict:
  """The default config, locked: overrides may change values, never add keys."""
  config = default.get_config()
  config.lock()
  return config


def use_teacher(config: ml_collections.ConfigDict, name: str, model: str, batchnorm: str = "running"):
  """Distils from the run of `configs/<name>.py`, whose student is `model`."""
  config.teacher.model = model
  config.teacher.config = f"configs/{name}.py"
  config.teacher.workdir = name
  config.teacher.batchnorm = batchnorm


def parse_method(method: str, valid: Sequence[str]) -> tuple[set[str], str]:
  """`"kd_nst"` -> ({"kd", "nst"}, "polynomial"); `"nst_gaussian"` -> ({"nst"}, "gaussian"); `"ce"` -> set().

  Raises a ValueError naming the valid methods when `method` is not one of `valid`.
  """
  if method not in valid:
    raise ValueError(f"Unknown method {method!r}. Valid methods: {', '.join(valid)}.")
  parts = method.split("_")
  kernel = "polynomial"  # The paper's and RepDistiller's kernel: (x . y)^2.
  if parts[-1] in KERNELS:
    kernel = KERNELS[parts.pop()]
  terms = set(parts) - {"ce"}
  if not terms <= set(TERMS) or (kernel != "polynomial" and "nst" not in terms):
    raise ValueError(f"Method {method!r} is not a combination of ce and {', '.join(TERMS)}.")
  return terms, kernel


def set_method(config: ml_collections.ConfigDict, method: str, valid: Sequence[str], *,
               kd_weights: tuple[float, float], feature_layers: Pairs, hint_layer: tuple[str, str],
               nst_layers: Pairs | None = None, nst_weight: float = 50.0, fitnet_weight: float = 100.0,
               at_weight: float = 1000.0) -> set[str]:
  """Sets `config.distill` for `method`; returns its terms (empty for plain cross-entropy).

  Args:
    kd_weights: (ce_weight, kd_weight) of every method with KD: RepDistiller (0.1, 0.9), the official
      code (1.0, 1.0), i.e. its "KD weight 16 at T = 4" with the T^2 inside `losses.kd`.
    feature_layers: the (student tap, teacher tap) pairs AT sums over, and NST too unless `nst_layers`.
    hint_layer: FitNet's (student tap, teacher tap).
    nst_weight, fitnet_weight, at_weight: RepDistiller's 50, 100 and 1000 by default.
  """
  terms, kernel = parse_method(method, valid)
  distill = config.distill
  distill.ce_weight, distill.kd_weight = kd_weights if "kd" in terms else (1.0, 0.0)
  distill.temperature = 4.0
  distill.nst.weight = nst_weight if "nst" in terms else 0.0
  distill.nst.layers = objective.format_pairs(feature_layers if nst_layers is None else nst_layers)
  distill.nst.kernel = kernel
  distill.fitnet.weight = fitnet_weight if "fitnet" in terms else 0.0
  distill.fitnet.layer = objective.format_pairs([hint_layer])
  distill.at.weight = at_weight if "at" in terms else 0.0
  distill.at.layers = objective.format_pairs(feature_layers)
  return terms

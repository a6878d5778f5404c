"""The training objective of a run, built once from its `config.distill`:

    ce_weight * CE + kd_weight * KD(T) + sum over nst.layers of nst.weight * NST(kernel)
      + fitnet.weight * FitNet + at.weight * sum over at.layers of AT

Terms whose weight is 0 are not computed. Without a teacher only cross-entropy is allowed, so a
supervised run (a teacher, a baseline student) is the same code path. Layer names are the models' tap
names (`stage3`, `stage2_preact`, `in5b`, ...) and are checked against both models before any step
runs, so a typo is an error naming the valid taps, not a KeyError inside a traced function.

Also owns the FitNet regressor (`HintRegressor`) and `HintStudent`, the student with the regressor on
one of its taps, whose output is one more feature (`HINT`): the regressor is part of the student's one
variable tree and trained with it, and the objective reads the hint like any other feature.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nst_jax import kernels, losses
from nst_jax.models import layers

Array = jax.Array
HINT = "hint"  # The feature name of FitNet's regressor output in a `HintStudent`.


def parse_pairs(value, key: str) -> tuple[tuple[str, str], ...]:
  """`"s1:t1,s2:t2"` (or a sequence of 2-sequences) -> ((s1, t1), (s2, t2)); `""` -> ().

  Layer pairs are written student_tap:teacher_tap; `key` names the setting in the error."""
  if isinstance(value, str):
    items = [item.strip() for item in value.split(",") if item.strip()]
    pairs = tuple(tuple(part.strip() for part in item.split(":")) for item in items)
  else:
    pairs = tuple(tuple(p) for p in value)
  if not all(len(p) == 2 and all(isinstance(n, str) and n for n in p) for p in pairs):
    raise ValueError(f"{key} must be student_tap:teacher_tap pairs separated by commas, e.g. "
                     f"'stage1:stage1,stage3:stage3'; got {value!r}.")
  return pairs


def _one_pair(value, key: str) -> tuple[str, str]:
  pairs = parse_pairs(value, key)
  if len(pairs) != 1:
    raise ValueError(f"{key} must be exactly one student_tap:teacher_tap pair, got {pairs!r}.")
  return pairs[0]


def format_pairs(pairs) -> str:
  """The inverse of `parse_pairs`, for configs."""
  return ",".join(f"{s}:{t}" for s, t in pairs)


@dataclasses.dataclass(frozen=True)
class Objective:
  """Loss weights, layer pairs and kernel settings; call it to get (total, components)."""

  ce_weight: float = 1.0
  kd_weight: float = 0.0
  temperature: float = 4.0
  nst_weight: float = 0.0
  nst_layers: tuple[tuple[str, str], ...] = ()
  nst_kernel: str = "polynomial"
  nst_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  nst_resize: str = "pool"
  nst_unbiased: bool = False
  fitnet_weight: float = 0.0
  fitnet_layer: tuple[str, str] | None = None
  at_weight: float = 0.0
  at_p: float = 2.0
  at_layers: tuple[tuple[str, str], ...] = ()

  @classmethod
  def from_config(cls, distill) -> "Objective":
    """From a `config.distill` ConfigDict (see configs/default.py); validates names and weights."""
    kernel = distill.nst.kernel
    try:  # Unknown kernel, bad degree / c: one ValueError now, not an error at trace time.
      if kernels.get_kernel(kernel) is kernels.polynomial:
        params = {"degree": int(distill.nst.degree), "c": float(distill.nst.c)}
      elif kernels.get_kernel(kernel) is kernels.gaussian:
        params = {"sigma2": float(distill.nst.sigma2)} if distill.nst.sigma2 > 0 else {}
      else:
        params = {}
      kernels.applicable_methods(kernel, **params)
    except ValueError as error:
      raise ValueError(f"config.distill.nst: {error}") from None
    if distill.nst.resize not in losses.RESIZE_POLICIES:
      raise ValueError(f"config.distill.nst.resize: unknown policy {distill.nst.resize!r}. "
                       f"Valid policies: {', '.join(losses.RESIZE_POLICIES)}.")
    objective = cls(
        ce_weight=float(distill.ce_weight), kd_weight=float(distill.kd_weight),
        temperature=float(distill.temperature), nst_weight=float(distill.nst.weight),
        nst_layers=parse_pairs(distill.nst.layers, "config.distill.nst.layers"), nst_kernel=kernel,
        nst_params=params, nst_resize=distill.nst.resize, nst_unbiased=bool(distill.nst.unbiased),
        fitnet_weight=float(distill.fitnet.weight),
        fitnet_layer=_one_pair(distill.fitnet.layer, "config.distill.fitnet.layer"),
        at_weight=float(distill.at.weight), at_p=float(distill.at.p),
        at_layers=parse_pairs(distill.at.layers, "config.distill.at.layers"))
    for name in ("ce_weight", "kd_weight", "nst_weight", "fitnet_weight", "at_weight"):
      if getattr(objective, name) < 0:
        raise ValueError(f"Loss weight {name} must be >= 0, got {getattr(objective, name)}.")
    if objective.temperature <= 0:
      raise ValueError(f"config.distill.temperature must be > 0, got {objective.temperature}.")
    return objective

  @property
  def needs_teacher(self) -> bool:
    return any(w > 0 for w in (self.kd_weight, self.nst_weight, self.fitnet_weight, self.at_weight))

  @property
  def uses_fitnet(self) -> bool:
    return self.fitnet_weight > 0

  def check_taps(self, student_taps: Sequence[str], teacher_taps: Sequence[str] | None) -> None:
    """Raises ValueError if a configured layer is not a tap of its model, naming the valid taps."""
    if teacher_taps is None:
      if self.needs_teacher:
        raise ValueError("The objective has KD, NST, FitNet or AT terms (a weight > 0) but no "
                                     "teacher is "
                         "configured: set config.teacher.model, or set those weights to 0.")
      return
    pairs = ([("nst", p) for p in self.nst_layers] if self.nst_weight > 0 else []) + (
        [("at", p) for p in self.at_layers] if self.at_weight > 0 else []) + (
        [("fitnet", self.fitnet_layer)] if self.uses_fitnet else [])
    for term, (student_tap, teacher_tap) in pairs:
      for who, tap, valid in (("student", student_tap, student_taps), ("teacher", teacher_tap, teacher_taps)):
        if tap not in valid:
          raise ValueError(
              f"config.distill.{term}: {who} layer {tap!r} is not a tap of the {who} model. "
              f"Valid taps: {', '.join(sorted(valid))}.")

  def __call__(self, labels: Array, student_logits: Array, student_features: Mapping[str, Array],
               teacher_logits: Array | None = None, teacher_features: Mapping[str, Array] | None = None
               ) -> tuple[Array, dict[str, Array]]:
    """The weighted total and every unweighted component (`ce`, `kd`, `nst`, `nst/<s>-<t>`, ...)."""
    components = {}
    total = jnp.zeros((), jnp.float32)
    if self.ce_weight > 0:
      components["ce"] = losses.cross_entropy(student_logits, labels)
      total += self.ce_weight * components["ce"]
    if self.kd_weight > 0:
      components["kd"] = losses.kd(student_logits, teacher_logits, self.temperature)
      total += self.kd_weight * components["kd"]
    if self.nst_weight > 0:
      nst_sum = jnp.zeros((), jnp.float32)
      for s, t in self.nst_layers:
        value = losses.nst(student_features[s], teacher_features[t], kernel=self.nst_kernel,
                           resize=self.nst_resize, unbiased=self.nst_unbiased, **self.nst_params)
        components[f"nst/{s}-{t}"] = value
        nst_sum += value
      components["nst"] = nst_sum
      total += self.nst_weight * nst_sum
    if self.at_weight > 0:
      at_sum = sum(losses.attention(student_features[s], teacher_features[t], p=self.at_p)
                   for s, t in self.at_layers)
      components["at"] = at_sum
      total += self.at_weight * at_sum
    if self.uses_fitnet:
      components["fitnet"] = losses.fitnet(student_features[HINT], teacher_features[self.fitnet_layer[1]])
      total += self.fitnet_weight * components["fitnet"]
    components["total"] = total
    return total, components


class HintRegressor(nn.Module):
  """FitNet's regressor from a student map to the teacher map's shape: conv + BatchNorm + ReLU.

  As RepDistiller's `ConvReg`: a 3x3 convolution (stride 1, padding 1) when the spatial sizes agree, a
  3x3 stride-2 convolution when the student map is twice as large; other size ratios are an error.
  """

  teacher_shape: tuple[int, int, int]  # (H, W, C) of the teacher map
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    (hs, ws), (ht, wt, ct) = x.shape[1:3], self.teacher_shape
    if (hs, ws) == (ht, wt):
      strides = 1
    elif (hs, ws) == (2 * ht, 2 * wt):
      strides = 2
    else:
      raise ValueError(f"FitNet regressor: student map {hs}x{ws} cannot be regressed onto teacher map "
                       f"{ht}x{wt}; sizes must be equal or the student's twice the teacher's.")
    x = layers.Conv(ct, 3, strides, padding=1, use_bias=True, dtype=self.dtype)(x)
    x = layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name)(x, train)
    return nn.relu(x)


class HintStudent(nn.Module):
  """A student with FitNet's regressor on its tap `student_tap`; the regressor's output is the feature
  `HINT`. The student's own variables stay at the top of the tree (shared scope), next to `regressor`."""

  student: nn.Module
  teacher_shape: tuple[int, int, int]  # (H, W, C) of the teacher map the hint is regressed onto
  student_tap: str

  def setup(self):
    nn.share_scope(self, self.student)
    self.regressor = HintRegressor(teacher_shape=tuple(self.teacher_shape), dtype=self.student.dtype,
                                   axis_name=self.student.axis_name)

  def __call__(self, x, train: bool):
    logits, features = self.student(x, train)
    return logits, {**features, HINT: self.regressor(features[self.student_tap], train)}


def student_module(student: nn.Module, objective: Objective, teacher_shapes=None) -> nn.Module:
  """The module a run trains: `student` itself, or with FitNet a `HintStudent` onto the teacher map's
  shape (`teacher_shapes` maps the teacher's taps to their (H, W, C))."""
  if not objective.uses_fitnet:
    return student
  student_tap, teacher_tap = objective.fitnet_layer
  return HintStudent(student=student, teacher_shape=tuple(teacher_shapes[teacher_tap]),
                     student_tap=student_tap)

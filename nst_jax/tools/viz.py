"""Pictures of what NST transfers: a trained student against its teacher, at the layers NST compares.

    python -m nst_jax.tools.viz selectivity --workdir W [--tap S:T] [--images 0,1,2] [--k 4] --out DIR
    python -m nst_jax.tools.viz tsne --workdir W [--compare W2] [--tap S:T] [--num_images 8] [--seed 0] \
      --out DIR
    python -m nst_jax.tools.viz mmd --workdir W_OR_SWEEP_ROOT [--kernels linear,polynomial,gaussian] \
      [--previous MMD_JSON] --out DIR
    python -m nst_jax.tools.viz curves --workdir W_OR_SWEEP_ROOT --out DIR
    (every command also takes [--teacher T] [--dpi 150])

write `DIR/<command>.png` and, beside it, `DIR/<command>.json` with the numbers drawn (`mmd` also writes
`DIR/mmd.md`, the table; `curves` writes the PNG only: its numbers are the runs' results.json).

* `selectivity`: per eval image (rows in pairs: teacher, then student), the image; the k channels of the
  tap with the highest mean activation over the map's positions (highest first, ties to the lower
  index), each channel's L2-normalised map (the row NST compares) upsampled bilinearly to the image and
  overlaid on it (each overlay's colours span its own range); and the mean over all channels of those
  normalised maps (the image's "mean map", whose squared difference between the networks, at the
  matched size, is the linear-kernel MMD^2). The JSON has the channels, their mean activations and the
  image's MMD^2 for each kernel.
* `tsne`: the L2-normalised channel maps of teacher and student at a tap pair (exactly NST's samples:
  `losses.match_spatial`, then `losses.channel_distributions`) for `num_images` eval images spread
  evenly over the split, embedded together in 2-D (PCA to at most 50 dimensions, then scikit-learn's
  t-SNE), coloured by network; more than `MAX_MAPS` maps of a network are subsampled to that many (at
  random, seeded; t-SNE's time grows faster than linearly). With `--compare W2` (e.g. W a `kd_nst` run,
  W2 a `ce` run) a second panel does the same for W2's student against W's teacher. Each panel's title
  has the mean over the images of the per-image MMD^2 (all maps) with W's NST kernel; the JSON has every
  image's value.
* `mmd`: MMD^2 between teacher and student (the NST loss value without its weight: the mean over images
  of the per-image MMD^2, V-statistic unless the run is unbiased, W's resize rule) at every tap pair of
  the config's `distill.nst.layers`, over the whole eval split, for each kernel; a bar chart per kernel.
  For a sweep root (`<root>/sweep.json`), per method: the mean over its finished seeds, the sample std
  (n - 1) as error bars and every seed as a dot. `--previous` takes the runs an earlier `mmd.json` of
  the sweep measured from it (a sweep exported without checkpoints, then extended); a run with neither
  a checkpoint nor previous numbers is left out (said on stderr, listed in the JSON's `left_out`).
* `curves`: `nst_jax.tools.curves`' figures: for a run its train losses and accuracies, for a sweep root every
  method's evaluation top-1 by epoch (mean and min-max band over seeds).

The tap: `--tap student_tap:teacher_tap`, any tap of the two models (they need not be configured NST
pairs; spatial sizes are matched by the run's `distill.nst.resize`); default the LAST pair of the
config's `distill.nst.layers` (the configs list them shallow to deep, so the deepest one).

The teacher: `--teacher T` (a finished run's workdir), else the run's `teacher.workdir` (a distillation
run), else, for a supervised run inside a sweep root (`<root>/<method>/seed<k>`), the sweep's
`<root>/teacher`. A supervised run elsewhere without `--teacher` is an error: these pictures compare a
student with a teacher. The student is the run's latest checkpoint; a run must have finished
(`config_lib.load_run`'s rules). A teacher with `teacher.batchnorm='batch'` runs as in training, with the
statistics of the images given.

Figure sizes (inches; pixels are inches x --dpi): selectivity (k + 2) x (2 x images) cells of
`CELL_INCHES`; tsne `TSNE_PANEL_INCHES` per panel; mmd `MMD_PANEL_INCHES` per kernel; curves as
`nst_jax.tools.curves` draws them. Bad input (an unknown tap, a workdir without a checkpoint, an image index
out of range, ...) is one line naming the problem and the valid choices, exit status 2.

Python: `load(workdir, teacher=None) -> Run`; `selectivity`, `tsne`, `mmd_per_layer` -> (Figure,
numbers) and `curves` -> Figure take a workdir (or a `Run`, so a notebook loads once; keyword-only
`teacher=` as --teacher, and `images=` for `tsne`); the numbers are JSON-serialisable. The core
functions (`top_channels`, `channel_maps`, `upsample`, `selectivity_maps`, `channel_samples`,
`embed`; the per-image MMD^2 is `losses.nst_per_image`) are pure functions of arrays.
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import re
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from nst_jax import kernels, losses, models
from nst_jax import objective as objective_lib
from nst_jax import taps as taps_lib
from nst_jax.tools import curves as curves_lib
from nst_jax.tools import sweep
from nst_jax.trainer import checkpoints, config_lib, rundir, train, train_loop
from nst_jax.trainer import data as data_lib
from nst_jax.trainer.data import device_pipeline

KERNELS = ("linear", "polynomial", "gaussian")
COMMANDS = ("selectivity", "tsne", "mmd", "curves")
CELL_INCHES = 1.5
TSNE_PANEL_INCHES = (5.0, 4.8)
MMD_PANEL_INCHES = (4.0, 3.6)
PCA_DIMENSIONS = 50
MAX_MAPS = 1000  # t-SNE points per network and panel: 2,000 points take ~13 s on one CPU core (measured).
COLORS = {"teacher": "tab:orange", "student": "tab:blue"}


class VizError(ValueError):
  """Input these pictures cannot be drawn from: one line naming the problem and the valid choices."""


# ----------------------------------------------------------------------------------------------------
# A run: student, teacher and eval data.


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A finished run's student (latest checkpoint) and its teacher, ready to compare.

  `student` is the module the checkpoint holds (with FitNet's regressor when the run used it);
  `student_taps` / `teacher_taps` map each zoo tap to its per-image shape; `taps` are the config's NST
  pairs; `evaluation` is the eval split with the run's own preprocessing (`data.build_eval`).
  """

  workdir: str
  config: ml_collections.ConfigDict
  objective: objective_lib.Objective
  student: nn.Module
  student_variables: dict
  teacher_workdir: str
  teacher_model: str
  teacher: nn.Module
  teacher_variables: dict
  student_taps: dict
  teacher_taps: dict
  taps: tuple[tuple[str, str], ...]
  evaluation: data_lib.Data

  @property
  def name(self) -> str:
    """The run's folder name; `<method>/seed<k>` for a run in a sweep."""
    return _run_name(self.workdir)

  @property
  def num_eval(self) -> int:
    return len(self.evaluation.eval.dataset)

  def tap(self, text: str | None = None) -> tuple[str, str]:
    """`"s:t"` as a checked (student tap, teacher tap); None: the last configured NST pair."""
    if text is None:
      if not self.taps:
        raise VizError(f"The run in {self.workdir!r} configures no NST layer pairs (distill.nst.layers); "
                       "give --tap student_tap:teacher_tap.")
      return self.taps[-1]
    pairs = objective_lib.parse_pairs(text, "--tap")
    if len(pairs) != 1:
      raise config_lib.ConfigError(f"--tap must be one student_tap:teacher_tap pair, got {text!r}.")
    for who, tap, valid, model in (("student", pairs[0][0], self.student_taps, self.config.student.model),
                                   ("teacher", pairs[0][1], self.teacher_taps, self.teacher_model)):
      if tap not in valid:
        raise config_lib.ConfigError(f"--tap: {tap!r} is not a tap of the {who} {model}. Valid {who} taps: "
                                     f"{', '.join(sorted(valid))}.")
    return pairs[0]

  def eval_images(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Eval images by index: `image` as the models see it, `pixels` (uint8, for display), `label`."""
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < self.num_eval]
    if bad or not indices:
      problem = f"Image index {bad[0]} is out of range" if bad else "No image index given"
      raise VizError(f"{problem}: the eval split ({self.config.data.eval_split!r}) has {self.num_eval} "
                     f"images, valid indices 0 to {self.num_eval - 1}.")
    pipe = self.evaluation.eval
    pixels = pipe.dataset.images[indices]
    image = device_pipeline.normalize(jnp.asarray(pixels), pipe.mean, pipe.std, jnp.float32)
    return {"image": np.asarray(image), "pixels": pixels, "label": pipe.dataset.labels[indices]}

  def features(self, images) -> tuple[dict, dict]:
    """(student features, teacher features) of normalised images, every tap."""
    forward = _forward(self.student, self.teacher, self.config.teacher.batchnorm)
    return forward(self.student_variables, self.teacher_variables, jnp.asarray(images))

  def kernel_params(self, kernel: str) -> dict:
    """The run's NST parameters for its own kernel; the paper's defaults for the others."""
    kernels.get_kernel(kernel)  # An unknown name: ValueError naming the valid kernels.
    if kernels.get_kernel(kernel) is kernels.get_kernel(self.objective.nst_kernel):
      return dict(self.objective.nst_params)
    return {"degree": 2, "c": 0.0} if kernels.get_kernel(kernel) is kernels.polynomial else {}


def canonical_kernel(kernel: str) -> str:
  """The name in `KERNELS` of a kernel name or alias ("poly" -> "polynomial")."""
  return next(k for k in KERNELS if kernels.get_kernel(k) is kernels.get_kernel(kernel))


@functools.lru_cache(maxsize=16)
def _forward(student: nn.Module, teacher: nn.Module, teacher_batchnorm: str):
  """One compiled forward of both models per (student, teacher, BatchNorm mode): equal modules compare
  equal, so the runs of a sweep share it."""
  pair = train.Models(student, teacher, teacher_batchnorm)

  def forward(student_variables, teacher_variables, images):
    _, student_features = student.apply(student_variables, images, train=False)
    _, teacher_features = train.teacher_outputs(pair, teacher_variables, images)  # As the train step.
    return student_features, teacher_features

  return jax.jit(forward)


def _run_config(workdir: str) -> ml_collections.ConfigDict:
  try:
    return config_lib.load_run(workdir)
  except FileNotFoundError as error:
    raise VizError(str(error)) from None


def _teacher_workdir(config, workdir: str, teacher: str | None) -> str:
  if teacher:
    return os.path.abspath(teacher)
  if config.teacher.model:
    return config.teacher.workdir
  root = pathlib.Path(workdir).parent.parent  # A sweep's <root>/<method>/seed<k>.
  if (root / sweep.SWEEP_FILE).is_file() and (root / sweep.TEACHER).is_dir():
    return str(root / sweep.TEACHER)
  raise VizError(f"The run in {workdir!r} is supervised (config.teacher.model is empty), and these pictures "
                 "compare a student with its teacher: give a distillation run's workdir, or a teacher's "
                 "workdir with --teacher T (teacher= in Python).")


def _restore(workdir: str, module: nn.Module, image_shape, who: str) -> dict:
  try:
    return checkpoints.load_variables(workdir, models.variables_template(module, image_shape))
  except FileNotFoundError:
    raise VizError(f"The {who} run in {workdir!r} has no checkpoint in "
                   f"{checkpoints.checkpoint_dir(workdir)}; viz reads its latest one.") from None


def load(workdir: "str | os.PathLike | Run", teacher: str | None = None) -> Run:
  """The finished run in `workdir` and its teacher (see the module docstring for which teacher); a `Run`
  is returned as it is."""
  if isinstance(workdir, Run):
    return workdir
  workdir = os.path.abspath(workdir)
  config = _run_config(workdir)
  teacher_workdir = _teacher_workdir(config, workdir, teacher)
  teacher_name = _run_config(teacher_workdir).student.model
  if config.teacher.model and config.teacher.model != teacher_name and not teacher:
    raise VizError(f"The run in {workdir!r} distils from a {config.teacher.model}, but its teacher.workdir "
                   f"{teacher_workdir!r} trained a {teacher_name}.")
  evaluation = data_lib.build_eval(config, None)
  if evaluation.pipeline != "device":
    raise VizError(f"viz picks eval images by index, which needs an in-memory dataset; {config.data.name!r} "
                   "is streamed (data.pipeline='tfds').")
  dtype, shape, classes = config_lib.DTYPES[config.dtype], evaluation.image_shape, evaluation.num_classes
  student = train_loop.build_student(config, classes, shape)
  teacher_module = _every_map_tapped(teacher_name, classes, dtype, shape)
  return Run(
      workdir=workdir, config=config, objective=config_lib.objective(config),
      student=student, student_variables=_restore(workdir, student, shape, "student"),
      teacher_workdir=teacher_workdir, teacher_model=teacher_name, teacher=teacher_module,
      teacher_variables=_restore(teacher_workdir, teacher_module, shape, "teacher"),
      student_taps=_maps(student, shape), teacher_taps=_maps(teacher_module, shape),
      taps=objective_lib.parse_pairs(config.distill.nst.layers, "config.distill.nst.layers"),
      evaluation=evaluation)


def _every_map_tapped(name: str, classes: int, dtype, image_shape) -> nn.Module:
  """A zoo model as it is (its own taps); a user's model with every module path that returns one map
  tapped, so that any of them can be drawn."""
  model = models.get_model(name, classes, dtype=dtype)
  if models.is_zoo(name):
    return model
  listing = taps_lib.list_taps(model, image_shape)
  paths = tuple(p for p, s in listing.items() if isinstance(s, tuple) and len(s) == 4
                and all(isinstance(d, int) for d in s))
  return models.get_model(name, classes, taps=paths, dtype=dtype)


def _maps(module: nn.Module, image_shape) -> dict:
  taps = models.tap_shapes(module, image_shape)
  return {k: tuple(v) for k, v in taps.items() if len(v) == 3}  # Maps only: `pooled` has no positions.


# ----------------------------------------------------------------------------------------------------
# The pure core.


_channel_distributions = jax.jit(losses.channel_distributions)
_resize = jax.jit(jax.image.resize, static_argnums=(1, 2))


def top_channels(feature_map: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k channels of one image's (H, W, C) map with the highest mean activation over the
  positions, highest first; ties go to the lower index."""
  mean = np.asarray(feature_map, np.float64).mean(axis=(0, 1))
  return np.argsort(-mean, kind="stable")[:k]


def channel_maps(features: np.ndarray) -> np.ndarray:
  """(B, H, W, C) -> (B, C, H, W): each channel's map L2-normalised over its positions (NST's rows)."""
  b, h, w, c = features.shape
  return np.asarray(_channel_distributions(jnp.asarray(features))).reshape(b, c, h, w)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(..., h, w) -> (..., *size), bilinear with half-pixel centres (PyTorch's align_corners=False)."""
  maps = jnp.asarray(maps, jnp.float32)
  return np.asarray(_resize(maps, (*maps.shape[:-2], *size), "bilinear"))


def selectivity_maps(feature_map: np.ndarray, k: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
  """For one image's (H, W, C) map: `channels` (k,) from `top_channels`, their mean activations
  `activation`, their normalised maps upsampled to `size` `maps` (k, *size), and `mean` (*size), the
  mean over all C normalised maps, upsampled."""
  channels = top_channels(feature_map, k)
  normalised = channel_maps(np.asarray(feature_map)[None])[0]
  return {"channels": channels, "activation": np.asarray(feature_map, np.float64).mean(axis=(0, 1))[channels],
          "maps": upsample(normalised[channels], size), "mean": upsample(normalised.mean(0), size)}


def channel_samples(student_features, teacher_features, resize: str = "pool"
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The samples NST compares: (B, C_s, D) and (B, C_t, D) normalised rows at the matched size."""
  s, t = losses.match_spatial(jnp.asarray(student_features), jnp.asarray(teacher_features), resize)
  return np.asarray(losses.channel_distributions(s)), np.asarray(losses.channel_distributions(t))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _per_image_mmd2(student_features, teacher_features, kernel, resize, unbiased, params):
  # Compiled, as the two below: op by op, each new shape cost a second of small compiles (measured).
  return losses.nst_per_image(student_features, teacher_features, kernel=kernel, resize=resize,
                              unbiased=unbiased, **dict(params))


def embed(rows: np.ndarray, seed: int = 0) -> np.ndarray:
  """(N, D) -> (N, 2): PCA to at most `PCA_DIMENSIONS` dimensions (for speed), then t-SNE."""
  from sklearn.decomposition import PCA  # Deferred: scikit-learn takes a second or two to import.
  from sklearn.manifold import TSNE
  from threadpoolctl import threadpool_limits  # scikit-learn's own dependency.

  rows = np.asarray(rows, np.float64)
  n, d = rows.shape
  if n < 4:
    raise VizError(f"t-SNE needs at least 4 channel maps, got {n}; use more images.")
  dims = min(PCA_DIMENSIONS, n, d)
  reduced = PCA(n_components=dims, random_state=seed).fit_transform(rows) if dims < d else rows
  perplexity = min(30.0, (n - 1) / 3.0)  # t-SNE requires perplexity < n.
  # One thread: t-SNE's OpenMP threads spin-wait, which made it 10x slower on a 2-core machine with one
  # core busy (measured); one thread is also repeatable.
  with threadpool_limits(1):
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)


# ----------------------------------------------------------------------------------------------------
# Selectivity.


def _show(ax, pixels: np.ndarray, overlay: np.ndarray | None = None):
  gray = pixels.shape[-1] == 1
  ax.imshow(pixels[..., 0] if gray else pixels, cmap="gray" if gray else None, vmin=0, vmax=255)
  if overlay is not None:
    low, high = float(overlay.min()), float(overlay.max())
    ax.imshow(overlay, cmap="inferno", alpha=0.6, vmin=low, vmax=high if high > low else low + 1.0)
  ax.set_xticks([])
  ax.set_yticks([])


def selectivity(workdir, images: Sequence[int] = (0, 1, 2), tap: str | None = None, k: int = 4, *,
                teacher: str | None = None) -> tuple[Figure, dict]:
  """The `selectivity` picture and its numbers (see the module docstring)."""
  run = load(workdir, teacher)
  s_tap, t_tap = run.tap(tap)
  k = min(int(k), run.student_taps[s_tap][-1], run.teacher_taps[t_tap][-1])
  if k < 1:
    raise VizError(f"k must be >= 1, got {k}.")
  images = [int(i) for i in images]
  batch = run.eval_images(images)
  s_feat, t_feat = run.features(batch["image"])
  s_feat, t_feat = np.asarray(s_feat[s_tap]), np.asarray(t_feat[t_tap])
  size = batch["pixels"].shape[1:3]
  params = {name: run.kernel_params(name) for name in KERNELS}
  kernel = canonical_kernel(run.objective.nst_kernel)  # The run's own, in the captions.
  mmd = {name: np.asarray(_per_image_mmd2(s_feat, t_feat, name, run.objective.nst_resize,
                                          run.objective.nst_unbiased, tuple(sorted(params[name].items()))))
         for name in KERNELS}
  figure = Figure(figsize=(CELL_INCHES * (k + 2), CELL_INCHES * 2 * len(images)), layout="constrained")
  grid = figure.subplots(2 * len(images), k + 2, squeeze=False)
  numbers = {"workdir": run.workdir, "teacher_workdir": run.teacher_workdir, "tap": f"{s_tap}:{t_tap}",
             "k": k, "kernel_params": params, "images": []}
  for i, (index, label) in enumerate(zip(images, batch["label"], strict=True)):
    entry = {"index": int(index), "label": int(label), "class": run.evaluation.class_names[int(label)],
             "mmd2": {name: float(mmd[name][i]) for name in KERNELS}}
    for row, (who, feat, name) in enumerate((("teacher", t_feat, t_tap), ("student", s_feat, s_tap))):
      maps = selectivity_maps(feat[i], k, size)
      axes = grid[2 * i + row]
      _show(axes[0], batch["pixels"][i])
      axes[0].set_ylabel(f"{who}\n{name}", fontsize=8, color=COLORS[who])
      axes[0].set_title(f"#{index} ({entry['class']})" if row == 0 else "", fontsize=8)
      for j, channel in enumerate(maps["channels"]):
        _show(axes[1 + j], batch["pixels"][i], maps["maps"][j])
        axes[1 + j].set_title(f"ch {channel} ({maps['activation'][j]:.2g})", fontsize=7)
      _show(axes[-1], batch["pixels"][i], maps["mean"])
      caption = "mean map" if row == 0 else f"MMD² {kernel} {entry['mmd2'][kernel]:.3g}"
      axes[-1].set_title(caption, fontsize=7)
      entry[who] = {"channels": [int(c) for c in maps["channels"]],
                    "mean_activation": [float(a) for a in maps["activation"]]}
    numbers["images"].append(entry)
  figure.suptitle(f"{run.name}: top-{k} channels by mean activation, normalised maps overlaid", fontsize=9)
  return figure, numbers


# ----------------------------------------------------------------------------------------------------
# t-SNE.


def spread_indices(count: int, total: int) -> list[int]:
  """`count` indices spread evenly over 0 .. total - 1 (the first and the last included)."""
  count = min(int(count), total)
  return sorted({int(round(x)) for x in np.linspace(0, total - 1, count)})


def subsample(n: int, limit: int, seed: int) -> np.ndarray:
  """Sorted indices of at most `limit` of n items: all of them, or a seeded random subset."""
  if n <= limit:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def tsne(workdir, compare=None, tap: str | None = None, num_images: int = 8, seed: int = 0, *,
         images: Sequence[int] | None = None, teacher: str | None = None,
         max_maps: int = MAX_MAPS) -> tuple[Figure, dict]:
  """The `tsne` picture and its numbers; `images` overrides the evenly spread `num_images`."""
  run = load(workdir, teacher)
  s_tap, t_tap = run.tap(tap)
  runs = [run] + ([load(compare, teacher or run.teacher_workdir)] if compare is not None else [])
  for other in runs[1:]:
    other.tap(f"{s_tap}:{t_tap}")  # The same pair must exist in the other student.
  indices = [int(i) for i in images] if images is not None else spread_indices(num_images, run.num_eval)
  batch = run.eval_images(indices)
  kernel = canonical_kernel(run.objective.nst_kernel)
  params = run.kernel_params(kernel)
  _, t_feat = run.features(batch["image"])  # W's teacher in every panel.
  figure = Figure(figsize=(TSNE_PANEL_INCHES[0] * len(runs), TSNE_PANEL_INCHES[1]), layout="constrained")
  panels = figure.subplots(1, len(runs), squeeze=False)[0]
  numbers = {"tap": f"{s_tap}:{t_tap}", "images": [int(i) for i in indices], "kernel": kernel,
             "kernel_params": params, "seed": int(seed), "teacher_workdir": run.teacher_workdir, "panels": []}
  for ax, student_run in zip(panels, runs, strict=True):
    s_feat, _ = student_run.features(batch["image"])
    X, Y = channel_samples(s_feat[s_tap], t_feat[t_tap], run.objective.nst_resize)
    mmd = np.asarray(_per_image_mmd2(s_feat[s_tap], t_feat[t_tap], kernel, run.objective.nst_resize,
                                     run.objective.nst_unbiased, tuple(sorted(params.items()))))
    Y, X = Y.reshape(-1, Y.shape[-1]), X.reshape(-1, X.shape[-1])
    totals = {"teacher": len(Y), "student": len(X)}
    Y, X = Y[subsample(len(Y), max_maps, seed)], X[subsample(len(X), max_maps, seed + 1)]
    points = embed(np.concatenate([Y, X]), seed)
    n_teacher = len(Y)  # Teacher rows first, then the student's.
    for who, part in (("teacher", points[:n_teacher]), ("student", points[n_teacher:])):
      ax.scatter(part[:, 0], part[:, 1], s=9, alpha=0.6, color=COLORS[who], linewidths=0,
                 label=f"{who} {t_tap if who == 'teacher' else s_tap} ({len(part)} of {totals[who]} maps)")
    ax.set_title(f"{student_run.name}: mean per-image MMD² ({kernel}) {mmd.mean():.4g}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8, frameon=False)
    numbers["panels"].append({"workdir": student_run.workdir, "name": student_run.name,
                              "mmd2_per_image": [float(v) for v in mmd], "mmd2_mean": float(mmd.mean()),
                              "maps": {"teacher": int(n_teacher), "student": int(len(points) - n_teacher)},
                              "maps_total": totals})
  figure.suptitle(f"t-SNE of the normalised channel maps, {len(indices)} eval images", fontsize=10)
  return figure, numbers


# ----------------------------------------------------------------------------------------------------
# MMD^2 per layer over the eval split.


@functools.lru_cache(maxsize=16)
def _mmd_sums(student, teacher, teacher_batchnorm: str, pairs, settings, resize: str, unbiased: bool):
  """A compiled batch -> {"<kernel> <s>:<t>": sum of per-image MMD^2 over the real images, "count"}."""
  forward = _forward(student, teacher, teacher_batchnorm)

  def sums(student_variables, teacher_variables, batch):
    student_features, teacher_features = forward(student_variables, teacher_variables, batch["image"])
    real = batch["mask"] > 0
    out = {"count": jnp.sum(real.astype(jnp.float32))}
    for s, t in pairs:
      for kernel, params in settings:
        values = _per_image_mmd2(student_features[s], teacher_features[t], kernel, resize, unbiased, params)
        out[f"{kernel} {s}:{t}"] = jnp.sum(jnp.where(real, values, 0.0))  # Padding may be anything.
    return out

  return jax.jit(sums)


def eval_mmd2(run: Run, kernel_names: Sequence[str] = KERNELS, taps=None) -> tuple[dict, int]:
  """({kernel: {"s:t": mean over the eval split of the per-image MMD^2}}, image count)."""
  pairs = tuple(run.tap(f"{s}:{t}") for s, t in (run.taps if taps is None else taps))
  settings = tuple((name, tuple(sorted(run.kernel_params(name).items()))) for name in kernel_names)
  fn = _mmd_sums(run.student, run.teacher, run.config.teacher.batchnorm, pairs, settings,
                 run.objective.nst_resize, run.objective.nst_unbiased)
  totals = {}
  for batch in run.evaluation.eval.eval_batches():
    for key, value in fn(run.student_variables, run.teacher_variables, batch).items():
      totals[key] = totals.get(key, 0.0) + float(value)  # Host float64 sums: exact enough over any split.
  count = int(totals["count"])
  values = {name: {f"{s}:{t}": totals[f"{name} {s}:{t}"] / count for s, t in pairs} for name in kernel_names}
  return values, count


def _method_workdirs(path: str) -> tuple[dict[str, list[str]], str | None]:
  """({method: [finished workdirs]}, the sweep's teacher) for a sweep root; ({name: [path]}, None) else."""
  if not os.path.isfile(os.path.join(path, sweep.SWEEP_FILE)):
    return {"": [path]}, None
  spec = sweep.read_spec(path)
  found = sweep.collect(spec)
  groups = {m: [sweep.run_dir(path, m, k) for k in sorted(found[m])] for m in spec["methods"] if found[m]}
  if not groups:
    raise VizError(f"The sweep root {path!r} has no finished run yet (methods {', '.join(spec['methods'])}).")
  return groups, sweep.teacher_dir(spec)


def _run_name(workdir: str) -> str:
  """A run's name in the numbers: its folder name; `<method>/seed<k>` for a run in a sweep."""
  path = pathlib.Path(workdir)
  return f"{path.parent.name}/{path.name}" if re.fullmatch(r"seed\d+", path.name) else path.name


def mmd_per_layer(workdir_or_sweep_root, kernels: Sequence[str] = KERNELS, *,
                  teacher: str | None = None, previous: dict | None = None) -> tuple[Figure, dict]:
  """The `mmd` bar chart and its numbers (see the module docstring); `mmd_table(numbers)` is the table.
  `kernels` (the API's name; it shadows the module here) are names from `KERNELS`.

  `previous`: the numbers of an earlier `mmd` of the same sweep (its `mmd.json`). A run it has measured
  is taken from it rather than measured again, so a sweep exported without checkpoints keeps its numbers
  when more runs are added; its kernels, tap pairs, kernel settings and split must be this measurement's.
  A sweep's run with neither a checkpoint nor previous numbers is left out, said on stderr and in
  `numbers["left_out"]`; the table's n counts the runs measured.
  """
  kernel_names = tuple(kernels)
  unknown = [k for k in kernel_names if k not in KERNELS]
  if unknown or not kernel_names:
    raise VizError(f"Unknown kernel(s) {unknown or '(none)'}. Valid kernels: {', '.join(KERNELS)}.")
  if isinstance(workdir_or_sweep_root, Run):
    groups, sweep_teacher = {"": [workdir_or_sweep_root]}, None
  else:
    groups, sweep_teacher = _method_workdirs(os.path.abspath(workdir_or_sweep_root))
  known = {name: values for entry in (previous or {}).get("methods", {}).values()
           for name, values in entry["runs"].items()}
  if previous and not set(kernel_names) <= set(previous["kernels"]):
    raise VizError(f"The previous numbers have kernels {previous['kernels']}, not all of "
                   f"{list(kernel_names)}: measure again without them.")
  numbers, pairs = {"kernels": list(kernel_names), "methods": {}, "left_out": {}}, None
  for method, workdirs in groups.items():
    per_run = {}
    for workdir in workdirs:
      name = workdir.name if isinstance(workdir, Run) else _run_name(workdir)
      if name in known:
        per_run[name] = {k: known[name][k] for k in kernel_names}
        continue
      if method and not _has_checkpoint(workdir):  # A sweep's run exported without its checkpoints.
        numbers["left_out"][name] = "no checkpoint and not in the previous numbers"
        print(f"viz mmd: {name} left out: it has no checkpoint (an exported run?) and no previous numbers",
              file=sys.stderr)
        continue
      run = load(workdir, teacher or sweep_teacher)
      if pairs is None:  # The first run's pairs, for every run.
        pairs = run.taps
        numbers.update(taps=[f"{s}:{t}" for s, t in pairs], split=run.config.data.eval_split,
                       teacher_workdir=run.teacher_workdir,
                       kernel_params={k: run.kernel_params(k) for k in kernel_names})
      per_run[name], numbers["images"] = eval_mmd2(run, kernel_names, pairs)
    if per_run:
      numbers["methods"][method or name] = per_run
  if not numbers["methods"]:
    raise VizError(f"No run of the sweep root {workdir_or_sweep_root!r} has a checkpoint or previous numbers "
                   f"(left out: {', '.join(numbers['left_out'])}); viz reads each run's latest checkpoint.")
  if previous:
    _check_same_measurement(numbers, previous, kernel_names)
  for method, per_run in numbers["methods"].items():
    stats = {k: {tap: sweep.mean_std([r[k][tap] for r in per_run.values()]) for tap in numbers["taps"]}
             for k in kernel_names}
    numbers["methods"][method] = {
        "runs": per_run, "mean": {n: {t: v[0] for t, v in s.items()} for n, s in stats.items()},
        "std": {n: {t: v[1] for t, v in s.items()} for n, s in stats.items()}}
  return _mmd_figure(numbers), numbers


def _has_checkpoint(workdir: str) -> bool:
  directory = pathlib.Path(checkpoints.checkpoint_dir(workdir))
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _check_same_measurement(numbers: dict, previous: dict, kernel_names: Sequence[str]) -> None:
  """Fills in what only `previous` measured; raises VizError where it measured something else."""
  if "taps" not in numbers:  # Every run came from `previous`.
    numbers.update({key: previous[key] for key in ("taps", "split", "teacher_workdir", "images")},
                   kernel_params={k: previous["kernel_params"][k] for k in kernel_names})
    return
  for key in ("taps", "split", "images"):
    if numbers[key] != previous[key]:
      raise VizError(f"The previous numbers were measured with {key} {previous[key]!r}, these with "
                     f"{numbers[key]!r}: measure every run again (without the previous numbers).")
  for k in kernel_names:
    if numbers["kernel_params"][k] != previous["kernel_params"][k]:
      raise VizError(f"The previous numbers used the {k} kernel with {previous['kernel_params'][k]}, these "
                     f"with {numbers['kernel_params'][k]}: measure every run again.")


def _mmd_figure(numbers: dict) -> Figure:
  kernel_names, taps, methods = numbers["kernels"], numbers["taps"], numbers["methods"]
  figure = Figure(figsize=(MMD_PANEL_INCHES[0] * len(kernel_names), MMD_PANEL_INCHES[1]),
                  layout="constrained")
  axes = figure.subplots(1, len(kernel_names), squeeze=False)[0]
  width = 0.8 / len(methods)
  for ax, name in zip(axes, kernel_names, strict=True):
    for i, (method, entry) in enumerate(methods.items()):
      x = np.arange(len(taps)) + (i - (len(methods) - 1) / 2) * width
      mean = [entry["mean"][name][t] for t in taps]
      std = [entry["std"][name][t] or 0.0 for t in taps]
      ax.bar(x, mean, width * 0.9, yerr=std if len(entry["runs"]) > 1 else None, capsize=2,
             label=f"{method} (n = {len(entry['runs'])})")
      for j, tap in enumerate(taps):  # Every run as a dot on its bar.
        values = [r[name][tap] for r in entry["runs"].values()]
        ax.scatter(np.full(len(values), x[j]), values, s=8, color="black", zorder=3)
    ax.set_xticks(np.arange(len(taps)), taps, fontsize=8)
    ax.set_title(f"{name} kernel", fontsize=10)
    ax.set_ylabel("MMD² (teacher vs student)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3, linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
  axes[0].legend(loc="best", fontsize=8, frameon=False)
  figure.suptitle(f"MMD² per layer pair, mean over the {numbers['images']} {numbers['split']} images",
                  fontsize=10)
  return figure


def mmd_table(numbers: dict) -> str:
  """`mmd_per_layer`'s numbers as a Markdown table: one row per method and kernel, mean ± std per pair."""
  taps = numbers["taps"]
  lines = [f"MMD² between teacher and student, mean over the {numbers['images']} {numbers['split']} images "
           "(mean ± sample std over runs).", "", f"| method | n | kernel | {' | '.join(taps)} |",
           "| --- | --- | --- |" + " --- |" * len(taps)]
  for method, entry in numbers["methods"].items():
    for name in numbers["kernels"]:
      std = entry["std"][name]
      cells = [f"{entry['mean'][name][t]:.5g}" + ("" if std[t] is None else f" ± {std[t]:.2g}") for t in taps]
      lines.append(f"| {method} | {len(entry['runs'])} | {name} | {' | '.join(cells)} |")
  if numbers.get("left_out"):
    lines += ["", f"Left out (no checkpoint, no previous numbers): {', '.join(numbers['left_out'])}."]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Curves.


def curves(workdir_or_sweep_root) -> Figure:
  """`nst_jax.tools.curves`' figure of a finished run, or of every method of a sweep root."""
  path = os.path.abspath(getattr(workdir_or_sweep_root, "workdir", workdir_or_sweep_root))  # Or a Run.
  if os.path.isfile(os.path.join(path, sweep.SWEEP_FILE)):
    spec = sweep.read_spec(path)
    found = sweep.collect(spec)
    if not any(found.values()):
      raise VizError(f"The sweep root {path!r} has no finished run yet (methods "
                     f"{', '.join(spec['methods'])}).")
    histories = {m: [r["epochs"] for r in found[m].values() if r.get("epochs")] for m in spec["methods"]}
    teacher_top1 = next((float(r["teacher"]["top1"]) for runs in found.values() for r in runs.values()
                         if isinstance(r.get("teacher"), dict)), None)
    name = pathlib.Path(spec["config"]).stem
    return curves_lib.sweep_figure(histories, teacher_top1, f"{name}: evaluation top-1 by epoch")
  results = rundir.read_results(path)
  if results is None:
    raise VizError(f"{path!r} is neither a finished run (a results.json marked finished) nor a sweep root "
                   f"(a {sweep.SWEEP_FILE}).")
  return curves_lib.run_figure(results, os.path.basename(path))


# ----------------------------------------------------------------------------------------------------
# Command line.

# The options each command takes besides --workdir, --teacher, --out and --dpi.
_OPTIONS = {"selectivity": {"tap", "images", "k"}, "tsne": {"compare", "tap", "images", "num_images", "seed"},
            "mmd": {"kernels", "previous"}, "curves": set()}


def _parser() -> argparse.ArgumentParser:
  usage = "\n\n".join(__doc__.split("\n\n")[:3])  # The title, the commands and what they write.
  parser = argparse.ArgumentParser(prog="python -m nst_jax.tools.viz", description=usage,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=COMMANDS)
  parser.add_argument("--workdir", required=True,
                      help="a finished run (or, for mmd and curves, a sweep root)")
  parser.add_argument("--out", required=True, help="the folder the PNG and JSON go to")
  parser.add_argument("--teacher", help="the teacher's workdir (default: the run's own teacher)")
  parser.add_argument("--dpi", type=int, default=150, help="pixels per inch of the PNG (default 150)")
  parser.add_argument("--compare", help="tsne: a second student's workdir, drawn beside the first")
  parser.add_argument("--tap", help="student_tap:teacher_tap (default: the last of distill.nst.layers)")
  parser.add_argument("--images", help="comma-separated eval image indices (selectivity default: 0,1,2)")
  parser.add_argument("--k", type=int, help="selectivity: channels per network (default 4)")
  parser.add_argument("--num_images", type=int, help="tsne: images spread over the split (default 8)")
  parser.add_argument("--seed", type=int, help="tsne: PCA and t-SNE seed (default 0)")
  parser.add_argument("--kernels", help=f"mmd: comma-separated kernels (default {','.join(KERNELS)})")
  parser.add_argument("--previous", metavar="MMD_JSON",
                      help="mmd: an earlier mmd.json of the same sweep; its runs are not measured again")
  return parser


def _indices(text: str) -> list[int]:
  try:
    return [int(i) for i in text.split(",") if i.strip()]
  except ValueError:
    raise VizError(f"--images must be comma-separated integer indices, e.g. 0,1,2; got {text!r}.") from None


def _draw(args) -> tuple[Figure, dict | None, str | None]:
  """(figure, numbers, Markdown table) of one command."""
  given = {k: v for k, v in vars(args).items() if k in set().union(*_OPTIONS.values()) and v is not None}
  extra = sorted(set(given) - _OPTIONS[args.command])
  if extra:
    raise VizError(f"--{extra[0]} does not apply to {args.command}; its options: "
                   f"{', '.join('--' + o for o in sorted(_OPTIONS[args.command])) or 'none'}.")
  images = _indices(args.images) if args.images is not None else None
  if args.command == "selectivity":
    figure, numbers = selectivity(args.workdir, images if images is not None else (0, 1, 2), args.tap,
                                  4 if args.k is None else args.k, teacher=args.teacher)
  elif args.command == "tsne":
    num_images = 8 if args.num_images is None else args.num_images
    figure, numbers = tsne(args.workdir, args.compare, args.tap, num_images, args.seed or 0, images=images,
                           teacher=args.teacher)
  elif args.command == "mmd":
    names = [k.strip() for k in args.kernels.split(",")] if args.kernels else KERNELS
    previous = None
    if args.previous:
      try:
        previous = json.loads(pathlib.Path(args.previous).read_text())
      except (OSError, ValueError) as error:
        raise VizError(f"--previous {args.previous!r} cannot be read as an mmd.json ({error}).") from None
    figure, numbers = mmd_per_layer(args.workdir, names, teacher=args.teacher, previous=previous)
    return figure, numbers, mmd_table(numbers)
  else:
    if args.teacher:
      raise VizError("--teacher does not apply to curves: they are read from results.json.")
    return curves(args.workdir), None, None
  return figure, numbers, None


def main(argv: list[str] | None = None) -> list[str]:
  """The command line (see the module docstring); returns the paths written. Bad input: SystemExit(2)."""
  args = _parser().parse_args(argv)
  try:
    figure, numbers, table = _draw(args)
  except (ValueError, FileNotFoundError) as error:  # ConfigError and VizError are ValueErrors.
    print(f"nst_jax.tools.viz: {error}", file=sys.stderr)
    sys.exit(2)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, args.command)
  curves_lib.save(figure, f"{stem}.png", dpi=args.dpi)
  written = [f"{stem}.png"]
  if numbers is not None:
    rundir.write_json(f"{stem}.json", numbers)
    written.append(f"{stem}.json")
  if table is not None:
    with open(f"{stem}.md", "w") as f:
      f.write(table)
    written.append(f"{stem}.md")
  print("\n".join(written), flush=True)
  return written


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()

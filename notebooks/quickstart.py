# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # nst_jax quick start: Neuron Selectivity Transfer in JAX
#
# Neuron Selectivity Transfer (NST; Huang and Wang, arXiv 1707.01219) trains a small student so that the
# *distribution* of its channel activation maps matches a teacher's, measured by the squared Maximum Mean
# Discrepancy (MMD²). This notebook goes from the kernels to a real distillation run:
#
# 1. the MMD² of each kernel on toy sample sets;
# 2. the NST loss on two small feature maps, and its gradient;
# 3. a short distillation on scikit-learn's digits (offline, no download): the teacher, then a plain
#    cross-entropy student (`ce`) and a KD + NST student (`kd_nst`); the result table, the curves, the
#    MMD² per layer, the selectivity maps and a t-SNE of the channel maps.
#
# It is sized for a CPU: top to bottom it took 6 min on the 2-core development machine while other work
# shared it (2026-12-02); a free Colab CPU runtime has 2 cores too. For CIFAR-10 on a Colab GPU change one
# line of the settings cell below (`DATA`). To open it in Colab, put your repository's address in
# `https://colab.research.google.com/github/OWNER/nst_jax/blob/main/notebooks/quickstart.ipynb`.

# %% [markdown]
# **Install.** Nothing happens here when `nst_jax` is already importable (a local checkout set up as the
# README says). Otherwise (Colab) the cell clones the repository and installs it: the experiment configs
# live in the repository's `configs/` folder, not in the package, so an editable install of a clone is what
# makes `nst_jax.trainer.config_lib.REPO_ROOT` point at them.

# %%
REPO = "https://github.com/OWNER/nst_jax"  # EDIT: the address of the nst_jax repository you use.

import importlib.util
import pathlib
import subprocess
import sys

if importlib.util.find_spec("nst_jax") is None:
  checkout = pathlib.Path("nst_jax_repo").resolve()
  if not checkout.exists():
    subprocess.run(["git", "clone", "--depth", "1", REPO, str(checkout)], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{checkout}[notebook]"], check=True)
  sys.path.insert(0, str(checkout))  # This kernel started before the install; new processes see it anyway.

import nst_jax
from nst_jax.trainer import config_lib

ROOT = config_lib.REPO_ROOT
assert (ROOT / "configs").is_dir(), f"{ROOT} has no configs/ folder: install nst_jax from a clone (above)."
print(f"nst_jax from {nst_jax.__file__}; configs in {ROOT / 'configs'}")

# %% [markdown]
# **Settings: the one cell to change.** `DATA` picks the data and the models:
#
# * `"digits"`: scikit-learn's 1,797 digits at 32x32 px (they ship with scikit-learn), resnet20 teaching
#   resnet8, 10 epochs; a few minutes on a CPU.
# * `"cifar10_folder"`: CIFAR-10 as a class-folder tree `<path>/<class>/<image>.png` (set `data.path`
#   below); 20,000 training and 5,000 held-out images, same models. Wants a GPU
#   (Runtime > Change runtime type).
# * `"cifar10_tfds"`: CIFAR-10 from TensorFlow Datasets (downloaded once, about 160 MB; needs
#   `pip install tensorflow-datasets` where it is missing), evaluated on its test split. Wants a GPU.
#
# `NST_JAX_NOTEBOOK_SMALL=1` in the environment shrinks everything to one epoch and one seed (the CI test
# of this notebook sets it); `NST_JAX_NOTEBOOK_WORKDIR` says where the runs go.

# %%
import os

DATA = "digits"  # "digits", "cifar10_folder" or "cifar10_tfds"

RECIPES = {
    "digits": {"config": "configs/digits_kd_nst.py", "epochs": 10, "decay_epochs": (6, 8),
               "overrides": {}},
    "cifar10_folder": {"config": "configs/cifar10_folder.py", "epochs": 10, "decay_epochs": (6, 8),
                       "overrides": {"data.path": "cifar10/train"}},  # EDIT: your image folder.
    "cifar10_tfds": {"config": "configs/cifar10_folder.py", "epochs": 10, "decay_epochs": (6, 8),
                     "overrides": {"data.name": "cifar10", "data.path": "", "data.eval_split": "test"}},
}
SEEDS = "0"  # "0,1,2": mean ± std over three seeds, each seed one more run of every method.
METHODS = "ce,kd_nst"

SMALL = os.environ.get("NST_JAX_NOTEBOOK_SMALL") == "1"
recipe = RECIPES[DATA]
EPOCHS, DECAY_EPOCHS = (1, (1,)) if SMALL else (recipe["epochs"], recipe["decay_epochs"])
if SMALL:
  SEEDS = "0"
# Every run of the notebook: the recipe's data, the epochs, no TensorBoard files (the figures below
# come from results.json).
OVERRIDES = {**recipe["overrides"], "schedule.epochs": EPOCHS, "schedule.decay_epochs": DECAY_EPOCHS,
             "logging.tensorboard": False}
SWEEP_ROOT = pathlib.Path(os.environ.get("NST_JAX_NOTEBOOK_WORKDIR", "workdirs/notebook")).resolve() / (
    f"{DATA}_small" if SMALL else DATA)
print(f"{DATA}: {recipe['config']}, {EPOCHS} epoch(s), seeds {SEEDS}; runs in {SWEEP_ROOT}")

# %% [markdown]
# ## 1. The kernels: MMD² on toy sets
#
# `nst_jax.kernels.mmd2(X, Y, kernel)` is the (biased) squared MMD between the rows of X (n, D) and Y
# (m, D). With a positive-definite kernel it is >= 0 and exactly 0 when the two sets are equal, and it
# grows as Y moves away from X. Here Y is X shifted by `s` in every coordinate; for the linear kernel MMD²
# is the squared distance between the means, D s², which the first row shows.

# %%
import jax
import jax.numpy as jnp
from IPython.display import Markdown, display

from nst_jax import kernels, losses

X = jax.random.normal(jax.random.key(0), (40, 8))
fresh = jax.random.normal(jax.random.key(1), (40, 8))  # Same distribution, other samples.
KERNEL_PARAMS = {"linear": {}, "polynomial": {"degree": 2, "c": 0.0}, "gaussian": {}}
SHIFTS = (0.25, 0.5, 1.0)

rows = ["| kernel | MMD²(X, X) | MMD²(X, fresh) | " + " | ".join(f"shift {s}" for s in SHIFTS) + " |",
        "| --- | --- | --- |" + " --- |" * len(SHIFTS)]
identity = {}
for name, params in KERNEL_PARAMS.items():
  identity[name] = float(kernels.mmd2(X, X, name, **params))
  values = [identity[name], float(kernels.mmd2(X, fresh, name, **params))]
  values += [float(kernels.mmd2(X, X + s, name, **params)) for s in SHIFTS]
  rows.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
display(Markdown("\n".join(rows)))
print("MMD^2 at identity:", ", ".join(f"{k} {v:.1e}" for k, v in identity.items()))
assert all(abs(v) < 1e-5 for v in identity.values())

# %% [markdown]
# ## 2. The NST loss and its gradient
#
# `nst_jax.losses.nst(student, teacher)` takes two NHWC feature maps. Each channel's H x W map, L2-normalised,
# is one sample; the loss is the batch mean of the per-image MMD² between the student's and the teacher's
# channel sets. Channel counts may differ; here the spatial sizes differ too, and the larger map is
# average-pooled to the smaller (`resize="pool"`). The teacher is under `stop_gradient`: only the student
# gets a gradient. A central difference along a random direction checks it.

# %%
student_feat = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 8, 8, 16)))  # (B, H, W, C_s)
teacher_feat = jax.nn.relu(jax.random.normal(jax.random.key(3), (2, 4, 4, 32)))  # (B, H', W', C_t)

nst = lambda s: losses.nst(s, teacher_feat, kernel="polynomial")
loss, grad = jax.value_and_grad(nst)(student_feat)
direction = jax.random.normal(jax.random.key(4), student_feat.shape)
eps = 1e-2
numeric = (nst(student_feat + eps * direction) - nst(student_feat - eps * direction)) / (2 * eps)
print(f"NST loss {float(loss):.6g}; gradient {grad.shape}, norm {float(jnp.linalg.norm(grad)):.4g}")
print(f"directional derivative: autodiff {float(jnp.vdot(grad, direction)):.6g}, "
      f"central difference {float(numeric):.6g}")
for name in KERNEL_PARAMS:
  print(f"{name:>10}: NST {float(losses.nst(student_feat, teacher_feat, kernel=name)):.6g}, "
        f"student against itself {float(losses.nst(student_feat, student_feat, kernel=name)):.1e}")

# %% [markdown]
# **Feature taps of any Flax model.** NST compares intermediate maps, and `nst_jax.taps` reads them from any
# `flax.linen` module by module path, without changing it: `taps.list_taps` lists every tappable path with
# its output shape, and `taps.Tapped(model, taps=(...))` returns `(logits, {path: map})`. Your own models
# (see `docs/own-models.md`) are tapped the same way; here, a zoo model's own tap names come first, then
# its module paths. `python -m nst_jax.tools.taps resnet8` prints the same list.

# %%
from nst_jax import models, taps

listing = taps.list_taps(models.get_model("resnet8", num_classes=10), (32, 32, 3))
print(f"{len(listing)} taps; the first 12:")
print(taps.format_taps(dict(list(listing.items())[:12])))

# %% [markdown]
# ## 3. Distillation
#
# **The teacher** first, in `<SWEEP_ROOT>/teacher`, with `nst_jax.trainer.train_loop.train_and_evaluate`, the
# function behind the command line (`nst-jax-train --config ... --workdir ...`). Its config is the one the
# student's config names (`teacher.config`), with this notebook's epochs. Its log calls it the "student
# stage": in its own run the teacher is the network being trained. A run that has finished is not trained
# again, so rerunning the cell is cheap.

# %%
from nst_jax.tools import sweep
from nst_jax.trainer import rundir, train_loop

config_path = str(ROOT / recipe["config"])
student_config = config_lib.load_config_file(f"{config_path}:kd_nst")  # It names the teacher's config.
teacher_workdir = str(SWEEP_ROOT / "teacher")
if not rundir.is_finished(teacher_workdir):
  teacher_config = config_lib.load_config_file(str(ROOT / student_config.teacher.config))
  teacher_config = config_lib.apply_overrides(teacher_config, OVERRIDES)
  train_loop.train_and_evaluate(teacher_config, teacher_workdir)

# %% [markdown]
# **The students.** `nst_jax.tools.sweep` runs every (method, seed) as its own run, in
# `<SWEEP_ROOT>/<method>/seed<k>`, reading the teacher from `<SWEEP_ROOT>/teacher`, and writes the table of
# mean ± std over seeds (`results.md`, `results.csv`) and the curves (`curves.png`). On the command line it
# is `python -m nst_jax.tools.sweep --config ... --methods ce,kd_nst --seeds 0,1,2 --root ...`. The runs are
# processes of their own, so the cell shows the sweep's progress and each run's log is its `log.txt`.
# Finished runs are skipped, so an interrupted cell carries on where it stopped.

# %%
def flag(key, value):
  return f"--config.{key}={value}"


status = sweep.sweep(config_path, METHODS, SEEDS, str(SWEEP_ROOT), jobs=1,
                     overrides=[flag(k, v) for k, v in OVERRIDES.items()])
assert status == 0, f"the sweep failed (exit status {status}); its message is above."

# %% [markdown]
# **The result table**: top-1 / top-5 accuracy (%) on the evaluation split (digits: the 359 held-out images),
# "last" at the final epoch, "best" the best epoch's (optimistic: chosen on the same split). One epoch (the
# small setting) is far from converged; and one seed cannot tell a point of accuracy from seed-to-seed
# noise: set `SEEDS = "0,1,2"` for mean ± std (as the sweep example of docs/sweeps.md compares `ce` and
# `kd_nst`).

# %%
display(Markdown((SWEEP_ROOT / "results.md").read_text()))

# %% [markdown]
# **The curves**: evaluation top-1 by epoch, the mean over seeds with the min-max band, the teacher dashed.
# `nst_jax.tools.viz` draws on matplotlib `Figure` objects without pyplot; `%matplotlib inline` makes
# `display` show them as images.

# %%
# %matplotlib inline
from nst_jax.tools import viz

display(viz.curves(str(SWEEP_ROOT)))

# %% [markdown]
# **MMD² per layer**: what NST minimises, measured after training. For every student, the MMD² between its
# channel maps and the teacher's at each NST layer pair, averaged over the evaluation images, with each
# kernel. The `ce` student never saw the teacher, so it shows how far apart independently trained networks
# are; the `kd_nst` student was trained to close that gap with the polynomial kernel.

# %%
fig, mmd = viz.mmd_per_layer(str(SWEEP_ROOT))
display(fig)
display(Markdown(viz.mmd_table(mmd)))

# %% [markdown]
# **Selectivity maps**: for three evaluation images, the teacher's and the `kd_nst` student's k most active
# channels at the deepest NST pair (`stage3`), each one's L2-normalised map overlaid on the image, and
# the mean of all the channel maps. NST matches the *distribution* of these maps, not channel j to
# channel j, so the channels differ but the places they fire in should look alike.

# %%
kd_nst_run = viz.load(SWEEP_ROOT / "kd_nst" / "seed0")  # Loaded once, for the two pictures below.
fig, maps = viz.selectivity(kd_nst_run, images=(0, 1, 2), k=4)
display(fig)

# %% [markdown]
# **t-SNE of the channel maps**: the samples NST compares (every L2-normalised channel map of teacher and
# student at `stage3`, for a few evaluation images), embedded together in 2-D. Left the `kd_nst` student,
# right the `ce` student, each against the same teacher; the titles give the mean per-image MMD².
# Overlapping clouds are what a small MMD² looks like.

# %%
fig, embedding = viz.tsne(kd_nst_run, compare=SWEEP_ROOT / "ce" / "seed0", num_images=4 if SMALL else 8)
display(fig)

# %% [markdown]
# ## Where next
#
# * More methods: `configs/digits_kd_nst.py` also has `kd` and `nst`; add them to `METHODS`.
# * CIFAR-10: set `DATA` in the settings cell, on a GPU runtime. The CIFAR-100 configs of the paper's and
#   RepDistiller's tables are in `configs/` (their docstrings give the command, the runtime and the
#   published number).
# * Only the kernels: `notebooks/kernels.ipynb` checks the fast exact MMD² forms against the definition and
#   times them on this backend.

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
# # nst_jax.kernels: the fast exact MMD² forms, checked and timed
#
# For readers who only want the kernels: `nst_jax.kernels.mmd2(X, Y, kernel, method=...)` computes the
# squared Maximum Mean Discrepancy between the rows of X (n, D) and Y (m, D) with the linear, polynomial or
# Gaussian kernel. Public NST code builds the n x m x D tensor of every pair; `mmd2` uses exact identities
# that give the same number for far less work:
#
# * `mean` (linear kernel): MMD² = ||mean x - mean y||², O((n + m) D);
# * `spatial` (polynomial of degree 2): Σ (x·y)² = <XᵀX, YᵀY>_F, so MMD² = ||XᵀX/n - YᵀY/m||²_F with D x D
#   matrices, cheap when D is small (late layers: 8x8 positions, many channels);
# * `gram` (every built-in kernel): the dot-product matrices from matrix products, the kernel applied
#   elementwise;
# * `vmap`: the pairwise kernel vmapped over every pair, the library's own reference;
# * `auto` (the default) picks the cheapest that applies.
#
# This notebook checks every form against the definition written out here with `jnp` double sums, then
# times them on the current backend (CPU, GPU or TPU). `NST_JAX_NOTEBOOK_SMALL=1` shrinks the sizes.

# %%
REPO = "https://github.com/OWNER/nst_jax"  # EDIT: the address of the nst_jax repository you use.

import importlib.util
import subprocess
import sys

if importlib.util.find_spec("nst_jax") is None:  # The kernels need only the package, not the repository.
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO}"], check=True)

# %%
import os
import statistics
import time

import jax
import jax.numpy as jnp
from IPython.display import Markdown, display

from nst_jax import kernels

SMALL = os.environ.get("NST_JAX_NOTEBOOK_SMALL") == "1"
print(f"backend {jax.default_backend()}: {jax.devices()}")

# %% [markdown]
# ## The definition
#
# MMD² = 1/n² Σ_jj' k(x_j, x_j') + 1/m² Σ_ii' k(y_i, y_i') - 2/(nm) Σ_ji k(x_j, y_i) (biased, the
# V-statistic); the unbiased U-statistic leaves the j = j' and i = i' terms out of the first two sums. The
# Gaussian bandwidth, when not given, is the mean squared distance over all pairs of distinct rows of the
# pooled set [X; Y]. Written here from the formula alone, by broadcasting every pair, so that the check
# does not reuse any of the library's code.

# %%
def pairwise(kernel, a, b, degree=2, c=0.0, sigma2=None):
  """k(a_j, b_i) for every pair: (n, m), through the (n, m, D) tensor of pairs."""
  a, b = a[:, None, :], b[None, :, :]
  if kernel == "linear":
    return jnp.sum(a * b, axis=-1)
  if kernel == "polynomial":
    return (jnp.sum(a * b, axis=-1) + c) ** degree
  return jnp.exp(-jnp.sum((a - b) ** 2, axis=-1) / (2.0 * sigma2))


def mean_pair_distance(X, Y):
  Z = jnp.concatenate([X, Y])
  d = jnp.sum((Z[:, None, :] - Z[None, :, :]) ** 2, axis=-1)
  return jnp.sum(d) / (len(Z) * (len(Z) - 1))  # The diagonal is zero: the sum is over i != j.


def mmd2_definition(X, Y, kernel, unbiased=False, **params):
  if kernel == "gaussian" and params.get("sigma2") is None:
    params = {**params, "sigma2": mean_pair_distance(X, Y)}
  n, m = len(X), len(Y)
  kxx, kyy, kxy = (pairwise(kernel, a, b, **params) for a, b in ((X, X), (Y, Y), (X, Y)))
  if unbiased:
    xx = (jnp.sum(kxx) - jnp.sum(jnp.diag(kxx))) / (n * (n - 1))
    yy = (jnp.sum(kyy) - jnp.sum(jnp.diag(kyy))) / (m * (m - 1))
  else:
    xx, yy = jnp.sum(kxx) / n**2, jnp.sum(kyy) / m**2
  return xx + yy - 2.0 * jnp.sum(kxy) / (n * m)


# %% [markdown]
# ## Every form against the definition
#
# Two sets of L2-normalised rows, as NST feeds them (each row one channel's activation map): n = 24 and
# m = 32 channels of D = 64 positions, non-negative like post-ReLU maps. Each kernel with every method that
# applies to it (`applicable_methods`), biased and unbiased. With unit rows every kernel term is of order
# 1, so the absolute difference is also the error relative to the sums MMD² is the difference of.

# %%
def unit_rows(key, shape):
  x = jax.nn.relu(jax.random.normal(key, shape))
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


X = unit_rows(jax.random.key(0), (24, 64))
Y = unit_rows(jax.random.key(1), (32, 64))

CASES = [("linear", {}), ("polynomial", {"degree": 2, "c": 0.0}), ("polynomial", {"degree": 2, "c": 1.0}),
         ("polynomial", {"degree": 3, "c": 0.5}), ("gaussian", {}), ("gaussian", {"sigma2": 0.5})]

rows = ["| kernel | params | estimator | method | MMD² | definition | abs. difference |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
worst = 0.0
for kernel, params in CASES:
  for unbiased in (False, True):
    reference = float(mmd2_definition(X, Y, kernel, unbiased, **params))
    for method in kernels.applicable_methods(kernel, **params):
      value = float(kernels.mmd2(X, Y, kernel, unbiased=unbiased, method=method, **params))
      worst = max(worst, abs(value - reference))
      rows.append(f"| {kernel} | {params or ''} | {'unbiased' if unbiased else 'biased'} | {method} | "
                  f"{value:.7f} | {reference:.7f} | {abs(value - reference):.1e} |")
display(Markdown("\n".join(rows)))
print(f"largest difference from the definition: {worst:.1e}")
assert worst < 1e-5, worst

# %% [markdown]
# ## Which form `auto` picks
#
# `choose_method(kernel, n, m, dim)` for the polynomial kernel of degree 2 at the NST layers of two
# RepDistiller pairs (resnet32x4 -> resnet8x4 on CIFAR: channels x positions per stage) and the official
# ImageNet pair: the spatial form wins once the positions are fewer than about 1.5 x the channels.

# %%
LAYERS = {"CIFAR stage1 (64 ch, 32x32)": (64, 64, 32 * 32),
          "CIFAR stage2 (128 ch, 16x16)": (128, 128, 16 * 16),
          "CIFAR stage3 (256 ch, 8x8)": (256, 256, 8 * 8),
          "ImageNet in5b vs res5 (1024 / 2048 ch, 7x7)": (1024, 2048, 7 * 7)}
rows = ["| layer | C_s | C_t | H x W | auto picks |", "| --- | --- | --- | --- | --- |"]
for layer, (cs, ct, hw) in LAYERS.items():
  rows.append(f"| {layer} | {cs} | {ct} | {hw} | {kernels.choose_method('polynomial', cs, ct, hw)} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# ## Timing on this backend
#
# What training needs: the value and the gradient with respect to the student's rows, for a batch of images
# (one MMD² per image, vmapped, then the batch mean, as the NST loss does), jitted. Times are the median of
# a few calls after a first call that compiles, each call timed with `time.perf_counter` around
# `block_until_ready`. The definition row is the broadcasting route of the public implementations.

# %%
if SMALL:
  BATCH, SHAPES, REPEATS = 2, {"16 ch, 8x8": (16, 16, 64), "32 ch, 4x4": (32, 32, 16)}, 3
else:
  BATCH, REPEATS = 16, 5
  SHAPES = {name: shape for name, shape in LAYERS.items() if name.startswith("CIFAR")}
TIMED = [("linear", {}), ("polynomial", {"degree": 2, "c": 0.0}), ("gaussian", {})]


def batched_loss(kernel, method, params):
  if method == "definition":
    per_image = lambda x, y: mmd2_definition(x, y, kernel, **params)
  else:
    per_image = lambda x, y: kernels.mmd2(x, y, kernel, method=method, **params)
  return jax.jit(jax.value_and_grad(lambda X, Y: jnp.mean(jax.vmap(per_image)(X, Y))))


def median_ms(fn, *args):
  jax.block_until_ready(fn(*args))  # Compiles.
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


rows = [f"| layer (batch {BATCH}) | kernel | method | value + gradient, ms |", "| --- | --- | --- | --- |"]
timings = {}
for layer, (cs, ct, hw) in SHAPES.items():
  Xb = unit_rows(jax.random.key(2), (BATCH, cs, hw))
  Yb = unit_rows(jax.random.key(3), (BATCH, ct, hw))
  for kernel, params in TIMED:
    for method in (*kernels.applicable_methods(kernel, **params), "definition"):
      ms = median_ms(batched_loss(kernel, method, params), Xb, Yb)
      timings[layer, kernel, method] = ms
      rows.append(f"| {layer} | {kernel} | {method} | {ms:.2f} |")
display(Markdown("\n".join(rows)))
print(f"{len(timings)} timings on {jax.default_backend()}")

# %% [markdown]
# What the table showed when this was written (the 2-core development CPU, shared with other work,
# 2026-12-02, batch 16): the definition took 0.4 to 3 s per call, the form `auto` picks 0.6 to 37 ms, 60 to
# 800 times less. Two more things it shows: the vmapped pairwise kernel is almost as fast as `gram` for the
# linear and polynomial kernels (XLA turns a vmapped dot product into a matrix product) but not for the
# Gaussian, whose ||x - y||² per pair stays elementwise; and `spatial` pays only at stage3, where the 64
# positions are fewer than the channels (at stage1 its 1024 x 1024 matrices make it the polynomial kernel's
# slowest form).
# `bench/losses.py` in the repository measures the whole NST loss, forward and backward, on the paper's
# layer shapes.

# %% [markdown]
# ## The picture: MMD² as one set drifts away, and time against channel count
#
# **(a) Drift.** X is n draws of N(0, I) in D = 16 dimensions; Y = X' + s is a fresh draw X' of the same
# distribution shifted by s along every coordinate (the vector s·1, of length 4s), for s from 0 to 2. Each
# built-in kernel's biased MMD²(X, Y) by `kernels.mmd2` (`auto`): linear, polynomial of degree 2 with
# c = 0, and Gaussian with its default bandwidth (the mean squared distance over the pooled pairs, which
# itself grows with s). Their scales differ by orders (the linear MMD² is ||mean x - mean y||², about
# D s² + 2D/n; the polynomial one grows about like s⁴; the Gaussian one is at most 2), so each curve is
# divided by its own largest value on the grid. What to expect: all three start near 0 at s = 0 (not at 0:
# X' is another sample than X, so what is left is sampling noise, shrinking like 1/n), and grow with s;
# the Gaussian curve bends over past s ≈ 1, as its bandwidth widens with the shift.
#
# **(b) Time against channels.** The value and gradient of the batched per-image MMD² (`batched_loss` and
# `median_ms` above: jitted, median after a compiling call) for student and teacher maps of C channels each
# at 8x8 positions, C from 16 to 256, with `method="auto"` (the fast exact form: `mean`, `spatial` or `gram`)
# against `method="vmap"` (the definition, the pairwise kernel vmapped over every pair). Log-log axes, one
# colour per kernel, solid for `auto`, dashed for `vmap`. What to expect: the `vmap` lines climb more
# steeply, most of all the Gaussian's, whose ||x - y||² per pair builds the (C, C, 64) tensor; for the
# linear and polynomial kernels XLA turns the vmapped dot products into matrix products, so their gap is
# smaller; at the smallest C fixed per-call costs flatten every line.

# %%
DRIFT_N, DRIFT_DIM = (32, 16) if SMALL else (128, 16)
DRIFT_SHIFTS = [2.0 * i / (8 if SMALL else 20) for i in range(9 if SMALL else 21)]  # 0 to 2.
KERNEL_PARAMS = dict(TIMED)  # Linear, polynomial (2, 0), Gaussian with no sigma2: the default rule.

X0 = jax.random.normal(jax.random.key(4), (DRIFT_N, DRIFT_DIM))
fresh = jax.random.normal(jax.random.key(5), (DRIFT_N, DRIFT_DIM))  # X': same distribution, other draws.
drift = {kernel: [float(kernels.mmd2(X0, fresh + s, kernel, **params)) for s in DRIFT_SHIFTS]
         for kernel, params in KERNEL_PARAMS.items()}

rows = [f"| s (n = {DRIFT_N}, D = {DRIFT_DIM}) | " + " | ".join(f"{k} MMD²" for k in drift) + " |",
        "| --- |" + " --- |" * len(drift)]
for i, s in enumerate(DRIFT_SHIFTS):
  rows.append(f"| {s:.2f} | " + " | ".join(f"{values[i]:.6g}" for values in drift.values()) + " |")
display(Markdown("\n".join(rows)))

# %%
SWEEP_BATCH, SWEEP_HW = (2, 8 * 8) if SMALL else (8, 8 * 8)
SWEEP_CHANNELS = (16, 32, 64) if SMALL else (16, 32, 64, 128, 256)
FORMS = ("auto", "vmap")

sweep = {}  # (kernel, form) -> ms for each C.
for c in SWEEP_CHANNELS:
  Xb = unit_rows(jax.random.key(6), (SWEEP_BATCH, c, SWEEP_HW))
  Yb = unit_rows(jax.random.key(7), (SWEEP_BATCH, c, SWEEP_HW))
  for kernel, params in TIMED:
    for form in FORMS:
      sweep.setdefault((kernel, form), []).append(median_ms(batched_loss(kernel, form, params), Xb, Yb))

rows = [f"| C (batch {SWEEP_BATCH}, 8x8), ms | " + " | ".join(f"{k}: {f}" for k, f in sweep) + " |",
        "| --- |" + " --- |" * len(sweep)]
for i, c in enumerate(SWEEP_CHANNELS):
  rows.append(f"| {c} | " + " | ".join(f"{times[i]:.4g}" for times in sweep.values()) + " |")
display(Markdown("\n".join(rows)))
c = SWEEP_CHANNELS[-1]
picks = {kernel: kernels.choose_method(kernel, c, c, SWEEP_HW, **params) for kernel, params in TIMED}
print(f"auto at C = {c}: " + ", ".join(f"{k} {m}" for k, m in picks.items()))
print(f"vmap / auto at C = {c}: " + ", ".join(
    f"{k} {sweep[k, 'vmap'][-1] / sweep[k, 'auto'][-1]:.1f}x" for k in KERNEL_PARAMS))

# %%
# %matplotlib inline
from matplotlib.figure import Figure  # No pyplot: `display` shows the figure once, as an image.

fig = Figure(figsize=(11, 4.2), layout="constrained")
ax_drift, ax_time = fig.subplots(1, 2)
colours = {kernel: f"C{i}" for i, kernel in enumerate(KERNEL_PARAMS)}
for kernel, values in drift.items():
  ax_drift.plot(DRIFT_SHIFTS, [v / max(values) for v in values], "o-", color=colours[kernel], label=kernel)
ax_drift.set(xlabel="shift s along every coordinate: Y = X' + s",
             ylabel="biased MMD²(X, Y) / its largest value on the grid",
             title=f"(a) MMD² as Y drifts from X (n = {DRIFT_N}, D = {DRIFT_DIM})")
ax_drift.legend()
for (kernel, form), times in sweep.items():
  ax_time.loglog(SWEEP_CHANNELS, times, "o-" if form == "auto" else "s--", color=colours[kernel],
                 label=f"{kernel}, {form}")
ax_time.set(xlabel="channels C of student and teacher (8x8 positions)",
            ylabel=f"value + gradient, ms (median of {REPEATS})",
            title=f"(b) fast exact form (auto) against definition (vmap), batch {SWEEP_BATCH}")
ax_time.set_xticks(SWEEP_CHANNELS, [str(c) for c in SWEEP_CHANNELS])
ax_time.set_xticks([], minor=True)  # Only the channel counts timed, not 2 x 10^1 and so on.
ax_time.legend(fontsize="small")
display(fig)

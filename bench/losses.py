"""Benchmark of the NST loss: forward+backward time, FLOP rate and extra memory, three ways.

    python bench/losses.py [--batch 64] [--repeats 10] [--kernels linear,polynomial,gaussian]

The workload is `losses.nst` summed over the three stage shapes of RepDistiller's resnet32x4 -> resnet8x4
pair, student and teacher both (B, 32, 32, 64), (B, 16, 16, 128), (B, 8, 8, 256), float32, NHWC, with
post-ReLU random features; the gradient is taken with respect to the student maps. Rows:

* auto:      `losses.nst(..., method="auto")`, the exact fast forms nst_jax uses by default.
* vmap:      `losses.nst(..., method="vmap")`, the pairwise kernel vmapped over every pair of channels.
* broadcast: the form every public implementation uses, a (B, C, C, HW) broadcast of the channel rows
             reduced over HW, written here in jnp as the baseline (same normalisation, same estimator).

Time is the median wall time of `repeats` calls after a warm-up call (jit compiled once); "extra mem" is
XLA's temporary allocation for the compiled program (everything beyond the inputs and the outputs, the
gradient included in the outputs); GFLOP is XLA's cost analysis of the program. Figures from a shared
2-core machine are noisy: compare rows of one run, by ratio.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nst_jax import losses  # noqa: E402

STAGES = ((32, 32, 64), (16, 16, 128), (8, 8, 256))


def broadcast_nst(student, teacher, kernel):
  """The public implementations' form: kernel matrices from (B, C, C, HW) broadcasts."""
  fs = losses.channel_distributions(student)  # (B, C, HW)
  ft = losses.channel_distributions(jax.lax.stop_gradient(teacher))

  def pairwise(a, b):  # (B, n, HW), (B, m, HW) -> (B, n, m)
    a, b = a[:, :, None, :], b[:, None, :, :]
    if kernel == "linear":
      return jnp.sum(a * b, axis=-1)
    if kernel == "polynomial":
      return jnp.sum(a * b, axis=-1) ** 2
    return jnp.sum((a - b) ** 2, axis=-1)  # squared distances, for the Gaussian

  kss, ktt, kst = pairwise(fs, fs), pairwise(ft, ft), pairwise(fs, ft)
  if kernel == "gaussian":
    n, m = fs.shape[1], ft.shape[1]
    pooled = jax.lax.stop_gradient(jnp.concatenate([fs, ft], axis=1))
    dist = pairwise(pooled, pooled)
    sigma2 = jnp.sum(dist, axis=(1, 2)) / ((n + m) * (n + m - 1))
    kss, ktt, kst = (jnp.exp(-k / (2 * sigma2[:, None, None])) for k in (kss, ktt, kst))
  mmd2 = kss.mean(axis=(1, 2)) + ktt.mean(axis=(1, 2)) - 2 * kst.mean(axis=(1, 2))
  return jnp.mean(mmd2)


def make_loss(row, kernel):
  if row == "broadcast":
    one = lambda s, t: broadcast_nst(s, t, kernel)
  else:
    one = lambda s, t: losses.nst(s, t, kernel=kernel, method=row)
  return lambda S, T: sum(one(s, t) for s, t in zip(S, T, strict=True))


def measure(fn, args, repeats):
  compiled = jax.jit(jax.value_and_grad(fn)).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  flops = float(cost.get("flops", float("nan")))
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), temp, flops


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=10, help="timed calls for auto/vmap rows")
  parser.add_argument("--broadcast-repeats", type=int, default=3, help="timed calls for broadcast")
  parser.add_argument("--kernels", default="linear,polynomial,gaussian")
  parser.add_argument("--rows", default="auto,vmap,broadcast")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  shapes = [(args.batch, *s) for s in STAGES]
  S = [jnp.asarray(np.maximum(rng.normal(size=s), 0), jnp.float32) for s in shapes]
  T = [jnp.asarray(np.maximum(rng.normal(size=s), 0), jnp.float32) for s in shapes]
  mib = 2.0**20
  input_mib = sum(np.prod(s) for s in shapes) * 4 / mib
  bc2 = sum(args.batch * c * c for _, _, c in STAGES) * 4 / mib
  bc2hw = sum(args.batch * c * c * h * w for h, w, c in STAGES) * 4 / mib
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs); "
        f"NST loss over 3 stages {[s[1:] for s in shapes]}, batch {args.batch}, float32, fwd+bwd")
  print(f"sizes for scale: student maps {input_mib:.0f} MiB, B*C^2 {bc2:.0f} MiB, "
        f"B*C^2*HW {bc2hw:.0f} MiB (all stages, float32)\n")
  header = (f"{'kernel':<11}{'row':<11}{'median ms':>10}{'vs auto':>9}{'GFLOP':>8}{'GFLOP/s':>9}"
            f"{'extra mem MiB':>15}")
  print(header)
  print("-" * len(header))
  for kernel in args.kernels.split(","):
    auto_ms = None
    for row in args.rows.split(","):
      repeats = args.broadcast_repeats if row == "broadcast" else args.repeats
      seconds, temp, flops = measure(make_loss(row, kernel), (S, T), repeats)
      ms = seconds * 1e3
      auto_ms = ms if row == "auto" else auto_ms
      ratio = f"{ms / auto_ms:8.1f}x" if auto_ms else f"{'':>9}"
      print(f"{kernel:<11}{row:<11}{ms:>10.1f}{ratio}{flops / 1e9:>8.2f}{flops / seconds / 1e9:>9.1f}"
            f"{temp / mib:>15.1f}", flush=True)


if __name__ == "__main__":
  main()

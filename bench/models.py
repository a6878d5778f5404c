"""Benchmark of the CIFAR model zoo: parameters, FLOPs per image and images/s, forward and training.

    python bench/models.py [--batch 64] [--repeats 3] [--models resnet8x4,resnet32x4,...]

For each CIFAR model (32x32 inputs, 100 classes): trainable parameters; FLOPs per image from XLA's cost
analysis of the jitted inference forward pass (XLA counts a multiply-add as 2 FLOPs); and images/s of
the jitted forward pass (train=False) and of a forward+backward pass (train=True, gradient of the
cross-entropy with respect to the parameters, BatchNorm statistics updated), each the median of
`repeats` calls after a warm-up call. Figures from a shared 2-core machine are noisy.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nst_jax import losses, models  # noqa: E402

CIFAR_MODELS = (
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
    "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16",
    "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50", "preact_resnet164",
    "preact_resnet1001", "inception_bn_cifar",
)


def median_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench_model(name, batch, repeats, num_classes=100):
  model = models.get_model(name, num_classes=num_classes)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, size=batch))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  num_params = sum(x.size for x in jax.tree.leaves(params))

  forward = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, train=False)[0])
  compiled = forward.lower(params, batch_stats, images).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  flops_per_image = float(cost.get("flops", float("nan"))) / batch

  def train_loss(p, s, x, y):
    (logits, _), state = model.apply({"params": p, "batch_stats": s}, x, train=True,
                                     mutable=["batch_stats"])
    return losses.cross_entropy(logits, y), state["batch_stats"]

  train = jax.jit(jax.value_and_grad(train_loss, has_aux=True))
  forward_s = median_seconds(compiled, (params, batch_stats, images), repeats)
  train_s = median_seconds(train, (params, batch_stats, images, labels), repeats)
  return num_params, flops_per_image, batch / forward_s, batch / train_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--models", default=",".join(CIFAR_MODELS))
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs); 32x32 inputs, "
        f"100 classes, batch {args.batch}, float32; median of {args.repeats} calls\n")
  header = f"{'model':<20}{'params':>12}{'GFLOPs/img':>12}{'fwd img/s':>11}{'fwd+bwd img/s':>15}"
  print(header)
  print("-" * len(header))
  for name in args.models.split(","):
    num_params, flops, fwd, train = bench_model(name, args.batch, args.repeats)
    print(f"{name:<20}{num_params:>12,}{flops / 1e9:>12.3f}{fwd:>11.1f}{train:>15.1f}", flush=True)


if __name__ == "__main__":
  main()

"""nst_jax's training step against the same step in PyTorch, timed in interleaved rounds in one process.

    python bench/step_torch.py [--teacher resnet32x4] [--student resnet8x4] [--batch 64] [--rounds 4]
                               [--method ce,kd,nst,kd+nst] [--conv-impl auto[,xla]] [--threads N]
                               [--no-torch]

PyTorch is an optional benchmark dependency (not in requirements.txt). The PyTorch side is this file's
own statement of RepDistiller's CIFAR ResNets (`resnet8x4`, `resnet32x4`, ... : a 3x3 stem, three
stages of post-activation BasicBlocks with a 1x1 conv + BN projection where the shape changes, 8x8
average pool, linear classifier; NCHW, PyTorch's default layout) and of RepDistiller's losses: Hinton's
KD (KL divergence of the temperature-T softmaxes x T^2, summed over classes and averaged over the batch)
and the NST loss as RepDistiller computes it (per layer: channel maps L2-normalised over space, the
degree-2 polynomial kernel from a (B, C, C, HW) broadcast product, mean over each Gram matrix, the
teacher-teacher term detached). The teacher runs in eval mode under `torch.no_grad()`; the student is
updated by SGD (momentum 0.9, weight decay 5e-4, lr 0.05), as in RepDistiller's `train_student.py`.

The nst_jax side is `train.train_step` jitted with the state donated, on the first device, with the
objective weights of bench/step.py: ce = 1.0 CE; kd = 0.1 CE + 0.9 KD (T = 4); nst = 1.0 CE + 50 NST
(polynomial, degree 2, c = 0, on stage1..3); kd+nst = 0.1 CE + 0.9 KD + 50 NST. `--conv-impl auto,xla`
adds a row per convolution implementation (`nst_jax.models.conv.use_impl`); `--no-torch` times
nst_jax alone, for any zoo models, with ratios against the "jax xla" row.

Every prepared step (method x framework) runs once per round, rounds rotating the order, after two
warm-up calls; both see the same random batch. "speed vs torch" is PyTorch's median / nst_jax's (above
1: nst_jax is faster; with --no-torch "speed vs jax xla"), "paired" the median over rounds of the
per-round ratios. Figures from a shared machine are noisy: compare rows of one run.
"""

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nst_jax import models, objective  # noqa: E402
from nst_jax.models import conv  # noqa: E402
from nst_jax.trainer import train

NUM_CLASSES = 100
NST_LAYERS = ("stage1", "stage2", "stage3")
WEIGHTS = {  # (CE, KD, NST), RepDistiller's rows, as in bench/step.py.
    "ce": (1.0, 0.0, 0.0),
    "kd": (0.1, 0.9, 0.0),
    "nst": (1.0, 0.0, 50.0),
    "kd+nst": (0.1, 0.9, 50.0),
}
TEMPERATURE = 4.0
CIFAR_RESNETS = {  # name: (depth, (stem, stage1, stage2, stage3) widths)
    "resnet8": (8, (16, 16, 32, 64)), "resnet14": (14, (16, 16, 32, 64)), "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)), "resnet56": (56, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)), "resnet32x4": (32, (32, 64, 128, 256)),
}


# ---------------------------------------------------------------------------------------------------------
# PyTorch statement of the models and losses (built only when this runs, so importing needs no torch).


def torch_side(torch):
  nn, F = torch.nn, torch.nn.functional

  class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = None
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))

  class CifarResNet(nn.Module):
    def __init__(self, depth, widths, num_classes):
      super().__init__()
      blocks = (depth - 2) // 6
      self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(widths[0])
      stages, cin = [], widths[0]
      for i, cout in enumerate(widths[1:]):
        layers = []
        for b in range(blocks):
          layers.append(BasicBlock(cin, cout, 2 if (i > 0 and b == 0) else 1))
          cin = cout
        stages.append(nn.Sequential(*layers))
      self.stages = nn.ModuleList(stages)
      self.fc = nn.Linear(widths[-1], num_classes)
      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
      x = F.relu(self.bn1(self.conv1(x)))
      features = {}
      for i, stage in enumerate(self.stages, start=1):
        x = stage(x)
        features[f"stage{i}"] = x
      return self.fc(torch.flatten(F.avg_pool2d(x, 8), 1)), features

  def kd_loss(student_logits, teacher_logits):
    log_p = F.log_softmax(student_logits / TEMPERATURE, dim=1)
    q = F.softmax(teacher_logits / TEMPERATURE, dim=1)
    return F.kl_div(log_p, q, reduction="sum") * TEMPERATURE**2 / student_logits.shape[0]

  def poly_gram_mean(a, b):
    # (B, C_a, HW) x (B, C_b, HW) -> mean over (B, C_b, C_a) of (a_j . b_i)^2, by broadcasting.
    return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2).mean()

  def nst_loss(f_s, f_t):
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
      f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
      f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    f_s = F.normalize(f_s.flatten(2), dim=2)
    f_t = F.normalize(f_t.flatten(2), dim=2)
    return poly_gram_mean(f_t, f_t).detach() + poly_gram_mean(f_s, f_s) - 2 * poly_gram_mean(f_s, f_t)

  def build(name):
    depth, widths = CIFAR_RESNETS[name]
    return CifarResNet(depth, widths, NUM_CLASSES)

  def make_step(method, student, teacher):
    ce_w, kd_w, nst_w = WEIGHTS[method]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    student.train()
    if teacher is not None:
      teacher.eval()

    def step(images, labels):
      logits, features = student(images)
      loss = ce_w * F.cross_entropy(logits, labels)
      if teacher is not None:
        with torch.no_grad():
          t_logits, t_features = teacher(images)
        if kd_w:
          loss = loss + kd_w * kd_loss(logits, t_logits)
        if nst_w:
          loss = loss + nst_w * sum(nst_loss(features[k], t_features[k]) for k in NST_LAYERS)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      return loss.item()

    return step

  return build, make_step


# ---------------------------------------------------------------------------------------------------------
# nst_jax's step.


def jax_objective(method):
  ce_w, kd_w, nst_w = WEIGHTS[method]
  nst = {}
  if nst_w:
    nst = dict(nst_weight=nst_w, nst_layers=tuple((k, k) for k in NST_LAYERS), nst_kernel="polynomial",
               nst_params={"degree": 2, "c": 0.0})
  return objective.Objective(ce_weight=ce_w, kd_weight=kd_w, temperature=TEMPERATURE, **nst)


def jax_step(method, student_name, teacher_name, batch, impl="auto", dtype=jnp.float32):
  """A prepared nst_jax step: (call() -> loss, the compiled program). `batch` is on the device."""
  obj = jax_objective(method)
  sample = jnp.zeros((2, *batch["image"].shape[1:]), jnp.float32)
  student = models.get_model(student_name, num_classes=NUM_CLASSES, dtype=dtype)
  teacher, t_vars = None, {}
  if obj.needs_teacher:
    teacher = models.get_model(teacher_name, num_classes=NUM_CLASSES, dtype=dtype)
    t_vars = jax.jit(functools.partial(teacher.init, train=False))(jax.random.key(1), sample)
  batch_size = batch["image"].shape[0]
  lr = train.step_schedule(0.05, steps_per_epoch=50_000 // batch_size, decay_epochs=(150, 180, 210),
                           decay_factor=0.1)
  tx = train.make_optimizer(lr, momentum=0.9, nesterov=False, weight_decay=5e-4)
  state = jax.jit(lambda key: train.create_train_state(student, tx, sample, key))(jax.random.key(0))
  step_fn = functools.partial(train.train_step, models=train.Models(student=student, teacher=teacher),
                              objective=obj, learning_rate_fn=lr)
  with conv.use_impl(impl):
    compiled = jax.jit(step_fn, donate_argnums=0).lower(state, t_vars, batch).compile()
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], t_vars, batch)
    return float(metrics["train_loss"])  # Blocks until the step is done.

  return call, compiled


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--teacher", default="resnet32x4", help="zoo name (with PyTorch: of CIFAR_RESNETS)")
  parser.add_argument("--student", default="resnet8x4", help="zoo name (with PyTorch: of CIFAR_RESNETS)")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=4, help="timed rounds (one step of each per round)")
  parser.add_argument("--method", default="ce,kd,nst,kd+nst",
                      help=f"comma-separated, of: {', '.join(WEIGHTS)}")
  parser.add_argument("--conv-impl", default="auto", help=f"comma-separated, of: {', '.join(conv.IMPLS)}")
  parser.add_argument("--threads", type=int, default=0, help="PyTorch intra-op threads (0: its default)")
  parser.add_argument("--no-torch", action="store_true",
                      help="nst_jax only (any zoo models); ratios against the 'jax xla' row")
  args = parser.parse_args()
  methods, impls = args.method.split(","), args.conv_impl.split(",")
  for bad, valid, what in (([m for m in methods if m not in WEIGHTS], WEIGHTS, "method"),
                           ([i for i in impls if i not in conv.IMPLS], conv.IMPLS, "conv impl")):
    if bad:
      parser.error(f"unknown {what}(s) {', '.join(bad)}; valid: {', '.join(valid)}")
  torch = None
  if not args.no_torch:
    import torch  # noqa: PLC0415 (optional benchmark dependency)

    unknown = {args.teacher, args.student} - set(CIFAR_RESNETS)
    if unknown:
      parser.error(f"no PyTorch statement of {', '.join(sorted(unknown))} (use --no-torch); "
                   f"valid: {', '.join(sorted(CIFAR_RESNETS))}")
    if args.threads:
      torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    build, make_step = torch_side(torch)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=args.batch).astype(np.int64)
  jax_batch = jax.device_put({"image": images, "label": labels.astype(np.int32)}, jax.devices()[0])
  torch_info = f"torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "no torch"
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), {torch_info}, {os.cpu_count()} CPUs; "
        f"{args.teacher} -> {args.student}, batch {args.batch} (32x32x3, {NUM_CLASSES} classes), float32; "
        f"median of {args.rounds} interleaved rounds after 2 warm-up steps\n", flush=True)

  steps = {}
  for method in methods:
    for impl in impls:
      steps[(method, f"jax {impl}")] = jax_step(method, args.student, args.teacher, jax_batch, impl)[0]
    if torch:
      teacher = build(args.teacher) if WEIGHTS[method][1] or WEIGHTS[method][2] else None
      torch_step = make_step(method, build(args.student), teacher)
      torch_images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
      steps[(method, "torch")] = functools.partial(torch_step, torch_images, torch.from_numpy(labels))
    print(f"  {method}: prepared", file=sys.stderr, flush=True)
  losses = {key: [call() for _ in range(2)][-1] for key, call in steps.items()}
  times = {key: [] for key in steps}
  keys = list(steps)
  for r in range(args.rounds):
    for key in keys[r % len(keys):] + keys[:r % len(keys)]:
      start = time.perf_counter()
      losses[key] = steps[key]()
      times[key].append(time.perf_counter() - start)
  reference = "torch" if torch else ("jax xla" if "xla" in impls else None)
  print_table(methods, [f"jax {i}" for i in impls] + (["torch"] if torch else []), reference, times, losses,
              args.batch)


def print_table(methods, frameworks, reference, times, losses, batch):
  """One row per (method, framework); "speed vs" is the reference row's median / this row's."""
  header = (f"{'method':<8}{'framework':<11}{'median ms':>10}{'min ms':>9}{'img/s':>8}"
            f"{'speed vs ' + (reference or '-'):>17}{'paired':>8}{'loss':>8}")
  print(header)
  print("-" * len(header))
  med = {key: statistics.median(t) for key, t in times.items()}
  for method in methods:
    ref_key = (method, reference)
    for framework in frameworks:
      key = (method, framework)
      ratio = paired = ""
      if reference and framework != reference:
        ratio = f"{med[ref_key] / med[key]:.2f}x"
        paired = f"{statistics.median(r / j for r, j in zip(times[ref_key], times[key], strict=True)):.2f}x"
      print(f"{method:<8}{framework:<11}{med[key] * 1e3:>10.1f}{min(times[key]) * 1e3:>9.1f}"
            f"{batch / med[key]:>8.1f}{ratio:>17}{paired:>8}{losses[key]:>8.3f}")
  for framework in frameworks:
    kd = med.get(("kd", framework))
    for method in ("nst", "kd+nst"):
      if kd and (method, framework) in med:
        print(f"{framework}: {method} / kd = {med[(method, framework)] / kd:.3f}")


if __name__ == "__main__":
  main()

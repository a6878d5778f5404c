"""Benchmark of the zoo's convolutions: forward, input gradient and kernel gradient, XLA vs nst_jax.

    python bench/conv.py [--models resnet8x4,resnet32x4] [--batch 64] [--rounds 5] [--dtype float32]
                         [--no-torch] [--forms] [--write-table PATH]

The convolution shapes are read off the models themselves: each model's forward pass is traced (with
`conv.use_impl("xla")`, so every convolution is one `conv_general_dilated` equation) at 32x32 inputs and
`--batch` images, and every distinct configuration (input shape, kernel shape, stride, padding, groups)
is timed once, with its number of uses per model. For each one, three jitted programs per
implementation: `fwd` (the convolution), `dx` (`jax.vjp` with respect to the input only) and `dw`
(with respect to the kernel only); "xla" is `lax.conv_general_dilated` and its autodiff, "auto"
nst_jax's `conv.conv2d` (on CPU its own formulations). With PyTorch installed (an optional benchmark
dependency) the same three as `torch.nn.functional.conv2d` and `torch.ops.aten.convolution_backward`
on NCHW tensors (PyTorch's default layout, as RepDistiller uses it), with PyTorch's own thread count.

All programs of a shape are timed in interleaved rounds (one call of each, in a random order each round,
`--rounds` rounds), after one warm-up call each; the table gives GFLOP/s of the
median (a multiply-add counts 2) and "gain", the speed-up of auto over xla (xla's median / auto's). A
last table sums, per model, median time x uses over its shapes: the convolution time of one training
step (fwd + dx + dw), the part of the step this module changes; "vs torch" is PyTorch's total / auto's
(above 1: nst_jax is faster). Figures from a shared machine are noisy: read the ratios, and compare
rows of one run only.

`--forms` (implied by `--write-table`) then times, for every `groups == 1` configuration, each exact
formulation of the forward pass and of the two gradients that `nst_jax.models.conv` offers
(`conv.FORMS`; "xla" is XLA's own), interleaved as above, and prints their GFLOP/s at the fastest round
(interference from other processes only ever slows a round down, so the fastest round is the least
disturbed).
`--write-table PATH` writes the form of each pass per configuration (the fastest, when it is at least
`XLA_MARGIN` times as fast as XLA's own; XLA's otherwise) as the JSON table
`conv.choose` reads (`nst_jax/models/conv_table.json` is the shipped one; `conv.set_table(PATH)` or
NST_JAX_CONV_TABLE=PATH selects another), with the machine, the command and the load average.
"""

import argparse
import collections
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nst_jax import models  # noqa: E402
from nst_jax.models import conv  # noqa: E402

PASSES = ("fwd", "dx", "dw")
Shape = collections.namedtuple("Shape", "x kernel strides padding groups")


def zoo_shapes(model_names, batch):
  """{Shape: {model: uses}} of every convolution in the models' forward passes at 32x32 inputs."""
  uses = collections.defaultdict(collections.Counter)
  for name in model_names:
    model = models.get_model(name, num_classes=100)
    images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    with conv.use_impl("xla"):
      jaxpr = jax.make_jaxpr(functools.partial(model.init, train=False))(jax.random.key(0), images)
    for eqn in _equations(jaxpr.jaxpr):
      if eqn.primitive.name == "conv_general_dilated":
        p = eqn.params
        shape = Shape(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                      tuple(p["window_strides"]), tuple(tuple(q) for q in p["padding"]),
                      p["feature_group_count"])
        uses[shape][name] += 1
  return uses


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


def flops(shape: Shape) -> float:
  """2 x multiply-adds of one pass (fwd, dx and dw all have the same count)."""
  b, h, w, _ = shape.x
  kh, kw, cin_per_group, cout = shape.kernel
  oh = (h + sum(shape.padding[0]) - kh) // shape.strides[0] + 1
  ow = (w + sum(shape.padding[1]) - kw) // shape.strides[1] + 1
  return 2.0 * b * oh * ow * cout * cin_per_group * kh * kw


def jax_inputs(shape: Shape, dtype):
  """(x, kernel, output cotangent), shared by the implementations compared."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape.x), dtype)
  kernel = jnp.asarray(rng.normal(size=shape.kernel) * 0.1, dtype)
  out = jax.eval_shape(functools.partial(conv.xla_conv, strides=shape.strides, padding=shape.padding,
                                         groups=shape.groups), x, kernel)
  return x, kernel, jnp.asarray(rng.normal(size=out.shape), dtype)


def jax_programs(shape: Shape, impl: str, inputs):
  """{pass: (compiled fn, args)} for one implementation."""
  x, kernel, grad = inputs
  fn = functools.partial(conv.conv2d, strides=shape.strides, padding=shape.padding, groups=shape.groups)
  with conv.use_impl(impl):
    progs = {
        "fwd": (jax.jit(fn), (x, kernel)),
        "dx": (jax.jit(lambda x, k, g: jax.vjp(lambda x_: fn(x_, k), x)[1](g)[0]), (x, kernel, grad)),
        "dw": (jax.jit(lambda x, k, g: jax.vjp(lambda k_: fn(x, k_), kernel)[1](g)[0]), (x, kernel, grad)),
    }
    return {name: (f.lower(*args).compile(), args) for name, (f, args) in progs.items()}


def torch_programs(shape: Shape, dtype_name: str):
  import torch  # noqa: PLC0415 (optional dependency)

  dtype = getattr(torch, dtype_name)
  gen = torch.Generator().manual_seed(0)
  b, h, w, cin = shape.x
  kh, kw, cin_per_group, cout = shape.kernel
  x = torch.randn(b, cin, h, w, generator=gen).to(dtype)
  weight = (torch.randn(cout, cin_per_group, kh, kw, generator=gen) * 0.1).to(dtype)
  (pt, pb), (pl, pr) = shape.padding
  if pt != pb or pl != pr:
    return None  # PyTorch's conv2d pads symmetrically only.
  conv_args = dict(stride=shape.strides, padding=(pt, pl), groups=shape.groups)
  out = torch.nn.functional.conv2d(x, weight, **conv_args)
  grad = torch.randn(out.shape, generator=gen).to(dtype)

  def backward(mask):
    return torch.ops.aten.convolution_backward(grad, x, weight, None, list(shape.strides), [pt, pl], [1, 1],
                                               False, [0, 0], shape.groups, mask)

  return {"fwd": (lambda: torch.nn.functional.conv2d(x, weight, **conv_args), ()),
          "dx": (lambda: backward([True, False, False]), ()),
          "dw": (lambda: backward([False, True, False]), ())}


def form_programs(shape: Shape, inputs):
  """{(pass, form): (compiled fn, args)} of every formulation of the forward pass and of the two gradients
  applicable to a `groups == 1` shape ("xla": XLA's own)."""
  x, kernel, grad = inputs
  xla = functools.partial(conv.xla_conv, strides=shape.strides, padding=shape.padding, groups=1)
  s, p = shape.strides, shape.padding
  own = {
      "fwd": (lambda form: lambda x_, k: conv.forward(x_, k, s, p, form), (x, kernel)),
      "dx": (lambda form: lambda k, g: conv.input_grad(g, k, shape.x[1:3], s, p, form), (kernel, grad)),
      "dw": (lambda form: lambda x_, g: conv.kernel_grad(x_, g, shape.kernel[:2], s, p, form), (x, grad)),
  }
  reference = {
      "fwd": xla,
      "dx": lambda k, g: jax.vjp(lambda x_: xla(x_, k), x)[1](g)[0],
      "dw": lambda x_, g: jax.vjp(lambda k_: xla(x_, k_), kernel)[1](g)[0],
  }
  progs = {}
  for part, forms in conv.FORMS.items():
    make, args = own[part]
    for form in forms:
      if form == "xla":
        fn = reference[part]
      elif conv.form_applies(part, form, shape.kernel, shape.strides, shape.padding):
        fn = make(form)
      else:
        continue
      progs[(part, form)] = (jax.jit(fn).lower(*args).compile(), args)
  return progs


def machine() -> str:
  """The CPU model, its count and the JAX version: what a measured table belongs to."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{model}, {os.cpu_count()} CPUs, jax {jax.__version__}"


def load_average() -> str:
  try:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "n/a"


def run_forms(uses, batch_dtype, rounds, table_path, command):
  """Times every formulation per `groups == 1` configuration; writes the table if `table_path`."""
  load_before = load_average()
  print(f"\nformulations of each pass, GFLOP/s at the fastest of {rounds} interleaved rounds (load "
        f"average {load_before}); * the one chosen: the fastest, if {XLA_MARGIN}x as fast as XLA's")
  header = f"{'shape (HxW Cin->Cout k s)':<28}" + "".join(
      f"{part + ' ' + f:>11}" for part, forms in conv.FORMS.items() for f in forms)
  print(header)
  print("-" * len(header), flush=True)
  entries = {}
  for shape in sorted(uses, key=lambda s: (-s.x[1], s.x[3], s.kernel)):
    if shape.groups != 1:
      continue
    inputs = jax_inputs(shape, batch_dtype)
    progs = form_programs(shape, inputs)
    best = time_interleaved(progs, rounds, statistic=min)
    fl = flops(shape)
    choice = {p: choose_form(p, best) for p in conv.FORMS}
    cells = "".join(f"{fl / best[(p, f)] / 1e9:>10.1f}{'*' if choice[p] == f else ' '}" if (p, f) in best
                    else f"{'-':>11}" for p, forms in conv.FORMS.items() for f in forms)
    print(f"{describe(shape):<28}{cells}", flush=True)
    key = conv.table_key(shape.x, shape.kernel, shape.strides, shape.padding, batch_dtype)
    entries[key] = {**choice, "gflops": {f"{p} {f}": round(fl / t / 1e9, 1) for (p, f), t in best.items()}}
  if table_path:
    table = {"machine": machine(), "command": command,
             "load_average": f"{load_before} before, {load_average()} after (1, 5, 15 min)",
             "statistic": f"fastest of {rounds} interleaved rounds; another form than XLA's only when "
                          f"{XLA_MARGIN}x as fast", "entries": entries}
    with open(table_path, "w") as f:
      json.dump(table, f, indent=1)
      f.write("\n")
    print(f"\nwrote {len(entries)} entries to {table_path}")


# Another formulation replaces XLA's own only when it is this much faster, measured alone: alone, a form
# does not pay what it may cost inside a model, where XLA fuses its own convolution with the elementwise
# work around it (BatchNorm, ReLU). With smaller margins, forms 1.1-1.25x XLA's alone made the forward pass
# of the narrow CIFAR ResNets slower: resnet8's inference forward (1-channel 32x32 images, batch 64) 1.3x
# (23.1 against 17.7 ms), resnet20's 1.2x. Repeated measurements of one form on the 2-core machine also
# varied by up to 20 %, so closer calls are not decided by the table.
XLA_MARGIN = 1.25


def choose_form(part, seconds) -> str:
  """The form of `part` ("fwd", "dx", "dw") for {(part, form): seconds}: the fastest, unless XLA's own is
  within XLA_MARGIN of it."""
  fastest = min((t, form) for (p, form), t in seconds.items() if p == part)[1]
  if fastest != "xla" and seconds[(part, fastest)] * XLA_MARGIN <= seconds[(part, "xla")]:
    return fastest
  return "xla"


def time_interleaved(programs, rounds, seed=0, statistic=statistics.median):
  """{key: `statistic` of the seconds} of `programs` {key: (fn, args)}, one call each per round, in a new
  random order every round (a fixed order would always run a program after the same neighbour, warm or
  cold)."""
  keys = list(programs)
  for key in keys:
    fn, args = programs[key]
    jax.block_until_ready(fn(*args))
  times = {key: [] for key in keys}
  order = np.random.default_rng(seed)
  for _ in range(rounds):
    for i in order.permutation(len(keys)):
      key = keys[i]
      fn, args = programs[key]
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[key].append(time.perf_counter() - start)
  return {key: statistic(t) for key, t in times.items()}


def describe(shape: Shape) -> str:
  b, h, _, cin = shape.x
  kh, _, _, cout = shape.kernel
  groups = "" if shape.groups == 1 else (" dw" if shape.groups == cin else f" g{shape.groups}")
  return f"{h}x{h} {cin}->{cout} k{kh} s{shape.strides[0]}{groups}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet8x4,resnet32x4", help="comma-separated zoo names")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even when it is installed")
  parser.add_argument("--forms", action="store_true", help="also time every gradient formulation")
  parser.add_argument("--write-table", metavar="PATH", help="write the fastest formulations as a table "
                      "(implies --forms)")
  parser.add_argument("--forms-only", action="store_true", help="skip the xla/auto/torch comparison")
  args = parser.parse_args()
  names = args.models.split(",")
  dtype = jnp.dtype(args.dtype)
  torch_version = None
  if not args.no_torch:
    try:
      import torch  # noqa: PLC0415

      torch_version = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
      pass
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {device.platform} ({os.cpu_count()} CPUs); {torch_version or 'no torch'}; "
        f"batch {args.batch}, {args.dtype}, NHWC; median of {args.rounds} interleaved rounds; GFLOP/s\n")
  uses = zoo_shapes(names, args.batch)
  if args.forms or args.write_table:
    run_forms(uses, dtype, args.rounds, args.write_table, "python bench/conv.py " + " ".join(sys.argv[1:]))
  if args.forms_only:
    return
  impls = ("xla", "auto") + (("torch",) if torch_version else ())
  header = (f"{'shape (HxW Cin->Cout k s)':<28}{'uses':>5}" + "".join(f"{p + ' ' + i:>11}" for p in PASSES
                                                                     for i in impls)
            + "".join(f"{p + ' gain':>10}" for p in PASSES))
  print(header)
  print("-" * len(header), flush=True)
  medians = {}
  for shape in sorted(uses, key=lambda s: (-s.x[1], s.x[3], s.kernel)):
    programs, inputs = {}, jax_inputs(shape, dtype)
    for impl in ("xla", "auto"):
      programs.update({(impl, p): v for p, v in jax_programs(shape, impl, inputs).items()})
    if torch_version:
      torch_progs = torch_programs(shape, args.dtype)
      programs.update({("torch", p): v for p, v in (torch_progs or {}).items()})
    medians[shape] = time_interleaved(programs, args.rounds)
    fl = flops(shape)
    cells = "".join(f"{fl / medians[shape][(i, p)] / 1e9:>11.1f}" if (i, p) in medians[shape]
                    else f"{'-':>11}" for p in PASSES for i in impls)
    ratios = "".join(f"{medians[shape][('xla', p)] / medians[shape][('auto', p)]:>9.2f}x" for p in PASSES)
    print(f"{describe(shape):<28}{sum(uses[shape].values()):>5}{cells}{ratios}", flush=True)

  print(f"\nper model, convolution time of one training step at batch {args.batch} (sum of fwd + dx + dw "
        "medians x uses, ms)")
  header = f"{'model':<14}" + "".join(f"{i:>10}" for i in impls) + f"{'gain':>10}" + (
      f"{'vs torch':>11}" if torch_version else "")
  print(header)
  print("-" * len(header))
  for name in names:
    total = {i: sum(uses[s][name] * sum(medians[s].get((i, p), float("nan")) for p in PASSES) for s in uses
                    if uses[s][name]) for i in impls}
    row = f"{name:<14}" + "".join(f"{total[i] * 1e3:>10.1f}" for i in impls)
    row += f"{total['xla'] / total['auto']:>9.2f}x"
    if torch_version:
      row += f"{total['torch'] / total['auto']:>10.2f}x"
    print(row)


if __name__ == "__main__":
  main()

"""Independent NumPy (float64) references for the kernel and loss tests.

Written from the formulas of nst-method.md with explicit loops over pairs, positions and pooling cells,
sharing no code with nst_jax, so that a test compares two implementations, not one with itself.
"""

import math

import numpy as np


def kernel(name, x, y, degree=2, c=0.0, sigma2=None):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if name == "linear":
    return float(np.sum(x * y))
  if name in ("polynomial", "poly"):
    return float((np.sum(x * y) + c) ** degree)
  if name == "gaussian":
    return math.exp(-float(np.sum((x - y) ** 2)) / (2.0 * sigma2))
  raise AssertionError(name)


def sigma2_heuristic(X, Y):
  """Mean squared distance over all ordered pairs i != j of the pooled rows."""
  Z = np.concatenate([np.asarray(X, np.float64), np.asarray(Y, np.float64)])
  total, count = 0.0, 0
  for i in range(len(Z)):
    for j in range(len(Z)):
      if i != j:
        total += float(np.sum((Z[i] - Z[j]) ** 2))
        count += 1
  return total / count


def mmd2(X, Y, name="polynomial", unbiased=False, **params):
  """Eq. 4 as written: the three double sums, V- or U-statistic."""
  X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
  if name == "gaussian" and params.get("sigma2") is None:
    params = {**params, "sigma2": sigma2_heuristic(X, Y)}
  n, m = len(X), len(Y)
  kxx = sum(kernel(name, X[a], X[b], **params) for a in range(n) for b in range(n)
            if not (unbiased and a == b))
  kyy = sum(kernel(name, Y[a], Y[b], **params) for a in range(m) for b in range(m)
            if not (unbiased and a == b))
  kxy = sum(kernel(name, X[a], Y[b], **params) for a in range(n) for b in range(m))
  if unbiased:
    return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)
  return kxx / n**2 + kyy / m**2 - 2 * kxy / (n * m)


def adaptive_avg_pool(x, out_h, out_w):
  """PyTorch AdaptiveAvgPool2d on NHWC: cell i covers floor(i*in/out) .. ceil((i+1)*in/out) - 1."""
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c))
  for i in range(out_h):
    h0, h1 = (i * h) // out_h, math.ceil((i + 1) * h / out_h)
    for j in range(out_w):
      w0, w1 = (j * w) // out_w, math.ceil((j + 1) * w / out_w)
      out[:, i, j, :] = x[:, h0:h1, w0:w1, :].mean(axis=(1, 2))
  return out


def _linear_weights(in_size, out_size):
  """Bilinear upsampling weights along one axis, half-pixel centres (align_corners=False)."""
  weights = np.zeros((out_size, in_size))
  for o in range(out_size):
    src = (o + 0.5) * in_size / out_size - 0.5
    src = min(max(src, 0.0), in_size - 1)
    lo = int(math.floor(src))
    hi = min(lo + 1, in_size - 1)
    frac = src - lo
    weights[o, lo] += 1 - frac
    weights[o, hi] += frac
  return weights


def bilinear_resize(x, out_h, out_w):
  x = np.asarray(x, np.float64)
  wh, ww = _linear_weights(x.shape[1], out_h), _linear_weights(x.shape[2], out_w)
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for i in range(out_h):
    for j in range(out_w):
      for p in range(x.shape[1]):
        for q in range(x.shape[2]):
          if wh[i, p] and ww[j, q]:
            out[:, i, j, :] += wh[i, p] * ww[j, q] * x[:, p, q, :]
  return out


def match(student, teacher, resize):
  (_, hs, ws, _), (_, ht, wt, _) = np.shape(student), np.shape(teacher)
  if resize == "pool":
    h, w = min(hs, ht), min(ws, wt)
    return adaptive_avg_pool(student, h, w), adaptive_avg_pool(teacher, h, w)
  h, w = max(hs, ht), max(ws, wt)
  return bilinear_resize(student, h, w), bilinear_resize(teacher, h, w)


def channel_rows(feat_b):
  """(H, W, C) of one image -> (C, HW) rows, each divided by max(||row||, 1e-12)."""
  feat_b = np.asarray(feat_b, np.float64)
  rows = feat_b.reshape(-1, feat_b.shape[-1]).T
  norms = np.sqrt((rows**2).sum(axis=1, keepdims=True))
  return rows / np.maximum(norms, 1e-12)


def nst(student, teacher, name="polynomial", resize="pool", unbiased=False, **params):
  student, teacher = match(student, teacher, resize)
  return float(np.mean([
      mmd2(channel_rows(s), channel_rows(t), name, unbiased, **params)
      for s, t in zip(student, teacher, strict=True)]))


def softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def kd(s_logits, t_logits, T):
  ps, pt = softmax(np.asarray(s_logits) / T), softmax(np.asarray(t_logits) / T)
  return float(T**2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1)))


def attention(student, teacher, p=2, resize="pool"):
  student, teacher = match(student, teacher, resize)

  def at(f):
    a = (np.abs(f) ** p).mean(axis=-1).reshape(f.shape[0], -1)
    return a / np.maximum(np.sqrt((a**2).sum(axis=1, keepdims=True)), 1e-12)

  return float(np.mean((at(student) - at(teacher)) ** 2))


def cross_entropy(logits, labels):
  p = softmax(logits)
  return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))

#!/usr/bin/env bash
# The comparison docs/benchmarks.md reports, as one command, for a quiet machine (nothing else running):
#
#     bench/quiet_compare.sh [--write-table]
#
# 1. with --write-table: re-measures the convolution formulations of resnet8x4, resnet32x4 and resnet20
#    and rewrites nst_jax/models/conv_table.json, the table nst_jax chooses them by (the runs below are
#    new processes, so they use it);
# 2. bench/conv.py: every convolution of resnet8x4 and resnet32x4, forward, input and kernel gradient,
#    XLA vs nst_jax vs PyTorch, and the convolution time per training step of each model;
# 3. bench/step_torch.py: the resnet32x4 -> resnet8x4 training step, ce, kd and nst, nst_jax vs
#    PyTorch, interleaved in one process.
# `uptime` before and after each part. PYTHON overrides the interpreter (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
if [[ "${1:-}" == "--write-table" ]]; then
  uptime
  "$PY" bench/conv.py --models resnet8x4,resnet32x4,resnet20 --rounds 15 --forms-only \
    --write-table nst_jax/models/conv_table.json
elif [[ -n "${1:-}" ]]; then
  echo "unknown argument ${1}; valid: --write-table" >&2
  exit 2
fi
uptime
"$PY" bench/conv.py --models resnet8x4,resnet32x4 --rounds 7
uptime
"$PY" bench/step_torch.py --method ce,kd,nst --rounds 6
uptime

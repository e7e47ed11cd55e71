#!/usr/bin/env bash
# The prepared GPU check: one command, at most 8 minutes on one GPU (benchmarks/gpu_check.py says
# what it measures). Usage: bash benchmarks/gpu_check.sh [OUT_DIR]  (default gpu_check_out)
# Without a CUDA GPU it stops at once with one line and exit code 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch: run 'make install' first (or set PYTHON)" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 FL_MERGE_GPU_CHECK=1
exec timeout --kill-after=10 480 "$PY" benchmarks/gpu_check.py --out "${1:-gpu_check_out}" "${@:2}"

#!/usr/bin/env bash
# Issue 9's GPU check, one command on a fresh GPU machine (about 5 minutes on an H200 machine):
#
#   benchmarks/gpu_check.sh [bench_gpu.py options]      e.g. --rows 2000000 --batch-size 16384
#
# 1. An environment with CUDA torch of the pinned version (2.13.0): the lock pins the CPU build
#    (a local wheel), so this venv installs every other locked package from the lock (hashes
#    checked) and torch from a CUDA wheel: $TORCH_WHEEL (a file, for machines without a network,
#    which is how our GPU runners are set up) or else $TORCH_INDEX (default: PyTorch's cu126 index).
#    A machine whose python already has CUDA torch 2.13.0 (GPU_PYTHON=...) skips the install.
# 2. benchmarks/bench_gpu.py: 2M synthetic rows, one epoch each of APEM and Shared-Bottom with bf16
#    autocast and a large batch; prints samples/s, their ratio, peak GPU memory and the test AUC.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
VENV=${GPU_VENV:-.venv-gpu}

torch_ok() {  # the python in $1 has CUDA torch of the pinned version and sees a GPU
  "$1" -c "import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' and torch.cuda.is_available() else 1)" 2>/dev/null
}

if [ -n "${GPU_PYTHON:-}" ] && torch_ok "$GPU_PYTHON"; then
  PY=$GPU_PYTHON
else
  PY=$VENV/bin/python
  if ! torch_ok "$PY"; then
    ${PYTHON:-python3.11} -m venv "$VENV"
    "$PY" -m pip install -q --disable-pip-version-check uv==0.13.9
    # everything but torch from the lock, hash-checked; torch comes from the CUDA build below
    awk '/^[^ #]/{skip = /^torch==/} !skip' requirements.lock > "$VENV/requirements-no-torch.lock"
    "$VENV/bin/uv" pip install -q --compile-bytecode --python "$PY" --no-deps -r "$VENV/requirements-no-torch.lock"
    if [ -n "${TORCH_WHEEL:-}" ]; then
      "$VENV/bin/uv" pip install -q --python "$PY" --no-deps "$TORCH_WHEEL"
    else
      "$VENV/bin/uv" pip install -q --python "$PY" "torch==$TORCH_VERSION" \
        --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cu126}"
    fi
    "$VENV/bin/uv" pip install -q --python "$PY" --no-deps -e .
  fi
  if ! torch_ok "$PY"; then
    echo "gpu_check: $PY has no CUDA torch $TORCH_VERSION that sees a GPU (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))" >&2
    exit 2
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/bench_gpu.py "$@"

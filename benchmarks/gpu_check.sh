#!/usr/bin/env bash
# Issue 9's GPU check, one command on a fresh GPU machine (about 5 minutes on an H200 machine):
#
#   benchmarks/gpu_check.sh [bench_gpu.py options]      e.g. --rows 2000000 --batch-size 16384
#
# 1. An environment with CUDA torch of the pinned version (2.13.0): the lock pins the CPU build
#    (a local wheel), so this venv installs every other locked package from the lock (hashes
#    checked) and torch from a CUDA wheel: $TORCH_WHEEL (a file, for machines without a network,
#    which is how our GPU runners are set up) or else $TORCH_INDEX (default: PyTorch's cu126 index).
#    A machine whose python already has CUDA torch 2.13.0 (GPU_PYTHON=...) skips the install; one that
#    cannot install and has another CUDA torch runs with it when GPU_ANY_TORCH=1 is set too (the
#    report names the torch that ran), e.g. the lent H200 machines: GPU_PYTHON=python3 GPU_ANY_TORCH=1.
# 2. benchmarks/bench_gpu.py: 2M synthetic rows, one epoch each of APEM and Shared-Bottom with bf16
#    autocast and a large batch; prints samples/s, their ratio, peak GPU memory and the test AUC.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
VENV=${GPU_VENV:-.venv-gpu}

torch_ok() {  # the python in $1 has CUDA torch of the pinned version and sees a GPU
  "$1" -c "import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' and torch.cuda.is_available() else 1)" 2>/dev/null
}

cuda_ok() {  # the python in $1 has a CUDA torch of any version that sees a GPU, and apem's other imports
  "$1" -c "import sys, torch, numpy, pandas, pyarrow, scipy, yaml, tqdm; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

if [ -n "${GPU_PYTHON:-}" ] && torch_ok "$GPU_PYTHON"; then
  PY=$GPU_PYTHON
elif [ -n "${GPU_PYTHON:-}" ] && [ -n "${GPU_ANY_TORCH:-}" ]; then
  # A GPU machine that cannot install (no network) and whose python has another CUDA torch: measure with it,
  # and say so; the report's "torch" names the version that ran.
  if ! cuda_ok "$GPU_PYTHON"; then
    echo "gpu_check: $GPU_PYTHON has no CUDA torch that sees a GPU, or lacks numpy/pandas/pyarrow/scipy/pyyaml/tqdm" >&2
    exit 2
  fi
  echo "gpu_check: $GPU_PYTHON's torch $("$GPU_PYTHON" -c 'import torch; print(torch.__version__)'), not the pinned $TORCH_VERSION (GPU_ANY_TORCH set)" >&2
  PY=$GPU_PYTHON
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # apem from this checkout, not installed there
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

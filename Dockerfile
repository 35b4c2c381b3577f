# The one image every pipeline component runs in: apem_kfp.components.APEM_IMAGE names it.
#   docker build -t ghcr.io/apem-project/apem:0.1.0 .
# It installs requirements.lock (the production lock `make setup` also installs; test-only packages
# are in requirements-dev.lock, which the image never installs) in two steps, so that no package can
# come from an index it was not meant to come from:
#   1. every locked package except torch, from PyPI alone, each file checked against the lock's hash
#      (--require-hashes);
#   2. the CUDA build of the same pinned torch from the PyTorch index alone (--index-url, no extra
#      index: a look-alike package on another index is never consulted), with the packages of step 1
#      held at their locked versions (-c); only torch's CUDA runtime packages are added.
# No credentials are baked in: on the cluster, GCS access comes from Workload Identity (infra/).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_CUDA=cu128
ARG UV_VERSION=0.13.9
# the commit the image was built from (docker build --build-arg APEM_GIT_SHA=$(git rev-parse HEAD));
# push tags every registered version with it (apem.release.lineage)
ARG APEM_GIT_SHA=unknown

LABEL org.opencontainers.image.title="apem" \
      org.opencontainers.image.ref.name="ghcr.io/apem-project/apem:0.1.0" \
      org.opencontainers.image.description="APEM multi-step conversion estimation: training and daily retraining pipeline" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc and libc6-dev: APEM's CPU kernels (apem/nn/native.py) are built on first use, with -march=native for the
# node's CPU, into ~/.cache/apem/kernels. The steps that predict on CPU (online serving, evaluate, batch
# scoring) then run them instead of torch's slower path; serving builds them as the model loads (warm_up).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir uv==${UV_VERSION}

WORKDIR /opt/apem
# Dependencies first: this layer is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN awk '/^torch==/ {skip = 1; next} skip && /^[ \t]/ {next} {skip = 0; print}' requirements.lock \
       > requirements.notorch.lock \
    && uv pip install --no-cache --python /opt/venv/bin/python --require-hashes -r requirements.notorch.lock \
    && TORCH_VERSION="$(sed -nE 's/^torch==([0-9.]+)\+cpu.*$/\1/p' requirements.lock)" \
    && uv pip install --no-cache --python /opt/venv/bin/python \
       --index-url https://download.pytorch.org/whl/${TORCH_CUDA} -c requirements.notorch.lock \
       "torch==${TORCH_VERSION}+${TORCH_CUDA}" \
    && python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.endswith('+${TORCH_CUDA}') else f'torch {v} is not the ${TORCH_CUDA} build')"

COPY pyproject.toml README.md ./
COPY apem ./apem
COPY components ./components
COPY pipelines ./pipelines
RUN uv pip install --no-cache --python /opt/venv/bin/python --no-deps . \
    && python -c "import apem, apem_kfp.components, apem_kfp.pipelines.daily_retrain"

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin apem
USER 10001:10001
WORKDIR /home/apem
ENV HOME=/home/apem \
    MPLCONFIGDIR=/tmp/matplotlib \
    APEM_GIT_SHA=${APEM_GIT_SHA}

CMD ["apem", "--help"]

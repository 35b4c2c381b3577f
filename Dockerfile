# The one image every pipeline component runs in: apem_kfp.components.APEM_IMAGE names it.
#   docker build -t ghcr.io/apem-project/apem:0.1.0 .
# It installs requirements.lock (the same lock `make setup` and the README use), with the torch
# line switched from the CPU build to the CUDA build of the same pinned version. No credentials
# are baked in: on the cluster, GCS access comes from Workload Identity (infra/).
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

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir uv==${UV_VERSION}

WORKDIR /opt/apem
# Dependencies first: this layer is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN sed -E "s/^torch==([^+]+)\+cpu$/torch==\1+${TORCH_CUDA}/" requirements.lock > requirements.cuda.lock \
    && uv pip install --no-cache --python /opt/venv/bin/python --index-strategy unsafe-best-match \
       --extra-index-url https://download.pytorch.org/whl/${TORCH_CUDA} -r requirements.cuda.lock \
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

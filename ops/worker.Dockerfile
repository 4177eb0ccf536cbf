# syntax=docker/dockerfile:1
#
# GPU worker image: `worker run` with the model kept on one GPU.
#
#   docker build -f ops/worker.Dockerfile -t vision-queue-worker .
#   docker build -f ops/worker.Dockerfile --build-arg WITH_FLASH_ATTN=1 -t vision-queue-worker .
#
# BASE_IMAGE (and DEVEL_IMAGE, for flash-attn) replace the nvidia/cuda bases, e.g. with the
# stand-in Debian image that ops/stack-check.sh builds on hosts without Docker Hub
# (ops/README.md, "Stand-in bases"). The recipe only needs apt-get in the base.
#
# Base: the PyTorch wheel from PyPI carries its own CUDA user-space libraries (cuBLAS, cuDNN,
# NCCL as pip packages; torch 2.13 uses CUDA 13.0), so the image needs no CUDA toolkit. The
# nvidia/cuda "base" flavour adds only cudart, the NVIDIA_* variables the NVIDIA Container
# Toolkit reads, and Ubuntu 24.04's Python 3.12. Its CUDA major version must match torch's;
# the host driver must support that CUDA version (ops/README.md). A -runtime or -cudnn-runtime
# base works too, at a few GB more.
#
# WITH_FLASH_ATTN=1 builds flash-attn in a separate -devel stage (nvcc, headers) and copies
# only the wheel into this image. BuildKit skips the devel stage when WITH_FLASH_ATTN=0.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04
ARG WITH_FLASH_ATTN=0
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION}
ARG DEVEL_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION}

# --- flash-attn wheel: empty when not requested -------------------------------------
FROM ${BASE_IMAGE} AS flash-attn-0
RUN mkdir /wheels

FROM ${DEVEL_IMAGE} AS flash-attn-1
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Parallel compile jobs (flash-attn's README): each can take several GB of RAM.
ARG MAX_JOBS=4
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build
ENV PATH=/opt/build/bin:$PATH \
    MAX_JOBS=${MAX_JOBS}
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install packaging psutil ninja wheel setuptools
# flash-attn's setup.py first looks for a prebuilt wheel matching this torch, CUDA and Python
# on its GitHub releases (needs network access to github.com); without one it compiles from
# source, which takes a long time. The wheel is built against the same torch as the runtime.
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir /wheels \
    && pip wheel --no-build-isolation --no-deps --wheel-dir /wheels "flash-attn>=2.6"

FROM flash-attn-${WITH_FLASH_ATTN} AS flash-attn

# --- runtime --------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG WITH_FLASH_ATTN
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/hf-cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The venv stays owned by root: the worker cannot modify its own code.
RUN python3 -m venv /opt/venv

# torch first, in its own layer: the largest download, and it changes least often.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project from the build context (filtered by .dockerignore); the rw bind mount lets
# setuptools write its build files without them landing in a layer.
RUN --mount=type=bind,source=.,target=/src,rw \
    --mount=type=bind,from=flash-attn,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    extras=worker,otel; \
    if [ "${WITH_FLASH_ATTN}" = "1" ]; then extras=worker,otel,flash-attn; fi; \
    pip install --find-links /wheels --only-binary flash-attn "/src[${extras}]" \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# HF_HOME: the named volume that docker-compose.yml mounts on /hf-cache starts with this
# ownership, so the unprivileged user can download into it.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin vq \
    && mkdir -p /hf-cache \
    && chown vq:vq /hf-cache
USER vq
WORKDIR /home/vq

# Liveness (exit 0/1). docker-compose.yml overrides it with --ready: model loaded, broker
# reachable.
HEALTHCHECK --interval=30s --timeout=30s --start-period=20m --retries=3 \
    CMD ["worker", "health", "--live"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["worker"]
CMD ["run"]

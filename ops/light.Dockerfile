# syntax=docker/dockerfile:1
#
# Light image: the producer package and CLI, Flower (`monitor` extra) and the HTTP gateway
# (`gateway` extra: `producer serve`). No torch.
#
#   docker build -f ops/light.Dockerfile -t vision-queue-light .
#   docker run --rm -e REDIS_URL=redis://:PASSWORD@redis-host:6379/0 vision-queue-light producer --help
#
# docker-compose.yml runs Flower (celery -A producer.flower_app:app flower ...) and the
# gateway (producer serve ...) from it.

# BASE_IMAGE replaces the python slim base, e.g. with the stand-in Debian image that
# ops/stack-check.sh builds on hosts without Docker Hub (ops/README.md, "Stand-in bases"):
# the recipe needs `python` with the venv module on PATH, nothing else.
ARG PYTHON_VERSION=3.12
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# The venv stays owned by root: the running process cannot modify its own code.
RUN python -m venv /opt/venv

# The project from the build context (filtered by .dockerignore); the rw bind mount lets
# setuptools write its build files without them landing in a layer.
RUN --mount=type=bind,source=.,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install "/src[monitor,gateway,otel]"

# /data holds Flower's state (--persistent --db=/data/flower.db); the named volume that
# docker-compose.yml mounts there starts with this ownership.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin vq \
    && mkdir -p /data \
    && chown vq:vq /data
USER vq
WORKDIR /home/vq

# No HEALTHCHECK here: the image also runs one-shot producer commands. docker-compose.yml
# gives Flower one (GET /healthcheck).
HEALTHCHECK NONE
CMD ["producer", "--help"]

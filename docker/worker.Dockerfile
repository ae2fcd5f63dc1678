# syntax=docker/dockerfile:1
# voxeldose GPU Ray worker: CUDA 12 runtime + CuPy (cupy-cuda12x), joins the Ray head at $RAY_ADDRESS.
#
#   docker build -f docker/worker.Dockerfile -t voxeldose-worker:0.1.0 .     (from the repository root)
#   docker run --gpus all -e RAY_ADDRESS=head-host:6379 -e RAY_AUTH_MODE=token -e RAY_AUTH_TOKEN=... \
#              -v /srv/voxeldose:/data voxeldose-worker:0.1.0
#
# The host needs an NVIDIA driver for CUDA 12.6 or newer and the NVIDIA Container Toolkit.
# Python comes from uv's standalone CPython builds, at exactly PYTHON_VERSION: it must equal the Python of the API
# image (python:<PYTHON_VERSION>-slim-bookworm in docker/api.Dockerfile), because Ray refuses a node whose Python
# patch version differs from the head's; Ray and everything else are pinned by docker/constraints.txt.
# Base images pinned by tag; pin digests with --build-arg CUDA_IMAGE=...@sha256:<digest> (see api.Dockerfile).
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu22.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.22
ARG PYTHON_VERSION=3.11.13

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_NO_CACHE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv \
 && test "$(/opt/venv/bin/python -c 'import platform; print(platform.python_version())')" = "${PYTHON_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY voxeldose/ voxeldose/
COPY service/ service/
COPY docker/constraints.txt /tmp/constraints.txt
RUN /opt/venv/bin/pip install -c /tmp/constraints.txt "/src[service,gpu]"

FROM ${CUDA_IMAGE}
ARG UID=10001
RUN groupadd --system --gid "${UID}" voxeldose \
 && useradd --system --uid "${UID}" --gid voxeldose --home-dir /home/voxeldose --create-home \
            --shell /usr/sbin/nologin voxeldose \
 && mkdir -p /data /opt/voxeldose \
 && chown voxeldose:voxeldose /data
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY kernels/ /opt/voxeldose/kernels/
COPY docker/healthcheck.py /opt/voxeldose/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VOXELDOSE_DATA_DIR=/data \
    VOXELDOSE_DEVICE=auto \
    VOXELDOSE_KERNEL_DIR=/opt/voxeldose/kernels \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER voxeldose
WORKDIR /home/voxeldose
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["python", "/opt/voxeldose/healthcheck.py", "raylet"]
# `ray start --address=$RAY_ADDRESS --block`; arguments given to `docker run` / compose `command` are appended
# (e.g. --num-gpus=1, --resources='{"...": 1}').
ENTRYPOINT ["/bin/sh", "-c", "exec ray start --address=\"${RAY_ADDRESS:?set RAY_ADDRESS to the Ray head, host:6379}\" --block --disable-usage-stats \"$@\"", "ray-worker"]
CMD []

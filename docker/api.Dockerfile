# syntax=docker/dockerfile:1
# voxeldose API + DICOM node (`voxeldose serve`), CPU only.  docker/compose.yaml also runs the Ray head from it.
#
#   docker build -f docker/api.Dockerfile -t voxeldose:0.1.0 .        (from the repository root)
#
# Base image pinned by tag.  To pin it by digest as well, resolve the digest where you build and pass it:
#   docker buildx imagetools inspect python:3.11.13-slim-bookworm       (the "Digest:" line)
#   docker build --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest> ...
# Ray refuses drivers and nodes whose Python patch version or Ray version differ: this image and
# docker/worker.Dockerfile (PYTHON_VERSION) use the same Python, and both install with docker/constraints.txt
# (tests/ops/test_ops_images.py checks both).  No secrets are baked in: they come from the environment at run time.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY voxeldose/ voxeldose/
COPY service/ service/
COPY docker/constraints.txt /tmp/constraints.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c /tmp/constraints.txt "/src[service]"

FROM ${PYTHON_IMAGE}
ARG UID=10001
RUN groupadd --system --gid "${UID}" voxeldose \
 && useradd --system --uid "${UID}" --gid voxeldose --home-dir /home/voxeldose --create-home \
            --shell /usr/sbin/nologin voxeldose \
 && mkdir -p /data /opt/voxeldose \
 && chown voxeldose:voxeldose /data
COPY --from=build /opt/venv /opt/venv
COPY kernels/ /opt/voxeldose/kernels/
COPY docker/healthcheck.py /opt/voxeldose/healthcheck.py
# Settings the container layout fixes; everything else comes from the environment (docs/operations.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VOXELDOSE_DATA_DIR=/data \
    VOXELDOSE_HOST=0.0.0.0 \
    VOXELDOSE_PORT=8000 \
    VOXELDOSE_DICOM_HOST=0.0.0.0 \
    VOXELDOSE_DICOM_PORT=11112 \
    VOXELDOSE_KERNEL_DIR=/opt/voxeldose/kernels
USER voxeldose
WORKDIR /home/voxeldose
VOLUME ["/data"]
EXPOSE 8000 11112
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python", "/opt/voxeldose/healthcheck.py", "http"]
ENTRYPOINT ["voxeldose"]
CMD ["serve"]

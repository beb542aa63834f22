# lm in a container (docs/docker.md). From the repository root:
#   docker build -t lm .                      the CPU image (this file's last stage)
#   docker build --target cuda -t lm:cuda .   the CUDA image (run it with --gpus all)
#   docker run -p 23333:23333 -v "$PWD/workspace:/models/ws" -v lm-cache:/cache lm serve api_server /models/ws
ARG PYTHON=3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0

# The builders: a C compiler for the native CPU kernels, built here for fixed instruction sets (lmcli/kernels/
# prebuilt.py) since the images have no compiler; the package and its dependencies in a venv the images copy.
FROM python:${PYTHON} AS builder
# hadolint ignore=DL3008 # Debian's current gcc: pinning a version breaks the build at its next security update
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md /src/
COPY lmcli /src/lmcli

FROM builder AS build-cpu
ARG TORCH_VERSION
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir /src \
    && python -m lmcli.kernels.prebuilt /opt/lmcli/kernels

# PyPI's Linux torch is the CUDA build, its CUDA libraries in nvidia-* wheels: no CUDA base image (it would hold
# them twice); the driver comes from the host (--gpus all).
FROM builder AS build-cuda
ARG TORCH_VERSION
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir /src \
    && python -m lmcli.kernels.prebuilt /opt/lmcli/kernels

# What both images share: a user that is not root, the caches under one volume, the health check; no compiler.
FROM python:${PYTHON} AS runtime
# libgomp1: the OpenMP runtime the native kernels are linked to
# hadolint ignore=DL3008 # as above
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --user-group lm \
    && mkdir /cache \
    && chown lm:lm /cache
# LMCLI_CACHE: what lm fetches (the default model) or compiles where it can; HF_HOME: the Hugging Face hub's
# downloads (lm convert MODEL_ID); both on the /cache volume, kept across containers.
ENV PATH=/opt/venv/bin:$PATH \
    LMCLI_KERNELS_DIR=/opt/lmcli/kernels \
    LMCLI_CACHE=/cache/lmcli \
    HF_HOME=/cache/huggingface \
    LMCLI_HEALTHCHECK_URL=http://127.0.0.1:23333/health
VOLUME /cache
WORKDIR /home/lm
EXPOSE 23333
# python, not curl (the image has none): exits 0 once /health says 200 (it says 503 while the model loads)
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen(os.environ['LMCLI_HEALTHCHECK_URL'], timeout=8)"]
# `lm` with docker run's arguments; a leading `lm` is dropped, so that `docker run IMAGE lm serve api_server ...`
# works as LMDeploy's image takes `lmdeploy serve api_server ...`
ENTRYPOINT ["/bin/sh", "-c", "if [ \"$1\" = lm ]; then shift; fi; exec lm \"$@\"", "lm"]
CMD ["--help"]

# Triton compiles a small C module against libcuda at its first use on the GPU, so this image keeps gcc.
FROM runtime AS cuda
# hadolint ignore=DL3008 # as above
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cuda /opt/venv /opt/venv
COPY --from=build-cuda /opt/lmcli/kernels /opt/lmcli/kernels
ENV TRITON_CACHE_DIR=/cache/triton \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000

FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=build-cpu /opt/lmcli/kernels /opt/lmcli/kernels
USER 1000

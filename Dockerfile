# wsiseg with a CUDA build of PyTorch:      docker build -t wsiseg .
# CPU only (smaller, no NVIDIA runtime):    docker build --build-arg VARIANT=cpu -t wsiseg:cpu .
# Run:  docker run --gpus all -v /data/slides:/slides:ro -v /data/results:/results wsiseg run /slides -o /results --device cuda
ARG VARIANT=cuda

# torch 2.13.0 from PyPI is the CUDA 13 build (it brings its own CUDA libraries; the host needs an NVIDIA driver >= 580)
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04 AS base-cuda
ENV WSISEG_TORCH="torch==2.13.0" \
    WSISEG_TORCH_INDEX="https://pypi.org/simple"

FROM ubuntu:24.04 AS base-cpu
ENV WSISEG_TORCH="torch==2.13.0+cpu" \
    WSISEG_TORCH_INDEX="https://download.pytorch.org/whl/cpu"

# One of the two stages above (both pinned); hadolint cannot see through the variable.
# hadolint ignore=DL3006
FROM base-${VARIANT}
# NUMBA_CACHE_DIR: wsiseg's compiled kernels, built into the image (below) so runs load them
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/wsiseg/bin:$PATH \
    NUMBA_CACHE_DIR=/opt/wsiseg/numba-cache

# The base image's tag pins the Ubuntu release; its archive keeps only the current package versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# torch first (pinned in the stage's WSISEG_TORCH), from its own index, so wsiseg's torch>=2.1 is
# already met; then wsiseg from the build context.
# hadolint ignore=DL3013
RUN --mount=type=bind,source=.,target=/src,rw \
    python3 -m venv /opt/wsiseg \
    && pip install --no-cache-dir --index-url "$WSISEG_TORCH_INDEX" "$WSISEG_TORCH" \
    && pip install --no-cache-dir /src \
    && wsiseg --version \
    && python -c "from wsiseg.compiled import warm_up; warm_up()"

RUN useradd --create-home --uid 10001 wsiseg \
    && mkdir -p /slides /results \
    && chown 10001:10001 /results \
    && chown -R 10001:10001 /opt/wsiseg/numba-cache
USER 10001:10001
WORKDIR /results
VOLUME ["/slides", "/results"]
ENTRYPOINT ["wsiseg"]
CMD ["--help"]

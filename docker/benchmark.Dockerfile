# syntax=docker/dockerfile:1
# Benchmark stage for TPU or GPU nodes; ACCELERATOR picks JAX's backend wheels:
#   docker build -f docker/benchmark.Dockerfile --build-arg ACCELERATOR=tpu -t REGISTRY/benchmark:TAG .
#   docker build -f docker/benchmark.Dockerfile --build-arg ACCELERATOR=gpu -t REGISTRY/benchmark-gpu:TAG .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG ACCELERATOR=tpu
# Where torch's CPU build comes from; docker/build-local.sh points it at a local copy on a closed network.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/constraints.txt ./docker/
COPY jobs ./jobs
# jax[tpu] brings libtpu; jax[cuda12] brings the CUDA libraries as wheels (the node provides only the driver).
# torch (for importing the demo GGUF model) comes from the CPU index: its CUDA wheel is unused weight.
RUN case "$ACCELERATOR" in \
      tpu) backend="jax[tpu]" ;; \
      gpu) backend="jax[cuda12]" ;; \
      cpu) backend="jax" ;; \
      *) echo "ACCELERATOR must be tpu, gpu or cpu, got $ACCELERATOR" >&2; exit 2 ;; \
    esac \
    && pip install --extra-index-url "$TORCH_INDEX" --constraint docker/constraints.txt ".[benchmark]" "$backend"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp KERAS_BACKEND=jax
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin stage
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["python", "-m", "jobs.benchmark"]

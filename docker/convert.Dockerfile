# syntax=docker/dockerfile:1
# Convert stage (CPU): keras-hub export on the torch backend, plus transformers and a CPU build of torch for the parity check.
#   docker build -f docker/convert.Dockerfile -t REGISTRY/convert:TAG .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Where torch's CPU build comes from; docker/build-local.sh points it at a local copy on a closed network.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/constraints.txt ./docker/
COPY jobs ./jobs
# torch from the CPU index: PyPI's Linux wheel bundles CUDA (several GB) that this stage never uses.
RUN pip install --extra-index-url "$TORCH_INDEX" --constraint docker/constraints.txt ".[convert]"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp KERAS_BACKEND=torch
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin stage
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["python", "-m", "jobs.convert"]

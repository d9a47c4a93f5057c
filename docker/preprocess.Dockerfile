# syntax=docker/dockerfile:1
# Preprocess stage (CPU). Build from the repository root:
#   docker build -f docker/preprocess.Dockerfile -t REGISTRY/preprocess:TAG .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/constraints.txt ./docker/
COPY jobs ./jobs
# Only this stage's extra: no torch, no transformers (the demo tokenizer is read from GGUF metadata).
RUN pip install --constraint docker/constraints.txt ".[preprocess]"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp KERAS_BACKEND=jax
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin stage
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["python", "-m", "jobs.preprocessing"]

# syntax=docker/dockerfile:1
# Preprocessing on Dataflow (the Beam engine): one image that is both the Flex Template launcher and the workers'
# SDK container, so launcher and workers run the same code and pins. Build from the repository root:
#   docker build -f docker/preprocess-beam.Dockerfile -t REGISTRY/preprocess-beam:TAG .
# then `gcloud dataflow flex-template build` with docker/preprocess-beam.metadata.json (docker/cloudbuild.yaml does both).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG BEAM_SDK_IMAGE=apache/beam_python3.11_sdk:2.77.0
# The newest Python 3.11 launcher release this project has seen published (tags are immutable releases; pin its
# digest with --build-arg LAUNCHER_IMAGE=...@sha256:...). Only the launcher binary is copied from it.
ARG LAUNCHER_IMAGE=gcr.io/dataflow-templates-base/python311-template-launcher-base:flex_templates_base_image_release_20240628_RC00

FROM ${BEAM_SDK_IMAGE} AS sdk
FROM ${LAUNCHER_IMAGE} AS launcher

FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The workers' boot program (from Beam's SDK image, same Beam version) and the Flex Template launcher.
COPY --from=sdk /opt/apache/beam /opt/apache/beam
COPY --from=launcher /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/constraints-beam.txt ./docker/
COPY jobs ./jobs
# Installed, not editable: the workers import jobs.* from site-packages. Beam's own pins, not docker/constraints.txt.
RUN pip install --constraint docker/constraints-beam.txt ".[beam]" && pip check \
    && printf 'import runpy\nrunpy.run_module("jobs.preprocessing.beam", run_name="__main__")\n' > /src/launch.py \
    && mkdir -p /var/log/dataflow/template_launcher /var/opt/google /home/beam \
    && chown -R 1000:1000 /var/log/dataflow /var/opt/google /home/beam
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/src/launch.py HOME=/home/beam
# Non-root, as the stage images: the launcher writes its log under /var/log/dataflow and the workers' boot program
# its state under /var/opt/google, both made the user's above.
USER 1000:1000
# The workers start with Beam's boot program; Dataflow runs the Flex Template launcher by its path.
ENTRYPOINT ["/opt/apache/beam/boot"]

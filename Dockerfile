# syntax=docker/dockerfile:1
#
# One image for every service of oa-machine: the entry point is the `oa-machine` console
# script, and the service is its first argument (`webhook`, `worker`, `dequeuer`, `scheduler`,
# `up`, `migrate`, `process-one`). GDAL, PROJ and GEOS come inside the pyogrio, pyproj and
# shapely wheels, so the image installs no system GDAL.
#
#   docker build -t oa-machine .
#   docker run --rm oa-machine --help

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: resolve nothing, install exactly what uv.lock says -------------------------------
FROM ${PYTHON_IMAGE} AS builder

RUN pip install --no-cache-dir uv==0.13.8

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app

# Dependencies first, in their own layer, so that a code change does not reinstall them.
# --frozen: use uv.lock as it is and fail rather than re-resolve; --no-dev: no test tools.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project

# Then the project itself, as a regular (non-editable) install into the same venv, so that
# the runtime stage needs /app/.venv and nothing else.
COPY shared ./shared
COPY services ./services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# --- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG APP_UID=10001
RUN groupadd --system --gid ${APP_UID} oa \
 && useradd --system --uid ${APP_UID} --gid oa --home-dir /var/lib/oa-machine \
        --shell /usr/sbin/nologin oa \
 && mkdir -p /var/lib/oa-machine/work /var/lib/oa-machine/storage \
 && chown -R oa:oa /var/lib/oa-machine

COPY --from=builder /app/.venv /app/.venv

# Container defaults; every one can be overridden by the environment (see .env.example).
# HTTP_HOST: listen on all interfaces, not loopback, so that probes and the Service reach it.
ENV PATH=/app/.venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080 \
    LOG_FORMAT=json \
    WORK_DIR=/var/lib/oa-machine/work \
    STORAGE_URL=file:///var/lib/oa-machine/storage

WORKDIR /var/lib/oa-machine
USER ${APP_UID}:${APP_UID}
EXPOSE 8080

# The process is PID 1: it must handle SIGTERM itself (the worker hands back its current run).
# docker compose adds `init: true`; Kubernetes sends SIGTERM straight to it.
ENTRYPOINT ["oa-machine"]
CMD ["up"]

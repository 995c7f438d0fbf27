# The bridge and its Kite simulator in one image (docs/docker.md):
#   docker build -t kite-redis-bridge .            # `bridge run` by default
#   docker run --rm kite-redis-bridge simulate     # the simulator instead
# Builds with or without BuildKit, so no RUN --mount or heredocs.

# The base image is an argument so air-gapped builds can point it at a mirror. Both stages use
# it: the venv built in the first is only valid next to the same interpreter. Only `python3` on
# PATH is assumed (official images have it in /usr/local/bin, Debian's in /usr/bin).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

# Package index settings, for builds behind a mirror; empty means pip's own defaults. Only the
# builder sees them, so none reach the runtime image.
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
RUN python3 -m venv /opt/venv

# Dependencies first, from the pinned lock, so source edits do not re-download them.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir -r requirements.lock

COPY pyproject.toml README.md ./
COPY bridge ./bridge
# A wheel, not an in-place install, so the venv holds no reference to /src. The constraints make
# any dependency the lock does not pin stand out in `pip check` rather than drift silently.
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-cache-dir -c requirements.lock /tmp/wheels/*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && /opt/venv/bin/bridge --version


FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed numeric id, so `runAsNonRoot` policies and volume ownership can rely on it.
RUN groupadd --gid 10001 bridge \
    && useradd --uid 10001 --gid bridge --no-log-init --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin bridge

COPY --from=builder /opt/venv /opt/venv

# The working directory is where `bridge run` looks for `.env` and `config/bridge.toml`: mount
# them here read-only if wanted. Nothing is written to it.
WORKDIR /app
USER 10001:10001

# 9100: /healthz, /readyz, /metrics (BRIDGE_HTTP_PORT); 8765: `bridge simulate`.
EXPOSE 9100 8765

# `bridge health` reads <ns>:status in Redis: no HTTP client needed in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bridge", "health"]

# Exec form, so the bridge itself gets SIGTERM and drains (CONTRACT §6) instead of a shell.
STOPSIGNAL SIGTERM
ENTRYPOINT ["bridge"]
CMD ["run"]

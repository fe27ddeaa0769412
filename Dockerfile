# syntax=docker/dockerfile:1
# hlsrelay container image.
#   build:   wheels of hlsrelay and every dependency (no compiler or pip cache in the runtime)
#   runtime: python slim + Debian ffmpeg, non-root (uid 10001), HEALTHCHECK on /healthz
# docker build -t hlsrelay .   (deploy/docker-compose.yml runs two of these behind nginx)

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm AS runtime
# ffmpeg from Debian for the live pipeline (imageio-ffmpeg's bundled binary is the fallback).
# Not pinned to a version: bookworm's security updates must reach the image on rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 hlsrelay \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home hlsrelay \
    && mkdir -p /app/var \
    && chown 10001:10001 /app/var
# The wheels are bind-mounted from the build stage: they never become a layer of the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/hlsrelay-*.whl
WORKDIR /app
COPY config ./config
USER 10001:10001
# SECRET_FILE is a path, not a secret: the generated key is written there (mount a volume on
# /app/var, or set HLSRELAY_SECURITY__SECRET, so every instance shares one key).
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HLSRELAY_SERVER__HOST=0.0.0.0 \
    HLSRELAY_SERVER__PORT=8080 \
    HLSRELAY_SERVER__LOG_FORMAT=json \
    HLSRELAY_SECURITY__SECRET_FILE=/app/var/secret
EXPOSE 8080
# Liveness only (/healthz): /readyz turns 503 while draining on SIGTERM, which must not get the
# container killed. Port and base path follow the same environment the server reads.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; port = os.environ.get('HLSRELAY_SERVER__PORT', '8080'); base = os.environ.get('HLSRELAY_SERVER__BASE_PATH', ''); sys.exit(0 if u.urlopen(f'http://127.0.0.1:{port}{base}/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["hlsrelay"]
CMD ["serve", "--config", "/app/config/hlsrelay.toml"]

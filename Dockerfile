# hlsrelay container image. Multi-stage: build a wheel, install it into a slim runtime.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir build==1.2.2 && python -m build --wheel --outdir /dist

FROM python:3.11-slim
# ffmpeg from Debian for the live pipeline (imageio-ffmpeg's bundled binary is the fallback).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl \
    && useradd --system --uid 10001 --home-dir /app hlsrelay \
    && mkdir -p /app/var && chown hlsrelay /app/var
WORKDIR /app
COPY config ./config
USER hlsrelay
ENV HLSRELAY_SERVER__HOST=0.0.0.0 \
    HLSRELAY_SECURITY__SECRET_FILE=/app/var/secret
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["hlsrelay"]
CMD ["serve", "--config", "/app/config/hlsrelay.toml"]

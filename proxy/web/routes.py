"""The URL map, in one place; every route is named (the names label metrics and logs)."""

from __future__ import annotations

from aiohttp import web

from proxy.web import api, health, streams


def setup_routes(app: web.Application, base_path: str) -> None:
    r = app.router
    r.add_get(f"{base_path}/s/{{ctx}}/{{ref}}/{{name}}", streams.stream, name="stream")
    r.add_post(f"{base_path}/api/v1/streams", api.create_stream, name="api_streams")
    r.add_get(f"{base_path}/proxy.m3u8", api.proxy_m3u8, name="proxy_m3u8")
    r.add_get(f"{base_path}/healthz", health.healthz, name="healthz")
    r.add_get(f"{base_path}/readyz", health.readyz, name="readyz")
    r.add_get(f"{base_path}/metrics", health.metrics, name="metrics")

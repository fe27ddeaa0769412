"""The URL map, in one place; every route is named (the names label metrics and logs)."""

from __future__ import annotations

from aiohttp import web

from proxy.web import api, channels, health, live, streams


def setup_routes(app: web.Application, base_path: str) -> None:
    r = app.router
    r.add_get(f"{base_path}/s/{{ctx}}/{{ref}}/{{name}}", streams.stream, name="stream")
    r.add_post(f"{base_path}/api/v1/streams", api.create_stream, name="api_streams")
    r.add_get(f"{base_path}/proxy.m3u8", api.proxy_m3u8, name="proxy_m3u8")
    r.add_get(f"{base_path}/healthz", health.healthz, name="healthz")
    r.add_get(f"{base_path}/readyz", health.readyz, name="readyz")
    r.add_get(f"{base_path}/metrics", health.metrics, name="metrics")
    r.add_get(f"{base_path}/live/{{channel}}.ts", live.raw_ts, name="live_ts")
    r.add_get(f"{base_path}/live/{{channel}}/index.m3u8", live.playlist, name="live_playlist")
    r.add_get(f"{base_path}/live/{{channel}}/{{segment}}", live.segment, name="live_segment")
    r.add_get(f"{base_path}/channels.m3u", channels.channels_m3u, name="channels_m3u")
    r.add_get(f"{base_path}/api/v1/channels", channels.channels_json, name="api_channels")

"""``GET /channels.m3u`` and ``GET /api/v1/channels``: the channel list, every URL through us.

Thin: the catalog knows the channels, the live pool knows what is playing; this joins them.
"""

from __future__ import annotations

from aiohttp import web

from proxy.channels.m3u import format_m3u
from proxy.channels.model import Channel
from proxy.web.keys import CHANNELS, SETTINGS
from proxy.web.live import live_state

M3U_CONTENT_TYPE = "audio/x-mpegurl"
# Attributes that point players straight at the provider (often with its credentials in the
# URL) and would bypass the proxy: not repeated in the list hlsrelay hands out.
_PROVIDER_ATTRIBUTES = frozenset({"catchup-source"})


def public_base(request: web.Request) -> str:
    """Absolute URL prefix of this proxy as players reach it (public_url, else the request's)."""
    server = request.app[SETTINGS].server
    if server.public_url:
        return str(server.public_url).rstrip("/") + server.base_path
    return f"{request.scheme}://{request.host}{server.base_path}"


def channel_urls(base: str, channel: Channel) -> tuple[str, str]:
    """The (HLS playlist, raw TS) URLs of a channel through the proxy."""
    return f"{base}/live/{channel.id}/index.m3u8", f"{base}/live/{channel.id}.ts"


async def channels_m3u(request: web.Request) -> web.Response:
    as_ts = request.query.get("format", "hls").lower() == "ts"
    base = public_base(request)
    items = []
    for channel in request.app[CHANNELS].all():
        hls_url, ts_url = channel_urls(base, channel)
        attributes = [
            (k, v) for k, v in channel.attributes if k.lower() not in _PROVIDER_ATTRIBUTES
        ]
        names = {k.lower() for k, _ in attributes}
        if "tvg-id" not in names:
            attributes.insert(0, ("tvg-id", channel.id))
        if channel.group and "group-title" not in names:
            attributes.append(("group-title", channel.group))
        # An HLS channel has no raw-TS form: it stays HLS in the TS list too.
        use_ts = as_ts and channel.kind != "hls"
        items.append((channel.name, attributes, ts_url if use_ts else hls_url))
    body = format_m3u(items)
    return web.Response(
        text=body,
        headers={
            "Content-Type": M3U_CONTENT_TYPE,
            "Content-Disposition": 'inline; filename="channels.m3u"',
            "Cache-Control": "no-cache",
        },
    )


async def channels_json(request: web.Request) -> web.Response:
    base = public_base(request)
    out = []
    for channel in request.app[CHANNELS].all():
        hls_url, ts_url = channel_urls(base, channel)
        state, viewers = live_state(request.app, channel.id)
        out.append(
            {
                "id": channel.id,
                "name": channel.name,
                "logo": channel.logo or None,
                "group": channel.group or None,
                "kind": channel.kind,
                "playlist_url": hls_url,
                "ts_url": ts_url,
                "state": state,
                "viewers": viewers,
            }
        )
    return web.json_response({"channels": out}, headers={"Cache-Control": "no-cache"})

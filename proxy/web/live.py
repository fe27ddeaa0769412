"""``/live/{channel}/index.m3u8``, ``/live/{channel}/{segment}``, ``/live/{channel}.ts``.

Thin: find the channel in the catalog, hand the live pool a plain
:class:`~proxy.live.source.LiveSource`, shape the response.

An ``hls`` channel is not re-segmented: its playlist URL answers 302 to the channel's proxied
URL (``/s/{ctx}/{ref}/index.m3u8``, minted with the channel's headers). Tokens are
deterministic, so the redirect target is the same for every viewer and reload: edge caches
and the core's single-flight see one URL per channel, relative URIs in the rewritten playlist
resolve against the ``/s/`` URL as for any proxied stream, and no code path is duplicated.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from aiohttp import web

from proxy.channels.model import Channel
from proxy.errors import BadRequest, NotFound
from proxy.live.source import LiveSource
from proxy.upstream.relay import PLAYLIST_CONTENT_TYPE
from proxy.web.keys import CHANNELS, LIVE, METRICS, RELAY, SETTINGS

log = logging.getLogger("hlsrelay.live")

TS_CONTENT_TYPE = "video/mp2t"
# A raw-TS viewer whose socket accepts nothing for this long is cut.
_VIEWER_WRITE_TIMEOUT_SECONDS = 15.0


def live_state(app: web.Application, channel_id: str) -> tuple[str, int]:
    return app[LIVE].state(channel_id)


def live_source(channel: Channel) -> LiveSource:
    return LiveSource(
        channel_id=channel.id,
        urls=(channel.url, *channel.backup_urls),
        headers=channel.headers,
        metric_label=channel.id if channel.from_config else "other",
    )


async def _channel(request: web.Request, channel_id: str) -> Channel:
    channel = request.app[CHANNELS].get(channel_id)
    if channel is None:
        raise NotFound("no such channel")
    return await request.app[CHANNELS].resolve_kind(channel)


def _viewer_key(request: web.Request) -> str:
    # Who is watching, for counting only: never logged, never stored beyond two target durations.
    raw = f"{request.remote}|{request.headers.get('User-Agent', '')}"
    return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()


async def playlist(request: web.Request) -> web.StreamResponse:
    channel = await _channel(request, request.match_info["channel"])
    if channel.kind == "hls":
        relay = request.app[RELAY]
        location = relay.prefix + relay.mint(channel.url, channel.header_map)
        raise web.HTTPFound(location=location, headers={"Cache-Control": "no-cache"})
    session = await request.app[LIVE].acquire(live_source(channel))
    session.touch_hls(_viewer_key(request))
    body = await session.playlist()
    max_age = max(1, int(session.target_duration // 2))
    return web.Response(
        body=body,
        headers={"Content-Type": PLAYLIST_CONTENT_TYPE, "Cache-Control": f"max-age={max_age}"},
    )


async def segment(request: web.Request) -> web.StreamResponse:
    channel_id = request.match_info["channel"]
    name = request.match_info["segment"]
    stem, _, ext = name.partition(".")
    if ext != "ts" or not stem.isdigit() or len(stem) > 18:
        raise NotFound("no such segment")
    session = request.app[LIVE].session(channel_id)
    if session is None:
        raise NotFound("the channel is not playing")
    found = session.segment(int(stem))
    session.touch_hls(_viewer_key(request))
    settings = request.app[SETTINGS].live
    request.app[METRICS].relayed("live_segment").inc(len(found.data))
    return web.Response(
        body=found.data,
        headers={
            "Content-Type": TS_CONTENT_TYPE,
            # Sequence numbers start from the wall clock, so a URL is not reused for a while,
            # but not forever: no "immutable".
            "Cache-Control": f"max-age={int(settings.window_segments * settings.segment_seconds)}",
        },
    )


async def raw_ts(request: web.Request) -> web.StreamResponse:
    channel = await _channel(request, request.match_info["channel"])
    if channel.kind == "hls":
        raise BadRequest("this channel is HLS: play /live/{id}/index.m3u8")
    session = await request.app[LIVE].acquire(live_source(channel))
    subscription = session.subscribe_ts()
    metrics = request.app[METRICS]
    sent = 0
    try:
        await session.wait_source()
        response = web.StreamResponse(
            headers={"Content-Type": TS_CONTENT_TYPE, "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        while (chunk := await subscription.get()) is not None:
            try:
                async with asyncio.timeout(_VIEWER_WRITE_TIMEOUT_SECONDS):
                    await response.write(chunk)
            except TimeoutError:
                break
            sent += len(chunk)
        if subscription.dropped:
            metrics.live_viewers_dropped.labels(session.source.metric_label).inc()
        # The stream ended (session stopped, or this viewer fell behind): cut the connection,
        # a clean end would look like the channel ended.
        if request.transport is not None:
            request.transport.close()
        return response
    finally:
        subscription.close()
        session.ts_viewer_left()
        metrics.relayed("live_ts").inc(sent)

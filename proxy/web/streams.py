"""``GET|HEAD /s/{ctx}/{ref}/{name}``: a proxied playlist, segment, key or init section."""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.errors import UpstreamError
from proxy.hls.kinds import UriKind
from proxy.upstream.relay import PLAYLIST_CONTENT_TYPE, MediaStream, RewrittenPlaylist
from proxy.web.keys import METRICS, RELAY

log = logging.getLogger("hlsrelay.streams")

# Upstream response headers a viewer gets for media, as they came.
_MEDIA_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Encoding",
    "Accept-Ranges",
    "Last-Modified",
    "ETag",
)

# Headers that describe the body as the upstream encoded it; wrong once it was decompressed.
_ENCODED_BODY_HEADERS = frozenset({"Content-Length", "Content-Range", "Content-Encoding"})


async def stream(request: web.Request) -> web.StreamResponse:
    relay = request.app[RELAY]
    result = await relay.fetch(
        request.match_info["ctx"],
        request.match_info["ref"],
        method=request.method,
        query_string=request.rel_url.raw_query_string,
        viewer_headers=request.headers,
    )
    if isinstance(result, RewrittenPlaylist):
        request.app[METRICS].playlists_rewritten.inc()
        return web.Response(
            body=result.body,
            headers={"Content-Type": PLAYLIST_CONTENT_TYPE},
        )
    return await _relay_media(request, result)


async def _relay_media(request: web.Request, media: MediaStream) -> web.StreamResponse:
    upstream = media.upstream
    response = web.StreamResponse(status=upstream.status)
    for name in _MEDIA_HEADERS:
        if upstream.decoded and name in _ENCODED_BODY_HEADERS:
            continue
        value = upstream.headers.get(name)
        if value is not None:
            response.headers[name] = value
    ref_kind = media.kind
    if ref_kind is UriKind.KEY:
        response.headers["Cache-Control"] = "private, no-store"
    kind_label = ref_kind.name.lower()
    sent = 0
    async with upstream:
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        try:
            if media.head:
                await response.write(media.head)
                sent += len(media.head)
            async for chunk in upstream.iter_chunks():
                # write() waits for the socket to drain: a slow viewer slows its own upstream read.
                await response.write(chunk)
                sent += len(chunk)
        except UpstreamError as exc:
            # Bytes already went out: the only honest signal left is a cut connection, never a
            # short body that looks complete.
            log.warning("upstream failed mid-body after %d bytes: %s", sent, exc.message)
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            request.app[METRICS].bytes_out.labels(kind_label).inc(sent)
        await response.write_eof()
    return response

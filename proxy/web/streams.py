"""``GET|HEAD /s/{ctx}/{ref}/{name}``: a proxied playlist, segment, key or init section.

Response shaping only: the relay decides where the bytes come from (store, a shared upstream
body, or an upstream response of this viewer's own). Here they get their headers: the cache
policy's ``Cache-Control``, ``Age`` when served from the store, ``ETag``/``Last-Modified`` with
``304`` on conditional requests, gzip for playlists when the viewer accepts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

from aiohttp import web
from multidict import CIMultiDict

from proxy.cache.store import CachedObject
from proxy.errors import UpstreamError, UpstreamStatus
from proxy.hls.cache_policy import PolicyLimits, media_freshness, not_found_freshness
from proxy.upstream.relay import (
    MEDIA_RESPONSE_HEADERS,
    CachedMedia,
    MediaStream,
    RewrittenPlaylist,
    SharedMedia,
)
from proxy.web.errors import json_error
from proxy.web.keys import METRICS, RELAY

log = logging.getLogger("hlsrelay.streams")

# Headers that describe the body as the upstream encoded it; wrong once it was decompressed.
_ENCODED_BODY_HEADERS = frozenset({"Content-Length", "Content-Range", "Content-Encoding"})
_GZIP_ETAG_SUFFIX = '-gz"'
# A shared body's first write per viewer: small, so that a crowd waiting on one segment all get
# their first bytes (and headers, in the same segment) before anyone gets the bulk.
FIRST_WRITE_BYTES = 4 * 1024
# Headers a 304 repeats (RFC 9110 §15.4.5); never a body or its length.
_NOT_MODIFIED_HEADERS = ("Cache-Control", "ETag", "Last-Modified", "Vary", "Age")


async def stream(request: web.Request) -> web.StreamResponse:
    relay = request.app[RELAY]
    try:
        result = await relay.fetch(
            request.match_info["ctx"],
            request.match_info["ref"],
            method=request.method,
            query_string=request.rel_url.raw_query_string,
            viewer_headers=request.headers,
        )
    except UpstreamStatus as exc:
        if exc.status in (404, 410):
            # Maybe a live segment that is not there yet: edges may keep the answer a second.
            return json_error(
                exc.status,
                exc.code,
                exc.message,
                {"Cache-Control": not_found_freshness().cache_control},
            )
        raise
    if isinstance(result, RewrittenPlaylist):
        if result.result in ("miss", "uncached"):  # hits and followers reuse one rewrite
            request.app[METRICS].playlists_rewritten.inc()
        answer = _from_entry(request, result.entry, from_cache=result.from_cache)
        if request.method == "GET" and isinstance(answer.body, bytes):
            # Bytes out include playlists (gzip'd when the viewer took it so): what went out.
            request.app[METRICS].relayed("playlist").inc(len(answer.body))
        return answer
    if isinstance(result, CachedMedia):
        response = _from_entry(request, result.entry, from_cache=True, byte_range=result.byte_range)
        if request.method == "GET" and response.status in (200, 206):
            sent = len(response.body) if isinstance(response.body, bytes) else 0
            request.app[METRICS].relayed(result.kind.name.lower()).inc(sent)
        return response
    if isinstance(result, SharedMedia):
        return await _relay_shared(request, result)
    return await _relay_media(request, result, relay.limits)


# -- answers from a stored (or just stored) entry ------------------------------------------------


def _accepts_gzip(request: web.Request) -> bool:
    for item in request.headers.get("Accept-Encoding", "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            quality = params.strip().lower().removeprefix("q=").strip()
            return quality not in ("0", "0.0", "0.00", "0.000")
    return False


def _bare_etag(tag: str) -> str:
    tag = tag.strip().removeprefix("W/")
    return tag.replace(_GZIP_ETAG_SUFFIX, '"')


def _etag_matches(if_none_match: str, etag: str) -> bool:
    if if_none_match.strip() == "*":
        return True
    wanted = _bare_etag(etag)
    return any(_bare_etag(tag) == wanted for tag in if_none_match.split(","))


def _not_modified(request: web.Request, entry: CachedObject) -> bool:
    if_none_match = request.headers.get("If-None-Match")
    etag = entry.header("ETag")
    if if_none_match is not None:
        # If-None-Match wins over If-Modified-Since (RFC 9110 §13.1.3).
        return etag is not None and _etag_matches(if_none_match, etag)
    since = request.if_modified_since
    last_modified = entry.header("Last-Modified")
    if since is None or last_modified is None:
        return False
    try:
        return parsedate_to_datetime(last_modified) <= since
    except (TypeError, ValueError):
        return False


def _from_entry(
    request: web.Request,
    entry: CachedObject,
    *,
    from_cache: bool,
    byte_range: tuple[int, int] | None = None,
) -> web.Response:
    headers: CIMultiDict[str] = CIMultiDict(entry.headers)
    if from_cache:
        headers["Age"] = str(int(entry.age()))
    if _not_modified(request, entry):
        kept = CIMultiDict((k, v) for k, v in headers.items() if k in _NOT_MODIFIED_HEADERS)
        return web.Response(status=304, headers=kept)
    if byte_range is not None:
        start, stop = byte_range
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(entry.body)}"
        return web.Response(status=206, body=entry.body[start:stop], headers=headers)
    body = entry.body
    if entry.gzip_body and _accepts_gzip(request):
        body = entry.gzip_body
        headers["Content-Encoding"] = "gzip"
        etag = headers.get("ETag")
        if etag is not None and etag.endswith('"'):
            # A strong validator names one representation: the gzip'd one gets its own.
            headers["ETag"] = etag[:-1] + _GZIP_ETAG_SUFFIX
    return web.Response(body=body, headers=headers)


# -- bytes as they arrive ---------------------------------------------------------------------


def _media_headers(headers: Mapping[str, str], decoded: bool) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name in MEDIA_RESPONSE_HEADERS:
        if decoded and name in _ENCODED_BODY_HEADERS:
            continue
        value = headers.get(name)
        if value is not None:
            out[name] = value
    return out


class _HeadersWithFirstBytes(web.StreamResponse):
    # aiohttp's own switch (web.Response sets it too): the headers go out with the first body
    # write, one syscall instead of two per viewer when a crowd is released at once.
    _send_headers_immediately = False


async def _relay_shared(request: web.Request, media: SharedMedia) -> web.StreamResponse:
    """Stream a body shared with other viewers, chunk by chunk as the upstream sends it."""
    reader = media.reader
    response = _HeadersWithFirstBytes(status=media.head.status)
    for name, value in media.head.headers:
        if not name.startswith("X-Hlsrelay-"):
            response.headers[name] = value
    sent = 0
    try:
        await response.prepare(request)
        async for chunk in reader:
            if not sent and len(chunk) > FIRST_WRITE_BYTES:
                # Fairness in a crowd: every waiter woken with this chunk writes its first bytes
                # before anyone writes the rest (sleep(0) puts this one behind the others).
                view = memoryview(chunk)
                await response.write(view[:FIRST_WRITE_BYTES])
                sent += FIRST_WRITE_BYTES
                await asyncio.sleep(0)
                await response.write(view[FIRST_WRITE_BYTES:])
                sent += len(chunk) - FIRST_WRITE_BYTES
                # The view would keep this first chunk alive until the response ends: up to
                # 256 KB per viewer (36-65 MB of the RSS with 500 viewers).
                del view
                continue
            # write() waits for this viewer's socket only; the others read at their own pace.
            await response.write(chunk)
            sent += len(chunk)
    except UpstreamError as exc:
        _cut(request, sent, exc)
        return response
    finally:
        reader.close()
        request.app[METRICS].relayed(media.kind.name.lower()).inc(sent)
    await response.write_eof()
    return response


def _cut(request: web.Request, sent: int, exc: UpstreamError) -> None:
    # Bytes may already have gone out: the only honest signal left is a cut connection, never a
    # short body that looks complete.
    log.warning("upstream failed mid-body after %d bytes: %s", sent, exc.message)
    if request.transport is not None:
        request.transport.close()


async def _relay_media(
    request: web.Request, media: MediaStream, limits: PolicyLimits
) -> web.StreamResponse:
    upstream = media.upstream
    response = web.StreamResponse(status=upstream.status)
    response.headers.extend(_media_headers(upstream.headers, upstream.decoded))
    ref_kind = media.kind
    response.headers["Cache-Control"] = (
        "no-store" if upstream.status >= 400 else media_freshness(ref_kind, limits).cache_control
    )
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
            _cut(request, sent, exc)
            return response
        finally:
            request.app[METRICS].relayed(kind_label).inc(sent)
        await response.write_eof()
    return response

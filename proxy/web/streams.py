"""``GET|HEAD /s/{ctx}/{ref}/{name}``: a proxied playlist, segment, key or init section.

Response shaping only: the relay decides where the bytes come from (store, a shared upstream
body, or an upstream response of this viewer's own, moved socket to socket when it is plain:
:mod:`proxy.splice`). Here they get their headers: the cache
policy's ``Cache-Control``, ``Age`` when served from the store, ``ETag``/``Last-Modified`` with
``304`` on conditional requests, gzip for playlists when the viewer accepts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError
from multidict import CIMultiDict

from proxy import splice
from proxy.cache.inflight import turn_items
from proxy.cache.store import CachedObject
from proxy.errors import UpstreamError, UpstreamStatus
from proxy.hls.cache_policy import PolicyLimits, media_freshness, not_found_freshness
from proxy.turns import TurnBudget, TurnMark
from proxy.upstream.client import UpstreamResponse
from proxy.upstream.relay import (
    MEDIA_RESPONSE_HEADERS,
    CachedMedia,
    MediaStream,
    RewrittenPlaylist,
    SharedMedia,
    ll_hls_query,
)
from proxy.web import crowd
from proxy.web.errors import json_error
from proxy.web.fast_hits import GZIP_ETAG_SUFFIX, accepts_gzip, gzip_etag
from proxy.web.keys import FAST_HITS, METRICS, RELAY, REQUEST_FACTS

log = logging.getLogger("hlsrelay.streams")

# Headers that describe the body as the upstream encoded it; wrong once it was decompressed.
_ENCODED_BODY_HEADERS = frozenset({"Content-Length", "Content-Range", "Content-Encoding"})
# A shared body's first write per viewer: small, so that a crowd waiting on one segment all get
# their first bytes (and headers, in the same segment) before anyone gets the bulk.
FIRST_WRITE_BYTES = 4 * 1024
# What all the viewers of one shared body write together per loop turn after that, split evenly
# (never less than FIRST_WRITE_BYTES each, never more than WRITE_SLICE_BYTES): a turn of 500
# viewers writing 64 KiB each measured 250-500 ms of event-loop lag (bench_peers case 6); 2 MiB a
# turn keeps it to a few ms, and a few viewers still write 64 KiB at a time.
CROWD_TURN_BYTES = 2 * 1024 * 1024
WRITE_SLICE_BYTES = 64 * 1024
# Playlist answers the store holds (fresh) and more than one viewer asked for: the fast path
# gives them from now on. Not after a miss: most playlists asked for once (a VOD opened by one
# viewer) would fill its memo for nothing.
_FAST_HIT_RESULTS = frozenset({"hit", "coalesced"})
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
        return _status_error(exc)
    if isinstance(result, RewrittenPlaylist):
        if result.result in ("miss", "uncached"):  # hits and followers reuse one rewrite
            request.app[METRICS].playlists_rewritten.inc()
        answer = _from_entry(request, result.entry, from_cache=result.from_cache)
        if result.result in _FAST_HIT_RESULTS and not ll_hls_query(
            request.rel_url.raw_query_string
        ):
            # Asked for again: the next requests for this URL are answered by the fast path.
            facts = request.get(REQUEST_FACTS)
            request.app[FAST_HITS].remember(
                request.raw_path,
                result.entry,
                token_expires=result.token_expires,
                upstream_host=facts.upstream_host if facts is not None else "",
            )
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
        try:
            return await _relay_shared(request, result)
        except UpstreamStatus as exc:  # the shared upstream answered so (nothing sent yet)
            return _status_error(exc)
    return await _relay_media(
        request, result, relay.limits, relay.cache.bodies.turn, relay.read_timeout
    )


def _status_error(exc: UpstreamStatus) -> web.Response:
    if exc.status in (404, 410):
        # Maybe a live segment that is not there yet: edges may keep the answer a second.
        return json_error(
            exc.status,
            exc.code,
            exc.message,
            {"Cache-Control": not_found_freshness().cache_control},
        )
    raise exc


# -- answers from a stored (or just stored) entry ------------------------------------------------


def _bare_etag(tag: str) -> str:
    tag = tag.strip().removeprefix("W/")
    return tag.replace(GZIP_ETAG_SUFFIX, '"')


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
    if entry.gzip_body and accepts_gzip(request.headers.get("Accept-Encoding", "")):
        body = entry.gzip_body
        headers["Content-Encoding"] = "gzip"
        etag = headers.get("ETag")
        if etag is not None:
            headers["ETag"] = gzip_etag(etag)
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
    """Stream a body shared with other viewers, chunk by chunk as the upstream sends it.

    One write per loop turn: the first one small, then an upstream chunk, or a slice of it while
    other viewers read the same body. A crowd let go at once (or a late joiner who finds the
    body all there) takes turns, so every viewer gets its first bytes before anyone gets the
    bulk, and nobody holds the loop while it copies a whole body into its socket.
    """
    reader = media.reader
    prepared: web.StreamResponse | None = None
    ahead: crowd.Ahead | None = None
    sent_ahead: tuple[bytes, int] | None = None
    sent = 0

    async def first_bytes(view: memoryview) -> int:
        # Run by the pump with every other waiter's, the moment the first chunk arrives: these
        # headers and first bytes go out in one loop, no task woken per viewer until all have.
        nonlocal prepared, ahead, sent_ahead
        head = reader.known_head
        assert head is not None  # (a chunk comes after the head)
        piece = view[:FIRST_WRITE_BYTES]
        ahead = crowd.ahead_of(request, head)
        if ahead is not None:
            # Headers made from what the crowd shares (web/crowd.py), in one write with the bytes.
            head_block = crowd.head_bytes(request, ahead)
            if not crowd.send_ahead(request, head_block, piece):
                return 0  # the viewer is gone: its own task finds out, as with any answer
            sent_ahead = (head_block, len(piece))
            return len(piece)
        prepared = _HeadersWithFirstBytes(status=head.status, headers=head.headers)
        await prepared.prepare(request)
        await prepared.write(piece)
        return len(piece)

    try:
        sent = await reader.first_bytes(first_bytes)
        if sent_ahead is not None and ahead is not None:
            # Sent before aiohttp prepared the answer: it does now, sending nothing itself.
            prepared = crowd.SentAhead(ahead, *sent_ahead)
            await prepared.prepare(request)
        elif prepared is None:
            # A viewer who found bytes there already (or the body over): its own answer. The
            # upstream's error, if the head never came, is raised here, before any byte.
            head = await reader.head()
            prepared = _HeadersWithFirstBytes(status=head.status, headers=head.headers)
            await prepared.prepare(request)
        response = prepared
        assert response is not None
        async for chunk in reader:
            view = memoryview(chunk)
            while view:
                if not sent and reader.shared:
                    piece = view[:FIRST_WRITE_BYTES]  # first bytes to all before the bulk to any
                elif reader.shared:
                    # A crowd's turns stay short: the more viewers, the smaller each one's slice.
                    share = CROWD_TURN_BYTES // reader.readers
                    piece = view[: max(FIRST_WRITE_BYTES, min(WRITE_SLICE_BYTES, share))]
                else:
                    piece = view  # alone: an upstream chunk per turn costs nothing extra
                # write() waits for this viewer's socket only; the others go at their own pace.
                turn = TurnMark()
                await response.write(piece)
                sent += len(piece)
                view = view[len(piece) :]
                # write() returns without yielding while the socket takes the bytes: without this,
                # 500 viewers of a body that arrived whole would each write 2 MiB in one step, a
                # stall of seconds for everyone else on the loop (health checks, new requests).
                # A write that waited for the socket has let the loop turn already, a reader done
                # with this chunk whose next one is not in yet will wait for it anyway, and one
                # with only the body's end left has nothing more to write: no yield for those (a
                # step less per chunk of a body relayed as it arrives, and per body that came
                # whole: one of the handler's three steps in a 1 KiB relay).
                if not turn.passed() and (view or reader.bytes_ready()):
                    await asyncio.sleep(0)
    except UpstreamError as exc:
        if prepared is None:
            raise  # nothing prepared, nothing sent: the viewer gets the error as an answer
        _cut(request, sent, exc.message)
        return prepared
    finally:
        reader.close()
        request.app[METRICS].relayed(media.kind.name.lower()).inc(sent)
    await response.write_eof()
    return response


def _cut(request: web.Request, sent: int, why: str) -> None:
    # Bytes may already have gone out: the only honest signal left is a cut connection, never a
    # short body that looks complete.
    log.warning("upstream failed mid-body after %d bytes: %s", sent, why)
    if request.transport is not None:
        request.transport.close()


async def _relay_media(
    request: web.Request,
    media: MediaStream,
    limits: PolicyLimits,
    turns: TurnBudget,
    read_timeout: float,
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
            sink = _plain_socket(request, response)
            source = upstream.hand_over() if sink is not None else None
            if source is not None:
                assert sink is not None

                def count(size: int) -> None:
                    nonlocal sent
                    sent += size

                await _move_rest(
                    request, response, upstream, source, sink, turns, read_timeout, count
                )
                await response.write_eof()
                return response
            async for chunk in upstream.iter_chunks():
                # write() waits for the socket to drain: a slow viewer slows its own upstream read.
                turn = TurnMark()
                await response.write(chunk)
                sent += len(chunk)
                # Paced as the shared bodies are (the same turn budget, the same line): unpaced,
                # 64 of these at once (bench_peers' segment relay, every request ranged) held the
                # loop past 50 ms 32 times in 8 rounds against once, for the same throughput.
                if turns.must_wait(turn_items(len(chunk))):
                    turn.passed()  # (drops the mark)
                    await turns.next()
                elif not turn.passed() and upstream.bytes_ready():
                    await asyncio.sleep(0)  # as _relay_shared: a write that waited has yielded
        except UpstreamError as exc:
            _cut(request, sent, exc.message)
            return response
        finally:
            request.app[METRICS].relayed(kind_label).inc(sent)
        await response.write_eof()
    return response


def _plain_socket(request: web.Request, response: web.StreamResponse) -> int | None:
    """The viewer's socket, if the rest of this answer can be moved into it as is (a plain
    connection, a known length, nothing encoded on the way)."""
    transport = request.transport
    if (
        transport is None
        or transport.is_closing()
        or response.chunked
        or response.compression
        or response.content_length is None
        or transport.get_extra_info("sslcontext") is not None
    ):
        return None
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else None


async def _move_rest(
    request: web.Request,
    response: web.StreamResponse,
    upstream: UpstreamResponse,
    source: tuple[int, int],
    sink: int,
    turns: TurnBudget,
    read_timeout: float,
    count: Callable[[int], None],
) -> None:
    """The rest of a plain body, moved from the upstream's socket to the viewer's in the kernel
    (:mod:`proxy.splice`); the bytes read already go first, through the transport. ``count``
    hears of every piece sent."""
    source_fd, left = source
    while upstream.bytes_ready():  # (nothing more comes in: the socket is not read meanwhile)
        chunk = await upstream.read_chunk()
        await response.write(chunk)
        count(len(chunk))
    writer = request.writer
    writer.send_headers()  # (aiohttp may keep them for the first body bytes)
    transport = request.transport
    if transport is None:
        raise ClientConnectionResetError("Cannot write to closing transport")

    def moved(size: int) -> None:
        writer.output_size += size  # the access log's bytes
        upstream.moved(size)
        count(size)

    try:
        await splice.drained(transport, sink)
        moved_bytes = await splice.splice_body(
            source_fd,
            sink,
            left,
            turns=turns,
            read_timeout=read_timeout,
            big=upstream.chunk_limit is None,
            moved=moved,
        )
    except splice.SourceEnded:
        upstream.moving_failed(stalled=False)
    except splice.SourceStalled:
        upstream.moving_failed(stalled=True)
    except splice.SinkGone as exc:
        # As a write to a viewer who left: aiohttp lets the handler's end go unlogged.
        raise ClientConnectionResetError(f"viewer connection lost ({exc})") from None
    upstream.handed_back(moved_bytes)

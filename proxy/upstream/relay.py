"""The proxied-stream service: token in, rewritten playlist or open media stream out.

Handlers in ``proxy.web.streams`` parse the request and shape the response; everything between
(opening tokens, choosing the upstream request, deciding "rewrite or stream" when the upstream
headers arrive, rewriting) happens here.

Decide "rewrite or stream" once the headers are in: a playlist (by the token's kind, confirmed by
Content-Type or a leading ``#EXTM3U``) is read whole up to ``upstream.max_playlist_bytes`` and
rewritten; anything else is handed back open, to be streamed with backpressure and never buffered.

Everything goes through the cache layer (``proxy.cache``), keyed by the stream's context token
(its header profile), the upstream URL and the LL-HLS directives, so one stream's content is
never served to another:

* playlists: a fresh stored copy, else one single-flight fetch per key whose rewritten result is
  stored for the policy's freshness (``proxy.hls.cache_policy``) plus ``cache.stale_if_error``;
  when the upstream fails, the last good copy within that bound;
* segments, parts, init sections, keys: a fresh stored copy, else a reader of the one shared
  upstream body in flight (stored when it completes whole within ``cache.max_object_bytes``);
* ranged requests: a slice of a stored whole object, else the upstream for this viewer alone.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import urlsplit

from proxy import request_log
from proxy.cache.inflight import BodyHead, BodyReader, BodySource, OnComplete
from proxy.cache.layer import CacheLayer
from proxy.cache.store import CachedObject, Parts, cache_key
from proxy.errors import BadRequest, PlaylistTooLarge, UpstreamError, UpstreamStatus
from proxy.hls.cache_policy import PolicyLimits, is_live, media_freshness, playlist_freshness
from proxy.hls.kinds import UriKind
from proxy.hls.rewrite import PlaylistInfo, rewrite_playlist
from proxy.settings import Settings
from proxy.tokens import StreamContext, StreamRef, TokenCodec, display_name
from proxy.upstream.client import UpstreamClient, UpstreamResponse

PLAYLIST_CONTENT_TYPE = "application/vnd.apple.mpegurl"
_PLAYLIST_TYPES = (
    "mpegurl",
)  # application/vnd.apple.mpegurl, application/x-mpegurl, audio/mpegurl
_LL_HLS_DIRECTIVES = frozenset({"_HLS_msn", "_HLS_part", "_HLS_skip"})
# Ranges and validators are the only viewer headers that go upstream; cookies and auth never do.
MEDIA_REQUEST_HEADERS = ("Range", "If-Range")
# Upstream response headers a viewer gets for media, as they came (Cache-Control is hlsrelay's).
MEDIA_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Encoding",
    "Accept-Ranges",
    "Last-Modified",
    "ETag",
)
_UTF8_BOM = b"\xef\xbb\xbf"
# Rewritten URI lines remembered over all playlists (~150 bytes each with the dict's share).
_MAX_MEMO_LINES = 100_000
# How often an instance waiting on another's playlist fetch (shared store) looks for its copy.
LEASE_POLL_S = 0.02


@dataclass(frozen=True, slots=True)
class RewrittenPlaylist:
    """A rewritten playlist with its response headers, and where it came from."""

    entry: CachedObject
    result: str
    """"hit", "miss", "stale", "coalesced" (cache outcomes) or "uncached" (a ranged request)."""
    token_expires: int | None = None
    """When the stream token it was asked for expires (``StreamContext.expires``)."""

    @property
    def body(self) -> bytes:
        return self.entry.body

    @property
    def from_cache(self) -> bool:
        return self.result in ("hit", "stale")


@dataclass(frozen=True, slots=True)
class MediaStream:
    """An open upstream response to stream through; ``head`` holds bytes already read from it."""

    upstream: UpstreamResponse
    kind: UriKind
    head: bytes = b""


@dataclass(frozen=True, slots=True)
class SharedMedia:
    """A reader of an upstream body shared with other viewers (its head may not be in yet:
    ``reader.head()``, or a prepare handed to ``reader.first_bytes``)."""

    reader: BodyReader
    kind: UriKind


@dataclass(frozen=True, slots=True)
class CachedMedia:
    """A media object served from the store (``byte_range``: only bytes [start, stop) of it)."""

    entry: CachedObject
    kind: UriKind
    byte_range: tuple[int, int] | None = None


Fetched = RewrittenPlaylist | MediaStream | SharedMedia | CachedMedia


class _UpstreamBody:
    """An open upstream media response as a :class:`~proxy.cache.inflight.BodySource`."""

    def __init__(self, response: UpstreamResponse, head: BodyHead) -> None:
        self.response = response
        self.head = head

    def read_chunk(self) -> Awaitable[bytes | memoryview]:
        return self.response.read_chunk()

    def bytes_ready(self) -> bool:
        return self.response.bytes_ready()

    def abort(self) -> None:
        self.response.close()

    def finish(self) -> None:
        self.response.release()

    def limit_chunks(self, size: int) -> None:
        self.response.limit_chunks(size)


def _movable(source: BodySource) -> bool:
    """Whether a lone viewer's body spilled as it opens is moved socket to socket rather than
    pumped: when it can be, and while its receive share is unlimited (up to some hundred
    bodies at once: proxy.upstream.receive). bench_peers' 500 slow downloads, whose shares are
    limited, peaked at 202-221 MB in 3 of 9 runs moved (median 171) against at most 186 pumped
    (median 180): left to the pump until that is understood."""
    if not isinstance(source, _UpstreamBody):
        return False
    response = source.response
    return response.chunk_limit is None and response.movable()


def single_byte_range(header: str, size: int) -> tuple[int, int] | None:
    """``[start, stop)`` of a single satisfiable ``bytes=`` range over ``size`` bytes, or None."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if not first:  # suffix: the last N bytes
            length = int(last)
            return (max(0, size - length), size) if length > 0 and size > 0 else None
        start = int(first)
        stop = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    if start < 0 or start >= size or stop <= start:
        return None
    return start, stop


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def looks_like_playlist(head: bytes) -> bool:
    return head.removeprefix(_UTF8_BOM).lstrip().startswith(b"#EXTM3U")


def ll_hls_query(query_string: str) -> str:
    """The LL-HLS delivery directives of a viewer's query, as sent, for the upstream URL.

    Values are checked (digits, or a short word for _HLS_skip) so nothing else can be smuggled
    into the upstream query.
    """
    if "_HLS_" not in query_string:
        return ""
    kept = []
    for item in query_string.split("&"):
        name, _, value = item.partition("=")
        if name in _LL_HLS_DIRECTIVES:
            if not value.isalnum() or len(value) > 20:
                raise BadRequest(f"invalid {name} value")
            kept.append(item)
    return "&".join(kept)


def with_query(url: str, extra: str) -> str:
    """``url`` with ``extra`` appended to its query, byte-exact (fragment dropped)."""
    if not extra:
        return url
    url = url.partition("#")[0]
    return f"{url}{'&' if '?' in url else '?'}{extra}"


class StreamMinter:
    """Turns an upstream URL and a header profile into a proxied playlist path."""

    def __init__(self, codec: TokenCodec, settings: Settings) -> None:
        self._codec = codec
        public = str(settings.server.public_url).rstrip("/") if settings.server.public_url else ""
        self.prefix = public + settings.server.base_path
        """What goes before ``/s/...``: public_url and base_path (root-relative when no URL)."""

    def mint(self, url: str, headers: Mapping[str, str]) -> str:
        """The proxied path (under :attr:`prefix`) of a stream's top playlist."""
        ctx_token = self._codec.mint_context(url, headers)
        ctx = self._codec.open_context(ctx_token)
        child = self._codec.child_path(ctx_token, ctx, url, UriKind.PLAYLIST)
        return f"/s/{ctx_token}/{child}"


class StreamRelay:
    """Fetches a proxied stream's resources, through the cache, and rewrites its playlists."""

    def __init__(
        self,
        client: UpstreamClient,
        codec: TokenCodec,
        settings: Settings,
        cache: CacheLayer | None = None,
    ) -> None:
        self._client = client
        self._codec = codec
        self._settings = settings
        self._relative = settings.server.child_uris == "relative"
        # Rewritten segment lines per (stream, playlist URL): a live reload maps only new lines.
        self._line_memos: OrderedDict[tuple[str, str], dict[bytes, bytes]] = OrderedDict()
        self._memo_lines = 0
        self.minter = StreamMinter(codec, settings)
        self.prefix = self.minter.prefix
        self.cache = cache if cache is not None else CacheLayer.open(settings.cache)
        cache_settings = settings.cache
        self.limits = PolicyLimits(
            vod_max_age=cache_settings.vod_max_age,
            multivariant_max_age=cache_settings.multivariant_max_age,
            media_max_age=cache_settings.media_max_age,
        )
        # A rewritten playlist depends on how children are written: instances that share a
        # Redis store but write them differently must not share playlists.
        self._rewrite_variant = f"{settings.server.child_uris}|{self.prefix}"

    @property
    def read_timeout(self) -> float:
        """Seconds an upstream body may send nothing before it counts as stalled."""
        return self._settings.upstream.read_timeout

    def mint(self, url: str, headers: Mapping[str, str]) -> str:
        return self.minter.mint(url, headers)

    def open_tokens(self, ctx_token: str, ref_token: str) -> tuple[StreamContext, StreamRef]:
        ctx = self._codec.open_context(ctx_token)
        return ctx, self._codec.open_ref(ctx_token, ctx, ref_token)

    # -- fetching -------------------------------------------------------------------------------

    async def fetch(
        self,
        ctx_token: str,
        ref_token: str,
        *,
        method: str = "GET",
        query_string: str = "",
        viewer_headers: Mapping[str, str] | None = None,
    ) -> Fetched:
        """Open the upstream resource behind a proxied URI (or its cached copy).

        Raises the project's errors. A ranged request is answered from a stored whole object when
        there is one (a single range, no If-Range); otherwise it goes upstream on its own: its
        answer is not the whole object, so it is neither shared nor stored.
        """
        ctx, ref = self.open_tokens(ctx_token, ref_token)
        # Named in the request's log line even when the cache answers (the host alone; an
        # upstream request that is redirected elsewhere notes the final host instead).
        request_log.note_upstream_host(urlsplit(ref.url).hostname)
        viewer_headers = viewer_headers or {}
        ranged = any(viewer_headers.get(name) is not None for name in MEDIA_REQUEST_HEADERS)
        found: SharedMedia | CachedMedia | MediaStream | None = None
        if ranged:
            if ref.kind is not UriKind.PLAYLIST and method in ("GET", "HEAD"):
                found = await self._stored_range(ctx_token, ref, viewer_headers)
        elif ref.kind is UriKind.PLAYLIST:
            return await self._playlist(ctx_token, ctx, ref, query_string)
        elif method in ("GET", "HEAD"):
            found = await self._media(ctx_token, ctx, ref, method)
        if found is not None:
            return found
        return await self._direct(ctx_token, ctx, ref, method, query_string, viewer_headers)

    async def _direct(
        self,
        ctx_token: str,
        ctx: StreamContext,
        ref: StreamRef,
        method: str,
        query_string: str,
        viewer_headers: Mapping[str, str],
    ) -> RewrittenPlaylist | MediaStream:
        """One upstream request for this viewer alone (ranged requests, HEAD of media)."""
        headers = dict(ctx.headers)
        # A Range is forwarded whatever the kind: a minted "playlist" URL may turn out to be a
        # progressive MP4 that a player seeks in.
        for name in MEDIA_REQUEST_HEADERS:
            value = viewer_headers.get(name)
            if value is not None:
                headers[name] = value
        blocking = False
        if ref.kind is UriKind.PLAYLIST:
            directives = ll_hls_query(query_string)
            url = with_query(ref.url, directives)
            blocking = "_HLS_msn" in directives
            response = await self._open_playlist(url, headers, blocking, ctx_token)
        else:
            url = ref.url
            response = await self._client.open(
                url,
                headers,
                method=method,
                decompress=False,
                kind=ref.kind.name.lower(),
                stream_key=ctx_token,
            )
        result = await self._classify_guarded(ctx_token, ctx, ref, url, response, method)
        if isinstance(result, MediaStream):
            return result
        body, info = result
        entry = self._playlist_entry(body, info, blocking=blocking)
        return RewrittenPlaylist(entry, "uncached")

    async def _open_playlist(
        self, url: str, headers: Mapping[str, str], blocking: bool, ctx_token: str
    ) -> UpstreamResponse:
        # A playlist is fetched whole, HEAD too: its rewritten length is what counts.
        return await self._client.open(
            url,
            headers,
            kind="playlist",
            first_byte_timeout=(
                self._settings.upstream.blocking_reload_timeout if blocking else None
            ),
            stream_key=ctx_token,
        )

    async def _classify_guarded(
        self,
        ctx_token: str,
        ctx: StreamContext,
        ref: StreamRef,
        url: str,
        response: UpstreamResponse,
        method: str,
        collect: list[tuple[str, UriKind]] | None = None,
    ) -> tuple[bytes, PlaylistInfo] | MediaStream:
        try:
            return await self._classify(ctx_token, ctx, ref, url, response, method, collect)
        except UpstreamError as exc:
            response.close()
            self._client.count_error(exc.code)
            raise
        except BaseException:
            response.close()
            raise

    async def _classify(
        self,
        ctx_token: str,
        ctx: StreamContext,
        ref: StreamRef,
        url: str,
        response: UpstreamResponse,
        method: str,
        collect: list[tuple[str, UriKind]] | None = None,
    ) -> tuple[bytes, PlaylistInfo] | MediaStream:
        status = response.status
        if status == 416:
            return MediaStream(
                response, ref.kind
            )  # a Range past the end: the player needs the 416 as is
        if status >= 300:
            raise UpstreamStatus(status)
        is_playlist_type = any(t in response.content_type for t in _PLAYLIST_TYPES)
        head = b""
        if not is_playlist_type:
            media_type = response.content_type.startswith(("video/", "audio/", "image/"))
            if ref.kind is not UriKind.PLAYLIST or media_type or method == "HEAD":
                return MediaStream(response, ref.kind)
            # Ambiguous Content-Type (text/plain, octet-stream): look at the first bytes.
            head = await response.first_chunk()
            if not looks_like_playlist(head):
                return MediaStream(response, ref.kind, head)
        body = await response.read_capped(self._settings.upstream.max_playlist_bytes, head)
        response.release()
        return self.rewrite(
            ctx_token, ctx, body, response.final_url, url, ref.imports, collect=collect
        )

    # -- playlists: single-flight, stored rewritten, stale-if-error ------------------------------

    def _playlist_entry(
        self,
        body: bytes,
        info: PlaylistInfo,
        *,
        blocking: bool,
        previous: CachedObject | None = None,
    ) -> CachedObject:
        freshness = playlist_freshness(info, blocking=blocking, limits=self.limits)
        now = time.time()
        etag = _etag(body)
        # An unchanged playlist keeps its Last-Modified, so If-Modified-Since keeps matching.
        last_modified = (
            previous.header("Last-Modified")
            if previous is not None and previous.header("ETag") == etag
            else None
        ) or formatdate(now, usegmt=True)
        headers = (
            ("Content-Type", PLAYLIST_CONTENT_TYPE),
            ("Cache-Control", freshness.cache_control),
            ("ETag", etag),
            ("Last-Modified", last_modified),
            ("Vary", "Accept-Encoding"),
        )
        compressed = gzip.compress(body, compresslevel=6, mtime=0) if len(body) > 512 else b""
        return CachedObject(body, headers, now, freshness.fresh_for, compressed)

    async def _playlist(
        self, ctx_token: str, ctx: StreamContext, ref: StreamRef, query_string: str
    ) -> RewrittenPlaylist | MediaStream:
        directives = ll_hls_query(query_string)
        url = with_query(ref.url, directives)
        blocking = "_HLS_msn" in directives
        cache = self.cache
        key = cache_key("pl", self._rewrite_variant, ctx_token, url)
        cached = await cache.store.get(key)
        if cached is not None and cached.is_fresh():
            cache.count("hit")
            return RewrittenPlaylist(cached, "hit", ctx.expires)

        # A minted playlist URL may turn out to be media (a progressive file, a live TS stream):
        # the fetch that found it hands the open response to the request that started it.
        media: list[MediaStream] = []
        leader_gone = False

        async def refresh() -> CachedObject | None:
            lease_for = self._settings.upstream.first_byte_timeout
            if blocking:
                lease_for = self._settings.upstream.blocking_reload_timeout
            if not await cache.store.lease(key, lease_for):
                # Another instance sharing the store is fetching it: wait for its copy.
                filled = await self._filled_elsewhere(key, cached, lease_for)
                if filled is not None:
                    return filled
            elif cache.store.shared:
                # Another instance may have stored a copy and let the lease go since this request
                # looked at the store: then the lease was free, and the copy is there.
                stored = await self._stored_since(key, cached)
                if stored is not None:
                    await cache.store.release(key)
                    return stored
            try:
                return await fetch_and_store()
            finally:
                await cache.store.release(key)

        async def fetch_and_store() -> CachedObject | None:
            collect: list[tuple[str, UriKind]] | None = (
                [] if cache.settings.prefetch_segments else None
            )
            response = await self._open_playlist(url, dict(ctx.headers), blocking, ctx_token)
            result = await self._classify_guarded(
                ctx_token, ctx, ref, url, response, "GET", collect
            )
            if isinstance(result, MediaStream):
                if leader_gone:
                    result.upstream.close()
                else:
                    media.append(result)
                return None
            body, info = result
            entry = self._playlist_entry(body, info, blocking=blocking, previous=cached)
            await cache.store.set(key, entry, entry.fresh_for + cache.settings.stale_if_error)
            if collect and is_live(info) and info.part_target is None:
                self._prefetch(ctx_token, ctx, collect, cache.settings.prefetch_segments)
            return entry

        try:
            entry, led = await cache.playlists.coalesce(key, refresh)
        except UpstreamError as exc:
            if cached is not None and self._stale_allowed(cached, exc):
                cache.count("stale")
                return RewrittenPlaylist(cached, "stale")
            raise
        except BaseException:
            leader_gone = True
            for stream in media:
                stream.upstream.close()
            raise
        if entry is not None:
            cache.count("miss" if led else "coalesced")
            return RewrittenPlaylist(entry, "miss" if led else "coalesced", ctx.expires)
        if led and media:
            cache.count("miss")
            return media.pop()
        # Joined a fetch that found media: that response belongs to its leader; open our own.
        cache.count("miss")
        return await self._direct(ctx_token, ctx, ref, "GET", query_string, {})

    async def _filled_elsewhere(
        self, key: str, cached: CachedObject | None, wait_for: float
    ) -> CachedObject | None:
        """The copy another instance stores for ``key`` within ``wait_for`` s, or None."""
        deadline = time.monotonic() + wait_for
        while time.monotonic() < deadline:
            await asyncio.sleep(LEASE_POLL_S)
            if (entry := await self._stored_since(key, cached)) is not None:
                return entry
            if not await self.cache.store.leased(key):
                # The holder stores its copy before it gives the lease up: one that stored and
                # released between the two looks above is found now. Only then did it fail.
                return await self._stored_since(key, cached)
        return None

    async def _stored_since(self, key: str, cached: CachedObject | None) -> CachedObject | None:
        """The store's entry for ``key`` if it is newer than ``cached`` (any, without one)."""
        entry = await self.cache.store.get(key)
        if entry is not None and (cached is None or entry.stored_at > cached.stored_at):
            return entry
        return None

    def _stale_allowed(self, cached: CachedObject, exc: UpstreamError) -> bool:
        if isinstance(exc, UpstreamStatus) and exc.upstream_status < 500:
            return False  # the upstream answered: a 404/403 is news, not an outage
        if isinstance(exc, PlaylistTooLarge):
            return False
        return cached.age() < cached.fresh_for + self.cache.settings.stale_if_error

    # -- media: store, then shared in-flight bodies ---------------------------------------------

    def _media_ttl(self, kind: UriKind) -> float:
        settings = self.cache.settings
        if kind is UriKind.KEY:
            return settings.key_ttl
        if kind is UriKind.PLAYLIST:
            return 0.0  # media behind a top-level URL: a live stream or a large file
        return settings.media_ttl

    def _media_key(self, ctx_token: str, url: str, kind: UriKind) -> str:
        return cache_key("md", ctx_token, url, str(int(kind)))

    async def _media(
        self, ctx_token: str, ctx: StreamContext, ref: StreamRef, method: str
    ) -> SharedMedia | CachedMedia | MediaStream | None:
        """The stored object, or a reader of the shared upstream body, or the upstream response
        itself when this viewer is its only one and it will be neither kept nor stored (memory
        short: :func:`_movable`); None: go direct."""
        if ref.kind is UriKind.PLAYLIST:
            return None
        cache = self.cache
        key = self._media_key(ctx_token, ref.url, ref.kind)
        ttl = self._media_ttl(ref.kind)
        if ttl > 0:
            cached = await cache.store.get(key)
            if cached is not None and cached.is_fresh():
                cache.count("hit")
                return CachedMedia(cached, ref.kind)
        if method != "GET":
            return None
        reader = cache.bodies.join(key)
        if reader is not None:
            cache.count("coalesced")
        else:
            cache.count("miss")
            opened = await cache.bodies.open_or_take(
                key,
                self._media_opener(ctx, ref.url, ref.kind, ctx_token),
                self._media_storer(key, ttl) if ttl > 0 else None,
                _movable,
            )
            if not isinstance(opened, BodyReader):
                # Memory short, and this viewer its only one: moved from socket to socket
                # (proxy.splice), none of it kept or read here.
                assert isinstance(opened, _UpstreamBody)
                return MediaStream(opened.response, ref.kind)
            reader = opened
        # Not waiting for the head here: a crowd's answers are prepared by the pump when it
        # comes, without waking each viewer's task (proxy.cache.inflight).
        return SharedMedia(reader, ref.kind)

    async def _stored_range(
        self, ctx_token: str, ref: StreamRef, viewer_headers: Mapping[str, str]
    ) -> CachedMedia | None:
        range_header = viewer_headers.get("Range")
        if range_header is None or viewer_headers.get("If-Range") is not None:
            return None
        if self._media_ttl(ref.kind) <= 0:
            return None
        cached = await self.cache.store.get(self._media_key(ctx_token, ref.url, ref.kind))
        if cached is None or not cached.is_fresh():
            return None
        byte_range = single_byte_range(range_header, len(cached.body))
        if byte_range is None:
            return None  # several ranges, or none satisfiable: the upstream answers those
        self.cache.count("hit")
        return CachedMedia(cached, ref.kind, byte_range)

    def _media_opener(
        self, ctx: StreamContext, url: str, kind: UriKind, stream_key: str
    ) -> Callable[[], Awaitable[BodySource]]:
        freshness = media_freshness(kind, self.limits)

        async def opener() -> BodySource:
            response = await self._client.open(
                url,
                dict(ctx.headers),
                decompress=False,
                kind=kind.name.lower(),
                stream_key=stream_key,
            )
            if response.status >= 300:
                response.close()
                self._client.count_error(UpstreamStatus.code)
                raise UpstreamStatus(response.status)
            headers = [
                (name, value)
                for name in MEDIA_RESPONSE_HEADERS
                if (value := response.headers.get(name)) is not None
            ]
            storable = "no-store" not in response.headers.get("Cache-Control", "").lower()
            headers.append(("Cache-Control", freshness.cache_control))
            head = BodyHead(
                response.status, tuple(headers), response.raw.content_length, storable=storable
            )
            return _UpstreamBody(response, head)

        return opener

    def _media_storer(self, key: str, ttl: float) -> OnComplete:
        store = self.cache.store

        async def on_complete(head: BodyHead, parts: Parts) -> None:
            if head.status != 200 or not head.storable:
                return
            if head.length is not None and head.length != sum(map(len, parts)):
                return  # never store a body that is not what the upstream announced
            headers = tuple(item for item in head.headers if item[0] != "Content-Length")
            await store.set_parts(key, parts, headers, time.time(), ttl)

        return on_complete

    def _prefetch(
        self,
        ctx_token: str,
        ctx: StreamContext,
        children: list[tuple[str, UriKind]],
        count: int,
    ) -> None:
        """Start fetching the newest ``count`` segments of a refreshed live playlist."""
        newest = [url for url, kind in children if kind is UriKind.MEDIA][-count:]
        cache = self.cache
        ttl = self._media_ttl(UriKind.MEDIA)
        if not newest or ttl <= 0:
            return

        async def prefetch() -> None:
            for url in newest:
                key = self._media_key(ctx_token, url, UriKind.MEDIA)
                if key in cache.bodies or await cache.store.get(key) is not None:
                    continue
                if key in cache.bodies:  # started while the store answered
                    continue
                cache.metrics.cache_prefetches.inc()
                cache.bodies.start(
                    key,
                    self._media_opener(ctx, url, UriKind.MEDIA, ctx_token),
                    self._media_storer(key, ttl),
                )

        cache.tasks.spawn(prefetch(), name="prefetch")

    # -- rewriting ------------------------------------------------------------------------------

    def rewrite(
        self,
        ctx_token: str,
        ctx: StreamContext,
        body: bytes,
        final_url: str,
        request_url: str,
        imports: Mapping[str, str],
        *,
        collect: list[tuple[str, UriKind]] | None = None,
    ) -> tuple[bytes, PlaylistInfo]:
        """Rewrite ``body``; ``collect`` (when given) receives every child URL and its kind."""
        codec = self._codec
        # The playlist lives at .../s/{ctx}/{ref}/{name}: "../{ref}/{name}" is its sibling.
        lead = "../" if self._relative else f"{self.prefix}/s/{ctx_token}/"

        def map_uri(child: str, kind: UriKind, child_imports: Mapping[str, str]) -> str:
            return lead + codec.child_path(ctx_token, ctx, child, kind, child_imports)

        def map_media(children: list[str]) -> list[bytes]:
            if collect is not None:
                collect.extend((child, UriKind.MEDIA) for child in children)
            # With a line memo, that memo is what a reload finds: the codec need not keep them too.
            paths = codec.child_paths(ctx_token, ctx, children, UriKind.MEDIA, memoise=memo is None)
            # One encode for them all; tokens and names never hold a newline.
            joined = lead + ("\n" + lead).join(paths)
            return joined.encode("utf-8", "surrogateescape").split(b"\n")

        mapper = map_uri
        memo: dict[bytes, bytes] | None = None
        if collect is not None:
            # Prefetch needs every child, so the line memo (which skips the mapper) stays out.
            def mapper(child: str, kind: UriKind, child_imports: Mapping[str, str]) -> str:
                collect.append((child, kind))
                return map_uri(child, kind, child_imports)
        else:
            memo_key = (ctx_token, final_url)
            memo = self._line_memos.get(memo_key)
            if memo is None:
                memo = self._line_memos[memo_key] = {}
            else:
                self._line_memos.move_to_end(memo_key)  # least recently used go first
        before = len(memo) if memo is not None else 0
        result = rewrite_playlist(
            body,
            final_url,
            mapper,
            request_url=request_url,
            imported=imports or None,
            line_memo=memo,
            map_media=map_media,
        )
        if memo is None:
            return result
        if len(memo) > 2 * result[1].uri_count + 64:
            # A live window slid far past what is remembered: start the memo again.
            memo.clear()
        self._memo_lines += len(memo) - before
        while self._memo_lines > _MAX_MEMO_LINES and len(self._line_memos) > 1:
            self._memo_lines -= len(self._line_memos.popitem(last=False)[1])
        return result


__all__ = [
    "MEDIA_RESPONSE_HEADERS",
    "PLAYLIST_CONTENT_TYPE",
    "CachedMedia",
    "Fetched",
    "MediaStream",
    "RewrittenPlaylist",
    "SharedMedia",
    "StreamMinter",
    "StreamRelay",
    "display_name",
    "ll_hls_query",
]

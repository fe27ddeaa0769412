"""The proxied-stream service: token in, rewritten playlist or open media stream out.

Handlers in ``proxy.web.streams`` parse the request and shape the response; everything between
(opening tokens, choosing the upstream request, deciding "rewrite or stream" when the upstream
headers arrive, rewriting) happens here.

Decide "rewrite or stream" once the headers are in: a playlist (by the token's kind, confirmed by
Content-Type or a leading ``#EXTM3U``) is read whole up to ``upstream.max_playlist_bytes`` and
rewritten; anything else is handed back open, to be streamed with backpressure and never buffered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.errors import BadRequest, UpstreamError, UpstreamStatus
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
_UTF8_BOM = b"\xef\xbb\xbf"
# Rewritten URI lines remembered over all playlists (~150 bytes each with the dict's share).
_MAX_MEMO_LINES = 100_000


@dataclass(frozen=True, slots=True)
class RewrittenPlaylist:
    body: bytes
    info: PlaylistInfo
    upstream: UpstreamResponse


@dataclass(frozen=True, slots=True)
class MediaStream:
    """An open upstream response to stream through; ``head`` holds bytes already read from it."""

    upstream: UpstreamResponse
    kind: UriKind
    head: bytes = b""


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
    """Fetches a proxied stream's resources and rewrites its playlists."""

    def __init__(self, client: UpstreamClient, codec: TokenCodec, settings: Settings) -> None:
        self._client = client
        self._codec = codec
        self._settings = settings
        self._relative = settings.server.child_uris == "relative"
        # Rewritten segment lines per (stream, playlist URL): a live reload maps only new lines.
        self._line_memos: dict[tuple[str, str], dict[bytes, bytes]] = {}
        self._memo_lines = 0
        self.minter = StreamMinter(codec, settings)
        self.prefix = self.minter.prefix

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
    ) -> RewrittenPlaylist | MediaStream:
        """Open the upstream resource behind a proxied URI; raise the project's errors."""
        ctx, ref = self.open_tokens(ctx_token, ref_token)
        headers = dict(ctx.headers)
        # A Range is forwarded whatever the kind: a minted "playlist" URL may turn out to be a
        # progressive MP4 that a player seeks in.
        for name in MEDIA_REQUEST_HEADERS:
            value = (viewer_headers or {}).get(name)
            if value is not None:
                headers[name] = value
        if ref.kind is UriKind.PLAYLIST:
            directives = ll_hls_query(query_string)
            url = with_query(ref.url, directives)
            blocking = "_HLS_msn" in directives
            # A playlist is fetched whole, HEAD too: its rewritten length is what counts.
            response = await self._client.open(
                url,
                headers,
                kind="playlist",
                first_byte_timeout=(
                    self._settings.upstream.blocking_reload_timeout if blocking else None
                ),
                stream_key=ctx_token,
            )
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
        try:
            return await self._classify(ctx_token, ctx, ref, url, response, method)
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
    ) -> RewrittenPlaylist | MediaStream:
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
        rewritten, info = self.rewrite(ctx_token, ctx, body, response.final_url, url, ref.imports)
        return RewrittenPlaylist(rewritten, info, response)

    def rewrite(
        self,
        ctx_token: str,
        ctx: StreamContext,
        body: bytes,
        final_url: str,
        request_url: str,
        imports: Mapping[str, str],
    ) -> tuple[bytes, PlaylistInfo]:
        codec = self._codec
        if self._relative:
            # The playlist lives at .../s/{ctx}/{ref}/{name}: "../{ref}/{name}" is its sibling.
            def map_uri(child: str, kind: UriKind, child_imports: Mapping[str, str]) -> str:
                return "../" + codec.child_path(ctx_token, ctx, child, kind, child_imports)
        else:
            root = f"{self.prefix}/s/{ctx_token}/"

            def map_uri(child: str, kind: UriKind, child_imports: Mapping[str, str]) -> str:
                return root + codec.child_path(ctx_token, ctx, child, kind, child_imports)

        memo_key = (ctx_token, final_url)
        memo = self._line_memos.pop(memo_key, None)  # re-inserted below: most recent last
        if memo is None:
            memo = {}
        self._line_memos[memo_key] = memo
        before = len(memo)
        result = rewrite_playlist(
            body,
            final_url,
            map_uri,
            request_url=request_url,
            imported=imports or None,
            line_memo=memo,
        )
        if len(memo) > 2 * result[1].uri_count + 64:
            # A live window slid far past what is remembered: start the memo again.
            memo.clear()
        self._memo_lines += len(memo) - before
        while self._memo_lines > _MAX_MEMO_LINES and len(self._line_memos) > 1:
            oldest = next(iter(self._line_memos))
            self._memo_lines -= len(self._line_memos.pop(oldest))
        return result


__all__ = [
    "PLAYLIST_CONTENT_TYPE",
    "MediaStream",
    "RewrittenPlaylist",
    "StreamMinter",
    "StreamRelay",
    "display_name",
    "ll_hls_query",
]

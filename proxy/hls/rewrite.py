"""The playlist rewriter: every URI in an upstream m3u8 points back through the proxy.

``rewrite_playlist`` walks the body line by line (split on ``\\n`` only) and replaces exactly
the bytes of each URI: URI lines, and the URI attributes listed in :mod:`proxy.hls.tags`. The
caller's mapper decides what a URI becomes (a signed proxy URL); this module decides which
bytes are URIs, what they resolve to, and what kind of resource each one is.

It must never re-serialise a parsed model or touch any other byte: unknown tags, comments,
attribute order, number formats, blank lines, ``\\r`` and the BOM pass through. The only
lines that change besides URIs are EXT-X-DEFINE lines, which are dropped after their variables
are substituted. It never raises on malformed input and never does I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from proxy.hls.attributes import scan_attribute_list
from proxy.hls.kinds import UriKind
from proxy.hls.tags import DEFINE_TAG, URI_TAGS, VARIANT_STREAM_TAG, UriTag
from proxy.hls.uri import PlaylistBase
from proxy.hls.variables import Variables, define_from_line

UriMapper = Callable[[str, UriKind, Mapping[str, str]], str]
"""``map_uri(absolute_upstream_url, kind, imports)`` -> the replacement URI text (ASCII).

``imports`` is what a child playlist needs for EXT-X-DEFINE:IMPORT: the variables of this
playlist for the PLAYLIST children of a multivariant playlist that defines any, otherwise an
empty mapping."""

MediaMapper = Callable[[list[str]], list[bytes]]
"""``map_media(absolute_upstream_urls)`` -> their replacement URI bytes, in order.

The same mapping as a :data:`UriMapper` gives for ``UriKind.MEDIA`` and no imports, for many URIs
at once: a cold playlist's segment lines are collected and mapped in one call, which lets the
mapper do its per-URI work in bulk (see ``TokenCodec.child_paths``)."""


@dataclass(frozen=True, slots=True)
class PlaylistInfo:
    """What the rewriter learned about a playlist on its way through (for cache policy)."""

    is_multivariant: bool
    """Has EXT-X-STREAM-INF, EXT-X-MEDIA, EXT-X-I-FRAME-STREAM-INF or another such tag."""
    target_duration: float | None
    """EXT-X-TARGETDURATION (the first valid one), seconds."""
    part_target: float | None
    """EXT-X-PART-INF:PART-TARGET (LL-HLS), seconds."""
    endlist: bool
    """EXT-X-ENDLIST is present."""
    playlist_type: str | None
    """EXT-X-PLAYLIST-TYPE: ``"VOD"`` or ``"EVENT"``; None when absent or anything else."""
    variables: Mapping[str, str]
    """The variables in force after EXT-X-DEFINE processing."""
    uri_count: int
    """How many URIs were rewritten (mapper calls)."""


_BOM: Final = b"\xef\xbb\xbf"
_NO_IMPORTS: Final[Mapping[str, str]] = MappingProxyType({})
_DECIMAL: Final = re.compile(rb"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_PLAYLIST_TYPES: Final = frozenset({"VOD", "EVENT"})
# After "https://", these (or nothing) mean an empty host, which PlaylistBase.resolve refuses.
_NOT_A_HOST: Final = ("", "/", "?", "#", "\n")
# _PlaylistRewriter._resolve_bytes: a line to leave to the general path (a str no resolved
# URL can equal: it starts with NUL, a URL with "http").
_GENERAL: Final = "\x00general"


@dataclass(frozen=True, slots=True)
class _UriRule:
    """A row of the tag table in the form the hot loop wants: bytes keys."""

    uri_kinds: Mapping[bytes, UriKind]
    kind_by_type: Mapping[bytes, UriKind]
    multivariant: bool

    @classmethod
    def of(cls, row: UriTag) -> _UriRule:
        return cls(
            {name.encode(): kind for name, kind in row.uri_attributes.items()},
            {value.encode(): kind for value, kind in row.kind_by_type.items()},
            row.multivariant,
        )


_URI_RULES: Final[Mapping[bytes, _UriRule]] = {t.name.encode(): _UriRule.of(t) for t in URI_TAGS}
_NO_URI_ATTRIBUTES: Final[Mapping[bytes, UriKind]] = {}
_VARIANT_STREAM_TAG: Final = VARIANT_STREAM_TAG.encode()
_DEFINE_TAG: Final = DEFINE_TAG.encode()
_DEFINE_PREFIX: Final = b"#" + _DEFINE_TAG


def _decimal(text: bytes) -> float | None:
    """A non-negative decimal number, or None: malformed values never raise."""
    text = text.strip()
    if not _DECIMAL.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _tag_name(line: bytes, hash_at: int) -> tuple[bytes, int]:
    """The tag name of a ``#`` line and the offset of its ``:`` (-1 when it has none)."""
    colon = line.find(b":", hash_at)
    if colon < 0:
        return line[hash_at + 1 :].rstrip(), -1
    return line[hash_at + 1 : colon], colon


class _PlaylistRewriter:
    """One pass over one playlist. Tag handlers are looked up by exact tag name (_TAG_HANDLERS)."""

    def __init__(
        self,
        playlist_url: str,
        map_uri: UriMapper,
        query_urls: tuple[str, ...],
        imported: Mapping[str, str],
        defines: Variables | None,
        line_memo: MutableMapping[bytes, bytes] | None = None,
        map_media: MediaMapper | None = None,
    ) -> None:
        self._base = PlaylistBase(playlist_url)
        self._map_uri = map_uri
        self._map_media = map_media
        self._line_memo = line_memo
        self._query_urls = query_urls
        self._imported = imported
        # Substitution only happens when the body has EXT-X-DEFINE lines (`defines` holds all
        # of them, evaluated up front, for the imports of child playlists); `_variables` grows
        # line by line, because a reference may only use a variable defined above it.
        self._variables: Variables | None = Variables() if defines is not None else None
        self._imports: Mapping[str, str] = (
            defines.as_mapping() if defines is not None and len(defines) else _NO_IMPORTS
        )
        self._variant_pending = False
        self.uri_count = 0
        self.is_multivariant = False
        self.target_duration: float | None = None
        self.part_target: float | None = None
        self.endlist = False
        self.playlist_type: str | None = None

    @property
    def variables(self) -> Mapping[str, str]:
        """The variables in force now."""
        return self._variables.as_mapping() if self._variables is not None else _NO_IMPORTS

    def rewrite_lines(self, lines: list[bytes]) -> list[bytes]:
        output: list[bytes] = []
        append = output.append
        tag_line = self.tag_line
        uri_line = self.uri_line
        map_uri = self._map_uri
        resolve = self._resolve_text
        # The hot path: a URI line of a media playlist without variables ("seg_00001.ts"), which
        # resolves against the base directory without the general uri_line.
        directory = self._base.directory if self._variables is None else None
        media, no_imports = UriKind.MEDIA, _NO_IMPORTS
        fast_count = 0
        dropped_at = -1
        memo = self._line_memo
        # With a batch mapper, plain segment lines are left in place and mapped after the loop.
        batch = self._map_media is not None
        pending_at: list[int] = []
        pending_lines: list[bytes] = []
        for line in lines:
            if not line:
                append(line)
                continue
            first = line[0]
            if first == 0x23:  # '#'
                # EXTINF is most of a media playlist and never holds a URI or an attribute list.
                rewritten = line if line.startswith(b"#EXTINF") else tag_line(line, 0)
            elif directory is not None and first > 0x20:
                if not self._variant_pending:
                    if memo is not None:
                        # A reload of the same playlist: a line seen before is rewritten as
                        # before.
                        rewritten = memo.get(line)
                        if rewritten is not None:
                            fast_count += 1
                            append(rewritten)
                            continue
                    if batch:
                        # A segment line without blanks around it (a CRLF line's \r aside):
                        # resolved and mapped with the others after the loop.
                        last = line[-1]
                        if last == 0x0D and len(line) > 1:
                            last = line[-2]
                        if last > 0x20:
                            pending_at.append(len(output))
                            pending_lines.append(line)
                            append(line)
                            continue
                rewritten = None
                # A URI line of a playlist without variables, also with the \r of a CRLF
                # playlist after it: resolved here rather than in uri_line, which is general.
                cr = line[-1] == 0x0D
                reference = line[:-1] if cr else line
                if reference[-1] > 0x20 and not self._variant_pending:
                    try:
                        text = reference.decode()
                    except UnicodeDecodeError:
                        text = ""  # not valid UTF-8: leave it to the general path
                    url = resolve(text) if text else None
                    if text and url is None:
                        rewritten = line  # skd:, data:, other schemes: as written
                    if url is not None:
                        fast_count += 1
                        replacement = map_uri(url, media, no_imports)
                        try:
                            rewritten = replacement.encode()
                        except UnicodeEncodeError:
                            rewritten = replacement.encode("utf-8", "surrogateescape")
                        if cr:
                            rewritten += b"\r"
                        if memo is not None:
                            memo[line] = rewritten
                if rewritten is None:
                    rewritten = uri_line(line)
            else:
                rewritten = uri_line(line)
            if rewritten is None:
                dropped_at = len(output)
            else:
                append(rewritten)
        if dropped_at == len(output):
            # The dropped last line had no newline of its own; the one before it stays.
            append(b"")
        if pending_lines:
            self._map_pending(output, pending_at, pending_lines)
        self.uri_count += fast_count
        return output

    def _map_pending(self, output: list[bytes], at: list[int], lines: list[bytes]) -> None:
        """Resolve and map the collected segment lines at once; put them in place and in the memo.

        Decoding, the checks that pick a shortcut, and the resolution itself run on all the lines
        joined (C loops rather than Python ones); mixed or unusual playlists go line by line.
        """
        assert self._map_media is not None
        references = lines
        joined = b"\n".join(lines)
        crlf = b"\r" in joined
        if crlf:
            references = [line[:-1] if line[-1] == 0x0D else line for line in lines]
            joined = b"\n".join(references)
        urls: Sequence[str | None]
        try:
            urls, all_urls = self._resolve_joined(joined.decode(), len(lines))
        except UnicodeDecodeError:
            urls, all_urls = [self._resolve_bytes(reference) for reference in references], False
        if not all_urls and (None in urls or _GENERAL in urls):
            # Kept as written (skd:, data:) or left to the general path (not UTF-8).
            for index, line, url in zip(at, lines, urls, strict=True):
                if url is _GENERAL:
                    output[index] = self._media_uri_line(line)
            mapped = [i for i, url in enumerate(urls) if url is not None and url is not _GENERAL]
            at = [at[i] for i in mapped]
            lines = [lines[i] for i in mapped]
            urls = [urls[i] for i in mapped]
            if not urls:
                return
        replacements = self._map_media(urls)  # type: ignore[arg-type]
        if crlf:  # the lines that had a \r keep it
            replacements = [
                replacement + b"\r" if line[-1] == 0x0D else replacement
                for replacement, line in zip(replacements, lines, strict=True)
            ]
        for index, replacement in zip(at, replacements, strict=True):
            output[index] = replacement
        if self._line_memo is not None:
            self._line_memo.update(zip(lines, replacements, strict=True))
        self.uri_count += len(urls)

    def _resolve_joined(self, joined: str, count: int) -> tuple[Sequence[str | None], bool]:
        """The URLs of ``count`` references joined by newlines (None: not a web URL), and
        whether all of them are URLs (no None)."""
        directory = self._base.directory
        assert directory is not None
        heads = "\n" + joined
        if "/." not in joined:
            if (
                ":" not in joined
                and "\n/" not in heads
                and "\n?" not in heads
                and "\n." not in heads
            ):
                # All "seg_00001.ts": the directory in front of each (PlaylistBase.resolve).
                return (directory + joined.replace("\n", "\n" + directory)).split("\n"), True
            # All absolute already, when every line starts like the first: a lower-case web
            # scheme and the first character of a host (not "/", "?", "#": empty hosts).
            if joined.startswith(("https://", "http://")):
                host_at = joined.index("//") + 2
                if (
                    joined[host_at : host_at + 1] not in _NOT_A_HOST
                    and heads.count("\n" + joined[: host_at + 1]) == count
                ):
                    return joined.split("\n"), True
        resolve = self._resolve_text
        return [resolve(text) for text in joined.split("\n")], False

    def _resolve_text(self, text: str) -> str | None:
        """PlaylistBase.resolve, with the commonest form, "seg_00001.ts", a concatenation.

        Not root-relative, query-only or maybe a dot segment, no scheme: the directory plus the
        text. (The checks run on str: ``bytes in bytes`` is several times slower.)
        """
        if text[0] not in "/?." and "/." not in text and ":" not in text:
            return self._base.directory + text  # type: ignore[operator]
        return self._base.resolve(text)

    def _resolve_bytes(self, reference: bytes) -> str | None:
        try:
            return self._resolve_text(reference.decode())
        except UnicodeDecodeError:
            return _GENERAL  # not valid UTF-8: the general path keeps its bytes

    # -- lines ---------------------------------------------------------------------------

    def uri_line(self, line: bytes) -> bytes | None:
        """A line that does not start with '#': a URI, blank, or an indented tag/comment."""
        uri = line.strip()
        if not uri:
            return line
        if uri[0] == 0x23:
            return self.tag_line(line, line.index(b"#"))
        if not self._variant_pending:
            return self._media_uri_line(line, uri)
        self._variant_pending = False
        return self._splice(line, uri, self._rewrite_uri(uri, UriKind.PLAYLIST, self._imports))

    def _media_uri_line(self, line: bytes, uri: bytes | None = None) -> bytes:
        """A URI line that is not a variant stream's: media (segments, parts)."""
        if uri is None:
            uri = line.strip()
        return self._splice(line, uri, self._rewrite_uri(uri, UriKind.MEDIA, _NO_IMPORTS))

    @staticmethod
    def _splice(line: bytes, uri: bytes, replacement: bytes | None) -> bytes:
        if replacement is None:
            return line
        if uri is line:  # nothing around the URI (bytes.strip returns the object itself)
            return replacement
        lead = line.find(uri)
        return line[:lead] + replacement + line[lead + len(uri) :]

    def tag_line(self, line: bytes, hash_at: int) -> bytes | None:
        """A tag or comment line; None drops it."""
        colon = line.find(b":", hash_at)
        name = line[hash_at + 1 : colon] if colon >= 0 else line[hash_at + 1 :].rstrip()
        handler = _TAG_HANDLERS.get(name)
        if handler is not None:
            return handler(self, line, colon)
        rule = _URI_RULES.get(name)
        if rule is not None:
            if rule.multivariant:
                self.is_multivariant = True
            return self._attribute_line(line, colon, rule)
        if colon >= 0 and self._variables is not None and b"{$" in line:
            return self._attribute_line(line, colon, None)
        return line

    # -- URIs and attributes ----------------------------------------------------------------

    def _rewrite_uri(self, uri: bytes, kind: UriKind, imports: Mapping[str, str]) -> bytes | None:
        """The replacement for one URI's bytes, or None to keep them (after substitution)."""
        variables = self._variables
        substituted = uri if variables is None else variables.substitute(uri)
        try:
            text = substituted.decode()
        except UnicodeDecodeError:
            text = substituted.decode("utf-8", "surrogateescape")  # keep the bytes as they are
        url = self._base.resolve(text)
        if url is None:
            return None if substituted is uri else substituted
        self.uri_count += 1
        replacement = self._map_uri(url, kind, imports)
        try:
            return replacement.encode()
        except UnicodeEncodeError:
            return replacement.encode("utf-8", "surrogateescape")

    def _attribute_line(self, line: bytes, colon: int, rule: _UriRule | None) -> bytes:
        """Substitute variables in quoted-string and hexadecimal values; rewrite URI values."""
        if colon < 0:
            return line
        attributes = scan_attribute_list(line, colon + 1)
        if not attributes:
            return line
        uri_kinds = _NO_URI_ATTRIBUTES
        kind_override: UriKind | None = None
        imports = _NO_IMPORTS
        if rule is not None:
            uri_kinds = rule.uri_kinds
            if rule.kind_by_type:
                for name, start, end, _ in attributes:
                    if name == b"TYPE":
                        kind_override = rule.kind_by_type.get(line[start:end])
            if rule.multivariant:
                imports = self._imports
        variables = self._variables
        pieces: list[bytes] = []
        done = 0
        for name, start, end, quoted in attributes:
            replacement: bytes | None = None
            kind = uri_kinds.get(name)
            if kind is not None:
                kind = kind_override or kind
                # The value is handed over stripped; the whole quoted content is replaced.
                uri = line[start:end].strip()
                if uri:
                    replacement = self._rewrite_uri(
                        uri, kind, imports if kind is UriKind.PLAYLIST else _NO_IMPORTS
                    )
            elif variables is not None:
                value = line[start:end]
                # §4.3: references are resolved in quoted-strings and hexadecimal-sequences.
                if (quoted or value[:2] in (b"0x", b"0X")) and b"{$" in value:
                    replacement = variables.substitute(value)
            if replacement is not None:
                pieces.append(line[done:start])
                pieces.append(replacement)
                done = end
        if not pieces:
            return line
        pieces.append(line[done:])
        return b"".join(pieces)

    # -- tag handlers (exact names) -----------------------------------------------------------

    def _variant_stream(self, line: bytes, colon: int) -> bytes | None:
        """EXT-X-STREAM-INF (RFC 8216bis §4.4.6.2): the next URI line is a media playlist."""
        self.is_multivariant = True
        self._variant_pending = True
        if self._variables is not None and b"{$" in line:
            return self._attribute_line(line, colon, None)
        return line

    def _define(self, line: bytes, colon: int) -> bytes | None:
        """EXT-X-DEFINE (RFC 8216bis §4.4.2.3): define, then drop the line."""
        if self._variables is not None and colon >= 0:
            define_from_line(
                line,
                colon,
                self._variables,
                query_urls=self._query_urls,
                imported=self._imported,
            )
        return None

    def _target_duration(self, line: bytes, colon: int) -> bytes | None:
        """EXT-X-TARGETDURATION (RFC 8216bis §4.4.3.1)."""
        if self.target_duration is None and colon >= 0:
            self.target_duration = _decimal(line[colon + 1 :])
        return line

    def _part_inf(self, line: bytes, colon: int) -> bytes | None:
        """EXT-X-PART-INF (RFC 8216bis §4.4.3.7): PART-TARGET."""
        if self.part_target is None and colon >= 0:
            for name, start, end, _ in scan_attribute_list(line, colon + 1):
                if name == b"PART-TARGET":
                    self.part_target = _decimal(line[start:end])
                    break
        return line

    def _endlist(self, line: bytes, colon: int) -> bytes | None:
        """EXT-X-ENDLIST (RFC 8216bis §4.4.3.4)."""
        self.endlist = True
        return line

    def _playlist_type(self, line: bytes, colon: int) -> bytes | None:
        """EXT-X-PLAYLIST-TYPE (RFC 8216bis §4.4.3.5): VOD or EVENT."""
        if self.playlist_type is None and colon >= 0:
            value = line[colon + 1 :].strip().decode("ascii", "replace").upper()
            self.playlist_type = value if value in _PLAYLIST_TYPES else None
        return line


# Tag handlers by exact tag name, as plain functions of the class: a dict of bound methods on
# each rewriter would make it a reference cycle (rewriter -> dict -> method -> rewriter), left
# with its whole playlist for the garbage collector instead of freed when the rewrite returns.
_TAG_HANDLERS: Final[Mapping[bytes, Callable[[_PlaylistRewriter, bytes, int], bytes | None]]] = {
    _VARIANT_STREAM_TAG: _PlaylistRewriter._variant_stream,
    _DEFINE_TAG: _PlaylistRewriter._define,
    b"EXT-X-TARGETDURATION": _PlaylistRewriter._target_duration,
    b"EXT-X-PART-INF": _PlaylistRewriter._part_inf,
    b"EXT-X-ENDLIST": _PlaylistRewriter._endlist,
    b"EXT-X-PLAYLIST-TYPE": _PlaylistRewriter._playlist_type,
}


def _evaluate_defines(
    lines: list[bytes], query_urls: tuple[str, ...], imported: Mapping[str, str]
) -> Variables:
    """Every variable the playlist defines, wherever its EXT-X-DEFINE line sits."""
    variables = Variables()
    for line in lines:
        hash_at = line.find(b"#")
        if hash_at < 0 or not line.startswith(_DEFINE_PREFIX, hash_at):
            continue
        if line[:hash_at].strip():
            continue
        name, colon = _tag_name(line, hash_at)
        if name == _DEFINE_TAG and colon >= 0:
            define_from_line(line, colon, variables, query_urls=query_urls, imported=imported)
    return variables


def rewrite_playlist(
    body: bytes,
    playlist_url: str,
    map_uri: UriMapper,
    *,
    request_url: str | None = None,
    imported: Mapping[str, str] | None = None,
    line_memo: MutableMapping[bytes, bytes] | None = None,
    map_media: MediaMapper | None = None,
) -> tuple[bytes, PlaylistInfo]:
    """Rewrite every URI of an m3u8 body through ``map_uri``; keep every other byte.

    ``playlist_url`` is the final, post-redirect URL: the base for relative references and
    where QUERYPARAM looks first. ``request_url`` is the URL originally requested (QUERYPARAM's
    fallback). ``imported`` holds the variables handed down from the parent multivariant
    playlist, for EXT-X-DEFINE:IMPORT.

    ``line_memo``, when given, remembers the rewritten form of plain segment URI lines (no
    variables, not a variant) so that a reload only resolves and maps the lines it has not seen.
    It is only valid for one ``playlist_url`` and one deterministic ``map_uri``: the caller keys
    its memos by both.

    ``map_media``, when given, maps those same plain segment URI lines in one call after the pass
    (it must agree with ``map_uri`` for ``UriKind.MEDIA`` without imports); the other URIs still
    go through ``map_uri`` one at a time, as they come.
    """
    bom = b""
    if body.startswith(_BOM):
        bom, body = _BOM, body[len(_BOM) :]
    lines = body.split(b"\n")
    imported = imported if imported is not None else _NO_IMPORTS
    # RFC 8216bis §4.4.2.3: "If the URI is redirected, the client MUST look for the query
    # parameter in the 30x response URI": the final URL first, then the one first asked for.
    query_urls = (playlist_url,) if request_url is None else (playlist_url, request_url)
    defines: Variables | None = None
    if _DEFINE_PREFIX in body:
        defines = _evaluate_defines(lines, query_urls, imported)
    rewriter = _PlaylistRewriter(
        playlist_url, map_uri, query_urls, imported, defines, line_memo, map_media
    )
    output = rewriter.rewrite_lines(lines)
    info = PlaylistInfo(
        is_multivariant=rewriter.is_multivariant,
        target_duration=rewriter.target_duration,
        part_target=rewriter.part_target,
        endlist=rewriter.endlist,
        playlist_type=rewriter.playlist_type,
        variables=rewriter.variables,
        uri_count=rewriter.uri_count,
    )
    return bom + b"\n".join(output), info

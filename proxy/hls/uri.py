"""URI reference resolution for playlist rewriting (RFC 3986 §5.2).

Every URI in a playlist is resolved here against the final, post-redirect URL of the playlist
that holds it, and only ``http``/``https`` results come out: this is where ``skd://``,
``data:`` and every other scheme are refused. The rewriter calls it once per URI, thousands of
times per playlist, so the common forms (``seg_00001.ts``, ``/live/x.ts``, an absolute URL)
take shortcuts that cost a concatenation instead of a parse, and give the same result.

This module must never re-encode, decode or normalise anything beyond RFC 3986 dot-segment
removal: CDN signatures live in these bytes. It never does I/O and never raises on input.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# RFC 3986 Appendix B, minus the scheme (matched separately, so that a first segment like
# "my file:1.ts", which is not a valid scheme, stays a relative path). Unmatched groups are
# None, which keeps "undefined" (no '?') apart from "empty" (a bare '?').
_AFTER_SCHEME = re.compile(r"(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?", re.DOTALL)
_WEB_SCHEMES = frozenset({"http", "https"})
_QUERY_OR_FRAGMENT = re.compile(r"[?#]")


class _Reference(NamedTuple):
    scheme: str | None
    authority: str | None
    path: str
    query: str | None
    fragment: str | None


def _split(reference: str) -> _Reference:
    scheme_match = _SCHEME.match(reference)
    if scheme_match is None:
        scheme, rest = None, reference
    else:
        scheme, rest = reference[: scheme_match.end() - 1], reference[scheme_match.end() :]
    parts = _AFTER_SCHEME.match(rest)
    assert parts is not None  # every group is optional: the pattern matches any string
    authority, path, query, fragment = parts.groups()
    return _Reference(scheme, authority, path, query, fragment)


def _recompose(
    scheme: str | None, authority: str | None, path: str, query: str | None, fragment: str | None
) -> str:
    """RFC 3986 §5.3."""
    pieces = []
    if scheme is not None:
        pieces.append(scheme + ":")
    if authority is not None:
        pieces.append("//" + authority)
    pieces.append(path)
    if query is not None:
        pieces.append("?" + query)
    if fragment is not None:
        pieces.append("#" + fragment)
    return "".join(pieces)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4. Linear time, even on a hostile, huge path."""
    if "." not in path:
        return path
    if path.startswith("/"):
        # An absolute path (every merged path of a web URL): the same result, segment-wise.
        segments = path.split("/")
        kept: list[str] = []
        for segment in segments[1:]:
            if segment == "..":
                if kept:
                    kept.pop()
            elif segment != ".":
                kept.append(segment)
        if segments[-1] in (".", ".."):
            kept.append("")  # "/a/b/.." is the directory "/a/"
        return "/" + "/".join(kept)
    output: list[str] = []
    i, n = 0, len(path)
    while i < n:
        if path.startswith("../", i):  # rule A
            i += 3
        elif path.startswith(("./", "/./"), i):  # rule A, and rule B: "/./" becomes "/"
            i += 2
        elif path.startswith("/.", i) and i + 2 == n:  # rule B: a final "/." becomes "/"
            output.append("/")
            i = n
        elif path.startswith("/../", i):  # rule C: "/../" becomes "/", drop a segment
            i += 3
            if output:
                output.pop()
        elif path.startswith("/..", i) and i + 3 == n:  # rule C: a final "/.."
            if output:
                output.pop()
            output.append("/")
            i = n
        elif (i + 1 == n and path[i] == ".") or (i + 2 == n and path.startswith("..", i)):
            i = n  # rule D
        else:  # rule E: move the first segment, with its leading "/", to the output
            end = path.find("/", i + 1 if path[i] == "/" else i)
            if end < 0:
                end = n
            output.append(path[i:end])
            i = end
    return "".join(output)


def _merge(base: _Reference, reference_path: str) -> str:
    """RFC 3986 §5.2.3."""
    if base.authority is not None and not base.path:
        return "/" + reference_path
    return base.path[: base.path.rfind("/") + 1] + reference_path


def _resolve_split(base: _Reference, ref: _Reference) -> str:
    """RFC 3986 §5.2.2 (strict parser) on split references, then §5.3."""
    if ref.scheme is not None:
        return _recompose(
            ref.scheme, ref.authority, remove_dot_segments(ref.path), ref.query, ref.fragment
        )
    authority: str | None
    if ref.authority is not None:
        authority, path, query = ref.authority, remove_dot_segments(ref.path), ref.query
    else:
        authority = base.authority
        if not ref.path:
            path = base.path
            query = ref.query if ref.query is not None else base.query
        else:
            if ref.path.startswith("/"):
                path = remove_dot_segments(ref.path)
            else:
                path = remove_dot_segments(_merge(base, ref.path))
            query = ref.query
    return _recompose(base.scheme, authority, path, query, ref.fragment)


def resolve_reference(base_url: str, reference: str) -> str:
    """The target URI of ``reference`` against ``base_url``: RFC 3986 §5.2.2, strict parser.

    Any scheme; no policy. Percent-escapes and every other character are kept as written.
    """
    return _resolve_split(_split(base_url), _split(reference))


def _is_web_url(url: str) -> bool:
    scheme_match = _SCHEME.match(url)
    if scheme_match is None:
        return False
    if url[: scheme_match.end() - 1].lower() not in _WEB_SCHEMES:
        return False
    # "http:foo" and "http:///x" have no host to fetch from.
    rest = url[scheme_match.end() :]
    return rest.startswith("//") and len(rest) > 2 and rest[2] not in "/?#"


class PlaylistBase:
    """The resolution base of one playlist, prepared once for thousands of references."""

    __slots__ = ("_directory_path", "_origin", "_parts", "_scheme", "directory", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self._parts = base = _split(url)
        self._scheme = (base.scheme or "") + ":"
        self._origin = ""
        self._directory_path = ""
        self.directory: str | None = None
        """The base URL up to its last '/' (RFC 3986 §5.2.3), or None for a non-web base."""
        if _is_web_url(url):
            self._origin = _recompose(base.scheme, base.authority, "", None, None)
            # The merged-and-normalised directory: RFC 3986 §5.2.3 plus §5.2.4 applied to the
            # base alone, which equals the full algorithm for a reference with no dot segments.
            self._directory_path = remove_dot_segments(_merge(base, ""))
            self.directory = self._origin + self._directory_path

    def resolve(self, reference: str) -> str | None:
        """See :func:`resolve_uri`."""
        if not reference:
            return None
        if self.directory is not None:
            # Shortcuts for the common forms, each giving exactly what the full algorithm
            # (below) gives, for a concatenation or two instead of a parse.
            first = reference[0]
            if first == "/":
                if reference[1:2] != "/":  # "/live/x.ts"
                    if "/." not in reference:
                        return self._origin + reference
                    return self._with_dot_segments(reference)
                if "/." not in reference and reference[2:3] not in "/?#":
                    return self._scheme + reference  # "//cdn.example/x.ts"
            elif first in "?#":
                pass
            elif reference.startswith(("https://", "http://")):
                if "/." not in reference:  # already absolute; needs a host
                    host_at = reference.index("//") + 2
                    return reference if reference[host_at : host_at + 1] not in "/?#" else None
            elif ":" in reference and _SCHEME.match(reference) is not None:
                pass  # another scheme, or an odd spelling of http: the full algorithm decides
            elif first != "." and "/." not in reference:
                return self.directory + reference  # "seg.ts", "720p/index.m3u8?x=1"
            else:
                return self._with_dot_segments(reference)  # "../x.ts", "a/./b.ts"
        target = _resolve_split(self._parts, _split(reference))
        return target if _is_web_url(target) else None

    def _with_dot_segments(self, reference: str) -> str:
        """A relative or root-relative path reference, maybe with dot segments (§5.2.2)."""
        cut = _QUERY_OR_FRAGMENT.search(reference)
        path_end = cut.start() if cut is not None else len(reference)
        path = reference[:path_end]
        if not path.startswith("/"):
            path = self._directory_path + path
        # The query and fragment are kept as written: dot segments only exist in the path.
        return self._origin + remove_dot_segments(path) + reference[path_end:]


def resolve_uri(base_url: str, reference: str) -> str | None:
    """Absolute http(s) URL for ``reference`` (RFC 3986 §5.2) against ``base_url``.

    ``base_url`` is the final, post-redirect URL of the playlist. Returns None when the result
    is not an http/https URL with a host (``skd:``, ``data:``, other schemes, an empty
    reference). Nothing is re-encoded: percent-escapes and odd characters stay byte-exact.
    """
    # One-off calls; the rewriter keeps one PlaylistBase for a whole playlist instead.
    return PlaylistBase(base_url).resolve(reference)

"""URI reference resolution for playlist rewriting (RFC 3986 §5.2).

Every URI in a playlist is resolved here against the final, post-redirect URL of the playlist
that holds it, and only ``http``/``https`` results come out: this is where ``skd://``,
``data:`` and every other scheme are refused. The rewriter calls it once per URI, thousands of
times per playlist, so a plain relative reference (``seg_00001.ts``) takes a fast path that is
one string concatenation.

This module must never re-encode, decode or normalise anything beyond RFC 3986 dot-segment
removal: CDN signatures live in these bytes. It never does I/O and never raises on input.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# RFC 3986 Appendix B, minus the scheme (matched separately, so that a first segment like
# "my file:1.ts", which is not a valid scheme, stays a relative path). Unmatched groups are
# None, which keeps "undefined" (no '?') apart from "empty" (a bare '?').
_AFTER_SCHEME = re.compile(r"(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?", re.DOTALL)
_WEB_SCHEMES = frozenset({"http", "https"})


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
    """RFC 3986 §5.2.4, in one left-to-right pass (linear even on a hostile, huge path)."""
    if "." not in path:
        return path
    output: list[str] = []
    i, n = 0, len(path)
    while i < n:
        if path.startswith("../", i):  # rule A
            i += 3
        elif path.startswith("./", i):  # noqa: SIM114 - rule A and rule B, kept apart as in the RFC
            i += 2
        elif path.startswith("/./", i):  # rule B: "/./" becomes "/"
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


def resolve_reference(base_url: str, reference: str) -> str:
    """The target URI of ``reference`` against ``base_url``: RFC 3986 §5.2.2, strict parser.

    Any scheme; no policy. Percent-escapes and every other character are kept as written.
    """
    base = _split(base_url)
    ref = _split(reference)
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

    __slots__ = ("directory", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        directory: str | None = None
        if _is_web_url(url):
            base = _split(url)
            # The merged-and-normalised directory: RFC 3986 §5.2.3 plus §5.2.4 applied to the
            # base alone, which equals the full algorithm for a reference with no dot segments.
            directory_path = remove_dot_segments(_merge(base, ""))
            directory = _recompose(base.scheme, base.authority, directory_path, None, None)
        self.directory = directory
        """The base URL up to its last '/' (RFC 3986 §5.2.3), or None for a non-web base."""

    def resolve(self, reference: str) -> str | None:
        """See :func:`resolve_uri`."""
        if not reference:
            return None
        directory = self.directory
        if (
            directory is not None
            and reference[0] not in "/?#."
            and "/." not in reference
            and (":" not in reference or _SCHEME.match(reference) is None)
        ):
            # Fast path: a plain relative path is appended to the base directory as is.
            return directory + reference
        target = resolve_reference(self.url, reference)
        return target if _is_web_url(target) else None


@functools.lru_cache(maxsize=256)
def _playlist_base(url: str) -> PlaylistBase:
    return PlaylistBase(url)


def resolve_uri(base_url: str, reference: str) -> str | None:
    """Absolute http(s) URL for ``reference`` (RFC 3986 §5.2) against ``base_url``.

    ``base_url`` is the final, post-redirect URL of the playlist. Returns None when the result
    is not an http/https URL with a host (``skd:``, ``data:``, other schemes, an empty
    reference). Nothing is re-encoded: percent-escapes and odd characters stay byte-exact.
    """
    return _playlist_base(base_url).resolve(reference)

"""The tag table: which playlist tags carry URIs, in which attributes, and what they point at.

One row per tag, looked up by the tag's exact name. Adding a URI-bearing tag is one row here
plus a test; ``tests/unit/test_hls_tags.py`` checks every name against the RFC 8216bis tag list
so that a misspelt name cannot silently leave URIs un-proxied.

This module is data. It must never parse, resolve or rewrite anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from proxy.hls.kinds import UriKind

_NO_OVERRIDES: Final[Mapping[str, UriKind]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class UriTag:
    """A tag whose attribute list holds URIs."""

    name: str
    """The tag name without the leading ``#``, exactly as the specification spells it."""
    uri_attributes: Mapping[str, UriKind]
    """Attribute name -> the kind of resource its URI points at."""
    section: str
    """Where the tag is defined (RFC 8216bis section unless stated otherwise)."""
    multivariant: bool
    """The tag belongs to a multivariant playlist (its PLAYLIST children may import variables)."""
    kind_by_type: Mapping[str, UriKind]
    """``TYPE`` attribute value -> the kind that replaces the row's kind for this line."""


def _row(
    name: str,
    uri_attributes: dict[str, UriKind],
    section: str,
    *,
    multivariant: bool = False,
    kind_by_type: dict[str, UriKind] | None = None,
) -> UriTag:
    return UriTag(
        name,
        MappingProxyType(uri_attributes),
        section,
        multivariant,
        MappingProxyType(kind_by_type) if kind_by_type else _NO_OVERRIDES,
    )


URI_TAGS: Final[tuple[UriTag, ...]] = (
    # RFC 8216bis §4.4.4.4: the key that decrypts the following segments.
    _row("EXT-X-KEY", {"URI": UriKind.KEY}, "RFC 8216bis §4.4.4.4"),
    # RFC 8216bis §4.4.4.5: the media initialization section of the following segments.
    _row("EXT-X-MAP", {"URI": UriKind.INIT}, "RFC 8216bis §4.4.4.5"),
    # RFC 8216bis §4.4.4.9: an LL-HLS partial segment.
    _row("EXT-X-PART", {"URI": UriKind.MEDIA}, "RFC 8216bis §4.4.4.9"),
    # RFC 8216bis §4.4.5.1: interstitials (HLS Interstitials, Apple) name their asset playlist
    # in X-ASSET-URI and a JSON asset list in X-ASSET-LIST; X-URI is a client-defined
    # attribute (the X- prefix, §4.4.5.1) that players fetch as is, so it must be proxied too.
    _row(
        "EXT-X-DATERANGE",
        {"X-ASSET-URI": UriKind.PLAYLIST, "X-ASSET-LIST": UriKind.MEDIA, "X-URI": UriKind.MEDIA},
        "RFC 8216bis §4.4.5.1 (X-ASSET-URI, X-ASSET-LIST: HLS Interstitials)",
    ),
    # RFC 8216bis §4.4.5.3: a resource the client may fetch before it is listed; TYPE=MAP
    # hints at the next initialization section, TYPE=PART at the next partial segment.
    _row(
        "EXT-X-PRELOAD-HINT",
        {"URI": UriKind.MEDIA},
        "RFC 8216bis §4.4.5.3",
        kind_by_type={"MAP": UriKind.INIT},
    ),
    # RFC 8216bis §4.4.5.4: another rendition's media playlist, for LL-HLS switching.
    _row("EXT-X-RENDITION-REPORT", {"URI": UriKind.PLAYLIST}, "RFC 8216bis §4.4.5.4"),
    # RFC 8216bis §4.4.6.1: an alternative rendition's media playlist.
    _row("EXT-X-MEDIA", {"URI": UriKind.PLAYLIST}, "RFC 8216bis §4.4.6.1", multivariant=True),
    # RFC 8216bis §4.4.6.3: an I-frame (trick play) media playlist.
    _row(
        "EXT-X-I-FRAME-STREAM-INF",
        {"URI": UriKind.PLAYLIST},
        "RFC 8216bis §4.4.6.3",
        multivariant=True,
    ),
    # RFC 8216bis §4.4.6.4: a JSON session-data document.
    _row("EXT-X-SESSION-DATA", {"URI": UriKind.MEDIA}, "RFC 8216bis §4.4.6.4", multivariant=True),
    # RFC 8216bis §4.4.6.5: a key announced in the multivariant playlist for preloading.
    _row("EXT-X-SESSION-KEY", {"URI": UriKind.KEY}, "RFC 8216bis §4.4.6.5", multivariant=True),
    # RFC 8216bis §4.4.6.6: the content steering server (a JSON steering manifest).
    _row(
        "EXT-X-CONTENT-STEERING",
        {"SERVER-URI": UriKind.MEDIA},
        "RFC 8216bis §4.4.6.6",
        multivariant=True,
    ),
    # Not RFC 8216bis: the image media playlist specification (Roku, adopted by Apple for
    # thumbnail tracks) defines EXT-X-IMAGE-STREAM-INF like EXT-X-I-FRAME-STREAM-INF.
    _row(
        "EXT-X-IMAGE-STREAM-INF",
        {"URI": UriKind.PLAYLIST},
        "HLS Image Media Playlists (Roku/Apple), not RFC 8216bis",
        multivariant=True,
    ),
)

URI_TAGS_BY_NAME: Final[Mapping[str, UriTag]] = MappingProxyType({t.name: t for t in URI_TAGS})

# RFC 8216bis §4.4.6.2: a variant stream; its media playlist URI is the next URI line.
VARIANT_STREAM_TAG: Final = "EXT-X-STREAM-INF"

# RFC 8216bis §4.4.2.3: variable definitions, substituted by the proxy and then dropped.
DEFINE_TAG: Final = "EXT-X-DEFINE"

# Tags that only appear in a multivariant playlist (RFC 8216bis §4.4.6, plus the image
# stream tag); any one of them makes a playlist multivariant.
MULTIVARIANT_TAGS: Final[frozenset[str]] = frozenset(
    {VARIANT_STREAM_TAG} | {t.name for t in URI_TAGS if t.multivariant}
)

"""How long each proxied response may be kept: hlsrelay's own store, and edge caches in front.

The cache policy table of DESIGN.md, as pure functions of what the rewriter learned about a
playlist (:class:`~proxy.hls.rewrite.PlaylistInfo`) or of a URI's kind:

=================================  ===================================================
live media playlist                ``max-age`` = half the target duration (1 s for LL-HLS)
blocking reload (``_HLS_msn``)     up to 6 x the target duration
VOD / ENDLIST playlist             long (``cache.vod_max_age``)
multivariant playlist              ``cache.multivariant_max_age``
segment, part, init section        long, ``immutable``
key                                ``private, no-store``
404 of a not-yet-available object  1 s
=================================  ===================================================

``fresh_for`` (float seconds) is what hlsrelay's own store uses; ``max_age`` (whole seconds, never
above ``fresh_for`` unless that is under a second) is what goes into ``Cache-Control``. Nothing
here does I/O or knows about HTTP libraries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proxy.hls.kinds import UriKind
from proxy.hls.rewrite import PlaylistInfo

LL_HLS_MAX_AGE = 1.0
"""Seconds an LL-HLS (non-blocking) playlist stays fresh: a part arrives about every second."""
BLOCKING_RELOAD_TARGETS = 6
"""A blocking reload's answer stays valid this many target durations (RFC 8216bis 6.2.5.2)."""
NOT_FOUND_MAX_AGE = 1
"""A 404 may be a live segment that is not there *yet*: edges must ask again within a second."""
_UNKNOWN_TARGET_MAX_AGE = 1.0


@dataclass(frozen=True, slots=True)
class PolicyLimits:
    """The configurable ages (``[cache]`` section), in seconds."""

    vod_max_age: int = 86400
    multivariant_max_age: int = 60
    media_max_age: int = 31536000


@dataclass(frozen=True, slots=True)
class Freshness:
    """How long one response may be kept, and the header that says so."""

    fresh_for: float
    """Seconds hlsrelay's own store treats the response as fresh (0: never stored)."""
    cache_control: str
    """The ``Cache-Control`` header value for viewers and edge caches."""
    shared: bool = True
    """Whether any cache but hlsrelay's own may keep it (False for keys)."""

    @property
    def max_age(self) -> int:
        return _whole_seconds(self.fresh_for)


def _whole_seconds(seconds: float) -> int:
    # Rounded down so an edge never keeps a live playlist longer than hlsrelay itself would,
    # but never 0: "max-age=0" would turn every viewer request into an origin request.
    return max(1, math.floor(seconds))


def _public(seconds: float, *extra: str) -> Freshness:
    directives = ", ".join(("public", f"max-age={_whole_seconds(seconds)}", *extra))
    return Freshness(seconds, directives)


def playlist_freshness(
    info: PlaylistInfo, *, blocking: bool = False, limits: PolicyLimits | None = None
) -> Freshness:
    """The freshness of a rewritten playlist.

    ``blocking`` is True when the request carried an LL-HLS ``_HLS_msn`` directive: the upstream
    held the answer until that segment or part existed, and it will not change for a while.
    """
    limits = limits or PolicyLimits()
    if info.is_multivariant:
        return _public(limits.multivariant_max_age)
    if info.endlist or info.playlist_type == "VOD":
        return _public(limits.vod_max_age)
    target = info.target_duration
    if blocking:
        if target is None or target <= 0:
            return _public(LL_HLS_MAX_AGE)
        return _public(min(BLOCKING_RELOAD_TARGETS * target, limits.vod_max_age))
    if info.part_target is not None:
        return _public(LL_HLS_MAX_AGE)
    if target is None or target <= 0:
        return _public(_UNKNOWN_TARGET_MAX_AGE)
    return _public(target / 2)


def media_freshness(kind: UriKind, limits: PolicyLimits | None = None) -> Freshness:
    """The freshness of a segment, part, init section or key (by the kind its token carries).

    A minted top-level URL (kind PLAYLIST) that turned out to be media is typically a
    progressive file or an endless live TS stream: it must not be kept as immutable.
    """
    limits = limits or PolicyLimits()
    if kind is UriKind.KEY:
        return Freshness(0.0, "private, no-store", shared=False)
    if kind is UriKind.PLAYLIST:
        return Freshness(0.0, "no-cache")
    return _public(limits.media_max_age, "immutable")


def not_found_freshness() -> Freshness:
    """The freshness of an upstream 404/410 passed on (a live object that is not there yet)."""
    return _public(NOT_FOUND_MAX_AGE)


def is_live(info: PlaylistInfo) -> bool:
    """A media playlist that still grows (no ENDLIST, not VOD)."""
    return not (info.is_multivariant or info.endlist or info.playlist_type == "VOD")


__all__ = [
    "BLOCKING_RELOAD_TARGETS",
    "LL_HLS_MAX_AGE",
    "NOT_FOUND_MAX_AGE",
    "Freshness",
    "PolicyLimits",
    "is_live",
    "media_freshness",
    "not_found_freshness",
    "playlist_freshness",
]

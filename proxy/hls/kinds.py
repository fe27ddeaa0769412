"""What a URI in a playlist points at.

The kind travels inside the ``ref`` token, so the proxy knows, before the upstream answers,
whether a response is a playlist to rewrite or media to stream through.
"""

from __future__ import annotations

import enum


class UriKind(enum.IntEnum):
    """The resource class of a proxied URI; the value is its one-byte wire form in tokens."""

    PLAYLIST = 1
    """A multivariant or media playlist (also rendition reports, interstitial assets)."""
    MEDIA = 2
    """A segment, a partial segment, or anything else that is streamed through as is."""
    KEY = 3
    """An encryption key (``EXT-X-KEY`` / ``EXT-X-SESSION-KEY``)."""
    INIT = 4
    """A media initialization section (``EXT-X-MAP``, ``EXT-X-PRELOAD-HINT TYPE=MAP``)."""

    @property
    def extension(self) -> str:
        """The file extension used when the upstream URI has no usable file name."""
        return _EXTENSIONS[self]


_EXTENSIONS = {
    UriKind.PLAYLIST: "m3u8",
    UriKind.MEDIA: "ts",
    UriKind.KEY: "key",
    UriKind.INIT: "mp4",
}

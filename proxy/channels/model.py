"""The channel model shared by the channel list, the HTTP surface and (through web) the live pool.

A :class:`Channel` is plain frozen data: where the stream comes from, the headers its upstream
wants, and the EXTINF attributes an IPTV player shows. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

ChannelKind = Literal["hls", "ts"]

_SLUG_DROP = re.compile(r"[^a-z0-9]+")
_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


@dataclass(frozen=True, slots=True)
class Channel:
    """One channel, from ``[[channels]]`` or from an M3U list."""

    id: str
    name: str
    url: str = field(repr=False)
    """Where the stream is read: http(s), or ``lavfi:GRAPH`` (config only: a local test pattern)."""
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    kind: ChannelKind | None = None
    """"hls" or "ts"; None when neither config nor URL says (found on first use)."""
    backup_urls: tuple[str, ...] = field(default=(), repr=False)
    logo: str = ""
    group: str = ""
    attributes: tuple[tuple[str, str], ...] = ()
    """EXTINF attributes as listed (tvg-id, tvg-name, tvg-logo, group-title, tvg-chno, catchup…)."""
    from_config: bool = False
    """Declared in ``[[channels]]`` (its id may label metrics), not imported from a list."""

    @property
    def header_map(self) -> dict[str, str]:
        return dict(self.headers)


def slug(text: str) -> str:
    """A URL-safe, stable id part from a display name ("Canal+ HD" -> "canal-hd")."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return _SLUG_DROP.sub("-", folded).strip("-")[:60]


def channel_id(tvg_id: str, name: str, url: str) -> str:
    """The stable id of a listed channel: its tvg-id, else a slug of its name.

    The URL is used only as a last resort, and then only hashed: a token-like query part must
    never become readable in an id (ids show up in URLs, logs and metrics).
    """
    tvg = tvg_id.strip()
    if tvg and _ID_OK.match(tvg):
        return tvg
    if tvg:
        candidate = slug(tvg)
        if candidate:
            return candidate
    candidate = slug(name)
    if candidate:
        return candidate
    return "ch-" + hashlib.sha256(url.encode()).hexdigest()[:12]


def valid_id(value: str) -> bool:
    return bool(_ID_OK.match(value))

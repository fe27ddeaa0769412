"""Channel URL forms: AceStream ids, Kodi header suffixes, Xtream lists, and guessing the kind.

Pure string work, no I/O.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

from proxy.channels.model import ChannelKind

_HEX40 = re.compile(r"^[0-9a-fA-F]{40}$")
_ACESTREAM = re.compile(r"^acestream://([0-9a-fA-F]{40})/?$")

# Kodi / VLC header names in a `url|Name=value&Name=value` suffix, mapped to HTTP header names.
_KODI_HEADER_NAMES = {
    "user-agent": "User-Agent",
    "referer": "Referer",
    "referrer": "Referer",
    "origin": "Origin",
    "cookie": "Cookie",
}


def acestream_url(url: str, engine: str) -> str | None:
    """``acestream://HASH`` or a bare 40-hex id as the engine's ``/ace/getstream?id=HASH``."""
    text = url.strip()
    match = _ACESTREAM.match(text)
    content_id = match.group(1) if match else (text if _HEX40.match(text) else None)
    if content_id is None:
        return None
    return f"{engine.rstrip('/')}/ace/getstream?id={content_id.lower()}"


def split_kodi_headers(url: str) -> tuple[str, dict[str, str]]:
    """Kodi's ``url|User-Agent=...&Referer=...`` as the URL and its headers."""
    base, sep, suffix = url.partition("|")
    if not sep:
        return url, {}
    headers: dict[str, str] = {}
    for name, value in parse_qsl(suffix, keep_blank_values=False):
        key = name.strip()
        if not key or any(c in key for c in " :\r\n"):
            continue
        headers[_KODI_HEADER_NAMES.get(key.lower(), key)] = value.strip()
    return base.strip(), headers


def is_xtream_list(url: str) -> bool:
    """An Xtream Codes ``get.php?username=..&password=..&type=m3u…`` list URL."""
    parts = urlsplit(url)
    if not parts.path.endswith("/get.php"):
        return False
    query = dict(parse_qsl(parts.query))
    return "username" in query and "password" in query


def guess_kind(url: str) -> ChannelKind | None:
    """ "hls" or "ts" from the URL alone, or None when it does not tell."""
    if url.startswith("lavfi:"):
        return "ts"
    parts = urlsplit(url)
    path = parts.path.lower()
    query = {k.lower(): v.lower() for k, v in parse_qsl(parts.query)}
    output = query.get("output", "") or query.get("extension", "")
    if path.endswith(("/ace/getstream", "/ace/getstream/")):
        return "ts"
    if path.endswith("/ace/manifest.m3u8"):
        return "hls"
    if output in ("ts", "mpegts"):
        return "ts"
    if output in ("m3u8", "hls"):
        return "hls"
    if path.endswith((".m3u8", ".m3u")):
        return "hls"
    if path.endswith((".ts", ".mpegts", ".mts")):
        return "ts"
    return None

"""IPTV "extended M3U" channel lists: parse them into entries, write them back out.

The parser is forgiving, as players are: it survives a BOM, CRLF, indented lines, junk lines,
comments, duplicate entries and a second ``#EXTM3U`` in the middle. It keeps every ``#EXTINF``
attribute in order (tvg-id, tvg-name, tvg-logo, group-title, tvg-chno, catchup…), and turns the
header hints players honour into upstream request headers: ``#EXTVLCOPT:http-referrer=`` /
``http-user-agent=`` / ``http-origin=``, an EXTINF ``user-agent=""`` / ``referer=""``
attribute, ``#KODIPROP:inputstream.adaptive.stream_headers=`` / ``…common_headers=``, and Kodi's
``url|User-Agent=...&Referer=...`` suffix.

Pure: text in, entries out; no I/O. It never decides channel ids or URLs through the proxy
(that is :mod:`proxy.channels.catalog`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urljoin

from proxy.channels.urls import split_kodi_headers

# key="value" or key=value (no spaces) inside an EXTINF line, before the title comma.
_ATTRIBUTE = re.compile(r'([A-Za-z0-9_.:-]+)=(?:"([^"]*)"|([^\s",]+))')
_VLC_HEADERS = {
    "http-referrer": "Referer",
    "http-referer": "Referer",
    "http-user-agent": "User-Agent",
    "http-origin": "Origin",
    "http-cookie": "Cookie",
}
_EXTINF_HEADERS = {"user-agent": "User-Agent", "referer": "Referer", "referrer": "Referer"}
_KODI_HEADER_PROPS = (
    "inputstream.adaptive.stream_headers",
    "inputstream.adaptive.common_headers",
    "inputstream.adaptive.manifest_headers",
)
_URL_SCHEMES = ("http://", "https://", "acestream://", "rtmp://", "rtsp://", "udp://", "rtp://")


@dataclass(slots=True)
class M3uEntry:
    """One listed stream: its title, EXTINF attributes, URL and the headers it asks for."""

    title: str
    url: str
    duration: str = "-1"
    attributes: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    group: str = ""
    """From group-title, else the last #EXTGRP."""

    def attribute(self, name: str) -> str:
        lowered = name.lower()
        for key, value in self.attributes:
            if key.lower() == lowered:
                return value
        return ""


@dataclass(slots=True)
class M3uList:
    entries: list[M3uEntry]
    header_attributes: list[tuple[str, str]]
    """Attributes of the ``#EXTM3U`` line (url-tvg, x-tvg-url, …)."""


def parse_extinf(line: str) -> tuple[str, list[tuple[str, str]], str]:
    """``#EXTINF:-1 a="b" c=d,Title`` as (duration, attributes, title)."""
    body = line[len("#EXTINF:") :].strip()
    # The title starts at the first comma outside quotes.
    in_quotes = False
    split_at = -1
    for index, char in enumerate(body):
        if char == '"':
            in_quotes = not in_quotes
        elif char == "," and not in_quotes:
            split_at = index
            break
    head, title = (body[:split_at], body[split_at + 1 :]) if split_at >= 0 else (body, "")
    head = head.strip()
    duration, _, rest = head.partition(" ")
    if not _looks_like_number(duration):
        duration, rest = "-1", head
    attributes = [
        (m.group(1), m.group(2) if m.group(2) is not None else (m.group(3) or ""))
        for m in _ATTRIBUTE.finditer(rest)
    ]
    return duration or "-1", attributes, title.strip()


def _looks_like_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?\d+(\.\d+)?", text))


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _kodi_prop_headers(value: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, header_value in parse_qsl(value, keep_blank_values=False):
        name = name.strip()
        if name and not any(c in name for c in " :\r\n"):
            headers[name] = header_value.strip()
    return headers


def parse_m3u(text: str, base_url: str | None = None) -> M3uList:
    """Parse an extended M3U channel list. Relative URLs resolve against ``base_url`` when given
    (and are dropped when not: a local file has nothing to resolve them against)."""
    text = text.removeprefix("\ufeff")
    entries: list[M3uEntry] = []
    header_attributes: list[tuple[str, str]] = []
    pending: M3uEntry | None = None
    pending_headers: dict[str, str] = {}
    pending_group = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            upper = line[:12].upper()
            if upper.startswith("#EXTM3U"):
                if not header_attributes:
                    header_attributes = [
                        (m.group(1), m.group(2) if m.group(2) is not None else (m.group(3) or ""))
                        for m in _ATTRIBUTE.finditer(line[7:])
                    ]
                continue
            if upper.startswith("#EXTINF:"):
                duration, attributes, title = parse_extinf(line)
                if pending is not None:
                    # The previous entry never got a URL: its headers must not leak to this one.
                    pending_headers = {}
                pending = M3uEntry(title=title, url="", duration=duration, attributes=attributes)
                for key, value in attributes:
                    header = _EXTINF_HEADERS.get(key.lower())
                    if header and value:
                        pending_headers.setdefault(header, value)
                continue
            if upper.startswith("#EXTVLCOPT:"):
                name, sep, value = line[len("#EXTVLCOPT:") :].partition("=")
                header = _VLC_HEADERS.get(name.strip().lower())
                if sep and header and _unquote(value):
                    # Options apply to the next URL (they may come before or after #EXTINF).
                    pending_headers[header] = _unquote(value)
                continue
            if upper.startswith("#KODIPROP:"):
                name, sep, value = line[len("#KODIPROP:") :].partition("=")
                if sep and name.strip().lower() in _KODI_HEADER_PROPS:
                    pending_headers.update(_kodi_prop_headers(value))
                continue
            if upper.startswith("#EXTGRP:"):
                pending_group = line[len("#EXTGRP:") :].strip()
                continue
            continue  # other tags and comments
        url, url_headers = split_kodi_headers(line)
        if not url.lower().startswith(_URL_SCHEMES) and not _is_bare_ace_id(url):
            if base_url is None or " " in url or "===" in url:
                continue  # a junk line (a separator, a stray word) or a relative URL, no base
            url = urljoin(base_url, url)
        entry = pending or M3uEntry(title="", url="")
        entry.url = url
        entry.headers = {**pending_headers, **url_headers}
        entry.group = entry.attribute("group-title") or pending_group
        entries.append(entry)
        pending = None
        pending_headers = {}
        pending_group = ""
    return M3uList(entries, header_attributes)


def _is_bare_ace_id(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdefABCDEF" for c in text)


def _quote_attribute(value: str) -> str:
    return value.replace('"', "'").replace("\r", " ").replace("\n", " ")


def format_m3u(
    items: list[tuple[str, list[tuple[str, str]], str]],
    header_attributes: list[tuple[str, str]] | None = None,
) -> str:
    """An extended M3U from ``(title, attributes, url)`` items (attributes written as given)."""
    head = "#EXTM3U"
    for key, value in header_attributes or []:
        head += f' {key}="{_quote_attribute(value)}"'
    lines = [head]
    for title, attributes, url in items:
        attrs = "".join(f' {key}="{_quote_attribute(value)}"' for key, value in attributes)
        clean_title = title.replace("\r", " ").replace("\n", " ")
        lines.append(f"#EXTINF:-1{attrs},{clean_title}")
        lines.append(url)
    return "\n".join(lines) + "\n"

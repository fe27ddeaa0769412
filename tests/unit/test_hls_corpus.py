"""Conformance sweep: every playlist of the shared corpus through ``rewrite_playlist``.

The corpus lives outside the repository (``../shared/corpus/hls``, provenance in its
SOURCES.md) and is never copied in. For each file, the expected output is computed here by
an oracle that shares no code with the rewriter: its own attribute regex, its own tag table,
``urllib.parse.urljoin`` for resolution and its own EXT-X-DEFINE evaluation. Every URI must be
replaced by the mapper's marker, ``skd:``/``data:`` and other schemes must not be, and every
other line must come out byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, urljoin, urlsplit

import pytest

from proxy.hls.kinds import UriKind
from proxy.hls.rewrite import rewrite_playlist

pytestmark = pytest.mark.corpus


def _corpus_dir() -> Path:
    override = os.environ.get("HLSRELAY_CORPUS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "shared" / "corpus" / "hls"


CORPUS = _corpus_dir()
if not CORPUS.is_dir():
    pytest.skip(
        f"playlist corpus not found at {CORPUS} (set HLSRELAY_CORPUS to its folder)",
        allow_module_level=True,
    )

_BOM = b"\xef\xbb\xbf"


def _is_playlist(path: Path) -> bool:
    if path.suffix.lower() in {".m3u8", ".m3u"}:
        return True
    if path.suffix.lower() in {".md", ".txt", ".json"} or not path.is_file():
        return False
    return path.read_bytes()[:16].removeprefix(_BOM).startswith(b"#EXTM3U")


FILES = sorted(p for p in CORPUS.iterdir() if _is_playlist(p))

PLAYLIST_URL = "https://origin.example/vod/path/playlist.m3u8?token=final&sig=abc"
REQUEST_URL = "https://entry.example/start.m3u8?token=requested"
IMPORTED = {"mvpVariable": "imported-value"}

# The oracle's own table (written from RFC 8216bis, not imported from proxy.hls.tags).
URI_ATTRIBUTES: dict[str, dict[str, UriKind]] = {
    "EXT-X-KEY": {"URI": UriKind.KEY},
    "EXT-X-SESSION-KEY": {"URI": UriKind.KEY},
    "EXT-X-MAP": {"URI": UriKind.INIT},
    "EXT-X-MEDIA": {"URI": UriKind.PLAYLIST},
    "EXT-X-I-FRAME-STREAM-INF": {"URI": UriKind.PLAYLIST},
    "EXT-X-IMAGE-STREAM-INF": {"URI": UriKind.PLAYLIST},
    "EXT-X-SESSION-DATA": {"URI": UriKind.MEDIA},
    "EXT-X-PART": {"URI": UriKind.MEDIA},
    "EXT-X-PRELOAD-HINT": {"URI": UriKind.MEDIA},
    "EXT-X-RENDITION-REPORT": {"URI": UriKind.PLAYLIST},
    "EXT-X-CONTENT-STEERING": {"SERVER-URI": UriKind.MEDIA},
    "EXT-X-DATERANGE": {
        "X-ASSET-URI": UriKind.PLAYLIST,
        "X-ASSET-LIST": UriKind.MEDIA,
        "X-URI": UriKind.MEDIA,
    },
}
# Children of these may import the multivariant playlist's variables.
IMPORTING_TAGS = {"EXT-X-MEDIA", "EXT-X-I-FRAME-STREAM-INF", "EXT-X-IMAGE-STREAM-INF"}

_ATTRIBUTE = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_REFERENCE = re.compile(r"\{\$([A-Za-z0-9_-]+)\}")
_QUOTED_OR_HEX = re.compile(r'"[^"]*"|=0[xX][^,\s]*')


def marker(kind: UriKind, url: str) -> str:
    digest = hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"https://relay.test/{kind.name.lower()}/{digest}"


class RecordingMapper:
    def __init__(self) -> None:
        self.calls: list[tuple[str, UriKind, dict[str, str]]] = []

    def __call__(self, url: str, kind: UriKind, imports: Mapping[str, str]) -> str:
        self.calls.append((url, kind, dict(imports)))
        return marker(kind, url)


def _proxied(uri: str) -> bool:
    """Would a player fetch this over HTTP: http(s), or relative to the http(s) playlist."""
    if not uri:
        return False
    scheme = _SCHEME.match(uri)
    return scheme is None or uri[: scheme.end() - 1].lower() in {"http", "https"}


class Oracle:
    """What the rewritten playlist must be, computed independently of proxy.hls."""

    def __init__(self) -> None:
        self.variables: dict[str, str] = {}
        self.expected_calls: list[tuple[str, UriKind, dict[str, str]]] = []
        self.all_variables: dict[str, str] = {}

    def _substitute(self, text: str) -> str:
        return _REFERENCE.sub(lambda m: self.variables.get(m.group(1), m.group(0)), text)

    def _define(self, text: str) -> None:
        attributes = dict(re.findall(r'([A-Z]+)="([^"]*)"', text))
        if "NAME" in attributes and "VALUE" in attributes:
            name, value = attributes["NAME"], self._substitute(attributes["VALUE"])
        elif "IMPORT" in attributes:
            name = attributes["IMPORT"]
            if name not in IMPORTED:
                return
            value = IMPORTED[name]
        elif "QUERYPARAM" in attributes:
            name = attributes["QUERYPARAM"]
            found = [
                v
                for url in (PLAYLIST_URL, REQUEST_URL)
                for k, v in parse_qsl(urlsplit(url).query)
                if k == name
            ]
            if not found:
                return
            value = found[0]
        else:
            return
        self.variables.setdefault(name, value)

    def _uri(self, uri: str, kind: UriKind, importing: bool) -> str | None:
        if not _proxied(uri):
            return None
        url = urljoin(PLAYLIST_URL, uri)
        imports = dict(self.all_variables) if importing and kind is UriKind.PLAYLIST else {}
        self.expected_calls.append((url, kind, imports))
        return marker(kind, url)

    def expected(self, body: bytes) -> bytes:
        bom = _BOM if body.startswith(_BOM) else b""
        text = body[len(bom) :].decode("utf-8", "surrogateescape")
        lines = text.split("\n")
        has_defines = any(line.strip().startswith("#EXT-X-DEFINE:") for line in lines)
        if has_defines:
            for line in lines:
                if line.strip().startswith("#EXT-X-DEFINE:"):
                    self._define(line)
            self.all_variables, self.variables = self.variables, {}
        out: list[str] = []
        variant_pending = False
        for index, line in enumerate(lines):
            stripped = line.strip(" \t\r\x0b\x0c")
            if has_defines and stripped.startswith("#EXT-X-DEFINE:"):
                self._define(stripped)
                if index == len(lines) - 1:
                    out.append("")
                continue
            if not stripped:
                out.append(line)
                continue
            if stripped.startswith("#"):
                name = stripped[1:].partition(":")[0]
                if name == "EXT-X-STREAM-INF":
                    variant_pending = True
                if has_defines and not stripped.startswith("#EXTINF"):
                    line = _QUOTED_OR_HEX.sub(lambda m: self._substitute(m.group(0)), line)
                table = URI_ATTRIBUTES.get(name)
                if table:
                    line = self._tag(line, name, table)
                out.append(line)
                continue
            uri = self._substitute(stripped) if has_defines else stripped
            kind = UriKind.PLAYLIST if variant_pending else UriKind.MEDIA
            replacement = self._uri(uri, kind, importing=variant_pending)
            variant_pending = False
            lead = line.index(stripped)
            new = replacement if replacement is not None else uri
            out.append(line[:lead] + new + line[lead + len(stripped) :])
        return bom + "\n".join(out).encode("utf-8", "surrogateescape")

    def _tag(self, line: str, name: str, table: dict[str, UriKind]) -> str:
        colon = line.index(":")
        attributes = list(_ATTRIBUTE.finditer(line, colon + 1))
        type_value = next((m.group(2) for m in attributes if m.group(1) == "TYPE"), None)
        pieces, done = [], 0
        for match in attributes:
            kind = table.get(match.group(1))
            if kind is None:
                continue
            if name == "EXT-X-PRELOAD-HINT" and type_value == "MAP":
                kind = UriKind.INIT
            raw = match.group(2)
            quoted = raw.startswith('"')
            value = raw[1:-1] if quoted else raw.rstrip(" \t\r")
            replacement = self._uri(value.strip(), kind, importing=name in IMPORTING_TAGS)
            if replacement is None:
                continue
            start = match.start(2) + (1 if quoted else 0)
            pieces += [line[done:start], replacement]
            done = start + len(value)
        return "".join(pieces) + line[done:]


@pytest.mark.parametrize("batch", [False, True], ids=["one-by-one", "batched"])
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_corpus_playlist_rewrites_every_uri_and_nothing_else(path: Path, batch: bool) -> None:
    """Batched: plain segment lines go through ``map_media`` (as StreamRelay does) instead."""
    body = path.read_bytes()
    mapper = RecordingMapper()

    def map_media(urls: list[str]) -> list[bytes]:
        return [mapper(url, UriKind.MEDIA, {}).encode() for url in urls]

    output, info = rewrite_playlist(
        body,
        PLAYLIST_URL,
        mapper,
        request_url=REQUEST_URL,
        imported=IMPORTED,
        map_media=map_media if batch else None,
    )
    oracle = Oracle()
    expected = oracle.expected(body)

    assert output.split(b"\n") == expected.split(b"\n")
    assert sorted(mapper.calls, key=repr) == sorted(oracle.expected_calls, key=repr)
    assert info.uri_count == len(oracle.expected_calls)
    for opaque in (b"skd://", b"data:"):
        assert output.count(opaque) == expected.count(opaque)
    assert not [url for url, _, _ in mapper.calls if not url.startswith(("http://", "https://"))]


def test_corpus_is_not_empty() -> None:
    assert len(FILES) > 100, f"only {len(FILES)} playlists in {CORPUS}"

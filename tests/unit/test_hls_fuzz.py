"""Property tests: arbitrary and mutated playlists never make the rewriter raise or drift."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.hls.attributes import scan_attribute_list
from proxy.hls.kinds import UriKind
from proxy.hls.rewrite import rewrite_playlist
from proxy.hls.uri import PlaylistBase, remove_dot_segments, resolve_reference, resolve_uri

PLAYLIST_URL = "https://origin.example/a/b/index.m3u8?t=1"

# Written out here (not imported) so the properties do not trust the table they check.
URI_TAG_NAMES = {
    b"EXT-X-KEY",
    b"EXT-X-SESSION-KEY",
    b"EXT-X-MAP",
    b"EXT-X-MEDIA",
    b"EXT-X-I-FRAME-STREAM-INF",
    b"EXT-X-IMAGE-STREAM-INF",
    b"EXT-X-SESSION-DATA",
    b"EXT-X-PART",
    b"EXT-X-PRELOAD-HINT",
    b"EXT-X-RENDITION-REPORT",
    b"EXT-X-CONTENT-STEERING",
    b"EXT-X-DATERANGE",
}

SAMPLES = [
    b"#EXTM3U\n#EXT-X-TARGETDURATION:6\n#EXTINF:6.000,\nseg_00001.ts\n#EXTINF:6.000,\n"
    b"seg_00002.ts\n#EXT-X-ENDLIST\n",
    b'#EXTM3U\r\n#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="en, US",URI="en/a.m3u8"\r\n'
    b'#EXT-X-STREAM-INF:BANDWIDTH=1280000,CODECS="avc1.4d401f,mp4a.40.2",AUDIO="a"\r\n'
    b"720p/index.m3u8\r\n",
    b'#EXTM3U\n#EXT-X-PART-INF:PART-TARGET=0.5\n#EXT-X-MAP:URI="init.mp4"\n'
    b'#EXT-X-KEY:METHOD=SAMPLE-AES,URI="skd://k",KEYFORMAT="com.apple.streamingkeydelivery"\n'
    b'#EXT-X-PART:DURATION=0.5,URI="p.0.mp4",INDEPENDENT=YES\n'
    b'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="p.1.mp4"\n'
    b'#EXT-X-RENDITION-REPORT:URI="../lo/i.m3u8",LAST-MSN=1\n'
    b'#EXT-X-DATERANGE:ID="x",X-ASSET-URI="//ads.example/a.m3u8"\n',
]


def _corpus_samples() -> list[bytes]:
    folder = Path(
        os.environ.get("HLSRELAY_CORPUS")
        or Path(__file__).resolve().parents[3] / "shared" / "corpus" / "hls"
    )
    if not folder.is_dir():
        return []
    return [p.read_bytes() for p in sorted(folder.glob("*.m3u8"))]


REAL_PLAYLISTS = SAMPLES + _corpus_samples()


def constant_mapper(url: str, kind: UriKind, imports: Mapping[str, str]) -> str:
    assert url.startswith(("http://", "https://", "HTTP", "Http", "hTTP"))
    return "/proxied"


def may_change(line: bytes) -> bool:
    """A URI line, or a tag of the URI table: the only lines allowed to differ."""
    stripped = line.strip()
    if not stripped:
        return False
    if not stripped.startswith(b"#"):
        return True
    return stripped[1:].split(b":", 1)[0].rstrip() in URI_TAG_NAMES


def check_invariants(body: bytes) -> None:
    output, info = rewrite_playlist(body, PLAYLIST_URL, constant_mapper)
    assert info.uri_count >= 0
    if b"EXT-X-DEFINE" in body:
        return
    lines_in = body.split(b"\n")
    lines_out = output.split(b"\n")
    assert len(lines_out) == len(lines_in)
    for before, after in zip(lines_in, lines_out, strict=True):
        if not may_change(before):
            assert after == before


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2_000))
def test_arbitrary_bytes_never_raise_and_keep_non_uri_lines(body: bytes) -> None:
    check_invariants(body)


LINE_PIECES = st.sampled_from(
    [
        b"#EXTM3U",
        b"#EXTINF:6,",
        b"#EXT-X-STREAM-INF:BANDWIDTH=1",
        b'#EXT-X-KEY:URI="k.key"',
        b'#EXT-X-MAP:URI="',
        b"#EXT-X-PRELOAD-HINT:TYPE=MAP,URI=i.mp4",
        b'#EXT-X-SESSION-DATA:VALUE="URI=\\"x\\",",URI="d.json"',
        b"seg.ts",
        b" ../x.ts\r",
        b"//h/x",
        b"skd://x",
        b"data:,x",
        b"?q",
        b"#",
        b"",
        b"\r",
        b"\xef\xbb\xbf",
        b"\xff\xfe",
        b"{$v}",
        b",",
        b'"',
        b"=",
    ]
)


@settings(max_examples=300)
@given(st.lists(st.lists(LINE_PIECES, max_size=4).map(b"".join), max_size=30))
def test_playlist_shaped_input_keeps_its_line_structure(lines: list[bytes]) -> None:
    check_invariants(b"\n".join(lines))


@st.composite
def mutated_playlists(draw: st.DrawFn) -> bytes:
    body = bytearray(draw(st.sampled_from(REAL_PLAYLISTS)))
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        position = draw(st.integers(min_value=0, max_value=len(body)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.binary(min_size=1, max_size=8) | LINE_PIECES)
        if action == "insert":
            body[position:position] = chunk
        elif action == "delete":
            del body[position : position + len(chunk)]
        else:
            body[position : position + len(chunk)] = chunk
    return bytes(body)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_playlists())
def test_mutated_real_playlists_never_raise_and_keep_non_uri_lines(body: bytes) -> None:
    check_invariants(body)


def marking_mapper(url: str, kind: UriKind, imports: Mapping[str, str]) -> str:
    return f"/{kind.name}/{url}/{sorted(imports.items())}"


def check_batched_agrees(body: bytes) -> None:
    """``map_media`` (batched segment lines), with and without a line memo, cold and warm,
    gives byte for byte what the one-by-one mapper gives, and counts the same URIs."""
    expected, info = rewrite_playlist(body, PLAYLIST_URL, marking_mapper)

    def map_media(urls: list[str]) -> list[bytes]:
        return [
            marking_mapper(url, UriKind.MEDIA, {}).encode("utf-8", "surrogateescape")
            for url in urls
        ]

    memo: dict[bytes, bytes] = {}
    for line_memo in (None, memo, memo):
        output, batched = rewrite_playlist(
            body, PLAYLIST_URL, marking_mapper, line_memo=line_memo, map_media=map_media
        )
        assert output == expected
        assert batched == info


@settings(max_examples=300)
@given(st.lists(st.lists(LINE_PIECES, max_size=4).map(b"".join), max_size=30))
def test_batched_segment_mapping_agrees_on_playlist_shaped_input(lines: list[bytes]) -> None:
    check_batched_agrees(b"\n".join(lines))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_playlists())
def test_batched_segment_mapping_agrees_on_mutated_real_playlists(body: bytes) -> None:
    check_batched_agrees(body)


@given(st.binary(max_size=500), st.integers(min_value=0, max_value=600))
def test_attribute_scanner_never_raises_and_stays_inside_the_line(line: bytes, start: int) -> None:
    previous_end = start
    for name, value_start, value_end, quoted in scan_attribute_list(line, start):
        assert previous_end <= value_start <= value_end <= len(line)
        assert name and line[value_start - 1 : value_start] in {b'"', b"=", b" ", b"\t"}
        assert (line[value_start - 1] == 0x22) is quoted
        previous_end = value_end


REFERENCE_TEXT = st.text(
    alphabet=st.sampled_from(list("abcXYZ019-_~%20:@!$&'()*+,;=é /?#.")), max_size=30
)
REFERENCES = st.builds(
    lambda prefix, rest: prefix + rest,
    st.sampled_from(["", "/", "//", "./", "../", "?", "#", "http://", "https://", "HTTP://", "x:"]),
    REFERENCE_TEXT,
)


@given(REFERENCES)
def test_the_shortcuts_agree_with_full_rfc3986_resolution(reference: str) -> None:
    base = PlaylistBase("https://h.example/x/./y/../z/p.m3u8?q=1")
    target = resolve_reference(base.url, reference)
    # The policy: http(s) with a host, and never for an empty reference.
    web = reference and re.match(r"(?i)https?://[^/?#]", target)
    expected = target if web else None
    assert base.resolve(reference) == expected
    assert resolve_uri(base.url, reference) == expected


def rfc3986_remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 as written there, buffer by buffer: the oracle."""
    output = ""
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith(("./", "/./")):
            path = path[2:]
        elif path == "/.":
            path = "/"
        elif path.startswith("/../"):
            path = path[3:]
            output = output[: output.rfind("/")] if "/" in output else ""
        elif path == "/..":
            path = "/"
            output = output[: output.rfind("/")] if "/" in output else ""
        elif path in (".", ".."):
            path = ""
        else:
            end = path.find("/", 1 if path.startswith("/") else 0)
            end = len(path) if end < 0 else end
            output += path[:end]
            path = path[end:]
    return output


@given(
    st.lists(st.sampled_from(["", ".", "..", "...", "a", "b.", ".c", "..d"]), max_size=8),
    st.booleans(),
)
def test_remove_dot_segments_matches_the_rfc_algorithm(segments: list[str], absolute: bool) -> None:
    path = ("/" if absolute else "") + "/".join(segments)
    assert remove_dot_segments(path) == rfc3986_remove_dot_segments(path)


@given(st.text(max_size=40), st.text(max_size=40))
def test_resolution_never_raises(base: str, reference: str) -> None:
    result = resolve_uri(base, reference)
    assert result is None or result.lower().startswith(("http://", "https://"))

"""rewrite_playlist and URI resolution: which bytes change, what they resolve to, which kind."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping

import pytest

from proxy.hls.kinds import UriKind
from proxy.hls.rewrite import PlaylistInfo, rewrite_playlist
from proxy.hls.uri import remove_dot_segments, resolve_reference, resolve_uri

FINAL_URL = "https://final.example/a/b/playlist.m3u8?session=1"
"""The post-redirect playlist URL: the base of every relative reference."""
REQUESTED_URL = "https://entry.example/start/playlist.m3u8"


class Recorder:
    """A mapper that records its calls and answers with a recognisable marker."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, UriKind, dict[str, str]]] = []

    def __call__(self, url: str, kind: UriKind, imports: Mapping[str, str]) -> str:
        self.calls.append((url, kind, dict(imports)))
        return f"/p/{kind.name}/{len(self.calls)}"


def rewrite(
    body: bytes, url: str = FINAL_URL, **kwargs: object
) -> tuple[bytes, PlaylistInfo, Recorder]:
    recorder = Recorder()
    output, info = rewrite_playlist(body, url, recorder, **kwargs)  # type: ignore[arg-type]
    return output, info, recorder


# -- URI lines ----------------------------------------------------------------------------


def test_segment_lines_become_media_uris_resolved_against_the_final_url() -> None:
    body = b"#EXTM3U\n#EXT-X-TARGETDURATION:6\n#EXTINF:6.000,\nseg_00001.ts\n#EXT-X-ENDLIST\n"
    output, info, recorder = rewrite(body, request_url=REQUESTED_URL)
    assert output == (
        b"#EXTM3U\n#EXT-X-TARGETDURATION:6\n#EXTINF:6.000,\n/p/MEDIA/1\n#EXT-X-ENDLIST\n"
    )
    assert recorder.calls == [("https://final.example/a/b/seg_00001.ts", UriKind.MEDIA, {})]
    assert info.uri_count == 1


def test_line_after_stream_inf_is_a_playlist_even_with_tags_and_comments_between() -> None:
    body = (
        b"#EXTM3U\n"
        b"#EXT-X-STREAM-INF:BANDWIDTH=1280000\n"
        b"# a comment\n"
        b"#EXT-X-VENDOR-THING:X=1\n"
        b"\n"
        b"720p/index.m3u8?x=1\n"
        b"not-after-stream-inf.m3u8\n"
    )
    output, info, recorder = rewrite(body)
    assert [c[:2] for c in recorder.calls] == [
        ("https://final.example/a/b/720p/index.m3u8?x=1", UriKind.PLAYLIST),
        ("https://final.example/a/b/not-after-stream-inf.m3u8", UriKind.MEDIA),
    ]
    assert output.split(b"\n")[:5] == body.split(b"\n")[:5]
    assert info.is_multivariant


def test_uri_line_whitespace_around_the_uri_is_kept() -> None:
    output, _, recorder = rewrite(b"#EXTINF:1,\n \t seg.ts  \r\n\tseg2.ts\n")
    assert output == b"#EXTINF:1,\n \t /p/MEDIA/1  \r\n\t/p/MEDIA/2\n"
    assert recorder.calls[0][0] == "https://final.example/a/b/seg.ts"


def test_same_uri_gives_the_same_mapper_call_every_time() -> None:
    body = b'#EXTINF:1,\nseg.ts\n#EXTINF:1,\nseg.ts\n#EXT-X-MAP:URI="seg.ts"\n'
    _, _, first = rewrite(body)
    _, _, second = rewrite(body)
    assert first.calls == second.calls
    assert first.calls[0][:2] == first.calls[1][:2]


# -- the tag table ------------------------------------------------------------------------

TABLE_CASES = [
    ('#EXT-X-KEY:METHOD=AES-128,URI="k.key",IV=0x1', "k.key", UriKind.KEY),
    ('#EXT-X-SESSION-KEY:METHOD=AES-128,URI="sk.key"', "sk.key", UriKind.KEY),
    ('#EXT-X-MAP:URI="init.mp4",BYTERANGE="720@0"', "init.mp4", UriKind.INIT),
    ('#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="en",URI="en.m3u8"', "en.m3u8", UriKind.PLAYLIST),
    ('#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=1,URI="if.m3u8"', "if.m3u8", UriKind.PLAYLIST),
    ('#EXT-X-IMAGE-STREAM-INF:BANDWIDTH=1,URI="img.m3u8"', "img.m3u8", UriKind.PLAYLIST),
    ('#EXT-X-SESSION-DATA:DATA-ID="com.x",URI="data.json"', "data.json", UriKind.MEDIA),
    ('#EXT-X-PART:DURATION=0.5,URI="p1.mp4"', "p1.mp4", UriKind.MEDIA),
    ('#EXT-X-PRELOAD-HINT:TYPE=PART,URI="p2.mp4"', "p2.mp4", UriKind.MEDIA),
    ('#EXT-X-PRELOAD-HINT:TYPE=MAP,URI="init2.mp4"', "init2.mp4", UriKind.INIT),
    ('#EXT-X-RENDITION-REPORT:URI="../lo/x.m3u8",LAST-MSN=1', "../lo/x.m3u8", UriKind.PLAYLIST),
    ('#EXT-X-CONTENT-STEERING:SERVER-URI="/steer",PATHWAY-ID="A"', "/steer", UriKind.MEDIA),
    ('#EXT-X-DATERANGE:ID="i",X-ASSET-URI="ad.m3u8"', "ad.m3u8", UriKind.PLAYLIST),
    ('#EXT-X-DATERANGE:ID="i",X-ASSET-LIST="ads.json"', "ads.json", UriKind.MEDIA),
    ('#EXT-X-DATERANGE:ID="i",X-URI="beacon"', "beacon", UriKind.MEDIA),
]


@pytest.mark.parametrize(("line", "uri", "kind"), TABLE_CASES, ids=[c[0][:30] for c in TABLE_CASES])
def test_every_tag_of_the_table_rewrites_its_uri_with_its_kind(
    line: str, uri: str, kind: UriKind
) -> None:
    output, _, recorder = rewrite(line.encode() + b"\n")
    assert recorder.calls == [(resolve_uri(FINAL_URL, uri), kind, {})]
    assert output == line.replace(f'"{uri}"', f'"/p/{kind.name}/1"').encode() + b"\n"


def test_only_the_uri_value_changes_attribute_order_and_number_formats_are_kept() -> None:
    line = b'#EXT-X-KEY:IV=0X00FF,KEYFORMATVERSIONS="1/2",URI="k.key",METHOD=AES-128\r\n'
    output, _, _ = rewrite(line)
    assert (
        output == b'#EXT-X-KEY:IV=0X00FF,KEYFORMATVERSIONS="1/2",URI="/p/KEY/1",METHOD=AES-128\r\n'
    )


def test_uri_text_inside_another_quoted_value_is_never_touched() -> None:
    line = b'#EXT-X-SESSION-DATA:DATA-ID="a,URI=fake.json",VALUE="URI=\'x\', y",URI="real.json"\n'
    output, _, recorder = rewrite(line)
    assert [c[0] for c in recorder.calls] == ["https://final.example/a/b/real.json"]
    assert output == line.replace(b'"real.json"', b'"/p/MEDIA/1"')


def test_commas_inside_quoted_values_do_not_split_attributes() -> None:
    line = b'#EXT-X-MEDIA:TYPE=AUDIO,NAME="a, b, c",CHARACTERISTICS="x,y",URI="au.m3u8"\n'
    output, _, recorder = rewrite(line)
    assert len(recorder.calls) == 1
    assert output == line.replace(b'"au.m3u8"', b'"/p/PLAYLIST/1"')


def test_unknown_tags_and_comments_pass_through_byte_identical() -> None:
    body = (
        b"#EXTM3U\n"
        b'#EXT-X-UNKNOWN-TAG:URI="not-in-table.ts"\n'
        b'# URI="comment.ts"\n'
        b"#EXT-X-CUE-OUT:DURATION=30.000\n"
        b"#EXTVLCOPT:http-referrer=https://x.example/\n"
        b'#EXTINF:-1 tvg-id="a" group-title="b,c",Name\n'
        b"#EXT-X-BYTERANGE:1000@0\n"
        b"   \n"
        b"\n"
        b"#EXT-X-PROGRAM-DATE-TIME:2024-01-01T00:00:00.000+00:00\n"
    )
    output, info, recorder = rewrite(body)
    assert output == body
    assert recorder.calls == []
    assert info.uri_count == 0


def test_a_tag_without_a_uri_attribute_is_left_alone() -> None:
    body = (
        b"#EXT-X-KEY:METHOD=NONE\n"
        b'#EXT-X-MEDIA:TYPE=CLOSED-CAPTIONS,GROUP-ID="cc"\n'
        b'#EXT-X-MAP:URI=""\n'
    )
    output, _, recorder = rewrite(body)
    assert output == body
    assert recorder.calls == []


def test_an_indented_tag_is_a_tag_not_a_uri_line() -> None:
    output, _, recorder = rewrite(b'  #EXT-X-KEY:METHOD=AES-128,URI="k.key"\n  # note\n')
    assert output == b'  #EXT-X-KEY:METHOD=AES-128,URI="/p/KEY/1"\n  # note\n'
    assert [c[1] for c in recorder.calls] == [UriKind.KEY]


def test_an_unquoted_uri_attribute_is_rewritten_in_place() -> None:
    output, _, recorder = rewrite(b"#EXT-X-MAP:URI=init.mp4,BYTERANGE=720@0\n")
    assert output == b"#EXT-X-MAP:URI=/p/INIT/1,BYTERANGE=720@0\n"
    assert recorder.calls[0][0] == "https://final.example/a/b/init.mp4"


def test_an_unterminated_quote_passes_through() -> None:
    body = b'#EXT-X-KEY:METHOD=AES-128,URI="k.key\n#EXTINF:1,\nseg.ts\n'
    output, _, recorder = rewrite(body)
    assert output == b'#EXT-X-KEY:METHOD=AES-128,URI="k.key\n#EXTINF:1,\n/p/MEDIA/1\n'
    assert len(recorder.calls) == 1


# -- schemes and relative references ------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("seg.ts", "https://final.example/a/b/seg.ts"),
        ("720p/index.m3u8?x=1", "https://final.example/a/b/720p/index.m3u8?x=1"),
        ("../c/seg.ts", "https://final.example/a/c/seg.ts"),
        ("./seg.ts", "https://final.example/a/b/seg.ts"),
        ("/abs/seg.ts", "https://final.example/abs/seg.ts"),
        ("//cdn.other/x/seg.ts", "https://cdn.other/x/seg.ts"),
        ("?q=2", "https://final.example/a/b/playlist.m3u8?q=2"),
        ("seg.ts#t=1", "https://final.example/a/b/seg.ts#t=1"),
        ("http://abs.example/seg.ts", "http://abs.example/seg.ts"),
        ("HTTPS://Abs.Example/S.ts", "HTTPS://Abs.Example/S.ts"),
    ],
)
def test_relative_references_resolve_against_the_post_redirect_url(
    reference: str, expected: str
) -> None:
    _, _, recorder = rewrite(
        b"#EXTINF:1,\n" + reference.encode() + b"\n", request_url=REQUESTED_URL
    )
    assert recorder.calls == [(expected, UriKind.MEDIA, {})]
    assert resolve_uri(FINAL_URL, reference) == expected


@pytest.mark.parametrize(
    "line",
    [
        b'#EXT-X-KEY:METHOD=SAMPLE-AES,URI="skd://asset-id",KEYFORMAT="com.apple.streamingkeydelivery"',
        b'#EXT-X-KEY:METHOD=SAMPLE-AES,URI="data:text/plain;base64,AAAA",KEYFORMAT="urn:uuid:x"',
        b'#EXT-X-SESSION-KEY:METHOD=SAMPLE-AES,URI="skd://k"',
        b"ftp://files.example/seg.ts",
        b"C:\\HLS Video\\test1.ts",
        b"mailto:someone@example.com",
    ],
)
def test_other_schemes_pass_untouched_without_calling_the_mapper(line: bytes) -> None:
    body = b"#EXTM3U\n" + line + b"\n"
    output, info, recorder = rewrite(body)
    assert output == body
    assert recorder.calls == []
    assert info.uri_count == 0


def test_nothing_is_re_encoded() -> None:
    reference = "seg%2F1%20(a)+b~!$&'*,;=:@ é.ts?sig=a%3D%3D&x=/y"
    _, _, recorder = rewrite(b"#EXTINF:1,\n" + reference.encode() + b"\n")
    assert recorder.calls[0][0] == "https://final.example/a/b/" + reference


def test_invalid_utf8_in_a_uri_survives_as_surrogate_escapes() -> None:
    _, _, recorder = rewrite(b"#EXTINF:1,\nseg\xff\xfe.ts\n")
    url = recorder.calls[0][0]
    assert url.encode("utf-8", "surrogateescape") == b"https://final.example/a/b/seg\xff\xfe.ts"


RFC3986_BASE = "http://a/b/c/d;p?q"
RFC3986_EXAMPLES = {
    # §5.4.1 normal examples
    "g:h": "g:h",
    "g": "http://a/b/c/g",
    "./g": "http://a/b/c/g",
    "g/": "http://a/b/c/g/",
    "/g": "http://a/g",
    "//g": "http://g",
    "?y": "http://a/b/c/d;p?y",
    "g?y": "http://a/b/c/g?y",
    "#s": "http://a/b/c/d;p?q#s",
    "g#s": "http://a/b/c/g#s",
    "g?y#s": "http://a/b/c/g?y#s",
    ";x": "http://a/b/c/;x",
    "g;x": "http://a/b/c/g;x",
    "g;x?y#s": "http://a/b/c/g;x?y#s",
    "": "http://a/b/c/d;p?q",
    ".": "http://a/b/c/",
    "./": "http://a/b/c/",
    "..": "http://a/b/",
    "../": "http://a/b/",
    "../g": "http://a/b/g",
    "../..": "http://a/",
    "../../": "http://a/",
    "../../g": "http://a/g",
    # §5.4.2 abnormal examples
    "../../../g": "http://a/g",
    "../../../../g": "http://a/g",
    "/./g": "http://a/g",
    "/../g": "http://a/g",
    "g.": "http://a/b/c/g.",
    ".g": "http://a/b/c/.g",
    "g..": "http://a/b/c/g..",
    "..g": "http://a/b/c/..g",
    "./../g": "http://a/b/g",
    "./g/.": "http://a/b/c/g/",
    "g/./h": "http://a/b/c/g/h",
    "g/../h": "http://a/b/c/h",
    "g;x=1/./y": "http://a/b/c/g;x=1/y",
    "g;x=1/../y": "http://a/b/c/y",
    "g?y/./x": "http://a/b/c/g?y/./x",
    "g?y/../x": "http://a/b/c/g?y/../x",
    "g#s/./x": "http://a/b/c/g#s/./x",
    "g#s/../x": "http://a/b/c/g#s/../x",
    "http:g": "http:g",  # strict parser
}


@pytest.mark.parametrize(("reference", "target"), RFC3986_EXAMPLES.items())
def test_resolve_reference_gives_the_rfc3986_examples(reference: str, target: str) -> None:
    assert resolve_reference(RFC3986_BASE, reference) == target


@pytest.mark.parametrize(("reference", "target"), RFC3986_EXAMPLES.items())
def test_resolve_uri_gives_the_rfc3986_examples_or_none_for_non_web_results(
    reference: str, target: str
) -> None:
    web = target.startswith("http://") and reference != ""
    assert resolve_uri(RFC3986_BASE, reference) == (target if web else None)


def test_remove_dot_segments_rfc3986_walkthrough() -> None:
    assert remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert remove_dot_segments("mid/content=5/../6") == "mid/6"
    assert remove_dot_segments("/" + "../" * 10_000 + "x") == "/x"


def test_resolve_uri_refuses_bases_and_results_without_a_host() -> None:
    assert resolve_uri("https://final.example/a/", "") is None
    assert resolve_uri("https://final.example/a/", "http:///nohost") is None
    assert resolve_uri("not a url", "seg.ts") is None
    assert resolve_uri("https://h", "seg.ts") == "https://h/seg.ts"
    assert resolve_uri("https://h?q", "seg.ts") == "https://h/seg.ts"
    assert resolve_uri("https://h/x/../y/p.m3u8", "seg.ts") == "https://h/y/seg.ts"


# -- bytes that must survive --------------------------------------------------------------


def test_crlf_playlists_stay_crlf() -> None:
    body = (
        b'#EXTM3U\r\n#EXT-X-MAP:URI="init.mp4"\r\n#EXTINF:6,\r\nseg.ts\r\n'
        b"#EXT-X-STREAM-INF:BANDWIDTH=1\r\nv.m3u8\r\n#EXT-X-ENDLIST\r\n"
    )
    output, info, _ = rewrite(body)
    assert output == (
        b'#EXTM3U\r\n#EXT-X-MAP:URI="/p/INIT/1"\r\n#EXTINF:6,\r\n/p/MEDIA/2\r\n'
        b"#EXT-X-STREAM-INF:BANDWIDTH=1\r\n/p/PLAYLIST/3\r\n#EXT-X-ENDLIST\r\n"
    )
    assert info.endlist


def test_a_utf8_bom_is_kept() -> None:
    output, _, recorder = rewrite(b"\xef\xbb\xbf#EXTM3U\n#EXTINF:1,\nseg.ts\n")
    assert output == b"\xef\xbb\xbf#EXTM3U\n#EXTINF:1,\n/p/MEDIA/1\n"
    assert len(recorder.calls) == 1


@pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n", b"\n\n"])
def test_the_end_of_the_body_is_kept(ending: bytes) -> None:
    output, _, _ = rewrite(b"#EXTM3U\n#EXTINF:1,\nseg.ts" + ending)
    assert output == b"#EXTM3U\n#EXTINF:1,\n/p/MEDIA/1" + ending


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\n",
        b"seg.ts",
        b"\x00\xff\xfe\x80binary junk\x00\n\x89PNG\r\n\x1a\n",
        b'#EXT-X-KEY:URI="' + b"a" * 200_000,
        b"#EXT-X-KEY:" + b"A=1," * 50_000,
        b"#EXTINF:1,\n" + b"x" * 1_000_000 + b"\n",
        b'#EXT-X-STREAM-INF\n#EXT-X-STREAM-INF:\n#EXT-X-MEDIA:URI\n#EXT-X-MEDIA:="x"\n',
        b'#EXT-X-PRELOAD-HINT:TYPE=\xff,URI="p.mp4"\n',
    ],
)
def test_malformed_input_never_raises(body: bytes) -> None:
    output, info, _ = rewrite(body)
    assert output.count(b"\n") == body.count(b"\n")
    assert info.uri_count >= 0


def test_no_extm3u_header_still_rewrites_what_it_can() -> None:
    output, _, recorder = rewrite(b"#EXTINF:10,\nhttp://x.example/1.ts\n")
    assert output == b"#EXTINF:10,\n/p/MEDIA/1\n"
    assert recorder.calls[0][0] == "http://x.example/1.ts"


# -- imports for child playlists ----------------------------------------------------------

MULTIVARIANT_WITH_DEFINES = b"""#EXTM3U
#EXT-X-DEFINE:NAME="host",VALUE="cdn.example"
#EXT-X-CONTENT-STEERING:SERVER-URI="https://{$host}/steer.json"
#EXT-X-SESSION-DATA:DATA-ID="d",URI="https://{$host}/d.json"
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="en",URI="https://{$host}/en.m3u8"
#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=1,URI="if.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,AUDIO="a"
https://{$host}/v.m3u8
#EXT-X-DEFINE:NAME="late",VALUE="z"
"""


def test_playlist_children_of_a_multivariant_with_defines_get_its_variables() -> None:
    output, info, recorder = rewrite(MULTIVARIANT_WITH_DEFINES)
    everything = {"host": "cdn.example", "late": "z"}
    assert recorder.calls == [
        ("https://cdn.example/steer.json", UriKind.MEDIA, {}),
        ("https://cdn.example/d.json", UriKind.MEDIA, {}),
        ("https://cdn.example/en.m3u8", UriKind.PLAYLIST, everything),
        ("https://final.example/a/b/if.m3u8", UriKind.PLAYLIST, everything),
        ("https://cdn.example/v.m3u8", UriKind.PLAYLIST, everything),
    ]
    assert dict(info.variables) == everything
    assert b"EXT-X-DEFINE" not in output
    assert info.is_multivariant


def test_media_playlist_children_get_no_imports() -> None:
    body = b'#EXTM3U\n#EXT-X-DEFINE:NAME="v",VALUE="1"\n#EXT-X-RENDITION-REPORT:URI="r{$v}.m3u8"\n'
    _, info, recorder = rewrite(body)
    assert recorder.calls == [("https://final.example/a/b/r1.m3u8", UriKind.PLAYLIST, {})]
    assert not info.is_multivariant


def test_a_multivariant_without_defines_gives_empty_imports() -> None:
    _, _, recorder = rewrite(b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nv.m3u8\n")
    assert recorder.calls == [("https://final.example/a/b/v.m3u8", UriKind.PLAYLIST, {})]


# -- PlaylistInfo -------------------------------------------------------------------------


def test_info_of_a_vod_media_playlist() -> None:
    body = (
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXT-X-PLAYLIST-TYPE:VOD\n"
        b"#EXTINF:9.5,\na.ts\n#EXT-X-ENDLIST\n"
    )
    _, info, _ = rewrite(body)
    assert info == PlaylistInfo(
        is_multivariant=False,
        target_duration=10.0,
        part_target=None,
        endlist=True,
        playlist_type="VOD",
        variables={},
        uri_count=1,
    )


def test_info_of_a_live_ll_hls_playlist() -> None:
    body = (
        b"#EXTM3U\r\n#EXT-X-TARGETDURATION:4\r\n#EXT-X-PLAYLIST-TYPE:EVENT\r\n"
        b"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=1.0\r\n"
        b"#EXT-X-PART-INF:PART-TARGET=0.33334\r\n"
        b'#EXT-X-PART:DURATION=0.33334,URI="p.0.mp4"\r\n#EXT-X-PRELOAD-HINT:TYPE=PART,URI="p.1.mp4"\r\n'
    )
    _, info, _ = rewrite(body)
    assert info.target_duration == 4.0
    assert info.part_target == 0.33334
    assert info.playlist_type == "EVENT"
    assert not info.endlist
    assert info.uri_count == 2


def test_info_of_a_multivariant_playlist() -> None:
    _, info, _ = rewrite(b'#EXTM3U\n#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="x"\n')
    assert info.is_multivariant
    assert info.target_duration is None


@pytest.mark.parametrize(
    "value", [b"NaN", b"-10", b"", b"abc", b"1e3", b"inf", b"9" * 400, b"1.2.3"]
)
def test_malformed_target_durations_give_none(value: bytes) -> None:
    _, info, _ = rewrite(
        b"#EXTM3U\n#EXT-X-TARGETDURATION:"
        + value
        + b"\n#EXT-X-PART-INF:PART-TARGET="
        + value
        + b"\n"
    )
    assert info.target_duration is None
    assert info.part_target is None


def test_the_first_target_duration_counts_and_number_formats_are_lenient() -> None:
    _, info, _ = rewrite(b"#EXT-X-TARGETDURATION: 6 \r\n#EXT-X-TARGETDURATION:10\n")
    assert info.target_duration == 6.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"VOD", "VOD"), (b"event\r", "EVENT"), (b"", None), (b"STRING", None), (b"\xff", None)],
)
def test_playlist_type_is_vod_event_or_none(value: bytes, expected: str | None) -> None:
    _, info, _ = rewrite(b"#EXTM3U\n#EXT-X-PLAYLIST-TYPE:" + value + b"\n")
    assert info.playlist_type == expected


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_collector")
def test_a_rewrite_leaves_no_reference_cycle_behind() -> None:
    # Whatever a rewrite built is freed when it returns, not left (with its playlist) for the
    # garbage collector: every tag with a handler, a variable, a variant and its URI.
    body = (
        b'#EXTM3U\n#EXT-X-DEFINE:NAME="v",VALUE="x"\n#EXT-X-TARGETDURATION:6\n'
        b"#EXT-X-PART-INF:PART-TARGET=1.0\n#EXT-X-PLAYLIST-TYPE:VOD\n"
        b'#EXT-X-KEY:METHOD=AES-128,URI="k{$v}.bin"\n#EXTINF:6,\nseg1.ts\n'
        b"#EXT-X-STREAM-INF:BANDWIDTH=1\nlow/index.m3u8\n#EXT-X-ENDLIST\n"
    )
    output, info, recorder = rewrite(body)
    assert b"/p/MEDIA/" in output and b"/p/KEY/" in output
    assert info.endlist and info.target_duration == 6 and len(recorder.calls) == 3
    assert gc.collect() == 0  # nothing unreachable: no cycle was made

"""The tag table checked against the specification, and the attribute-list scanner."""

from __future__ import annotations

import pytest

from proxy.hls.attributes import scan_attribute_list
from proxy.hls.kinds import UriKind
from proxy.hls.tags import (
    DEFINE_TAG,
    MULTIVARIANT_TAGS,
    URI_TAGS,
    URI_TAGS_BY_NAME,
    VARIANT_STREAM_TAG,
)

# Every tag of RFC 8216bis (draft-pantos-hls-rfc8216bis, §4.4.1 to §4.4.6), by section.
RFC8216BIS_TAGS = {
    "EXTM3U": "4.4.1.1",
    "EXT-X-VERSION": "4.4.1.2",
    "EXT-X-INDEPENDENT-SEGMENTS": "4.4.2.1",
    "EXT-X-START": "4.4.2.2",
    "EXT-X-DEFINE": "4.4.2.3",
    "EXT-X-TARGETDURATION": "4.4.3.1",
    "EXT-X-MEDIA-SEQUENCE": "4.4.3.2",
    "EXT-X-DISCONTINUITY-SEQUENCE": "4.4.3.3",
    "EXT-X-ENDLIST": "4.4.3.4",
    "EXT-X-PLAYLIST-TYPE": "4.4.3.5",
    "EXT-X-I-FRAMES-ONLY": "4.4.3.6",
    "EXT-X-PART-INF": "4.4.3.7",
    "EXT-X-SERVER-CONTROL": "4.4.3.8",
    "EXTINF": "4.4.4.1",
    "EXT-X-BYTERANGE": "4.4.4.2",
    "EXT-X-DISCONTINUITY": "4.4.4.3",
    "EXT-X-KEY": "4.4.4.4",
    "EXT-X-MAP": "4.4.4.5",
    "EXT-X-PROGRAM-DATE-TIME": "4.4.4.6",
    "EXT-X-GAP": "4.4.4.7",
    "EXT-X-BITRATE": "4.4.4.8",
    "EXT-X-PART": "4.4.4.9",
    "EXT-X-DATERANGE": "4.4.5.1",
    "EXT-X-SKIP": "4.4.5.2",
    "EXT-X-PRELOAD-HINT": "4.4.5.3",
    "EXT-X-RENDITION-REPORT": "4.4.5.4",
    "EXT-X-MEDIA": "4.4.6.1",
    "EXT-X-STREAM-INF": "4.4.6.2",
    "EXT-X-I-FRAME-STREAM-INF": "4.4.6.3",
    "EXT-X-SESSION-DATA": "4.4.6.4",
    "EXT-X-SESSION-KEY": "4.4.6.5",
    "EXT-X-CONTENT-STEERING": "4.4.6.6",
}

# Not RFC 8216bis: the image media playlist specification (Roku, also used by Apple for
# thumbnail tracks). Its variant tag is the image twin of EXT-X-I-FRAME-STREAM-INF.
IMAGE_PLAYLIST_TAGS = {"EXT-X-IMAGE-STREAM-INF", "EXT-X-IMAGES-ONLY", "EXT-X-TILES"}

# The tags RFC 8216bis defines with an attribute holding a URI, and those attributes.
# (EXT-X-STREAM-INF has none: its URI is the next line. EXT-X-DATERANGE only gets URIs
# through client-defined X- attributes.)
RFC8216BIS_URI_ATTRIBUTES = {
    "EXT-X-KEY": {"URI"},
    "EXT-X-MAP": {"URI"},
    "EXT-X-PART": {"URI"},
    "EXT-X-PRELOAD-HINT": {"URI"},
    "EXT-X-RENDITION-REPORT": {"URI"},
    "EXT-X-MEDIA": {"URI"},
    "EXT-X-I-FRAME-STREAM-INF": {"URI"},
    "EXT-X-SESSION-DATA": {"URI"},
    "EXT-X-SESSION-KEY": {"URI"},
    "EXT-X-CONTENT-STEERING": {"SERVER-URI"},
}


def test_every_table_name_is_a_real_tag() -> None:
    unknown = {t.name for t in URI_TAGS} - set(RFC8216BIS_TAGS) - IMAGE_PLAYLIST_TAGS
    assert unknown == set()


def test_every_spec_tag_with_a_uri_attribute_is_in_the_table_with_those_attributes() -> None:
    for name, attributes in RFC8216BIS_URI_ATTRIBUTES.items():
        assert name in URI_TAGS_BY_NAME, name
        assert attributes <= set(URI_TAGS_BY_NAME[name].uri_attributes), name


def test_table_rows_cite_their_section() -> None:
    for row in URI_TAGS:
        if row.name in RFC8216BIS_TAGS:
            assert f"RFC 8216bis §{RFC8216BIS_TAGS[row.name]}" in row.section, row
        else:
            assert "not RFC 8216bis" in row.section, row


def test_the_non_rfc_row_is_only_the_image_stream_tag() -> None:
    assert {t.name for t in URI_TAGS if t.name not in RFC8216BIS_TAGS} == {"EXT-X-IMAGE-STREAM-INF"}


def test_names_are_unique() -> None:
    assert len(URI_TAGS_BY_NAME) == len(URI_TAGS)


def test_the_table_gives_the_kinds_of_the_design() -> None:
    kinds = {(t.name, a): k for t in URI_TAGS for a, k in t.uri_attributes.items()}
    assert kinds == {
        ("EXT-X-KEY", "URI"): UriKind.KEY,
        ("EXT-X-SESSION-KEY", "URI"): UriKind.KEY,
        ("EXT-X-MAP", "URI"): UriKind.INIT,
        ("EXT-X-MEDIA", "URI"): UriKind.PLAYLIST,
        ("EXT-X-I-FRAME-STREAM-INF", "URI"): UriKind.PLAYLIST,
        ("EXT-X-IMAGE-STREAM-INF", "URI"): UriKind.PLAYLIST,
        ("EXT-X-SESSION-DATA", "URI"): UriKind.MEDIA,
        ("EXT-X-PART", "URI"): UriKind.MEDIA,
        ("EXT-X-PRELOAD-HINT", "URI"): UriKind.MEDIA,
        ("EXT-X-RENDITION-REPORT", "URI"): UriKind.PLAYLIST,
        ("EXT-X-CONTENT-STEERING", "SERVER-URI"): UriKind.MEDIA,
        ("EXT-X-DATERANGE", "X-ASSET-URI"): UriKind.PLAYLIST,
        ("EXT-X-DATERANGE", "X-ASSET-LIST"): UriKind.MEDIA,
        ("EXT-X-DATERANGE", "X-URI"): UriKind.MEDIA,
    }
    assert URI_TAGS_BY_NAME["EXT-X-PRELOAD-HINT"].kind_by_type == {"MAP": UriKind.INIT}
    assert all(not t.kind_by_type for t in URI_TAGS if t.name != "EXT-X-PRELOAD-HINT")


def test_special_tags_are_real_tags() -> None:
    assert RFC8216BIS_TAGS[VARIANT_STREAM_TAG] == "4.4.6.2"
    assert RFC8216BIS_TAGS[DEFINE_TAG] == "4.4.2.3"


def test_multivariant_tags_are_the_multivariant_section_plus_the_image_stream() -> None:
    section_4_4_6 = {n for n, s in RFC8216BIS_TAGS.items() if s.startswith("4.4.6.")}
    assert section_4_4_6 | {"EXT-X-IMAGE-STREAM-INF"} == MULTIVARIANT_TAGS


# -- the attribute-list scanner -----------------------------------------------------------


def values(line: bytes, start: int | None = None) -> list[tuple[bytes, bytes, bool]]:
    start = line.index(b":") + 1 if start is None else start
    return [(name, line[s:e], quoted) for name, s, e, quoted in scan_attribute_list(line, start)]


def test_scanner_reads_quoted_and_unquoted_values_in_order() -> None:
    line = b'#EXT-X-KEY:METHOD=AES-128,URI="k.key",IV=0x1F,KEYFORMATVERSIONS="1/2"\r'
    assert values(line) == [
        (b"METHOD", b"AES-128", False),
        (b"URI", b"k.key", True),
        (b"IV", b"0x1F", False),
        (b"KEYFORMATVERSIONS", b"1/2", True),
    ]


def test_scanner_keeps_commas_and_uri_text_inside_quoted_values() -> None:
    line = b'#X:NAME="a,URI=\'b\',c",URI="d"'
    assert values(line) == [(b"NAME", b"a,URI='b',c", True), (b"URI", b"d", True)]


def test_scanner_offsets_point_inside_the_quotes() -> None:
    line = b'#X:URI="abc"'
    (attribute,) = scan_attribute_list(line, 3)
    assert attribute == (b"URI", 8, 11, True)
    assert line[attribute[1] - 1 : attribute[2] + 1] == b'"abc"'


def test_scanner_tolerates_blanks_and_empty_values() -> None:
    assert values(b'#X: A = 1 , B="" ,C=') == [
        (b"A", b"1", False),
        (b"B", b"", True),
        (b"C", b"", False),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'#X:A=1,URI="unterminated', [(b"A", b"1", False)]),
        (b'#X:A=1,garbage,URI="x"', [(b"A", b"1", False)]),
        (b'#X:A="q"junk,B=2', [(b"A", b"q", True), (b"B", b"2", False)]),
        (b"#X:4.0,title", []),
        (b"#X:", []),
        (b"#X:=1", []),
    ],
)
def test_scanner_stops_at_what_it_cannot_read(
    line: bytes, expected: list[tuple[bytes, bytes, bool]]
) -> None:
    assert values(line) == expected


def test_scanner_is_linear_on_a_huge_line() -> None:
    line = b"#X:" + b"A=1," * 200_000 + b'URI="' + b"x" * 1_000_000
    attributes = scan_attribute_list(line, 3)
    assert len(attributes) == 200_000

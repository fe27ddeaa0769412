"""EXT-X-DEFINE in the proxy: NAME/VALUE, QUERYPARAM, IMPORT; substitution; dropped lines."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from proxy.hls.kinds import UriKind
from proxy.hls.rewrite import PlaylistInfo, rewrite_playlist
from proxy.hls.variables import Variables, query_parameter

FINAL_URL = "https://final.example/live/media.m3u8?token=from-final&only-final=f"
REQUEST_URL = "https://entry.example/live/media.m3u8?token=from-request&enc=a%20b%2Bc+d"


def identity_mapper(url: str, kind: UriKind, imports: Mapping[str, str]) -> str:
    return f"<{url}>"


def rewrite(body: bytes, **kwargs: object) -> tuple[bytes, PlaylistInfo]:
    return rewrite_playlist(body, FINAL_URL, identity_mapper, **kwargs)  # type: ignore[arg-type]


# -- NAME/VALUE ---------------------------------------------------------------------------


def test_name_value_is_substituted_in_uri_lines_quoted_strings_and_hex_values() -> None:
    body = (
        b"#EXTM3U\n"
        b'#EXT-X-DEFINE:NAME="cdn",VALUE="https://cdn.example"\n'
        b'#EXT-X-DEFINE:NAME="two",VALUE="2"\n'
        b'#EXT-X-KEY:METHOD=AES-128,URI="{$cdn}/k{$two}.key",IV=0x0000000{$two}\n'
        b'#EXT-X-DATERANGE:ID="ad-{$two}",START-DATE="2024-01-01T00:00:00Z"\n'
        b"#EXTINF:4,\n"
        b"{$cdn}/seg{$two}.ts\n"
    )
    output, info = rewrite(body)
    assert output == (
        b"#EXTM3U\n"
        b'#EXT-X-KEY:METHOD=AES-128,URI="<https://cdn.example/k2.key>",IV=0x00000002\n'
        b'#EXT-X-DATERANGE:ID="ad-2",START-DATE="2024-01-01T00:00:00Z"\n'
        b"#EXTINF:4,\n"
        b"<https://cdn.example/seg2.ts>\n"
    )
    assert dict(info.variables) == {"cdn": "https://cdn.example", "two": "2"}
    assert info.uri_count == 2


def test_define_lines_are_dropped_with_their_newline_and_nothing_else() -> None:
    body = b'#EXTM3U\r\n#EXT-X-DEFINE:NAME="a",VALUE="1"\r\n\r\n#EXTINF:1,\r\ns{$a}.ts\r\n'
    output, _ = rewrite(body)
    assert output == b"#EXTM3U\r\n\r\n#EXTINF:1,\r\n<https://final.example/live/s1.ts>\r\n"


def test_a_define_on_the_last_line_without_newline_keeps_the_previous_newline() -> None:
    output, info = rewrite(b'#EXTM3U\n#EXT-X-DEFINE:NAME="a",VALUE="1"')
    assert output == b"#EXTM3U\n"
    assert info.variables == {"a": "1"}


def test_a_body_of_only_defines_becomes_empty() -> None:
    output, _ = rewrite(b'#EXT-X-DEFINE:NAME="a",VALUE="1"\n#EXT-X-DEFINE:NAME="b",VALUE="2"\n')
    assert output == b""


def test_undefined_references_are_left_as_they_are() -> None:
    body = (
        b'#EXT-X-DEFINE:NAME="a",VALUE="1"\n#EXT-X-SESSION-DATA:DATA-ID="x",VALUE="{$nope}{$a}"\n'
    )
    output, _ = rewrite(body)
    assert output == b'#EXT-X-SESSION-DATA:DATA-ID="x",VALUE="{$nope}1"\n'


def test_a_reference_above_its_definition_is_not_substituted() -> None:
    body = (
        b'#EXTINF:1,\nbefore-{$a}.ts\n#EXT-X-DEFINE:NAME="a",VALUE="1"\n#EXTINF:1,\nafter-{$a}.ts\n'
    )
    output, _ = rewrite(body)
    assert b"<https://final.example/live/before-{$a}.ts>" in output
    assert b"<https://final.example/live/after-1.ts>" in output


def test_the_first_definition_of_a_name_wins() -> None:
    body = b'#EXT-X-DEFINE:NAME="a",VALUE="first"\n#EXT-X-DEFINE:NAME="a",VALUE="second"\n{$a}.ts\n'
    output, info = rewrite(body)
    assert output == b"<https://final.example/live/first.ts>\n"
    assert info.variables == {"a": "first"}


def test_a_value_may_use_variables_defined_above_and_is_not_rescanned() -> None:
    body = (
        b'#EXT-X-DEFINE:NAME="foo",VALUE="ok"\n'
        b'#EXT-X-DEFINE:NAME="bar",VALUE="{$foo}-{$later}"\n'
        b'#EXT-X-DEFINE:NAME="later",VALUE="L"\n'
        b'#EXT-X-SESSION-DATA:DATA-ID="x",VALUE="{$bar}"\n'
    )
    output, info = rewrite(body)
    assert info.variables["bar"] == "ok-{$later}"
    assert output == b'#EXT-X-SESSION-DATA:DATA-ID="x",VALUE="ok-{$later}"\n'


def test_substitution_skips_extinf_titles_and_enumerated_values() -> None:
    body = (
        b'#EXT-X-DEFINE:NAME="v",VALUE="YES"\n'
        b"#EXTINF:4,title {$v}\n"
        b"#EXT-X-BYTERANGE:{$v}\n"
        b'#EXT-X-MEDIA:TYPE=AUDIO,DEFAULT={$v},NAME="{$v}"\n'
    )
    output, _ = rewrite(body)
    assert output == (
        b"#EXTINF:4,title {$v}\n#EXT-X-BYTERANGE:{$v}\n"
        b'#EXT-X-MEDIA:TYPE=AUDIO,DEFAULT={$v},NAME="YES"\n'
    )


def test_invalid_definitions_define_nothing() -> None:
    body = (
        b'#EXT-X-DEFINE:NAME="bad name",VALUE="x"\n'
        b'#EXT-X-DEFINE:NAME="novalue"\n'
        b"#EXT-X-DEFINE:NAME=unquoted,VALUE=unquoted\n"
        b"#EXT-X-DEFINE\n"
        b"#EXT-X-DEFINE:\n"
    )
    output, info = rewrite(body)
    assert output == b""
    assert info.variables == {}


def test_without_define_lines_references_are_never_touched() -> None:
    body = b'#EXTM3U\n#EXT-X-SESSION-DATA:DATA-ID="x",VALUE="{$a}"\n{$a}.ts\n'
    output, info = rewrite(body, imported={"a": "1"})
    assert (
        output
        == b'#EXTM3U\n#EXT-X-SESSION-DATA:DATA-ID="x",VALUE="{$a}"\n<https://final.example/live/{$a}.ts>\n'
    )
    assert info.variables == {}


# -- QUERYPARAM ---------------------------------------------------------------------------


def test_queryparam_reads_the_post_redirect_url_first() -> None:
    """RFC 8216bis §4.4.2.3: a redirected playlist's parameter comes from the 30x target."""
    body = b'#EXT-X-DEFINE:QUERYPARAM="token"\nseg.ts?token={$token}\n'
    output, info = rewrite(body, request_url=REQUEST_URL)
    assert output == b"<https://final.example/live/seg.ts?token=from-final>\n"
    assert info.variables == {"token": "from-final"}


def test_queryparam_falls_back_to_the_requested_url() -> None:
    body = b'#EXT-X-DEFINE:QUERYPARAM="only-requested"\nx-{$only-requested}.ts\n'
    output, _ = rewrite(body, request_url=REQUEST_URL + "&only-requested=r")
    assert output == b"<https://final.example/live/x-r.ts>\n"


def test_queryparam_values_are_percent_decoded_but_plus_stays_plus() -> None:
    _, info = rewrite(b'#EXT-X-DEFINE:QUERYPARAM="enc"\n', request_url=REQUEST_URL)
    assert info.variables == {"enc": "a b+c+d"}


def test_a_missing_or_valueless_queryparam_defines_nothing() -> None:
    body = (
        b'#EXT-X-DEFINE:QUERYPARAM="missing"\n'
        b'#EXT-X-DEFINE:QUERYPARAM="flag"\n'
        b"{$missing}{$flag}.ts\n"
    )
    output, info = rewrite(body, request_url="https://e.example/p.m3u8?flag")
    assert output == b"<https://final.example/live/{$missing}{$flag}.ts>\n"
    assert info.variables == {}


@pytest.mark.parametrize("value", ["%0D%0A%23EXT-X-ENDLIST", "%22", "a%0Ab"])
def test_a_queryparam_value_that_could_forge_lines_or_quotes_is_refused(value: str) -> None:
    body = b'#EXT-X-DEFINE:QUERYPARAM="q"\n#EXT-X-SESSION-DATA:DATA-ID="x",VALUE="{$q}"\n{$q}.ts\n'
    output, info = rewrite(body, request_url=f"https://e.example/p.m3u8?q={value}")
    assert info.variables == {}
    assert output.count(b"\n") == 2
    assert b"{$q}" in output


# -- IMPORT -------------------------------------------------------------------------------


def test_import_reads_the_variables_handed_down_by_the_parent() -> None:
    body = b'#EXTM3U\n#EXT-X-DEFINE:IMPORT="host"\n#EXT-X-MAP:URI="https://{$host}/init.mp4"\n'
    output, info = rewrite(body, imported={"host": "cdn.example", "other": "x"})
    assert output == b'#EXTM3U\n#EXT-X-MAP:URI="<https://cdn.example/init.mp4>"\n'
    assert info.variables == {"host": "cdn.example"}


def test_an_import_the_parent_does_not_have_defines_nothing() -> None:
    body = b'#EXT-X-DEFINE:IMPORT="host"\n{$host}.ts\n'
    output, info = rewrite(body, imported={})
    assert output == b"<https://final.example/live/{$host}.ts>\n"
    assert info.variables == {}


def test_an_imported_value_with_a_newline_is_refused() -> None:
    body = b'#EXT-X-DEFINE:IMPORT="x"\n{$x}.ts\n'
    _, info = rewrite(body, imported={"x": "a\n#EXT-X-ENDLIST"})
    assert info.variables == {}


def test_imports_of_children_are_the_variables_of_the_multivariant() -> None:
    seen: list[tuple[UriKind, dict[str, str]]] = []

    def mapper(url: str, kind: UriKind, imports: Mapping[str, str]) -> str:
        seen.append((kind, dict(imports)))
        return "x"

    body = b'#EXT-X-DEFINE:QUERYPARAM="token"\n#EXT-X-STREAM-INF:BANDWIDTH=1\nv.m3u8?t={$token}\n'
    rewrite_playlist(body, FINAL_URL, mapper, request_url=REQUEST_URL)
    assert seen == [(UriKind.PLAYLIST, {"token": "from-final"})]


# -- the pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "name", "expected"),
    [
        ("https://h/p?a=1&b=2", "b", "2"),
        ("https://h/p?a=1&a=2", "a", "1"),
        ("https://h/p?a=%41%zz", "a", "A%zz"),
        ("https://h/p?a=", "a", ""),
        ("https://h/p?a", "a", None),
        ("https://h/p#?a=1", "a", None),
        ("https://h/p?b=1#a=2", "a", None),
        ("https://h/p?%61=1", "a", "1"),
        ("https://h/p", "a", None),
    ],
)
def test_query_parameter(url: str, name: str, expected: str | None) -> None:
    assert query_parameter(url, name) == expected


def test_variables_substitute_in_one_pass_and_refuse_bad_names_and_values() -> None:
    variables = Variables()
    assert variables.define("a", "{$b}")
    assert variables.define("b", "B")
    assert not variables.define("a", "again")
    assert not variables.define("with space", "x")
    assert not variables.define("q", 'say "hi"')
    assert variables.substitute(b"{$a}|{$b}|{$c}|{$}|{$a") == b"{$b}|B|{$c}|{$}|{$a"
    assert len(variables) == 2

"""The M3U channel-list parser, channel ids and URL forms (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.channels.catalog import listed_channels, merge, xtream_list_url
from proxy.channels.m3u import format_m3u, parse_m3u
from proxy.channels.model import channel_id
from proxy.channels.urls import acestream_url, guess_kind, is_xtream_list, split_kodi_headers

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "m3u"
ENGINE = "http://127.0.0.1:6878"
HASH = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.corpus
@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no corpus at {CORPUS}")
def test_every_corpus_list_parses() -> None:
    files = sorted(CORPUS.glob("*.m3u"))
    assert len(files) >= 10
    for path in files:
        parsed = parse_m3u(path.read_bytes().decode("utf-8", errors="replace"))
        assert parsed.entries, path.name
        for entry in parsed.entries:
            assert "\r" not in entry.url and entry.url.startswith("http"), path.name
        channels = merge([], listed_channels(parsed.entries, ENGINE))
        assert len(channels) == len(parsed.entries)
        assert all(" " not in cid for cid in channels)


@pytest.mark.corpus
@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no corpus at {CORPUS}")
def test_corpus_details() -> None:
    base = parse_m3u((CORPUS / "freearhey-iptv-playlist-parser__base.m3u").read_text())
    first = base.entries[0]
    assert first.title == "Channel 1 (Tested)"
    assert first.headers["Referer"] == "http://player.livesports.pw/la2/"
    assert first.headers["User-Agent"].startswith("Mozilla/5.0 (Macintosh")
    assert first.attribute("tvg-id") == "CH1"  # written tvg-ID
    assert "xshow_08.png,Mic_" in first.attribute("tvg-logo")  # comma inside a quoted value
    assert base.header_attributes[0][0] == "x-tvg-url"
    assert any(e.title == "name,with comma" for e in base.entries)
    trt = next(e for e in base.entries if e.title == "TRT 1 HD")
    assert trt.attribute("catchup") == "shift" and trt.attribute("catchup-days") == "3"

    kodi = parse_m3u((CORPUS / "freearhey-iptv-playlist-parser__kodi.m3u").read_text())
    assert kodi.entries[0].headers == {
        "User-Agent": "RTP Play/2.0.26 (Linux;Android 11) ExoPlayerLib/2.11.8"
    }
    assert "|" not in kodi.entries[0].url

    pipe = parse_m3u((CORPUS / "freearhey-iptv-playlist-parser__pipe.m3u").read_text())
    assert pipe.entries[0].headers["Referer"] == "http://180upload.abc/embed-uaqmgcckhpcl.html"
    assert pipe.entries[1].headers["Referer"] == "http://test.abc/blank.html"
    assert pipe.entries[1].headers["User-Agent"].startswith("Mozilla/5.0 (Macintosh")

    vlc = parse_m3u((CORPUS / "freearhey-iptv-playlist-parser__vlcopt.m3u").read_text())
    assert vlc.entries[0].headers == {"User-Agent": "Dalvik/2.1.0 (Linux; U; Android 6.0.1;)"}

    crlf = (CORPUS / "iptv-org-iptv__az.m3u").read_bytes()
    assert b"\r\n" in crlf
    az = parse_m3u(crlf.decode())
    assert all(not e.url.endswith("\r") for e in az.entries)
    ids = list(merge([], listed_channels(az.entries, ENGINE)))
    assert "AzTV.az@SD" in ids and "AzTV.az@SD-2" in ids

    threadfin = parse_m3u((CORPUS / "threadfin__test_list_1.m3u").read_text())
    assert threadfin.entries[0].attribute("tvg-chno") == "1"
    assert threadfin.entries[0].group == "Group 1"


def test_bom_crlf_junk_second_header_and_headers() -> None:
    text = (
        '\ufeff#EXTM3U url-tvg="http://epg/x.xml"\r\n'
        "junk line here\r\n"
        '#EXTINF:-1 tvg-id="one" tvg-logo="http://l/1.png" group-title="News",One\r\n'
        "#EXTVLCOPT:http-referrer=https://site.example/\r\n"
        "#EXTVLCOPT:http-origin=https://site.example\r\n"
        "http://cdn.example/one.m3u8\r\n"
        "#EXTM3U\r\n"
        "#EXTINF:-1,Two\r\n"
        "#KODIPROP:inputstream.adaptive.stream_headers=User-Agent=Kodi%2F20&Cookie=a%3Db\r\n"
        "http://cdn.example/two.ts|Referer=https://ref.example/\r\n"
        "#EXTINF:-1,Lost\r\n"
        "#EXTVLCOPT:http-user-agent=LeakMe\r\n"
        "relative/never.m3u8\r\n"
        "#EXTINF:-1,Three\r\n"
        "acestream://" + HASH + "\r\n"
    )
    parsed = parse_m3u(text)
    assert [e.title for e in parsed.entries] == ["One", "Two", "Three"]
    one, two, three = parsed.entries
    assert one.headers == {"Referer": "https://site.example/", "Origin": "https://site.example"}
    assert one.group == "News"
    assert two.url == "http://cdn.example/two.ts"
    assert two.headers == {
        "User-Agent": "Kodi/20",
        "Cookie": "a=b",
        "Referer": "https://ref.example/",
    }
    assert three.headers == {}  # the dropped entry's headers did not leak
    channels = listed_channels(parsed.entries, ENGINE)
    assert channels[2].url == f"{ENGINE}/ace/getstream?id={HASH}"
    assert channels[2].kind == "ts"
    assert channels[0].kind == "hls"


def test_relative_urls_resolve_against_the_list_url() -> None:
    parsed = parse_m3u("#EXTM3U\n#EXTINF:-1,A\nlive/a.m3u8\n", "http://host/lists/x.m3u")
    assert parsed.entries[0].url == "http://host/lists/live/a.m3u8"


def test_ids_are_stable_and_never_carry_url_secrets() -> None:
    assert channel_id("BBC1.uk", "BBC One", "http://x") == "BBC1.uk"
    assert channel_id("", "Canal+ HD (1080p)", "http://x") == "canal-hd-1080p"
    assert channel_id("bad id/with slash", "N", "http://x") == "bad-id-with-slash"
    secret_id = channel_id("", "", "http://h/get.php?username=u&password=SECRET")
    assert "SECRET" not in secret_id and secret_id.startswith("ch-")
    text = "#EXTM3U\n" + "".join(f"#EXTINF:-1,Same\nhttp://h/{i}?token=T{i}\n" for i in range(3))
    first = list(merge([], listed_channels(parse_m3u(text).entries, ENGINE)))
    again = list(merge([], listed_channels(parse_m3u(text).entries, ENGINE)))
    assert first == again == ["same", "same-2", "same-3"]


def test_url_forms() -> None:
    assert acestream_url(HASH, ENGINE) == f"{ENGINE}/ace/getstream?id={HASH}"
    assert acestream_url(f"acestream://{HASH.upper()}", ENGINE + "/") == (
        f"{ENGINE}/ace/getstream?id={HASH}"
    )
    assert acestream_url("http://x/y", ENGINE) is None
    assert split_kodi_headers("http://a/b|User-Agent=UA%201&referer=http://r/") == (
        "http://a/b",
        {"User-Agent": "UA 1", "Referer": "http://r/"},
    )
    assert is_xtream_list("http://p:8080/get.php?username=u&password=p&type=m3u_plus")
    assert not is_xtream_list("http://p/list.m3u")
    assert "type=m3u_plus" in xtream_list_url("http://p/get.php?username=u&password=p")
    assert guess_kind("http://p/live/u/p/1.ts") == "ts"
    assert guess_kind("http://p/get.php?x=1&output=mpegts") == "ts"
    assert guess_kind("http://p/x/index.m3u8?t=1") == "hls"
    assert guess_kind("http://p/u/p/123") is None


def test_format_round_trip_keeps_attributes() -> None:
    items = [
        ('A, the "one"', [("tvg-id", "a"), ("catchup", "shift")], "http://proxy/live/a/index.m3u8")
    ]
    text = format_m3u(items)
    entry = parse_m3u(text).entries[0]
    assert entry.title == 'A, the "one"'
    assert entry.attributes == [("tvg-id", "a"), ("catchup", "shift")]


def test_ten_thousand_channels_parse() -> None:
    # The time it takes is measured by tests/bench/bench_live.py (no timing asserts in tests).
    text = "#EXTM3U\n" + "".join(
        f'#EXTINF:-1 tvg-id="ch{i}.tv" tvg-name="Channel {i}" tvg-logo="http://logo/{i}.png" '
        f'group-title="Group {i % 20}" tvg-chno="{i}",Channel {i}\n'
        f"#EXTVLCOPT:http-referrer=http://ref/{i}\n"
        f"http://provider.example:8080/live/user/pass/{i}.ts\n"
        for i in range(10_000)
    )
    channels = merge([], listed_channels(parse_m3u(text).entries, ENGINE))
    assert len(channels) == 10_000
    assert channels["ch9999.tv"].header_map == {"Referer": "http://ref/9999"}

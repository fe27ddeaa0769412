"""The proxied-stream path end to end over real sockets: real origin, real app, real client."""

from __future__ import annotations

import asyncio
import random
import re
import socket
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.turns import TurnBudget
from proxy.web.keys import RELAY
from tests.conftest import TEST_API_KEY, ProxyFactory
from tests.origin import Origin

Client = TestClient[Any, Any]
REFERER = "https://site.example/watch/1"


def mint(client: Client, url: str, headers: dict[str, str] | None = None) -> str:
    return client.app[RELAY].mint(url, headers if headers is not None else {"Referer": REFERER})


def proxied_uris(body: str) -> list[str]:
    """Every proxied URI in a rewritten playlist: URI lines and quoted URI attributes."""
    uris = re.findall(r'(?:URI|SERVER-URI|X-ASSET-URI|X-ASSET-LIST)="([^"]*)"', body)
    uris += [
        line.strip() for line in body.splitlines() if line.strip() and not line.startswith("#")
    ]
    return [u for u in uris if u.startswith("../") or "/s/" in u]


async def follow(
    client: Client, playlist_path: str, uri: str, method: str = "GET", **kw: Any
) -> aiohttp.ClientResponse:
    """Fetch a child URI the way a player does: resolved against the playlist's URL."""
    target = URL(playlist_path).join(URL(uri, encoded=True))
    return await client.request(method, target, **kw)


MULTIVARIANT = """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-INDEPENDENT-SEGMENTS
#EXT-X-SESSION-KEY:METHOD=AES-128,URI="keys/session.key"
#EXT-X-SESSION-DATA:DATA-ID="com.example.title",URI="meta/title.json"
#EXT-X-CONTENT-STEERING:SERVER-URI="/steering.json",PATHWAY-ID="CDN-A"
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aud",NAME="English",DEFAULT=YES,URI="audio/en.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1280000,RESOLUTION=640x360,AUDIO="aud"
low/index.m3u8
#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=86000,URI="low/iframes.m3u8"
#EXT-X-IMAGE-STREAM-INF:BANDWIDTH=5000,URI="thumbs/index.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=2560000,RESOLUTION=1280x720,AUDIO="aud"
https://cdn2.example.net/high/index.m3u8?sig=abc%2Fdef
"""

MEDIA = """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-TARGETDURATION:4
#EXT-X-MEDIA-SEQUENCE:100
#EXT-X-PART-INF:PART-TARGET=1.0
#EXT-X-MAP:URI="init.mp4"
#EXT-X-KEY:METHOD=AES-128,URI="../keys/k1.key",IV=0x00000000000000000000000000000001
#EXT-X-DATERANGE:ID="ad1",START-DATE="2024-01-01T00:00:00Z",X-ASSET-URI="/ads/ad1.m3u8",X-ASSET-LIST="/ads/list.json"
#EXT-X-CUSTOM-TAG:FOO="bar",URI="not-a-real-uri-attribute"
# a comment stays
#EXTINF:4.000,
seg100.ts
#EXT-X-PART:DURATION=1.0,URI="part101.0.mp4",INDEPENDENT=YES
#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part101.1.mp4"
#EXT-X-RENDITION-REPORT:URI="../audio/en.m3u8",LAST-MSN=100,LAST-PART=0
#EXT-X-KEY:METHOD=SAMPLE-AES,URI="skd://drm.example/key1",KEYFORMAT="com.apple.streamingkeydelivery"
#EXT-X-KEY:METHOD=AES-128,URI="data:text/plain;base64,AAECAwQFBgcICQoLDA0ODw=="
#EXTINF:4.000,
seg101.ts
"""


async def test_multivariant_every_uri_rewritten_and_everything_else_kept(
    proxy: Client, origin: Origin
) -> None:
    origin.playlist("/vod/master.m3u8", MULTIVARIANT)
    path = mint(proxy, f"{origin.url}/vod/master.m3u8")
    resp = await proxy.get(path)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/vnd.apple.mpegurl"
    body = await resp.text()
    original, rewritten = MULTIVARIANT.splitlines(), body.splitlines()
    assert len(original) == len(rewritten)
    for before, after in zip(original, rewritten, strict=True):
        if "URI=" in before or not before.startswith("#"):
            assert before != after
        else:
            assert before == after
    assert origin.url.split("//")[1] not in body and "cdn2.example.net" not in body
    assert len(proxied_uris(body)) == 8
    for uri in proxied_uris(body):
        assert uri.startswith("../") and "/s/" not in uri


async def test_children_fetch_the_right_upstream_with_headers(
    proxy: Client, origin: Origin
) -> None:
    origin.playlist("/vod/master.m3u8", MULTIVARIANT)
    origin.playlist("/vod/low/index.m3u8", MEDIA)
    segment = bytes(range(256)) * 64
    origin.media("/vod/low/seg100.ts", segment)
    origin.media("/vod/keys/k1.key", b"0123456789abcdef", "application/octet-stream")
    origin.media("/vod/low/init.mp4", b"init-bytes", "video/mp4")
    master_path = mint(proxy, f"{origin.url}/vod/master.m3u8")
    master = await (await proxy.get(master_path)).text()
    lines = master.splitlines()
    variant_uri = lines[
        next(i for i, x in enumerate(lines) if x.startswith("#EXT-X-STREAM-INF")) + 1
    ]
    variant_resp = await follow(proxy, master_path, variant_uri)
    assert variant_resp.status == 200
    variant_path = str(URL(master_path).join(URL(variant_uri, encoded=True)))
    variant = await variant_resp.text()
    children = proxied_uris(variant)
    by_name = {u.rsplit("/", 1)[1]: u for u in children}
    seg = await follow(proxy, variant_path, by_name["seg100.ts"])
    assert seg.status == 200 and await seg.read() == segment
    head = await follow(proxy, variant_path, by_name["seg100.ts"], method="HEAD")
    assert head.status == 200 and head.headers["Content-Length"] == str(len(segment))
    # The segment was just fetched whole: its HEAD is answered from the cache store.
    assert origin.seen[-1].path == "/vod/low/seg100.ts" and origin.seen[-1].method == "GET"
    assert "Age" in head.headers
    assert seg.headers["Content-Type"] == "video/mp2t"
    key = await follow(proxy, variant_path, by_name["k1.key"])
    assert await key.read() == b"0123456789abcdef"
    assert key.headers["Cache-Control"] == "private, no-store"
    init = await follow(proxy, variant_path, by_name["init.mp4"])
    assert await init.read() == b"init-bytes"
    # skd:// and data: keys are untouched.
    assert 'URI="skd://drm.example/key1"' in variant
    assert 'URI="data:text/plain;base64,AAECAwQFBgcICQoLDA0ODw=="' in variant
    # Every request the origin saw carried the stream's headers, none of the viewer's.
    assert [r.path for r in origin.seen] == [
        "/vod/master.m3u8",
        "/vod/low/index.m3u8",
        "/vod/low/seg100.ts",
        "/vod/keys/k1.key",
        "/vod/low/init.mp4",
    ]
    for seen in origin.seen:
        assert seen.headers["Referer"] == REFERER
        assert "Cookie" not in seen.headers and "Authorization" not in seen.headers


async def test_viewer_cookies_and_auth_never_go_upstream(proxy: Client, origin: Origin) -> None:
    origin.media("/a.ts", b"x" * 100)
    path = mint(proxy, f"{origin.url}/a.ts", {"Cookie": "upstream=ok"})
    resp = await proxy.get(path, headers={"Cookie": "viewer=secret", "Authorization": "Bearer v"})
    assert resp.status == 200
    seen = origin.seen[-1].headers
    assert seen["Cookie"] == "upstream=ok"
    assert "Authorization" not in seen


async def test_same_upstream_uri_gives_same_proxied_uri_across_reloads(
    proxy: Client, origin: Origin
) -> None:
    origin.playlist("/live/index.m3u8", MEDIA)
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    first = await (await proxy.get(path)).text()
    second = await (await proxy.get(path)).text()
    assert first == second
    assert mint(proxy, f"{origin.url}/live/index.m3u8") == path


async def test_relative_uris_resolve_against_post_redirect_url(
    proxy: Client, origin: Origin
) -> None:
    origin.redirect("/start.m3u8", "/elsewhere/deep/real.m3u8", status=301)
    origin.playlist(
        "/elsewhere/deep/real.m3u8", "#EXTM3U\n#EXTINF:2,\nseg.ts\n#EXTINF:2,\n../up.ts\n"
    )
    origin.media("/elsewhere/deep/seg.ts", b"deep")
    origin.media("/elsewhere/up.ts", b"up")
    path = mint(proxy, f"{origin.url}/start.m3u8")
    body = await (await proxy.get(path)).text()
    uris = proxied_uris(body)
    assert [await (await follow(proxy, path, u)).read() for u in uris] == [b"deep", b"up"]
    # The stream's headers went on the redirect hop too.
    assert all(r.headers["Referer"] == REFERER for r in origin.seen)


async def test_too_many_redirects_is_502(proxy_factory: ProxyFactory, origin: Origin) -> None:
    client = await proxy_factory(upstream={"max_redirects": 2})
    for i in range(4):
        origin.redirect(f"/r{i}.m3u8", f"/r{i + 1}.m3u8")
    resp = await client.get(mint(client, f"{origin.url}/r0.m3u8"))
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unreachable"
    assert len(origin.seen) == 3


async def test_define_is_substituted_and_imports_reach_child_playlists(
    proxy: Client, origin: Origin
) -> None:
    origin.playlist(
        "/d/master.m3u8",
        '#EXTM3U\n#EXT-X-DEFINE:NAME="cdn",VALUE="sub"\n'
        '#EXT-X-DEFINE:QUERYPARAM="tok"\n'
        "#EXT-X-STREAM-INF:BANDWIDTH=1\n{$cdn}/v.m3u8?tok={$tok}\n",
    )
    origin.playlist(
        "/d/sub/v.m3u8",
        '#EXTM3U\n#EXT-X-DEFINE:IMPORT="tok"\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\ns.ts?tok={$tok}\n',
    )
    origin.media("/d/sub/s.ts", b"ok")
    path = mint(proxy, f"{origin.url}/d/master.m3u8?tok=T0K")
    master = await (await proxy.get(path)).text()
    assert "EXT-X-DEFINE" not in master and "{$" not in master
    variant_uri = proxied_uris(master)[0]
    variant_path = str(URL(path).join(URL(variant_uri, encoded=True)))
    variant = await (await proxy.get(variant_path)).text()
    assert "EXT-X-DEFINE" not in variant and "{$" not in variant
    seg = await follow(proxy, variant_path, proxied_uris(variant)[0])
    assert await seg.read() == b"ok"
    assert origin.seen[1].query_string == "tok=T0K"
    assert origin.seen[2].query_string == "tok=T0K"


async def test_ll_hls_directives_are_forwarded_unchanged(proxy: Client, origin: Origin) -> None:
    origin.playlist("/ll/index.m3u8", MEDIA)
    path = mint(proxy, f"{origin.url}/ll/index.m3u8?token=x")
    resp = await proxy.get(path + "?_HLS_msn=101&_HLS_part=1&_HLS_skip=YES&other=dropped")
    assert resp.status == 200
    assert origin.seen[-1].query_string == "token=x&_HLS_msn=101&_HLS_part=1&_HLS_skip=YES"
    bad = await proxy.get(path + "?_HLS_msn=1%26evil%3D1")
    assert bad.status == 400


async def test_blocking_reload_outlives_the_normal_first_byte_timeout(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    client = await proxy_factory(
        upstream={"first_byte_timeout": 0.3, "read_timeout": 0.3, "blocking_reload_timeout": 5.0}
    )
    origin.stall("/ll/block.m3u8", 0.8)
    path = mint(client, f"{origin.url}/ll/block.m3u8")
    assert (await client.get(path + "?_HLS_msn=5")).status == 200
    assert (await client.get(path)).status == 504


async def test_upstream_urls_are_sent_byte_exact(proxy: Client, origin: Origin) -> None:
    origin.playlist("/e/index.m3u8", "#EXTM3U\n#EXTINF:1,\nseg%2Fone.ts?sig=a%2Bb%3D&x=%7E~\n")

    async def record(request: web.Request) -> web.Response:
        return web.Response(body=b"exact")

    origin.routes["/e/seg%2Fone.ts"] = record
    path = mint(proxy, f"{origin.url}/e/index.m3u8")
    body = await (await proxy.get(path)).text()
    resp = await follow(proxy, path, proxied_uris(body)[0])
    assert await resp.read() == b"exact"
    assert origin.seen[-1].query_string == "sig=a%2Bb%3D&x=%7E~"


async def test_range_head_and_passthrough_headers(proxy: Client, origin: Origin) -> None:
    data = bytes(range(256)) * 1024
    origin.media("/m/seg.ts", data)
    path = mint(proxy, f"{origin.url}/m/seg.ts")
    partial = await proxy.get(path, headers={"Range": "bytes=100-199"})
    assert origin.seen[-1].headers["Range"] == "bytes=100-199"
    assert partial.status == 206
    assert await partial.read() == data[100:200]
    assert partial.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert partial.headers["Content-Length"] == "100"
    assert origin.seen[-1].headers["Range"] == "bytes=100-199"
    head = await proxy.head(path)
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Accept-Ranges"] == "bytes"
    assert await head.read() == b""
    past = await proxy.get(path, headers={"Range": f"bytes={len(data) + 10}-"})
    assert past.status == 416


async def test_ranged_relays_take_turns_with_the_shared_bodies(
    proxy_factory: ProxyFactory, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A viewer's own upstream body (a ranged request: neither shared nor stored) is paced by
    the turn budget of the shared bodies: past a turn's chunks, it waits in their line."""
    proxy = await proxy_factory(cache={"inflight_turn_chunks": 1})
    turns = proxy.app[RELAY].cache.bodies.turn
    waits = 0
    original = TurnBudget.next

    async def counted(self: TurnBudget) -> None:
        nonlocal waits
        if self is turns:
            waits += 1
        await original(self)

    monkeypatch.setattr(TurnBudget, "next", counted)
    data = random.Random(12).randbytes(4 * 1024 * 1024)
    origin.media("/m/big.ts", data)
    path = mint(proxy, f"{origin.url}/m/big.ts")

    async def ranged(start: int) -> bytes:
        answer = await proxy.get(path, headers={"Range": f"bytes={start}-"})
        assert answer.status == 206
        return await answer.read()

    parts = await asyncio.gather(*(ranged(start) for start in (0, 1000, 2000, 3000)))
    assert parts == [data[start:] for start in (0, 1000, 2000, 3000)]
    assert len(origin.requests_to("/m/big.ts")) == 4  # each its own upstream request
    # A turn budget of one chunk: each relay waits after each chunk (4 MiB is many chunks).
    assert waits >= 8


async def test_playlist_with_ambiguous_content_type_is_detected(
    proxy: Client, origin: Origin
) -> None:
    origin.playlist("/t/index.m3u8", "\ufeff#EXTM3U\n#EXTINF:1,\na.ts\n", "text/plain")
    origin.playlist("/t/notreally.m3u8", b"\x47" + b"\x00" * 187, "application/octet-stream")
    text = await (await proxy.get(mint(proxy, f"{origin.url}/t/index.m3u8"))).read()
    assert text.startswith(b"\xef\xbb\xbf#EXTM3U") and b"../" in text
    raw = await proxy.get(mint(proxy, f"{origin.url}/t/notreally.m3u8"))
    assert await raw.read() == b"\x47" + b"\x00" * 187


async def test_oversized_playlist_is_a_clear_502(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    client = await proxy_factory(upstream={"max_playlist_bytes": 2048})
    origin.playlist("/big.m3u8", "#EXTM3U\n" + "#EXTINF:1,\nseg.ts\n" * 500)
    resp = await client.get(mint(client, f"{origin.url}/big.m3u8"))
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "playlist_too_large" and "2048" in error["message"]


@pytest.mark.parametrize(
    ("upstream", "expected"), [(500, 502), (503, 502), (403, 502), (404, 404), (410, 410)]
)
async def test_upstream_error_statuses(
    proxy: Client, origin: Origin, upstream: int, expected: int
) -> None:
    origin.status("/x.ts", upstream)
    resp = await proxy.get(mint(proxy, f"{origin.url}/x.ts"))
    assert resp.status == expected
    assert (await resp.json())["error"]["code"] == "upstream_status"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_refused_connection_is_502(proxy: Client) -> None:
    resp = await proxy.get(mint(proxy, f"http://127.0.0.1:{_closed_port()}/x.m3u8"))
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unreachable"


async def test_stalled_upstream_is_504_within_the_timeout(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    client = await proxy_factory(upstream={"first_byte_timeout": 0.5})
    origin.stall("/slow.m3u8", 5)
    started = time.monotonic()
    resp = await client.get(mint(client, f"{origin.url}/slow.m3u8"))
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 2.5


async def test_blackholed_connect_is_bounded(proxy_factory: ProxyFactory) -> None:
    """A listener that never accepts: the connect or first-byte timeout answers, never a hang."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port = sock.getsockname()[1]
        client = await proxy_factory(upstream={"connect_timeout": 0.3, "first_byte_timeout": 0.6})
        started = time.monotonic()
        resp = await client.get(mint(client, f"http://127.0.0.1:{port}/x.m3u8"))
        assert resp.status in (502, 504)
        assert time.monotonic() - started < 3


async def test_body_stalling_mid_segment_cuts_the_response(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    async def stall_mid_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Length": "200000", "Content-Type": "video/mp2t"}
        )
        await response.prepare(request)
        await response.write(b"a" * 1000)
        await asyncio.sleep(5)
        return response

    origin.routes["/stall.ts"] = stall_mid_body
    client = await proxy_factory(upstream={"read_timeout": 0.3, "first_byte_timeout": 0.5})
    resp = await client.get(mint(client, f"{origin.url}/stall.ts"))
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_viewer_disconnect_releases_the_upstream_at_once(
    proxy: Client, origin: Origin
) -> None:
    upstream_done = asyncio.Event()
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
        await response.prepare(request)
        try:
            for _ in range(100_000):
                await response.write(b"\x47" * 65536)
                sent += 65536
                await asyncio.sleep(0.001)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        finally:
            upstream_done.set()
        return response

    origin.routes["/endless.ts"] = endless
    url = proxy.make_url(mint(proxy, f"{origin.url}/endless.ts"))
    async with aiohttp.ClientSession() as viewer:
        resp = await viewer.get(url)
        await resp.content.readexactly(100_000)
        resp.close()
    await asyncio.wait_for(upstream_done.wait(), 3)
    assert sent < 100_000 * 65536


async def test_ssrf_default_refuses_loopback_and_private(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    client = await proxy_factory(upstream={"allow_networks": []})
    origin.playlist("/a.m3u8", "#EXTM3U\n")
    port = origin.url.rsplit(":", 1)[1]
    for target in [
        f"{origin.url}/a.m3u8",
        f"http://localhost:{port}/a.m3u8",
        "http://10.0.0.1/a.m3u8",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/a.m3u8",
        "http://[::1]/a.m3u8",
        "http://[::ffff:127.0.0.1]/a.m3u8",
    ]:
        resp = await client.get(mint(client, target))
        assert resp.status == 403, target
        assert (await resp.json())["error"]["code"] == "forbidden_destination"
    assert origin.seen == []


async def test_ssrf_redirect_hop_to_a_forbidden_address_is_refused(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    """The first hop is allowed (127.0.0.1 only); the redirect to 127.0.0.2 is not."""
    client = await proxy_factory(upstream={"allow_networks": ["127.0.0.1/32"]})
    port = origin.url.rsplit(":", 1)[1]
    origin.redirect("/hop.m3u8", f"http://127.0.0.2:{port}/secret.m3u8")
    origin.playlist("/secret.m3u8", "#EXTM3U\n")
    resp = await client.get(mint(client, f"{origin.url}/hop.m3u8"))
    assert resp.status == 403
    assert [r.path for r in origin.seen] == ["/hop.m3u8"]


@pytest.mark.parametrize(
    ("mangle", "status", "code"),
    [
        (lambda ctx, ref: (ctx[:-4] + "AAAA", ref), 403, "bad_signature"),
        (lambda ctx, ref: (ctx, ref[:-4] + "AAAA"), 403, "bad_signature"),
        (lambda ctx, ref: ("not-a-token!", ref), 400, "malformed_token"),
        (lambda ctx, ref: (ctx, "x"), 400, "malformed_token"),
        (lambda ctx, ref: (ref, ctx), 403, "bad_signature"),
    ],
)
async def test_bad_tokens(
    proxy: Client, origin: Origin, mangle: Any, status: int, code: str
) -> None:
    _, _, ctx, ref, name = mint(proxy, f"{origin.url}/a.m3u8").split("/")
    bad_ctx, bad_ref = mangle(ctx, ref)
    resp = await proxy.get(f"/s/{bad_ctx}/{bad_ref}/{name}")
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code
    assert origin.seen == []


async def test_expired_token_is_410(proxy_factory: ProxyFactory, origin: Origin) -> None:
    client = await proxy_factory(security={"token_ttl": 1, "token_expiry_bucket": 1})
    origin.playlist("/a.m3u8", "#EXTM3U\n")
    path = mint(client, f"{origin.url}/a.m3u8")
    await asyncio.sleep(2.1)
    resp = await client.get(path)
    assert resp.status == 410
    assert (await resp.json())["error"]["code"] == "token_expired"


async def test_api_mints_urls_that_play(proxy: Client, origin: Origin) -> None:
    origin.playlist("/api/master.m3u8", "#EXTM3U\n#EXTINF:1,\nseg.ts\n")
    resp = await proxy.post(
        "/api/v1/streams",
        json={"url": f"{origin.url}/api/master.m3u8", "headers": {"Referer": REFERER}},
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
    )
    assert resp.status == 201
    playlist_url = (await resp.json())["playlist_url"]
    assert playlist_url.startswith(str(proxy.make_url("/s/")))
    assert origin.url.split("//")[1] not in playlist_url
    played = await proxy.get(URL(playlist_url).path)
    assert played.status == 200
    assert origin.seen[-1].headers["Referer"] == REFERER


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, {"url": "https://a.example/x.m3u8"}, 401, "unauthorized"),
        (
            {"Authorization": "Bearer wrong"},
            {"url": "https://a.example/x.m3u8"},
            401,
            "unauthorized",
        ),
        (
            {"Authorization": f"Bearer {TEST_API_KEY}"},
            {"url": "ftp://a.example/x"},
            400,
            "bad_request",
        ),
        ({"Authorization": f"Bearer {TEST_API_KEY}"}, {"nope": 1}, 400, "bad_request"),
        ({"Authorization": f"Bearer {TEST_API_KEY}"}, [1, 2], 400, "bad_request"),
        (
            {"Authorization": f"Bearer {TEST_API_KEY}"},
            {"url": "https://a.example/x.m3u8", "headers": {"Referer": "a\r\nX-Evil: 1"}},
            400,
            "invalid_header",
        ),
        (
            {"Authorization": f"Bearer {TEST_API_KEY}"},
            {"url": "https://a.example/x.m3u8", "headers": {"Referer": 5}},
            400,
            "invalid_header",
        ),
    ],
)
async def test_api_refusals(
    proxy: Client, headers: dict[str, str], body: Any, status: int, code: str
) -> None:
    resp = await proxy.post("/api/v1/streams", json=body, headers=headers)
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code


async def test_api_rejects_invalid_json(proxy: Client) -> None:
    resp = await proxy.post(
        "/api/v1/streams",
        data=b"{not json",
        headers={"Authorization": f"Bearer {TEST_API_KEY}", "Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "bad_request"


async def test_minting_is_off_without_api_keys(proxy_factory: ProxyFactory) -> None:
    client = await proxy_factory(security={"api_keys": []})
    resp = await client.post("/api/v1/streams", json={"url": "https://a.example/x.m3u8"})
    assert resp.status == 403
    resp = await client.get(
        "/proxy.m3u8", params={"url": "https://a.example/x.m3u8", "api_key": ""}
    )
    assert resp.status == 403


async def test_proxy_m3u8_redirects_to_a_signed_url(proxy: Client, origin: Origin) -> None:
    origin.playlist("/q/index.m3u8", "#EXTM3U\n")
    resp = await proxy.get(
        "/proxy.m3u8",
        params={
            "url": f"{origin.url}/q/index.m3u8",
            "referer": REFERER,
            "origin": "https://site.example",
            "user_agent": "TestPlayer/1.0",
            "api_key": TEST_API_KEY,
        },
        allow_redirects=False,
    )
    assert resp.status == 302
    location = resp.headers["Location"]
    assert location.startswith("/s/") and "origin" not in location
    assert (await proxy.get(location)).status == 200
    seen = origin.seen[-1].headers
    assert (seen["Referer"], seen["Origin"], seen["User-Agent"]) == (
        REFERER,
        "https://site.example",
        "TestPlayer/1.0",
    )


async def test_default_user_agent_is_sent(proxy: Client, origin: Origin) -> None:
    origin.media("/ua.ts", b"x")
    await proxy.get(mint(proxy, f"{origin.url}/ua.ts", {}))
    assert "Mozilla/5.0" in origin.seen[-1].headers["User-Agent"]


async def test_cors_headers_and_preflight(proxy: Client, origin: Origin) -> None:
    origin.media("/c.ts", b"x" * 10)
    path = mint(proxy, f"{origin.url}/c.ts")
    resp = await proxy.get(path, headers={"Origin": "https://player.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Content-Range" in resp.headers["Access-Control-Expose-Headers"]
    assert "Access-Control-Allow-Credentials" not in resp.headers
    pre = await proxy.options(
        path,
        headers={
            "Origin": "https://player.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "range",
        },
    )
    assert pre.status == 204
    assert "Range" in pre.headers["Access-Control-Allow-Headers"]
    assert "GET" in pre.headers["Access-Control-Allow-Methods"]
    error = await proxy.get("/s/x/y/z", headers={"Origin": "https://player.example"})
    assert error.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_configured_origins(proxy_factory: ProxyFactory) -> None:
    client = await proxy_factory(security={"cors_origins": ["https://good.example"]})
    good = await client.get("/healthz", headers={"Origin": "https://good.example"})
    assert good.headers["Access-Control-Allow-Origin"] == "https://good.example"
    assert "Origin" in good.headers["Vary"]
    bad = await client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in bad.headers


async def test_health_ready_metrics_and_json_404(proxy: Client) -> None:
    assert (await (await proxy.get("/healthz")).json()) == {"status": "ok"}
    assert (await proxy.get("/readyz")).status == 200
    await proxy.get("/no/such/route")
    metrics = await (await proxy.get("/metrics")).text()
    assert 'hlsrelay_http_requests_total{route="healthz",status_class="2xx"} 1.0' in metrics
    missing = await proxy.get("/no/such/route")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    wrong_method = await proxy.post("/healthz")
    assert wrong_method.status == 405
    assert (await wrong_method.json())["error"]["code"] == "method_not_allowed"


async def test_base_path_and_root_child_uris(proxy_factory: ProxyFactory, origin: Origin) -> None:
    client = await proxy_factory(server={"base_path": "/hls", "child_uris": "root"})
    origin.playlist("/b/index.m3u8", "#EXTM3U\n#EXTINF:1,\nseg.ts\n")
    origin.media("/b/seg.ts", b"seg")
    path = client.app[RELAY].prefix + mint(client, f"{origin.url}/b/index.m3u8")
    assert path.startswith("/hls/s/")
    body = await (await client.get(path)).text()
    child = proxied_uris(body)[0]
    assert child.startswith("/hls/s/")
    assert await (await client.get(child)).read() == b"seg"
    assert (await client.get("/healthz")).status == 404
    assert (await client.get("/hls/healthz")).status == 200


async def test_upstream_metrics_count_requests_and_errors(proxy: Client, origin: Origin) -> None:
    origin.playlist("/m/index.m3u8", "#EXTM3U\n")
    origin.status("/m/gone.ts", 500)
    await proxy.get(mint(proxy, f"{origin.url}/m/index.m3u8"))
    await proxy.get(mint(proxy, f"{origin.url}/m/gone.ts"))
    text = await (await proxy.get("/metrics")).text()
    assert 'hlsrelay_upstream_requests_total{kind="playlist"} 2.0' in text
    assert 'hlsrelay_upstream_errors_total{reason="upstream_status"} 1.0' in text
    assert 'hlsrelay_upstream_ttfb_seconds_count{kind="playlist"} 2.0' in text
    # Labels are bounded: no URL, host or port of the origin in the exposition.
    assert origin.url.split("//")[1] not in text


@pytest.mark.parametrize(("keepalive", "reused"), [(60.0, True), (0.0, False)])
async def test_idle_upstream_connections_are_kept_for_upstream_keepalive_timeout(
    proxy_factory: ProxyFactory, origin: Origin, keepalive: float, reused: bool
) -> None:
    ports: list[int] = []

    async def segment(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ports.append(peer[1] if peer else 0)
        return web.Response(body=b"x" * 100, content_type="video/mp2t")

    origin.routes["/a.ts"] = segment
    origin.routes["/b.ts"] = segment
    client = await proxy_factory(upstream={"keepalive_timeout": keepalive})
    for name in ("a.ts", "b.ts"):
        async with client.get(mint(client, f"{origin.url}/{name}")) as response:
            assert response.status == 200
            await response.read()
        await asyncio.sleep(0.05)  # idle between the two, as between a live channel's segments
    assert len(ports) == 2
    assert (ports[0] == ports[1]) is reused

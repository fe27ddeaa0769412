"""The cache over real sockets: coalescing, the store, cache headers, stale-if-error, prefetch.

Every claim about upstream traffic is counted on the real origin (``origin.requests_to``), and
every viewer's body is compared byte for byte.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.web import crowd, streams
from proxy.web.keys import METRICS, RELAY, REQUEST_FACTS
from tests.conftest import ProxyFactory
from tests.origin import Origin

Client = TestClient[Any, Any]
REFERER = "https://site.example/watch/1"


def mint(client: Client, url: str, headers: dict[str, str] | None = None) -> str:
    return client.app[RELAY].mint(url, headers if headers is not None else {"Referer": REFERER})


def child(playlist_path: str, body: str, name: str) -> str:
    """The proxied URL of the child called ``name`` in a rewritten playlist."""
    for line in body.splitlines():
        if line and not line.startswith("#") and line.endswith("/" + name):
            return str(URL(playlist_path).join(URL(line, encoded=True)))
    raise AssertionError(f"{name} not in playlist")


def cache_count(client: Client, result: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(
        "hlsrelay_cache_requests_total", {"result": result}
    )
    return value or 0.0


def live_playlist(target: int = 4, first: int = 100, count: int = 3, part: bool = False) -> str:
    lines = ["#EXTM3U", "#EXT-X-VERSION:6", f"#EXT-X-TARGETDURATION:{target}"]
    if part:
        lines.append("#EXT-X-PART-INF:PART-TARGET=1.0")
    lines.append(f"#EXT-X-MEDIA-SEQUENCE:{first}")
    for n in range(first, first + count):
        lines += [f"#EXTINF:{target}.0,", f"seg{n}.ts"]
    return "\n".join(lines) + "\n"


def slow_media(
    origin: Origin, path: str, data: bytes, delay: float, chunk: int = 64 * 1024
) -> None:
    """A segment whose headers come after ``delay`` s, then its body in chunks as it is made."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(delay)
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp2t", "Content-Length": str(len(data))}
        )
        await response.prepare(request)
        for start in range(0, len(data), chunk):
            await response.write(data[start : start + chunk])
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response

    origin.routes[path] = handler


def truncated_media(origin: Origin, path: str, data: bytes, send: int, chunked: bool) -> None:
    """Announces ``data`` whole, sends ``send`` bytes slowly, then drops the connection."""

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "video/mp2t"}
        if not chunked:
            headers["Content-Length"] = str(len(data))
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        for start in range(0, send, 16 * 1024):
            await response.write(data[start : min(send, start + 16 * 1024)])
            await asyncio.sleep(0.01)
        assert request.transport is not None
        request.transport.close()
        return response

    origin.routes[path] = handler


async def read_all(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        return resp.status, await resp.read()


# -- shared in-flight bodies ------------------------------------------------------------------


async def test_concurrent_viewers_of_one_segment_cost_one_upstream_request(
    proxy: Client, origin: Origin
) -> None:
    data = random.Random(1).randbytes(2 * 1024 * 1024)
    slow_media(origin, "/live/seg1.ts", data, delay=0.3)
    origin.playlist("/live/index.m3u8", live_playlist(first=1, count=1))
    playlist_path = mint(proxy, f"{origin.url}/live/index.m3u8")
    body = await (await proxy.get(playlist_path)).text()
    seg = child(playlist_path, body, "seg1.ts")
    url = str(proxy.make_url(seg))

    async with aiohttp.ClientSession() as session:
        first = asyncio.ensure_future(read_all(session, url))
        await asyncio.sleep(0.1)
        rest = [asyncio.ensure_future(read_all(session, url)) for _ in range(40)]
        await asyncio.sleep(0.35)  # past the origin's delay: these join a body already arriving
        late = [asyncio.ensure_future(read_all(session, url)) for _ in range(10)]
        results = await asyncio.gather(first, *rest, *late)
    assert len(origin.requests_to("/live/seg1.ts")) == 1
    digest = hashlib.sha256(data).hexdigest()
    for status, got in results:
        assert status == 200
        assert hashlib.sha256(got).hexdigest() == digest
    assert cache_count(proxy, "miss") >= 1
    assert cache_count(proxy, "coalesced") >= 40

    # Now stored: served from memory with Age, still one upstream request.
    resp = await proxy.get(seg)
    assert await resp.read() == data
    assert "Age" in resp.headers
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert len(origin.requests_to("/live/seg1.ts")) == 1
    assert cache_count(proxy, "hit") >= 1


async def test_viewers_get_bytes_before_the_segment_is_whole(proxy: Client, origin: Origin) -> None:
    data = random.Random(2).randbytes(512 * 1024)
    released = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
        await response.prepare(request)
        await response.write(data[:1024])
        await released.wait()
        await response.write(data[1024:])
        await response.write_eof()
        return response

    origin.routes["/live/seg2.ts"] = handler
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    origin.playlist("/live/index.m3u8", live_playlist(first=2, count=1))
    seg = child(path, await (await proxy.get(path)).text(), "seg2.ts")
    first, second = await proxy.get(seg), await proxy.get(seg)
    # Both viewers have the first KiB while the origin still holds the rest back.
    assert await asyncio.wait_for(first.content.readexactly(1024), 2) == data[:1024]
    assert await asyncio.wait_for(second.content.readexactly(1024), 2) == data[:1024]
    released.set()
    assert await first.content.read() == data[1024:]
    assert await second.content.read() == data[1024:]
    assert len(origin.requests_to("/live/seg2.ts")) == 1


@pytest.mark.parametrize("chunked", [False, True])
async def test_truncated_upstream_body_aborts_every_follower_and_is_not_stored(
    proxy: Client, origin: Origin, chunked: bool
) -> None:
    data = random.Random(3).randbytes(256 * 1024)
    truncated_media(origin, "/live/seg3.ts", data, send=100 * 1024, chunked=chunked)
    origin.playlist("/live/index.m3u8", live_playlist(first=3, count=1))
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    url = str(proxy.make_url(child(path, await (await proxy.get(path)).text(), "seg3.ts")))

    async def viewer(session: aiohttp.ClientSession) -> str:
        try:
            async with session.get(url) as resp:
                await resp.read()
        except aiohttp.ClientPayloadError:
            return "cut"
        return "whole"

    async with aiohttp.ClientSession() as session:
        outcomes = await asyncio.wait_for(asyncio.gather(*(viewer(session) for _ in range(8))), 10)
    assert outcomes == ["cut"] * 8
    assert len(origin.requests_to("/live/seg3.ts")) == 1
    # Nothing was stored: the next viewer makes a new upstream request, and gets the whole body.
    origin.media("/live/seg3.ts", data)
    assert await read_all_client(proxy, url) == data
    assert len(origin.requests_to("/live/seg3.ts")) == 2


async def test_object_over_the_size_limit_is_shared_but_not_stored(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    proxy = await proxy_factory(cache={"max_object_bytes": 100_000})
    data = random.Random(4).randbytes(600 * 1024)
    slow_media(origin, "/vod/big.ts", data, delay=0.2, chunk=32 * 1024)
    origin.playlist("/vod/index.m3u8", live_playlist(first=0, count=0) + "big.ts\n")
    path = mint(proxy, f"{origin.url}/vod/index.m3u8")
    url = str(proxy.make_url(child(path, await (await proxy.get(path)).text(), "big.ts")))
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(read_all(session, url) for _ in range(5)))
    assert all(got == data for _, got in results)
    assert len(origin.requests_to("/vod/big.ts")) == 1
    await read_all_client(proxy, url)
    assert len(origin.requests_to("/vod/big.ts")) == 2  # too big to keep


async def test_over_the_inflight_budget_bodies_stream_through_whole_but_unstored(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    # Budget 0: every body spills at its first chunk and is relayed in 64 KiB chunks from then on.
    proxy = await proxy_factory(cache={"inflight_bytes": 0})
    data = random.Random(5).randbytes(700 * 1024)
    origin.media("/vod/seg.ts", data)
    # Minted as a playlist's child (a top-level media URL is relayed uncached).
    origin.playlist("/vod/index.m3u8", live_playlist(first=0, count=0) + "seg.ts\n")
    path = mint(proxy, f"{origin.url}/vod/index.m3u8")
    url = child(path, await (await proxy.get(path)).text(), "seg.ts")
    assert await read_all_client(proxy, url) == data
    assert await read_all_client(proxy, url) == data
    assert len(origin.requests_to("/vod/seg.ts")) == 2  # over the budget: not stored
    assert proxy.app[RELAY].cache.bodies.held == 0


async def test_over_the_inflight_budget_a_cut_upstream_cuts_its_viewer(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    # A body spilled from the start (memory short) is streamed through, not kept: a short
    # upstream body must still reach its viewer as a cut connection, never as a whole answer.
    proxy = await proxy_factory(cache={"inflight_bytes": 0})
    data = random.Random(12).randbytes(256 * 1024)
    truncated_media(origin, "/vod/cut.ts", data, send=100 * 1024, chunked=False)
    origin.playlist("/vod/index.m3u8", live_playlist(first=0, count=0) + "cut.ts\n")
    path = mint(proxy, f"{origin.url}/vod/index.m3u8")
    url = str(proxy.make_url(child(path, await (await proxy.get(path)).text(), "cut.ts")))
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    cache = proxy.app[RELAY].cache
    assert cache.bodies.held == 0 and len(cache.bodies) == 0
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all_client(proxy, URL(url).path_qs)  # nothing was stored: it is cut again
    assert len(origin.requests_to("/vod/cut.ts")) == 2


async def test_over_the_inflight_budget_a_viewer_who_leaves_drops_its_upstream(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    proxy = await proxy_factory(cache={"inflight_bytes": 0})
    sent: list[int] = []
    gone = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
        await response.prepare(request)
        try:
            for _ in range(2_000):  # bounded: 128 MiB at most, if the proxy never let go
                await response.write(b"x" * 64 * 1024)
                sent.append(64 * 1024)
                await asyncio.sleep(0.005)
        finally:
            # Written to the end, or (what the test waits for) the proxy closed the connection:
            # a write failed, or the server cancelled this handler when it saw it closed.
            gone.set()
        return response

    origin.routes["/live/endless.ts"] = endless
    origin.playlist("/live/index.m3u8", live_playlist(first=0, count=0) + "endless.ts\n")
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    url = str(proxy.make_url(child(path, await (await proxy.get(path)).text(), "endless.ts")))
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert len(await resp.content.readexactly(256 * 1024)) == 256 * 1024
    # The viewer left: nobody else can join a spilled body, so its upstream is dropped, and
    # nothing is left reading it.
    await asyncio.wait_for(gone.wait(), timeout=5)
    cache = proxy.app[RELAY].cache
    assert sum(sent) < 64 * 1024 * 1024 and cache.bodies.held == 0 and len(cache.tasks) == 0


async def test_chunked_upstream_body_is_relayed_whole(proxy: Client, origin: Origin) -> None:
    # No Content-Length: chunked transfer encoding, whose chunk ends the relay must not take
    # for the end of the body.
    data = random.Random(6).randbytes(300 * 1024)

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(data), 50 * 1024):
            await response.write(data[start : start + 50 * 1024])
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response

    origin.routes["/live/chunked.ts"] = handler
    origin.playlist("/live/index.m3u8", live_playlist(first=0, count=0) + "chunked.ts\n")
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    url = child(path, await (await proxy.get(path)).text(), "chunked.ts")
    assert await read_all_client(proxy, url) == data
    assert await read_all_client(proxy, url) == data  # the stored copy is whole too
    assert len(origin.requests_to("/live/chunked.ts")) == 1


async def read_all_client(proxy: Client, url: str) -> bytes:
    resp = await proxy.get(URL(url).path_qs)
    return await resp.read()


async def test_not_yet_available_segment_is_a_short_lived_404(
    proxy: Client, origin: Origin
) -> None:
    origin.playlist("/live/index.m3u8", live_playlist(first=9, count=1))
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    seg = child(path, await (await proxy.get(path)).text(), "seg9.ts")
    resp = await proxy.get(seg)
    assert resp.status == 404
    assert resp.headers["Cache-Control"] == "public, max-age=1"
    assert (await resp.json())["error"]["code"] == "upstream_status"
    # Not stored: once it exists, it is served.
    origin.media("/live/seg9.ts", b"now-here")
    assert await (await proxy.get(seg)).read() == b"now-here"


async def test_keys_are_private_no_store_and_ranges_bypass_the_cache(
    proxy: Client, origin: Origin
) -> None:
    origin.playlist(
        "/live/index.m3u8",
        '#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXT-X-KEY:METHOD=AES-128,URI="k.key"\n'
        "#EXTINF:4,\nseg1.ts\n",
    )
    origin.media("/live/k.key", b"0123456789abcdef", "application/octet-stream")
    origin.media("/live/seg1.ts", bytes(range(256)) * 4)
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    body = await (await proxy.get(path)).text()
    key_url = str(URL(path).join(URL(body.split('URI="')[1].split('"')[0], encoded=True)))
    for _ in range(2):
        resp = await proxy.get(key_url)
        assert resp.headers["Cache-Control"] == "private, no-store"
        assert await resp.read() == b"0123456789abcdef"
    # Kept in hlsrelay's own store (key_ttl), never in a shared cache.
    assert len(origin.requests_to("/live/k.key")) == 1
    seg = child(path, body, "seg1.ts")
    ranged = await proxy.get(seg, headers={"Range": "bytes=0-9"})
    assert ranged.status == 206 and await ranged.read() == bytes(range(10))
    ranged = await proxy.get(seg, headers={"Range": "bytes=0-9"})
    assert ranged.status == 206
    assert len(origin.requests_to("/live/seg1.ts")) == 2


# -- playlists ----------------------------------------------------------------------------------


async def test_concurrent_playlist_requests_are_one_upstream_request(
    proxy: Client, origin: Origin
) -> None:
    text = live_playlist(target=4)

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.Response(text=text, content_type="application/vnd.apple.mpegurl")

    origin.routes["/live/index.m3u8"] = slow
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    responses = await asyncio.gather(*(proxy.get(path) for _ in range(50)))
    bodies = {await r.read() for r in responses}
    assert len(bodies) == 1 and all(r.status == 200 for r in responses)
    assert len(origin.requests_to("/live/index.m3u8")) == 1
    assert cache_count(proxy, "miss") == 1
    assert cache_count(proxy, "coalesced") == 49
    assert all(r.headers["Cache-Control"] == "public, max-age=2" for r in responses)


async def test_live_playlist_is_refetched_after_half_a_target_duration(
    proxy: Client, origin: Origin
) -> None:
    origin.playlist("/live/index.m3u8", live_playlist(target=1))
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    first = await proxy.get(path)
    assert "Age" not in first.headers
    second = await proxy.get(path)
    assert second.headers["Age"] == "0"
    assert await second.read() == await first.read()
    assert len(origin.requests_to("/live/index.m3u8")) == 1
    await asyncio.sleep(0.55)
    await proxy.get(path)
    assert len(origin.requests_to("/live/index.m3u8")) == 2


async def test_ll_hls_directives_are_part_of_the_key(proxy: Client, origin: Origin) -> None:
    origin.playlist("/live/ll.m3u8", live_playlist(target=4, part=True))
    path = mint(proxy, f"{origin.url}/live/ll.m3u8")
    plain = await proxy.get(path)
    assert plain.headers["Cache-Control"] == "public, max-age=1"
    blocking = await proxy.get(path + "?_HLS_msn=101&_HLS_part=2")
    assert blocking.headers["Cache-Control"] == "public, max-age=24"
    await proxy.get(path + "?_HLS_msn=101&_HLS_part=2")
    other = await proxy.get(path + "?_HLS_msn=101&_HLS_part=3")
    assert other.status == 200
    assert [r.query_string for r in origin.requests_to("/live/ll.m3u8")] == [
        "",
        "_HLS_msn=101&_HLS_part=2",
        "_HLS_msn=101&_HLS_part=3",
    ]


async def test_playlist_classes_get_their_cache_control(proxy: Client, origin: Origin) -> None:
    origin.playlist("/vod/index.m3u8", live_playlist(target=6) + "#EXT-X-ENDLIST\n")
    origin.playlist("/master.m3u8", "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1000\nlive/index.m3u8\n")
    vod = await proxy.get(mint(proxy, f"{origin.url}/vod/index.m3u8"))
    assert vod.headers["Cache-Control"] == "public, max-age=86400"
    master = await proxy.get(mint(proxy, f"{origin.url}/master.m3u8"))
    assert master.headers["Cache-Control"] == "public, max-age=60"


async def test_etag_last_modified_and_304(proxy: Client, origin: Origin) -> None:
    origin.playlist("/vod/index.m3u8", live_playlist(target=6) + "#EXT-X-ENDLIST\n")
    path = mint(proxy, f"{origin.url}/vod/index.m3u8")
    resp = await proxy.get(path)
    etag, last_modified = resp.headers["ETag"], resp.headers["Last-Modified"]
    assert etag.startswith('"') and etag.endswith('"')
    not_modified = await proxy.get(path, headers={"If-None-Match": etag})
    assert not_modified.status == 304
    assert not_modified.headers["ETag"] == etag
    assert not_modified.headers["Cache-Control"] == "public, max-age=86400"
    assert await not_modified.read() == b""
    assert (await proxy.get(path, headers={"If-None-Match": '"other"'})).status == 200
    since = await proxy.get(path, headers={"If-Modified-Since": last_modified})
    assert since.status == 304
    older = formatdate(0, usegmt=True)
    assert (await proxy.get(path, headers={"If-Modified-Since": older})).status == 200
    # If-None-Match wins over If-Modified-Since.
    both = await proxy.get(
        path, headers={"If-None-Match": '"other"', "If-Modified-Since": last_modified}
    )
    assert both.status == 200


async def test_gzip_for_viewers_that_accept_it(proxy: Client, origin: Origin) -> None:
    origin.playlist("/vod/index.m3u8", live_playlist(target=6, count=40) + "#EXT-X-ENDLIST\n")
    path = mint(proxy, f"{origin.url}/vod/index.m3u8")
    plain = await proxy.get(path, headers={"Accept-Encoding": "identity"})
    plain_body = await plain.read()
    assert "Content-Encoding" not in plain.headers
    assert plain.headers["Vary"] == "Accept-Encoding"
    zipped = await proxy.get(
        path, headers={"Accept-Encoding": "gzip, deflate"}, auto_decompress=False
    )
    raw = await zipped.read()
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert zipped.headers["Vary"] == "Accept-Encoding"
    assert gzip.decompress(raw) == plain_body and len(raw) < len(plain_body)
    assert zipped.headers["ETag"] != plain.headers["ETag"]
    # Either representation's validator revalidates.
    again = await proxy.get(
        path, headers={"Accept-Encoding": "gzip", "If-None-Match": zipped.headers["ETag"]}
    )
    assert again.status == 304
    refused = await proxy.get(path, headers={"Accept-Encoding": "gzip;q=0"})
    assert "Content-Encoding" not in refused.headers


async def test_stale_if_error_serves_the_last_good_playlist_for_a_bounded_time(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    proxy = await proxy_factory(cache={"stale_if_error": 1.0})
    text = live_playlist(target=1)
    origin.playlist("/live/index.m3u8", text)
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    good = await (await proxy.get(path)).read()
    origin.status("/live/index.m3u8", 503)
    await asyncio.sleep(0.6)  # past freshness (0.5 s), within stale_if_error
    stale = await proxy.get(path)
    assert stale.status == 200
    assert await stale.read() == good
    assert int(stale.headers["Age"]) >= 0
    assert cache_count(proxy, "stale") == 1
    await asyncio.sleep(1.0)  # past freshness + stale_if_error
    assert (await proxy.get(path)).status == 502
    metrics = await (await proxy.get("/metrics")).text()
    assert 'hlsrelay_cache_requests_total{result="stale"} 1.0' in metrics


async def test_upstream_404_is_not_hidden_by_a_stale_playlist(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    proxy = await proxy_factory(cache={"stale_if_error": 30.0})
    origin.playlist("/live/index.m3u8", live_playlist(target=1))
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    assert (await proxy.get(path)).status == 200
    origin.status("/live/index.m3u8", 404)
    await asyncio.sleep(0.6)
    assert (await proxy.get(path)).status == 404


async def test_header_profiles_never_share_cached_content(proxy: Client, origin: Origin) -> None:
    async def by_referer(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=request.headers.get("Referer", "").encode(), content_type="video/mp2t"
        )

    async def playlist(request: web.Request) -> web.StreamResponse:
        return web.Response(
            text=live_playlist(first=1, count=1), content_type="application/vnd.apple.mpegurl"
        )

    origin.routes["/live/seg1.ts"] = by_referer
    origin.routes["/live/index.m3u8"] = playlist
    got = []
    for referer in ("https://a.example/", "https://b.example/"):
        path = mint(proxy, f"{origin.url}/live/index.m3u8", {"Referer": referer})
        seg = child(path, await (await proxy.get(path)).text(), "seg1.ts")
        got.append(await (await proxy.get(seg)).read())
        got.append(await (await proxy.get(seg)).read())
    assert got == [b"https://a.example/"] * 2 + [b"https://b.example/"] * 2
    assert len(origin.requests_to("/live/index.m3u8")) == 2
    assert len(origin.requests_to("/live/seg1.ts")) == 2


async def test_prefetch_fetches_the_newest_segments_on_refresh(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    proxy = await proxy_factory(cache={"prefetch_segments": 2})
    origin.playlist("/live/index.m3u8", live_playlist(target=4, first=10, count=4))
    for n in range(10, 14):
        origin.media(f"/live/seg{n}.ts", f"segment {n}".encode())
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    body = await (await proxy.get(path)).text()
    for _ in range(100):
        if len(origin.seen) >= 3:
            break
        await asyncio.sleep(0.01)
    assert sorted(r.path for r in origin.seen[1:]) == ["/live/seg12.ts", "/live/seg13.ts"]
    await asyncio.sleep(0.05)
    assert await (await proxy.get(child(path, body, "seg13.ts"))).read() == b"segment 13"
    assert len(origin.requests_to("/live/seg13.ts")) == 1
    assert cache_count(proxy, "hit") >= 1
    metrics = await (await proxy.get("/metrics")).text()
    assert "hlsrelay_cache_prefetches_total 2.0" in metrics


async def test_cache_gauges_in_metrics(proxy: Client, origin: Origin) -> None:
    origin.playlist("/vod/index.m3u8", live_playlist() + "#EXT-X-ENDLIST\n")
    await proxy.get(mint(proxy, f"{origin.url}/vod/index.m3u8"))
    metrics = await (await proxy.get("/metrics")).text()
    assert "hlsrelay_cache_entries 1.0" in metrics
    assert "hlsrelay_cache_bytes " in metrics
    assert 'hlsrelay_cache_requests_total{result="miss"} 1.0' in metrics


async def test_ranges_of_a_stored_segment_are_served_from_the_store(
    proxy: Client, origin: Origin
) -> None:
    data = bytes(range(256)) * 40
    origin.media("/vod/seg1.ts", data)
    origin.playlist("/vod/index.m3u8", live_playlist(first=1, count=1) + "#EXT-X-ENDLIST\n")
    path = mint(proxy, f"{origin.url}/vod/index.m3u8")
    seg = child(path, await (await proxy.get(path)).text(), "seg1.ts")
    assert await (await proxy.get(seg)).read() == data
    for header, start, stop in (
        ("bytes=0-99", 0, 100),
        ("bytes=10000-", 10000, len(data)),
        ("bytes=-24", len(data) - 24, len(data)),
        ("bytes=100-999999", 100, len(data)),
    ):
        resp = await proxy.get(seg, headers={"Range": header})
        assert resp.status == 206, header
        assert await resp.read() == data[start:stop]
        assert resp.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(data)}"
    assert len(origin.requests_to("/vod/seg1.ts")) == 1
    # If-Range or an unsatisfiable range (or several ranges): the upstream answers those.
    assert (await proxy.get(seg, headers={"Range": "bytes=0-9", "If-Range": '"v1"'})).status == 206
    assert (await proxy.get(seg, headers={"Range": f"bytes={len(data)}-"})).status == 416
    assert len(origin.requests_to("/vod/seg1.ts")) == 3


async def test_first_viewer_leaving_does_not_fail_the_others(proxy: Client, origin: Origin) -> None:
    data = random.Random(5).randbytes(300 * 1024)
    slow_media(origin, "/live/seg5.ts", data, delay=0.3)
    origin.playlist("/live/index.m3u8", live_playlist(first=5, count=1))
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    url = str(proxy.make_url(child(path, await (await proxy.get(path)).text(), "seg5.ts")))
    async with aiohttp.ClientSession() as session:
        first = asyncio.ensure_future(read_all(session, url))
        await asyncio.sleep(0.05)
        others = [asyncio.ensure_future(read_all(session, url)) for _ in range(5)]
        await asyncio.sleep(0.05)
        # The viewer whose request started the fetch goes away before the origin answers (the
        # test server cancels handlers of closed connections, as handler_cancellation does).
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        results = await asyncio.gather(*others)
    assert all(status == 200 and got == data for status, got in results)
    # Its upstream request went with it; one background request served the others.
    assert len(origin.requests_to("/live/seg5.ts")) == 2


async def test_viewer_leaving_mid_body_leaves_the_others_and_the_store_whole(
    proxy: Client, origin: Origin
) -> None:
    data = random.Random(6).randbytes(1024 * 1024)
    slow_media(origin, "/live/seg6.ts", data, delay=0.1, chunk=32 * 1024)
    origin.playlist("/live/index.m3u8", live_playlist(first=6, count=1))
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    seg = child(path, await (await proxy.get(path)).text(), "seg6.ts")
    leaving, staying = await proxy.get(seg), await proxy.get(seg)
    assert len(await leaving.content.readexactly(64 * 1024)) == 64 * 1024
    leaving.close()
    assert await staying.read() == data
    await asyncio.sleep(0.05)
    assert await (await proxy.get(seg)).read() == data
    assert len(origin.requests_to("/live/seg6.ts")) == 1


# -- a crowd let go at once -----------------------------------------------------------------------


def headers_first_media(origin: Origin, path: str, data: bytes, delay: float) -> None:
    """Sends its headers at once and its body ``delay`` s later (a segment still being made)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp2t", "Content-Length": str(len(data))}
        )
        await response.prepare(request)  # aiohttp sends the headers now
        await asyncio.sleep(delay)
        for start in range(0, len(data), 64 * 1024):
            await response.write(data[start : start + 64 * 1024])
        await response.write_eof()
        return response

    origin.routes[path] = handler


async def segment_url(proxy: Client, origin: Origin, name: str) -> str:
    origin.playlist("/crowd/index.m3u8", live_playlist(first=0, count=0) + f"{name}\n")
    path = mint(proxy, f"{origin.url}/crowd/index.m3u8")
    return str(proxy.make_url(child(path, await (await proxy.get(path)).text(), name)))


async def test_a_crowd_gets_whole_answers_when_the_headers_come_before_the_body(
    proxy: Client, origin: Origin
) -> None:
    data = random.Random(7).randbytes(600 * 1024)
    headers_first_media(origin, "/crowd/early.ts", data, delay=0.3)
    url = await segment_url(proxy, origin, "early.ts")

    async def viewer(session: aiohttp.ClientSession) -> tuple[int, str | None, bytes]:
        async with session.get(url) as resp:
            return resp.status, resp.headers.get("Content-Length"), await resp.read()

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(viewer(session) for _ in range(30)))
    assert results == [(200, str(len(data)), data)] * 30
    assert len(origin.requests_to("/crowd/early.ts")) == 1
    assert await read_all_client(proxy, url) == data  # stored whole
    assert len(origin.requests_to("/crowd/early.ts")) == 1


async def test_upstream_cut_after_its_headers_fails_every_waiter(
    proxy: Client, origin: Origin
) -> None:
    data = random.Random(8).randbytes(256 * 1024)

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp2t", "Content-Length": str(len(data))}
        )
        await response.prepare(request)  # headers out: the crowd's answers are under way
        await asyncio.sleep(0.2)
        assert request.transport is not None
        request.transport.close()  # not one body byte
        return response

    origin.routes["/crowd/cut.ts"] = handler
    url = await segment_url(proxy, origin, "cut.ts")

    async def viewer(session: aiohttp.ClientSession) -> str:
        try:
            async with session.get(url) as resp:
                body = await resp.json()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            return "cut"
        return f"answered {resp.status} {body['error']['code']}"

    async with aiohttp.ClientSession() as session:
        outcomes = await asyncio.wait_for(asyncio.gather(*(viewer(session) for _ in range(8))), 10)
    # Never a short body that looks whole: nothing had gone out to the crowd (its headers go with
    # its first bytes), so each viewer is told, with the upstream's error.
    assert set(outcomes) == {"answered 502 upstream_unreachable"}
    # (aiohttp's client asks again once after a disconnect: each flight was one request.)
    fetched = len(origin.requests_to("/crowd/cut.ts"))
    assert 1 <= fetched <= 2
    origin.media("/crowd/cut.ts", data)
    assert await read_all_client(proxy, url) == data  # nothing was stored
    assert len(origin.requests_to("/crowd/cut.ts")) == fetched + 1


async def test_viewers_leaving_before_the_first_bytes_leave_the_others_whole(
    proxy: Client, origin: Origin
) -> None:
    data = random.Random(9).randbytes(400 * 1024)
    headers_first_media(origin, "/crowd/leave.ts", data, delay=0.3)
    url = await segment_url(proxy, origin, "leave.ts")
    async with aiohttp.ClientSession() as session:
        viewers = [asyncio.ensure_future(read_all(session, url)) for _ in range(12)]
        await asyncio.sleep(0.2)  # all wait; their answers are prepared, the body is not in
        for leaving in viewers[::3]:
            leaving.cancel()  # their connections close; the test server cancels their handlers
        results = await asyncio.gather(*viewers, return_exceptions=True)
    for number, result in enumerate(results):
        if number % 3:
            assert result == (200, data)
        else:
            assert isinstance(result, asyncio.CancelledError)
    await asyncio.sleep(0.05)
    cache = proxy.app[RELAY].cache
    assert len(cache.bodies) == 0 and cache.bodies.held == 0  # nothing left behind
    assert await read_all_client(proxy, url) == data
    assert len(origin.requests_to("/crowd/leave.ts")) == 1


def log_crowd_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every body write of a shared body's viewers, in order: (the viewer's request id, bytes);
    first bytes sent with the headers (web/crowd.py) and aiohttp writes alike."""
    writes: list[tuple[str, int]] = []
    send_ahead = crowd.send_ahead

    def sent_ahead(request: web.Request, head: bytes, first: memoryview) -> bool:
        writes.append((request[REQUEST_FACTS].request_id, len(first)))
        return send_ahead(request, head, first)

    monkeypatch.setattr(crowd, "send_ahead", sent_ahead)
    for answer in (streams._HeadersWithFirstBytes, crowd.SentAhead):
        original = answer.write

        async def logged(
            self: web.StreamResponse,
            data: bytes | bytearray | memoryview,
            original: Any = original,
        ) -> None:
            writes.append((self.headers["X-Request-Id"], len(data)))
            await original(self, data)

        monkeypatch.setattr(answer, "write", logged)
    return writes


async def test_a_crowd_on_a_body_that_came_whole_takes_turns(
    proxy: Client, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each viewer writes one slice per loop turn: first bytes to all, then nobody hogs the loop."""
    data = random.Random(10).randbytes(512 * 1024)

    async def whole(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(body=data, content_type="video/mp2t")  # headers and body at once

    origin.routes["/crowd/whole.ts"] = whole
    url = await segment_url(proxy, origin, "whole.ts")
    writes = log_crowd_writes(monkeypatch)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(read_all(session, url) for _ in range(4)))
    assert results == [(200, data)] * 4
    viewers = {viewer for viewer, _ in writes}
    assert len(viewers) == 4
    # First bytes to every viewer before anyone's second write.
    assert {viewer for viewer, _ in writes[:4]} == viewers
    assert all(size == streams.FIRST_WRITE_BYTES for _, size in writes[:4])
    # Then turns: every viewer's second write before anyone's third (sockets take that much).
    assert {viewer for viewer, _ in writes[4:8]} == viewers
    # A slice at most per write while other viewers read the same body.
    last_write = {viewer: index for index, (viewer, _) in enumerate(writes)}
    for index, (viewer, size) in enumerate(writes):
        if any(last_write[other] > index for other in viewers - {viewer}):
            assert size <= streams.WRITE_SLICE_BYTES


@pytest.mark.parametrize("viewers", [2, 4, 16])
async def test_a_crowds_slices_shrink_with_the_number_of_viewers(
    proxy: Client, origin: Origin, monkeypatch: pytest.MonkeyPatch, viewers: int
) -> None:
    """CROWD_TURN_BYTES is split between a shared body's viewers: the more, the smaller each
    one's slice per turn (never under FIRST_WRITE_BYTES, never over WRITE_SLICE_BYTES)."""
    turn = 64 * 1024  # small, so that a few viewers already split it
    monkeypatch.setattr(streams, "CROWD_TURN_BYTES", turn)
    data = random.Random(11).randbytes(512 * 1024)

    async def whole(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)  # every viewer has joined before the headers come
        return web.Response(body=data, content_type="video/mp2t")

    name = f"split{viewers}.ts"
    origin.routes[f"/crowd/{name}"] = whole
    url = await segment_url(proxy, origin, name)
    writes = log_crowd_writes(monkeypatch)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(read_all(session, url) for _ in range(viewers)))
    assert results == [(200, data)] * viewers
    assert len(origin.requests_to(f"/crowd/{name}")) == 1
    # Writes made while every viewer still read the body: before any viewer's last write.
    last_write = {viewer: index for index, (viewer, _) in enumerate(writes)}
    first_gone = min(last_write.values())
    sizes = [size for _, size in writes[viewers:first_gone]]  # after the first bytes
    expected = max(streams.FIRST_WRITE_BYTES, min(streams.WRITE_SLICE_BYTES, turn // viewers))
    assert sizes and max(sizes) == expected  # upstream chunk ends may cut one shorter


async def test_a_crowd_on_an_empty_body_gets_empty_answers(proxy: Client, origin: Origin) -> None:
    """No first chunk ever comes: the viewers waiting for it are let go (they used to hang)."""

    async def empty(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(body=b"", content_type="video/mp2t")

    origin.routes["/crowd/empty.ts"] = empty
    url = await segment_url(proxy, origin, "empty.ts")
    async with aiohttp.ClientSession() as session:
        results = await asyncio.wait_for(
            asyncio.gather(*(read_all(session, url) for _ in range(5))), 10
        )
    assert results == [(200, b"")] * 5
    assert len(origin.requests_to("/crowd/empty.ts")) == 1

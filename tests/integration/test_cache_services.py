"""The cache with the real servers it works with: a shared redis-server, and nginx as the edge.

redis-server and nginx are started here as child processes on free loopback ports (see
``tests/services.py``) and stopped by PID; a missing binary skips with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.web.keys import METRICS, RELAY
from tests.conftest import ProxyFactory
from tests.integration.test_cache import cache_count, child, live_playlist, mint, slow_media
from tests.origin import Origin
from tests.services import Edge, MissingBinary, Redis, free_port, nginx_edge, redis_server

Client = TestClient[Any, Any]


@pytest.fixture
def redis_service() -> Iterator[Redis]:
    try:
        with redis_server() as server:
            yield server
    except MissingBinary as exc:
        pytest.skip(str(exc))


async def _stored_keys(server: Redis, count: int) -> list[bytes]:
    client = aioredis.Redis(host="127.0.0.1", port=server.port)
    try:
        for _ in range(200):
            keys: list[bytes] = await client.keys("*")
            if len(keys) >= count:
                return keys
            await asyncio.sleep(0.01)
        return keys
    finally:
        await client.aclose()


async def test_two_instances_share_playlists_and_segments_through_redis(
    proxy_factory: ProxyFactory, origin: Origin, redis_service: Redis
) -> None:
    cache = {"backend": "redis", "redis_url": redis_service.url}
    first, second = await proxy_factory(cache=cache), await proxy_factory(cache=cache)
    origin.playlist("/live/index.m3u8", live_playlist(target=10, first=1, count=2))
    segment = bytes(range(256)) * 512
    origin.media("/live/seg1.ts", segment)
    origin.media("/live/k.key", b"k" * 16, "application/octet-stream")
    path = mint(first, f"{origin.url}/live/index.m3u8")
    assert path == mint(second, f"{origin.url}/live/index.m3u8")  # same key, same tokens

    body_a = await (await first.get(path)).read()
    seg = child(path, body_a.decode(), "seg1.ts")
    assert await (await first.get(seg)).read() == segment
    keys = await _stored_keys(redis_service, 2)

    from_b = await second.get(path)
    assert await from_b.read() == body_a
    assert "Age" in from_b.headers
    seg_b = await second.get(seg)
    assert await seg_b.read() == segment
    assert seg_b.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert len(origin.requests_to("/live/index.m3u8")) == 1
    assert len(origin.requests_to("/live/seg1.ts")) == 1
    assert cache_count(second, "hit") == 2

    # Keys are hashes: no URL, host, path or header value of the stream is readable in Redis.
    assert len(keys) == 2
    for key in keys:
        assert re.fullmatch(rb"hlsrelay:1:(pl|md):[0-9a-f]{40}", key), key
    client = aioredis.Redis(host="127.0.0.1", port=redis_service.port)
    try:
        for key in keys:
            value = await client.get(key)
            assert value is not None
            assert b"127.0.0.1" not in value and b"site.example" not in value
            assert await client.pttl(key) > 0  # everything stored expires
    finally:
        await client.aclose()


async def test_unreachable_redis_is_a_miss_not_an_error(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    proxy = await proxy_factory(
        cache={"backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    origin.playlist("/live/index.m3u8", live_playlist(target=10))
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    for _ in range(2):
        assert (await proxy.get(path)).status == 200
    assert len(origin.requests_to("/live/index.m3u8")) == 2
    registry = proxy.app[METRICS].registry
    assert (
        registry.get_sample_value("hlsrelay_cache_errors_total", {"operation": "get"}) or 0
    ) >= 2


# -- nginx in front ---------------------------------------------------------------------------


@pytest.fixture
def edge_for() -> Iterator[Callable[[int], Edge]]:
    """Starts nginx (the shipped edge config) in front of a port; stops it after the test."""
    with contextlib.ExitStack() as stack:

        def start(upstream_port: int) -> Edge:
            try:
                return stack.enter_context(nginx_edge(upstream_port))
            except MissingBinary as exc:
                pytest.skip(str(exc))

        yield start


async def test_nginx_edge_honours_hlsrelay_cache_headers(
    proxy_factory: ProxyFactory, origin: Origin, edge_for: Callable[[int], Edge]
) -> None:
    # hlsrelay's own store is off: every origin request that is saved, nginx saved.
    proxy = await proxy_factory(cache={"memory_bytes": 0, "key_ttl": 0})
    assert proxy.server.port is not None
    edge = edge_for(proxy.server.port)
    origin.playlist(
        "/live/index.m3u8",
        live_playlist(target=2, first=1, count=2).replace(
            "#EXTINF", '#EXT-X-KEY:METHOD=AES-128,URI="k.key"\n#EXTINF', 1
        ),
    )
    origin.media("/live/seg1.ts", b"segment-one" * 1000)
    origin.media("/live/k.key", b"0123456789abcdef", "application/octet-stream")
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    async with aiohttp.ClientSession(base_url=edge.url) as session:

        async def get(target: str) -> tuple[int, str, bytes]:
            async with session.get(target) as resp:
                return resp.status, resp.headers.get("X-Cache-Status", ""), await resp.read()

        status, cache_status, body = await get(path)
        assert (status, cache_status) == (200, "MISS")
        assert (await get(path))[1] == "HIT"
        assert len(origin.requests_to("/live/index.m3u8")) == 1

        seg = child(path, body.decode(), "seg1.ts")
        key = str(URL(path).join(URL(body.decode().split('URI="')[1].split('"')[0])))
        assert (await get(seg))[:2] == (200, "MISS")
        assert (await get(key))[2] == b"0123456789abcdef"
        assert (await get(key))[2] == b"0123456789abcdef"
        missing = child(path, body.decode(), "seg2.ts")  # not at the origin yet
        assert (await get(missing))[:2] == (404, "MISS")
        assert (await get(missing))[:2] == (404, "HIT")

        # Half a target duration (max-age=1) later the playlist has expired at the edge; the
        # segment has not. The 404 (max-age=1) has expired too. nginx counts whole seconds
        # (an entry expires once its expiry second is past), hence 2.1 s.
        await asyncio.sleep(2.1)
        status, cache_status, _ = await get(path)
        assert status == 200 and cache_status in ("EXPIRED", "REVALIDATED")
        assert (await get(seg))[:2] == (200, "HIT")
        assert (await get(missing))[1] in ("EXPIRED", "MISS")
    assert len(origin.requests_to("/live/index.m3u8")) == 2
    assert len(origin.requests_to("/live/seg1.ts")) == 1
    assert len(origin.requests_to("/live/k.key")) == 2  # private, no-store: never kept
    assert len(origin.requests_to("/live/seg2.ts")) == 2


async def test_nginx_edge_and_hlsrelay_coalesce_a_crowd(
    proxy_factory: ProxyFactory, origin: Origin, edge_for: Callable[[int], Edge]
) -> None:
    proxy = await proxy_factory()
    assert proxy.server.port is not None
    edge = edge_for(proxy.server.port)
    origin.playlist("/live/index.m3u8", live_playlist(target=4, first=1, count=1))
    data = bytes(range(256)) * 4096
    slow_media(origin, "/live/seg1.ts", data, delay=0.2)
    path = mint(proxy, f"{origin.url}/live/index.m3u8")
    async with aiohttp.ClientSession(base_url=edge.url) as session:
        async with session.get(path) as resp:
            seg = child(path, await resp.text(), "seg1.ts")

        async def get() -> bytes:
            async with session.get(seg) as resp:
                return await resp.read()

        bodies = await asyncio.gather(*(get() for _ in range(30)))
    assert all(b == data for b in bodies)
    assert len(origin.requests_to("/live/seg1.ts")) == 1


async def test_instances_sharing_redis_fetch_a_playlist_once_even_at_the_same_moment(
    proxy_factory: ProxyFactory, origin: Origin, redis_service: Redis
) -> None:
    cache = {"backend": "redis", "redis_url": redis_service.url}
    first, second = await proxy_factory(cache=cache), await proxy_factory(cache=cache)
    text = live_playlist(target=10)

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.Response(text=text, content_type="application/vnd.apple.mpegurl")

    origin.routes["/live/index.m3u8"] = slow
    path = mint(first, f"{origin.url}/live/index.m3u8")
    responses = await asyncio.gather(
        *(client.get(path) for client in (first, second) for _ in range(10))
    )
    bodies = {await r.read() for r in responses}
    assert len(bodies) == 1 and all(r.status == 200 for r in responses)
    assert len(origin.requests_to("/live/index.m3u8")) == 1


@pytest.mark.parametrize(
    ("look", "answer"),
    [
        # Waiting for the holder: it looked for the copy, then at the lease (now given up).
        ("leased", False),
        # About to fetch: it looked for the copy when its request came, then took the lease
        # (free again by then).
        ("lease", True),
    ],
)
async def test_a_copy_stored_just_before_the_lease_is_released_is_taken_not_fetched_again(
    proxy_factory: ProxyFactory, origin: Origin, redis_service: Redis, look: str, answer: bool
) -> None:
    """The holder of a lease stores its copy, then releases the lease. When both happen between
    another instance's look for the copy and its look at the lease, that instance takes the
    copy. This test holds the second look until the holder has answered (the one thing not real
    here: which moment the waiter's look comes)."""
    cache = {"backend": "redis", "redis_url": redis_service.url}
    first, second = await proxy_factory(cache=cache), await proxy_factory(cache=cache)
    text = live_playlist(target=10)
    fetching = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        fetching.set()
        await asyncio.sleep(0.3)
        return web.Response(text=text, content_type="application/vnd.apple.mpegurl")

    origin.routes["/live/index.m3u8"] = slow
    path = mint(first, f"{origin.url}/live/index.m3u8")
    first_answered = asyncio.Event()
    store = second.app[RELAY].cache.store
    real = getattr(store, look)
    looks: list[bool] = []

    async def after_the_holder_answered(*args: Any) -> bool:
        await first_answered.wait()
        looks.append(await real(*args))
        return looks[-1]

    setattr(store, look, after_the_holder_answered)

    async def first_viewer() -> bytes:
        response = await first.get(path)
        body = await response.read()
        first_answered.set()
        return body

    leader = asyncio.create_task(first_viewer())
    await fetching.wait()  # the first instance holds the lease and is fetching
    follower = await second.get(path)
    assert follower.status == 200
    assert await follower.read() == await leader
    assert looks == [answer]
    assert len(origin.requests_to("/live/index.m3u8")) == 1


async def test_a_failed_fetch_on_one_instance_does_not_hold_the_other_back(
    proxy_factory: ProxyFactory, origin: Origin, redis_service: Redis
) -> None:
    cache = {"backend": "redis", "redis_url": redis_service.url}
    first, second = await proxy_factory(cache=cache), await proxy_factory(cache=cache)

    async def failing(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.Response(status=503)

    origin.routes["/live/index.m3u8"] = failing
    path = mint(first, f"{origin.url}/live/index.m3u8")
    started = asyncio.get_running_loop().time()
    a, b = await asyncio.gather(first.get(path), second.get(path))
    assert a.status == b.status == 502
    # The waiting instance noticed the lease was given up, well before the first-byte timeout.
    assert asyncio.get_running_loop().time() - started < 1.5

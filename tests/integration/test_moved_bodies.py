"""Bodies a viewer gets alone, moved from the upstream's socket to the viewer's in the kernel
(proxy/splice.py through proxy/web/streams.py): a real aiohttp origin and the real app."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy import splice
from proxy.upstream.direct_body import DIRECT_BODIES
from proxy.web.keys import METRICS, RELAY
from tests.conftest import ProxyFactory
from tests.integration.test_cache import child, live_playlist
from tests.integration.test_streams import mint
from tests.origin import Origin

Client = TestClient[Any, Any]
MIB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not DIRECT_BODIES, reason="another aiohttp minor version: bodies stay with its parser"
)


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every body moved socket to socket from now on."""
    lengths: list[int] = []
    original = splice.splice_body

    async def counted(source: int, sink: int, length: int, **kw: Any) -> int:
        lengths.append(length)
        return await original(source, sink, length, **kw)

    monkeypatch.setattr(splice, "splice_body", counted)
    return lengths


def peers_of(origin: Origin, path: str, data: bytes) -> list[int]:
    """Serve ``data`` at ``path`` (Range understood); the client port of every request."""
    ports: list[int] = []
    origin.media(path, data)
    serve = origin.routes[path]

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        return await serve(request)

    origin.routes[path] = handler
    return ports


def relayed(proxy: Client) -> float:
    """Body bytes relayed, all kinds (a top-level URL's media counts as "playlist")."""
    registry = proxy.app[METRICS].registry
    return sum(
        registry.get_sample_value("hlsrelay_relayed_bytes_total", {"kind": kind}) or 0.0
        for kind in ("playlist", "media")
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def partial_answer(request: web.Request, length: int) -> web.StreamResponse:
    """A prepared 206 announcing ``length`` bytes (its body written by the caller)."""
    response = web.StreamResponse(
        status=206, headers={"Content-Type": "video/mp2t", "Content-Length": str(length)}
    )
    await response.prepare(request)
    return response


async def read_cut(proxy: Client, path: str) -> None:
    """Read a ranged answer that must end as a cut connection, never as a whole body."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.make_url(path), headers={"Range": "bytes=0-"}) as answer,
    ):
        assert answer.status == 206
        with pytest.raises(aiohttp.ClientPayloadError):
            await answer.read()


async def test_a_ranged_body_is_moved_and_its_upstream_connection_kept(
    proxy: Client, origin: Origin, moves: list[int]
) -> None:
    data = random.Random(1).randbytes(4 * MIB)
    ports = peers_of(origin, "/m/big.ts", data)
    path = mint(proxy, f"{origin.url}/m/big.ts")
    before = relayed(proxy)
    for start in (1000, 5):
        answer = await proxy.get(path, headers={"Range": f"bytes={start}-"})
        assert answer.status == 206
        assert answer.headers["Content-Length"] == str(len(data) - start)
        assert await answer.read() == data[start:]
    assert len(moves) == 2 and all(0 < length <= 4 * MIB for length in moves)
    assert len(ports) == 2 and ports[0] == ports[1]  # one upstream connection, reused
    assert relayed(proxy) - before == 2 * len(data) - 1005


async def test_an_upstream_cut_while_moving_cuts_the_viewer(
    proxy: Client, origin: Origin, moves: list[int]
) -> None:
    data = random.Random(2).randbytes(4 * MIB)

    async def cut(request: web.Request) -> web.StreamResponse:
        response = await partial_answer(request, len(data))
        await response.write(data[: MIB // 2])
        await asyncio.sleep(0.2)  # the rest would come in reads of its own: moved, then cut
        await response.write(data[MIB // 2 : MIB])
        await asyncio.sleep(0.2)
        assert request.transport is not None
        request.transport.close()
        return response

    origin.routes["/m/cut.ts"] = cut
    path = mint(proxy, f"{origin.url}/m/cut.ts")
    await read_cut(proxy, path)
    assert moves  # it was being moved when the upstream went
    assert (await proxy.get("/healthz")).status == 200


async def test_a_stall_while_moving_cuts_the_viewer_within_the_read_timeout(
    proxy_factory: ProxyFactory, origin: Origin, moves: list[int]
) -> None:
    proxy = await proxy_factory(upstream={"read_timeout": 0.5})
    data = random.Random(3).randbytes(2 * MIB)
    left = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        response = await partial_answer(request, len(data))
        await response.write(data[:4096])
        await asyncio.sleep(0.2)
        await response.write(data[4096:MIB])
        try:
            await asyncio.sleep(30)
        finally:
            left.set()
        return response

    origin.routes["/m/stall.ts"] = stalls
    path = mint(proxy, f"{origin.url}/m/stall.ts")
    started = asyncio.get_running_loop().time()
    await read_cut(proxy, path)
    assert asyncio.get_running_loop().time() - started < 5
    assert moves
    await asyncio.wait_for(left.wait(), 5)  # and the upstream connection was dropped


async def test_a_viewer_who_leaves_while_moving_drops_the_upstream(
    proxy: Client, origin: Origin, moves: list[int]
) -> None:
    gone = asyncio.Event()
    sent = 0
    piece = b"x" * (256 * 1024)

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = await partial_answer(request, 1024 * MIB)
        try:
            for _ in range(4096):  # 1 GiB at most, if the proxy never let go
                await response.write(piece)
                sent += len(piece)
                await asyncio.sleep(0.002)
        finally:
            gone.set()
        return response

    origin.routes["/m/endless.ts"] = endless
    path = mint(proxy, f"{origin.url}/m/endless.ts")
    fds = open_fds()
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.make_url(path), headers={"Range": "bytes=0-"}) as answer,
    ):
        assert len(await answer.content.readexactly(2 * MIB)) == 2 * MIB
    await asyncio.wait_for(gone.wait(), 10)
    assert moves and sent < 512 * MIB
    await asyncio.sleep(0.1)
    assert open_fds() <= fds  # no duplicate or pipe left behind (the session's socket gone too)


async def playlist_child(proxy: Client, origin: Origin, name: str) -> str:
    origin.playlist(f"/vod/{name}.m3u8", live_playlist(first=0, count=0) + f"{name}\n")
    path = mint(proxy, f"{origin.url}/vod/{name}.m3u8")
    return child(path, await (await proxy.get(path)).text(), name)


async def holding_a_body(proxy: Client, origin: Origin) -> Callable[[], Awaitable[None]]:
    """A viewer who takes the first bytes of a long segment and then reads nothing: its body
    holds chunks in memory (over ``cache.inflight_bytes`` 0) until it is let go."""
    origin.media("/vod/held.ts", random.Random(4).randbytes(32 * MIB))
    url = await playlist_child(proxy, origin, "held.ts")
    session = aiohttp.ClientSession()
    answer = await session.get(proxy.make_url(url))
    await answer.content.readexactly(64 * 1024)
    bodies = proxy.app[RELAY].cache.bodies
    for _ in range(100):
        if bodies.held:
            break
        await asyncio.sleep(0.02)
    assert bodies.held > 0

    async def let_go() -> None:
        answer.close()
        await session.close()

    return let_go


async def test_a_lone_miss_while_memory_is_short_is_moved_not_kept(
    proxy_factory: ProxyFactory, origin: Origin, moves: list[int]
) -> None:
    proxy = await proxy_factory(cache={"inflight_bytes": 0})
    let_go = await holding_a_body(proxy, origin)
    try:
        data = random.Random(5).randbytes(3 * MIB)
        origin.media("/vod/seg.ts", data)
        url = await playlist_child(proxy, origin, "seg.ts")
        for _ in range(2):
            answer = await proxy.get(url)
            assert answer.status == 200
            assert answer.headers["Cache-Control"].startswith("public, max-age=")
            assert await answer.read() == data
        assert len(moves) == 2  # each moved whole, none of it kept: not stored either
        assert len(origin.requests_to("/vod/seg.ts")) == 2
    finally:
        await let_go()


async def test_with_memory_to_spare_a_miss_is_kept_and_stored(
    proxy: Client, origin: Origin, moves: list[int]
) -> None:
    data = random.Random(6).randbytes(3 * MIB)
    origin.media("/vod/seg.ts", data)
    url = await playlist_child(proxy, origin, "seg.ts")
    assert await (await proxy.get(url)).read() == data
    assert await (await proxy.get(url)).read() == data
    assert moves == []
    assert len(origin.requests_to("/vod/seg.ts")) == 1  # the second from the store


async def test_a_crowd_while_memory_is_short_still_shares_one_upstream_body(
    proxy_factory: ProxyFactory, origin: Origin, moves: list[int]
) -> None:
    proxy = await proxy_factory(cache={"inflight_bytes": 0})
    let_go = await holding_a_body(proxy, origin)
    try:
        data = random.Random(7).randbytes(MIB)

        async def late(request: web.Request) -> web.Response:
            await asyncio.sleep(0.3)  # every viewer has joined before the headers come
            return web.Response(body=data, content_type="video/mp2t")

        origin.routes["/vod/crowd.ts"] = late
        url = await playlist_child(proxy, origin, "crowd.ts")
        answers = await asyncio.gather(*(proxy.get(url) for _ in range(4)))
        assert [await answer.read() for answer in answers] == [data] * 4
        assert len(origin.requests_to("/vod/crowd.ts")) == 1
        assert moves == []
    finally:
        await let_go()

"""upstream.receive_budget_bytes on the real path: bodies arriving at once are counted and share
it, every byte still arrives exact, and a viewer who leaves counts its body out at once."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.upstream.direct_body import DEFAULT_READ_BYTES, DIRECT_BODIES, DirectBodyHandler
from proxy.upstream.receive import MAX_BODY_READ_BYTES
from proxy.web.keys import RELAY, UPSTREAM
from tests.conftest import ProxyFactory
from tests.integration.test_streams import proxied_uris
from tests.origin import Origin

Client = TestClient[Any, Any]
BODIES = 6
SIZE = 512 * 1024


def dribbled_media(origin: Origin, path: str, data: bytes, released: asyncio.Event) -> None:
    """A segment that sends its first 64 KiB, waits for ``released``, then sends the rest."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp2t", "Content-Length": str(len(data))}
        )
        await response.prepare(request)
        await response.write(data[: 64 * 1024])
        await released.wait()
        for start in range(64 * 1024, len(data), 16 * 1024):
            await response.write(data[start : start + 16 * 1024])
        await response.write_eof()
        return response

    origin.routes[path] = handler


def receiving(client: Client) -> int:
    return client.app[UPSTREAM].receive_budget.open


async def segment_urls(client: Client, origin: Origin, names: list[str]) -> list[URL]:
    """The proxied URLs of ``names``, as a player finds them in the rewritten playlist."""
    origin.playlist(
        "/index.m3u8",
        "#EXTM3U\n#EXT-X-TARGETDURATION:2\n" + "".join(f"#EXTINF:2,\n{n}\n" for n in names),
    )
    path = client.app[RELAY].mint(f"{origin.url}/index.m3u8", {})
    playlist = await client.get(path)
    assert playlist.status == 200
    return [client.make_url(URL(path).join(URL(u, encoded=True))) for u in
            proxied_uris(await playlist.text())]  # fmt: skip


async def test_bodies_arriving_at_once_share_the_budget_and_arrive_exact(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    # 1 MiB for six bodies: 170 KiB each, well under the share that leaves everything alone.
    client = await proxy_factory(upstream={"receive_budget_bytes": 1024 * 1024})
    rng = random.Random(7)
    released = asyncio.Event()
    bodies = {f"/seg{n}.ts": rng.randbytes(SIZE) for n in range(BODIES)}
    for path, data in bodies.items():
        dribbled_media(origin, path, data, released)
    urls = await segment_urls(client, origin, [path.lstrip("/") for path in bodies])
    assert receiving(client) == 0  # the playlist was read whole: never counted

    async def fetch(url: URL) -> bytes:
        async with viewer.get(url) as resp:
            assert resp.status == 200
            return await resp.read()

    viewer = aiohttp.ClientSession()
    downloads = [asyncio.ensure_future(fetch(url)) for url in urls]
    for _ in range(200):
        if receiving(client) == BODIES:
            break
        await asyncio.sleep(0.01)
    assert receiving(client) == BODIES
    exposition = await (await client.get("/metrics")).text()
    assert f"hlsrelay_upstream_bodies_receiving {float(BODIES)}" in exposition
    released.set()
    try:
        assert await asyncio.gather(*downloads) == list(bodies.values())
    finally:
        await viewer.close()
    assert receiving(client) == 0


async def test_a_viewer_leaving_counts_its_body_out_at_once(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    # A body too large to keep is only streamed through: its last viewer leaving ends it.
    client = await proxy_factory(
        upstream={"receive_budget_bytes": 256 * 1024}, cache={"max_object_bytes": 16 * 1024}
    )

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(10_000):
                await response.write(b"\x47" * 16 * 1024)
                await asyncio.sleep(0.01)
        return response

    origin.routes["/endless.ts"] = endless
    (url,) = await segment_urls(client, origin, ["endless.ts"])
    async with aiohttp.ClientSession() as viewer:
        resp = await viewer.get(url)
        await resp.content.readexactly(32 * 1024)
        assert receiving(client) == 1
        resp.close()
        left = time.monotonic()
    for _ in range(150):  # well within read_timeout (2 s), which would also end it
        if not receiving(client):
            break
        await asyncio.sleep(0.01)
    assert receiving(client) == 0
    assert time.monotonic() - left < 1.9


async def test_the_read_size_a_body_is_opened_with_follows_the_budget(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    bodies = {"/seg.ts": b"\x47" * 4 * 1024 * 1024, "/index.m3u8": b"#EXTM3U\n" + b"#c\n" * 500_000}
    origin.media("/seg.ts", bodies["/seg.ts"])
    origin.playlist("/index.m3u8", bodies["/index.m3u8"])
    for budget, kind, expected in [
        (0, "media", MAX_BODY_READ_BYTES),  # no budget: the largest reads
        (64 * 1024 * 1024, "media", MAX_BODY_READ_BYTES),  # alone: its share is past the cap
        (64 * 1024 * 1024, "playlist", DEFAULT_READ_BYTES),  # read whole, never fitted
    ]:
        # Bodies large enough that their connection is still busy when they are opened.
        client = await proxy_factory(upstream={"receive_budget_bytes": budget})
        path = "/seg.ts" if kind == "media" else "/index.m3u8"
        response = await client.app[UPSTREAM].open(f"{origin.url}{path}", {}, kind=kind)
        try:
            connection = response.raw.connection
            assert connection is not None
            protocol = connection.protocol
            if DIRECT_BODIES:
                assert isinstance(protocol, DirectBodyHandler)
                assert protocol.read_size == expected, (budget, kind)
            assert await response.read_capped(8 * 1024 * 1024) == bodies[path]
        finally:
            response.close()

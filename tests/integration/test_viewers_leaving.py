"""Viewers who leave mid-body end their requests quietly: no error, no traceback formatted on the
event loop (500 viewers leaving at once used to log 500 of them), the status that was sent."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import create_app
from proxy.web.keys import METRICS, RELAY
from tests.conftest import make_settings
from tests.integration.test_streams import proxied_uris
from tests.origin import Origin


async def segment_urls_of(
    session: aiohttp.ClientSession, app: web.Application, origin: Origin, names: list[str]
) -> list[str]:
    origin.playlist(
        "/index.m3u8",
        "#EXTM3U\n#EXT-X-TARGETDURATION:2\n" + "".join(f"#EXTINF:2,\n{n}\n" for n in names),
    )
    path = app[RELAY].mint(f"{origin.url}/index.m3u8", {})
    async with session.get(path) as playlist:
        assert playlist.status == 200
        return [str(URL(path).join(URL(u, encoded=True))) for u in
                proxied_uris(await playlist.text())]  # fmt: skip


async def test_viewers_leaving_mid_body_are_no_errors(
    origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(10_000):
                await response.write(b"\x47" * 64 * 1024)
                await asyncio.sleep(0.005)
        return response

    names = [f"live{n}.ts" for n in range(5)]
    for name in names:
        origin.routes[f"/{name}"] = endless
    # A small budget too: the bodies share it, as in a crowd.
    settings = make_settings(
        upstream={"receive_budget_bytes": 512 * 1024}, cache={"max_object_bytes": 64 * 1024}
    )
    # Served as `hlsrelay serve` serves it: aiohttp's test server cancels a handler whose viewer
    # left, run_app lets it run on and find the closed connection (the case here).
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        (sock,) = runner.addresses
        base = f"http://127.0.0.1:{sock[1]}"
        caplog.set_level(logging.INFO)
        async with aiohttp.ClientSession(base) as viewers:
            urls = await segment_urls_of(viewers, runner.app, origin, names)
            responses = [await viewers.get(url) for url in urls]
            for resp in responses:
                assert resp.status == 200
                await resp.content.readexactly(200_000)
            for resp in responses:
                resp.close()
            for _ in range(200):
                if not runner.app[METRICS].http.in_flight:
                    break
                await asyncio.sleep(0.01)
            metrics = await (await viewers.get("/metrics")).text()
    finally:
        await runner.cleanup()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert not any(r.exc_info for r in caplog.records)
    assert 'hlsrelay_http_requests_total{route="stream",status_class="2xx"} 6.0' in metrics
    assert 'status_class="5xx"' not in metrics

"""A crowd's headers sent ahead with its first bytes (proxy/web/crowd.py), against a real origin.

Raw sockets, so the exact header block each viewer gets can be read: it must be what aiohttp
would have sent that viewer (its HTTP version, keep-alive, Origin and request id), the
connection must go on (or close) as those headers say, and where the headers cannot be made
that way the answer is left to aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.web import crowd
from tests.conftest import ProxyFactory, make_settings
from tests.integration.test_cache import child, live_playlist, mint, segment_url, slow_media
from tests.origin import Origin

Client = TestClient[Any, Any]
DATA = random.Random(21).randbytes(300 * 1024)


@dataclass
class Viewer:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def ask(cls, proxy: Client, url: str, version: str, *lines: str) -> Viewer:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        target = url.split(str(proxy.make_url("")).rstrip("/"), 1)[1]
        head = [f"GET {target} HTTP/{version}", f"Host: {proxy.host}", *lines, "", ""]
        writer.write("\r\n".join(head).encode())
        return cls(reader, writer)

    async def answer(self) -> tuple[str, dict[str, str], bytes]:
        block = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status, *lines = block.decode("latin-1").split("\r\n")[:-2]
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(": ")
            assert name not in headers, f"{name} twice"
            headers[name] = value
        body = await asyncio.wait_for(self.reader.readexactly(int(headers["Content-Length"])), 10)
        return status, headers, body

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    def close(self) -> None:
        self.writer.close()


def count_sent_ahead(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    heads: list[bytes] = []
    send_ahead = crowd.send_ahead

    def counted(request: web.Request, head: bytes, first: memoryview) -> bool:
        heads.append(head)
        return send_ahead(request, head, first)

    monkeypatch.setattr(crowd, "send_ahead", counted)
    return heads


def mismatches(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "were not aiohttp's" in r.getMessage()]


async def lone_answer(proxy: Client, origin: Origin, name: str) -> dict[str, str]:
    """The headers aiohttp's own preparation gives a lone viewer of the same kind of segment."""
    slow_media(origin, f"/lone/{name}", DATA, delay=0)
    origin.playlist("/lone/index.m3u8", live_playlist(first=0, count=0) + f"{name}\n")
    path = mint(proxy, f"{origin.url}/lone/index.m3u8")
    url = str(proxy.make_url(child(path, await (await proxy.get(path)).text(), name)))
    viewer = await Viewer.ask(proxy, url, "1.1")
    try:
        _, headers, body = await viewer.answer()
    finally:
        viewer.close()
    assert body == DATA
    return headers


async def crowd_of(
    proxy: Client, origin: Origin, name: str, *asks: tuple[str, ...]
) -> list[tuple[str, dict[str, str], bytes]]:
    """A crowd on one slow segment (``slow_media`` unless the origin has a route for it), a raw
    HTTP/1.1 viewer for each ask's header lines: their answers (each checked whole)."""
    if f"/crowd/{name}" not in origin.routes:
        slow_media(origin, f"/crowd/{name}", DATA, delay=0.3)
    url = await segment_url(proxy, origin, name)
    viewers = [await Viewer.ask(proxy, url, "1.1", *lines) for lines in asks]
    try:
        answers = await asyncio.gather(*(viewer.answer() for viewer in viewers))
    finally:
        for viewer in viewers:
            viewer.close()
    assert [body == DATA for _, _, body in answers] == [True] * len(asks)
    return answers


async def test_a_crowds_headers_are_the_ones_aiohttp_would_send(
    proxy: Client,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    heads = count_sent_ahead(monkeypatch)
    slow_media(origin, "/crowd/ahead.ts", DATA, delay=0.3)
    url = await segment_url(proxy, origin, "ahead.ts")
    asks: list[tuple[str, tuple[str, ...]]] = [
        ("1.1", ("X-Request-Id: crowd-one",)),
        ("1.1", ("Connection: close",)),
        ("1.0", ()),
        ("1.0", ("Connection: keep-alive",)),
        ("1.1", ("Origin: https://player.example",)),
    ]
    viewers = [await Viewer.ask(proxy, url, version, *lines) for version, lines in asks]
    try:
        answers = await asyncio.gather(*(viewer.answer() for viewer in viewers))
        assert len(heads) == len(viewers)  # every one sent ahead, not left to aiohttp
        assert mismatches(caplog) == []
        assert [body == DATA for _, _, body in answers] == [True] * 5
        statuses = [status for status, _, _ in answers]
        assert statuses == ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"] + ["HTTP/1.0 200 OK"] * 2 + [
            "HTTP/1.1 200 OK"
        ]
        connection = [headers.get("Connection") for _, headers, _ in answers]
        assert connection == [None, "close", None, "keep-alive", None]
        assert answers[0][1]["X-Request-Id"] == "crowd-one"
        assert len({headers["X-Request-Id"] for _, headers, _ in answers}) == 5
        # The connections go on, or end, as their headers said.
        assert [await viewers[i].closed() for i in (1, 2)] == [True, True]
        for i in (0, 3, 4):
            viewers[i].writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await viewers[i].answer()
            assert status == "HTTP/1.1 200 OK"
    finally:
        for viewer in viewers:
            viewer.close()
    # The same headers as aiohttp's own answer to a lone viewer (but its Date and request id).
    lone = await lone_answer(proxy, origin, "lone.ts")
    mine = dict(answers[0][1])
    for varying in ("Date", "X-Request-Id"):
        assert mine.pop(varying)
        assert lone.pop(varying)
    assert mine == lone
    assert mine["Access-Control-Allow-Origin"] == "*"


async def test_a_crowd_with_listed_origins_gets_its_own_cors_headers(
    proxy_factory: ProxyFactory,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await proxy_factory(security={"cors_origins": ["https://good.example"]})
    heads = count_sent_ahead(monkeypatch)
    answers = await crowd_of(
        proxy,
        origin,
        "listed.ts",
        ("Origin: https://good.example",),
        ("Origin: https://bad.example",),
        (),
    )
    assert len(heads) == 3
    assert mismatches(caplog) == []
    good, bad, plain = (headers for _, headers, _ in answers)
    assert good["Access-Control-Allow-Origin"] == "https://good.example"
    assert good["Vary"] == "Origin"
    assert "Access-Control-Allow-Origin" not in bad
    assert "Vary" not in bad
    assert "Access-Control-Allow-Origin" not in plain


async def test_a_crowd_on_a_segment_without_a_content_type_gets_aiohttps_default(
    proxy: Client,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp adds ``Content-Type`` after the ``Date`` given to it: the same order here."""

    class Untyped(web.StreamResponse):
        async def _prepare_headers(self) -> None:
            await super()._prepare_headers()
            del self.headers["Content-Type"]  # an origin that names no type

    async def untyped(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        response = Untyped(headers={"Content-Length": str(len(DATA))})
        await response.prepare(request)
        await response.write(DATA)
        return response

    origin.routes["/crowd/untyped.ts"] = untyped
    heads = count_sent_ahead(monkeypatch)
    answers = await crowd_of(proxy, origin, "untyped.ts", (), (), ())
    assert len(heads) == 3
    assert mismatches(caplog) == []
    types = [headers["Content-Type"] for _, headers, _ in answers]
    assert types == ["application/octet-stream"] * 3


async def test_a_crowds_headers_are_encoded_as_aiohttp_encodes_them(
    proxy: Client,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upstream header that is not ASCII (an ETag here) goes out in UTF-8, as aiohttp's."""

    async def tagged(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        response = web.StreamResponse(
            headers={"Content-Length": str(len(DATA)), "ETag": '"café-1"'}
        )
        await response.prepare(request)
        await response.write(DATA)
        return response

    origin.routes["/crowd/tagged.ts"] = tagged
    heads = count_sent_ahead(monkeypatch)
    await crowd_of(proxy, origin, "tagged.ts", (), ())
    assert len(heads) == 2
    assert mismatches(caplog) == []
    assert all('ETag: "café-1"\r\n'.encode() in head for head in heads)


async def test_headers_unlike_aiohttps_are_reported_once(
    proxy: Client,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The check a crowd answer's aiohttp response makes can fail: a header made here that the
    CORS hook would not make is reported (names only, once)."""
    monkeypatch.setattr(crowd, "EXPOSE_HEADERS", "Content-Length")
    monkeypatch.setattr(crowd, "_mismatch_reported", False)
    await crowd_of(proxy, origin, "unlike.ts", (), (), ())
    assert len(mismatches(caplog)) == 1
    assert "Access-Control-Expose-Headers" in mismatches(caplog)[0]
    assert "Content-Length" not in mismatches(caplog)[0].split("(")[0]


async def test_a_hook_it_does_not_know_leaves_the_answers_to_aiohttp(
    aiohttp_client: Callable[..., Any], origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stamp(request: web.BaseRequest, response: web.StreamResponse) -> None:
        response.headers["X-Stamp"] = "yes"

    app = create_app(make_settings())
    app.on_response_prepare.append(stamp)
    proxy = await aiohttp_client(app)
    heads = count_sent_ahead(monkeypatch)
    answers = await crowd_of(proxy, origin, "hooked.ts", (), (), ())
    assert heads == []
    assert [headers["X-Stamp"] for _, headers, _ in answers] == ["yes"] * 3


async def test_a_viewer_gone_before_the_first_bytes_costs_the_others_nothing(
    proxy: Client,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    slow_media(origin, "/crowd/gone.ts", DATA, delay=0.4)
    url = await segment_url(proxy, origin, "gone.ts")
    viewers = [await Viewer.ask(proxy, url, "1.1") for _ in range(4)]
    await asyncio.sleep(0.2)  # all four are waiting for the upstream
    viewers[1].writer.transport.abort()
    try:
        answers = await asyncio.gather(*(viewers[i].answer() for i in (0, 2, 3)))
    finally:
        for viewer in viewers:
            viewer.close()
    assert [body == DATA for _, _, body in answers] == [True] * 3
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert (await proxy.get("/healthz")).status == 200

"""The fast path for cached playlist hits, served the way ``hlsrelay serve`` serves (server.start).

Every answer of the fast path is compared with the full handler's answer to the same request
(an app with the fast path off, the same origin); what the fast path must not answer (ranges,
conditionals, bodies, requests behind one of aiohttp's on the same connection) is sent over raw
sockets and checked for the handler's answer, in order. ``FastHits.answered`` tells who answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.web import fast_hits, server
from proxy.web.keys import FAST_HITS, METRICS, RELAY
from tests.conftest import make_settings, serve_logging
from tests.origin import Origin

REFERER = "https://site.example/watch/1"
# Over 512 bytes, so the store keeps a gzip'd body too.
PLAYLIST = (
    "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n#EXT-X-MEDIA-SEQUENCE:100\n"
    + "".join(f"#EXTINF:4.0,\nsegment_number_{n:05d}.ts\n" for n in range(100, 130))
)
# Headers made per request on both paths; Last-Modified is when each app stored its copy (the
# two apps may store theirs in different seconds).
PER_REQUEST = {"date", "x-request-id", "age", "last-modified"}


@dataclass
class Served:
    app: web.Application
    host: str
    port: int

    @property
    def hits(self) -> fast_hits.FastHits:
        return self.app[FAST_HITS]

    def mint(self, url: str) -> str:
        return self.app[RELAY].mint(url, {"Referer": REFERER})


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)

    def comparable(self) -> tuple[int, list[tuple[str, str]], bytes]:
        kept = sorted((k, v) for k, v in self.headers if k not in PER_REQUEST)
        return self.status, kept, self.body


@contextlib.asynccontextmanager
async def serving(**sections: Any) -> AsyncIterator[Served]:
    app = create_app(make_settings(**sections))
    runner, site = await server.start(app, host="127.0.0.1", port=0)
    try:
        yield Served(app, "127.0.0.1", site.port)
    finally:
        await runner.cleanup()


async def read_answer(reader: asyncio.StreamReader, head_only: bool = False) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
    length = int(next((v for k, v in headers if k == "content-length"), "0"))
    body = b"" if head_only else await asyncio.wait_for(reader.readexactly(length), 5)
    return Answer(status, headers, body, head)


def request(path: str, method: str = "GET", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: relay.test"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def ask(served: Served, raw: bytes, head_only: bool = False) -> Answer:
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        writer.write(raw)
        return await read_answer(reader, head_only)
    finally:
        writer.close()


async def warm(served: Served, path: str) -> None:
    """A miss, then a hit through the handler: the fast path answers ``path`` from then on."""
    await ask(served, request(path))
    await ask(served, request(path))


@pytest.fixture
def playlist_origin(origin: Origin) -> Origin:
    origin.playlist("/live/index.m3u8", PLAYLIST)
    return origin


# -- the same answer either way -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", {}),
        ("GET", {"Accept_Encoding": "gzip, deflate, br"}),
        ("GET", {"Accept_Encoding": "gzip;q=0"}),
        ("HEAD", {}),
        ("GET", {"Origin": "https://player.example", "X_Request_Id": "edge-42"}),
    ],
)
async def test_a_fast_hit_is_the_answer_the_handler_gives(
    playlist_origin: Origin, method: str, headers: dict[str, str]
) -> None:
    url = f"{playlist_origin.url}/live/index.m3u8"
    async with serving() as fast, serving(server={"fast_hits_bytes": 0}) as full:
        answers, here = [], []
        for served in (fast, full):
            path = served.mint(url)
            await warm(served, path)
            before = served.hits.answered
            answers.append(await ask(served, request(path, method, **headers), method == "HEAD"))
            here.append(served.hits.answered - before)
    fast_answer, full_answer = answers
    assert here == [1, 0]
    assert fast_answer.status == 200
    assert fast_answer.comparable() == full_answer.comparable()
    assert fast_answer.header("age") is not None and full_answer.header("age") is not None
    assert fast_answer.header("last-modified") is not None
    assert full_answer.header("last-modified") is not None
    if "X_Request_Id" in headers:
        assert fast_answer.header("x-request-id") == "edge-42"
    else:
        assert fast_answer.header("x-request-id") != full_answer.header("x-request-id")
    if method == "GET" and headers.get("Accept_Encoding", "").startswith("gzip,"):
        assert fast_answer.header("content-encoding") == "gzip"


async def test_cors_for_listed_origins_only_as_the_handler_does(playlist_origin: Origin) -> None:
    url = f"{playlist_origin.url}/live/index.m3u8"
    cors = {"security": {"cors_origins": ["https://player.example"]}}
    async with serving(**cors) as fast:
        path = fast.mint(url)
        await warm(fast, path)
        listed = await ask(fast, request(path, Origin="https://player.example"))
        other = await ask(fast, request(path, Origin="https://evil.example"))
        assert fast.hits.answered == 2
    assert listed.header("access-control-allow-origin") == "https://player.example"
    assert [v for k, v in listed.headers if k == "vary"] == ["Accept-Encoding", "Origin"]
    assert other.header("access-control-allow-origin") is None


async def test_fast_hits_are_counted_and_logged_like_the_handlers(
    playlist_origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving() as fast:
        path = fast.mint(f"{playlist_origin.url}/live/index.m3u8")
        await warm(fast, path)
        registry = fast.app[METRICS].registry

        def sample(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        hits = sample("hlsrelay_cache_requests_total", result="hit")
        ok = sample("hlsrelay_http_requests_total", route="stream", status_class="2xx")
        sent = sample("hlsrelay_relayed_bytes_total", kind="playlist")
        with caplog.at_level("INFO", logger="aiohttp.access"):
            answer = await ask(fast, request(path, X_Request_Id="trace-7"))
        assert fast.hits.answered == 1
        assert sample("hlsrelay_cache_requests_total", result="hit") == hits + 1
        assert sample("hlsrelay_http_requests_total", route="stream", status_class="2xx") == ok + 1
        assert sample("hlsrelay_relayed_bytes_total", kind="playlist") == sent + len(answer.body)
    # (The warm-up's own lines may land here too: aiohttp logs after the answer is out.)
    (line,) = [m for r in caplog.records if "trace-7" in (m := r.getMessage())]
    assert line.startswith("GET /s/…/index.m3u8 stream 200 ")
    assert line.endswith(" up=127.0.0.1 cache=hit id=trace-7")
    assert path.split("/")[2] not in line  # never a token


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_fast_hits_write_the_handlers_line_through_serves_writer(
    playlist_origin: Origin, log_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``serve`` the fast path writes its lines from templates made when it remembered
    the answer: the handler's line, with request id, bytes and duration filled in."""
    with serve_logging(log_format, monkeypatch) as (_, out):
        async with serving() as fast:
            path = fast.mint(f"{playlist_origin.url}/live/index.m3u8")
            await ask(fast, request(path, X_Request_Id="miss-1"))
            handled = await ask(fast, request(path, X_Request_Id="hand-2"))
            assert fast.hits.answered == 0
            get = await ask(fast, request(path, X_Request_Id="fast-3"))
            await ask(fast, request(path, "HEAD", X_Request_Id="head-4"), True)
            assert fast.hits.answered == 2
    lines = {
        rid: line
        for line in out.getvalue().splitlines()
        for rid in ("hand-2", "fast-3", "head-4")
        if rid in line
    }
    # The same header lengths (ids of one length, one-digit Age), so the same bytes on the wire.
    assert len(handled.raw_head) + len(handled.body) == len(get.raw_head) + len(get.body)
    if log_format == "json":
        docs = {rid: json.loads(line) for rid, line in lines.items()}
        per_request = {"time": "", "request_id": "", "duration_ms": 0}
        assert list(docs["fast-3"]) == list(docs["hand-2"])  # the same fields, in one order
        assert docs["fast-3"] | per_request == docs["hand-2"] | per_request
        assert docs["head-4"] | per_request | {"bytes": 0} == docs["hand-2"] | per_request | {
            "method": "HEAD",
            "bytes": 0,
        }
        assert docs["fast-3"]["request_id"] == "fast-3"
        assert docs["fast-3"]["bytes"] == len(get.raw_head) + len(get.body)
    else:

        def message(rid: str) -> str:
            text = lines[rid].partition(" INFO aiohttp.access: ")[2]
            return text.replace(rid, "ID").split(" ", 6)[6]  # past the bytes and duration

        assert message("fast-3") == message("hand-2") == "up=127.0.0.1 cache=hit id=ID"
        sent = len(get.raw_head) + len(get.body)
        assert (
            lines["fast-3"]
            .partition(": ")[2]
            .startswith(f"GET /s/…/index.m3u8 stream 200 {sent}B ")
        )
        assert " HEAD /s/…/index.m3u8 stream 200 " in lines["head-4"]
    assert path.split("/")[2] not in out.getvalue()  # never a token


# -- what goes to the handler ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"If_None_Match": "*"},
        {"Range": "bytes=0-9"},
        {"Connection": "close"},
        {"Accept_Encoding": "gzip", "accept-encoding": "identity"},
    ],
)
async def test_conditionals_ranges_and_odd_headers_go_to_the_handler(
    playlist_origin: Origin, headers: dict[str, str]
) -> None:
    async with serving() as fast:
        path = fast.mint(f"{playlist_origin.url}/live/index.m3u8")
        await warm(fast, path)
        answer = await ask(fast, request(path, **headers))
        assert fast.hits.answered == 0
    assert answer.status in (200, 206, 304)


async def test_http_1_0_goes_to_the_handler(playlist_origin: Origin) -> None:
    async with serving() as fast:
        path = fast.mint(f"{playlist_origin.url}/live/index.m3u8")
        await warm(fast, path)
        answer = await ask(fast, f"GET {path} HTTP/1.0\r\n\r\n".encode())
        assert fast.hits.answered == 0
    assert answer.status == 200
    assert answer.body.startswith(b"#EXTM3U")


async def test_answers_keep_request_order_behind_a_slow_handler(origin: Origin) -> None:
    origin.playlist("/live/index.m3u8", PLAYLIST)

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.Response(body=b"slow bytes", content_type="video/mp2t")

    origin.routes["/slow.ts"] = slow
    async with serving() as fast:
        playlist = fast.mint(f"{origin.url}/live/index.m3u8")
        await warm(fast, playlist)
        media = fast.app[RELAY].mint(f"{origin.url}/slow.ts", {"Referer": REFERER})
        media = media.rsplit("/", 1)[0] + "/slow.ts"
        reader, writer = await asyncio.open_connection(fast.host, fast.port)
        try:
            # Pipelined: a request the handler answers slowly, then a hit, in one write.
            writer.write(request(media) + request(playlist))
            first = await read_answer(reader)
            second = await read_answer(reader)
            assert fast.hits.answered == 0  # it followed the slow one into aiohttp
            # Once aiohttp is done, the connection's next hit is answered here again.
            await asyncio.sleep(0.05)
            writer.write(request(playlist))
            third = await read_answer(reader)
            assert fast.hits.answered == 1
        finally:
            writer.close()
    assert first.body == b"slow bytes"
    assert second.body == third.body
    assert second.body.startswith(b"#EXTM3U") and b"segment_number_00100.ts" in second.body


async def test_a_request_with_a_body_hands_the_connection_to_aiohttp(
    playlist_origin: Origin,
) -> None:
    async with serving() as fast:
        path = fast.mint(f"{playlist_origin.url}/live/index.m3u8")
        await warm(fast, path)
        reader, writer = await asyncio.open_connection(fast.host, fast.port)
        try:
            body = b'{"url": "x"}'
            writer.write(
                b"POST /api/v1/streams HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            refused = await read_answer(reader)
            writer.write(request(path))
            hit = await read_answer(reader)
        finally:
            writer.close()
        assert fast.hits.answered == 0
    assert refused.status == 401  # no API key: the handler's JSON error, body consumed
    assert hit.status == 200 and hit.body.startswith(b"#EXTM3U")


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost : t\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: t\r\n folded\r\n\r\n",
        b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /x HTTP/1.1\nHost: t\r\n\r\n",
        b"GET " + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    ],
)
async def test_malformed_requests_get_aiohttps_answer_and_the_server_lives_on(
    playlist_origin: Origin, raw: bytes
) -> None:
    async with serving() as fast:
        reader, writer = await asyncio.open_connection(fast.host, fast.port)
        try:
            writer.write(raw)
            answer = await read_answer(reader)
        finally:
            writer.close()
        assert answer.status in (400, 404, 414, 431)
        path = fast.mint(f"{playlist_origin.url}/live/index.m3u8")
        assert (await ask(fast, request(path))).status == 200
        assert fast.hits.answered == 0


# -- freshness, memory, connections --------------------------------------------------------------


async def test_an_entry_is_answered_only_while_the_store_holds_it_fresh(origin: Origin) -> None:
    # Target duration 1 s: a live playlist is fresh for half of it.
    origin.playlist("/short.m3u8", PLAYLIST.replace("TARGETDURATION:4", "TARGETDURATION:1"))
    async with serving() as fast:
        path = fast.mint(f"{origin.url}/short.m3u8")
        await warm(fast, path)
        await ask(fast, request(path))  # answered here
        assert fast.hits.answered == 1
        await asyncio.sleep(0.6)
        await ask(fast, request(path))  # stale: the handler fetched it again
        assert fast.hits.answered == 1
    assert len(origin.requests_to("/short.m3u8")) == 2


async def test_an_expired_stream_token_is_never_answered_here(
    playlist_origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A VOD playlist stays fresh for a long time: only the token's expiry can end its answers.
    playlist_origin.playlist("/vod.m3u8", PLAYLIST + "#EXT-X-ENDLIST\n")
    async with serving(security={"token_ttl": 60, "token_expiry_bucket": 1}) as fast:
        path = fast.mint(f"{playlist_origin.url}/vod.m3u8")
        await warm(fast, path)
        await ask(fast, request(path))
        assert fast.hits.answered == 1  # while the token is good
        import time

        later = time.time() + 120
        monkeypatch.setattr(time, "time", lambda: later)
        answer = await ask(fast, request(path))
        assert fast.hits.answered == 1
    assert answer.status == 410


def test_the_memo_stays_within_its_byte_budget() -> None:
    from proxy.cache.store import CachedObject
    from proxy.metrics import Metrics

    hits = fast_hits.FastHits(Metrics(), ("*",), max_bytes=64 * 1024)
    import time

    body = b"#EXTM3U\n" + b"x" * 2000
    for n in range(200):
        entry = CachedObject(body, (("Content-Type", "x"),), time.time(), 60.0)
        hits.remember(f"/s/a/b/{n}.m3u8", entry, token_expires=None, upstream_host="h")
    assert 0 < len(hits) < 40
    assert hits._bytes <= 64 * 1024
    # The newest are kept, the oldest dropped.
    assert hits._fresh("/s/a/b/199.m3u8", time.time()) is not None
    assert hits._fresh("/s/a/b/0.m3u8", time.time()) is None


async def test_idle_connections_are_closed_and_busy_ones_are_not(
    origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast_hits, "KEEPALIVE_TIMEOUT_S", 0.3)
    origin.playlist("/live/index.m3u8", PLAYLIST)

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 8
        await response.prepare(request)
        for _ in range(8):
            await asyncio.sleep(0.1)
            await response.write(b"x")
        return response

    origin.routes["/trickle.ts"] = trickle
    async with serving() as fast:
        path = fast.mint(f"{origin.url}/live/index.m3u8")
        await warm(fast, path)
        reader, writer = await asyncio.open_connection(fast.host, fast.port)
        busy_reader, busy_writer = await asyncio.open_connection(fast.host, fast.port)
        try:
            writer.write(request(path))
            await read_answer(reader)
            assert fast.hits.answered == 1
            media = fast.app[RELAY].mint(f"{origin.url}/trickle.ts", {"Referer": REFERER})
            busy_writer.write(request(media.rsplit("/", 1)[0] + "/trickle.ts"))
            slow = await read_answer(busy_reader)  # 0.8 s of body: longer than the timeout
            assert await asyncio.wait_for(reader.read(), 2) == b""  # closed by the server
        finally:
            writer.close()
            busy_writer.close()
    assert slow.body == b"x" * 8


async def test_shutdown_closes_idle_fast_connections_promptly(playlist_origin: Origin) -> None:
    app = create_app(make_settings(server={"shutdown_timeout": 5.0}))
    runner, site = await server.start(app, host="127.0.0.1", port=0)
    path = app[RELAY].mint(f"{playlist_origin.url}/live/index.m3u8", {"Referer": REFERER})
    served = Served(app, "127.0.0.1", site.port)
    await warm(served, path)
    reader, writer = await asyncio.open_connection(served.host, served.port)
    writer.write(request(path))
    await read_answer(reader)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await runner.cleanup()
    assert await asyncio.wait_for(reader.read(), 2) == b""
    assert loop.time() - started < 2.0  # not the whole shutdown_timeout
    writer.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) not installed")
async def test_the_listening_socket_has_the_configured_backlog() -> None:
    app = create_app(make_settings(server={"backlog": 777}))
    runner, site = await server.start(app, host="127.0.0.1", port=0)
    try:
        listing = await asyncio.create_subprocess_exec(
            "ss", "-Hltn", f"sport = :{site.port}", stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await listing.communicate()
        out = stdout.decode().split()
        assert out[2] == "777"  # State Recv-Q Send-Q: a listener's Send-Q is its backlog
    finally:
        await runner.cleanup()


async def test_a_playlist_asked_for_once_is_not_kept_and_memo_entries_are_not_gc_tracked(
    playlist_origin: Origin,
) -> None:
    import gc

    async with serving() as fast:
        path = fast.mint(f"{playlist_origin.url}/live/index.m3u8")
        await ask(fast, request(path))
        assert len(fast.hits) == 0  # a miss: maybe nobody asks again
        await ask(fast, request(path))
        assert len(fast.hits) == 1  # asked for again: kept
        gc.collect()
        (answer,) = fast.hits._answers.values()
        assert not gc.is_tracked(answer)  # full collections never walk the memo's entries


async def test_a_crowd_goes_to_aiohttp_a_few_requests_a_turn_and_all_are_answered(
    origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin.playlist("/p.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4,\na.ts\n")
    resumes = 0
    resume = fast_hits.FastHitsProtocol.resume

    def counted(self: fast_hits.FastHitsProtocol) -> None:
        nonlocal resumes
        resumes += 1
        resume(self)

    monkeypatch.setattr(fast_hits.FastHitsProtocol, "resume", counted)
    async with serving(server={"requests_per_turn": 2}) as fast:
        paths = [fast.mint(f"{origin.url}/p.m3u8?n={n}") for n in range(20)]
        connections = [await asyncio.open_connection(fast.host, fast.port) for _ in paths]
        try:
            # Pipelined too: a second request behind the first on half the connections.
            for (_, writer), path in zip(connections, paths, strict=True):
                writer.write(request(path) * (2 if paths.index(path) % 2 else 1))
            answers = []
            for n, (reader, _) in enumerate(connections):
                answers.append(await read_answer(reader))
                if n % 2:
                    answers.append(await read_answer(reader))
        finally:
            for _, writer in connections:
                writer.close()
        assert fast.hits.deferrals > 0  # 20 at once, 2 a turn: most waited for a later turn
        # A waiting connection is resumed when its turn comes, not every turn until then (at
        # most once a request it waited with: 140 resumes here when every turn resumed all).
        assert resumes <= 30
    assert [a.status for a in answers] == [200] * 30
    assert all(a.body.startswith(b"#EXTM3U") for a in answers)

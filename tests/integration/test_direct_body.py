"""Upstream bodies fed to their readers without aiohttp's parser copy (proxy/upstream/direct_body).

Real sockets throughout: the aiohttp origin on port 0 for well-behaved answers, a raw asyncio
server on port 0 for the ones an upstream can get wrong (cut short, too long, closed at once).
The raw server sends the head first and the body a moment later, so the body arrives in reads
of its own: the case the handler takes over.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web

from proxy.turns import TurnBudget
from proxy.upstream import direct_body
from proxy.upstream.client import UpstreamResponse
from proxy.upstream.direct_body import (
    DIRECT_BODIES,
    FIRST_BLOCK_BYTES,
    SPENT_READ_BYTES,
    DirectBodyHandler,
    written_for,
)
from proxy.upstream.receive import set_read_size
from proxy.upstream.transport import UpstreamConnector
from tests.integration.test_tunnel_tls import https_origin, make_cert
from tests.origin import Origin

MIB = 1024 * 1024
BODY = bytes(range(256)) * (4 * MIB // 256)

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]

taken_over = pytest.mark.skipif(
    not DIRECT_BODIES, reason="another aiohttp minor version: every body stays with the parser"
)


class RawOrigin:
    """An HTTP/1.1 server that answers every request with what ``answer`` writes."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawOrigin:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while not writer.is_closing():
                await reader.readuntil(b"\r\n\r\n")
                await self.answer(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def head_then(writer: asyncio.StreamWriter, head: bytes, *pieces: bytes) -> None:
    """Write the head, let it go out alone, then each piece in turn."""
    writer.write(head)
    await writer.drain()
    for piece in pieces:
        await asyncio.sleep(0.02)
        writer.write(piece)
        await writer.drain()


def plain_head(length: int, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=UpstreamConnector(limit=1)) as client:
        yield client


def handler_of(response: aiohttp.ClientResponse) -> DirectBodyHandler:
    assert response.connection is not None
    protocol = response.connection.protocol
    assert isinstance(protocol, DirectBodyHandler)
    return protocol


@taken_over
async def test_plain_bodies_go_direct_and_the_connection_is_reused(
    origin: Origin, session: aiohttp.ClientSession
) -> None:
    origin.media("/a.ts", BODY)
    origin.media("/b.ts", BODY[::-1])
    async with session.get(f"{origin.url}/a.ts") as first:
        protocol = handler_of(first)
        assert await first.read() == BODY
    fed = protocol.direct_bytes
    assert fed > len(BODY) // 2  # most of it came after the head
    async with session.get(f"{origin.url}/b.ts") as second:
        assert handler_of(second) is protocol  # kept alive: the parser was renewed for it
        assert await second.read() == BODY[::-1]
    assert protocol.direct_bytes > fed + len(BODY) // 2


@taken_over
async def test_a_slow_reader_gets_every_byte_through_flow_control(origin: Origin) -> None:
    origin.media("/a.ts", BODY)
    connector = UpstreamConnector(limit=1)
    async with (
        aiohttp.ClientSession(connector=connector, read_bufsize=16 * 1024) as session,
        session.get(f"{origin.url}/a.ts") as response,
    ):
        protocol = handler_of(response)
        got = bytearray()
        async for chunk in response.content.iter_any():
            got += chunk
            if len(got) < MIB:
                await asyncio.sleep(0.005)  # the socket fills; reading is paused and resumed
        assert bytes(got) == BODY
        assert protocol.direct_bytes > len(BODY) // 2


async def read_in_blocks() -> None:
    """A body read with reads of up to 1 MiB: read into blocks of its own, never past its end."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        await head_then(writer, plain_head(len(BODY)), BODY[: MIB // 2], BODY[MIB // 2 :])

    async with (
        RawOrigin(answer) as raw,
        aiohttp.ClientSession(connector=UpstreamConnector(limit=1)) as session,
        session.get(raw.url) as response,
    ):
        protocol = handler_of(response)
        set_read_size(response, MIB)  # before the body's first read: the head came alone
        chunks: list[bytes | memoryview] = []
        while chunk := (await response.content.readchunk())[0]:
            chunks.append(chunk)
    assert b"".join(chunks) == BODY
    views = [chunk for chunk in chunks if isinstance(chunk, memoryview)]  # read where they stay
    # Everything after the head's read (all of it, unless a busy test process let the head and
    # the first piece arrive together) came as views of blocks.
    assert sum(map(len, views)) == protocol.direct_bytes >= len(BODY) - MIB // 2
    blocks = {id(view.obj): view.obj for view in views}
    sizes = sorted(len(block) for block in blocks.values())  # type: ignore[arg-type]
    assert sum(sizes) == protocol.direct_bytes  # the blocks tile the body: nothing past its end
    assert sizes[-1] == MIB  # as big as the read size allowed
    if protocol.direct_bytes == len(BODY):  # the head came alone: the first block begins it
        assert len(views[0].obj) == FIRST_BLOCK_BYTES  # type: ignore[arg-type]


@taken_over
async def test_a_body_is_read_into_blocks_of_its_own() -> None:
    await read_in_blocks()


@taken_over
def test_a_body_is_read_into_blocks_of_its_own_under_uvloop() -> None:
    # The proxy's event loop (the tests run on asyncio's): it picks the buffered read path by
    # the protocol's class, so this is the one that says the handler is a buffered protocol.
    uvloop.run(read_in_blocks())


async def read_over_tls(tmp: Path) -> None:
    """Bodies from an HTTPS origin: the TLS layer decrypts straight into the body's blocks."""
    cert, key = make_cert(tmp, "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def segment(request: web.Request) -> web.Response:
        return web.Response(body=BODY)

    connector = UpstreamConnector(limit=1, ssl=ssl.create_default_context(cafile=str(cert)))
    async with https_origin(server_ctx, "/a.ts", segment) as port:
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(2):  # the second on the same connection
                async with session.get(f"https://localhost:{port}/a.ts") as response:
                    protocol = handler_of(response)
                    set_read_size(response, MIB)
                    chunks: list[bytes | memoryview] = []
                    while chunk := (await response.content.readchunk())[0]:
                        chunks.append(chunk)
                assert b"".join(chunks) == BODY
                assert any(isinstance(chunk, memoryview) for chunk in chunks)
        assert protocol.direct_bytes > len(BODY)  # most of both bodies went into blocks


@taken_over
async def test_tls_bodies_are_read_into_blocks_too(tmp_path: Path) -> None:
    await read_over_tls(tmp_path)


@taken_over
def test_tls_bodies_are_read_into_blocks_too_under_uvloop(tmp_path: Path) -> None:
    uvloop.run(read_over_tls(tmp_path))


async def test_chunked_and_decompressed_bodies_stay_with_the_parser(
    session: aiohttp.ClientSession,
) -> None:
    packed = gzip.compress(BODY, compresslevel=1)

    modes = iter(["chunked", "gzip", "gzip"])

    async def answer(writer: asyncio.StreamWriter) -> None:
        if next(modes) == "chunked":
            pieces = [
                f"{len(BODY[i : i + MIB]):x}\r\n".encode() + BODY[i : i + MIB] + b"\r\n"
                for i in range(0, len(BODY), MIB)
            ]
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            await head_then(writer, head, *pieces, b"0\r\n\r\n")
        else:
            head = plain_head(len(packed), "Content-Encoding: gzip\r\n")
            await head_then(writer, head, packed[:1000], packed[1000:])

    async with RawOrigin(answer) as raw:
        async with session.get(raw.url) as response:
            protocol = handler_of(response)
            assert await response.read() == BODY
        async with session.get(raw.url) as response:
            assert await response.read() == BODY  # decoded by aiohttp
        assert protocol.direct_bytes == 0
        async with session.get(raw.url, auto_decompress=False) as response:
            assert await response.read() == packed  # passed on as sent: fed directly
        assert protocol.direct_bytes == len(packed)  # both pieces came after the head
        assert raw.connections == 1  # every answer complete, the connection kept


@taken_over
async def test_a_body_cut_short_is_an_error(session: aiohttp.ClientSession) -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        await head_then(writer, plain_head(len(BODY)), BODY[: MIB // 2], BODY[MIB // 2 : MIB])
        writer.close()

    async with RawOrigin(answer) as raw, session.get(raw.url) as response:
        protocol = handler_of(response)
        with pytest.raises(aiohttp.ClientPayloadError, match="not completed"):
            await response.read()
        assert protocol.direct_bytes == MIB


@taken_over
async def test_a_close_right_after_the_body_loses_nothing(session: aiohttp.ClientSession) -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        # No "Connection: close": the client has put the connection back for reuse when it goes.
        # Small enough to sit unread in the client's buffer without pausing the socket.
        await head_then(writer, plain_head(len(small)), small[:20_000], small[20_000:])
        writer.close()

    small = BODY[:50_000]
    async with RawOrigin(answer) as raw:
        for _ in range(2):
            async with session.get(raw.url) as response:
                protocol = handler_of(response)
                await asyncio.sleep(0.3)  # the connection is gone before the reader starts
                assert protocol.transport is None
                assert await response.read() == small
        assert raw.connections == 2
        assert protocol.direct_bytes == len(small)


@taken_over
async def test_bytes_past_the_body_are_dropped_and_the_connection_closed(
    session: aiohttp.ClientSession,
) -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        await head_then(writer, plain_head(len(BODY)), BODY[:MIB], BODY[MIB:] + b"HTTP/1.1 junk")

    async with RawOrigin(answer) as raw:
        for _ in range(2):
            async with session.get(raw.url) as response:
                protocol = handler_of(response)
                assert await response.read() == BODY
            await asyncio.sleep(0.1)  # the junk may come in a read of its own, after the body
        assert raw.connections == 2  # the first connection was not reused after its junk
        assert protocol.direct_bytes == len(BODY)  # the second connection's


async def test_an_upstream_response_has_bytes_ready_when_a_read_would_give_them_at_once(
    session: aiohttp.ClientSession,
) -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        await head_then(writer, plain_head(2 * MIB), BODY[:MIB], BODY[MIB : 2 * MIB])

    async with RawOrigin(answer) as raw, session.get(raw.url) as response:
        upstream = UpstreamResponse(raw=response, final_url=raw.url)
        assert not upstream.bytes_ready()  # the head came alone
        got = b""
        while len(got) < 2 * MIB:
            for _ in range(5_000):  # bounded: a reader that never becomes ready fails, not hangs
                if upstream.bytes_ready():
                    break
                await asyncio.sleep(0.001)
            else:
                pytest.fail("the next part of the body never came in")
            while upstream.bytes_ready() and len(got) < 2 * MIB:
                reading = asyncio.ensure_future(upstream.read_chunk())
                await asyncio.sleep(0)
                assert reading.done()  # ready: the read took one step, it did not wait
                got += reading.result()
        assert got == BODY[: 2 * MIB] and upstream.taken == 2 * MIB
        assert upstream.raw.content.is_eof()  # the end is in: no bytes, nothing to yield for
        assert not upstream.bytes_ready()
        assert await upstream.read_chunk() == b""


@taken_over
async def test_the_first_chunk_of_a_body_read_into_blocks_is_bytes(
    session: aiohttp.ClientSession,
) -> None:
    # Its callers sniff it with bytes' methods (a playlist's "#EXTM3U", a TS sync byte).
    async def answer(writer: asyncio.StreamWriter) -> None:
        await head_then(writer, plain_head(MIB), BODY[:MIB])

    async with RawOrigin(answer) as raw, session.get(raw.url) as response:
        upstream = UpstreamResponse(raw=response, final_url=raw.url)
        head = await upstream.first_chunk()
        assert type(head) is bytes and head and BODY.startswith(head)
        assert handler_of(response).direct_bytes > 0  # it was read into a block
        assert await upstream.read_capped(2 * MIB, head) == BODY[:MIB]


def test_only_the_aiohttp_minor_version_it_was_written_for_is_taken_over() -> None:
    assert written_for("3.14.0") and written_for("3.14.5")
    assert not written_for("3.13.2") and not written_for("3.15.0") and not written_for("4.0.0a1")


async def test_under_another_aiohttp_every_body_stays_with_the_parser(
    origin: Origin, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(direct_body, "DIRECT_BODIES", False)
    origin.media("/a.ts", BODY)
    for _ in range(2):
        async with session.get(f"{origin.url}/a.ts") as response:
            protocol = handler_of(response)
            assert await response.read() == BODY
        assert protocol.direct_bytes == 0


async def test_under_another_aiohttp_the_connector_dials_with_aiohttps_own_protocol(
    origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(direct_body, "DIRECT_BODIES", False)
    origin.media("/a.ts", BODY)
    async with (
        aiohttp.ClientSession(connector=UpstreamConnector(limit=1)) as client,
        client.get(f"{origin.url}/a.ts") as response,
    ):
        assert response.connection is not None
        assert not isinstance(response.connection.protocol, DirectBodyHandler)
        assert await response.read() == BODY


async def spent_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of one read a turn (counted, so the test does not depend on the machine's speed;
    the proxy's counts CPU time): in any turn, one body read may be big, the others take at most
    SPENT_READ_BYTES. Four bodies of 4 MiB arrive at once on four connections."""
    turn = 0
    reads: list[tuple[int, int]] = []  # (turn, bytes) of every body read
    loop = asyncio.get_running_loop()
    ticking = True

    def tick() -> None:
        nonlocal turn
        turn += 1
        if ticking:
            loop.call_soon(tick)

    original = DirectBodyHandler.buffer_updated

    def buffer_updated(self: DirectBodyHandler, nbytes: int) -> None:
        if self._into_body:
            reads.append((turn, nbytes))
        original(self, nbytes)

    monkeypatch.setattr(DirectBodyHandler, "buffer_updated", buffer_updated)

    async def answer(writer: asyncio.StreamWriter) -> None:
        await head_then(writer, plain_head(len(BODY)), BODY)

    async def fetch(session: aiohttp.ClientSession, url: str) -> bytes:
        async with session.get(url) as response:
            set_read_size(response, MIB)
            got = bytearray()
            while chunk := (await response.content.readchunk())[0]:
                got += chunk
            return bytes(got)

    loop.call_soon(tick)
    connector = UpstreamConnector(limit=4, reads=TurnBudget(1))
    async with RawOrigin(answer) as raw, aiohttp.ClientSession(connector=connector) as session:
        bodies = await asyncio.gather(*(fetch(session, raw.url) for _ in range(4)))
    ticking = False
    assert bodies == [BODY] * 4
    big_by_turn = Counter(t for t, size in reads if size > SPENT_READ_BYTES)
    assert max(big_by_turn.values()) == 1  # one full read a turn, whatever else was readable
    reads_by_turn = Counter(t for t, _ in reads)
    assert max(reads_by_turn.values()) > 1  # and turns did read for more than one body


@taken_over
async def test_once_a_turns_reads_are_spent_each_read_takes_little_and_bodies_stay_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await spent_reads(monkeypatch)


@taken_over
def test_once_a_turns_reads_are_spent_each_read_takes_little_under_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uvloop.run(spent_reads(monkeypatch))

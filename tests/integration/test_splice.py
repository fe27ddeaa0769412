"""Bodies moved socket to socket in the kernel (proxy/splice.py), over real loopback TCP."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import uvloop

from proxy import splice
from proxy.turns import TurnBudget

Pair = tuple[socket.socket, socket.socket]


async def tcp_pair() -> Pair:
    """Two ends of one loopback TCP connection, both non-blocking."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = socket.socket()
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        accepted = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.sock_connect(client, listener.getsockname())
        server, _ = await accepted
    finally:
        listener.close()
    server.setblocking(False)
    return client, server


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        got += chunk
    return bytes(got)


async def moved_between(
    send: Callable[[socket.socket], Awaitable[None]],
    length: int,
    *,
    turns: TurnBudget | None = None,
    read_timeout: float = 5.0,
    big: bool = True,
) -> tuple[int | BaseException, bytes]:
    """Move ``length`` bytes from what ``send`` writes into one connection to the far end of
    another; what :func:`splice.splice_body` returned (or raised) and what arrived."""
    loop = asyncio.get_running_loop()
    upstream_peer, upstream = await tcp_pair()
    viewer_peer, viewer = await tcp_pair()
    received = asyncio.ensure_future(read_all(viewer_peer))
    sending = asyncio.ensure_future(send(upstream_peer))
    outcome: int | BaseException
    try:
        outcome = await splice.splice_body(
            upstream.fileno(),
            viewer.fileno(),
            length,
            turns=turns or TurnBudget(0),
            read_timeout=read_timeout,
            big=big,
        )
    except (splice.SourceEnded, splice.SinkGone, splice.SourceStalled) as exc:
        outcome = exc
    viewer.close()
    upstream.close()
    data = await received
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
    for sock in (upstream_peer, viewer_peer):
        sock.close()
    del loop
    return outcome, data


def sender(
    *pieces: bytes, pause: float = 0.0, close: bool = True
) -> Callable[[socket.socket], Awaitable[None]]:
    async def send(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for piece in pieces:
            await loop.sock_sendall(sock, piece)
            if pause:
                await asyncio.sleep(pause)
        if close:
            sock.shutdown(socket.SHUT_WR)
        else:
            await asyncio.sleep(3600)

    return send


BODY = random.Random(7).randbytes(3 * 1024 * 1024 + 17)


@pytest.fixture
async def fds_kept() -> AsyncIterator[None]:
    before = open_fds()
    yield
    assert open_fds() == before  # no duplicate or pipe left behind


@pytest.mark.parametrize("big", [True, False])
async def test_a_body_is_moved_whole(fds_kept: None, big: bool) -> None:
    outcome, data = await moved_between(
        sender(BODY[:1000], BODY[1000:], pause=0.01), len(BODY), big=big
    )
    assert outcome == len(BODY)
    assert data == BODY


async def test_only_the_bodys_length_is_moved(fds_kept: None) -> None:
    """Bytes past the body (the next answer on a kept-alive connection) stay in the source."""
    outcome, data = await moved_between(sender(BODY + b"NEXT ANSWER"), len(BODY))
    assert outcome == len(BODY) and data == BODY


async def test_moving_takes_turns_from_the_budget(fds_kept: None) -> None:
    turns = TurnBudget(1)  # every pipeful waits for a later turn
    waits = 0
    original = TurnBudget.next

    async def counted(self: TurnBudget) -> None:
        nonlocal waits
        waits += 1
        await original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TurnBudget, "next", counted)
        outcome, data = await moved_between(sender(BODY), len(BODY), turns=turns, big=False)
    assert outcome == len(BODY) and data == BODY
    assert waits >= 2


async def test_a_source_that_closes_early_is_an_error(fds_kept: None) -> None:
    outcome, data = await moved_between(sender(BODY[:100_000]), len(BODY))
    assert isinstance(outcome, splice.SourceEnded)
    assert data == BODY[:100_000]  # what came went on, no more


async def test_a_stalled_source_times_out(fds_kept: None) -> None:
    started = time.monotonic()
    outcome, data = await moved_between(
        sender(BODY[:5000], close=False), len(BODY), read_timeout=0.3
    )
    assert isinstance(outcome, splice.SourceStalled)
    assert data == BODY[:5000]
    assert time.monotonic() - started < 3


async def test_a_viewer_that_left_is_an_error(fds_kept: None) -> None:
    loop = asyncio.get_running_loop()
    upstream_peer, upstream = await tcp_pair()
    viewer_peer, viewer = await tcp_pair()
    viewer_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    viewer_peer.close()  # a reset: the viewer is gone
    sending = asyncio.ensure_future(loop.sock_sendall(upstream_peer, BODY))
    with pytest.raises(splice.SinkGone):
        await splice.splice_body(
            upstream.fileno(), viewer.fileno(), len(BODY), turns=TurnBudget(0), read_timeout=5
        )
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
    for sock in (upstream_peer, upstream, viewer):
        sock.close()


def test_a_body_is_moved_whole_under_uvloop() -> None:
    # The proxy's event loop: readers and writers on duplicates of sockets it does not own.
    async def main() -> None:
        before = open_fds()
        outcome, data = await moved_between(sender(BODY, pause=0.01), len(BODY))
        assert outcome == len(BODY) and data == BODY
        assert open_fds() == before

    uvloop.run(main())

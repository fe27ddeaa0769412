"""The receive budget: shares of upstream.receive_budget_bytes, and the socket buffers it sets."""

from __future__ import annotations

import socket

import aiohttp

from proxy.upstream.receive import (
    MIN_RECEIVE_BUFFER_BYTES,
    MIN_SHARE_BYTES,
    SHARE_PARTS,
    UNLIMITED_SHARE_BYTES,
    ReceiveBudget,
)
from tests.origin import Origin

MIB = 1024 * 1024


def test_no_limit_until_the_budget_is_shared_thin() -> None:
    budget = ReceiveBudget(64 * MIB)
    closers = [budget.opened() for _ in range(128)]
    assert budget.share("media") is None  # 512 KiB each: big reads, kernel autotuning
    closers.append(budget.opened())
    assert budget.share("media") == 64 * MIB // 129
    assert MIN_SHARE_BYTES < 64 * MIB // 129 < UNLIMITED_SHARE_BYTES
    closers += [budget.opened() for _ in range(500 - 129)]
    assert budget.share("media") == 64 * MIB // 500
    closers += [budget.opened() for _ in range(5000)]
    assert budget.share("media") == MIN_SHARE_BYTES  # never below the floor
    # Playlists and channel lists are read whole: never limited, never counted.
    assert budget.share("playlist") is None and budget.share("channel_list") is None
    for closed in closers:
        closed()
        closed()  # once only, however often called
    assert budget.open == 0
    assert budget.share("media") is None


def test_a_zero_budget_limits_nothing() -> None:
    budget = ReceiveBudget(0)
    for _ in range(1000):
        budget.opened()
    assert budget.share("media") is None


async def test_fit_shrinks_the_receive_buffer_and_gives_it_back(origin: Origin) -> None:
    # Large enough that the connection is still busy with it when the headers are in.
    origin.media("/seg.ts", b"\x47" * 8 * MIB)
    budget = ReceiveBudget(64 * MIB)
    share = 512 * 1024 - 1
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{origin.url}/seg.ts") as first:
            assert first.connection is not None and first.connection.transport is not None
            sock = first.connection.transport.get_extra_info("socket")
            before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            budget.fit(first, share)
            # The kernel doubles what it is given.
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * (
                share // SHARE_PARTS
            )
            await first.read()
        async with session.get(f"{origin.url}/seg.ts") as again:
            assert again.connection is not None
            budget.fit(again, MIN_SHARE_BYTES)  # an eighth of it would make a sender crawl
            assert (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * MIN_RECEIVE_BUFFER_BYTES
            )
            await again.read()
        # The same connection, reused without a limit: its former size comes back.
        async with session.get(f"{origin.url}/seg.ts") as second:
            assert second.connection is not None and second.connection.transport is not None
            assert second.connection.transport.get_extra_info("socket") is sock
            budget.fit(second, None)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= before
            await second.read()

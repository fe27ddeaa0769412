"""The receive budget: shares of upstream.receive_budget_bytes, and the socket buffers it sets."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from proxy.upstream.client import UpstreamResponse
from proxy.upstream.direct_body import DEFAULT_READ_BYTES, DIRECT_BODIES, DirectBodyHandler
from proxy.upstream.receive import (
    MAX_BODY_READ_BYTES,
    MAX_READ_BUFFER_BYTES,
    MIN_READ_BUFFER_BYTES,
    MIN_RECEIVE_BUFFER_BYTES,
    MIN_SHARE_BYTES,
    SHARE_PARTS,
    UNLIMITED_SHARE_BYTES,
    BodyFit,
    ReceiveBudget,
    set_read_limit,
)
from proxy.upstream.transport import UpstreamConnector
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


def test_a_read_takes_up_to_the_share_when_it_is_not_limited() -> None:
    budget = ReceiveBudget(64 * MIB)
    closers = [budget.opened() for _ in range(64)]
    assert budget.read_size(None) == MIB  # 64 segments at once: a sixty-fourth each
    closers += [budget.opened() for _ in range(64)]
    assert budget.read_size(None) == UNLIMITED_SHARE_BYTES
    for closed in closers[16:]:
        closed()
    assert budget.read_size(None) == MAX_BODY_READ_BYTES  # 4 MiB each: at most 2 MiB a read
    # A limited share reads what its read buffer holds, never less than the smallest.
    assert budget.read_size(256 * 1024) == 256 * 1024 // SHARE_PARTS
    assert budget.read_size(MIN_SHARE_BYTES) == MIN_READ_BUFFER_BYTES
    assert ReceiveBudget(0).read_size(None) == MAX_BODY_READ_BYTES  # no budget, no limit


@pytest.mark.skipif(not DIRECT_BODIES, reason="another aiohttp minor version: no reads into bodies")
async def test_fit_sets_how_much_one_read_takes_into_the_body(origin: Origin) -> None:
    origin.media("/seg.ts", b"\x47" * 4 * MIB)
    budget = ReceiveBudget(64 * MIB)
    closers = [budget.opened() for _ in range(64)]
    async with aiohttp.ClientSession(connector=UpstreamConnector(limit=1)) as session:
        async with session.get(f"{origin.url}/seg.ts") as raw:
            assert raw.connection is not None
            protocol = raw.connection.protocol
            assert isinstance(protocol, DirectBodyHandler)
            assert protocol.read_size == DEFAULT_READ_BYTES  # until the share is known
            fit = BodyFit(budget, raw, "media")
            assert fit.share is None and protocol.read_size == MIB
            closers += [budget.opened() for _ in range(436)]
            assert fit.check() and fit.share is not None
            assert protocol.read_size == fit.share // SHARE_PARTS
            assert len(await raw.read()) == 4 * MIB
        # The next request on the connection starts from the default again.
        async with session.get(f"{origin.url}/seg.ts") as again:
            assert again.connection is not None and again.connection.protocol is protocol
            assert protocol.read_size == DEFAULT_READ_BYTES
            assert len(await again.read()) == 4 * MIB
    for closed in closers:
        closed()


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


def _rcvbuf(response: aiohttp.ClientResponse) -> int:
    assert response.connection is not None and response.connection.transport is not None
    sock = response.connection.transport.get_extra_info("socket")
    value: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return value


async def test_a_body_follows_its_share_as_others_come_and_go(origin: Origin) -> None:
    origin.media("/seg.ts", b"\x47" * 8 * MIB)
    budget = ReceiveBudget(64 * MIB)
    first = budget.opened()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{origin.url}/seg.ts", read_bufsize=budget.read_bufsize("media")) as raw,
    ):
        fit = BodyFit(budget, raw, "media")
        assert fit.share is None and fit.chunk_limit is None
        assert raw.content.get_read_buffer_limits()[0] == MAX_READ_BUFFER_BYTES
        alone = _rcvbuf(raw)
        # 499 more bodies arrive: at its next chunk read, this one gives up its buffers.
        others = [budget.opened() for _ in range(499)]
        assert fit.check()
        share = 64 * MIB // 500
        assert fit.share == share and fit.chunk_limit == share // SHARE_PARTS
        assert raw.content.get_read_buffer_limits() == (
            share // SHARE_PARTS,
            2 * share // SHARE_PARTS,
        )
        assert _rcvbuf(raw) == 2 * max(share // SHARE_PARTS, MIN_RECEIVE_BUFFER_BYTES)
        # A few more or fewer change nothing (no setsockopt per request).
        extra = [budget.opened() for _ in range(100)]
        assert not fit.check() and fit.share == share
        for closed in [*others, *extra]:
            closed()
        # Alone again: no limit, and its former receive buffer back.
        assert fit.check()
        assert fit.share is None and fit.chunk_limit is None
        assert raw.content.get_read_buffer_limits()[0] == MAX_READ_BUFFER_BYTES
        assert _rcvbuf(raw) >= alone
        assert len(await raw.read()) == 8 * MIB
    first()


async def test_the_read_buffer_is_fitted_when_the_headers_are_in(origin: Origin) -> None:
    # Requested when it was alone (a big read buffer), answered when 500 bodies are counted.
    origin.media("/seg.ts", b"\x47" * MIB)
    budget = ReceiveBudget(64 * MIB)
    closers = [budget.opened()]
    bufsize = budget.read_bufsize("media")
    assert bufsize == MAX_READ_BUFFER_BYTES
    url = f"{origin.url}/seg.ts"
    async with aiohttp.ClientSession() as session, session.get(url, read_bufsize=bufsize) as raw:
        closers += [budget.opened() for _ in range(499)]
        fit = BodyFit(budget, raw, "media")
        part = 64 * MIB // 500 // SHARE_PARTS
        assert MIN_READ_BUFFER_BYTES <= part < MAX_READ_BUFFER_BYTES
        assert raw.content.get_read_buffer_limits() == (part, 2 * part)
        assert fit.chunk_limit == part
        fit.limit_chunks(4096)  # under memory pressure: smaller still, while limited
        assert fit.chunk_limit == 4096
        assert await raw.read() == b"\x47" * MIB
    for closed in closers:
        closed()


async def test_set_read_limit_lowers_what_aiohttp_only_raises(origin: Origin) -> None:
    origin.media("/seg.ts", b"\x47" * 1024)
    url = f"{origin.url}/seg.ts"
    async with aiohttp.ClientSession() as session, session.get(url, read_bufsize=MIB) as raw:
        assert set_read_limit(raw.content, 16 * 1024)
        assert raw.content.get_read_buffer_limits() == (16 * 1024, 32 * 1024)
        assert await raw.read() == b"\x47" * 1024


async def test_iter_chunks_hands_on_smaller_chunks_once_others_arrive(origin: Origin) -> None:
    data = bytes(range(256)) * 4 * 1024  # 1 MiB, every byte checked
    origin.media("/seg.ts", data)
    budget = ReceiveBudget(64 * MIB)
    closers = [budget.opened()]
    async with aiohttp.ClientSession() as session:
        raw = await session.get(f"{origin.url}/seg.ts", read_bufsize=budget.read_bufsize("media"))
        fit = BodyFit(budget, raw, "media")
        response = UpstreamResponse(raw, "u", chunk_limit=fit.chunk_limit, fit=fit)
        got: list[bytes] = []
        async for chunk in response.iter_chunks():
            got.append(chunk)
            if len(got) == 1:
                closers += [budget.opened() for _ in range(999)]
        response.release()
    assert b"".join(got) == data
    assert max(len(c) for c in got[1:]) <= 64 * MIB // 1000 // SHARE_PARTS
    for closed in closers:
        closed()

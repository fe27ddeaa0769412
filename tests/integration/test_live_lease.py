"""Channel leases against a real redis-server: exclusive, renewed, released, taken over after
expiry, and fail-safe when Redis goes away."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest

from proxy.live.lease import LeaseUnavailable, LocalLeases, RedisLeases, retry_after
from tests.services import MissingBinary, Redis, redis_server

TTL = 0.5


@pytest.fixture
def redis() -> Iterator[Redis]:
    try:
        with redis_server() as server:
            yield server
    except MissingBinary as exc:
        pytest.skip(str(exc))


@pytest.fixture
async def pair(redis: Redis) -> AsyncIterator[tuple[RedisLeases, RedisLeases]]:
    a = RedisLeases(redis.url, "a", TTL, timeout=0.5)
    b = RedisLeases(redis.url, "a", TTL, timeout=0.5)  # the same name: still distinct owners
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_one_owner_at_a_time_and_release(pair: tuple[RedisLeases, RedisLeases]) -> None:
    a, b = pair
    assert a.owner != b.owner
    assert await a.acquire("ch1") is None
    assert await a.acquire("ch1") is not None  # not re-entrant: the pool holds its sessions
    remaining = await b.acquire("ch1")
    assert remaining is not None
    assert 0 < remaining <= TTL
    assert retry_after(remaining) == 1
    assert await b.acquire("ch2") is None  # other channels are free
    await b.release("ch1")  # not b's: nothing happens
    assert await b.acquire("ch1") is not None
    await a.release("ch1")
    assert await b.acquire("ch1") is None


async def test_renewal_keeps_the_lease_and_expiry_hands_it_over(
    pair: tuple[RedisLeases, RedisLeases],
) -> None:
    a, b = pair
    assert await a.acquire("ch") is None
    for _ in range(4):  # two TTLs, renewed at a third of it
        await asyncio.sleep(TTL / 3)
        assert await a.renew(["ch"]) == set()
        assert await b.acquire("ch") is not None
    # The owner stops renewing (it died): the lease runs out and the other takes over.
    await asyncio.sleep(TTL + 0.1)
    assert await b.acquire("ch") is None
    # The old owner learns at its next renewal that the channel is no longer its own.
    assert await a.renew(["ch"]) == {"ch"}


async def test_redis_gone_refuses_starts_and_loses_leases_after_a_ttl(redis: Redis) -> None:
    leases = RedisLeases(redis.url, "a", TTL, timeout=0.2)
    try:
        assert await leases.acquire("ch") is None
        os.kill(redis.pid, signal.SIGSTOP)  # unreachable (every command times out)
        try:
            with pytest.raises(LeaseUnavailable):
                await leases.acquire("other")
            assert await leases.renew(["ch"]) == set()  # still within its TTL
            await asyncio.sleep(TTL)
            assert await leases.renew(["ch"]) == {"ch"}
        finally:
            os.kill(redis.pid, signal.SIGCONT)
    finally:
        await leases.close()


async def test_local_leases_grant_everything() -> None:
    local = LocalLeases("solo")
    assert await local.acquire("ch") is None
    assert await local.acquire("ch") is None
    assert await local.renew(["ch"]) == set()
    await local.release("ch")

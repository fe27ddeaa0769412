"""Channel leases against a real redis-server: exclusive, renewed, released, taken over after
expiry, and fail-safe when Redis goes away."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis as redis_client_class

from proxy.errors import ServiceUnavailable
from proxy.live.lease import KEY_PREFIX, LeaseUnavailable, LocalLeases, RedisLeases, retry_after
from proxy.live.process import find_ffmpeg
from proxy.settings import LiveSettings
from proxy.web.keys import LIVE, METRICS
from tests.conftest import ProxyFactory
from tests.services import MissingBinary, Redis, redis_server

TTL = 0.5


def redis_client(url: str) -> redis_client_class:
    return redis_client_class.from_url(url)


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


# -- the live pool with leases, in the real app ---------------------------------------------


@pytest.mark.ffmpeg
async def test_a_session_whose_lease_is_taken_stops_and_a_held_channel_answers_503(
    proxy_factory: ProxyFactory, redis: Redis
) -> None:
    try:
        find_ffmpeg("auto")
    except ServiceUnavailable:
        pytest.skip("no ffmpeg on PATH and none from imageio-ffmpeg")
    client = await proxy_factory(
        cache={"backend": "redis", "redis_url": redis.url},
        live={"segment_seconds": 1.0, "lease_ttl": 3.0, "instance_name": "here"},
        channels=[
            {"id": "demo", "url": "lavfi:testsrc2=size=160x90:rate=25"},
            {"id": "held", "url": "lavfi:testsrc2=size=160x90:rate=25"},
        ],
    )
    other = RedisLeases(redis.url, "elsewhere", 3.0, timeout=0.5)
    try:
        # Another instance holds "held": this one refuses it, with the time its lease has left.
        assert await other.acquire("held") is None
        refused = await client.get("/live/held/index.m3u8")
        assert refused.status == 503
        assert 1 <= int(refused.headers["Retry-After"]) <= 3
        assert (await refused.json())["error"]["code"] == "service_unavailable"
        assert client.app[LIVE].session("held") is None

        playing = await client.get("/live/demo/index.m3u8")
        assert playing.status == 200
        pool = client.app[LIVE]
        assert pool.session("demo") is not None
        # The lease vanishes and another instance takes it (as after a long Redis outage):
        # at its next sweep this instance stops its ffmpeg rather than run the channel twice.
        raw = redis_client(redis.url)
        await raw.delete(f"{KEY_PREFIX}demo")
        assert await other.acquire("demo") is None
        for _ in range(50):
            if pool.session("demo") is None:
                break
            await asyncio.sleep(0.1)
        assert pool.session("demo") is None
        registry = client.app[METRICS].registry
        assert (
            registry.get_sample_value("hlsrelay_live_leases_lost_total", {"channel": "demo"}) == 1.0
        )
        assert (
            registry.get_sample_value("hlsrelay_live_lease_refusals_total", {"channel": "held"})
            == 1.0
        )
        # Its own leases are given back when it stops: "demo" is still the other's.
        assert await raw.get(f"{KEY_PREFIX}demo") == other.owner.encode()
        await raw.aclose()
    finally:
        await other.close()


def test_lease_settings_are_validated() -> None:
    default = LiveSettings()
    assert default.instance_name.endswith(f"-{os.getpid()}")
    assert default.lease_ttl == 10.0
    with pytest.raises(ValidationError):
        LiveSettings(lease_ttl=1.0)
    with pytest.raises(ValidationError):
        LiveSettings(instance_name="bad name/with:chars")

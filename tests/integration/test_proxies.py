"""Outbound proxies end to end: the real app, a real origin, real tinyproxy and microsocks
processes, and the fault proxy (a fake, for failures real proxies won't produce on demand)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.web.keys import METRICS, PROXY_POOL, RELAY
from tests.conftest import ProxyFactory
from tests.fault_proxy import FaultProxy
from tests.origin import Origin
from tests.outbound import RealProxy, dead_port, microsocks, tinyproxy

Client = TestClient[Any, Any]
SEGMENT = bytes(range(256)) * 64  # 16 KiB
_streams = itertools.count()


def mint(client: Client, url: str, headers: dict[str, str] | None = None) -> str:
    """A stream of its own each call (a distinct header profile gives a distinct ctx token)."""
    profile = (
        headers if headers is not None else {"Referer": f"https://site.example/{next(_streams)}"}
    )
    return client.app[RELAY].mint(url, profile)


def same_stream(client: Client, path: str, url: str, headers: dict[str, str]) -> str:
    """The proxied path of ``url`` in the stream of ``path``: tokens are deterministic, so the
    same directory and header profile give the same ctx token."""
    other = client.app[RELAY].mint(url, headers)
    assert other.split("/")[2] == path.split("/")[2]
    return other


def counts(client: Client) -> dict[str, float]:
    """Requests sent through each proxy, from the app's own metrics."""
    registry = client.app[METRICS].registry
    out = {}
    for proxy in client.app[PROXY_POOL].proxies:
        value = registry.get_sample_value("hlsrelay_proxy_requests_total", {"proxy": proxy.name})
        out[proxy.name] = value or 0.0
    return out


def sample(client: Client, name: str, labels: dict[str, str] | None = None) -> float:
    return client.app[METRICS].registry.get_sample_value(name, labels or {}) or 0.0


async def get(client: Client, path: str) -> tuple[int, bytes]:
    async with client.get(path) as response:
        return response.status, await response.read()


def proxies_conf(*entries: Any, **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "urls": list(entries),
        "retry_backoff": 0.0,
        "cooldown": 30.0,
    }
    conf.update(extra)
    return conf


@pytest.fixture
async def faults() -> AsyncIterator[list[FaultProxy]]:
    proxies = [await FaultProxy().start() for _ in range(3)]
    try:
        yield proxies
    finally:
        for proxy in proxies:
            await proxy.stop()


@pytest.fixture
def tiny() -> Iterator[RealProxy]:
    with tinyproxy() as proxy:
        yield proxy


@pytest.fixture
def socks() -> Iterator[RealProxy]:
    with microsocks() as proxy:
        yield proxy


def origin_port(origin: Origin) -> int:
    return int(origin.url.rsplit(":", 1)[1])


# -- real proxies carry the traffic ------------------------------------------------------------


async def test_segments_pass_through_tinyproxy(
    proxy_factory: ProxyFactory, origin: Origin, tiny: RealProxy
) -> None:
    origin.media("/seg.ts", SEGMENT)
    client = await proxy_factory(proxies=proxies_conf({"name": "tiny", "url": tiny.url}))
    status, body = await get(client, mint(client, f"{origin.url}/seg.ts"))
    assert (status, body) == (200, SEGMENT)
    # tinyproxy's log shows the tunnel, to the address hlsrelay resolved and checked.
    assert tiny.tunnels_to(origin_port(origin)) >= 1
    assert counts(client) == {"tiny": 1.0}


async def test_a_name_is_resolved_here_and_the_proxy_gets_the_checked_address(
    proxy_factory: ProxyFactory, origin: Origin, socks: RealProxy
) -> None:
    origin.media("/seg.ts", SEGMENT)
    client = await proxy_factory(proxies=proxies_conf({"name": "socks", "url": socks.url}))
    port = origin_port(origin)
    status, body = await get(client, mint(client, f"http://localhost:{port}/seg.ts"))
    assert (status, body) == (200, SEGMENT)
    assert f"connected to 127.0.0.1:{port}" in socks.log_text()
    assert "localhost" not in socks.log_text()
    assert origin.seen[-1].headers["Host"] == f"localhost:{port}"  # virtual hosting still works


# -- rotation and stickiness -------------------------------------------------------------------


async def test_round_robin_spreads_requests_when_not_sticky(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy]
) -> None:
    origin.media("/seg.ts", SEGMENT)
    client = await proxy_factory(proxies=proxies_conf(*(f.url for f in faults), sticky=False))
    path = mint(client, f"{origin.url}/seg.ts")
    for _ in range(30):
        assert (await get(client, path))[0] == 200
    assert sorted(counts(client).values()) == [10.0, 10.0, 10.0]
    assert all(f.tunnels >= 1 for f in faults)


async def test_sticky_streams_stay_on_one_proxy_and_streams_spread(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy]
) -> None:
    for n in range(5):
        origin.media(f"/seg{n}.ts", SEGMENT)
    client = await proxy_factory(proxies=proxies_conf(*(f.url for f in faults)))
    used_per_stream = []
    for stream in range(6):
        profile = {"Referer": f"https://site.example/sticky/{stream}"}
        first = mint(client, f"{origin.url}/seg0.ts", profile)
        used: set[str] = set()
        for n in range(5):
            before = counts(client)
            path = same_stream(client, first, f"{origin.url}/seg{n}.ts", profile)
            assert (await get(client, path))[0] == 200
            after = counts(client)
            used |= {name for name in after if after[name] != before[name]}
        used_per_stream.append(used)
    assert all(len(used) == 1 for used in used_per_stream)
    assert sorted(counts(client).values()) == [10.0, 10.0, 10.0]


@pytest.mark.parametrize("strategy", ["random", "least_connections"])
async def test_other_strategies_use_every_proxy(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy], strategy: str
) -> None:
    origin.media("/seg.ts", SEGMENT)
    client = await proxy_factory(
        proxies=proxies_conf(*(f.url for f in faults), sticky=False, strategy=strategy)
    )
    path = mint(client, f"{origin.url}/seg.ts")
    for _ in range(45):
        assert (await get(client, path))[0] == 200
    assert all(v > 0 for v in counts(client).values())
    assert sum(counts(client).values()) == 45


# -- health: ejection, probes, retries ---------------------------------------------------------


async def test_dead_proxy_is_ejected_and_returns_after_a_probe(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy]
) -> None:
    origin.media("/seg.ts", SEGMENT)
    origin.media("/probe", b"ok", "text/plain")
    bad, good = faults[0], faults[1]
    bad.mode = "refuse"
    client = await proxy_factory(
        proxies=proxies_conf(
            {"name": "bad", "url": bad.url},
            {"name": "good", "url": good.url},
            sticky=False,
            failure_threshold=2,
            cooldown=0.2,
            probe_url=f"{origin.url}/probe",
            probe_interval=0.05,
        )
    )
    path = mint(client, f"{origin.url}/seg.ts")
    for _ in range(6):
        assert (await get(client, path))[0] == 200  # every failure retried through "good"
    assert sample(client, "hlsrelay_proxy_ejections_total", {"proxy": "bad"}) == 1
    assert sample(client, "hlsrelay_proxy_failures_total", {"proxy": "bad", "reason": "reset"}) == 2
    assert sample(client, "hlsrelay_proxy_up", {"proxy": "bad"}) == 0
    assert sample(client, "hlsrelay_proxy_retries_total") == 2
    bad.mode = "ok"
    deadline = time.monotonic() + 5
    while sample(client, "hlsrelay_proxy_up", {"proxy": "bad"}) == 0:
        assert time.monotonic() < deadline, "the probe never brought the proxy back"
        await asyncio.sleep(0.05)
    assert origin.requests_to("/probe")
    before = counts(client)["bad"]
    for _ in range(4):
        assert (await get(client, path))[0] == 200
    assert counts(client)["bad"] == before + 2


@pytest.mark.parametrize("mode", ["refuse", "bad_gateway", "stall", "blackhole", "auth"])
async def test_a_failure_before_the_headers_is_retried_through_the_next_proxy(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy], mode: str
) -> None:
    origin.media("/seg.ts", SEGMENT)
    faults[0].mode = mode
    client = await proxy_factory(
        proxies=proxies_conf({"name": "first", "url": faults[0].url}, faults[1].url),
        upstream={"connect_timeout": 0.3, "first_byte_timeout": 0.3},
    )
    started = time.monotonic()
    assert await get(client, mint(client, f"{origin.url}/seg.ts")) == (200, SEGMENT)
    assert time.monotonic() - started < 2
    assert sample(client, "hlsrelay_proxy_retries_total") == 1
    assert counts(client)["first"] == 1
    reasons = {"refuse": "reset", "stall": "timeout", "blackhole": "timeout", "auth": "auth"}
    if mode in reasons:
        labels = {"proxy": "first", "reason": reasons[mode]}
        assert sample(client, "hlsrelay_proxy_failures_total", labels) == 1


async def test_upstream_503_is_retried_through_the_next_proxy(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy]
) -> None:
    calls = 0

    async def flaky(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.Response(status=503, text="busy")
        return web.Response(body=SEGMENT, content_type="video/mp2t")

    origin.routes["/seg.ts"] = flaky
    client = await proxy_factory(proxies=proxies_conf(faults[0].url, faults[1].url))
    assert await get(client, mint(client, f"{origin.url}/seg.ts")) == (200, SEGMENT)
    assert calls == 2
    assert sorted(counts(client).values()) == [1.0, 1.0]


async def test_retries_are_bounded_by_attempts(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy]
) -> None:
    origin.status("/seg.ts", 503)
    client = await proxy_factory(proxies=proxies_conf(*(f.url for f in faults), retry_attempts=2))
    status, _ = await get(client, mint(client, f"{origin.url}/seg.ts"))
    assert status == 502
    assert len(origin.requests_to("/seg.ts")) == 2


async def test_mid_body_failure_cuts_the_response_never_a_complete_looking_200(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy]
) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    origin.media("/big.ts", big)
    faults[0].mode = "reset_mid_body"
    faults[0].reset_after = 200_000
    client = await proxy_factory(proxies=proxies_conf(faults[0].url))
    async with client.get(mint(client, f"{origin.url}/big.ts")) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(big))
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    labels = {"proxy": client.app[PROXY_POOL].proxies[0].name, "reason": "reset"}
    deadline = time.monotonic() + 2
    while sample(client, "hlsrelay_proxy_failures_total", labels) != 1:
        assert time.monotonic() < deadline, "the cut was not counted against the proxy"
        await asyncio.sleep(0.02)


# -- when every proxy is down ------------------------------------------------------------------


async def test_all_down_fails_with_503_and_retry_after(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy]
) -> None:
    origin.media("/seg.ts", SEGMENT)
    for f in faults[:2]:
        f.mode = "refuse"
    client = await proxy_factory(
        proxies=proxies_conf(faults[0].url, faults[1].url, failure_threshold=1, cooldown=60)
    )
    path = mint(client, f"{origin.url}/seg.ts")
    for _ in range(2):
        # The first request tries both, ejects both, and finds none left for its third attempt.
        async with client.get(path) as response:
            assert response.status == 503
            assert int(response.headers["Retry-After"]) >= 50
            assert (await response.json())["error"]["code"] == "service_unavailable"
    assert [f.connections for f in faults[:2]] == [1, 1]
    assert origin.requests_to("/seg.ts") == []


async def test_all_down_can_go_direct(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy]
) -> None:
    origin.media("/seg.ts", SEGMENT)
    client = await proxy_factory(
        proxies=proxies_conf(
            f"http://127.0.0.1:{dead_port()}", failure_threshold=1, when_all_down="direct"
        )
    )
    path = mint(client, f"{origin.url}/seg.ts")
    await get(client, path)
    assert await get(client, path) == (200, SEGMENT)
    assert sample(client, "hlsrelay_proxy_pool_exhausted_total", {"outcome": "direct"}) >= 1


async def test_without_a_probe_an_ejected_proxy_returns_on_trial_after_its_cooldown(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy]
) -> None:
    origin.media("/seg.ts", SEGMENT)
    faults[0].mode = "refuse"
    client = await proxy_factory(
        proxies=proxies_conf(faults[0].url, failure_threshold=1, cooldown=0.2, max_cooldown=10)
    )
    path = mint(client, f"{origin.url}/seg.ts")
    assert (await get(client, path))[0] == 503  # tried, ejected, none left to retry through
    assert (await get(client, path))[0] == 503
    assert faults[0].connections == 1
    await asyncio.sleep(0.25)
    assert (await get(client, path))[0] == 503  # on trial: one failure ejects it again...
    assert faults[0].connections == 2
    faults[0].mode = "ok"
    await asyncio.sleep(0.25)
    assert (await get(client, path))[0] == 503  # ...for twice as long (0.4 s)
    assert faults[0].connections == 2
    await asyncio.sleep(0.2)
    assert await get(client, path) == (200, SEGMENT)


# -- routing rules -----------------------------------------------------------------------------


async def test_rules_route_hosts_direct_or_through_one_named_proxy(
    proxy_factory: ProxyFactory, origin: Origin, faults: list[FaultProxy]
) -> None:
    origin.media("/seg.ts", SEGMENT)
    port = origin_port(origin)
    client = await proxy_factory(
        proxies=proxies_conf(
            {"name": "a", "url": faults[0].url},
            {"name": "b", "url": faults[1].url},
            rules=[{"match": "localhost", "via": "direct"}, {"match": "127.0.0.*", "via": "b"}],
        )
    )
    assert await get(client, mint(client, f"http://localhost:{port}/seg.ts")) == (200, SEGMENT)
    assert counts(client) == {"a": 0, "b": 0}
    for _ in range(3):
        assert await get(client, mint(client, f"{origin.url}/seg.ts")) == (200, SEGMENT)
    assert counts(client) == {"a": 0, "b": 3}


# -- circuit breaker ---------------------------------------------------------------------------


async def test_breaker_fails_fast_then_lets_a_trial_through(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    origin.status("/seg.ts", 503)
    client = await proxy_factory(proxies={"breaker_failure_threshold": 2, "breaker_cooldown": 0.3})
    path = mint(client, f"{origin.url}/seg.ts")
    assert (await get(client, path))[0] == 502
    assert (await get(client, path))[0] == 502
    for _ in range(5):
        async with client.get(path) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
    assert len(origin.requests_to("/seg.ts")) == 2
    assert sample(client, "hlsrelay_upstream_breakers_open") == 1
    await asyncio.sleep(0.35)
    origin.media("/seg.ts", SEGMENT)
    assert await get(client, path) == (200, SEGMENT)
    assert sample(client, "hlsrelay_upstream_breakers_open") == 0
    assert sample(client, "hlsrelay_upstream_breaker_trips_total") == 1


# -- User-Agent rotation -----------------------------------------------------------------------


async def test_user_agent_rotation_is_sticky_per_stream_and_yields_to_the_stream(
    proxy_factory: ProxyFactory, origin: Origin
) -> None:
    origin.media("/a.ts", SEGMENT)
    origin.media("/b.ts", SEGMENT)
    agents = [f"Agent/{n}" for n in range(5)]
    client = await proxy_factory(proxies={"user_agents": agents})
    seen_per_stream = []
    for stream in range(8):
        profile = {"Referer": f"https://site.example/ua/{stream}"}
        first = mint(client, f"{origin.url}/a.ts", profile)
        await get(client, first)
        await get(client, same_stream(client, first, f"{origin.url}/b.ts", profile))
        seen_per_stream.append({r.headers["User-Agent"] for r in origin.seen[-2:]})
    assert all(len(s) == 1 and s <= set(agents) for s in seen_per_stream)
    assert len(set.union(*seen_per_stream)) > 1
    own = mint(client, f"{origin.url}/a.ts", {"User-Agent": "MyPlayer/1.0"})
    await get(client, own)
    assert origin.seen[-1].headers["User-Agent"] == "MyPlayer/1.0"


# -- SSRF through proxies ----------------------------------------------------------------------


async def test_forbidden_destinations_are_refused_before_the_proxy_sees_them(
    proxy_factory: ProxyFactory, origin: Origin, socks: RealProxy, tiny: RealProxy
) -> None:
    origin.media("/seg.ts", SEGMENT)
    port = origin_port(origin)
    for real in (socks, tiny):
        client = await proxy_factory(
            upstream={"allow_networks": []}, proxies=proxies_conf(real.url)
        )
        for url in (f"http://127.0.0.1:{port}/seg.ts", f"http://localhost:{port}/seg.ts"):
            async with client.get(mint(client, url)) as response:
                assert response.status == 403
                assert (await response.json())["error"]["code"] == "forbidden_destination"
        assert real.tunnels_to(port) == 0
    assert origin.seen == []


async def test_a_redirect_through_a_proxy_is_checked_again(
    proxy_factory: ProxyFactory, origin: Origin, tiny: RealProxy
) -> None:
    port = origin_port(origin)
    origin.redirect("/seg.ts", f"http://127.0.0.2:{port}/inside.ts")
    client = await proxy_factory(
        upstream={"allow_networks": ["127.0.0.1/32"]}, proxies=proxies_conf(tiny.url)
    )
    async with client.get(mint(client, f"{origin.url}/seg.ts")) as response:
        assert response.status == 403
    assert tiny.tunnels_to(port) == 1
    assert "127.0.0.2" not in tiny.log_text()


# -- credentials never leak --------------------------------------------------------------------

PASSWORD = "s3cr3t-Pa55w0rd"


async def test_credentials_work_and_never_leak(
    proxy_factory: ProxyFactory, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    origin.media("/seg.ts", SEGMENT)
    with microsocks("relay", PASSWORD) as socks, tinyproxy("relay", PASSWORD) as tiny:
        good = await proxy_factory(
            proxies=proxies_conf(
                {"name": "socks", "url": socks.url}, {"name": "tiny", "url": tiny.url}, sticky=False
            )
        )
        for _ in range(2):
            assert await get(good, mint(good, f"{origin.url}/seg.ts")) == (200, SEGMENT)
        assert counts(good) == {"socks": 1, "tiny": 1}
        assert socks.tunnels_to(origin_port(origin)) == 1
        assert tiny.tunnels_to(origin_port(origin)) == 1

        wrong = await proxy_factory(
            proxies=proxies_conf(
                socks.url.replace(PASSWORD, PASSWORD + "x"),
                tiny.url.replace(PASSWORD, PASSWORD + "x"),
                failure_threshold=1,
            )
        )
        path = mint(wrong, f"{origin.url}/seg.ts")
        bodies = []
        for _ in range(2):
            async with wrong.get(path) as response:
                assert response.status in (502, 503)
                bodies.append(await response.text())
        async with wrong.get("/metrics") as response:
            metrics_text = await response.text()
    assert 'reason="auth"' in metrics_text
    assert 'proxy="http-127.0.0.1-' in metrics_text
    for text in (*bodies, metrics_text, caplog.text):
        assert PASSWORD not in text
        assert "relay:" not in text

"""The pool's choices and health, the breaker and the router, on a fake clock (no sockets)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from proxy.__main__ import main
from proxy.errors import ServiceUnavailable
from proxy.metrics import Metrics
from proxy.settings import ConfigError, ProxiesSettings, load_settings, mask_proxy_url
from proxy.upstream.breaker import CircuitBreakers
from proxy.upstream.proxies import OutboundProxy, ProxyPool
from proxy.upstream.routing import Router


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(clock: Clock, n: int = 3, **settings: Any) -> ProxyPool:
    urls = [{"name": f"p{i}", "url": f"socks5://127.0.0.1:{1080 + i}"} for i in range(n)]
    conf = ProxiesSettings(urls=urls, **settings)  # type: ignore[arg-type]
    proxies = [OutboundProxy(f"p{i}") for i in range(n)]
    return ProxyPool(proxies, conf, Metrics(), clock=clock, rng=random.Random(7))


def test_round_robin_sticky_spreads_streams_and_keeps_each_on_its_proxy() -> None:
    p = pool(Clock())
    first = {key: p.choose(key) for key in ("a", "b", "c", "d", "e", "f")}
    assert Counter(proxy.name for proxy in first.values() if proxy) == {"p0": 2, "p1": 2, "p2": 2}
    for _ in range(5):
        for key, proxy in first.items():
            assert p.choose(key) is proxy


def test_a_stream_whose_proxy_fails_moves_and_stays() -> None:
    p = pool(Clock(), failure_threshold=1)
    original = p.choose("stream")
    assert original is not None
    p.failure(original, "reset")
    moved = p.choose("stream", frozenset({original.name}))
    assert moved is not None and moved is not original
    for _ in range(5):
        assert p.choose("stream") is moved


def test_least_connections_prefers_the_idlest() -> None:
    p = pool(Clock(), strategy="least_connections", sticky=False)
    busy = p.get("p0")
    assert busy is not None
    ends = [p.started(busy) for _ in range(3)]
    chosen = {p.choose(None).name for _ in range(6)}  # type: ignore[union-attr]
    assert chosen == {"p1", "p2"}
    for end in ends:
        end()
        end()  # idempotent
    assert busy.in_flight == 0


def test_ejection_cooldown_grows_and_is_capped() -> None:
    clock = Clock()
    p = pool(clock, n=1, failure_threshold=2, cooldown=10, max_cooldown=25)
    proxy = p.proxies[0]
    p.failure(proxy, "connect")
    assert proxy.up
    p.failure(proxy, "connect")
    assert not proxy.up and proxy.ejected_until == clock.now + 10
    assert p.choose("k") is None
    assert p.retry_after() == 10
    clock.now += 10
    assert p.choose("k") is proxy and proxy.on_trial  # no probe URL: back on trial
    p.failure(proxy, "connect")  # one failure on trial ejects again, twice as long
    assert proxy.ejected_until == clock.now + 20
    clock.now += 20
    assert p.choose("k") is proxy
    p.failure(proxy, "connect")
    assert proxy.ejected_until == clock.now + 25  # capped
    clock.now += 25
    assert p.choose("k") is proxy
    p.success(proxy, 0.01)
    assert proxy.ejections_in_row == 0 and not proxy.on_trial


async def test_with_a_probe_url_only_a_successful_probe_readmits() -> None:
    clock = Clock()
    p = pool(clock, n=1, failure_threshold=1, cooldown=5, probe_url="http://probe.example/")
    proxy = p.proxies[0]
    p.failure(proxy, "timeout")
    clock.now += 6
    assert p.choose(None) is None  # cooldown over, but no probe yet

    async def fails(_: OutboundProxy) -> bool:
        return False

    async def works(_: OutboundProxy) -> bool:
        return True

    await p.probe_round(fails)
    assert not proxy.up and proxy.ejected_until == clock.now + 10
    clock.now += 10
    await p.probe_round(works)
    assert proxy.up and p.choose(None) is proxy


def test_sticky_map_holds_no_stream_key() -> None:
    p = pool(Clock())
    p.choose("ctx-token-that-must-not-be-kept")
    assert all(isinstance(k, bytes) and b"ctx-token" not in k for k in p._sticky)


def test_breaker_opens_fails_fast_and_recovers() -> None:
    clock = Clock()
    metrics = Metrics()
    breakers = CircuitBreakers(3, 30, metrics, clock=clock)
    for _ in range(2):
        breakers.failure("h:80")
    breakers.check("h:80")
    breakers.failure("h:80")
    with pytest.raises(ServiceUnavailable) as caught:
        breakers.check("h:80")
    assert caught.value.retry_after == 30
    breakers.check("other:80")  # per host
    clock.now += 30
    assert breakers.check("h:80")  # the trial
    with pytest.raises(ServiceUnavailable):
        breakers.check("h:80")  # only one trial at a time
    breakers.failure("h:80")  # the trial failed: open again
    with pytest.raises(ServiceUnavailable):
        breakers.check("h:80")
    clock.now += 30
    breakers.check("h:80")
    breakers.success("h:80")
    breakers.check("h:80")
    assert metrics.registry.get_sample_value("hlsrelay_upstream_breakers_open") == 0
    assert metrics.registry.get_sample_value("hlsrelay_upstream_breaker_trips_total") == 2


def test_disabled_breaker_never_opens() -> None:
    breakers = CircuitBreakers(0, 30, Metrics())
    for _ in range(100):
        breakers.failure("h:80")
    breakers.check("h:80")


def test_router_first_matching_rule_wins() -> None:
    conf = ProxiesSettings(
        urls=["http://10.0.0.1:3128"],  # type: ignore[list-item]
        rules=[
            {"match": "*.direct.example", "via": "direct"},  # type: ignore[list-item]
            {"match": "cdn.example.com", "via": "http-10.0.0.1-3128"},  # type: ignore[list-item]
        ],
    )
    router = Router(conf)
    assert router.route("a.DIRECT.example").via == "direct"
    assert router.route("direct.example").via == "pool"  # the apex is not a subdomain
    assert router.route("CDN.example.com.").via == "http-10.0.0.1-3128"
    assert router.route("other.example").via == "pool"
    assert Router(ProxiesSettings()).route("anything").via == "direct"


# -- settings ----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hlsrelay.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('urls = ["ftp://u:hunter22@h:1"]', "proxies.urls.0"),
        ('urls = ["http://u:hunter22@h"]', "explicit port"),
        ('urls = [{name = "bad name", url = "http://h:1"}]', "proxies.urls.0.name"),
        ('urls = ["http://h:1", "http://h:1"]', "duplicate proxy name"),
        ('urls = ["http://h:1"]\nrules = [{match = "*", via = "nowhere"}]', "via 'nowhere'"),
        ('strategy = "fastest"', "proxies.strategy"),
        ("failure_threshold = 0", "proxies.failure_threshold"),
    ],
)
def test_bad_proxies_config_names_the_culprit_without_the_password(
    tmp_path: Path, text: str, named: str
) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        load_settings(write(tmp_path, f"[proxies]\n{text}\n"))
    assert "hunter22" not in str(caught.value)


def test_check_config_masks_proxy_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '[proxies]\nurls = ["socks5://alice:hunter22@10.0.0.1:1080",'
        ' {name = "eu", url = "http://bob:pa%40ss@proxy.example:3128"}, "http://10.0.0.2:8080"]\n',
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "hunter22" not in out and "alice" not in out and "bob" not in out and "pa%40ss" not in out
    )
    urls = json.loads(out)["proxies"]["urls"]
    assert urls == [
        {"name": "socks5-10.0.0.1-1080", "url": "socks5://****:****@10.0.0.1:1080"},
        {"name": "eu", "url": "http://****:****@proxy.example:3128"},
        {"name": "http-10.0.0.2-8080", "url": "http://10.0.0.2:8080"},
    ]


def test_masking_and_repr_hide_credentials() -> None:
    assert mask_proxy_url("socks5://u:p@[::1]:1080") == "socks5://****:****@[::1]:1080"
    conf = ProxiesSettings(urls=["http://u:hunter22@h:1"])  # type: ignore[list-item]
    assert "hunter22" not in repr(conf) and "hunter22" not in str(conf.model_dump())


def test_proxies_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "HLSRELAY_PROXIES__URLS",
        '["socks5://u:hunter22@10.0.0.1:1080", {"name": "b", "url": "http://10.0.0.2:3128"}]',
    )
    monkeypatch.setenv("HLSRELAY_PROXIES__STRATEGY", "least_connections")
    settings = load_settings(write(tmp_path, "[proxies]\nsticky = false\n"))
    assert [p.name for p in settings.proxies.urls] == ["socks5-10.0.0.1-1080", "b"]
    assert settings.proxies.strategy == "least_connections" and not settings.proxies.sticky

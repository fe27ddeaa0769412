"""Benchmark and acceptance figures of the outbound proxy pool.

* Acceptance: three proxies, one dead (a closed port), the other two real (tinyproxy as the HTTP
  proxy, microsocks as SOCKS5); 300 proxied segment requests, as 30 sticky streams of 10
  segments each, then as one non-sticky stream of 300. Figures: requests that succeeded, the
  dead proxy's failures before it was ejected, how the two live proxies shared the load, and
  whether each sticky stream stayed on one proxy throughout.
* Latency on loopback, full 256 KiB segment bodies fetched one after another: the origin
  directly, hlsrelay without proxies, and hlsrelay through the rotation layer to microsocks, to
  tinyproxy, and round robin over both (median and p99 per round; median and range over rounds).

The origin and hlsrelay run in this process on real loopback sockets, with the client in the same
event loop (uvloop when installed), so every path shares that cost and the differences are what
the proxy layer adds. Which proxy served a request is read from hlsrelay's own per-proxy counters
(requests are sequential, so each delta belongs to one request). Nothing here asserts a timing.
tinyproxy and microsocks run as their own processes, stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import create_app
from proxy.settings import Settings
from proxy.web.keys import METRICS, RELAY
from tests.fault_proxy import FaultProxy
from tests.outbound import dead_port, microsocks, tinyproxy

COMMAND = "python -m tests.bench.bench_proxies"
SECRET = "bench-secret-0123456789abcdef"
SEGMENT_BYTES = 256 * 1024
SEGMENTS_PER_STREAM = 10
STREAMS = 30
FAILURE_THRESHOLD = 3
LATENCY_REQUESTS = 300
LATENCY_WARMUP = 20
ROUNDS = 3


# -- running things ----------------------------------------------------------------------------


def _settings(proxies: dict[str, Any]) -> Settings:
    return Settings(
        server={"host": "127.0.0.1", "port": 0},  # type: ignore[arg-type]
        security={"secret": SECRET},  # type: ignore[arg-type]
        upstream={"allow_networks": ["127.0.0.0/8"]},  # type: ignore[arg-type]
        proxies=proxies,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def _serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _origin_app(segment: bytes) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=segment, content_type="video/mp2t")

    app = web.Application()
    app.router.add_get("/{stream}/{name}", handler)
    return app


@contextlib.asynccontextmanager
async def _relay(proxies: dict[str, Any]) -> AsyncIterator[tuple[web.Application, str]]:
    app = create_app(_settings(proxies))
    async with _serving(app) as url:
        yield app, url


def _counts(app: web.Application, names: Sequence[str]) -> dict[str, float]:
    registry = app[METRICS].registry
    return {
        name: registry.get_sample_value("hlsrelay_proxy_requests_total", {"proxy": name}) or 0.0
        for name in names
    }


def _sample(app: web.Application, metric: str, labels: dict[str, str]) -> float:
    return app[METRICS].registry.get_sample_value(metric, labels) or 0.0


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    async with session.get(url) as response:
        body = await response.read()
        return response.status, len(body)


# -- acceptance --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acceptance:
    scenario: str
    requests: int
    succeeded: int
    dead_failures: float
    dead_ejections: float
    load: dict[str, float]
    streams: int
    streams_on_one_proxy: int
    streams_moved: int

    @property
    def spread_pct(self) -> float:
        values = list(self.load.values())
        mean = statistics.mean(values)
        return max(abs(v - mean) for v in values) / mean * 100 if mean else 0.0


async def acceptance(sticky: bool) -> Acceptance:
    with tinyproxy() as tiny, microsocks() as socks:
        live = ["tinyproxy", "microsocks"]
        urls = [
            {"name": "tinyproxy", "url": tiny.url},
            {"name": "microsocks", "url": socks.url},
            {"name": "dead", "url": f"http://127.0.0.1:{dead_port()}"},
        ]
        conf = {
            "urls": urls,
            "strategy": "round_robin",
            "sticky": sticky,
            "failure_threshold": FAILURE_THRESHOLD,
            "retry_backoff": 0.01,
        }
        segment = os.urandom(SEGMENT_BYTES)
        async with (
            _serving(_origin_app(segment)) as origin,
            _relay(conf) as (app, base),
            aiohttp.ClientSession() as session,
        ):
            streams = STREAMS if sticky else 1
            per_stream = SEGMENTS_PER_STREAM if sticky else STREAMS * SEGMENTS_PER_STREAM
            succeeded = on_one = moved = 0
            for stream in range(streams):
                profile = {"Referer": f"https://site.example/watch/{stream}"}
                used: set[str] = set()
                tried_dead = False
                for n in range(per_stream):
                    path = app[RELAY].mint(f"{origin}/stream{stream}/seg{n}.ts", profile)
                    before = _counts(app, [*live, "dead"])
                    status, size = await _get(session, base + path)
                    after = _counts(app, [*live, "dead"])
                    if status == 200 and size == SEGMENT_BYTES:
                        succeeded += 1
                    used |= {name for name in live if after[name] != before[name]}
                    tried_dead |= after["dead"] != before["dead"]
                on_one += len(used) == 1
                moved += tried_dead
            return Acceptance(
                scenario=f"round_robin, sticky = {str(sticky).lower()}",
                requests=streams * per_stream,
                succeeded=succeeded,
                dead_failures=sum(
                    _sample(app, "hlsrelay_proxy_failures_total", {"proxy": "dead", "reason": r})
                    for r in ("connect", "reset", "timeout", "refused", "auth")
                ),
                dead_ejections=_sample(app, "hlsrelay_proxy_ejections_total", {"proxy": "dead"}),
                load=_counts(app, live),
                streams=streams,
                streams_on_one_proxy=on_one,
                streams_moved=moved,
            )


# -- latency -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def show(self) -> str:
        return f"{self.median:.2f} ms ({self.low:.2f} to {self.high:.2f})"


@dataclass(frozen=True)
class Latency:
    path: str
    median_ms: Spread
    p99_ms: Spread


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def _timed(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        status, size = await _get(session, url)
        times.append((time.perf_counter() - started) * 1000)
        if status != 200 or size != SEGMENT_BYTES:
            raise RuntimeError(f"bench request failed: {status}, {size} bytes")
    return times


async def latency(rounds: int = ROUNDS) -> list[Latency]:
    segment = os.urandom(SEGMENT_BYTES)
    samples: dict[str, tuple[list[float], list[float]]] = {}
    control = await FaultProxy().start()
    try:
        with tinyproxy() as tiny, microsocks() as socks:
            await _latency_rounds(rounds, segment, samples, tiny.url, socks.url, control.url)
    finally:
        await control.stop()
    return [
        Latency(name, Spread.of(medians), Spread.of(p99s))
        for name, (medians, p99s) in samples.items()
    ]


async def _latency_rounds(
    rounds: int,
    segment: bytes,
    samples: dict[str, tuple[list[float], list[float]]],
    tiny: str,
    socks: str,
    control: str,
) -> None:
    """Every path served at once; requests interleaved path by path, so noise from the shared
    machine falls on every path alike."""
    paths: list[tuple[str, dict[str, Any] | None]] = [
        ("origin, no hlsrelay", None),
        ("hlsrelay, direct (no proxies)", {}),
        ("hlsrelay → microsocks (SOCKS5)", {"urls": [socks]}),
        ("hlsrelay → tinyproxy (HTTP CONNECT)", {"urls": [tiny]}),
        (
            "hlsrelay → round robin over both, per request",
            {"urls": [socks, tiny], "sticky": False},
        ),
        ("hlsrelay → asyncio CONNECT proxy (TCP_NODELAY; control)", {"urls": [control]}),
    ]
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(_serving(_origin_app(segment)))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        urls: dict[str, str] = {}
        for name, conf in paths:
            if conf is None:
                urls[name] = f"{origin}/s/seg.ts"
            else:
                app, base = await stack.enter_async_context(_relay(conf))
                urls[name] = base + app[RELAY].mint(f"{origin}/s/seg.ts", {})
        for url in urls.values():
            await _timed(session, url, LATENCY_WARMUP)
        for _round in range(rounds):
            times: dict[str, list[float]] = {name: [] for name in urls}
            for _ in range(LATENCY_REQUESTS):
                for name, url in urls.items():
                    times[name] += await _timed(session, url, 1)
            for name, values in times.items():
                medians, p99s = samples.setdefault(name, ([], []))
                medians.append(statistics.median(values))
                p99s.append(_p99(values))


# -- report ------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = []
    for name in ("aiohttp", "uvloop", "python-socks"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return {
        "cpus": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "cpu model": cpu_model,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(versions),
    }


def render(accepted: list[Acceptance], latencies: list[Latency]) -> str:
    lines = [
        "## Outbound proxy pool",
        "",
        f"Three proxies (tinyproxy, microsocks, one dead port), `failure_threshold = "
        f"{FAILURE_THRESHOLD}`, {SEGMENT_BYTES // 1024} KiB segments on loopback.",
        "",
        "| scenario | requests OK | dead proxy: failures before ejection, ejections "
        "| load tinyproxy / microsocks | spread from even | streams on one proxy (moved off "
        "the dead one) |",
        "|---|---|---|---|---|---|",
    ]
    for a in accepted:
        load = " / ".join(f"{v:.0f}" for v in a.load.values())
        lines.append(
            f"| {a.scenario} | {a.succeeded}/{a.requests} | {a.dead_failures:.0f}, "
            f"{a.dead_ejections:.0f} | {load} | ±{a.spread_pct:.1f}% | "
            f"{a.streams_on_one_proxy}/{a.streams} ({a.streams_moved}) |"
        )
    base = next(x for x in latencies if x.path.startswith("hlsrelay, direct"))
    lines += [
        "",
        f"Latency of one {SEGMENT_BYTES // 1024} KiB segment, request to last byte, "
        f"{LATENCY_REQUESTS} sequential requests per path and round, the paths interleaved "
        f"request by request, after {LATENCY_WARMUP} warm-up (keep-alive), {ROUNDS} rounds: "
        "median of the rounds (range).",
        "",
        "| path | median | p99 | added median vs hlsrelay direct |",
        "|---|---|---|---|",
    ]
    for x in latencies:
        added = x.median_ms.median - base.median_ms.median
        shown = "—" if x is base or x.path.startswith("origin") else f"{added:+.2f} ms"
        lines.append(f"| {x.path} | {x.median_ms.show()} | {x.p99_ms.show()} | {shown} |")
    lines += ["", f"Command: `{COMMAND}`", ""]
    lines += [f"- {key}: {value}" for key, value in machine().items()]
    return "\n".join(lines) + "\n"


async def _main() -> str:
    accepted = [await acceptance(sticky=True), await acceptance(sticky=False)]
    return render(accepted, await latency())


def _runner() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run() -> str:
    """Run the benchmark; the Markdown report."""
    with asyncio.Runner(loop_factory=_runner()) as runner:
        return runner.run(_main())


if __name__ == "__main__":
    sys.stdout.write(run())

"""Benchmark of observability and scale-out: what metrics cost on the request path, and how
long a live channel takes to resume on another instance when its owner dies.

**Metrics overhead, one core.** Two ``python -m proxy serve`` processes, both pinned to CPU 0
(``taskset``), the shipped config plus env overrides: one as shipped, one started through a
launcher that switches metrics off by monkeypatching (prometheus-client's ``inc``, ``dec``,
``set``, ``observe`` become no-ops and ``labels()`` returns the metric itself, so no label
lookup happens; the metrics middleware is replaced by one that only keeps the request's log
facts). Nothing in the shipped code changes for the measurement, so no ``server.metrics``
switch exists. ``wrk`` (pinned to CPU 1) drives each in turn, rounds alternating, on:

* ``/healthz``: the smallest answer, where the fixed cost per request shows most;
* a cached segment (``/s/...``, 18.8 KB, served from the memory store after the first fetch):
  token decoding, the cache, the relayed-bytes counter, the access log;
* an uncached segment: ``cache.memory_bytes = 0``, each request goes to the origin (nginx
  serving a static file, pinned to CPU 1): upstream counters, TTFB histogram, bytes in.

Access logs are on (text, to a temp file) in both: they are logging, not metrics.

**Live failover.** Two instances sharing a redis-server play one TS channel; the owner is
SIGKILLed; the survivor is asked every 50 ms until its playlist lists a segment. Reported:
the time until it takes the lease (no more 503) and until the channel plays again (up to 3
rounds, with the default ``live.lease_ttl``).

Every process is stopped by its PID. Nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.hls.kinds import UriKind
from proxy.live.process import find_ffmpeg
from proxy.tokens import TokenCodec
from tests.bench.bench_core import (
    BENCH_SECRET,
    REPO,
    SHIPPED_CONFIG,
    Spread,
    Started,
    _free_port,
    _proc_cpu_seconds,
    _wait_ready,
    machine,
    started,
)
from tests.cluster import ffmpeg_children, instance, reap_ffmpegs
from tests.live_origin import REFERER, TsOrigin
from tests.services import redis_server

WRK_SECONDS = 4
WRK_CONNECTIONS = 32
SEGMENT_BYTES = 188 * 100

# Started as `python -c NO_METRICS serve --config ...`: the same server, metrics switched off.
NO_METRICS = """
import sys
from aiohttp import web
import prometheus_client.metrics as m
from proxy import request_log
from proxy.web.keys import REQUEST_FACTS

def _nothing(self, *args, **kwargs):
    return None

def _itself(self, *args, **kwargs):
    return self

for cls in (m.Counter, m.Gauge, m.Histogram):
    for name in ("inc", "dec", "set", "observe"):
        if hasattr(cls, name):
            setattr(cls, name, _nothing)
m.MetricWrapperBase.labels = _itself

@web.middleware
async def facts_only(request, handler):
    request_id = request_log.request_id_from(request.headers.get("X-Request-Id"))
    facts = request_log.RequestFacts(request_id)
    request[REQUEST_FACTS] = facts
    token = request_log.begin(facts)
    try:
        return await handler(request)
    finally:
        request_log.end(token)

import proxy.app
proxy.app.metrics_middleware = facts_only
from proxy.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _pinned(cpu: int, args: list[str]) -> list[str]:
    if shutil.which("taskset") and len(os.sched_getaffinity(0)) > cpu:
        return ["taskset", "-c", str(cpu), *args]
    return args


def _wrk(url: str) -> tuple[float, int, int]:
    """Requests/s, non-2xx count and requests done of one wrk run pinned to CPU 1."""
    out = subprocess.run(
        _pinned(1, ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{WRK_SECONDS}s", url]),
        capture_output=True, text=True, timeout=WRK_SECONDS + 30, check=True,
    ).stdout  # fmt: skip
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    done = re.search(r"(\d+) requests in", out)
    if rate is None or done is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    return float(rate.group(1)), int(errors.group(1)) if errors else 0, int(done.group(1))


@contextlib.contextmanager
def static_origin() -> Iterator[str]:
    """nginx serving one segment file on a loopback port, pinned to CPU 1."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="hlsrelay-bench-origin-") as tmp:
        root = Path(tmp)
        (root / "tmp").mkdir()
        (root / "www").mkdir()
        (root / "www" / "seg.ts").write_bytes(b"\x47" * SEGMENT_BYTES)
        (root / "nginx.conf").write_text(
            "worker_processes 1; pid nginx.pid; error_log error.log warn;\n"
            "events { worker_connections 1024; }\n"
            "http { access_log off; client_body_temp_path tmp; proxy_temp_path tmp;\n"
            "  fastcgi_temp_path tmp; uwsgi_temp_path tmp; scgi_temp_path tmp;\n"
            "  keepalive_requests 1000000;\n"
            f"  server {{ listen 127.0.0.1:{port}; root {root / 'www'};\n"
            "    location = /healthz { return 200 ok; } } }\n"
        )
        directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        args = [nginx, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", "error.log"]
        with started("origin", _pinned(1, [*args, "-g", directives]), dict(os.environ)) as proc:
            _wait_ready(proc, f"http://127.0.0.1:{port}/healthz")
            yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def relay(metrics: bool, **env: str) -> Iterator[tuple[str, int]]:
    port = _free_port()
    environ = {
        **os.environ,
        "HLSRELAY_SERVER__HOST": "127.0.0.1",
        "HLSRELAY_SERVER__PORT": str(port),
        "HLSRELAY_SECURITY__SECRET": BENCH_SECRET,
        "HLSRELAY_UPSTREAM__ALLOW_NETWORKS": '["127.0.0.0/8"]',
        "PYTHONPATH": str(REPO),
        **env,
    }
    environ.pop("HLSRELAY_CONFIG", None)
    launcher = ["-m", "proxy"] if metrics else ["-c", NO_METRICS]
    args = _pinned(0, [sys.executable, *launcher, "serve", "--config", str(SHIPPED_CONFIG)])
    name = "hlsrelay" if metrics else "hlsrelay-without-metrics"
    # stdout (access log lines) goes to a temp file that `started` keeps; logging is the same
    # in both variants.
    with started(name, args, environ) as proc:
        _wait_ready(proc, f"http://127.0.0.1:{port}/readyz")
        yield f"http://127.0.0.1:{port}", proc.proc.pid


def segment_path(origin: str) -> str:
    codec = TokenCodec(BENCH_SECRET.encode())
    url = f"{origin}/seg.ts"
    ctx = codec.mint_context(url, {})
    return f"/s/{ctx}/" + codec.child_path(ctx, codec.open_context(ctx), url, UriKind.MEDIA)


@dataclass(frozen=True)
class OverheadFigure:
    workload: str
    with_metrics: Spread
    without_metrics: Spread
    cpu_with_us: Spread
    cpu_without_us: Spread
    errors: int

    @property
    def overhead(self) -> float:
        """Extra CPU time per request that metrics cost (the throughput figures on a shared
        machine move with other processes' load far more than this)."""
        return self.cpu_with_us.median / self.cpu_without_us.median - 1


def measure_overhead(rounds: int) -> list[OverheadFigure]:
    figures = []
    with static_origin() as origin:
        path = segment_path(origin)
        store_off = {"HLSRELAY_CACHE__MEMORY_BYTES": "0"}
        workloads = [
            ("/healthz", "/healthz", {}),
            ("cached segment (18.8 KB, memory store)", path, {}),
            ("uncached segment (18.8 KB from the origin)", path, store_off),
        ]
        for label, target, env in workloads:
            rates: dict[bool, list[float]] = {True: [], False: []}
            cpu_us: dict[bool, list[float]] = {True: [], False: []}
            errors = 0
            with relay(True, **env) as on, relay(False, **env) as off:
                for base, _pid in (on, off):
                    _wrk(base + target)  # warm-up (and the cache filled): not recorded
                for _ in range(rounds):
                    for metrics, (base, pid) in ((True, on), (False, off)):
                        before = _proc_cpu_seconds(pid)
                        rate, failed, done = _wrk(base + target)
                        cpu = _proc_cpu_seconds(pid) - before
                        rates[metrics].append(rate)
                        cpu_us[metrics].append(cpu / max(1, done) * 1e6)
                        errors += failed
            figures.append(
                OverheadFigure(
                    label,
                    Spread.of(rates[True]),
                    Spread.of(rates[False]),
                    Spread.of(cpu_us[True]),
                    Spread.of(cpu_us[False]),
                    errors,
                )
            )
    return figures


@dataclass(frozen=True)
class UpdateCost:
    what: str
    microseconds: Spread


def measure_update_costs(rounds: int) -> list[UpdateCost]:
    """In-process cost of the metric updates one request makes (timeit; immune to the load of
    other processes that blurs the req/s figures on a shared machine)."""
    import timeit

    from proxy.metrics import Metrics

    m = Metrics()
    stats = m.http
    # The children the upstream client and the stream handler keep per resource kind.
    sent, ttfb, received = (
        m.upstream_requests.labels("media"),
        m.upstream_ttfb.labels("media"),
        m.upstream_bytes.labels("media"),
    )
    relayed = m.relayed

    def middleware() -> None:
        stats.in_flight += 1
        stats.in_flight -= 1
        stats.done("stream", 200, 0.0123)

    def upstream_request() -> None:
        sent.inc()
        ttfb.observe(0.004)
        received.inc(SEGMENT_BYTES)
        relayed("media").inc(SEGMENT_BYTES)

    def cached_answer() -> None:
        m.cache_result("hit").inc()
        relayed("media").inc(SEGMENT_BYTES)

    loops = 100_000
    costs = []
    for what, fn in (
        ("every request (middleware: in-flight, counter, histogram)", middleware),
        ("plus an answer from the cache (cache result, bytes out)", cached_answer),
        ("plus an upstream fetch (counter, TTFB histogram, bytes in and out)", upstream_request),
    ):
        samples = [timeit.timeit(fn, number=loops) / loops * 1e6 for _ in range(rounds)]
        costs.append(UpdateCost(what, Spread.of(samples)))
    return costs


# -- live channel failover ------------------------------------------------------------------


@dataclass(frozen=True)
class FailoverRound:
    lease_ttl: float
    accepted_s: float
    """From SIGKILL of the owner to the survivor accepting the channel (its lease taken)."""
    resumed_s: float
    """From SIGKILL to the survivor's playlist listing a segment again."""


async def _failover_round(lease_ttl: float, segment_seconds: float) -> FailoverRound:
    origin = TsOrigin(find_ffmpeg("auto"))
    server = TestServer(origin.app(), host="127.0.0.1")
    await server.start_server()
    loop = asyncio.get_running_loop()
    try:
        origin.url = str(server.make_url("")).rstrip("/")
        with redis_server() as redis, tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "hlsrelay.toml"
            config.write_text(
                f"""
[security]
secret = "{BENCH_SECRET}"
[upstream]
allow_networks = ["127.0.0.0/8"]
[cache]
backend = "redis"
redis_url = "{redis.url}"
[live]
segment_seconds = {segment_seconds}
lease_ttl = {lease_ttl}
[[channels]]
id = "tv"
url = "{origin.url}/live/stream.ts"
headers = {{ Referer = "{REFERER}" }}
"""
            )
            async with (
                instance("owner", config, Path(tmp)) as owner,
                instance("survivor", config, Path(tmp)) as survivor,
                aiohttp.ClientSession() as session,
            ):
                path = "/live/tv/index.m3u8"
                async with session.get(owner.url + path) as resp:
                    assert resp.status == 200, await resp.text()
                await asyncio.sleep(2 * segment_seconds)  # playing, lease renewed
                orphans = set(ffmpeg_children(owner.pid))
                owner.proc.kill()
                killed = loop.time()
                accepted = None
                for _ in range(int((lease_ttl + 30) / 0.05)):
                    sent = loop.time()
                    async with session.get(survivor.url + path) as resp:
                        body = await resp.read()
                        if resp.status != 503 and accepted is None:
                            # This request took the lease, then waited for the first segment.
                            accepted = sent - killed
                        if resp.status == 200 and b"#EXTINF" in body:
                            resumed = loop.time() - killed
                            break
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError("the channel did not resume on the survivor")
                await owner.proc.wait()
                await reap_ffmpegs(orphans)
    finally:
        await server.close()
    return FailoverRound(lease_ttl, accepted if accepted is not None else resumed, resumed)


def measure_failover(rounds: int, lease_ttl: float = 10.0) -> list[FailoverRound]:
    return [asyncio.run(_failover_round(lease_ttl, 2.0)) for _ in range(rounds)]


def render(
    overhead: list[OverheadFigure],
    costs: list[UpdateCost],
    failover: list[FailoverRound],
    rounds: int,
    command: str,
) -> str:
    lines = [
        "## Observability",
        "",
        f"`{command}` ({rounds} rounds; hlsrelay pinned to CPU 0, wrk and the origin to CPU 1; "
        f"wrk -t1 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s)",
        "",
        "### Metrics overhead on the request path (requests/s on one core)",
        "",
        "| workload | req/s with metrics | req/s without | CPU/request with | CPU/request "
        "without | overhead (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for f in overhead:
        lines.append(
            f"| {f.workload} | {f.with_metrics.show('', 0)} | {f.without_metrics.show('', 0)} | "
            f"{f.cpu_with_us.show('µs', 0)} | {f.cpu_without_us.show('µs', 0)} | "
            f"{f.overhead * 100:+.1f} % |"
        )
    lines += [
        "",
        "Without metrics = prometheus-client's updates made no-ops and the metrics middleware "
        "removed, by monkeypatching at start (see the module docstring). CPU/request = the "
        "server process's user+system CPU time over a run (from /proc) divided by the requests "
        "wrk completed: on a machine shared with other work, req/s moves with their load, CPU "
        "per request much less. Non-2xx responses in all runs: "
        f"{sum(f.errors for f in overhead)}.",
        "",
        "### Metric updates per request, in-process (timeit, 100 000 loops a round)",
        "",
        "| updates | cost |",
        "|---|---|",
        *(f"| {c.what} | {c.microseconds.show('µs', 2)} |" for c in costs),
        "",
        "### A live channel resumes on the surviving instance after its owner is killed",
        "",
        "Two `python -m proxy serve` processes sharing a redis-server, one TS channel (a real "
        "ffmpeg TS origin, `live.segment_seconds = 2`, the default `live.lease_ttl`); the owner "
        "is SIGKILLed while the channel plays; the survivor is asked for the playlist every 50 ms.",
        "",
        "| lease TTL | until the survivor takes the lease | until its playlist lists a segment |",
        "|---|---|---|",
        *(
            f"| {failover[0].lease_ttl:g} s | "
            f"{Spread.of([f.accepted_s for f in failover]).show('s', 1)} | "
            f"{Spread.of([f.resumed_s for f in failover]).show('s', 1)} |"
            for _ in (1,)
            if failover
        ),
        "",
        "Machine: " + "; ".join(f"{name}: {value}" for name, value in machine().items()),
        "",
    ]
    return "\n".join(lines)


def run(rounds: int = 5) -> str:
    command = "python -m tests.bench.bench_observability" + (
        f" --rounds {rounds}" if rounds != 5 else ""
    )
    return render(
        measure_overhead(rounds),
        measure_update_costs(rounds),
        measure_failover(max(1, min(rounds, 3))),
        rounds,
        command,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_observability")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(run(args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["Started", "run"]

"""Every Prometheus collector, in one place, on a registry of the app's own.

Names follow Prometheus conventions (prefix ``hlsrelay_``, units in names, ``_total`` counters).
Label values are bounded: route names, status classes, reasons from a fixed set. Never a URL,
a token, a host name typed by a user, or a credential.
"""

from __future__ import annotations

import asyncio
import platform
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Event-loop lag: 1 ms (timer granularity) to seconds, finer around 50 ms, the stall that
# hlsrelay must never reach (issue 7); a sample above it lands in a bucket that says by how much.
LOOP_LAG_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# How often the sampler wakes: 100 wake-ups a second cost about 0.1 % of a core, and a stall of
# S seconds shows as a lag between S - LOOP_LAG_INTERVAL_S and S.
LOOP_LAG_INTERVAL_S = 0.01


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def build_labels(version: str) -> dict[str, str]:
    """The labels of ``hlsrelay_build_info``: what runs, to tell instances apart in a rollout."""
    return {"version": version, "python": platform.python_version()}


class RequestStats(Collector):
    """Per-request metrics kept in plain numbers and exported at scrape time.

    Every request updates them, so they skip prometheus-client's per-value locks and label
    validation (3.9 µs a request with labelled Counter and Histogram children, 2.1 µs with
    the children cached, well under 1 µs here). Safe without locks because requests are
    answered and ``/metrics`` is collected on the one event-loop thread.
    """

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._bounds = buckets
        self._counts: dict[tuple[str, int], int] = {}
        # route -> per-bucket counts (not cumulative; the last one is +Inf), then sum
        self._durations: dict[str, list[float]] = {}
        self.in_flight = 0

    def done(self, route: str, status: int, seconds: float) -> None:
        key = (route, status // 100)
        self._counts[key] = self._counts.get(key, 0) + 1
        slots = self._durations.get(route)
        if slots is None:
            slots = self._durations[route] = [0.0] * (len(self._bounds) + 2)
        slots[bisect_left(self._bounds, seconds)] += 1
        slots[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "hlsrelay_http_requests",
            "HTTP requests answered, by route and status class",
            labels=["route", "status_class"],
        )
        for (route, klass), count in sorted(self._counts.items()):
            requests.add_metric([route, f"{klass}xx"], count)
        yield requests
        durations = HistogramMetricFamily(
            "hlsrelay_http_request_duration_seconds",
            "Time from request to the end of the response, by route",
            labels=["route"],
        )
        edges = [*(floatToGoString(b) for b in self._bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for route, slots in sorted(self._durations.items()):
            cumulative: list[tuple[str, float]] = []
            running = 0.0
            for edge, hits in zip(edges, slots[:-1], strict=True):
                running += hits
                cumulative.append((edge, running))
            durations.add_metric([route], cumulative, slots[-1])
        yield durations
        yield GaugeMetricFamily(
            "hlsrelay_http_requests_in_flight", "HTTP requests being answered", self.in_flight
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class CountOf:
    """One labelled value of a :class:`LoopCounter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class LoopCounter(Collector):
    """A counter with one label, kept in plain numbers like :class:`RequestStats`.

    For the counters every request touches: a prometheus-client ``Counter`` child takes a lock
    on each ``inc`` (~0.35 µs; a cached playlist hit made two of them, with ~10 µs of Python in
    all). Only for values changed on the event loop's thread, as ``/metrics`` is collected there.
    """

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._children: dict[str, CountOf] = {}

    def labels(self, value: str) -> CountOf:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = CountOf()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, child in sorted(self._children.items()):
            family.add_metric([value], child.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


async def sample_loop_lag(lag: Histogram, interval: float = LOOP_LAG_INTERVAL_S) -> None:
    """Sleep ``interval`` over and over and observe how late each wake-up comes, until cancelled.

    Every callback of the loop runs on one thread: while one of them runs long (a blocking call,
    a big synchronous step, a garbage collection), every request waits. The lateness of this
    timer is that wait, as the requests saw it.
    """
    clock = time.perf_counter
    while True:
        due = clock() + interval
        await asyncio.sleep(interval)
        # uvloop's timers have a millisecond grain: a wake-up can come a hair early.
        lag.observe(max(0.0, clock() - due))


@dataclass
class Metrics:
    """The collectors of one app instance."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        # No *_created series: a timestamp per labelled child doubles the series count and no
        # dashboard or rule here reads it. (A process-wide switch of prometheus-client.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        # process_* (CPU, memory, open files) and python_info: the usual companions of a
        # service's own metrics, computed at scrape time only.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Info(
            "hlsrelay_build", "Version of the running hlsrelay (always 1)", registry=r
        )
        # Fed by sample_loop_lag (started with the app); no labels: one loop per process.
        self.loop_lag = Histogram(
            "hlsrelay_event_loop_lag_seconds",
            f"How late the event loop ran a timer due every {LOOP_LAG_INTERVAL_S * 1000:g} ms "
            "(a stall of every request in flight)",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        # hlsrelay_http_requests_total, _request_duration_seconds, _requests_in_flight.
        self.http = RequestStats(LATENCY_BUCKETS)
        r.register(self.http)
        self.upstream_requests = Counter(
            "hlsrelay_upstream_requests_total",
            "Requests sent to upstreams (each redirect hop counts), by resource kind",
            ["kind"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "hlsrelay_upstream_errors_total",
            "Upstream requests that failed, by reason (an error code of proxy.errors)",
            ["reason"],
            registry=r,
        )
        self.upstream_ttfb = Histogram(
            "hlsrelay_upstream_ttfb_seconds",
            "Time from sending an upstream request to its response headers",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_receiving = Gauge(
            "hlsrelay_upstream_bodies_receiving",
            "Upstream bodies being received and relayed (they share upstream.receive_budget_bytes)",
            registry=r,
        )
        self.upstream_bytes = Counter(
            "hlsrelay_upstream_received_bytes_total",
            "Body bytes received from upstreams (after decompression), by resource kind",
            ["kind"],
            registry=r,
        )
        self.bytes_out = LoopCounter(
            "hlsrelay_relayed_bytes", "Body bytes sent to viewers, by resource kind", "kind"
        )
        r.register(self.bytes_out)
        # Outbound proxies: labelled by the proxy's configured name (bounded, never its URL).
        self.proxy_requests = Counter(
            "hlsrelay_proxy_requests_total",
            "Upstream requests sent through an outbound proxy, by proxy name",
            ["proxy"],
            registry=r,
        )
        self.proxy_failures = Counter(
            "hlsrelay_proxy_failures_total",
            "Upstream requests through a proxy that failed before the headers, by proxy and reason",
            ["proxy", "reason"],
            registry=r,
        )
        self.proxy_ejections = Counter(
            "hlsrelay_proxy_ejections_total",
            "Times a proxy was taken out of the pool after failures in a row",
            ["proxy"],
            registry=r,
        )
        self.proxy_up = Gauge(
            "hlsrelay_proxy_up",
            "1 while a proxy is in the pool, 0 while it is ejected",
            ["proxy"],
            registry=r,
        )
        self.proxy_latency = Histogram(
            "hlsrelay_proxy_latency_seconds",
            "Time from sending a request through a proxy to the upstream's response headers",
            ["proxy"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.proxy_retries = Counter(
            "hlsrelay_proxy_retries_total",
            "Upstream requests retried through another proxy after a failure before any byte",
            registry=r,
        )
        self.proxy_fallbacks = Counter(
            "hlsrelay_proxy_pool_exhausted_total",
            "Requests that found no proxy available, by what happened (direct or fail)",
            ["outcome"],
            registry=r,
        )
        self.breakers_open = Gauge(
            "hlsrelay_upstream_breakers_open",
            "Upstream hosts whose circuit breaker is open (failing fast)",
            registry=r,
        )
        self.breaker_trips = Counter(
            "hlsrelay_upstream_breaker_trips_total",
            "Times an upstream host's circuit breaker opened",
            registry=r,
        )
        self.breaker_rejections = Counter(
            "hlsrelay_upstream_breaker_rejections_total",
            "Upstream requests refused at once because the host's circuit was open",
            registry=r,
        )
        self.playlists_rewritten = Counter(
            "hlsrelay_playlists_rewritten_total", "Playlists rewritten", registry=r
        )
        self.cache_requests = LoopCounter(
            "hlsrelay_cache_requests",
            "Cacheable requests by outcome: hit (fresh entry), miss (fetched upstream), stale "
            "(last good playlist served while the upstream fails), coalesced (joined a fetch "
            "already in flight)",
            "result",
        )
        r.register(self.cache_requests)
        self.cache_bytes = Gauge(
            "hlsrelay_cache_bytes", "Bytes held by the in-memory cache store", registry=r
        )
        self.cache_entries = Gauge(
            "hlsrelay_cache_entries", "Entries held by the in-memory cache store", registry=r
        )
        self.cache_inflight = Gauge(
            "hlsrelay_cache_inflight_bodies",
            "Upstream media bodies being fetched and shared with their readers",
            registry=r,
        )
        self.cache_errors = Counter(
            "hlsrelay_cache_errors_total",
            "Cache store operations that failed (and counted as misses), by operation",
            ["operation"],
            registry=r,
        )
        self.cache_prefetches = Counter(
            "hlsrelay_cache_prefetches_total",
            "Segments fetched ahead on a live playlist refresh",
            registry=r,
        )
        # Live channels. The channel label is a [[channels]] id from the config, or "other"
        # for channels imported from lists (thousands of ids would explode the series count).
        self.live_sessions = Gauge(
            "hlsrelay_live_sessions", "Live sessions running (one upstream reader each)", registry=r
        )
        self.live_viewers = Gauge(
            "hlsrelay_live_viewers",
            "Viewers of live channels (HLS viewers seen in the last two target durations, "
            "plus connected raw-TS viewers)",
            ["channel"],
            registry=r,
        )
        self.live_ffmpeg_processes = Gauge(
            "hlsrelay_live_ffmpeg_processes",
            "ffmpeg processes running (segmenters and test-pattern sources)",
            registry=r,
        )
        self.live_ffmpeg_restarts = Counter(
            "hlsrelay_live_ffmpeg_restarts_total",
            "ffmpeg segmenter restarts (exit, stall or source switch)",
            ["channel"],
            registry=r,
        )
        self.live_segment_age = Gauge(
            "hlsrelay_live_segment_age_seconds",
            "Seconds since the newest segment of a live session was cut",
            ["channel"],
            registry=r,
        )
        self.live_source_reconnects = Counter(
            "hlsrelay_live_source_reconnects_total",
            "Reconnections of live sources to their upstream (after a drop or a failure)",
            ["channel"],
            registry=r,
        )
        self.live_lease_refusals = Counter(
            "hlsrelay_live_lease_refusals_total",
            "Live requests answered 503 because another instance holds the channel's lease",
            ["channel"],
            registry=r,
        )
        self.live_leases_lost = Counter(
            "hlsrelay_live_leases_lost_total",
            "Live sessions stopped because their lease was lost (taken over, or not renewable "
            "for a whole lease_ttl)",
            ["channel"],
            registry=r,
        )
        self.live_viewers_dropped = Counter(
            "hlsrelay_live_viewers_dropped_total",
            "Raw-TS viewers dropped for falling behind",
            ["channel"],
            registry=r,
        )

    def relayed(self, kind: str) -> CountOf:
        """``hlsrelay_relayed_bytes_total{kind}``: body bytes sent to viewers."""
        return self.bytes_out.labels(kind)

    def cache_result(self, result: str) -> CountOf:
        """``hlsrelay_cache_requests_total{result}``."""
        return self.cache_requests.labels(result)

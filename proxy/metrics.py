"""Every Prometheus collector, in one place, on a registry of the app's own.

Names follow Prometheus conventions (prefix ``hlsrelay_``, units in names, ``_total`` counters).
Label values are bounded: route names, status classes, reasons from a fixed set. Never a URL,
a token, a host name typed by a user, or a credential.
"""

from __future__ import annotations

import platform
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

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def build_labels(version: str) -> dict[str, str]:
    """The labels of ``hlsrelay_build_info``: what runs, to tell instances apart in a rollout."""
    return {"version": version, "python": platform.python_version()}


@dataclass
class Metrics:
    """The collectors of one app instance."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        # Labelled children of the per-request metrics, by (route, status // 100): labels()
        # takes a lock and validates its values, twice per request otherwise. Bounded: route
        # names times five status classes.
        self._http_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
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
        self.requests = Counter(
            "hlsrelay_http_requests_total",
            "HTTP requests answered, by route and status class",
            ["route", "status_class"],
            registry=r,
        )
        self.request_duration = Histogram(
            "hlsrelay_http_request_duration_seconds",
            "Time from request to the end of the response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "hlsrelay_http_requests_in_flight", "HTTP requests being answered", registry=r
        )
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
        self.upstream_bytes = Counter(
            "hlsrelay_upstream_received_bytes_total",
            "Body bytes received from upstreams (after decompression), by resource kind",
            ["kind"],
            registry=r,
        )
        self.bytes_out = Counter(
            "hlsrelay_relayed_bytes_total",
            "Body bytes sent to viewers, by resource kind",
            ["kind"],
            registry=r,
        )
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
        self.cache_requests = Counter(
            "hlsrelay_cache_requests_total",
            "Cacheable requests by outcome: hit (fresh entry), miss (fetched upstream), stale "
            "(last good playlist served while the upstream fails), coalesced (joined a fetch "
            "already in flight)",
            ["result"],
            registry=r,
        )
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

    def request_done(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration (the metrics middleware calls this)."""
        key = (route, status // 100)
        children = self._http_children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, status_class(status)),
                self.request_duration.labels(route),
            )
            self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

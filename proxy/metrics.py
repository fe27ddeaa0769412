"""Every Prometheus collector, in one place, on a registry of the app's own.

Names follow Prometheus conventions (prefix ``hlsrelay_``, units in names, ``_total`` counters).
Label values are bounded: route names, status classes, reasons from a fixed set. Never a URL,
a token, a host name typed by a user, or a credential.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


@dataclass
class Metrics:
    """The collectors of one app instance."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self.build_info = Info("hlsrelay_build", "Version of the running hlsrelay", registry=r)
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
        self.bytes_out = Counter(
            "hlsrelay_relayed_bytes_total",
            "Body bytes sent to viewers, by resource kind",
            ["kind"],
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

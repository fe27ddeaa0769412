"""The per-request metrics kept by hand expose exactly what prometheus-client's own Counter and
Histogram would for the same requests, and the exposition stays valid."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import LATENCY_BUCKETS, Metrics, RequestStats, status_class


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_request_stats_match_prometheus_client() -> None:
    rng = random.Random(7)
    ours = CollectorRegistry()
    stats = RequestStats(LATENCY_BUCKETS)
    ours.register(stats)
    reference = CollectorRegistry()
    counter = Counter(
        "hlsrelay_http_requests_total", "x", ["route", "status_class"], registry=reference
    )
    histogram = Histogram(
        "hlsrelay_http_request_duration_seconds",
        "x",
        ["route"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    edges = [*LATENCY_BUCKETS, 0.0, 60.0]  # exactly on a bound counts in that bucket (le)
    for _ in range(2000):
        route = rng.choice(["stream", "healthz", "unmatched"])
        status = rng.choice([200, 206, 304, 404, 502, 504])
        seconds = rng.choice(edges) if rng.random() < 0.3 else rng.expovariate(10)
        stats.done(route, status, seconds)
        counter.labels(route, status_class(status)).inc()
        histogram.labels(route).observe(seconds)
    got = {k: v for k, v in _samples(generate_latest(ours)).items() if "in_flight" not in k[0]}
    want = {k: v for k, v in _samples(generate_latest(reference)).items() if "_created" not in k[0]}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-6, key


def test_in_flight_and_families_in_the_app_registry() -> None:
    metrics = Metrics()
    metrics.http.in_flight = 3
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE hlsrelay_http_requests_total counter" in text
    assert "# TYPE hlsrelay_http_request_duration_seconds histogram" in text
    assert "hlsrelay_http_requests_in_flight 3.0" in text

"""The per-request metrics kept by hand expose exactly what prometheus-client's own Counter and
Histogram would for the same requests, and the exposition stays valid."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import (
    LATENCY_BUCKETS,
    LOOP_LAG_BUCKETS,
    LoopCounter,
    Metrics,
    RequestStats,
    sample_loop_lag,
    status_class,
)


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


def test_loop_counters_match_prometheus_client() -> None:
    rng = random.Random(11)
    ours = CollectorRegistry()
    counter = LoopCounter("hlsrelay_relayed_bytes", "Body bytes sent to viewers", "kind")
    ours.register(counter)
    reference = CollectorRegistry()
    theirs = Counter(
        "hlsrelay_relayed_bytes_total", "Body bytes sent to viewers", ["kind"], registry=reference
    )
    for _ in range(500):
        kind = rng.choice(["playlist", "segment", "key", 'odd "kind"\\'])
        amount = rng.choice([0, 1, rng.randrange(1 << 20), rng.random()])
        counter.labels(kind).inc(amount)
        theirs.labels(kind).inc(amount)
    counter.labels("never").inc(0)
    theirs.labels("never").inc(0)
    got = _samples(generate_latest(ours))
    want = {k: v for k, v in _samples(generate_latest(reference)).items() if "_created" not in k[0]}
    assert got == want
    text = generate_latest(ours).decode()
    assert "# TYPE hlsrelay_relayed_bytes_total counter" in text
    assert "# HELP hlsrelay_relayed_bytes_total Body bytes sent to viewers" in text
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("playlist").inc(-1)  # a counter never goes down


def test_in_flight_and_families_in_the_app_registry() -> None:
    metrics = Metrics()
    metrics.http.in_flight = 3
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE hlsrelay_http_requests_total counter" in text
    assert "# TYPE hlsrelay_http_request_duration_seconds histogram" in text
    assert "hlsrelay_http_requests_in_flight 3.0" in text


def _block(seconds: float) -> None:
    """Hold the event loop's thread, as a blocking call in a handler would."""
    time.sleep(seconds)


async def test_loop_lag_sampler_sees_a_blocked_loop() -> None:
    registry = CollectorRegistry()
    lag = Histogram("lag_seconds", "x", buckets=LOOP_LAG_BUCKETS, registry=registry)
    sampler = asyncio.create_task(sample_loop_lag(lag, interval=0.005))
    try:
        await asyncio.sleep(0.05)  # quiet: every wake-up comes about on time
        quiet = _samples(generate_latest(registry))
        assert quiet[("lag_seconds_count", ())] >= 3
        assert quiet[("lag_seconds_bucket", (("le", "0.05"),))] == quiet[("lag_seconds_count", ())]
        _block(0.12)
        await asyncio.sleep(0.02)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    after = _samples(generate_latest(registry))
    # Exactly one wake-up came late, by the time the loop was held (less what was left of the
    # sampler's sleep when it started): above 100 ms, within 250 ms.
    over_100ms = after[("lag_seconds_count", ())] - after[("lag_seconds_bucket", (("le", "0.1"),))]
    assert over_100ms == 1
    assert after[("lag_seconds_bucket", (("le", "0.25"),))] == after[("lag_seconds_count", ())]
    assert after[("lag_seconds_sum", ())] >= 0.1


def test_loop_lag_has_no_labels_and_fixed_buckets() -> None:
    metrics = Metrics()
    (family,) = [
        f
        for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        if f.name == "hlsrelay_event_loop_lag_seconds"
    ]
    assert family.type == "histogram"
    assert {frozenset(s.labels) - {"le"} for s in family.samples} == {frozenset()}
    edges = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
    assert edges == [*(str(b) for b in LOOP_LAG_BUCKETS), "+Inf"]
    assert "0.05" in edges  # the stall limit of issue 7 is a bucket edge

"""Per-upstream-host circuit breakers: fail fast instead of hammering a failing provider.

A host's circuit opens after ``breaker_failure_threshold`` failures in a row (connect errors,
resets and timeouts before the headers, 502/503/504 answers). While open, requests to that host
are refused at once with 503 and a Retry-After; after ``breaker_cooldown`` seconds one trial
request is let through (half-open): its success closes the circuit, its failure opens it again.

Hosts are keys in memory only; this module must never put a host name in a log line or a metric
label (the metrics are counts over all hosts).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import ServiceUnavailable
from proxy.metrics import Metrics

# Hosts remembered at once; the least recently used healthy ones are forgotten first.
MAX_HOSTS = 10_000


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    open_until: float = 0.0
    trial_running: bool = False


class CircuitBreakers:
    """One circuit per upstream host (``host:port``)."""

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._metrics = metrics
        self._clock = clock
        self._circuits: OrderedDict[str, _Circuit] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self._threshold > 0

    def check(self, host: str) -> bool:
        """Raise ServiceUnavailable while ``host``'s circuit is open; let one trial through.

        True when this request is that trial: the caller reports its outcome, or calls
        :meth:`release_trial` when it has none to report."""
        circuit = self._circuits.get(host)
        if circuit is None or circuit.open_until == 0.0:
            return False
        remaining = circuit.open_until - self._clock()
        if remaining > 0 or circuit.trial_running:
            self._metrics.breaker_rejections.inc()
            raise ServiceUnavailable(
                "upstream host is failing; not retried until its cooldown ends",
                retry_after=max(1, math.ceil(remaining)),
            )
        circuit.trial_running = True
        return True

    def success(self, host: str) -> None:
        circuit = self._circuits.pop(host, None)
        if circuit is not None and circuit.open_until:
            self._metrics.breakers_open.dec()

    def failure(self, host: str) -> None:
        if not self.enabled:
            return
        circuit = self._circuits.pop(host, None) or _Circuit()
        self._circuits[host] = circuit  # most recently used last
        circuit.failures += 1
        if circuit.trial_running or (
            circuit.open_until == 0.0 and circuit.failures >= self._threshold
        ):
            if circuit.open_until == 0.0:
                self._metrics.breakers_open.inc()
            self._metrics.breaker_trips.inc()
            circuit.open_until = self._clock() + self._cooldown
            circuit.trial_running = False
        self._forget_oldest()

    def release_trial(self, host: str) -> None:
        """A trial request ended without telling anything about the host (e.g. a proxy fault)."""
        circuit = self._circuits.get(host)
        if circuit is not None:
            circuit.trial_running = False

    def _forget_oldest(self) -> None:
        while len(self._circuits) > MAX_HOSTS:
            host, circuit = next(iter(self._circuits.items()))
            del self._circuits[host]
            if circuit.open_until:
                self._metrics.breakers_open.dec()

"""The outbound proxy pool: choosing a proxy, stickiness per stream, health and ejection.

* Strategies: ``round_robin``, ``random``, ``least_connections`` (open upstream responses).
* Stickiness (``sticky = true``): a stream (its key: the ctx token, or a live channel id) keeps
  the proxy it was given while that proxy is healthy, because upstreams bind signed URLs to the
  client IP; the strategy then spreads streams, not requests. A stream whose proxy fails moves to
  another and stays there. Keys are kept only as a keyed hash, in a bounded LRU map.
* Health: ``failure_threshold`` failures in a row eject a proxy for a cooldown that doubles on
  each ejection in a row (capped by ``max_cooldown``). After the cooldown it returns when a probe
  through it succeeds (``probe_url``), or, with no probe URL, on trial: one failure ejects it
  again with a longer cooldown. A success clears the streak.

Log lines and metrics name proxies by their configured name; this module must never log a proxy
URL, a credential or a stream key.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from proxy.metrics import Metrics
from proxy.settings import ProxiesSettings

log = logging.getLogger("hlsrelay.proxies")

# Streams remembered for stickiness; the least recently used are forgotten first.
MAX_STICKY_STREAMS = 50_000


@dataclass(eq=False)
class OutboundProxy:
    """One configured proxy and its health. ``repr`` shows the name only."""

    name: str
    session: aiohttp.ClientSession | None = field(default=None, repr=False)
    in_flight: int = 0
    failures_in_row: int = 0
    ejections_in_row: int = 0
    ejected_until: float | None = None
    """Monotonic time the cooldown ends; None while in the pool."""
    on_trial: bool = False
    """Back after a cooldown without a probe: the next failure ejects it again."""

    @property
    def up(self) -> bool:
        return self.ejected_until is None


class ProxyPool:
    """Chooses proxies and keeps their health; one per app."""

    def __init__(
        self,
        proxies: Sequence[OutboundProxy],
        settings: ProxiesSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.proxies = tuple(proxies)
        self._by_name = {p.name: p for p in self.proxies}
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()  # spreading load, not security
        self._turn = itertools.count()
        self._sticky: OrderedDict[bytes, str] = OrderedDict()
        # A per-process key: the sticky map holds no token, only an HMAC of it.
        self._key = secrets.token_bytes(16)
        for proxy in self.proxies:
            metrics.proxy_up.labels(proxy.name).set(1)

    def __len__(self) -> int:
        return len(self.proxies)

    def get(self, name: str) -> OutboundProxy | None:
        return self._by_name.get(name)

    # -- choosing ---------------------------------------------------------------------------

    def available(self, proxy: OutboundProxy) -> bool:
        """In the pool, or (no probe configured) its cooldown is over: back on trial."""
        if proxy.ejected_until is None:
            return True
        if self._settings.probe_url is None and self._clock() >= proxy.ejected_until:
            self._readmit(proxy, trial=True)
            return True
        return False

    def choose(
        self, stream_key: str | None, exclude: frozenset[str] = frozenset()
    ) -> OutboundProxy | None:
        """The proxy for the next attempt of a request of ``stream_key``; None if none is left."""
        sticky = self._settings.sticky and stream_key is not None
        digest = self._digest(stream_key) if sticky and stream_key is not None else b""
        if sticky:
            name = self._sticky.get(digest)
            current = self._by_name.get(name) if name is not None else None
            if current is not None and current.name not in exclude and self.available(current):
                self._sticky.move_to_end(digest)
                return current
        candidates = [p for p in self.proxies if p.name not in exclude and self.available(p)]
        if not candidates:
            return None
        chosen = self._pick(candidates)
        if sticky:
            self._sticky[digest] = chosen.name
            self._sticky.move_to_end(digest)
            while len(self._sticky) > MAX_STICKY_STREAMS:
                self._sticky.popitem(last=False)
        return chosen

    def _pick(self, candidates: list[OutboundProxy]) -> OutboundProxy:
        strategy = self._settings.strategy
        if strategy == "random":
            return self._rng.choice(candidates)
        turn = next(self._turn)
        if strategy == "least_connections":
            # Ties are broken in turn, so an idle pool still spreads.
            start = turn % len(candidates)
            rotated = candidates[start:] + candidates[:start]
            return min(rotated, key=lambda p: p.in_flight)
        return candidates[turn % len(candidates)]

    def _digest(self, stream_key: str) -> bytes:
        return hashlib.blake2b(stream_key.encode(), key=self._key, digest_size=16).digest()

    def retry_after(self) -> int:
        """Seconds until the first ejected proxy's cooldown ends (for a 503's Retry-After)."""
        now = self._clock()
        ends = [p.ejected_until for p in self.proxies if p.ejected_until is not None]
        wait = min(ends) - now if ends else 1.0
        if self._settings.probe_url is not None:
            wait += self._settings.probe_interval
        return max(1, math.ceil(wait))

    # -- health -----------------------------------------------------------------------------

    def started(self, proxy: OutboundProxy) -> Callable[[], None]:
        """Count a request through ``proxy`` as open; call the returned function once it ends."""
        proxy.in_flight += 1
        self._metrics.proxy_requests.labels(proxy.name).inc()
        done = False

        def finished() -> None:
            nonlocal done
            if not done:
                done = True
                proxy.in_flight -= 1

        return finished

    def success(self, proxy: OutboundProxy, latency: float) -> None:
        self._metrics.proxy_latency.labels(proxy.name).observe(latency)
        proxy.failures_in_row = 0
        proxy.ejections_in_row = 0
        proxy.on_trial = False

    def failure(self, proxy: OutboundProxy, reason: str) -> None:
        """A failure of the proxy itself (connect, reset, timeout, auth) before the headers."""
        self._metrics.proxy_failures.labels(proxy.name, reason).inc()
        if proxy.ejected_until is not None:
            return  # already out (a request that was in flight when it was ejected)
        proxy.failures_in_row += 1
        if proxy.on_trial or proxy.failures_in_row >= self._settings.failure_threshold:
            self._eject(proxy, reason)

    def _eject(self, proxy: OutboundProxy, reason: str) -> None:
        settings = self._settings
        proxy.ejections_in_row += 1
        cooldown = min(
            settings.max_cooldown, settings.cooldown * 2 ** min(proxy.ejections_in_row - 1, 30)
        )
        proxy.ejected_until = self._clock() + cooldown
        proxy.on_trial = False
        self._metrics.proxy_ejections.labels(proxy.name).inc()
        self._metrics.proxy_up.labels(proxy.name).set(0)
        log.warning(
            "outbound proxy %s ejected after %d failures in a row (last: %s) for %.0f s",
            proxy.name,
            proxy.failures_in_row,
            reason,
            cooldown,
        )

    def _readmit(self, proxy: OutboundProxy, *, trial: bool) -> None:
        proxy.ejected_until = None
        proxy.failures_in_row = 0
        proxy.on_trial = trial
        self._metrics.proxy_up.labels(proxy.name).set(1)
        log.info("outbound proxy %s back in the pool%s", proxy.name, " on trial" if trial else "")

    # -- probes -----------------------------------------------------------------------------

    def due_for_probe(self) -> list[OutboundProxy]:
        now = self._clock()
        return [p for p in self.proxies if p.ejected_until is not None and now >= p.ejected_until]

    async def probe_round(self, probe: Callable[[OutboundProxy], Awaitable[bool]]) -> None:
        """Probe every ejected proxy whose cooldown is over; readmit or eject it again."""
        due = self.due_for_probe()
        if not due:
            return
        results = await asyncio.gather(*(probe(p) for p in due))
        for proxy, ok in zip(due, results, strict=True):
            if ok:
                # The streak is cleared by real traffic succeeding, not by the probe: an origin
                # may ban a proxy that still answers the probe URL.
                self._readmit(proxy, trial=False)
            else:
                self._metrics.proxy_failures.labels(proxy.name, "probe").inc()
                self._eject(proxy, "probe")

"""The live pool: at most ``live.max_sessions`` sessions, started on demand, stopped when idle.

:meth:`LivePool.acquire` returns the running session of a channel or starts one (503 with
Retry-After when the pool is full). Before starting one it takes the channel's lease
(:mod:`proxy.live.lease`): when another instance holds it, the answer is 503 with Retry-After
(the seconds left on that lease), so two instances never run one channel's ffmpeg. A background
sweep stops sessions ``idle_timeout`` after their last viewer, renews the leases of the others
(stopping any session whose lease was lost) and refreshes the live gauges. :meth:`LivePool.close`
stops every session and reaps every ffmpeg: the app calls it on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from proxy.errors import ServiceUnavailable
from proxy.live.lease import ChannelLeases, LeaseUnavailable, LocalLeases, retry_after
from proxy.live.process import find_ffmpeg
from proxy.live.session import LiveSession
from proxy.live.source import LiveSource
from proxy.metrics import Metrics
from proxy.settings import LiveSettings
from proxy.upstream.client import UpstreamClient

log = logging.getLogger("hlsrelay.live")

_SWEEP_SECONDS = 1.0


class LivePool:
    def __init__(
        self,
        settings: LiveSettings,
        client: UpstreamClient,
        metrics: Metrics,
        leases: ChannelLeases | None = None,
    ) -> None:
        self._settings = settings
        # Who may run which channel when instances share Redis (one instance: everything).
        self._leases = leases if leases is not None else LocalLeases(settings.instance_name)
        self._client = client
        self._metrics = metrics
        self._sessions: dict[str, LiveSession] = {}
        self._starting = asyncio.Lock()
        self._ffmpeg: str | None = None
        self._labels: set[str] = set()
        # Last media sequence number of each channel that played: a new session continues
        # above it, so numbers never repeat for players and caches.
        self._last_sequence: dict[str, int] = {}
        self.closed = False

    def session(self, channel_id: str) -> LiveSession | None:
        return self._sessions.get(channel_id)

    def __len__(self) -> int:
        return len(self._sessions)

    def state(self, channel_id: str) -> tuple[str, int]:
        """("idle" | "starting" | "live" | "stalled" | "failing", viewers) of a channel."""
        session = self._sessions.get(channel_id)
        if session is None:
            return "idle", 0
        return session.state(), session.viewers()

    async def acquire(self, source: LiveSource) -> LiveSession:
        """The running session of ``source``'s channel, started if needed."""
        session = self._sessions.get(source.channel_id)
        if session is not None and not session.stopped:
            return session
        if self.closed:
            raise ServiceUnavailable("the server is shutting down", retry_after=5)
        async with self._starting:
            session = self._sessions.get(source.channel_id)
            if session is not None and not session.stopped:
                return session
            if len(self._sessions) >= self._settings.max_sessions:
                raise ServiceUnavailable(
                    f"all {self._settings.max_sessions} live sessions are in use",
                    retry_after=max(5, int(self._settings.idle_timeout)),
                )
            if self._ffmpeg is None:
                self._ffmpeg = find_ffmpeg(self._settings.ffmpeg)
            await self._take_lease(source)
            session = LiveSession(
                source,
                self._client,
                self._settings,
                self._metrics,
                self._ffmpeg,
                first_sequence=self._last_sequence.get(source.channel_id, -1) + 1,
            )
            try:
                session.start()
            except BaseException:
                await self._leases.release(source.channel_id)
                raise
            self._sessions[source.channel_id] = session
            self._metrics.live_sessions.set(len(self._sessions))
            log.info("live %s: session started", source.channel_id)
            return session

    async def _take_lease(self, source: LiveSource) -> None:
        """Take the channel's lease, or answer 503: another instance runs it (Retry-After: the
        seconds left on its lease), or nobody can tell (the lease store is unreachable)."""
        try:
            remaining = await self._leases.acquire(source.channel_id)
        except LeaseUnavailable as exc:
            raise ServiceUnavailable(
                f"cannot tell whether another instance plays this channel: {exc}", retry_after=2
            ) from None
        if remaining is not None:
            self._metrics.live_lease_refusals.labels(source.metric_label).inc()
            raise ServiceUnavailable(
                "the channel is playing on another instance", retry_after=retry_after(remaining)
            )

    async def stop(self, channel_id: str) -> None:
        session = self._sessions.pop(channel_id, None)
        if session is None:
            return
        try:
            await session.stop()
        finally:
            # After the stop: the ffmpeg is gone before another instance may start its own.
            await self._leases.release(channel_id)
        self._last_sequence[channel_id] = session.window.last_sequence
        self._metrics.live_sessions.set(len(self._sessions))
        log.info("live %s: session stopped", channel_id)

    async def sweep_forever(self) -> None:
        """Stop idle sessions and refresh the gauges, every second."""
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            try:
                await self.sweep()
            except Exception:  # the sweeper is a supervisor: a bug in one pass must not end it
                log.exception("live: sweeping sessions failed")

    async def sweep(self) -> None:
        now = time.monotonic()
        for channel_id, session in list(self._sessions.items()):
            if now - session.last_activity() >= self._settings.idle_timeout:
                await self.stop(channel_id)
        # A lease lost (taken over after Redis was unreachable for a whole TTL, or by another
        # instance) means another ffmpeg may be running the channel: stop ours at once.
        for channel_id in await self._leases.renew(list(self._sessions)):
            lost = self._sessions.get(channel_id)
            if lost is not None:
                self._metrics.live_leases_lost.labels(lost.source.metric_label).inc()
                log.warning("live %s: lease lost, stopping the session", channel_id)
                await self.stop(channel_id)
        self.update_gauges()

    def update_gauges(self) -> None:
        now = time.monotonic()
        viewers: dict[str, int] = {}
        ages: dict[str, float] = {}
        for session in self._sessions.values():
            label = session.source.metric_label
            viewers[label] = viewers.get(label, 0) + session.viewers()
            if session.last_segment_at is not None:
                age = now - session.last_segment_at
                ages[label] = max(ages.get(label, 0.0), age)
        for label in self._labels - set(viewers):
            with contextlib.suppress(KeyError):
                self._metrics.live_viewers.remove(label)
            with contextlib.suppress(KeyError):
                self._metrics.live_segment_age.remove(label)
        for label, count in viewers.items():
            self._metrics.live_viewers.labels(label).set(count)
        for label, age in ages.items():
            self._metrics.live_segment_age.labels(label).set(round(age, 3))
        self._labels = set(viewers)

    async def close(self) -> None:
        """Stop every session (every ffmpeg reaped, every temp dir removed)."""
        self.closed = True
        await asyncio.gather(*(self.stop(cid) for cid in list(self._sessions)))
        self.update_gauges()

"""The TS source reader: one upstream connection per channel, feeding the fan-out hub.

It reads the channel's URL with the channel's headers through
:class:`~proxy.upstream.client.UpstreamClient` (SSRF guard, explicit timeouts), checks that
the bytes are MPEG-TS, and publishes whole 188-byte packets to the hub. When the connection
drops or fails it reconnects with jittered exponential backoff, moving on to the next of
``backup_urls`` after a failure. ``lavfi:GRAPH`` sources (config only: the demo channel) are
produced by a local ffmpeg writing TS to a pipe, through the same hub.

It never raises out of :meth:`SourceReader.run`: failures are recorded in
:attr:`SourceReader.last_error` for the viewer to see, and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from proxy.errors import HlsRelayError, UpstreamError, UpstreamStatus, UpstreamUnreachable
from proxy.live import process
from proxy.live.hub import FanOutHub
from proxy.metrics import Metrics
from proxy.settings import LiveSettings
from proxy.upstream.client import UpstreamClient

log = logging.getLogger("hlsrelay.live")

TS_PACKET = 188
_SYNC = 0x47
# Bytes looked through for three packets in a row before the source is declared "not TS".
_SYNC_SEARCH_BYTES = 64 * 1024
_BASE_BACKOFF_SECONDS = 0.5
# A connection that delivered TS but dropped within this many seconds counts as a flap.
_FLAP_SECONDS = 10.0


class NotTransportStream(UpstreamError):
    code = "source_not_ts"


@dataclass(frozen=True, slots=True)
class LiveSource:
    """What a live session reads: plain data handed over by the web layer."""

    channel_id: str
    urls: tuple[str, ...] = field(repr=False)
    """The main URL, then the backups."""
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    metric_label: str = "other"


def backoff_delay(failures: int, cap: float) -> float:
    """Seconds before retry number ``failures`` (0 = right after a healthy run): doubling from
    half a second, capped, with ±20 % jitter so many channels do not retry in lockstep."""
    base = min(cap, _BASE_BACKOFF_SECONDS * (2 ** min(failures, 16)))
    return float(base * random.uniform(0.8, 1.2))


class PacketAligner:
    """Cuts a byte stream into whole TS packets, finding sync first."""

    def __init__(self) -> None:
        self._buffer = b""
        self.synced = False
        self._searched = 0
        self._head = b""

    def feed(self, data: bytes | memoryview) -> bytes:
        buffer = self._buffer + data
        if len(self._head) < 64:
            self._head += data[: 64 - len(self._head)]
        if not self.synced:
            start = _find_sync(buffer)
            if start < 0:
                self._searched += len(data)
                if self._searched > _SYNC_SEARCH_BYTES:
                    raise NotTransportStream(_not_ts_message(self._head))
                self._buffer = buffer[-3 * TS_PACKET :]
                return b""
            self.synced = True
            buffer = buffer[start:]
        usable = len(buffer) - len(buffer) % TS_PACKET
        self._buffer = buffer[usable:]
        out = buffer[:usable]
        if out and out[0] != _SYNC:
            raise NotTransportStream("the source lost MPEG-TS sync")
        return out


def _find_sync(buffer: bytes) -> int:
    limit = len(buffer) - 2 * TS_PACKET
    for start in range(min(limit, TS_PACKET)):
        if (
            buffer[start] == _SYNC
            and buffer[start + TS_PACKET] == _SYNC
            and buffer[start + 2 * TS_PACKET] == _SYNC
        ):
            return start
    return -1


def _not_ts_message(head: bytes) -> str:
    stripped = head.lstrip(b"\xef\xbb\xbf \r\n\t")[:16].lower()
    if stripped.startswith(b"#extm3u"):
        what = 'an HLS playlist (set kind = "hls" for this channel)'
    elif stripped.startswith((b"<!doctype", b"<html", b"<?xml")):
        what = "an HTML or XML page"
    elif stripped.startswith((b"{", b"[")):
        what = "JSON"
    else:
        what = "not MPEG-TS"
    return f"the channel source is {what}, not an MPEG-TS stream"


class SourceReader:
    """Reads a :class:`LiveSource` into a hub until cancelled."""

    def __init__(
        self,
        source: LiveSource,
        hub: FanOutHub,
        client: UpstreamClient,
        settings: LiveSettings,
        metrics: Metrics,
        ffmpeg: Callable[[], str],
        on_change: Callable[[], None],
    ) -> None:
        self.source = source
        self._hub = hub
        self._client = client
        self._settings = settings
        self._metrics = metrics
        self._ffmpeg = ffmpeg
        self._on_change = on_change
        self.generation = 0
        """Counts connections that delivered TS: a new one means a source switch."""
        self.flowing = False
        self.last_error: HlsRelayError | None = None
        self.failures = 0
        """Consecutive connection attempts that delivered nothing."""

    async def run(self) -> None:
        urls = self.source.urls
        index = 0
        attempts = 0
        flaps = 0
        while True:
            url = urls[index % len(urls)]
            if attempts:
                self._metrics.live_source_reconnects.labels(self.source.metric_label).inc()
            attempts += 1
            delivered = False
            connected_at = time.monotonic()
            try:
                async with contextlib.aclosing(self._read(url)) as reading:
                    async for packets in reading:
                        if not delivered:
                            delivered = True
                            self._hub.reset()
                            self.generation += 1
                            self.flowing = True
                            self.failures = 0
                            self.last_error = None
                            self._on_change()
                        self._hub.publish(packets)
                self.last_error = UpstreamUnreachable("the channel source ended its stream")
            except HlsRelayError as exc:
                self.last_error = exc
            except Exception:  # a supervisor outlives a bug in one attempt: log, back off
                log.exception("live %s: source reader failed", self.source.channel_id)
                self.last_error = UpstreamError("internal error while reading the source")
            self.flowing = False
            log.warning(
                "live %s: source %d failed: %s",
                self.source.channel_id,
                index % len(urls),
                self.last_error.message if self.last_error else "ended",
            )
            if not delivered:
                self.failures += 1
                index += 1  # fail over to the next URL
            self._on_change()
            # Try each backup at once after a failure; back off once all of them failed.
            rounds = self.failures // len(urls)
            if delivered:
                # A source that delivers a little and drops again and again is a flapping
                # source: back off from it as from one that fails outright.
                lasted = time.monotonic() - connected_at
                flaps = flaps + 1 if lasted < _FLAP_SECONDS else 0
                delay = backoff_delay(flaps, self._settings.restart_max_backoff) / 2
            elif self.failures % len(urls):
                delay = 0.0
            else:
                delay = backoff_delay(rounds, self._settings.restart_max_backoff)
            await asyncio.sleep(delay)

    async def _read(self, url: str) -> AsyncGenerator[bytes, None]:
        aligner = PacketAligner()
        lavfi = url.startswith("lavfi:")
        chunks = self._lavfi(url.removeprefix("lavfi:")) if lavfi else self._http(url)
        # aclosing: a "not TS" error must close the connection (or the ffmpeg) at once.
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                packets = aligner.feed(chunk)
                if packets:
                    yield packets

    async def _http(self, url: str) -> AsyncGenerator[bytes | memoryview, None]:
        response = await self._client.open(
            url,
            dict(self.source.headers),
            decompress=False,
            kind="live",
            # One channel, one outbound proxy: providers bind a connection slot to an address.
            stream_key=f"live:{self.source.channel_id}",
        )
        async with response:
            if response.status >= 300:
                raise UpstreamStatus(response.status)
            async for chunk in response.iter_chunks():
                yield chunk

    async def _lavfi(self, graph: str) -> AsyncGenerator[bytes, None]:
        video, _, audio = graph.partition(";")
        seg = self._settings.segment_seconds
        args = [
            self._ffmpeg(),
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            video or "testsrc2=size=640x360:rate=25",
            "-f",
            "lavfi",
            "-i",
            audio or "sine=frequency=440:sample_rate=48000",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-pix_fmt",
            "yuv420p",
            # A keyframe at every segment boundary: the segmenter cuts there when copying.
            "-force_key_frames",
            f"expr:gte(t,n_forced*{seg})",
            "-c:a",
            "aac",
            "-b:a",
            "96k",
            # Packets leave as they are muxed, not in 32 KiB bursts.
            "-flush_packets",
            "1",
            "-f",
            "mpegts",
            "pipe:1",
        ]
        proc = await process.spawn(args, stdin=False)
        self._metrics.live_ffmpeg_processes.inc()
        try:
            assert proc.stdout is not None
            while True:
                chunk = await proc.stdout.read(64 * 1024)
                if not chunk:
                    break
                yield chunk
        finally:
            await process.terminate(proc)
            self._metrics.live_ffmpeg_processes.dec()
            assert proc.stderr is not None
        tail = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()[-1:]
        raise UpstreamUnreachable(
            "the test-pattern ffmpeg stopped" + (f": {tail[0][:200]}" if tail else "")
        )

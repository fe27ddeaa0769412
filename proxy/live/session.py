"""One live session: source reader → hub → supervised ffmpeg segmenter → segment window.

Started by the first viewer of a ``ts`` channel, stopped by the pool after ``idle_timeout``
without viewers. The supervisor runs ffmpeg (``-c copy``, audio copied or AAC) reading the hub
through its stdin and cutting segments with the ``segment`` muxer, whose segment list arrives
as CSV on ffmpeg's stdout (each line is written once the segment is complete). Each segment
is read into the window and its file removed at once; the session's temp dir is removed at
stop. ffmpeg is restarted with backoff and jitter when it exits, stalls (no segment within
three segment durations) or the source switches; a source that makes ffmpeg die at once again
and again is backed off, never respawned in a loop.

Never raises out of its tasks; never leaves a process or a file behind once :meth:`stop`
returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path

from proxy.errors import HlsRelayError, NotFound, UpstreamError, UpstreamTimeout
from proxy.live import process
from proxy.live.hub import FanOutHub, Subscription
from proxy.live.source import LiveSource, SourceReader, backoff_delay
from proxy.live.window import Segment, SegmentWindow
from proxy.metrics import Metrics
from proxy.settings import LiveSettings
from proxy.upstream.client import UpstreamClient

log = logging.getLogger("hlsrelay.live")

DIR_PREFIX = "hlsrelay-live-"

# Bytes ffmpeg's stdin may fall behind the source before it counts as stalled.
_FFMPEG_BUFFER_BYTES = 16 * 1024 * 1024
_STDERR_TAIL_LINES = 20
_STALL_SEGMENTS = 3
# Audio codecs every HLS player decodes; anything else (mp2, ac3, eac3…) becomes AAC in "auto".
_BROWSER_AUDIO = frozenset({"aac", "mp3"})
_AUDIO_STREAM = re.compile(r"Stream #0:\d+.*?: Audio: (\w+)")


class SegmenterFailed(UpstreamError):
    code = "live_ffmpeg_failed"


class LiveSession:
    """A playing channel. Create with :meth:`start`; always :meth:`stop`."""

    def __init__(
        self,
        source: LiveSource,
        client: UpstreamClient,
        settings: LiveSettings,
        metrics: Metrics,
        ffmpeg: str,
        first_sequence: int = 0,
    ) -> None:
        self.source = source
        self.channel_id = source.channel_id
        self._settings = settings
        self._metrics = metrics
        self._ffmpeg = ffmpeg
        self.hub = FanOutHub()
        # Sequence numbers start from the wall clock (and above the channel's last session):
        # a player or an edge cache never sees a number reused for other media.
        self.window = SegmentWindow(
            settings.window_segments,
            settings.segment_seconds,
            first_sequence=max(first_sequence, int(time.time() / settings.segment_seconds)),
        )
        self.reader = SourceReader(
            source, self.hub, client, settings, metrics, lambda: ffmpeg, self._source_changed
        )
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._dir: Path | None = None
        self.started_at = time.monotonic()
        self.last_segment_at: float | None = None
        self.last_error: HlsRelayError | None = None
        self.ffmpeg_runs = 0
        self.ffmpeg_failures = 0
        self.transcode_audio = settings.audio == "aac"
        self.proc: asyncio.subprocess.Process | None = None
        self._hls_viewers: dict[str, float] = {}
        self.ts_viewers = 0
        self._last_ts_viewer = 0.0
        self._waiting = 0
        """Viewers waiting for the first segment: present, however long the start takes."""
        self.stopped = False
        self._stopping: asyncio.Task[None] | None = None
        """The one stop, once asked for (every call of :meth:`stop` waits for it)."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        # The pid in the name lets a later start remove what a SIGKILLed server left behind.
        self._dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
        self._tasks = [
            asyncio.create_task(self.reader.run(), name=f"live-source:{self.channel_id}"),
            asyncio.create_task(self._supervise(), name=f"live-ffmpeg:{self.channel_id}"),
        ]

    async def stop(self) -> None:
        """Stop reader and ffmpeg, reap every process, remove every file. Idempotent: every
        call waits for the one stop.

        A caller cancelled meanwhile (the live sweeper, cancelled at shutdown while it stopped a
        session) still waits for the stop to finish, so nothing is left behind, and then its
        cancellation goes on. It used to be swallowed here (the wait for the session's own
        cancelled tasks suppressed every ``CancelledError``): the sweeper then went on sweeping
        and the app's cleanup waited for it for ever.
        """
        if self._stopping is None:
            self.stopped = True
            self._stopping = asyncio.create_task(self._stop(), name=f"live-stop:{self.channel_id}")
        stopping = self._stopping
        cancelled = False
        while not stopping.done():
            try:
                await asyncio.shield(stopping)
            except asyncio.CancelledError:
                if stopping.cancelled():
                    raise
                cancelled = True  # the caller's: finish the stop first
        if cancelled:
            raise asyncio.CancelledError
        stopping.result()

    async def _stop(self) -> None:
        self.hub.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.proc is not None:  # the supervisor's finally already did it; belt and braces
            await process.terminate(self.proc)
        if self._dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._dir, True)
        self._changed.set()

    def _source_changed(self) -> None:
        self._changed.set()

    # -- viewers --------------------------------------------------------------------------------

    def touch_hls(self, viewer: str) -> None:
        self._hls_viewers[viewer] = time.monotonic()

    def viewers(self) -> int:
        horizon = time.monotonic() - 2 * self.target_duration
        for key in [k for k, seen in self._hls_viewers.items() if seen < horizon]:
            del self._hls_viewers[key]
        return len(self._hls_viewers) + self.ts_viewers

    def last_activity(self) -> float:
        """When a viewer was last present (now, while one is)."""
        now = time.monotonic()
        if self.viewers() or self._waiting:
            return now
        last_hls = max(self._hls_viewers.values(), default=self.started_at)
        return max(last_hls + 2 * self.target_duration, self._last_ts_viewer)

    def ts_viewer_left(self) -> None:
        self.ts_viewers -= 1
        self._last_ts_viewer = time.monotonic()

    @property
    def target_duration(self) -> float:
        return float(self.window.target_duration or self._settings.segment_seconds)

    def state(self) -> str:
        if self.last_segment_at is not None:
            age = time.monotonic() - self.last_segment_at
            return "live" if age < _STALL_SEGMENTS * self.target_duration else "stalled"
        return "starting" if self._error() is None else "failing"

    # -- serving --------------------------------------------------------------------------------

    async def playlist(self) -> bytes:
        """The live playlist; the first request waits for the first segment (start_timeout)."""
        if len(self.window) == 0:
            self._waiting += 1
            try:
                await self._first_segment()
            finally:
                self._waiting -= 1
        return self.window.render()

    async def _first_segment(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.start_timeout
        while len(self.window) == 0:
            failure = self._fatal_error()
            if failure is not None:
                raise failure
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UpstreamTimeout(
                    "the live channel produced no segment within live.start_timeout"
                    + (f" (last error: {error.message})" if (error := self._error()) else "")
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    def segment(self, sequence: int) -> Segment:
        segment = self.window.get(sequence)
        if segment is None:
            raise NotFound("no such segment in the live window")
        return segment

    async def wait_source(self) -> None:
        """Wait until the source delivers TS (bounded by start_timeout); raise its error when
        every URL failed, so a raw-TS viewer gets a status, not a 200 that never sends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.start_timeout
        while not self.reader.flowing:
            reader_error = self.reader.last_error
            if self.stopped:
                raise UpstreamError("the live session stopped")
            if reader_error is not None and self.reader.failures >= len(self.source.urls):
                raise _copy_error(reader_error)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UpstreamTimeout("the channel source sent nothing within live.start_timeout")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    def subscribe_ts(self) -> Subscription:
        self.ts_viewers += 1
        return self.hub.subscribe(self._settings.viewer_buffer_bytes)

    def _error(self) -> HlsRelayError | None:
        return self.reader.last_error or self.last_error

    def _fatal_error(self) -> HlsRelayError | None:
        """An error worth answering the waiting viewer with now rather than at the timeout:
        every source URL failed, or ffmpeg failed on what the source sent."""
        if self.stopped:
            return UpstreamError("the live session stopped")
        reader_error = self.reader.last_error
        if reader_error is not None and self.reader.failures >= len(self.source.urls):
            return _copy_error(reader_error)
        if self.last_error is not None and self.ffmpeg_failures >= 1:
            return _copy_error(self.last_error)
        return None

    # -- ffmpeg supervision ---------------------------------------------------------------------

    async def _supervise(self) -> None:
        failures = 0
        while True:
            # Subscribed before the source flows, so ffmpeg gets the stream from its first
            # packet (its PAT/PMT and first keyframe) rather than from wherever it joins.
            subscription = self.hub.subscribe(_FFMPEG_BUFFER_BYTES)
            while not self.reader.flowing:
                self._changed.clear()
                await self._changed.wait()
            generation = self.reader.generation
            if self.ffmpeg_runs:
                self._metrics.live_ffmpeg_restarts.labels(self.source.metric_label).inc()
                self.window.mark_discontinuity()
            self.ffmpeg_runs += 1
            try:
                produced, reason = await self._run_ffmpeg(
                    self.ffmpeg_runs, generation, subscription
                )
            except HlsRelayError as exc:  # ffmpeg could not even start
                subscription.close()
                self.last_error = exc
                produced, reason = 0, "failed to start"
            except Exception:  # a supervisor must outlive a bug in one run: log, back off
                subscription.close()
                log.exception("live %s: ffmpeg supervision failed", self.channel_id)
                self.last_error = SegmenterFailed("internal error while running ffmpeg")
                produced, reason = 0, "crashed"
            if reason == "audio":
                continue  # restart at once with AAC audio
            if produced:
                failures = 0
                self.ffmpeg_failures = 0
            else:
                failures += 1
                self.ffmpeg_failures = failures
                self._changed.set()  # a viewer waiting for the first segment hears of it now
            if reason == "source":
                continue  # the source reconnected: a new ffmpeg for the new stream, now
            if self.reader.generation != generation:
                continue
            delay = backoff_delay(failures, self._settings.restart_max_backoff)
            log.warning(
                "live %s: ffmpeg %s after %d segments; restarting in %.1fs%s",
                self.channel_id,
                reason,
                produced,
                delay,
                f" ({self.last_error.message})" if self.last_error and not produced else "",
            )
            await asyncio.sleep(delay)

    def _ffmpeg_args(self, run: int) -> list[str]:
        assert self._dir is not None
        audio = ["-c:a", "aac", "-b:a", "128k"] if self.transcode_audio else ["-c:a", "copy"]
        return [
            self._ffmpeg,
            "-hide_banner",
            "-nostats",
            "-loglevel",
            "info",
            "-fflags",
            "+genpts+discardcorrupt",
            # Probe at most a second: the first segment should not wait for a long analysis.
            "-analyzeduration",
            "1000000",
            "-probesize",
            "1000000",
            "-f",
            "mpegts",
            "-i",
            "pipe:0",
            "-map",
            "0:v:0?",
            "-map",
            "0:a:0?",
            "-c:v",
            "copy",
            *audio,
            "-f",
            "segment",
            "-segment_time",
            f"{self._settings.segment_seconds:g}",
            "-segment_format",
            "mpegts",
            "-segment_list",
            "pipe:1",
            "-segment_list_type",
            "csv",
            str(self._dir / f"r{run}-%d.ts"),
        ]

    async def _run_ffmpeg(
        self, run: int, generation: int, subscription: Subscription
    ) -> tuple[int, str]:
        """Run one ffmpeg until it exits, stalls, or the source switches: (segments, reason)."""
        proc = await process.spawn(self._ffmpeg_args(run), stdin=True)
        self.proc = proc
        self._metrics.live_ffmpeg_processes.inc()
        stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        produced = 0
        reason = "exited"
        progress = asyncio.Event()
        audio_change = asyncio.Event()

        async def feed() -> None:
            assert proc.stdin is not None
            while (chunk := await subscription.get()) is not None:
                proc.stdin.write(chunk)
                await proc.stdin.drain()

        async def read_list() -> None:
            nonlocal produced
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                name, _, times = line.decode(errors="replace").strip().partition(",")
                start, _, end = times.partition(",")
                path = Path(name) if Path(name).is_absolute() else self._dir_path / name
                try:
                    duration = max(0.0, float(end) - float(start))
                    data = await asyncio.to_thread(_take_file, path)
                except (ValueError, OSError):
                    continue
                if not data:
                    continue
                self.window.add(data, duration)
                produced += 1
                self.last_segment_at = time.monotonic()
                self.last_error = None
                progress.set()
                self._changed.set()

        async def read_stderr() -> None:
            assert proc.stderr is not None
            while line := await proc.stderr.readline():
                text = line.decode(errors="replace").rstrip()
                stderr_tail.append(text)
                match = _AUDIO_STREAM.search(text)
                if (
                    match
                    and self._settings.audio == "auto"
                    and not self.transcode_audio
                    and match.group(1) not in _BROWSER_AUDIO
                ):
                    self.transcode_audio = True
                    audio_change.set()

        tasks = [
            asyncio.create_task(feed(), name=f"live-feed:{self.channel_id}"),
            asyncio.create_task(read_list(), name=f"live-segments:{self.channel_id}"),
            asyncio.create_task(read_stderr(), name=f"live-stderr:{self.channel_id}"),
        ]
        exited = asyncio.create_task(proc.wait(), name=f"live-wait:{self.channel_id}")
        try:
            loop = asyncio.get_running_loop()
            stall = _STALL_SEGMENTS * self._settings.segment_seconds
            first = max(self._settings.start_timeout, stall)
            deadline = loop.time() + first
            while True:
                if self.reader.generation != generation:
                    reason = "source"
                    break
                if audio_change.is_set():
                    reason = "audio"
                    break
                if subscription.dropped:
                    reason = "fell behind"
                    break
                if exited.done():
                    # Let the list reader take the last segment ffmpeg announced.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await tasks[1]
                    reason = f"exited ({proc.returncode})"
                    break
                if progress.is_set():
                    progress.clear()
                    deadline = loop.time() + _STALL_SEGMENTS * self.target_duration
                if loop.time() > deadline:
                    reason = "stalled"
                    break
                self._changed.clear()
                waiters = [exited, asyncio.ensure_future(self._changed.wait())]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.05, deadline - loop.time())):
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                waiters[1].cancel()
        finally:
            subscription.close()
            await process.terminate(proc)
            self.proc = None
            self._metrics.live_ffmpeg_processes.dec()
            exited.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, exited, return_exceptions=True)
        if produced == 0 and reason not in ("source", "audio") and self.reader.flowing:
            detail = _ffmpeg_error(stderr_tail)
            self.last_error = SegmenterFailed(
                "ffmpeg could not segment the channel source" + (f": {detail}" if detail else "")
            )
        return produced, reason

    @property
    def _dir_path(self) -> Path:
        assert self._dir is not None
        return self._dir


def _take_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def _ffmpeg_error(lines: deque[str]) -> str:
    """The most telling of ffmpeg's last stderr lines, short, with no path or URL in it."""
    for line in reversed(lines):
        lowered = line.lower()
        if any(w in lowered for w in ("error", "invalid", "could not", "failed", "no such")):
            return re.sub(r"(/[^\s:]+)+", "<path>", line)[:200]
    return ""


def _copy_error(error: HlsRelayError) -> HlsRelayError:
    copy = UpstreamError(error.message, status=error.status)
    copy.code = error.code
    return copy


def remove_stale_dirs(parent: Path | None = None) -> int:
    """Remove session dirs of servers that are gone (killed with SIGKILL): their pid, in the
    dir name, is no longer running. Returns how many were removed."""
    parent = parent or Path(tempfile.gettempdir())
    removed = 0
    for entry in parent.glob(f"{DIR_PREFIX}*-*"):
        pid_text = entry.name[len(DIR_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or not entry.is_dir():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # that server still runs (or the pid was reused: leave it be)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed

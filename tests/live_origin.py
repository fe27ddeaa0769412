"""A real origin of live MPEG-TS for tests: ffmpeg makes the stream in real time.

Each request to ``/live/stream.ts`` (which insists on the right Referer, as IPTV providers do)
or to the AceStream-shaped ``/ace/getstream?id=HASH`` starts an ffmpeg (lavfi test pattern and
tone, ``-re``, H.264 + AAC, a keyframe every second) and streams its stdout. Other routes
misbehave on purpose: a stream cut after some bytes, an upstream that never answers, an HTML
page instead of TS, MP2 audio. Every ffmpeg it starts is stopped by PID when its response ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from dataclasses import dataclass, field

from aiohttp import web

REFERER = "https://player.example.test/live"
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def ts_args(
    ffmpeg: str, *, audio_codec: str = "aac", size: str = "160x90", keyframe_seconds: float = 1.0
) -> list[str]:
    return [
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-re",
        "-f", "lavfi", "-i", f"testsrc=size={size}:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
        "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
        "-force_key_frames", f"expr:gte(t,n_forced*{keyframe_seconds:g})",
        "-c:a", audio_codec, "-b:a", "64k",
        # Written as muxed, not in 32 KiB bursts: a low-bitrate test stream would otherwise
        # go quiet for seconds at a time, like a stalling origin.
        "-flush_packets", "1",
        "-f", "mpegts", "pipe:1",
    ]  # fmt: skip


@dataclass
class TsOrigin:
    ffmpeg: str
    url: str = ""
    connections: int = 0
    """TS responses open right now."""
    total: dict[str, int] = field(default_factory=dict)
    """Requests per route name."""
    cut_after_bytes: int = 400_000
    keyframe_seconds: float = 1.0
    procs: set[asyncio.subprocess.Process] = field(default_factory=set)
    ended: list[str] = field(default_factory=list)
    """How each TS response ended (for failure messages)."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/live/stream.ts", self._gated)
        app.router.add_get("/live/mp2.ts", self._mp2)
        app.router.add_get("/ace/getstream", self._ace)
        app.router.add_get("/live/cut.ts", self._cut)
        app.router.add_get("/live/never.ts", self._never)
        app.router.add_get("/live/page.ts", self._html)
        app.router.add_get("/live/missing.ts", self._missing)
        app.on_shutdown.append(self._stop_streams)
        return app

    async def _stop_streams(self, app: web.Application) -> None:
        # Endless responses end when their ffmpeg does: stop them all so shutdown is quick,
        # and reap them here, before the server cancels its handlers (a process awaited by a
        # cancelled handler would be left with an open transport).
        procs = list(self.procs)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.gather(*(proc.wait() for proc in procs))

    def _count(self, name: str) -> None:
        self.total[name] = self.total.get(name, 0) + 1

    async def _gated(self, request: web.Request) -> web.StreamResponse:
        self._count("stream")
        if request.headers.get("Referer") != REFERER:
            return web.Response(status=403, text="hotlinking forbidden")
        return await self.stream(request)

    async def _mp2(self, request: web.Request) -> web.StreamResponse:
        self._count("mp2")
        return await self.stream(request, audio_codec="mp2")

    async def _ace(self, request: web.Request) -> web.StreamResponse:
        self._count("ace")
        if not _HEX40.match(request.query.get("id", "")):
            return web.json_response({"error": "bad id"}, status=400)
        return await self.stream(request)

    async def _cut(self, request: web.Request) -> web.StreamResponse:
        self._count("cut")
        return await self.stream(request, limit=self.cut_after_bytes)

    async def _never(self, request: web.Request) -> web.StreamResponse:
        self._count("never")
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def _html(self, request: web.Request) -> web.StreamResponse:
        self._count("page")
        return web.Response(
            body=b"<!DOCTYPE html><html><body>" + b"x" * 100_000 + b"</body></html>",
            headers={"Content-Type": "application/octet-stream"},
        )

    async def _missing(self, request: web.Request) -> web.StreamResponse:
        self._count("missing")
        return web.Response(status=404, text="no")

    async def stream(
        self, request: web.Request, *, audio_codec: str = "aac", limit: int | None = None
    ) -> web.StreamResponse:
        proc = await asyncio.create_subprocess_exec(
            *ts_args(self.ffmpeg, audio_codec=audio_codec, keyframe_seconds=self.keyframe_seconds),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.add(proc)
        response = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
        self.connections += 1
        sent = 0
        how = "ffmpeg ended"
        try:
            await response.prepare(request)
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(32 * 1024):
                if limit is not None and sent + len(chunk) > limit:
                    await response.write(chunk[: limit - sent])
                    break
                await response.write(chunk)
                sent += len(chunk)
            if request.transport is not None:
                request.transport.close()  # cut, not a clean end
        except ConnectionResetError:
            how = "viewer went away"
        except asyncio.CancelledError:
            how = "cancelled"
        finally:
            self.ended.append(f"{request.path}: {how} after {sent} bytes (rc={proc.returncode})")
            self.connections -= 1
            self.procs.discard(proc)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
        return response

"""ffmpeg on both ends: it packages an AES-128 HLS VOD, and it plays one back as a real client.

Also a Referer-gated static origin that serves the package, the way a hotlink-protected CDN does:
a request without the right ``Referer`` gets 403, so a playback that works proves the header
reached the origin on every request (multivariant, media playlists, key, segments).

Nothing here talks to the proxy; the test wires the pieces together.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

# Byte-exact output, no version strings: two runs of one input give the same framecrc text.
_QUIET = ("-nostdin", "-hide_banner", "-loglevel", "error")
_CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
    ".key": "application/octet-stream",
}
_TS_SYNC_BYTE = 0x47


def find_ffmpeg() -> str | None:
    """The system ffmpeg, else the one imageio-ffmpeg bundles, else None."""
    system = shutil.which("ffmpeg")
    if system is not None:
        return system
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    try:
        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except RuntimeError:  # the package is there but has no binary for this platform
        return None


@dataclass(frozen=True)
class EncryptedVod:
    """An AES-128 HLS VOD on disk.

    ``master.m3u8``, ``v{N}/index.m3u8``, ``v{N}/seg_*.ts`` and one ``enc.key`` for all variants.
    """

    root: Path
    variants: int
    seconds: int
    fps: int
    segment_names: tuple[tuple[str, ...], ...]
    """Per variant, the segment paths relative to ``root``."""

    @property
    def master(self) -> str:
        return "master.m3u8"


def package_encrypted_vod(
    ffmpeg: str, root: Path, *, seconds: int = 8, fps: int = 25, timeout_s: float = 120.0
) -> EncryptedVod:
    """Encode two renditions of ``testsrc2`` + ``sine`` and let ffmpeg's HLS muxer package them.

    The key URI in the media playlists is written relative and with a dot segment
    (``../enc.key``), as packagers commonly do, so the proxy has to resolve it (RFC 3986 §5.2)
    against each media playlist's URL. No IV is given: segments use their media sequence number.

    Synchronous on purpose: it runs in a session fixture before any server or event loop exists.
    """
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "enc.key"
    key_file.write_bytes(bytes(range(0x10, 0x20)))
    key_info = root.parent / f"{root.name}.keyinfo"
    key_info.write_text(f"../enc.key\n{key_file}\n")
    encoders = subprocess.run(
        [ffmpeg, *_QUIET, "-encoders"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    # The bundled and Debian builds have libx264; a build without it still gets a valid stream.
    if " libx264 " in encoders:
        video = ["-c:v", "libx264", "-preset", "ultrafast", "-sc_threshold", "0"]
    else:
        video = ["-c:v", "mpeg4", "-q:v", "5"]
    gop = 2 * fps
    args = [
        ffmpeg,
        *_QUIET,
        "-f", "lavfi", "-i", f"testsrc2=size=320x180:rate={fps}:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
        "-map", "0:v", "-map", "1:a", "-map", "0:v", "-map", "1:a",
        *video, "-g", str(gop), "-keyint_min", str(gop),
        "-force_key_frames", "expr:gte(t,n_forced*2)",
        "-filter:v:1", "scale=160:90",
        "-b:v:0", "400k", "-b:v:1", "150k",
        "-c:a", "aac", "-b:a", "64k",
        "-f", "hls",
        "-hls_time", "2",
        "-hls_playlist_type", "vod",
        "-hls_key_info_file", str(key_info),
        "-hls_segment_filename", str(root / "v%v" / "seg_%03d.ts"),
        "-master_pl_name", "master.m3u8",
        "-var_stream_map", "v:0,a:0 v:1,a:1",
        str(root / "v%v" / "index.m3u8"),
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg could not package the VOD:\n{done.stderr}")
    segments = []
    for variant in range(2):
        names = sorted(p.relative_to(root).as_posix() for p in (root / f"v{variant}").glob("*.ts"))
        if len(names) < 2:
            raise RuntimeError(f"ffmpeg wrote {len(names)} segments for variant {variant}")
        for name in names:
            if (root / name).read_bytes()[:1] == bytes([_TS_SYNC_BYTE]):
                raise RuntimeError(f"{name} starts with a TS sync byte: it is not encrypted")
        segments.append(tuple(names))
    return EncryptedVod(root, 2, seconds, fps, tuple(segments))


@dataclass(frozen=True)
class OriginRequest:
    path: str
    headers: CIMultiDict[str]
    status: int


@dataclass
class RefererGatedOrigin:
    """Serves ``root`` under ``/vod/``; 403 for any request whose Referer is not ``referer``."""

    root: Path
    referer: str
    seen: list[OriginRequest] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/vod/{path:.+}", self._serve)
        return app

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        status = 200
        response: web.StreamResponse
        target = (self.root / request.match_info["path"]).resolve()
        if request.headers.get("Referer") != self.referer:
            status = 403
            response = web.Response(status=403, text="hotlinking is not allowed")
        elif not target.is_relative_to(self.root.resolve()) or not target.is_file():
            status = 404
            response = web.Response(status=404, text="not here")
        else:
            content_type = _CONTENT_TYPES.get(target.suffix, "application/octet-stream")
            response = web.FileResponse(target, headers={"Content-Type": content_type})
        self.seen.append(OriginRequest(request.path, CIMultiDict(request.headers), status))
        return response


async def run_ffmpeg(ffmpeg: str, args: list[str], *, timeout_s: float) -> bytes:
    """Run ffmpeg without blocking the event loop; its stdout, or AssertionError with stderr.

    The process is killed and reaped on timeout, on failure and on cancellation.
    """
    proc = await asyncio.create_subprocess_exec(
        ffmpeg,
        *_QUIET,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        raise AssertionError(f"ffmpeg did not finish within {timeout_s} s: {args}") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise AssertionError(
            f"ffmpeg exited with {proc.returncode}: {args}\n{stderr.decode(errors='replace')}"
        )
    return stdout


@dataclass(frozen=True)
class StreamTotals:
    packets: int
    duration: int
    """Sum of packet durations, in the stream's time base."""
    size: int


def framecrc_packets(text: str) -> list[str]:
    """The packet lines of ``-f framecrc`` output (header lines start with ``#``)."""
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def framecrc_totals(text: str) -> dict[int, StreamTotals]:
    """Per stream index: packet count, summed duration and summed size."""
    packets: dict[int, int] = defaultdict(int)
    durations: dict[int, int] = defaultdict(int)
    sizes: dict[int, int] = defaultdict(int)
    for line in framecrc_packets(text):
        # stream, dts, pts, duration, size, crc[, flags, side data ...]
        fields = [part.strip() for part in line.split(",")]
        index = int(fields[0])
        packets[index] += 1
        durations[index] += int(fields[3])
        sizes[index] += int(fields[4])
    return {i: StreamTotals(packets[i], durations[i], sizes[i]) for i in sorted(packets)}


def first_difference(left: list[str], right: list[str]) -> str:
    """Where two framecrc listings part, for an assertion message."""
    for number, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return f"line {number}: direct {a!r} vs proxied {b!r}"
    return f"lengths differ: direct {len(left)} lines vs proxied {len(right)} lines"

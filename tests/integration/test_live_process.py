"""``hlsrelay serve`` as a real process with live sessions running: SIGTERM leaves no ffmpeg.

The server plays two channels (the lavfi demo, whose source is itself an ffmpeg, and a TS
channel from a real origin), so it has three ffmpeg children. After SIGTERM it must exit 0
having reaped all of them: no process whose parent or process group was the server's or one
of its children's may remain (found by scanning /proc).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.errors import ServiceUnavailable
from proxy.live.process import find_ffmpeg
from tests.live_origin import REFERER, TsOrigin
from tests.procs import free_port, process_table

try:
    FFMPEG: str | None = find_ffmpeg("auto")
except ServiceUnavailable:
    FFMPEG = None

pytestmark = [
    pytest.mark.ffmpeg,
    pytest.mark.skipif(FFMPEG is None, reason="no ffmpeg on PATH and none from imageio-ffmpeg"),
]
REPO = Path(__file__).resolve().parents[2]


def related(root: int) -> set[int]:
    """Live processes whose parent or group is ``root`` or one of its descendants."""
    table = process_table()
    family = {root}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, pgid, state) in table.items():
            if pid not in family and state != "Z" and (ppid in family or pgid in family):
                family.add(pid)
                grew = True
    return family - {root}


@pytest.fixture
async def ts_origin(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TsOrigin:
    assert FFMPEG is not None
    origin = TsOrigin(FFMPEG)
    server = await aiohttp_server(origin.app())
    origin.url = str(server.make_url("")).rstrip("/")
    return origin


async def test_sigterm_with_sessions_running_reaps_every_ffmpeg(
    ts_origin: TsOrigin, tmp_path: Path
) -> None:
    config = tmp_path / "hlsrelay.toml"
    config.write_text(
        f"""
[security]
secret = "process-test-secret-0123456789"
[upstream]
allow_networks = ["127.0.0.0/8"]
[live]
segment_seconds = 1.0
[[channels]]
id = "demo"
url = "lavfi:testsrc2=size=160x90:rate=25"
[[channels]]
id = "tv"
url = "{ts_origin.url}/live/stream.ts"
headers = {{ Referer = "{REFERER}" }}
"""
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HLSRELAY_")}
    env["HLSRELAY_SERVER__PORT"] = str(port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config),
        env=env, cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    children: set[int] = set()
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            for channel in ("demo", "tv"):
                url = f"http://127.0.0.1:{port}/live/{channel}/index.m3u8"
                async with session.get(url) as resp:
                    assert resp.status == 200, await resp.text()
            # A raw-TS viewer stays connected through the shutdown.
            viewer = await session.get(f"http://127.0.0.1:{port}/live/tv.ts")
            assert viewer.status == 200
            await viewer.content.readexactly(188 * 10)
            children = related(proc.pid)
            assert len(children) >= 3  # demo source + demo segmenter + tv segmenter
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            # Live sessions stop at shutdown, not after the whole shutdown_timeout.
            assert time.monotonic() - started < 8
            viewer.close()
        remaining = [pid for pid in children if pid in process_table()]
        remaining = [pid for pid in remaining if process_table()[pid][2] != "Z"]
        assert remaining == []
        assert related(proc.pid) == set()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in children:  # never leave one behind, even when the test failed
            if _is_ffmpeg(pid):  # only ours: a recycled pid of something else is left alone
                os.kill(pid, signal.SIGKILL)


def _is_ffmpeg(pid: int) -> bool:
    try:
        return b"ffmpeg" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False

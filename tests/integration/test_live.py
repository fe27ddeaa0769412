"""Live ``ts`` channels end to end: a real TS origin (ffmpeg), the real app, real ffmpeg pool.

Segments are 1 s to keep the suite quick. ffmpeg also plays the proxied window as an HLS client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.errors import ServiceUnavailable
from proxy.live.process import find_ffmpeg
from proxy.web.keys import CHANNELS, LIVE, METRICS, SETTINGS
from tests.conftest import ProxyFactory
from tests.live_origin import REFERER, TsOrigin

try:
    FFMPEG: str | None = find_ffmpeg("auto")
except ServiceUnavailable:
    FFMPEG = None

pytestmark = [
    pytest.mark.ffmpeg,
    pytest.mark.skipif(FFMPEG is None, reason="no ffmpeg on PATH and none from imageio-ffmpeg"),
]

HASH = "0123456789abcdef0123456789abcdef01234567"
LIVE_TEST = {
    "segment_seconds": 1.0,
    "window_segments": 4,
    "start_timeout": 12.0,
    "idle_timeout": 30.0,
    "restart_max_backoff": 2.0,
}


@pytest.fixture
async def ts_origin(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TsOrigin:
    assert FFMPEG is not None
    origin = TsOrigin(FFMPEG)
    server = await aiohttp_server(origin.app())
    origin.url = str(server.make_url("")).rstrip("/")
    return origin


async def start(proxy_factory: ProxyFactory, channels: list[dict[str, Any]], **live: Any) -> Any:
    # A read timeout with room for a loaded CI machine: a spurious reconnect would fail the
    # "exactly one upstream connection" checks.
    upstream = {"read_timeout": 6.0}
    return await proxy_factory(live={**LIVE_TEST, **live}, channels=channels, upstream=upstream)


def segments_of(playlist: str) -> list[int]:
    return [int(line[:-3]) for line in playlist.splitlines() if line.endswith(".ts")]


async def wait_until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def metric(client: TestClient[Any, Any], name: str, **labels: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def test_one_upstream_hls_window_raw_ts_and_ffmpeg_plays_it(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin
) -> None:
    client = await start(
        proxy_factory,
        [
            {
                "id": "c1",
                "url": f"{ts_origin.url}/live/stream.ts",
                "headers": {"Referer": REFERER},
            }
        ],
    )
    started = time.monotonic()
    resp = await client.get("/live/c1/index.m3u8")
    assert resp.status == 200, await resp.text()
    first_playlist = time.monotonic() - started
    assert resp.headers["Content-Type"] == "application/vnd.apple.mpegurl"
    text = await resp.text()
    assert "#EXT-X-TARGETDURATION:" in text and "#EXT-X-PROGRAM-DATE-TIME:" in text
    assert first_playlist < 12
    seq = segments_of(text)
    seg = await client.get(f"/live/c1/{seq[0]}.ts")
    assert seg.status == 200
    data = await seg.read()
    assert data[0] == 0x47 and len(data) % 188 == 0

    # Raw TS viewers and many HLS reloads share the one upstream connection.
    async def read_ts() -> bytes:
        async with client.session.get(client.make_url("/live/c1.ts")) as r:
            assert r.status == 200
            return await r.content.readexactly(188 * 200)

    reads = await asyncio.gather(*(read_ts() for _ in range(3)))
    assert all(r[0] == 0x47 for r in reads)
    for _ in range(5):
        assert (await client.get("/live/c1/index.m3u8")).status == 200
    assert ts_origin.total["stream"] == 1 and ts_origin.connections == 1

    # ffmpeg as the HLS client: plays 3 s of the proxied window.
    assert FFMPEG is not None
    proc = await asyncio.create_subprocess_exec(
        FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error",
        "-i", str(client.make_url("/live/c1/index.m3u8")),
        "-t", "3", "-map", "0", "-c", "copy", "-f", "framecrc", "-",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 0, err.decode()
    frames = [line for line in out.decode().splitlines() if not line.startswith("#")]
    assert len({line.split(",")[0] for line in frames}) == 2  # video and audio streams
    assert len(frames) > 50
    assert ts_origin.total["stream"] == 1

    doc = await (await client.get("/api/v1/channels")).json()
    assert doc["channels"][0]["state"] == "live"
    assert metric(client, "hlsrelay_live_sessions") == 1
    assert metric(client, "hlsrelay_live_ffmpeg_processes") == 1


async def test_referer_is_required_and_the_error_is_clear(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin
) -> None:
    client = await start(proxy_factory, [{"id": "c", "url": f"{ts_origin.url}/live/stream.ts"}])
    started = time.monotonic()
    resp = await client.get("/live/c/index.m3u8")
    assert resp.status == 502
    assert (await resp.json())["error"] == {
        "code": "upstream_status",
        "message": "upstream answered 403",
    }
    assert time.monotonic() - started < 5


async def test_acestream_channel_plays_through_the_engine(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin
) -> None:
    client = await start(
        proxy_factory,
        [{"id": "ace", "url": f"acestream://{HASH}"}],
        acestream_engine=ts_origin.url,
    )
    resp = await client.get("/live/ace/index.m3u8")
    assert resp.status == 200, await resp.text()
    assert ts_origin.total["ace"] == 1


async def test_kill_9_of_ffmpeg_restarts_with_a_discontinuity(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin
) -> None:
    client = await start(
        proxy_factory,
        [{"id": "k", "url": f"{ts_origin.url}/live/stream.ts", "headers": {"Referer": REFERER}}],
    )
    before = segments_of(await (await client.get("/live/k/index.m3u8")).text())
    session = client.app[LIVE].session("k")
    assert session is not None and session.proc is not None
    old_pid = session.proc.pid
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    async def restarted() -> bool:
        text = await (await client.get("/live/k/index.m3u8")).text()
        return "#EXT-X-DISCONTINUITY\n" in text

    await wait_until(restarted, 15, "segments after the restart")
    recovered = time.monotonic() - killed_at
    text = await (await client.get("/live/k/index.m3u8")).text()
    after = segments_of(text)
    assert after[-1] > before[-1]
    assert after == sorted(after) and len(set(after)) == len(after)
    assert session.proc is None or session.proc.pid != old_pid
    assert metric(client, "hlsrelay_live_ffmpeg_restarts_total", channel="k") >= 1
    # The source connection survived the restart.
    assert ts_origin.total["stream"] == 1, ts_origin.ended
    assert recovered < 15
    assert not _alive(old_pid)


async def test_upstream_cut_mid_stream_reconnects(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin
) -> None:
    ts_origin.cut_after_bytes = 150_000  # about 2-3 s of the test stream
    client = await start(proxy_factory, [{"id": "cut", "url": f"{ts_origin.url}/live/cut.ts"}])
    assert (await client.get("/live/cut/index.m3u8")).status == 200

    async def reconnected() -> bool:
        text = await (await client.get("/live/cut/index.m3u8")).text()
        return ts_origin.total["cut"] >= 2 and "#EXT-X-DISCONTINUITY\n" in text

    await wait_until(reconnected, 20, "a reconnect with a discontinuity")
    assert metric(client, "hlsrelay_live_source_reconnects_total", channel="cut") >= 1


async def test_upstream_that_never_answers_times_out(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin
) -> None:
    client = await start(proxy_factory, [{"id": "n", "url": f"{ts_origin.url}/live/never.ts"}])
    started = time.monotonic()
    resp = await client.get("/live/n/index.m3u8")
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 8


async def test_source_that_is_not_ts_fails_clearly_and_backs_off(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin
) -> None:
    client = await start(proxy_factory, [{"id": "p", "url": f"{ts_origin.url}/live/page.ts"}])
    resp = await client.get("/live/p/index.m3u8")
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "source_not_ts"
    assert "HTML" in error["message"]
    # A raw-TS viewer gets the same error as a status, not a 200 that never sends a byte.
    resp = await client.get("/live/p.ts")
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "source_not_ts"
    await asyncio.sleep(3)
    # Backed off (0.5 s, 1 s, 2 s… with jitter): a handful of attempts, not a loop.
    assert ts_origin.total["page"] <= 5
    assert metric(client, "hlsrelay_live_ffmpeg_processes") == 0


async def test_backup_url_takes_over(proxy_factory: ProxyFactory, ts_origin: TsOrigin) -> None:
    client = await start(
        proxy_factory,
        [
            {
                "id": "b",
                "url": f"{ts_origin.url}/live/missing.ts",
                "backup_urls": [f"{ts_origin.url}/live/mp2.ts"],
                "kind": "ts",
            }
        ],
    )
    resp = await client.get("/live/b/index.m3u8")
    assert resp.status == 200, await resp.text()
    assert ts_origin.total["missing"] == 1 and ts_origin.total["mp2"] == 1
    session = client.app[LIVE].session("b")
    assert session is not None
    # MP2 audio does not play in browsers: "auto" re-encodes it to AAC.
    assert session.transcode_audio


async def test_max_sessions_idle_stop_and_cleanup(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin
) -> None:
    channels = [
        {"id": f"m{i}", "url": f"{ts_origin.url}/ace/getstream?id={HASH}"} for i in range(2)
    ]
    client = await start(proxy_factory, channels, max_sessions=1, idle_timeout=1.0)
    assert (await client.get("/live/m0/index.m3u8")).status == 200
    resp = await client.get("/live/m1/index.m3u8")
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "service_unavailable"
    session = client.app[LIVE].session("m0")
    assert session is not None
    workdir = session._dir
    assert workdir is not None and workdir.is_dir()

    async def stopped() -> bool:
        return client.app[LIVE].session("m0") is None

    # Idle after two target durations without a viewer, plus idle_timeout.
    await wait_until(stopped, 10, "the idle session to stop")
    assert not workdir.exists()
    assert metric(client, "hlsrelay_live_ffmpeg_processes") == 0
    assert metric(client, "hlsrelay_live_sessions") == 0
    assert ts_origin.connections == 0
    last = session.window.last_sequence
    assert (await client.get("/live/m1/index.m3u8")).status == 200
    # The same channel again: a new session whose sequence numbers continue above the old.
    await client.app[LIVE].stop("m1")
    text = await (await client.get("/live/m0/index.m3u8")).text()
    assert segments_of(text)[0] > last


async def test_segment_not_in_window_is_a_short_404(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin
) -> None:
    client = await start(
        proxy_factory, [{"id": "s", "url": f"{ts_origin.url}/ace/getstream?id={HASH}"}]
    )
    resp = await client.get("/live/s/5.ts")
    assert resp.status == 404
    assert (await client.get("/live/s/index.m3u8")).status == 200
    assert (await client.get("/live/s/1.ts")).status == 404
    assert (await client.get("/live/s/..%2Fx.ts")).status == 404


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return re.search(r"\) [ZX] ", status) is None


async def test_ffmpeg_that_dies_at_once_is_backed_off(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin, tmp_path: Path
) -> None:
    broken = tmp_path / "ffmpeg"
    broken.write_text("#!/bin/sh\necho 'Invalid data found when processing input' >&2\nexit 1\n")
    broken.chmod(0o755)
    client = await start(
        proxy_factory,
        [{"id": "x", "url": f"{ts_origin.url}/ace/getstream?id={HASH}"}],
        ffmpeg=str(broken),
    )
    resp = await client.get("/live/x/index.m3u8")
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "live_ffmpeg_failed"
    assert "Invalid data found" in error["message"]
    await asyncio.sleep(3)
    session = client.app[LIVE].session("x")
    assert session is not None
    # 0.5 s, 1 s, 2 s (capped at restart_max_backoff = 2 s here), jittered: not a spawn loop.
    assert session.ffmpeg_runs <= 5
    assert ts_origin.total["ace"] == 1  # the source stayed connected all along


async def test_list_reload_keeps_playing_sessions(
    proxy_factory: ProxyFactory, ts_origin: TsOrigin, tmp_path: Path
) -> None:
    listed = tmp_path / "list.m3u"
    listed.write_text(f'#EXTM3U\n#EXTINF:-1 tvg-id="l1",L1\n{ts_origin.url}/live/mp2.ts\n')
    client = await proxy_factory(
        live=LIVE_TEST, channel_lists=[{"path": str(listed), "refresh_interval": 0}]
    )
    catalog = client.app[CHANNELS]
    for _ in range(100):
        if catalog.get("l1"):
            break
        await asyncio.sleep(0.02)
    assert (await client.get("/live/l1/index.m3u8")).status == 200
    session = client.app[LIVE].session("l1")
    listed.write_text(f'#EXTM3U\n#EXTINF:-1 tvg-id="l2",L2\n{ts_origin.url}/live/mp2.ts\n')
    await catalog.load(0, client.app[SETTINGS].channel_lists[0])
    assert catalog.get("l1") is None and catalog.get("l2") is not None
    # The playing session is untouched; a new viewer of the gone channel gets a 404.
    assert client.app[LIVE].session("l1") is session
    assert (await client.get(f"/live/l1/{session.window.last_sequence}.ts")).status == 200
    assert (await client.get("/live/l1/index.m3u8")).status == 404
    assert metric(client, "hlsrelay_live_viewers", channel="other") >= 1


async def test_stalled_ffmpeg_is_replaced(proxy_factory: ProxyFactory, ts_origin: TsOrigin) -> None:
    client = await start(
        proxy_factory, [{"id": "st", "url": f"{ts_origin.url}/ace/getstream?id={HASH}"}]
    )
    before = segments_of(await (await client.get("/live/st/index.m3u8")).text())
    session = client.app[LIVE].session("st")
    assert session is not None and session.proc is not None
    frozen = session.proc.pid
    os.kill(frozen, signal.SIGSTOP)  # alive but silent: only the stall timer can notice
    try:

        async def replaced() -> bool:
            text = await (await client.get("/live/st/index.m3u8")).text()
            return "#EXT-X-DISCONTINUITY\n" in text and segments_of(text)[-1] > before[-1]

        await wait_until(replaced, 20, "a new ffmpeg after the stall")
        assert not _alive(frozen)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)


async def test_a_caller_cancelled_while_stopping_a_session_is_cancelled_after_the_stop(
    proxy_factory: ProxyFactory,
) -> None:
    # The live sweeper, cancelled at shutdown while it stopped a session: the stop finishes
    # (nothing left behind) and the cancellation reaches the sweeper, which must end. (Skipped
    # without ffmpeg, as every test here: the module's pytestmark.)
    client = await proxy_factory(
        live={"segment_seconds": 1.0},
        channels=[{"id": "demo", "url": "lavfi:testsrc2=size=160x90:rate=25"}],
    )
    assert (await client.get("/live/demo/index.m3u8")).status == 200
    pool = client.app[LIVE]
    session = pool.session("demo")
    assert session is not None and session.proc is not None
    workdir, proc = session._dir, session.proc
    assert workdir is not None and workdir.is_dir()
    stopper = asyncio.create_task(pool.stop("demo"))
    await asyncio.sleep(0)  # the stopper is in the stop, waiting for the session's tasks
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopper, 10)
    assert stopper.cancelled()  # not swallowed
    assert not workdir.exists()  # and the stop was finished all the same
    assert proc.returncode is not None
    assert pool.session("demo") is None
    await session.stop()  # again: the one stop, already done

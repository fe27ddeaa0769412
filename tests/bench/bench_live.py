"""Benchmarks of live ``ts`` channels: cold start, fan-out, recovery, cost of one channel.

Each phase runs hlsrelay as deployed (``python -m proxy serve`` in its own process, a config
written for the phase) against a real TS origin in this process (``tests.live_origin``: ffmpeg
makes the stream in real time, a keyframe every 2 s). Figures:

* cold start: first request of a channel nobody watches → a playlist with a playable segment,
  2 s segments (the origin's ffmpeg start-up is included: pessimistic for a provider stream
  that is already running, optimistic in that its first keyframe comes at once);
* 50 viewers (40 HLS clients polling the playlist and fetching every new segment, 10 raw-TS
  readers) for 12 s → upstream connections the origin saw;
* kill -9 of the channel's ffmpeg → time to the first new segment, discontinuity, sequence;
* one copy-remuxed 5 Mbit/s channel (a CBR 1280x720 file looped in real time by the origin
  with ``-c copy``) with one HLS viewer → CPU and RSS of the proxy process and of its ffmpeg,
  from /proc, over 15 s;
* parsing a 10,000-channel M3U list.

Nothing here asserts a timing. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.channels.catalog import listed_channels, merge
from proxy.channels.m3u import parse_m3u
from proxy.live.process import find_ffmpeg
from tests.bench.bench_core import Spread, machine
from tests.live_origin import REFERER, TsOrigin
from tests.procs import free_port

REPO = Path(__file__).resolve().parents[2]
COLD_ROUNDS = 5
KILL_ROUNDS = 3
VIEWERS_HLS, VIEWERS_TS, VIEWERS_SECONDS = 40, 10, 12.0
CPU_SECONDS = 15.0
SEGMENT_SECONDS = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@contextlib.asynccontextmanager
async def origin_server(
    origin: TsOrigin, extra: web.Application | None = None
) -> AsyncIterator[str]:
    app = origin.app()
    if extra is not None:
        app.add_subapp("/extra", extra)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    origin.url = f"http://127.0.0.1:{port}"
    try:
        yield origin.url
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def hlsrelay(channels: list[tuple[str, str]], **live: Any) -> AsyncIterator[tuple[str, int]]:
    """A real ``python -m proxy serve`` with these (id, url) ts channels; yields (url, pid)."""
    port = free_port()
    live_conf = {"segment_seconds": SEGMENT_SECONDS, "max_sessions": 20, **live}
    lines = [
        "[security]",
        'secret = "bench-live-secret-0123456789"',
        "[upstream]",
        'allow_networks = ["127.0.0.0/8"]',
        "[live]",
        *(
            f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
            for k, v in live_conf.items()
        ),
    ]
    for cid, url in channels:
        lines += [
            "[[channels]]",
            f'id = "{cid}"',
            f'url = "{url}"',
            'kind = "ts"',
            f'headers = {{ Referer = "{REFERER}" }}',
        ]
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        config = Path(tmp) / "hlsrelay.toml"
        config.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HLSRELAY_")}
        env["HLSRELAY_SERVER__PORT"] = str(port)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config),
            env=env, cwd=REPO, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(200):
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with session.get(f"{base}/healthz") as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.05)
            yield base, proc.pid
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def segments_of(text: str) -> list[int]:
    return [int(line[:-3]) for line in text.splitlines() if line.endswith(".ts")]


def children(pid: int) -> dict[int, str]:
    """Child pids of ``pid`` with their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().decode()
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * PAGE / 2**20


# -- phases ------------------------------------------------------------------------------------


async def cold_start(origin: TsOrigin) -> list[float]:
    times = []
    channels = [(f"cold{i}", f"{origin.url}/live/stream.ts") for i in range(COLD_ROUNDS)]
    async with hlsrelay(channels) as (base, _), aiohttp.ClientSession() as session:
        for cid, _url in channels:
            started = time.perf_counter()
            async with session.get(f"{base}/live/{cid}/index.m3u8") as resp:
                text = await resp.text()
                assert resp.status == 200, text
            async with session.get(f"{base}/live/{cid}/{segments_of(text)[0]}.ts") as resp:
                assert resp.status == 200
                await resp.read()
            times.append(time.perf_counter() - started)
            await asyncio.sleep(1.0)
    return times


async def fan_out(origin: TsOrigin) -> dict[str, Any]:
    before = origin.total.get("stream", 0)
    stop = asyncio.Event()
    got = {"segments": 0, "ts_bytes": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        hlsrelay([("fan", f"{origin.url}/live/stream.ts")]) as (base, _pid),
        aiohttp.ClientSession(connector=connector) as session,
    ):

        async def hls_viewer(n: int) -> None:
            # Players are told apart by address and User-Agent: one UA per simulated player.
            ua = {"User-Agent": f"bench-player/{n}"}
            seen: set[int] = set()
            while not stop.is_set():
                async with session.get(f"{base}/live/fan/index.m3u8", headers=ua) as resp:
                    if resp.status != 200:
                        got["errors"] += 1
                        await asyncio.sleep(1)
                        continue
                    text = await resp.text()
                for seq in segments_of(text)[-2:]:
                    if seq not in seen:
                        seen.add(seq)
                        async with session.get(f"{base}/live/fan/{seq}.ts", headers=ua) as seg:
                            if seg.status == 200:
                                got["segments"] += 1
                                await seg.read()
                            else:
                                got["errors"] += 1
                await asyncio.sleep(SEGMENT_SECONDS / 2)

        async def ts_viewer() -> None:
            async with session.get(f"{base}/live/fan.ts") as resp:
                while not stop.is_set():
                    chunk = await resp.content.readany()
                    if not chunk:
                        got["errors"] += 1
                        return
                    got["ts_bytes"] += len(chunk)

        tasks = [asyncio.create_task(hls_viewer(n)) for n in range(VIEWERS_HLS)]
        tasks += [asyncio.create_task(ts_viewer()) for _ in range(VIEWERS_TS)]
        await asyncio.sleep(VIEWERS_SECONDS)
        async with session.get(f"{base}/api/v1/channels") as resp:
            viewers = (await resp.json())["channels"][0]["viewers"]
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "upstream": origin.total.get("stream", 0) - before,
        "viewers": viewers,
        **got,
    }


async def kill_recovery(origin: TsOrigin) -> list[dict[str, Any]]:
    results = []
    async with (
        hlsrelay([("k", f"{origin.url}/live/stream.ts")], restart_max_backoff=5.0) as (
            base,
            pid,
        ),
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{base}/live/k/index.m3u8") as resp:
            await resp.text()
        for _ in range(KILL_ROUNDS):
            segmenter = [p for p, cmd in children(pid).items() if "segment_list" in cmd]
            async with session.get(f"{base}/live/k/index.m3u8") as resp:
                last_before = segments_of(await resp.text())[-1]
            os.kill(segmenter[0], signal.SIGKILL)
            killed = time.perf_counter()
            while True:
                async with session.get(f"{base}/live/k/index.m3u8") as resp:
                    text = await resp.text()
                if any(seq > last_before for seq in segments_of(text)) and (
                    "#EXT-X-DISCONTINUITY\n" in text
                ):
                    break
                await asyncio.sleep(0.05)
            results.append(
                {
                    "seconds": time.perf_counter() - killed,
                    "discontinuity": "#EXT-X-DISCONTINUITY\n" in text,
                    "grew": segments_of(text)[-1] > last_before,
                }
            )
            await asyncio.sleep(SEGMENT_SECONDS * 2)
    return results


async def hd_cost(ffmpeg: str, workdir: Path) -> dict[str, float]:
    source = workdir / "hd.ts"
    await asyncio.to_thread(
        subprocess.run,
        [
            ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25,noise=alls=30:allf=t",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-t", "20", "-c:v", "libx264", "-preset", "ultrafast", "-b:v", "4800k",
            "-minrate", "4800k", "-maxrate", "4800k", "-bufsize", "2400k",
            "-x264-params", "nal-hrd=cbr:force-cfr=1", "-g", "50",
            "-c:a", "aac", "-b:a", "128k", "-muxrate", "5200k", "-f", "mpegts", str(source),
        ],
        check=True,
    )  # fmt: skip
    bitrate = source.stat().st_size * 8 / 20 / 1e6
    procs: set[asyncio.subprocess.Process] = set()

    async def hd(request: web.Request) -> web.StreamResponse:
        proc = await asyncio.create_subprocess_exec(
            ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1",
            "-i", str(source), "-c", "copy", "-f", "mpegts", "pipe:1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        procs.add(proc)
        response = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
        try:
            await response.prepare(request)
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(64 * 1024):
                await response.write(chunk)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            procs.discard(proc)
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        return response

    extra = web.Application()
    extra.router.add_get("/hd.ts", hd)
    origin = TsOrigin(ffmpeg)
    async with (
        origin_server(origin, extra) as url,
        hlsrelay([("hd", f"{url}/extra/hd.ts")]) as (
            base,
            pid,
        ),
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{base}/live/hd/index.m3u8") as resp:
            await resp.text()
        await asyncio.sleep(SEGMENT_SECONDS * 2)
        segmenter = next(p for p, cmd in children(pid).items() if "segment_list" in cmd)
        proxy_cpu, ff_cpu = cpu_seconds(pid), cpu_seconds(segmenter)
        started = time.perf_counter()
        seen: set[int] = set()
        rss_proxy, rss_ff = 0.0, 0.0
        while time.perf_counter() - started < CPU_SECONDS:
            async with session.get(f"{base}/live/hd/index.m3u8") as resp:
                text = await resp.text()
            for seq in segments_of(text)[-1:]:
                if seq not in seen:
                    seen.add(seq)
                    async with session.get(f"{base}/live/hd/{seq}.ts") as seg:
                        await seg.read()
            rss_proxy = max(rss_proxy, rss_mib(pid))
            rss_ff = max(rss_ff, rss_mib(segmenter))
            await asyncio.sleep(SEGMENT_SECONDS / 2)
        wall = time.perf_counter() - started
        return {
            "bitrate": bitrate,
            "proxy_cpu": (cpu_seconds(pid) - proxy_cpu) / wall * 100,
            "ffmpeg_cpu": (cpu_seconds(segmenter) - ff_cpu) / wall * 100,
            "proxy_rss": rss_proxy,
            "ffmpeg_rss": rss_ff,
        }


def parse_10k() -> list[float]:
    text = "#EXTM3U\n" + "".join(
        f'#EXTINF:-1 tvg-id="ch{i}.tv" tvg-name="Channel {i}" tvg-logo="http://logo/{i}.png" '
        f'group-title="Group {i % 20}" tvg-chno="{i}",Channel {i}\n'
        f"#EXTVLCOPT:http-referrer=http://ref/{i}\n"
        f"http://provider.example:8080/live/user/pass/{i}.ts\n"
        for i in range(10_000)
    )
    times = []
    for _ in range(5):
        started = time.perf_counter()
        merge([], listed_channels(parse_m3u(text).entries, "http://127.0.0.1:6878"))
        times.append(time.perf_counter() - started)
    return times


async def _run() -> str:
    ffmpeg = find_ffmpeg("auto")
    origin = TsOrigin(ffmpeg, keyframe_seconds=SEGMENT_SECONDS)
    async with origin_server(origin):
        cold = await cold_start(origin)
        fan = await fan_out(origin)
        kills = await kill_recovery(origin)
    with tempfile.TemporaryDirectory(prefix="bench-live-hd-") as tmp:
        cost = await hd_cost(ffmpeg, Path(tmp))
    parse = parse_10k()
    done = await asyncio.to_thread(
        subprocess.run, [ffmpeg, "-version"], capture_output=True, text=True, check=True
    )
    version = done.stdout.splitlines()[0]
    facts = machine()
    rows = [
        "## Live channels (`python -m tests.bench.bench_live`)",
        "",
        "| figure | result |",
        "|---|---|",
        f"| cold `ts` channel → playable playlist + first segment, 2 s segments "
        f"({COLD_ROUNDS} rounds) | {Spread.of(cold).show('s')} |",
        f"| {VIEWERS_HLS} HLS + {VIEWERS_TS} raw-TS viewers, {VIEWERS_SECONDS:g} s → upstream "
        f"connections | {fan['upstream']} (viewers counted: {fan['viewers']}; segments served: "
        f"{fan['segments']}; raw TS: {fan['ts_bytes'] / 2**20:.1f} MiB; errors: {fan['errors']}) |",
        f"| kill -9 of ffmpeg → first new segment ({KILL_ROUNDS} rounds) | "
        f"{Spread.of([k['seconds'] for k in kills]).show('s')}; discontinuity: "
        f"{all(k['discontinuity'] for k in kills)}; "
        f"sequence grew: {all(k['grew'] for k in kills)} |",
        f"| one {cost['bitrate']:.1f} Mbit/s channel copy-remuxed, 1 HLS viewer: CPU "
        f"(% of one core) | proxy {cost['proxy_cpu']:.1f} %, "
        f"ffmpeg {cost['ffmpeg_cpu']:.1f} % |",
        f"| same: peak RSS | proxy {cost['proxy_rss']:.0f} MiB, "
        f"ffmpeg {cost['ffmpeg_rss']:.0f} MiB |",
        f"| parse a 10,000-channel M3U (parse + ids) | {Spread.of(parse).show('s', 3)} |",
        "",
        "Command: `python -m tests.bench.bench_live`. Machine: "
        + "; ".join(f"{k}: {v}" for k, v in {**facts, "ffmpeg": version}.items()),
        "",
    ]
    return "\n".join(rows)


def run() -> str:
    return asyncio.run(_run())


if __name__ == "__main__":
    print(run())

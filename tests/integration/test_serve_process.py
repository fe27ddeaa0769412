"""``hlsrelay serve`` as a real process: graceful SIGTERM, and logs that keep secrets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.hls.kinds import UriKind
from proxy.tokens import TokenCodec
from tests.origin import Origin
from tests.procs import free_port

SECRET = "process-test-secret-0123456789"
REPO = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def serve(
    port: int, *extra_env: tuple[str, str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {
        **os.environ,
        "HLSRELAY_SERVER__PORT": str(port),
        "HLSRELAY_SECURITY__SECRET": SECRET,
        "HLSRELAY_UPSTREAM__ALLOW_NETWORKS": '["127.0.0.0/8"]',
        "HLSRELAY_SERVER__LOG_FORMAT": "json",
        "HLSRELAY_SERVER__SHUTDOWN_TIMEOUT": "5",
        **dict(extra_env),
    }
    env.pop("HLSRELAY_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(REPO / "config" / "hlsrelay.toml"),
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("hlsrelay did not come up")
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def stream_url(port: int, upstream: str, headers: dict[str, str]) -> str:
    codec = TokenCodec(SECRET.encode())
    ctx_token = codec.mint_context(upstream, headers)
    path = codec.child_path(ctx_token, codec.open_context(ctx_token), upstream, UriKind.MEDIA)
    return f"http://127.0.0.1:{port}/s/{ctx_token}/{path}"


async def test_sigterm_lets_in_flight_responses_finish_and_logs_keep_secrets(
    origin: Origin,
) -> None:
    chunk, chunks = b"\x47" * 188 * 100, 20

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "video/mp2t", "Content-Length": str(len(chunk) * chunks)}
        )
        await response.prepare(request)
        for _ in range(chunks):
            await response.write(chunk)
            await asyncio.sleep(0.1)
        return response

    origin.routes["/live/seg.ts"] = trickle
    origin.playlist("/live/index.m3u8", "#EXTM3U\n#EXTINF:2,\nseg.ts\n")
    port = free_port()
    cookie = "session=VIEWER-COOKIE-VALUE"
    upstream = f"{origin.url}/live/seg.ts?token=UPSTREAM-CREDENTIAL"
    async with serve(port) as proc:
        url = stream_url(port, upstream, {"Cookie": cookie})
        async with aiohttp.ClientSession() as session:
            playlist = stream_url(port, f"{origin.url}/live/index.m3u8", {"Cookie": cookie})
            async with session.get(playlist) as resp:
                assert resp.status == 200
            async with session.get(url) as resp:
                assert resp.status == 200
                first = await resp.content.readexactly(len(chunk))
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                # Stopped accepting: a new connection is refused while the download goes on.
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with aiohttp.ClientSession() as other:
                        await other.get(f"http://127.0.0.1:{port}/healthz")
                rest = await resp.read()
        assert len(first) + len(rest) == len(chunk) * chunks
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert proc.stdout is not None
        logs = (await proc.stdout.read()).decode()
    assert '"route":"stream"' in logs
    for secret in (SECRET, "VIEWER-COOKIE-VALUE", "UPSTREAM-CREDENTIAL", url.split("/s/")[1][:40]):
        assert secret not in logs


async def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[upstream]\nconnect_timeout = -1\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(bad),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1
    assert "upstream.connect_timeout" in lines[0]

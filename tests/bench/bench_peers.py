"""hlsrelay side by side with nginx and mediaflow-proxy, in one run, on loopback.

Contestants, each pinned to one core (the first usable one) with ``taskset``:

* **hlsrelay**: one process, uvloop (``python -m proxy serve``, shipped config plus env
  overrides); URLs minted with :class:`~proxy.tokens.TokenCodec` under the same secret;
* **nginx as a reverse proxy**, one worker, upstream keep-alive, the Referer set on every
  upstream request: default buffering (temp files allowed), in-memory buffers
  (``proxy_buffers 32 64k; proxy_max_temp_file_size 0``), and in-memory buffers with
  ``proxy_cache`` (plus ``proxy_cache_lock``) for the cached and coalescing cases;
* **mediaflow-proxy**, the Python peer: PyPI ``mediaflow-proxy`` installed by this bench into its
  own virtual environment under ``tests/bench/.work/`` (ignored by git, never imported here),
  run with uvicorn (one worker) on 127.0.0.1, with ``api_password`` set and HLS pre-buffering
  off (hlsrelay prefetches nothing by default either). Its URLs are the ones its own playlist
  rewriting produces: ``/proxy/hls/manifest.m3u8?d=...`` and ``/proxy/hls/segment.ts?d=...``.

The origin is nginx serving static files from a temp dir (2 MiB and 1 KiB segments, a 6-segment
live media playlist, a 3,000-segment VOD playlist); it answers 403 unless the Referer a contestant
must inject is there. Every URL of a timed run is one no contestant has seen before (the origin
ignores the query and serves any ``/media/seg_*.ts`` name from one file), so caches and request
coalescing only help where a case says so. The load comes from ``wrk`` (Lua script walking a
list of such URLs) pinned, with the origin and this process, to the other cores.

Every contestant is checked on every case before it is timed (exact bytes; a playlist's URIs all
resolve back through the contestant and lead to the right bytes); one failing a case is reported
as failing it, with the reason, and not timed. Event-loop stalls of hlsrelay come from its own
``hlsrelay_event_loop_lag_seconds`` histogram (a timer due every 10 ms, how late it ran), read
from its ``/metrics`` just before and just after each timed run: the difference says how many
wake-ups came more than 50 ms late and the highest bucket reached bounds the longest stall. A
probe process also asks every contestant's health route every 20 ms during each run; its longest
answer is shown for comparison only: it runs on the busy load core, so its own scheduling
dominates (it shows nginx "stalling" too).

Every process is started here and stopped by its PID. While one contestant is timed the others
are paused (SIGSTOP, then SIGCONT): they share its core, and one at rest still wakes now and
then. Nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import math
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from yarl import URL

from proxy.hls.kinds import UriKind
from proxy.tokens import TokenCodec
from tests.bench.bench_core import REPO, SHIPPED_CONFIG, Spread, _free_port, machine
from tests.bench.crowd import crowd_get, slow_answer
from tests.procs import stop

COMMAND = "python -m tests.bench.bench_peers"
SECRET = "bench-peers-secret-0123456789abcdef"
MEDIAFLOW_PASSWORD = "bench-mediaflow-password"
MEDIAFLOW_PACKAGE = "mediaflow-proxy"
REFERER = "https://player.example.com/"
WORK = Path(__file__).resolve().parent / ".work"
MEDIAFLOW_VENV = WORK / "mediaflow-venv"

BIG_BYTES = 2 * 1024 * 1024
SMALL_BYTES = 1024
LIVE_SEGMENTS = 6
VOD_SEGMENTS = 3000
CROWD = 500
STREAMS = 500
STREAM_READ_BYTES = 8 * 1024
STREAM_READ_EVERY_S = 0.05  # 160 KiB/s per viewer: a player on a slow link
STREAM_HOLD_S = 4.0
LAG_PROBE_EVERY_S = 0.02
LAG_LIMIT_MS = 50.0
START_TIMEOUT_S = 30.0

HLSRELAY = "hlsrelay"
NGINX_DEFAULT = "nginx, default buffering"
NGINX_MEMORY = "nginx, in-memory buffers"
NGINX_CACHE = "nginx, proxy_cache"
# A log line worth showing with a failed case: an answer of 500 or more (hlsrelay's access line
# "stream 503 532B", uvicorn's '" 502 Bad Gateway'), a warning or an error (nginx's "[error]").
_TROUBLE = re.compile(r"""[\s"]5\d\d(?: \d+B\b| [A-Z])|WARNING|ERROR|\[error\]|\[crit\]""")
# Seconds a run's tail is given before the contestants not timed next are stopped (Bench.alone).
SETTLE_S = 0.5
MEDIAFLOW = "mediaflow-proxy"


# -- cores -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cores:
    proxy: str
    load: str
    note: str

    def pin(self, which: str, args: list[str]) -> list[str]:
        if not shutil.which("taskset"):
            return args
        return ["taskset", "-c", self.proxy if which == "proxy" else self.load, *args]


def cores() -> Cores:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) == 1:
        only = str(usable[0])
        return Cores(only, only, f"1 usable core ({only}): proxy, load and origin share it")
    proxy, rest = str(usable[0]), ",".join(str(c) for c in usable[1:])
    return Cores(
        proxy,
        rest,
        f"each proxy on core {proxy}; wrk, the origin and this process on core(s) {rest}",
    )


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    command: list[str]

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def trouble(self) -> str:
        """What its log says went wrong (answers of 500 or more, warnings, errors), if anything:
        the first three such lines, for a failed case's note."""
        lines = [line.strip() for line in self.tail_lines() if _TROUBLE.search(line)]
        return ("; its log: " + " | ".join(lines[:3])) if lines else ""

    def tail_lines(self) -> list[str]:
        try:
            with self.log.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 2_000_000))
                return f.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def pids(self) -> list[int]:
        """This process and its children (nginx's worker), for RSS and CPU time."""
        found = [self.proc.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            found += [int(pid) for pid in children.split()]
        return found

    def cpu_seconds(self) -> float:
        """CPU time (user and system) used so far by this process and its children."""
        ticks = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # Fields after the command's closing parenthesis: utime and stime are the 12th
                # and 13th (clock ticks).
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total


@contextlib.contextmanager
def running(
    name: str, args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[Process]:
    """``args`` for the duration of the block; terminated, then killed, by PID, always."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    process = Process(name, proc, log, args)
    try:
        yield process
    finally:
        stop(proc, 10)


def wait_ready(process: Process, url: str, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited early:\n{process.tail()}")
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{process.name} not ready after {START_TIMEOUT_S} s:\n{process.tail()}")


# -- the origin's files and the nginx configs --------------------------------------------------


def playlist(segments: int, *, vod: bool) -> bytes:
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:3",
        "#EXT-X-TARGETDURATION:6",
        "#EXT-X-MEDIA-SEQUENCE:1",
    ]
    if vod:
        lines.append("#EXT-X-PLAYLIST-TYPE:VOD")
    for number in range(1, segments + 1):
        lines += ["#EXTINF:6.000,", f"seg_{'vod' if vod else 'live'}_{number:05d}.ts"]
    if vod:
        lines.append("#EXT-X-ENDLIST")
    return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Files:
    root: Path
    big: bytes
    small: bytes
    live: bytes
    vod: bytes

    @classmethod
    def write(cls, root: Path) -> Files:
        rng = random.Random(20261121)
        files = cls(
            root,
            rng.randbytes(BIG_BYTES),
            rng.randbytes(SMALL_BYTES),
            playlist(LIVE_SEGMENTS, vod=False),
            playlist(VOD_SEGMENTS, vod=True),
        )
        (root / "www" / "media").mkdir(parents=True)
        (root / "www" / "big.ts").write_bytes(files.big)
        (root / "www" / "small.ts").write_bytes(files.small)
        (root / "www" / "media" / "live.m3u8").write_bytes(files.live)
        (root / "www" / "media" / "vod.m3u8").write_bytes(files.vod)
        return files


def _nginx_main(prefix: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would run as nobody
    return (
        f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "events { worker_connections 8192; }\n"
    )


def _temp_paths(prefix: Path) -> str:
    return "".join(
        f"  {kind}_temp_path {prefix}/{kind}_temp;\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def origin_conf(prefix: Path, port: int) -> str:
    return (
        _nginx_main(prefix) + "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n"
        "  keepalive_requests 1000000;\n"
        + _temp_paths(prefix)
        + "  types { application/vnd.apple.mpegurl m3u8; video/mp2t ts; }\n"
        f"  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    root {prefix}/www;\n"
        "    location = /healthz { return 200 'ok'; }\n"
        "    location / {\n"
        f'      if ($http_referer != "{REFERER}") {{ return 403; }}\n'
        "    }\n"
        "    location ~ ^/media/small_[^/]+\\.ts$ {\n"
        f'      if ($http_referer != "{REFERER}") {{ return 403; }}\n'
        "      try_files /small.ts =404;\n    }\n"
        "    location ~ ^/media/[^/]+\\.ts$ {\n"
        f'      if ($http_referer != "{REFERER}") {{ return 403; }}\n'
        "      try_files /big.ts =404;\n    }\n"
        "  }\n}\n"
    )


# The two nginx buffering variants of the issue, as directives inside a location.
NGINX_PASS = (
    "proxy_pass http://origin; proxy_http_version 1.1; "
    f'proxy_set_header Connection ""; proxy_set_header Referer "{REFERER}";'
)
NGINX_MEMORY_BUFFERS = "proxy_buffers 32 64k; proxy_max_temp_file_size 0;"


def proxy_conf(prefix: Path, ports: dict[str, int], origin: int, slow_origin: int) -> str:
    """One nginx (one worker) with a server per variant; only one is under load at a time."""
    cache = (
        "proxy_cache hls; proxy_cache_valid 200 10m; proxy_cache_lock on; "
        "proxy_cache_lock_timeout 30s; add_header X-Cache-Status $upstream_cache_status;"
    )
    return (
        _nginx_main(prefix) + "http {\n"
        f"  access_log {prefix}/access.log;\n"
        + _temp_paths(prefix)
        + f"  upstream origin {{ server 127.0.0.1:{origin}; keepalive 256; }}\n"
        f"  upstream slow {{ server 127.0.0.1:{slow_origin}; keepalive 256; }}\n"
        f"  proxy_cache_path {prefix}/cache levels=1:2 keys_zone=hls:16m max_size=2g "
        "inactive=10m use_temp_path=off;\n"
        "  keepalive_requests 1000000;\n"
        f"  server {{ listen 127.0.0.1:{ports[NGINX_DEFAULT]} backlog=4096;\n"
        "    location = /healthz { return 200 'ok'; }\n"
        f"    location / {{ {NGINX_PASS} }}\n"
        f"    location /slow/ {{ {NGINX_PASS.replace('//origin', '//slow')} }} }}\n"
        f"  server {{ listen 127.0.0.1:{ports[NGINX_MEMORY]} backlog=4096;\n"
        "    location = /healthz { return 200 'ok'; }\n"
        f"    location / {{ {NGINX_PASS} {NGINX_MEMORY_BUFFERS} }} }}\n"
        f"  server {{ listen 127.0.0.1:{ports[NGINX_CACHE]} backlog=4096;\n"
        "    location = /healthz { return 200 'ok'; }\n"
        f"    location / {{ {NGINX_PASS} {NGINX_MEMORY_BUFFERS} {cache} }}\n"
        f"    location /slow/ {{ {NGINX_PASS.replace('//origin', '//slow')} "
        f"{NGINX_MEMORY_BUFFERS} {cache} }} }}\n"
        "}\n"
    )


def nginx_args(prefix: Path, conf: Path) -> list[str]:
    return ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"), "-g",
            "daemon off;"]  # fmt: skip


# -- the slow origin (its own process): the coalescing case ------------------------------------


def _serve_slow_origin(port: int, big_path: str) -> None:
    """Answers any ``/slow/...`` with the 2 MiB file after ORIGIN_DELAY_S, then at about
    1 Gbit/s (tests/bench/crowd.py: the origin bench_cache's crowd waits for too, and every
    contestant's here); counts requests."""
    from aiohttp import web

    body = Path(big_path).read_bytes()
    counts: dict[str, int] = {}

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def count(request: web.Request) -> web.Response:
        return web.json_response(counts)

    async def segment(request: web.Request) -> web.Response:
        counts[request.path] = counts.get(request.path, 0) + 1
        if request.headers.get("Referer") != REFERER:
            return web.Response(status=403)
        return await slow_answer(request, body)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/_counts", count)
    app.router.add_get("/slow/{name}", segment)
    import uvloop

    web.run_app(
        app, host="127.0.0.1", port=port, loop=uvloop.new_event_loop(), print=None,
        access_log=None, backlog=4096,
    )  # fmt: skip


# -- contestants -------------------------------------------------------------------------------


@dataclass
class Contestant:
    name: str
    base: str
    process: Process
    paths: Callable[[str, str], str]
    """(upstream URL, kind "playlist" or "media") -> the path to ask this contestant for."""
    version: str
    command: str
    notes: str = ""
    health: str = "/healthz"
    caches: bool = True
    """Caches or coalesces requests: every timed URL must then be fresh (others may repeat)."""
    metrics: str | None = None
    """Its Prometheus exposition, when it exports ``hlsrelay_event_loop_lag_seconds``."""


class Mint:
    """hlsrelay URLs for upstream URLs, as `python -m proxy sign` and the rewriter make them."""

    def __init__(self) -> None:
        self.codec = TokenCodec(SECRET.encode())

    def __call__(self, url: str, kind: str) -> str:
        ctx_token = self.codec.mint_context(url, {"Referer": REFERER})
        ctx = self.codec.open_context(ctx_token)
        uri_kind = UriKind.PLAYLIST if kind == "playlist" else UriKind.MEDIA
        return f"/s/{ctx_token}/{self.codec.child_path(ctx_token, ctx, url, uri_kind)}"


def mediaflow_path(url: str, kind: str) -> str:
    route = "/proxy/hls/manifest.m3u8" if kind == "playlist" else "/proxy/hls/segment.ts"
    return (
        f"{route}?d={quote(url, safe='')}&h_referer={quote(REFERER, safe='')}"
        f"&api_password={MEDIAFLOW_PASSWORD}"
    )


def hlsrelay_env(port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HLSRELAY_CONFIG", None)
    env.update(
        {
            "HLSRELAY_SERVER__HOST": "127.0.0.1",
            "HLSRELAY_SERVER__PORT": str(port),
            "HLSRELAY_SECURITY__SECRET": SECRET,
            "HLSRELAY_UPSTREAM__ALLOW_NETWORKS": '["127.0.0.0/8"]',
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    return env


HLSRELAY_OVERRIDES = (
    "HLSRELAY_SERVER__HOST=127.0.0.1 HLSRELAY_SERVER__PORT=<port> "
    "HLSRELAY_SECURITY__SECRET=<secret> "
    "HLSRELAY_UPSTREAM__ALLOW_NETWORKS='[\"127.0.0.0/8\"]'"
)


@contextlib.contextmanager
def hlsrelay(work: Path, pins: Cores) -> Iterator[Contestant]:
    port = _free_port()
    args = pins.pin(
        "proxy", [sys.executable, "-m", "proxy", "serve", "--config", str(SHIPPED_CONFIG)]
    )
    with running(HLSRELAY, args, work / "hlsrelay.log", hlsrelay_env(port)) as process:
        base = f"http://127.0.0.1:{port}"
        wait_ready(process, f"{base}/readyz")
        from proxy import __version__

        yield Contestant(
            HLSRELAY,
            base,
            process,
            Mint(),
            __version__,
            f"{HLSRELAY_OVERRIDES} {shlex.join(args).replace(sys.executable, 'python')}",
            "shipped config; logs every request",
            metrics="/metrics",
        )


@dataclass
class NginxProxy:
    process: Process
    ports: dict[str, int]
    conf: Path


@contextlib.contextmanager
def nginx_proxy(work: Path, pins: Cores, origin: int, slow_origin: int) -> Iterator[NginxProxy]:
    prefix = Path(tempfile.mkdtemp(prefix="nginx-proxy-", dir=work))
    ports = {name: _free_port() for name in (NGINX_DEFAULT, NGINX_MEMORY, NGINX_CACHE)}
    conf = prefix / "nginx.conf"
    conf.write_text(proxy_conf(prefix, ports, origin, slow_origin))
    args = pins.pin("proxy", nginx_args(prefix, conf))
    try:
        with running("nginx proxy", args, prefix / "stdout.log") as process:
            wait_ready(process, f"http://127.0.0.1:{ports[NGINX_DEFAULT]}/healthz")
            yield NginxProxy(process, ports, conf)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def nginx_contestant(proxy: NginxProxy, name: str) -> Contestant:
    notes = {
        NGINX_DEFAULT: "proxy_buffering on, default proxy_buffers, temp files allowed",
        NGINX_MEMORY: NGINX_MEMORY_BUFFERS,
        NGINX_CACHE: f"{NGINX_MEMORY_BUFFERS} proxy_cache, proxy_cache_lock on",
    }[name]
    return Contestant(
        name,
        f"http://127.0.0.1:{proxy.ports[name]}",
        proxy.process,
        lambda url, kind: urlsplit(url)._replace(scheme="", netloc="").geturl(),
        nginx_version(),
        f"{shlex.join(proxy.process.command)} (one worker; upstream keepalive 256; {notes})",
        notes,
        caches=name == NGINX_CACHE,
    )


def nginx_version() -> str:
    answer = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return answer.stderr.strip().removeprefix("nginx version: ")


class Unavailable(Exception):
    """A contestant that cannot be installed or started here: it fails every case, with this."""


def install_mediaflow() -> Path:
    """Its own virtual environment under tests/bench/.work/ (git-ignored); the uvicorn path."""
    uvicorn = MEDIAFLOW_VENV / "bin" / "uvicorn"
    python = MEDIAFLOW_VENV / "bin" / "python"
    if not (MEDIAFLOW_VENV / ".installed").exists():
        WORK.mkdir(parents=True, exist_ok=True)
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(MEDIAFLOW_VENV)],
            [str(python), "-m", "pip", "install", "--quiet", MEDIAFLOW_PACKAGE, "uvloop"],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
            if done.returncode != 0:
                raise Unavailable(f"`{shlex.join(step)}` failed: {done.stderr.strip()[-300:]}")
        (MEDIAFLOW_VENV / ".installed").touch()
    if not uvicorn.exists():
        raise Unavailable("uvicorn missing from the mediaflow-proxy environment")
    return uvicorn


def mediaflow_version() -> str:
    python = MEDIAFLOW_VENV / "bin" / "python"
    code = "from importlib.metadata import version; print(version('mediaflow-proxy'))"
    answer = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return answer.stdout.strip() or "unknown"


@contextlib.contextmanager
def mediaflow(work: Path, pins: Cores) -> Iterator[Contestant]:
    uvicorn = install_mediaflow()
    port = _free_port()
    args = pins.pin(
        "proxy",
        [str(uvicorn), "mediaflow_proxy.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
    )  # fmt: skip
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "API_PASSWORD": MEDIAFLOW_PASSWORD,
        "ENABLE_HLS_PREBUFFER": "false",
        "ENABLE_DASH_PREBUFFER": "false",
    }
    with running(MEDIAFLOW, args, work / "mediaflow.log", env) as process:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(process, f"{base}/health")
        except RuntimeError as exc:
            raise Unavailable(str(exc).splitlines()[0]) from exc
        yield Contestant(
            MEDIAFLOW,
            base,
            process,
            mediaflow_path,
            mediaflow_version(),
            "API_PASSWORD=<password> ENABLE_HLS_PREBUFFER=false ENABLE_DASH_PREBUFFER=false "
            + shlex.join(args).replace(str(REPO) + "/", ""),
            "uvicorn, 1 worker; HLS pre-buffering off; its default INFO log",
            health="/health",
        )


# -- correctness -------------------------------------------------------------------------------


class Wrong(Exception):
    """A contestant answered a case wrongly: it is reported failing, not timed."""


def _get(url: str, timeout: float = 30.0) -> tuple[int, bytes, str]:
    request = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read(), answer.url
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), url
    except (urllib.error.URLError, OSError) as exc:
        raise Wrong(f"GET failed: {exc}") from None


def check_media(url: str, expected: bytes) -> None:
    status, body, _ = _get(url)
    if status != 200:
        raise Wrong(f"media answered {status}: {body[:120]!r}")
    if body != expected:
        raise Wrong(f"media body differs ({len(body)} bytes, {len(expected)} expected)")


def playlist_uris(body: str) -> list[str]:
    uris = []
    for line in body.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            uris.append(line)
        elif 'URI="' in line:
            uris.append(line.split('URI="', 1)[1].split('"', 1)[0])
    return uris


def check_playlist(contestant: Contestant, url: str, origin_body: bytes, expected: bytes) -> None:
    status, body, final = _get(url)
    if status != 200:
        raise Wrong(f"playlist answered {status}: {body[:120]!r}")
    want = playlist_uris(origin_body.decode())
    got = playlist_uris(body.decode(errors="replace"))
    if len(got) != len(want):
        raise Wrong(f"playlist lists {len(got)} URIs, the origin's {len(want)}")
    here = URL(contestant.base)
    resolved = [URL(final, encoded=True).join(URL(uri, encoded=True)) for uri in got]
    elsewhere = [u for u in resolved if (u.host, u.port) != (here.host, here.port)]
    if elsewhere:
        raise Wrong(f"{len(elsewhere)} playlist URIs bypass the contestant, e.g. {elsewhere[0]}")
    for uri in {str(resolved[0]), str(resolved[-1])}:
        check_media(uri, expected)


# -- load --------------------------------------------------------------------------------------


WRK_SCRIPT = """
local paths = {}
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
end
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", paths[((counter - 1) % #paths) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class WrkRun:
    requests: int
    bytes: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    distinct: int
    error_kinds: str = ""
    """wrk's failed requests by kind ("status 2, read 1"), when there were any."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def wrk(
    pins: Cores, work: Path, base: str, paths: Sequence[str], connections: int, seconds: float
) -> tuple[WrkRun, list[str]]:
    script = work / "walk.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    listing = work / "paths.txt"
    listing.write_text("\n".join(paths) + "\n")
    args = pins.pin(
        "load",
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
         "-s", str(script), base, "--", str(listing)],
    )  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise Wrong(f"wrk failed: {done.stderr.strip()[-300:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    kinds = ("connect", "read", "write", "status", "timeout")
    errors = sum(raw[k] for k in kinds)
    run = WrkRun(
        raw["requests"],
        raw["bytes"],
        raw["duration_us"] / 1e6,
        errors,
        raw["p50_us"] / 1000,
        raw["p99_us"] / 1000,
        raw["max_us"] / 1000,
        len(paths),
        ", ".join(f"{k} {raw[k]}" for k in kinds if raw[k]),
    )
    shown = [a if not a.startswith(str(work)) else Path(a).name for a in args]
    return run, shown


class LagProbe:
    """GET a health route every LAG_PROBE_EVERY_S on its own keep-alive connection.

    Runs as its own process (``python -m tests.bench.bench_peers probe URL PATH``) so the
    clients of this process never hold it up; its answers are read when it is stopped. Entering
    waits until it has its first answer: its start (about 0.6 s of CPU importing this module)
    must not overlap what is timed on the load core it shares with the clients and the origins
    (it did in case 6, delaying the origin's answers by a few ms to tens of ms at random).
    """

    def __init__(self, base: str, path: str = "/healthz") -> None:
        self._args = [sys.executable, "-m", "tests.bench.bench_peers", "probe", base, path]
        self._proc: subprocess.Popen[str] | None = None
        self.samples: list[float] = []

    def figures(self) -> dict[str, float]:
        return {"probe_ms": max(self.samples)} if self.samples else {}

    def __enter__(self) -> LagProbe:
        self._proc = subprocess.Popen(
            self._args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT_S)
        if ready:
            self._proc.stdout.readline()  # "ready" (or nothing, if it died: figures say so)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.terminate()
        try:
            out, _ = self._proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate(timeout=5)
        self.samples = [float(x) for x in out.split()]


def _probe(base: str, path: str) -> None:
    """The probe process: sample until SIGTERM, then print every answer time (ms)."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    url = urlsplit(base)
    samples: list[float] = []
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    announced = False
    while not stop.is_set():
        if not announced:  # started: what runs next is timed (LagProbe.__enter__ waits for it)
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            announced = True
        began = time.perf_counter()
        try:
            conn.request("GET", path)
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
            stop.wait(LAG_PROBE_EVERY_S)
            continue
        samples.append((time.perf_counter() - began) * 1000)
        stop.wait(LAG_PROBE_EVERY_S)
    conn.close()
    sys.stdout.write(" ".join(f"{x:.3f}" for x in samples) + "\n")


LOOP_LAG_METRIC = "hlsrelay_event_loop_lag_seconds"


def loop_lag_buckets(text: str) -> dict[float, float]:
    """Cumulative sample counts of the lag histogram by upper edge (``inf`` = all samples)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == LOOP_LAG_METRIC:
            return {
                float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")
            }
    return {}


def loop_lag_figures(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """``lag_max_ms``: the upper edge (ms) of the highest bucket a sample reached between the two
    readings (the longest stall is at most that); ``stalls``: samples over LAG_LIMIT_MS."""
    delta = {edge: after[edge] - before.get(edge, 0.0) for edge in after}
    total = delta.get(math.inf, 0.0)
    if not total:
        return {}
    reached = min(edge for edge, count in delta.items() if count >= total)
    limit = LAG_LIMIT_MS / 1000
    return {
        "lag_max_ms": reached * 1000,
        "stalls": total - delta[limit] if limit in delta else math.nan,
    }


class LoopLag:
    """hlsrelay's own event-loop lag over a block: its histogram read before and after."""

    def __init__(self, contestant: Contestant) -> None:
        self._url = contestant.base + contestant.metrics if contestant.metrics else None
        self._before: dict[float, float] = {}
        self._after: dict[float, float] = {}

    def _read(self) -> dict[float, float]:
        assert self._url is not None
        status, body, _ = _get(self._url)
        return loop_lag_buckets(body.decode()) if status == 200 else {}

    def figures(self) -> dict[str, float]:
        return loop_lag_figures(self._before, self._after) if self._after else {}

    def __enter__(self) -> LoopLag:
        if self._url is not None:
            self._before = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._url is not None and exc[0] is None:
            self._after = self._read()


# -- results -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One contestant on one case: its rounds, or why it failed."""

    failure: str | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)

    def spread(self, key: str) -> Spread | None:
        values = [r[key] for r in self.rounds if key in r]
        return Spread.of(values) if values else None

    def median(self, key: str) -> float | None:
        s = self.spread(key)
        return None if s is None else s.median


@dataclass
class Case:
    number: int
    title: str
    method: str
    columns: list[tuple[str, str, int]]
    """(round key, column heading, decimals)."""
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)

    def outcome(self, name: str) -> Outcome:
        return self.outcomes.setdefault(name, Outcome())

    def has(self, key: str) -> bool:
        """Whether any contestant's rounds have the figure ``key``."""
        return any(key in r for o in self.outcomes.values() for r in o.rounds)


class Urls:
    """Fresh upstream URLs: nothing asked for in one timed run was asked for before."""

    def __init__(self, origin: str, slow_origin: str) -> None:
        self.origin = origin
        self.slow_origin = slow_origin
        self._next = 0

    def take(self, count: int, form: str) -> list[str]:
        start, self._next = self._next, self._next + count
        numbers = range(start, start + count)
        if form == "big":
            return [f"{self.origin}/media/seg_{n}.ts" for n in numbers]
        if form == "small":
            return [f"{self.origin}/media/small_{n}.ts" for n in numbers]
        if form == "slow":
            return [f"{self.slow_origin}/slow/seg_{n}.ts" for n in numbers]
        if form in ("live", "vod"):
            return [f"{self.origin}/media/{form}.m3u8?v={n}" for n in numbers]
        raise ValueError(form)


@dataclass(frozen=True)
class WrkCase:
    number: int
    title: str
    form: str
    kind: str
    connections: int
    same_url: bool
    """Every request for one URL (the cached case) instead of a fresh URL each."""
    urls_per_second: int
    """Fresh URLs to list per second of load: more than any contestant serves."""
    columns: list[tuple[str, str, int]]


def wrk_cases() -> list[WrkCase]:
    throughput = [("mb_s", "throughput", 0), ("p50_ms", "p50", 1), ("p99_ms", "p99", 1)]
    rps = [("rps", "requests/s", 0), ("p50_ms", "p50", 2), ("p99_ms", "p99", 2)]
    latency = [("p50_ms", "p50", 2), ("p99_ms", "p99", 2), ("rps", "requests/s", 0)]
    return [
        WrkCase(1, "2 MiB segment relay, cache miss", "big", "media", 64, False, 1500,
                throughput),
        WrkCase(2, "1 KiB object relay, cache miss", "small", "media", 64, False, 30000, rps),
        WrkCase(3, f"live media playlist ({LIVE_SEGMENTS} segments) rewrite, uncached", "live",
                "playlist", 64, False, 15000, rps),
        WrkCase(4, "the same playlist from cache", "live", "playlist", 64, True, 0, rps),
        WrkCase(5, f"{VOD_SEGMENTS:,}-segment VOD playlist rewrite, uncached, one connection",
                "vod", "playlist", 1, False, 1000, latency),
    ]  # fmt: skip


def contestants_for(case: WrkCase, names: Sequence[str]) -> list[str]:
    if case.same_url:
        return [n for n in names if n in (HLSRELAY, NGINX_CACHE, MEDIAFLOW)]
    return [n for n in names if n != NGINX_CACHE]


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Bench:
    pins: Cores
    work: Path
    files: Files
    urls: Urls
    origin_pid: Process
    slow_origin: Process
    contestants: dict[str, Contestant]
    unavailable: dict[str, str]
    rounds: int
    seconds: float
    cases: list[Case] = field(default_factory=list)

    def expected(self, form: str) -> bytes:
        return self.files.small if form == "small" else self.files.big

    @contextlib.contextmanager
    def alone(self, timed: Contestant | None = None) -> Iterator[None]:
        """The other contestants' processes stopped (SIGSTOP) while ``timed`` is timed.

        Each proxy gets one core, and they all share it: a contestant at rest still wakes now
        and then (mediaflow's uvicorn ~6 % of the core, hlsrelay's loop-lag timer 1-2 %), and
        those wake-ups landed in the middle of whoever was being timed. Resumed (SIGCONT)
        afterwards; none of them is ever left stopped.
        """
        keep = set(timed.process.pids()) if timed is not None else set()
        stopped: list[int] = []
        # The last run's tail first: wrk cuts its connections mid-body and a proxy finishes what
        # it was doing. A contestant stopped with upstream requests in flight finds them timed
        # out when resumed (the others' runs outlast hlsrelay's 10 s first-byte timeout), and
        # ten of those in a row open its circuit breaker: its next round all 503s (seen once,
        # reproduced by stopping it 12 s right after a run).
        time.sleep(SETTLE_S)
        try:
            for other in self.contestants.values():
                for pid in other.process.pids():
                    if pid not in keep and pid not in stopped:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGSTOP)
                            stopped.append(pid)
            yield
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def origin_body(self, form: str) -> bytes:
        return self.files.live if form == "live" else self.files.vod

    def check(self, contestant: Contestant, case: WrkCase) -> None:
        url = self.urls.take(1, case.form)[0]
        path = contestant.base + contestant.paths(url, case.kind)
        if case.kind == "media":
            check_media(path, self.expected(case.form))
        else:
            check_playlist(contestant, path, self.origin_body(case.form), self.files.big)

    def run_wrk_case(self, spec: WrkCase) -> Case:
        case = Case(spec.number, spec.title, "", spec.columns)
        names = contestants_for(spec, [*self.contestants, *self.unavailable])
        live: list[Contestant] = []
        for name in names:
            if name in self.unavailable:
                case.outcome(name).failure = self.unavailable[name]
                continue
            contestant = self.contestants[name]
            try:
                self.check(contestant, spec)
            except Wrong as exc:
                case.outcome(name).failure = str(exc)
                continue
            live.append(contestant)
        hot: dict[str, list[str]] = {}
        for contestant in live:
            if spec.same_url:
                url = self.urls.take(1, spec.form)[0]
                hot[contestant.name] = [contestant.paths(url, spec.kind)]
                # Warm the cache: the timed run is all hits.
                _get(contestant.base + hot[contestant.name][0])
        per_run = max(1, int(spec.urls_per_second * self.seconds))
        for number in range(self.rounds + 1):  # round 0 warms up, not recorded
            order = live[number % len(live) :] + live[: number % len(live)] if live else []
            for contestant in order:
                outcome = case.outcome(contestant.name)
                if outcome.failure:
                    continue
                if spec.same_url:
                    paths = hot[contestant.name]
                else:
                    paths = [
                        contestant.paths(u, spec.kind) for u in self.urls.take(per_run, spec.form)
                    ]
                seconds = self.seconds if number else 1.0
                probe = LagProbe(contestant.base, contestant.health)
                lag = LoopLag(contestant)
                with self.alone(contestant), probe, lag:
                    cpu_before = contestant.process.cpu_seconds()
                    try:
                        run, args = wrk(
                            self.pins, self.work, contestant.base, paths, spec.connections, seconds
                        )
                    except Wrong as exc:
                        outcome.failure = str(exc)
                        continue
                    cpu = contestant.process.cpu_seconds() - cpu_before
                if run.errors:
                    outcome.failure = (
                        f"{run.errors} failed requests under load ({run.error_kinds})"
                        + contestant.process.trouble()
                    )
                    continue
                case.commands[contestant.name] = shlex.join(args)
                if not number:
                    continue
                if contestant.caches and not spec.same_url and run.requests > run.distinct:
                    outcome.failure = (
                        f"bench error: {run.requests} requests > {run.distinct} fresh URLs"
                    )
                    continue
                outcome.rounds.append(
                    {"mb_s": run.mb_s, "rps": run.rps, "p50_ms": run.p50_ms,
                     "p99_ms": run.p99_ms, **cpu_figures(cpu, run.requests),
                     **probe.figures(), **lag.figures()}
                )  # fmt: skip
        return case


def cpu_figures(cpu_s: float, requests: int) -> dict[str, float]:
    """``cpu_us``: the contestant's CPU time (all its processes, user and system) per request
    of a timed run, in microseconds; nothing when no request was answered."""
    return {"cpu_us": cpu_s * 1e6 / requests} if requests else {}


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


# -- case 6: coalescing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Crowd:
    ttfb_ms: list[float]
    """Each waiter's first body byte (the kernel's receive time), from the crowd's first request
    sent."""
    origin_ms: float
    """The origin's own first body byte for a request sent with the crowd, from the same instant."""
    alone_ms: float
    """The origin's first body byte for a lone request just before (no crowd being sent)."""
    wrong: int
    ramp_ms: float
    """From the first request sent to the last."""


async def _crowd(url: str, expected: bytes, size: int, origin_url: str, alone_url: str) -> Crowd:
    """``size`` clients ask for ``url`` at once on open connections (tests/bench/crowd.py).

    Times are the kernel's receive timestamps of each first body byte, counted from the first
    request on the wire, so neither this client's work on 500 connections nor its handshakes are
    charged to the proxy. ``origin_url`` (a fresh segment) goes straight to the origin right
    after the crowd's first request: the origin's time to first byte at that same moment.
    ``alone_url`` (another) goes to the origin alone just before: the difference is what the
    client sending 500 requests on the core it shares with the origin costs the origin.
    """
    alone = await crowd_get(alone_url, 1, headers={"Referer": REFERER})
    result = await crowd_get(url, size, origin_url, {"Referer": REFERER})
    digest = hashlib.sha256(expected).hexdigest()
    wrong = sum(found != digest for found in result.digests)
    wrong += size - len(result.firsts)
    if result.reference is None:
        raise Wrong("the origin answered no body to the reference request")
    return Crowd(
        [first * 1000 for first in result.firsts],
        result.reference * 1000,
        alone.firsts[0] * 1000 if alone.firsts else math.nan,
        wrong,
        result.ramp * 1000,
    )


def _origin_counts(slow_origin: str) -> dict[str, int]:
    _, body, _ = _get(f"{slow_origin}/_counts")
    counts: dict[str, int] = json.loads(body)
    return counts


def run_coalescing(bench: Bench) -> Case:
    case = Case(
        6,
        f"coalescing: {CROWD} concurrent requests for one uncached 2 MiB segment on open "
        "connections; the origin answers after 0.5 s, then sends at about 1 Gbit/s "
        "(first body bytes by the kernel's receive timestamps, from the first "
        "request on the wire; origin TTFB: a request sent straight to the origin with the "
        "crowd; alone: one sent just before, with no crowd on the clients' core; "
        "client ramp: first to last request sent)",
        "",
        [
            ("upstream", "upstream requests", 0),
            ("p50_ms", "waiter TTFB p50", 0),
            ("p99_ms", "waiter TTFB p99", 0),
            ("origin_ms", "origin TTFB", 0),
            ("alone_ms", "origin TTFB alone", 0),
            ("excess_ms", "p99 - origin", 0),
            ("ramp_ms", "client ramp", 0),
        ],
    )
    names = [HLSRELAY, NGINX_CACHE, NGINX_DEFAULT, MEDIAFLOW]
    live: list[Contestant] = []
    for name in names:
        if name in bench.unavailable:
            case.outcome(name).failure = bench.unavailable[name]
            continue
        contestant = bench.contestants[name]
        url = bench.urls.take(1, "slow")[0]
        try:
            check_media(contestant.base + contestant.paths(url, "media"), bench.files.big)
        except Wrong as exc:
            case.outcome(name).failure = str(exc)
            continue
        live.append(contestant)
    slow = bench.urls.slow_origin
    for number in range(bench.rounds):
        order = live[number % len(live) :] + live[: number % len(live)]
        for contestant in order:
            outcome = case.outcome(contestant.name)
            if outcome.failure:
                continue
            url = bench.urls.take(1, "slow")[0]
            path = urlsplit(url).path
            probe = LagProbe(contestant.base, contestant.health)
            lag = LoopLag(contestant)
            with bench.alone(contestant), probe, lag:
                crowd = asyncio.run(
                    _crowd(
                        contestant.base + contestant.paths(url, "media"),
                        bench.files.big,
                        CROWD,
                        bench.urls.take(1, "slow")[0],
                        bench.urls.take(1, "slow")[0],
                    )
                )
            if crowd.wrong:
                outcome.failure = f"{crowd.wrong} of {CROWD} waiters got a wrong or cut body"
                continue
            upstream = _origin_counts(slow).get(path, 0)
            p99 = _p99(crowd.ttfb_ms)
            outcome.rounds.append(
                {
                    "upstream": upstream,
                    "p50_ms": statistics.median(crowd.ttfb_ms),
                    "p99_ms": p99,
                    "origin_ms": crowd.origin_ms,
                    "alone_ms": crowd.alone_ms,
                    "excess_ms": p99 - crowd.origin_ms,
                    "ramp_ms": crowd.ramp_ms,
                    **probe.figures(),
                    **lag.figures(),
                }
            )
    return case


# -- case 7: memory under slow viewers ---------------------------------------------------------


async def _slow_streams(
    contestant: Contestant, paths: Sequence[str], hold_s: float
) -> tuple[int, int, int]:
    """One slow viewer per path for ``hold_s``: (peak RSS, RSS before, viewers that got bytes)."""
    here = urlsplit(contestant.base)
    host, port = here.hostname or "127.0.0.1", here.port or 80
    baseline = contestant.process.rss_bytes()
    peak = baseline
    got_bytes = 0
    stop = asyncio.Event()

    async def viewer(path: str) -> bool:
        reader, writer = await asyncio.open_connection(host, port, limit=STREAM_READ_BYTES)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # A small receive window, so the proxy, not the kernel, holds what the viewer lags.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        received = 0
        try:
            while not stop.is_set():
                chunk = await reader.read(STREAM_READ_BYTES)
                if not chunk:
                    break
                received += len(chunk)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), STREAM_READ_EVERY_S)
        finally:
            writer.transport.abort()
        return received > 0

    tasks = [asyncio.ensure_future(viewer(p)) for p in paths]
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        peak = max(peak, contestant.process.rss_bytes())
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    got_bytes = sum(1 for r in results if r is True)
    return peak, baseline, got_bytes


@contextlib.contextmanager
def fresh(bench: Bench, name: str) -> Iterator[Contestant]:
    """A freshly started contestant, so memory held from earlier cases does not count."""
    origin = int(urlsplit(bench.urls.origin).port or 80)
    slow = int(urlsplit(bench.urls.slow_origin).port or 80)
    if name == HLSRELAY:
        with hlsrelay(bench.work, bench.pins) as contestant:
            yield contestant
    elif name == MEDIAFLOW:
        with mediaflow(bench.work, bench.pins) as contestant:
            yield contestant
    else:
        with nginx_proxy(bench.work, bench.pins, origin, slow) as proxy:
            yield nginx_contestant(proxy, name)


def run_memory(bench: Bench, rounds: int) -> Case:
    case = Case(
        7,
        f"memory: {STREAMS} concurrent slow 2 MiB downloads "
        f"({STREAM_READ_BYTES // 1024} KiB every {STREAM_READ_EVERY_S * 1000:.0f} ms each, "
        f"held {STREAM_HOLD_S:g} s)",
        "",
        [("peak_mb", "peak RSS", 0), ("idle_mb", "RSS before", 0), ("viewers", "viewers fed", 0)],
    )
    names = [HLSRELAY, NGINX_DEFAULT, NGINX_MEMORY, MEDIAFLOW]
    for name in names:
        if name in bench.unavailable:
            case.outcome(name).failure = bench.unavailable[name]
    live = [n for n in names if n not in bench.unavailable]
    for number in range(rounds):
        for name in live[number % len(live) :] + live[: number % len(live)]:
            outcome = case.outcome(name)
            if outcome.failure:
                continue
            try:
                with fresh(bench, name) as contestant:
                    url = bench.urls.take(1, "big")[0]
                    check_media(contestant.base + contestant.paths(url, "media"), bench.files.big)
                    paths = [contestant.paths(u, "media") for u in bench.urls.take(STREAMS, "big")]
                    probe = LagProbe(contestant.base, contestant.health)
                    lag = LoopLag(contestant)
                    # The long-running contestants rest while a fresh one is measured.
                    with bench.alone(), probe, lag:
                        cpu_before = contestant.process.cpu_seconds()
                        held_from = time.monotonic()
                        peak, idle, fed = asyncio.run(
                            _slow_streams(contestant, paths, STREAM_HOLD_S)
                        )
                        cpu = contestant.process.cpu_seconds() - cpu_before
                        held = time.monotonic() - held_from
            except (Wrong, Unavailable) as exc:
                outcome.failure = str(exc)
                continue
            outcome.rounds.append(
                {
                    "peak_mb": peak / 1e6,
                    "idle_mb": idle / 1e6,
                    "viewers": fed,
                    "cpu_pct": 100 * cpu / held,
                    **probe.figures(),
                    **lag.figures(),
                }
            )
    return case


# -- the whole run -----------------------------------------------------------------------------


def round_ratios(case: Case | None, key: str, name: str, peer: str) -> Spread | None:
    """``name``'s figure over ``peer``'s, round by round (each round times both, interleaved).

    The median ratio says where hlsrelay stands; these say how far one run of the machine's
    drift can move it. None unless both have the figure in every round.
    """
    if case is None or name not in case.outcomes or peer not in case.outcomes:
        return None
    mine, theirs = case.outcomes[name], case.outcomes[peer]
    if mine.failure or theirs.failure or len(mine.rounds) != len(theirs.rounds):
        return None
    pairs = [(a.get(key), b.get(key)) for a, b in zip(mine.rounds, theirs.rounds, strict=True)]
    if not pairs or any(a is None or not b for a, b in pairs):
        return None
    return Spread.of([a / b for a, b in pairs if a is not None and b])


@dataclass
class Report:
    bench: Bench
    began: float
    ended: float

    def case(self, number: int) -> Case | None:
        return next((c for c in self.bench.cases if c.number == number), None)

    def median(self, number: int, name: str, key: str) -> float | None:
        case = self.case(number)
        if case is None or name not in case.outcomes or case.outcomes[name].failure:
            return None
        return case.outcomes[name].median(key)

    def targets(self) -> list[tuple[str, str, str]]:
        """(target, measured, met)."""
        rows: list[tuple[str, str, str]] = []

        def ratio(label: str, case: int, key: str, peer: str, want: float) -> None:
            mine, theirs = self.median(case, HLSRELAY, key), self.median(case, peer, key)
            if mine is None or theirs is None or theirs == 0:
                why = "hlsrelay" if mine is None else peer
                rows.append((f"{label} ≥ {want:g}x", f"n/a ({why} failed the case)", "—"))
                return
            value = mine / theirs
            measured = f"{value:.2f}x"
            each = round_ratios(self.case(case), key, HLSRELAY, peer)
            if each is not None:
                measured += f" (rounds {each.low:.2f}-{each.high:.2f}x)"
            rows.append((f"{label} ≥ {want:g}x", measured, "yes" if value >= want else "**no**"))

        ratio("case 1 segment throughput vs nginx default buffering", 1, "mb_s", NGINX_DEFAULT, 1.0)
        ratio("case 1 segment throughput vs nginx in-memory buffers", 1, "mb_s", NGINX_MEMORY, 0.8)
        ratio("case 4 cached playlist req/s vs nginx proxy_cache hits", 4, "rps", NGINX_CACHE, 0.5)
        ratio("case 3 playlist rewrite req/s vs mediaflow-proxy", 3, "rps", MEDIAFLOW, 20.0)
        ratio("case 1 segment throughput vs mediaflow-proxy", 1, "mb_s", MEDIAFLOW, 3.0)
        upstream = self.median(6, HLSRELAY, "upstream")
        excess = self.median(6, HLSRELAY, "excess_ms")
        case6 = self.case(6)
        worst_upstream = (
            max(r["upstream"] for r in case6.outcomes[HLSRELAY].rounds)
            if case6 and HLSRELAY in case6.outcomes and case6.outcomes[HLSRELAY].rounds
            else None
        )
        rows.append(
            (
                "case 6 coalescing: 1 upstream request",
                "n/a" if worst_upstream is None else f"{worst_upstream:.0f} (worst round)",
                "yes" if worst_upstream == 1 else "**no**",
            )
        )
        rows.append(
            (
                "case 6 waiter p99 ≤ origin + 20 ms",
                "n/a" if excess is None else f"origin + {excess:.0f} ms",
                "yes" if excess is not None and excess <= 20 else "**no**",
            )
        )
        del upstream
        peak = self.median(7, HLSRELAY, "peak_mb")
        rows.append(
            (
                f"case 7 RSS ≤ 200 MB with {STREAMS} streams",
                "n/a" if peak is None else f"{peak:.0f} MB",
                "yes" if peak is not None and peak <= 200 else "**no**",
            )
        )
        rows.append(self._stall_target())
        return rows

    def _stall_target(self) -> tuple[str, str, str]:
        """From hlsrelay's own lag histogram over every timed run of every case."""
        runs = [
            (c.number, r)
            for c in self.bench.cases
            if HLSRELAY in c.outcomes
            for r in c.outcomes[HLSRELAY].rounds
            if "lag_max_ms" in r
        ]
        label = f"no event-loop stall > {LAG_LIMIT_MS:g} ms (any case)"
        if not runs:
            return label, "n/a (no lag histogram read)", "—"
        stalls = sum(r["stalls"] for _, r in runs)
        worst_case, worst = max(runs, key=lambda run: run[1]["lag_max_ms"])
        longest = f"longest lag ≤ {worst['lag_max_ms']:g} ms (case {worst_case})"
        if not stalls:
            return label, f"{longest}; 0 samples over {LAG_LIMIT_MS:g} ms", "yes"
        where = sorted({number for number, r in runs if r["stalls"]})
        return (
            label,
            f"{stalls:.0f} sample{'' if stalls == 1 else 's'} over {LAG_LIMIT_MS:g} ms "
            f"({'case' if len(where) == 1 else 'cases'} {', '.join(map(str, where))}); {longest}",
            "**no**",
        )

    def headline(self) -> str:
        """The ratios, for README's Performance section."""
        lines = [
            "| target | measured | met |",
            "|---|---|---|",
            *(f"| {t} | {m} | {ok} |" for t, m, ok in self.targets()),
            "",
            f"From `make bench` ({COMMAND}), "
            f"{datetime_utc()}, {os.cpu_count()} cores ({self.bench.pins.note}); full tables, "
            "versions and commands in `tests/bench/RESULTS.md`.",
        ]
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        b = self.bench
        lines = [
            "## Side by side: hlsrelay, nginx, mediaflow-proxy",
            "",
            f"Command: `{COMMAND}` ({b.rounds} recorded rounds of {b.seconds:g} s per contestant "
            "and case after a 1 s warm-up; each round runs every contestant, the order rotating "
            "round by round, the others paused with SIGSTOP while one is timed). "
            f"Pinning: {b.pins.note} (`taskset -c`). Run took "
            f"{self.ended - self.began:.0f} s.",
            "",
            "Origin: nginx "
            f"{nginx_version()} serving static files from a temp dir (one worker, sendfile), "
            f"403 unless `Referer: {REFERER}`. Each timed request asks for an upstream URL not "
            "asked for before (a fresh name or query), except in case 4. Figures: median "
            "(min-max over rounds, n = rounds). Loop lag (hlsrelay only): from its "
            f"`{LOOP_LAG_METRIC}` histogram read before and after each timed run, the upper edge "
            "of the highest bucket reached and the samples (a timer due every 10 ms) that came "
            f"more than {LAG_LIMIT_MS:g} ms late. CPU: the contestant's own processes' CPU "
            "time (user and system, from `/proc`) over each timed run, per request in the wrk "
            "cases, as a share of one core while case 7's downloads are held. The health probe "
            "runs on the load core: its answers bound nothing of the proxy's (nginx shows them "
            "too).",
            "",
            "| contestant | version | command | notes |",
            "|---|---|---|---|",
        ]
        for c in b.contestants.values():
            lines.append(f"| {c.name} | {c.version} | `{c.command}` | {c.notes} |")
        for name, why in b.unavailable.items():
            lines.append(f"| {name} | — | — | unavailable: {why} |")
        lines.append("")
        lines += ["### Targets", "", *self.headline().splitlines()[:-2], ""]
        for case in b.cases:
            lines += [f"### {case.number}. {case.title}", ""]
            columns = [
                *case.columns,
                *[c for c in CPU_COLUMNS if case.has(c[0])],
                ("lag_max_ms", "longest loop lag (≤, own histogram)", 0),
                ("stalls", f"lag samples > {LAG_LIMIT_MS:g} ms", 0),
                ("probe_ms", "longest health-probe answer (client side)", 0),
            ]
            heads = " | ".join(h for _, h, _ in columns)
            lines += [f"| contestant | {heads} |", "|---|" + "---|" * len(columns)]
            for name, outcome in case.outcomes.items():
                if outcome.failure:
                    cells = " | ".join(["—"] * (len(columns) - 1))
                    lines.append(f"| {name} | **fails**: {outcome.failure} | {cells} |")
                    continue
                cells_list = []
                for key, _, digits in columns:
                    s = outcome.spread(key)
                    unit = _unit(key)
                    cells_list.append(
                        "—"
                        if s is None
                        else f"{s.median:,.{digits}f}{unit} "
                        f"({s.low:,.{digits}f}-{s.high:,.{digits}f}, n={s.rounds})"
                    )
                lines.append(f"| {name} | {' | '.join(cells_list)} |")
            if case.commands:
                lines += ["", "Load commands (last round):", ""]
                lines += [f"- {name}: `{cmd}`" for name, cmd in case.commands.items()]
            lines.append("")
        return "\n".join(lines).replace(str(b.work), "$WORK") + "\n"


# CPU figures, shown in a case's table when its rounds have them: the process's own CPU time
# (all its processes) over a timed run, read from /proc before and after it.
CPU_COLUMNS = (
    ("cpu_us", "CPU a request", 0),
    ("cpu_pct", "CPU while held (% of a core)", 0),
)


def _unit(key: str) -> str:
    units = {"mb_s": " MB/s", "peak_mb": " MB", "idle_mb": " MB", "cpu_us": " µs", "cpu_pct": " %"}
    return units.get(key, " ms" if key.endswith("_ms") else "")


def datetime_utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def measure(rounds: int = 3, seconds: float = 4.0, cases: Sequence[int] = range(1, 8)) -> Report:
    for binary in ("nginx", "wrk"):
        if not shutil.which(binary):
            raise RuntimeError(f"{binary} is not installed (make system-deps installs it)")
    pins = cores()
    began = time.monotonic()
    with contextlib.suppress(OSError):
        # This process (the clients of cases 6 and 7, the probe) stays off the proxy's core.
        os.sched_setaffinity(0, {int(c) for c in pins.load.split(",")})
    with (
        tempfile.TemporaryDirectory(prefix="hlsrelay-peers-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        files = Files.write(work)
        origin_port, slow_port = _free_port(), _free_port()
        conf = work / "origin.conf"
        conf.write_text(origin_conf(work, origin_port))
        origin = stack.enter_context(
            running("origin", pins.pin("load", nginx_args(work, conf)), work / "origin.log")
        )
        wait_ready(origin, f"http://127.0.0.1:{origin_port}/healthz")
        slow = stack.enter_context(
            running(
                "slow origin",
                pins.pin("load", [sys.executable, "-m", "tests.bench.bench_peers", "slow-origin",
                                  str(slow_port), str(work / "www" / "big.ts")]),
                work / "slow-origin.log",
                hlsrelay_env(0),
            )
        )  # fmt: skip
        wait_ready(slow, f"http://127.0.0.1:{slow_port}/healthz")
        urls = Urls(f"http://127.0.0.1:{origin_port}", f"http://127.0.0.1:{slow_port}")
        bench = Bench(pins, work, files, urls, origin, slow, {}, {}, rounds, seconds)
        with contextlib.ExitStack() as peers:
            bench.contestants[HLSRELAY] = peers.enter_context(hlsrelay(work, pins))
            proxy = peers.enter_context(nginx_proxy(work, pins, origin_port, slow_port))
            for name in (NGINX_DEFAULT, NGINX_MEMORY, NGINX_CACHE):
                bench.contestants[name] = nginx_contestant(proxy, name)
            try:
                bench.contestants[MEDIAFLOW] = peers.enter_context(mediaflow(work, pins))
            except Unavailable as exc:
                bench.unavailable[MEDIAFLOW] = str(exc)
            for spec in wrk_cases():
                if spec.number in cases:
                    bench.cases.append(bench.run_wrk_case(spec))
            if 6 in cases:
                bench.cases.append(run_coalescing(bench))
        if 7 in cases:
            bench.cases.append(run_memory(bench, max(1, min(rounds, 2))))
        return Report(bench, began, time.monotonic())


def run() -> str:
    """Run every case; the Markdown report (machine facts first)."""
    facts = "".join(f"- {name}: {value}\n" for name, value in machine().items())
    return f"{facts}\n{measure().markdown()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per wrk run")
    parser.add_argument("--cases", default="1,2,3,4,5,6,7", help="e.g. 1,3")
    args = parser.parse_args(argv)
    chosen = [int(x) for x in args.cases.split(",") if x]
    report = measure(args.rounds, args.seconds, chosen)
    facts = "".join(f"- {name}: {value}\n" for name, value in machine().items())
    sys.stdout.write(f"{facts}\n{report.markdown()}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "slow-origin":
        _serve_slow_origin(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "probe":
        _probe(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())

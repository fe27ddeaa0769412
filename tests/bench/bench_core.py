"""Benchmarks of hlsrelay's two hot paths: rewriting playlists and relaying media.

* Rewriting a 3,000-segment live media playlist through the real code path
  (``StreamRelay.rewrite``: the rewriter plus the real token mapper), cold (a fresh
  ``TokenCodec``, nothing memoised) and cached (the same codec again, as on a live reload).
* The size of the rewritten playlist next to the upstream's, plain and gzipped.
* Relaying a 2 MiB segment on loopback, direct from an origin versus through hlsrelay: the origin
  and the proxy each run in their own process (``python -m proxy serve``, the shipped config with
  env overrides; the URL comes from ``python -m proxy sign``), so the proxy's event loop is
  measured as deployed, and the client in this process is the same for both paths.

Nothing here asserts a timing; ``python -m tests.bench`` prints and records the figures. Every
process started here is killed by its PID in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import hashlib
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import aiohttp
from yarl import URL

from proxy.settings import Settings
from proxy.tokens import TokenCodec
from proxy.upstream.relay import StreamRelay
from tests.procs import free_port as _free_port
from tests.procs import stop

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "config" / "hlsrelay.toml"
BENCH_SECRET = "bench-secret-0123456789abcdef"
REFERER = "https://player.example.com/"

SEGMENTS = 3000
SEGMENT_BYTES = 2 * 1024 * 1024
SEGMENT_SEED = 20240501
# Sequential fetches per round; concurrent fetches per round.
SEQUENTIAL_FETCHES = 32
CONCURRENT_FETCHES = 16
MAX_RELAY_ROUNDS = 60
START_TIMEOUT_S = 20.0
FETCH_TIMEOUT_S = 30.0


# -- figures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """A median with the smallest and largest of the rounds it came from."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def show(self, unit: str, digits: int = 2) -> str:
        return (
            f"{self.median:.{digits}f} {unit} "
            f"({self.low:.{digits}f}-{self.high:.{digits}f}, n={self.rounds})"
        )


@dataclass(frozen=True)
class RewriteFigure:
    form: str
    cold_ms: Spread
    cached_ms: Spread
    uris: int


@dataclass(frozen=True)
class SizeFigure:
    form: str
    upstream: int
    rewritten: int
    upstream_gz: int
    rewritten_gz: int


@dataclass(frozen=True)
class RelayFigure:
    pattern: str
    path: str
    throughput_mib_s: Spread
    ttfb_ms: Spread
    proxy_cpu_ms_per_mib: float | None = None
    """hlsrelay's CPU time per MiB relayed, over all recorded rounds together: the kernel
    counts in ticks (10 ms), too coarse to give each round its own figure."""


# -- playlists ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaylistForm:
    name: str
    playlist_url: str
    body: bytes


def _signature(number: int) -> str:
    return hashlib.sha256(f"seg{number}".encode()).hexdigest()[:32]


def live_playlists(segments: int = SEGMENTS) -> list[PlaylistForm]:
    """One live media playlist, its URIs written the ways origins write them.

    Deliberately lean (EXTINF and URI lines, one key line, no PROGRAM-DATE-TIME): URIs are as
    large a share of the body as they get, which is the worst case for the size ratio.
    """
    first = 1

    def body(uri_of: Any, key_uri: str) -> bytes:
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            "#EXT-X-TARGETDURATION:6",
            f"#EXT-X-MEDIA-SEQUENCE:{first}",
            f'#EXT-X-KEY:METHOD=AES-128,URI="{key_uri}",IV=0x00000000000000000000000000000001',
        ]
        for number in range(first, first + segments):
            lines.append("#EXTINF:6.006,")
            lines.append(uri_of(number))
        return ("\n".join(lines) + "\n").encode()

    expires = 1767225600
    return [
        PlaylistForm(
            "relative names (`seg_00001.ts`)",
            "https://origin.example.com/live/abc/index.m3u8",
            body(lambda n: f"seg_{n:05d}.ts", "key.bin"),
        ),
        PlaylistForm(
            "absolute, same host and directory, signed query",
            "https://cdn.example.com/live/abc/index.m3u8?token=0f3a9c&expires=1767225600",
            body(
                lambda n: (
                    f"https://cdn.example.com/live/abc/seg_{n:05d}.ts"
                    f"?token={_signature(n)}&expires={expires}"
                ),
                "https://cdn.example.com/live/abc/key.bin",
            ),
        ),
        PlaylistForm(
            "absolute, other CDN host, signed query",
            "https://origin.example.com/live/abc/index.m3u8",
            body(
                lambda n: (
                    f"https://cdn.example.com/live/abc/seg_{n:05d}.ts"
                    f"?token={_signature(n)}&expires={expires}"
                ),
                "https://keys.example.com/live/abc/key.bin",
            ),
        ),
    ]


def _relay_for(codec: TokenCodec, settings: Settings) -> StreamRelay:
    # rewrite() uses the codec and settings only; no upstream client is needed to time it.
    return StreamRelay(None, codec, settings)  # type: ignore[arg-type]


def _bench_settings() -> Settings:
    return Settings(security={"secret": BENCH_SECRET})  # type: ignore[arg-type]


def _rewrite_once(relay: StreamRelay, codec: TokenCodec, form: PlaylistForm) -> tuple[bytes, int]:
    ctx_token = codec.mint_context(form.playlist_url, {"Referer": REFERER})
    ctx = codec.open_context(ctx_token)
    body, info = relay.rewrite(ctx_token, ctx, form.body, form.playlist_url, form.playlist_url, {})
    return body, info.uri_count


def _timed_rewrite(relay: StreamRelay, codec: TokenCodec, form: PlaylistForm) -> float:
    ctx_token = codec.mint_context(form.playlist_url, {"Referer": REFERER})
    ctx = codec.open_context(ctx_token)
    gc.collect()
    start = time.perf_counter()
    relay.rewrite(ctx_token, ctx, form.body, form.playlist_url, form.playlist_url, {})
    return (time.perf_counter() - start) * 1000


def bench_rewrite(rounds: int) -> tuple[list[RewriteFigure], list[SizeFigure]]:
    settings = _bench_settings()
    secret = BENCH_SECRET.encode()
    rewrites: list[RewriteFigure] = []
    sizes: list[SizeFigure] = []
    for form in live_playlists():
        cold: list[float] = []
        for _ in range(rounds):
            codec = TokenCodec(secret)  # fresh: nothing memoised (key derivation not timed)
            cold.append(_timed_rewrite(_relay_for(codec, settings), codec, form))
        codec = TokenCodec(secret)
        relay = _relay_for(codec, settings)
        rewritten, uris = _rewrite_once(relay, codec, form)  # fills the memo, as a first load
        cached = [_timed_rewrite(relay, codec, form) for _ in range(rounds)]
        rewrites.append(RewriteFigure(form.name, Spread.of(cold), Spread.of(cached), uris))
        sizes.append(
            SizeFigure(
                form.name,
                len(form.body),
                len(rewritten),
                len(gzip.compress(form.body, compresslevel=6)),
                len(gzip.compress(rewritten, compresslevel=6)),
            )
        )
    return rewrites, sizes


# -- the relay ---------------------------------------------------------------------------------


def segment_bytes() -> bytes:
    """The 2 MiB every origin segment serves: random, so nothing on the path can compress it."""
    return random.Random(SEGMENT_SEED).randbytes(SEGMENT_BYTES)


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]

    def log_tail(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:].decode(errors="replace")


@contextlib.contextmanager
def started(name: str, args: list[str], env: dict[str, str]) -> Iterator[Started]:
    """Run ``args`` for the duration of the block; terminate, then kill, by PID, always."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        try:
            yield Started(name, proc, log)
        finally:
            stop(proc)


def _wait_ready(process: Started, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited early:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{process.name} not ready after {START_TIMEOUT_S} s:\n{process.log_tail()}")


def _proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Targets:
    direct: list[str]
    proxied: list[str]


Headers = dict[str, str] | None


async def _fetch(
    session: aiohttp.ClientSession, url: str, headers: Headers, start: float
) -> tuple[float, int]:
    """Time to first body byte (from ``start``) and bytes received."""
    async with session.get(url, headers=headers) as response:
        response.raise_for_status()
        first = await response.content.readany()
        ttfb = time.perf_counter() - start
        size = len(first)
        while chunk := await response.content.readany():
            size += len(chunk)
    if size != SEGMENT_BYTES:
        raise RuntimeError(f"{url}: {size} bytes instead of {SEGMENT_BYTES}")
    return ttfb, size


async def _sequential(
    session: aiohttp.ClientSession, urls: list[str], headers: Headers
) -> tuple[float, float]:
    """MiB/s over the whole run, median TTFB (s)."""
    ttfbs = []
    total = 0
    began = time.perf_counter()
    for url in urls:
        ttfb, size = await _fetch(session, url, headers, time.perf_counter())
        ttfbs.append(ttfb)
        total += size
    elapsed = time.perf_counter() - began
    return total / elapsed / 2**20, statistics.median(ttfbs)


async def _concurrent(
    session: aiohttp.ClientSession, urls: list[str], headers: Headers
) -> tuple[float, float]:
    """MiB/s for all fetches at once (wall time), median TTFB (s) counted from the common start."""
    began = time.perf_counter()
    results = await asyncio.gather(*(_fetch(session, url, headers, began) for url in urls))
    elapsed = time.perf_counter() - began
    return sum(size for _, size in results) / elapsed / 2**20, statistics.median(
        ttfb for ttfb, _ in results
    )


async def _segment_urls(
    session: aiohttp.ClientSession, proxied_playlist: str, origin: str
) -> Targets:
    """Proxied segment URLs as a player finds them: in the rewritten playlist, resolved."""
    # Plain bytes: the session does not decompress, and playlists are served gzip'd on request.
    async with session.get(proxied_playlist, headers={"Accept-Encoding": "identity"}) as response:
        response.raise_for_status()
        text = await response.text()
    base = URL(proxied_playlist, encoded=True)
    proxied = [
        str(base.join(URL(line, encoded=True)))
        for line in text.splitlines()
        if line and not line.startswith("#")
    ]
    direct = [f"{origin}/live/seg_{number:05d}.ts" for number in range(len(proxied))]
    return Targets(direct, proxied)


async def _measure_relay(
    proxied_playlist: str, origin: str, proxy_pid: int, rounds: int
) -> list[RelayFigure]:
    expected = hashlib.sha256(segment_bytes()).hexdigest()
    connector = aiohttp.TCPConnector(limit=64, force_close=False)
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    direct_headers = {"Referer": REFERER}
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        targets = await _segment_urls(session, proxied_playlist, origin)
        # Correctness before speed: both paths hand over exactly the origin's bytes.
        for url, headers in ((targets.direct[0], direct_headers), (targets.proxied[0], None)):
            async with session.get(url, headers=headers) as response:
                response.raise_for_status()
                got = hashlib.sha256(await response.read()).hexdigest()
            if got != expected:
                raise RuntimeError(f"{url}: body differs from the origin's segment")

        # Each proxied fetch is a URL never fetched before, so no cache or coalescing can help.
        cursor = 1
        per_round = SEQUENTIAL_FETCHES + CONCURRENT_FETCHES
        needed = 1 + per_round * (rounds + 1)
        if len(targets.proxied) < needed:
            raise RuntimeError(
                f"the bench playlist lists {len(targets.proxied)} < {needed} segments"
            )

        figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
        cpu_seconds: dict[str, float] = {"sequential": 0.0, "concurrent": 0.0}
        relayed_mib: dict[str, float] = {"sequential": 0.0, "concurrent": 0.0}

        async def one_round(path: str, record: bool) -> None:
            nonlocal cursor
            # Direct, the client sends the Referer itself; through hlsrelay, the token carries it.
            urls, headers = (
                (targets.proxied, None) if path == "hlsrelay" else (targets.direct, direct_headers)
            )
            seq = urls[cursor : cursor + SEQUENTIAL_FETCHES]
            conc = urls[cursor + SEQUENTIAL_FETCHES : cursor + per_round]
            for pattern, run, batch in (
                ("sequential", _sequential, seq),
                ("concurrent", _concurrent, conc),
            ):
                cpu_before = _proc_cpu_seconds(proxy_pid)
                result = await run(session, batch, headers)
                cpu_after = _proc_cpu_seconds(proxy_pid)
                if record:
                    figures.setdefault((pattern, path), []).append(result)
                    if path == "hlsrelay":
                        cpu_seconds[pattern] += cpu_after - cpu_before
                        relayed_mib[pattern] += len(batch) * SEGMENT_BYTES / 2**20

        for number in range(rounds + 1):  # round 0 warms connections and pools, not recorded
            order = ("direct", "hlsrelay") if number % 2 else ("hlsrelay", "direct")
            for path in order:
                await one_round(path, record=number > 0)
            cursor += per_round

    out = []
    for (pattern, path), results in figures.items():
        out.append(
            RelayFigure(
                pattern,
                path,
                Spread.of([mib_s for mib_s, _ in results]),
                Spread.of([ttfb * 1000 for _, ttfb in results]),
                cpu_seconds[pattern] * 1000 / relayed_mib[pattern] if path == "hlsrelay" else None,
            )
        )
    out.sort(key=lambda f: (f.pattern != "sequential", f.path != "direct"))
    return out


def bench_relay(rounds: int) -> list[RelayFigure]:
    origin_port, proxy_port = _free_port(), _free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    env = dict(os.environ)
    env.pop("HLSRELAY_CONFIG", None)
    env.update(
        {
            "HLSRELAY_SERVER__HOST": "127.0.0.1",
            "HLSRELAY_SERVER__PORT": str(proxy_port),
            "HLSRELAY_SECURITY__SECRET": BENCH_SECRET,
            "HLSRELAY_UPSTREAM__ALLOW_NETWORKS": '["127.0.0.0/8"]',
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    origin_cmd = [sys.executable, "-m", "tests.bench.bench_core", "origin", str(origin_port)]
    proxy_cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(SHIPPED_CONFIG)]
    with (
        started("origin", origin_cmd, env) as origin_proc,
        started("hlsrelay", proxy_cmd, env) as proxy_proc,
    ):
        _wait_ready(origin_proc, f"{origin}/healthz")
        _wait_ready(proxy_proc, f"http://127.0.0.1:{proxy_port}/readyz")
        signed = subprocess.run(
            [
                sys.executable, "-m", "proxy", "sign", f"{origin}/live/index.m3u8",
                "--referer", REFERER, "--config", str(SHIPPED_CONFIG),
            ],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if signed.returncode != 0:
            raise RuntimeError(f"hlsrelay sign failed:\n{signed.stderr}")
        playlist_url = signed.stdout.strip()
        try:
            return asyncio.run(_measure_relay(playlist_url, origin, proxy_proc.proc.pid, rounds))
        except Exception:
            print(f"--- hlsrelay log ---\n{proxy_proc.log_tail()}", file=sys.stderr)
            raise


# -- the origin (its own process) --------------------------------------------------------------


def _serve_origin(port: int) -> None:
    """A minimal fast origin: a long live playlist and 2 MiB segments (all the same bytes)."""
    from aiohttp import web

    payload = segment_bytes()
    # One URL per fetch: the check fetch, then every round's fetches (warm-up round included).
    count = 1 + (SEQUENTIAL_FETCHES + CONCURRENT_FETCHES) * (MAX_RELAY_ROUNDS + 1)
    playlist = "\n".join(
        [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            "#EXT-X-TARGETDURATION:6",
            "#EXT-X-MEDIA-SEQUENCE:0",
            *(f"#EXTINF:6.000,\nseg_{n:05d}.ts" for n in range(count)),
            "",
        ]
    )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=playlist, content_type="application/vnd.apple.mpegurl")

    async def segment(request: web.Request) -> web.Response:
        if request.headers.get("Referer") != REFERER:
            return web.Response(status=403)
        return web.Response(body=payload, content_type="video/mp2t")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/live/index.m3u8", index)
    app.router.add_get("/live/{name}.ts", segment)
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, loop=loop, print=None, access_log=None)


# -- where it ran ------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    packages = []
    for name in ("aiohttp", "uvloop", "yarl", "multidict", "cryptography", "pydantic"):
        try:
            packages.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            packages.append(f"{name} (not installed)")
    from proxy import __version__

    return {
        "cpus": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "cpu model": cpu_model,
        "load average at start": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(packages),
        "hlsrelay": __version__,
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "origin":
        _serve_origin(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m tests.bench.bench_core origin PORT (benchmarks: -m tests.bench)")

"""The scale-out shape of deploy/docker-compose.yml, without Docker: nginx with the shipped edge
config in front of two ``hlsrelay serve`` processes sharing one redis-server, all on loopback.

* a playlist fetched through either instance (or the edge) costs the origin one request;
* a live channel asked for many times, through the edge and from each instance directly, runs
  exactly one ffmpeg across both (the other instance answers 503 with Retry-After);
* SIGKILL of the channel's owner moves the channel to the other instance within the lease time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.errors import ServiceUnavailable
from proxy.hls.kinds import UriKind
from proxy.live.process import find_ffmpeg
from proxy.tokens import TokenCodec
from tests.cluster import Instance, ffmpeg_children, instance, reap_ffmpegs
from tests.live_origin import REFERER, TsOrigin
from tests.origin import Origin
from tests.services import Edge, MissingBinary, Redis, nginx_edge, redis_server

try:
    FFMPEG: str | None = find_ffmpeg("auto")
except ServiceUnavailable:
    FFMPEG = None

SECRET = "scale-out-test-secret-0123456789"
LEASE_TTL = 3.0


@pytest.fixture
def redis() -> Iterator[Redis]:
    try:
        with redis_server() as server:
            yield server
    except MissingBinary as exc:
        pytest.skip(str(exc))


def write_config(path: Path, redis: Redis, extra: str = "") -> Path:
    path.write_text(
        f"""
[security]
secret = "{SECRET}"
[upstream]
allow_networks = ["127.0.0.0/8"]
[cache]
backend = "redis"
redis_url = "{redis.url}"
{extra}
"""
    )
    return path


@dataclass
class Cluster:
    a: Instance
    b: Instance
    edge: Edge


@contextlib.asynccontextmanager
async def cluster(config: Path, workdir: Path) -> AsyncIterator[Cluster]:
    async with instance("relay-a", config, workdir) as a, instance("relay-b", config, workdir) as b:
        try:
            with nginx_edge(a.port, b.port) as edge:
                yield Cluster(a, b, edge)
        except MissingBinary as exc:
            pytest.skip(str(exc))


def playlist_path(url: str) -> str:
    codec = TokenCodec(SECRET.encode())
    ctx = codec.mint_context(url, {})
    return f"/s/{ctx}/" + codec.child_path(ctx, codec.open_context(ctx), url, UriKind.PLAYLIST)


async def test_a_playlist_through_either_instance_costs_one_origin_request(
    origin: Origin, redis: Redis, tmp_path: Path
) -> None:
    origin.playlist("/show/index.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nseg1.ts\n")
    path = playlist_path(f"{origin.url}/show/index.m3u8")
    config = write_config(tmp_path / "hlsrelay.toml", redis)
    async with cluster(config, tmp_path) as c, aiohttp.ClientSession() as session:
        bodies = []
        for base in (c.a.url, c.b.url, c.edge.url, c.b.url, c.a.url):
            async with session.get(base + path) as resp:
                assert resp.status == 200
                bodies.append(await resp.read())
        assert len(set(bodies)) == 1
        assert b"seg1.ts" in bodies[0]
    fetched = [s for s in origin.seen if s.path == "/show/index.m3u8"]
    assert len(fetched) == 1


# -- live channels -----------------------------------------------------------------------------


@pytest.fixture
async def ts_origin(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TsOrigin:
    if FFMPEG is None:
        pytest.skip("no ffmpeg on PATH and none from imageio-ffmpeg")
    ts = TsOrigin(FFMPEG)
    server = await aiohttp_server(ts.app())
    ts.url = str(server.make_url("")).rstrip("/")
    return ts


def live_config(path: Path, redis: Redis, ts_origin: TsOrigin) -> Path:
    return write_config(
        path,
        redis,
        f"""
[live]
segment_seconds = 1.0
lease_ttl = {LEASE_TTL}
idle_timeout = 30.0
[[channels]]
id = "tv"
url = "{ts_origin.url}/live/stream.ts"
headers = {{ Referer = "{REFERER}" }}
""",
    )


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with session.get(url) as resp:
        return resp.status, resp.headers.get("Retry-After", ""), await resp.read()


@pytest.mark.ffmpeg
async def test_a_live_channel_runs_once_and_moves_when_its_owner_dies(
    ts_origin: TsOrigin, redis: Redis, tmp_path: Path
) -> None:
    config = live_config(tmp_path / "hlsrelay.toml", redis, ts_origin)
    async with cluster(config, tmp_path) as c, aiohttp.ClientSession() as session:
        playlist = "/live/tv/index.m3u8"
        # Many viewers at once: through the edge, and straight to each instance.
        answers = await asyncio.gather(
            *(_get(session, c.edge.url + playlist) for _ in range(8)),
            *(_get(session, base + playlist) for base in (c.a.url, c.b.url) for _ in range(4)),
        )
        edge_answers, direct = answers[:8], answers[8:]
        assert all(status == 200 for status, _, _ in edge_answers), edge_answers
        assert all(b"#EXTINF" in body for _, _, body in edge_answers)
        nodes = (c.a, c.b)
        ffmpegs = {n.name: ffmpeg_children(n.pid) for n in nodes}
        sessions = {n.name: await n.metric(session, "hlsrelay_live_sessions") for n in nodes}
        assert sorted(len(p) for p in ffmpegs.values()) == [0, 1], ffmpegs
        assert sorted(sessions.values()) == [0.0, 1.0], sessions
        owner, other = (c.a, c.b) if ffmpegs[c.a.name] else (c.b, c.a)
        # Straight to the instances: 200 from the owner, 503 + Retry-After from the other.
        to_owner, to_other = (direct[:4], direct[4:]) if owner is c.a else (direct[4:], direct[:4])
        assert [status for status, _, _ in to_owner] == [200] * 4
        assert [status for status, _, _ in to_other] == [503] * 4
        assert all(1 <= int(retry_after) <= LEASE_TTL for _, retry_after, _ in to_other)
        refused = await other.metric(session, "hlsrelay_live_lease_refusals_total")
        assert refused >= 4

        # The owner dies without a word: its lease runs out, the other instance takes over.
        orphans = set(ffmpegs[owner.name])
        owner.proc.kill()
        await owner.proc.wait()
        killed_at = asyncio.get_running_loop().time()
        resumed = None
        for _ in range(200):  # bounded: lease TTL plus ffmpeg's first segment, at most ~20 s
            # Asked directly: the edge could answer from its cache meanwhile.
            status, _, body = await _get(session, other.url + playlist)
            if status == 200 and b"#EXTINF" in body:
                resumed = asyncio.get_running_loop().time() - killed_at
                break
            await asyncio.sleep(0.1)
        assert resumed is not None, "the channel did not resume on the surviving instance"
        assert resumed <= LEASE_TTL + 10
        status, _, body = await _get(session, c.edge.url + playlist)
        assert status == 200
        assert b"#EXTINF" in body
        assert len(ffmpeg_children(other.pid)) == 1
        assert await other.metric(session, "hlsrelay_live_sessions") == 1
        # The dead owner's ffmpeg ends on its own (its stdin closed with its parent).
        assert await reap_ffmpegs(orphans) == []

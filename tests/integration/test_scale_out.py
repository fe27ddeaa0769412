"""The scale-out shape of deploy/docker-compose.yml, without Docker: nginx with the shipped edge
config in front of two ``hlsrelay serve`` processes sharing one redis-server, all on loopback.

* a playlist fetched through either instance (or the edge) costs the origin one request;
* a live channel asked for many times, through the edge and from each instance directly, runs
  exactly one ffmpeg across both (the other instance answers 503 with Retry-After);
* SIGKILL of the channel's owner moves the channel to the other instance within the lease time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from proxy.hls.kinds import UriKind
from proxy.tokens import TokenCodec
from tests.cluster import Instance, instance
from tests.origin import Origin
from tests.services import Edge, MissingBinary, Redis, nginx_edge, redis_server

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

"""End to end with a real HLS client: ffmpeg plays an AES-128 VOD through hlsrelay.

ffmpeg packages a two-variant encrypted VOD; a Referer-gated origin serves it (403 without the
right Referer); ffmpeg then remuxes one variant twice, once straight from the origin with the
Referer set on its command line, once through the proxied URL with no headers at all. The two
``framecrc`` listings (every packet's timestamps, duration, size and CRC, after decryption) must
be identical line for line, and the origin must have seen the proxy, with the Referer, on every
request of the second run, the key included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.web.keys import SETTINGS
from tests.conftest import TEST_API_KEY, ProxyFactory
from tests.e2e.ffmpeg_vod import (
    EncryptedVod,
    RefererGatedOrigin,
    find_ffmpeg,
    first_difference,
    framecrc_totals,
    package_encrypted_vod,
    run_ffmpeg,
)

FFMPEG = find_ffmpeg()
REFERER = "https://player.example.test/watch?v=42"
FFMPEG_TIMEOUT_S = 60.0

pytestmark = [
    pytest.mark.ffmpeg,
    pytest.mark.skipif(
        FFMPEG is None, reason="no ffmpeg: not on PATH and imageio-ffmpeg has no binary here"
    ),
]


@pytest.fixture(scope="session")
def encrypted_vod(tmp_path_factory: pytest.TempPathFactory) -> EncryptedVod:
    assert FFMPEG is not None
    return package_encrypted_vod(FFMPEG, tmp_path_factory.mktemp("vod") / "package")


@pytest.fixture
async def gated_origin(
    encrypted_vod: EncryptedVod, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> RefererGatedOrigin:
    origin = RefererGatedOrigin(encrypted_vod.root, REFERER)
    server = await aiohttp_server(origin.app())
    origin.url = str(server.make_url("")).rstrip("/")
    return origin


def remux_args(playlist_url: str, program: int, *, headers: str | None = None) -> list[str]:
    """ffmpeg as a player: read one program (variant) of the HLS stream, remux it, framecrc it.

    No ``-allowed_extensions ALL`` and no ``-protocol_whitelist``: ffmpeg's HLS demuxer checks
    extensions only for ``file:`` URLs, and an ``http:`` top-level URL already lets it open the
    ``crypto+http`` segments and the key. Needing either option here would mean the proxy had
    handed ffmpeg something other than plain http URLs.
    """
    args = []
    if headers is not None:
        args += ["-headers", headers]
    return [
        *args,
        # ffmpeg's own I/O bound (microseconds), so a stalled request fails the run with a
        # message rather than only hitting the outer timeout.
        "-rw_timeout", "15000000",
        "-i", playlist_url,
        # Same program on both runs; without -map ffmpeg picks "best" streams across variants.
        "-map", f"0:p:{program}",
        "-c", "copy",
        "-fflags", "+bitexact",
        "-f", "framecrc",
        "-",
    ]  # fmt: skip


async def test_gated_origin_refuses_requests_without_the_referer(
    gated_origin: RefererGatedOrigin,
) -> None:
    """The gate is real: without the Referer, the very first request already fails."""
    master = f"{gated_origin.url}/vod/master.m3u8"
    async with aiohttp.ClientSession() as session:
        async with session.get(master) as refused:
            assert refused.status == 403
        async with session.get(master, headers={"Referer": "https://elsewhere.test/"}) as wrong:
            assert wrong.status == 403
        async with session.get(master, headers={"Referer": REFERER}) as served:
            assert served.status == 200


@pytest.mark.parametrize("program", [0, 1])
async def test_ffmpeg_plays_encrypted_vod_through_proxy_exactly_as_direct(
    encrypted_vod: EncryptedVod,
    gated_origin: RefererGatedOrigin,
    proxy_factory: ProxyFactory,
    program: int,
) -> None:
    assert FFMPEG is not None
    origin_master = f"{gated_origin.url}/vod/{encrypted_vod.master}"

    direct = await run_ffmpeg(
        FFMPEG,
        remux_args(origin_master, program, headers=f"Referer: {REFERER}\r\n"),
        timeout_s=FFMPEG_TIMEOUT_S,
    )
    direct_requests = list(gated_origin.seen)
    gated_origin.seen.clear()

    proxy = await proxy_factory()
    minted = await proxy.post(
        "/api/v1/streams",
        json={"url": origin_master, "headers": {"Referer": REFERER}},
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
    )
    assert minted.status == 201, await minted.text()
    playlist_url = (await minted.json())["playlist_url"]
    assert playlist_url.startswith(str(proxy.make_url("/s/")))

    proxied = await run_ffmpeg(
        FFMPEG, remux_args(playlist_url, program), timeout_s=FFMPEG_TIMEOUT_S
    )
    proxied_requests = list(gated_origin.seen)

    # Same packets, same timestamps, same bytes after decryption: line for line.
    direct_lines = direct.decode().splitlines()
    proxied_lines = proxied.decode().splitlines()
    assert proxied_lines == direct_lines, first_difference(direct_lines, proxied_lines)

    # And it is the whole variant, not two equally truncated runs.
    totals = framecrc_totals(direct.decode())
    assert len(totals) == 2, totals  # one video and one audio stream
    video = totals[0]
    assert video.packets == encrypted_vod.seconds * encrypted_vod.fps, totals
    assert framecrc_totals(proxied.decode()) == totals
    expected_size = (160, 90) if program == 1 else (320, 180)
    assert f"#dimensions 0: {expected_size[0]}x{expected_size[1]}" in direct_lines

    # The direct run really did go through the gate with the header (sanity for the comparison).
    assert direct_requests
    assert all(r.status == 200 for r in direct_requests), direct_requests

    # Every request of the proxied run came from the proxy and carried the Referer.
    proxy_agent = proxy.app[SETTINGS].upstream.user_agent
    assert proxied_requests
    for request in proxied_requests:
        assert request.status == 200, (request.path, request.status)
        assert request.headers.get("Referer") == REFERER, request.path
        assert request.headers.get("User-Agent") == proxy_agent, (
            f"{request.path} was not fetched by the proxy "
            f"(User-Agent {request.headers.get('User-Agent')!r})"
        )

    # Each kind of child went through the proxy: variants, the key, this variant's segments.
    proxied_paths = {r.path for r in proxied_requests}
    assert "/vod/master.m3u8" in proxied_paths
    assert f"/vod/v{program}/index.m3u8" in proxied_paths
    assert "/vod/enc.key" in proxied_paths, "the key was not fetched through the proxy"
    segments = {f"/vod/{name}" for name in encrypted_vod.segment_names[program]}
    assert segments <= proxied_paths, sorted(segments - proxied_paths)
    # ...and nothing the player did not ask for when it went direct.
    assert proxied_paths == {r.path for r in direct_requests}


def test_package_is_what_the_test_claims(encrypted_vod: EncryptedVod) -> None:
    """Guards the fixture: two variants, a relative key URI, encrypted segments."""
    root: Path = encrypted_vod.root
    master = (root / "master.m3u8").read_text()
    assert master.count("#EXT-X-STREAM-INF") == 2
    for variant in range(encrypted_vod.variants):
        media = (root / f"v{variant}" / "index.m3u8").read_text()
        assert '#EXT-X-KEY:METHOD=AES-128,URI="../enc.key"' in media
        assert "#EXT-X-ENDLIST" in media

"""The cache policy table of DESIGN.md, class by class."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from proxy.hls.cache_policy import (
    PolicyLimits,
    is_live,
    media_freshness,
    not_found_freshness,
    playlist_freshness,
)
from proxy.hls.kinds import UriKind
from proxy.hls.rewrite import PlaylistInfo


def info(
    *,
    multivariant: bool = False,
    target: float | None = 6.0,
    part: float | None = None,
    endlist: bool = False,
    playlist_type: str | None = None,
) -> PlaylistInfo:
    return PlaylistInfo(multivariant, target, part, endlist, playlist_type, MappingProxyType({}), 3)


@pytest.mark.parametrize(
    ("target", "fresh_for", "max_age"),
    [(6.0, 3.0, 3), (4.0, 2.0, 2), (5.0, 2.5, 2), (10.0, 5.0, 5), (1.0, 0.5, 1), (2.0, 1.0, 1)],
)
def test_live_playlist_is_fresh_for_half_the_target_duration(
    target: float, fresh_for: float, max_age: int
) -> None:
    policy = playlist_freshness(info(target=target))
    assert policy.fresh_for == fresh_for
    assert policy.max_age == max_age
    assert policy.cache_control == f"public, max-age={max_age}"
    assert policy.shared


def test_event_playlist_without_endlist_is_live() -> None:
    assert playlist_freshness(info(playlist_type="EVENT")).fresh_for == 3.0
    assert is_live(info(playlist_type="EVENT"))


def test_ll_hls_playlist_is_fresh_for_one_second() -> None:
    policy = playlist_freshness(info(target=4.0, part=1.0))
    assert policy.fresh_for == 1.0
    assert policy.cache_control == "public, max-age=1"


def test_blocking_reload_is_kept_six_target_durations() -> None:
    policy = playlist_freshness(info(target=4.0, part=1.0), blocking=True)
    assert policy.fresh_for == 24.0
    assert policy.cache_control == "public, max-age=24"


def test_blocking_reload_without_target_is_short() -> None:
    assert playlist_freshness(info(target=None), blocking=True).fresh_for == 1.0


@pytest.mark.parametrize(
    "playlist", [info(endlist=True), info(playlist_type="VOD"), info(endlist=True, part=1.0)]
)
def test_vod_and_endlist_are_long(playlist: PlaylistInfo) -> None:
    policy = playlist_freshness(playlist, limits=PolicyLimits(vod_max_age=7200))
    assert policy.cache_control == "public, max-age=7200"
    assert not is_live(playlist)


def test_multivariant_uses_its_own_age() -> None:
    policy = playlist_freshness(
        info(multivariant=True, target=None), limits=PolicyLimits(multivariant_max_age=45)
    )
    assert policy.cache_control == "public, max-age=45"


def test_media_playlist_without_target_duration_is_short() -> None:
    assert playlist_freshness(info(target=None)).cache_control == "public, max-age=1"


@pytest.mark.parametrize("kind", [UriKind.MEDIA, UriKind.INIT])
def test_segments_parts_and_init_sections_are_long_and_immutable(kind: UriKind) -> None:
    policy = media_freshness(kind)
    assert policy.cache_control == "public, max-age=31536000, immutable"
    assert policy.shared


def test_keys_are_private_no_store() -> None:
    policy = media_freshness(UriKind.KEY)
    assert policy.cache_control == "private, no-store"
    assert not policy.shared


def test_media_behind_a_top_level_url_is_not_immutable() -> None:
    # A minted "playlist" URL that is really a progressive file or an endless TS stream.
    assert media_freshness(UriKind.PLAYLIST).cache_control == "no-cache"


def test_not_yet_available_404_is_at_most_one_second() -> None:
    policy = not_found_freshness()
    assert policy.max_age <= 1
    assert policy.cache_control == "public, max-age=1"


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=90-", 100, (90, 100)),
        ("bytes=-10", 100, (90, 100)),
        ("bytes=-500", 100, (0, 100)),
        ("bytes=50-5000", 100, (50, 100)),
        ("bytes=100-", 100, None),
        ("bytes=5-2", 100, None),
        ("bytes=0-1,4-5", 100, None),
        ("items=0-1", 100, None),
        ("bytes=a-b", 100, None),
        ("bytes=-0", 100, None),
        ("bytes=0-0", 0, None),
    ],
)
def test_single_byte_range(header: str, size: int, expected: tuple[int, int] | None) -> None:
    from proxy.upstream.relay import single_byte_range

    assert single_byte_range(header, size) == expected

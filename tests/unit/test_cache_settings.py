"""The [cache] section: shipped defaults, env overrides, validation, the Redis password masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.settings import ConfigError, load_settings, masked

REPO = Path(__file__).resolve().parents[2]


def test_shipped_cache_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HLSRELAY_CONFIG", raising=False)
    cache = load_settings(REPO / "config" / "hlsrelay.toml").cache
    assert cache.backend == "memory"
    assert cache.prefetch_segments == 0
    assert cache.memory_bytes == 256 * 1024 * 1024
    assert cache.max_object_bytes == 8 * 1024 * 1024
    assert cache.inflight_bytes == 16 * 1024 * 1024
    assert cache.inflight_turn_chunks == 128
    assert cache.stale_if_error == 30.0


def test_inflight_turn_chunks_is_overridden_and_validated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[cache]\ninflight_turn_chunks = 0\n")
    assert load_settings(path).cache.inflight_turn_chunks == 0  # no limit
    monkeypatch.setenv("HLSRELAY_CACHE__INFLIGHT_TURN_CHUNKS", "256")
    assert load_settings(path).cache.inflight_turn_chunks == 256
    monkeypatch.setenv("HLSRELAY_CACHE__INFLIGHT_TURN_CHUNKS", "-1")
    with pytest.raises(ConfigError, match="inflight_turn_chunks"):
        load_settings(path)


def test_every_cache_key_is_documented_in_the_shipped_config() -> None:
    from proxy.settings import CacheSettings

    text = (REPO / "config" / "hlsrelay.toml").read_text()
    section = text.split("[cache]", 1)[1]
    for name in CacheSettings.model_fields:
        assert f"\n{name} = " in section, name


def test_every_setting_of_every_section_is_in_the_shipped_config() -> None:
    """Each key stands in config/hlsrelay.toml, set or as a commented example."""
    import re
    import typing

    from proxy.settings import Settings

    text = (REPO / "config" / "hlsrelay.toml").read_text()
    missing = []
    for section, field in Settings.model_fields.items():
        model = field.annotation
        args = typing.get_args(model)
        if args:  # tuple[ChannelSettings, ...] and the like
            model = args[0]
        for key in getattr(model, "model_fields", {}):
            if not re.search(rf"^#? ?{re.escape(key)} = ", text, re.MULTILINE):
                missing.append(f"{section}.{key}")
    assert missing == []


def test_env_selects_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[cache]\nmemory_bytes = 1000\n")
    monkeypatch.setenv("HLSRELAY_CACHE__BACKEND", "redis")
    monkeypatch.setenv("HLSRELAY_CACHE__REDIS_URL", "redis://:s3cret@10.0.0.5:6380/2")
    settings = load_settings(path)
    assert settings.cache.backend == "redis"
    assert settings.cache.memory_bytes == 1000
    shown = masked(settings)["cache"]["redis_url"]
    assert "s3cret" not in shown and shown == "redis://:********@10.0.0.5:6380/2"


@pytest.mark.parametrize(
    ("line", "culprit"),
    [
        ('backend = "memcached"', "cache.backend"),
        ('redis_url = "http://x"', "cache.redis_url"),
        ("memory_bytes = -1", "cache.memory_bytes"),
        ("prefetch_segments = 50", "cache.prefetch_segments"),
        ("stale_if_error = -1", "cache.stale_if_error"),
        ("surprise = 1", "cache.surprise"),
    ],
)
def test_bad_cache_values_name_the_key(tmp_path: Path, line: str, culprit: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[cache]\n{line}\n")
    with pytest.raises(ConfigError, match=culprit):
        load_settings(path)

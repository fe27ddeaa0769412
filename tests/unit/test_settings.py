"""Settings and the command line: file + env, one-line errors with exit 2, secrets masked."""

from __future__ import annotations

import gc
import json
import platform
import re
import types
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.__main__ import main
from proxy.settings import ConfigError, load_settings, token_secret

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hlsrelay.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid_and_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HLSRELAY_CONFIG", raising=False)
    settings = load_settings(REPO / "config" / "hlsrelay.toml")
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8080
    assert settings.upstream.allow_networks == ()
    assert settings.security.api_keys == ()


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[server]\nport = 1234\n[upstream]\nmax_redirects = 2\n")
    monkeypatch.setenv("HLSRELAY_SERVER__PORT", "9000")
    monkeypatch.setenv("HLSRELAY_UPSTREAM__ALLOW_NETWORKS", '["10.1.0.0/16"]')
    settings = load_settings(path)
    assert settings.server.port == 9000
    assert settings.upstream.max_redirects == 2
    assert str(settings.upstream.allow_networks[0]) == "10.1.0.0/16"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[server]\nport = 'eighty'\n", "server.port"),
        ("[server]\nprot = 80\n", "server.prot: unknown key"),
        ("[nonsense]\nx = 1\n", "nonsense: unknown key"),
        ("[upstream]\nallow_networks = ['not-a-net']\n", "upstream.allow_networks"),
        ("[security]\nsecret = 'short'\n", "security.secret"),
        ("[server\n", "hlsrelay.toml"),
    ],
)
def test_bad_config_names_the_culprit(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(write(tmp_path, text))


def test_cli_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[server]\nport = -5\n")
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "server.port" in err


def test_missing_explicit_config_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", "/nonexistent/hlsrelay.toml"]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_check_config_masks_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        "[security]\nsecret = 'super-secret-key-value-1234'\napi_keys = ['api-key-value-xyz']\n",
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "super-secret-key-value" not in out and "api-key-value-xyz" not in out
    doc = json.loads(out)
    assert doc["security"]["secret"] == "********"
    assert doc["security"]["api_keys"] == ["********"]


def test_secret_file_is_created_once_and_reused(tmp_path: Path) -> None:
    key_file = tmp_path / "var" / "secret"
    path = write(tmp_path, f"[security]\nsecret_file = '{key_file}'\n")
    settings = load_settings(path)
    first, origin = token_secret(settings)
    assert origin == "generated"
    assert key_file.stat().st_mode & 0o777 == 0o600
    again, origin = token_secret(settings)
    assert (again, origin) == (first, "file")


def test_sign_prints_a_url_the_server_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.tokens import TokenCodec

    path = write(tmp_path, "[security]\nsecret = 'sign-test-secret-0123456789'\n")
    code = main(
        [
            "sign",
            "https://cdn.example.com/live/master.m3u8",
            "--referer",
            "https://site.example/",
            "--header",
            "X-Token: abc",
            "--config",
            str(path),
        ]
    )
    assert code == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith("http://127.0.0.1:8080/s/") and url.endswith("/master.m3u8")
    _, ctx_token, ref_token, _ = url.split("/", 3)[3].split("/")
    codec = TokenCodec(b"sign-test-secret-0123456789")
    ctx = codec.open_context(ctx_token)
    assert dict(ctx.headers) == {"Referer": "https://site.example/", "X-Token": "abc"}
    assert (
        codec.open_ref(ctx_token, ctx, ref_token).url == "https://cdn.example.com/live/master.m3u8"
    )


def test_sign_refuses_header_injection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[security]\nsecret = 'sign-test-secret-0123456789'\n")
    code = main(["sign", "https://a.example/x.m3u8", "--referer", "a\r\nb", "--config", str(path)])
    assert code == 2
    assert "CR" in capsys.readouterr().err


def test_sign_without_any_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[server]\nport = 8080\n")
    assert main(["sign", "https://a.example/x.m3u8", "--config", str(path)]) == 2
    assert "security.secret" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[[channels]]\nid = "a"\nurl = "ftp://x/y"\n', "channels.0.url"),
        ('[[channels]]\nid = "bad id"\nurl = "http://x/y"\n', "channels.0.id"),
        (
            '[[channels]]\nid = "a"\nurl = "http://x"\n[[channels]]\nid = "a"\nurl = "http://y"\n',
            "channels",
        ),
        ('[[channel_lists]]\npath = "a.m3u"\nurl = "http://x/l.m3u"\n', "channel_lists.0"),
        ('[[channel_lists]]\nurl = "file:///etc/passwd"\n', "channel_lists.0.url"),
        ("[live]\nsegment_seconds = 0\n", "live.segment_seconds"),
        ('[live]\naudio = "opus"\n', "live.audio"),
        ("[live]\nmax_sessions = 0\n", "live.max_sessions"),
    ],
)
def test_bad_live_and_channel_settings_name_the_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=rf": {re.escape(where)}[.:]"):
        load_settings(write(tmp_path, text))


def test_shipped_config_has_the_demo_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HLSRELAY_CONFIG", raising=False)
    settings = load_settings(REPO / "config" / "hlsrelay.toml")
    demo = next(c for c in settings.channels if c.id == "demo")
    assert demo.url.startswith("lavfi:") and demo.kind == "ts"
    assert settings.live.ffmpeg == "auto"


def test_check_config_masks_channel_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '[[channels]]\nid = "a"\nurl = "http://u:pw@h/x.ts?token=SECRET1"\n'
        'headers = { Cookie = "SECRET2" }\nbackup_urls = ["http://h/y.ts?k=SECRET3"]\n'
        '[[channel_lists]]\nurl = "http://h/get.php?username=u&password=SECRET4"\n',
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for secret in ("SECRET1", "SECRET2", "SECRET3", "SECRET4", "pw@"):
        assert secret not in out
    doc = json.loads(out)
    assert doc["channels"][0]["url"] == "http://********@h/x.ts?********"
    assert doc["channels"][0]["headers"] == {"Cookie": "********"}


def test_serve_listens_with_the_configured_backlog_and_tunes_the_gc_once_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.web.access_log
    import proxy.web.server
    from proxy import __main__ as cli
    from proxy.web.keys import SETTINGS

    served: list[tuple[web.Application, dict[str, Any]]] = []
    monkeypatch.setattr(proxy.web.server, "run", lambda app, **kw: served.append((app, kw)))
    tuned: list[bool] = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: tuned.append(True) or True)
    closed: list[bool] = []
    # The log writer's thread is not this test's subject; that serve closes it at exit is.
    writer = types.SimpleNamespace(close=lambda: closed.append(True))
    monkeypatch.setattr(proxy.web.access_log, "configure_logging", lambda log_format: writer)
    path = write(
        tmp_path, "[server]\nbacklog = 777\n[security]\nsecret = 'serve-test-secret-0123'\n"
    )
    assert main(["serve", "--config", str(path)]) == 0
    ((app, options),) = served
    options["loop"].close()
    # server.start listens with it (tests/integration/test_fast_hits.py reads it back).
    assert app[SETTINGS].server.backlog == 777
    assert app.on_startup[-1] is cli.tune_gc  # after every cleanup_ctx has made its state
    assert tuned == [True]  # the allocator's thresholds, before the app makes its state
    assert closed == [True]  # pending log lines written before the process ends


async def test_tune_gc_freezes_what_startup_made_and_sets_the_serving_thresholds() -> None:
    from proxy import __main__ as cli

    threshold = gc.get_threshold()
    try:
        await cli.tune_gc(web.Application())
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == cli.GC_THRESHOLDS != threshold
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_tune_malloc_sets_glibcs_thresholds_and_leaves_other_c_libraries_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy import __main__ as cli

    calls: list[tuple[int, int]] = []

    class Glibc:
        def gnu_get_libc_version(self) -> bytes:
            return b"2.36"

        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(cli.ctypes, "CDLL", lambda name: Glibc())
    assert cli.tune_malloc()
    assert calls == [(-3, cli.MALLOC_MMAP_THRESHOLD), (-1, cli.MALLOC_TRIM_THRESHOLD)]

    class Musl:  # mallopt is there (a stub), gnu_get_libc_version is not
        def mallopt(self, param: int, value: int) -> int:
            raise AssertionError("called under a C library that is not glibc")

    monkeypatch.setattr(cli.ctypes, "CDLL", lambda name: Musl())
    assert not cli.tune_malloc()


def test_tune_malloc_works_on_this_machines_c_library() -> None:
    from proxy import __main__ as cli

    # The real call (this process keeps the thresholds: harmless for a test run).
    assert cli.tune_malloc() == (platform.libc_ver()[0] == "glibc")


def test_backlog_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.backlog"):
        load_settings(write(tmp_path, "[server]\nbacklog = 0\n"))

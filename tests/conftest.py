"""Shared fixtures: settings for tests, a real origin on port 0, the real app on port 0."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from proxy.settings import Settings
from proxy.web import access_log
from tests.origin import Origin

TEST_SECRET = "test-secret-0123456789abcdef"
TEST_API_KEY = "test-api-key-123"


@contextlib.contextmanager
def serve_logging(
    log_format: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[access_log.BatchedLogWriter, io.StringIO]]:
    """Logging as ``hlsrelay serve`` configures it (its batched writer, access lines going to it
    directly), writing to a string instead of stderr; the writer is closed (what it holds
    written) and the root logger's handlers put back on the way out."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    writer = access_log.configure_logging(log_format)
    try:
        yield writer, out
    finally:
        writer.close()
        root.handlers[:], root.level = saved


def make_settings(**sections: Any) -> Settings:
    """Settings for tests: a fixed key, an API key, loopback allowed (the origin lives there)."""
    base: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "security": {"secret": TEST_SECRET, "api_keys": [TEST_API_KEY]},
        "upstream": {
            "allow_networks": ["127.0.0.0/8"],
            "connect_timeout": 2.0,
            "first_byte_timeout": 2.0,
            "read_timeout": 2.0,
        },
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(name, {}).update(values)
        else:  # array-of-tables sections: [[channels]], [[channel_lists]]
            base[name] = values
    # Built directly (not from config/hlsrelay.toml) so the shipped config cannot change tests.
    return Settings(**base)


@pytest.fixture
async def origin(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Origin:
    org = Origin()
    server = await aiohttp_server(org.app())
    org.url = str(server.make_url("")).rstrip("/")
    return org


ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def proxy_factory(aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]) -> ProxyFactory:
    """Start the real app on a loopback port with settings built by :func:`make_settings`."""

    async def start(**sections: Any) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(make_settings(**sections)))

    return start


@pytest.fixture
async def proxy(proxy_factory: ProxyFactory) -> TestClient[Any, Any]:
    return await proxy_factory()

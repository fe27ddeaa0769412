"""Access log lines: route names, JSON shape, and nothing secret."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.web.access_log import AccessLogger, JsonAccessLogger


async def _request(path: str) -> web.Request:
    """A request matched by the real router (so match_info is what aiohttp gives the logger)."""
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/healthz", handler, name="healthz")
    app.router.add_get("/s/{ctx}/{ref}/{name}", handler, name="stream")
    request = make_mocked_request("GET", path, app=app, headers={"X-Request-Id": "abc"})
    request._match_info = await app.router.resolve(request)
    return request


@pytest.mark.parametrize(
    ("path", "logged_route", "logged_path"),
    [
        ("/healthz", "healthz", "/healthz"),
        ("/s/CTXTOKEN/REFTOKEN/seg.ts", "stream", "/s/…/seg.ts"),
        ("/no/such/TOKEN", "unmatched", "-"),
    ],
)
async def test_access_lines(
    caplog: pytest.LogCaptureFixture, path: str, logged_route: str, logged_path: str
) -> None:
    request = await _request(path)
    logger = logging.getLogger("test.access")
    caplog.set_level(logging.INFO, "test.access")
    JsonAccessLogger(logger, "").log(request, web.Response(status=200), 0.0123)
    doc = json.loads(caplog.records[-1].getMessage())
    assert doc["route"] == logged_route
    assert doc["path"] == logged_path
    assert doc["status"] == 200
    assert doc["request_id"] == "abc"
    assert "TOKEN" not in caplog.text
    AccessLogger(logger, "").log(request, web.Response(status=200), 0.0123)
    assert logged_route in caplog.records[-1].getMessage()
    assert "TOKEN" not in caplog.text

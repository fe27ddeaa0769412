"""Access log lines: route names, JSON shape, request ids, and nothing secret."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.request_log import RequestFacts, request_id_from
from proxy.web import access_log
from proxy.web.access_log import AccessLogger, JsonAccessLogger, JsonFormatter
from proxy.web.keys import REQUEST_FACTS
from tests.conftest import serve_logging


async def _request(path: str) -> web.Request:
    """A request matched by the real router (so match_info is what aiohttp gives the logger)."""
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/healthz", handler, name="healthz")
    app.router.add_get("/s/{ctx}/{ref}/{name}", handler, name="stream")
    request = make_mocked_request(
        "GET", path, app=app, headers={"X-Request-Id": "abc", "Cookie": "c=SECRETCOOKIE"}
    )
    request._match_info = await app.router.resolve(request)
    return request


@pytest.mark.parametrize(
    ("path", "logged_route", "logged_path"),
    [
        ("/healthz", "healthz", "/healthz"),
        ("/s/CTXTOKEN/REFTOKEN/seg.ts?api_key=KEYTOKEN", "stream", "/s/…/seg.ts"),
        ("/no/such/TOKEN", "unmatched", "-"),
    ],
)
async def test_access_lines(
    caplog: pytest.LogCaptureFixture, path: str, logged_route: str, logged_path: str
) -> None:
    request = await _request(path)
    request[REQUEST_FACTS] = RequestFacts("abc", upstream_host="cdn.example", cache="hit")
    logger = logging.getLogger("test.access")
    caplog.set_level(logging.INFO, "test.access")
    JsonAccessLogger(logger, "").log(request, web.Response(status=200), 0.0123)
    doc = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert doc["route"] == logged_route
    assert doc["path"] == logged_path
    assert doc["status"] == 200
    assert doc["request_id"] == "abc"
    assert doc["upstream_host"] == "cdn.example"
    assert doc["cache"] == "hit"
    assert doc["duration_ms"] == 12.3
    assert doc["time"].endswith("Z")
    assert doc["level"] == "info"
    AccessLogger(logger, "").log(request, web.Response(status=200), 0.0123)
    line = caplog.records[-1].getMessage()
    assert logged_route in line
    assert "up=cdn.example cache=hit id=abc" in line
    for secret in ("TOKEN", "SECRETCOOKIE"):
        assert secret not in caplog.text


async def test_line_without_facts_gets_a_fresh_request_id(caplog: pytest.LogCaptureFixture) -> None:
    request = await _request("/healthz")
    caplog.set_level(logging.INFO, "test.access")
    JsonAccessLogger(logging.getLogger("test.access"), "").log(request, web.Response(), 0.001)
    doc = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert len(doc["request_id"]) == 16
    assert doc["upstream_host"] == ""


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        ("abc-123", True),
        ("0f8e2c1a-5b7d-4c3e-9a1b-2c3d4e5f6a7b", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ('x","status":200', False),
        ("id with spaces", False),
        ("line\nbreak", False),
        (None, False),
    ],
)
def test_request_id_is_kept_only_when_plain(header: str | None, kept: bool) -> None:
    got = request_id_from(header)
    assert (got == header) is kept
    assert 1 <= len(got) <= 64


def test_new_request_ids_are_random_hex_and_never_repeat() -> None:
    # More than one batch of the random source's bytes (request_log cuts them 256 at a time).
    ids = [request_id_from(None) for _ in range(2_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    # Random, not counted: the digits are spread evenly (each of 16 seen ~2,000 times).
    digits = "".join(ids)
    assert min(digits.count(d) for d in "0123456789abcdef") > 1_500


def test_json_formatter_plain_messages_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("hlsrelay", logging.ERROR, "f", 1, "failed %s", ("x",), None)
        record.exc_info = sys.exc_info()
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "failed x"
    assert doc["level"] == "error"
    assert "ValueError: boom" in doc["exception"]


class _StuckStream(io.StringIO):
    """stderr that blocks every write until released (a full pipe, a disk under writeback)."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    def write(self, text: str) -> int:
        assert self.released.wait(10)
        return super().write(text)


def test_log_lines_never_wait_for_a_stuck_output() -> None:
    stuck = _StuckStream()
    writer = access_log.BatchedLogWriter(stuck, max_lines=5, interval=0.01)
    writer.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("hlsrelay.test.stuck")
    log.addHandler(writer)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("line 0")
        time.sleep(0.05)  # the writer takes line 0 and is stuck writing it
        # The event loop's thread logs while nothing can be written: no call waits.
        for number in range(1, 9):
            log.info("line %d", number)
        assert stuck.getvalue() == ""
    finally:
        stuck.released.set()
        writer.close()
        log.removeHandler(writer)
    # Line 0, then the 5 lines that found room, then how many were dropped.
    assert stuck.getvalue().splitlines() == [
        *(f"line {n}" for n in range(6)),
        "hlsrelay: 3 log lines dropped: the log output was too slow",
    ]


def test_configured_logging_writes_json_lines_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    writer = access_log.configure_logging("json")
    try:
        for number in range(3):
            logging.getLogger("hlsrelay.test").info("line %d", number)
    finally:
        writer.close()
        root.handlers[:], root.level = saved
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == [
        "line 0",
        "line 1",
        "line 2",
    ]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_direct_access_lines_are_what_logging_would_write(
    log_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {
        "request_id": "abc",
        "method": "GET",
        "route": "stream",
        "path": "/s/…/index.m3u8",
        "status": 200,
        "bytes": 913,
        "duration_ms": 0.04,
        "upstream_host": "cdn.example",
        "cache": "hit",
    }
    with serve_logging(log_format, monkeypatch) as (writer, out):
        formatter = writer.formatter
        assert isinstance(formatter, access_log.TextFormatter | access_log.JsonFormatter)
        created = 1_790_000_000.123456
        record = logging.LogRecord(
            "aiohttp.access", logging.INFO, __file__, 1, access_log._message(fields), None, None
        )
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        setattr(record, access_log.FIELDS_ATTR, fields)
        assert formatter.access_line(created, fields) == formatter.format(record)
        # And log_access takes the direct way while serve's writer is configured.
        access_log.log_access(logging.getLogger("aiohttp.access"), fields)
    (line,) = out.getvalue().splitlines()
    if log_format == "json":
        doc = json.loads(line)
        assert doc["logger"] == "aiohttp.access" and doc["level"] == "info"
        assert {k: doc[k] for k in fields} == fields
    else:
        assert line.endswith(
            " INFO aiohttp.access: GET /s/…/index.m3u8 stream 200 913B 0.0ms up=cdn.example "
            "cache=hit id=abc"
        )
    assert access_log._direct is None  # closed: ordinary logging again


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize(
    ("path", "upstream_host", "cache"),
    [
        ("/s/…/index.m3u8", "cdn.example", "hit"),
        ('/s/…/100%25 "odd" \\ name%s%d.m3u8', "h%st", ""),  # % and JSON's escapes in fixed fields
        ("/s/…/плейлист.m3u8", "", "miss"),  # not ASCII; no upstream: "-" in text, "" in JSON
    ],
)
@pytest.mark.parametrize("duration_ms", [0.0, 0.04, 1.5, 12345.67])
def test_templated_lines_are_the_access_lines(
    log_format: str,
    path: str,
    upstream_host: str,
    cache: str,
    duration_ms: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fields = {
        "request_id": request_id_from(None),
        "method": "GET",
        "route": "stream",
        "path": path,
        "status": 200,
        "bytes": 913,
        "duration_ms": duration_ms,
        "upstream_host": upstream_host,
        "cache": cache,
    }
    fixed = {k: v for k, v in fields.items() if k not in ("request_id", "bytes", "duration_ms")}
    templates = access_log.line_templates(fixed)
    logger = logging.getLogger("aiohttp.access")
    with serve_logging(log_format, monkeypatch) as (writer, out):
        formatter = writer.formatter
        assert isinstance(formatter, access_log.TextFormatter | access_log.JsonFormatter)
        created = 1_790_000_000.987654
        template = templates[1] if log_format == "json" else templates[0]
        line = formatter.templated_line(created, template, fields["request_id"], 913, duration_ms)
        assert line == formatter.access_line(created, fields)
        # And log_templated writes it while serve's writer is configured.
        assert access_log.log_templated(logger, templates, fields["request_id"], 913, duration_ms)
    (written,) = out.getvalue().splitlines()
    if log_format == "json":
        assert json.loads(written) | {"time": ""} == json.loads(line) | {"time": ""}
    else:
        assert written.partition(" INFO ")[2] == line.partition(" INFO ")[2]
    # Without serve's writer the caller is told to log the fields itself.
    assert not access_log.log_templated(logger, templates, "abc", 913, duration_ms)

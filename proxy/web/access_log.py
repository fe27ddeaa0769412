"""One log line per request, text or JSON; never a query string, token, cookie or credential.

Query strings can hold an API key (``/proxy.m3u8?api_key=``) or an upstream URL, and stream
tokens are bearer credentials for a stream: the line names the route and the cosmetic file name
instead of the path. The upstream is named by its host name alone (no path, query, port or
userinfo); the request id is the viewer's ``X-Request-Id`` only when it is a plain token (see
:mod:`proxy.request_log`). No header value of the viewer's is logged otherwise.

JSON lines (``server.log_format = "json"``) carry: ``time``, ``level``, ``logger``,
``request_id``, ``method``, ``route``, ``path``, ``status``, ``bytes`` (sent on the wire,
headers included, like nginx's ``$bytes_sent``), ``duration_ms``, ``upstream_host`` and
``cache`` (empty when the request reached no upstream or no cache).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time as clock
from collections import deque
from typing import Any, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy import request_log
from proxy.web.keys import REQUEST_FACTS

# The LogRecord attribute the access fields travel in, from the access logger to the formatter.
FIELDS_ATTR = "hlsrelay_access"
ACCESS_LOGGER = "aiohttp.access"
_ACCESS_MESSAGE = "%s %s %s %d %dB %.1fms up=%s cache=%s id=%s"

# The writer ``serve`` configured (see configure_logging), while it is the one way out for the
# access logger's lines: they go to it directly, formatted as logging would have.
_direct: BatchedLogWriter | None = None


def _describe(request: web.BaseRequest) -> tuple[str, str]:
    if not isinstance(request, web.Request):
        return "unmatched", "-"
    info = request.match_info  # a dict of path parameters: empty (falsy) for /healthz
    route = info.route.name if info is not None and info.route.name else "unmatched"
    if route == "stream":
        return route, f"/s/…/{info.get('name', '')}"
    return route, request.path if route != "unmatched" else "-"


def access_fields(
    request: web.BaseRequest, response: web.StreamResponse, time: float
) -> dict[str, Any]:
    """The facts of one finished request, every one safe to log."""
    route, path = _describe(request)
    facts = request.get(REQUEST_FACTS)
    if facts is None:  # refused before the middlewares ran (a malformed request line)
        facts = request_log.RequestFacts(request_log.request_id_from(None))
    return {
        "request_id": facts.request_id,
        "method": request.method,
        "route": route,
        "path": path,
        "status": response.status,
        "bytes": response.body_length,
        "duration_ms": round(time * 1000, 2),
        "upstream_host": facts.upstream_host,
        "cache": facts.cache,
    }


def _message(f: dict[str, Any]) -> str:
    return _ACCESS_MESSAGE % (
        f["method"],
        f["path"],
        f["route"],
        f["status"],
        f["bytes"],
        f["duration_ms"],
        f["upstream_host"] or "-",
        f["cache"] or "-",
        f["request_id"],
    )


def log_access(logger: logging.Logger, fields: dict[str, Any]) -> None:
    """Write one request's line (fields from :func:`access_fields` or the same keys).

    Under ``serve`` the line skips logging's record machinery (caller lookup, a LogRecord, a
    lock, a strftime: ~10 µs, as much as answering a cached playlist) and goes to the batched
    writer as the formatter would have written it; elsewhere it is an ordinary ``info``.
    """
    direct = _direct
    if direct is not None and logger.name == ACCESS_LOGGER:
        if logger.isEnabledFor(logging.INFO):
            direct.write_access(fields)
        return
    logger.info(_message(fields), extra={FIELDS_ATTR: fields})


def line_templates(fixed: dict[str, Any]) -> tuple[str, str]:
    """The (text, JSON) access lines of requests that differ only in request id, bytes sent and
    duration, with those left open: :func:`log_templated` fills them in.

    For the fast path (web/fast_hits.py), which answers the same cached playlist thousands of
    times a second: building the fields and formatting a whole line per request was ~2.6 µs of
    its ~10 µs of Python. ``fixed``: the other fields of :func:`access_fields`. Every ``%`` in
    them is doubled, so a file name with one cannot upset the template.
    """

    def escaped(value: Any) -> str:
        return str(value).replace("%", "%%")

    # _ACCESS_MESSAGE with the fixed fields in: method, path, route, status; up=, cache=.
    text = (
        f"{escaped(fixed['method'])} {escaped(fixed['path'])} {escaped(fixed['route'])} "
        f"{int(fixed['status'])} %dB %.1fms up={escaped(fixed['upstream_host'] or '-')} "
        f"cache={escaped(fixed['cache'] or '-')} id=%s"
    )

    def members(*keys: str) -> str:
        return _json_object({key: fixed[key] for key in keys})[1:-1].replace("%", "%%")

    # JsonFormatter.access_line's object: time, level, logger, then access_fields' order.
    json_line = (
        '{"time":"%s","level":"info","logger":'
        + json.dumps(ACCESS_LOGGER)
        + ',"request_id":"%s",'
        + members("method", "route", "path", "status")
        + ',"bytes":%d,"duration_ms":%s,'
        + members("upstream_host", "cache")
        + "}"
    )
    return text, json_line


def log_templated(
    logger: logging.Logger,
    templates: tuple[str, str],
    request_id: str,
    sent: int,
    duration_ms: float,
) -> bool:
    """Write a line from :func:`line_templates`'s ``templates`` (``request_id``: one of
    :func:`proxy.request_log.request_id_from`'s, which JSON needs no escape for). False when
    ``serve``'s writer does not take the logger's lines directly: log the fields with
    :func:`log_access` then."""
    direct = _direct
    if direct is None or logger.name != ACCESS_LOGGER:
        return False
    if logger.isEnabledFor(logging.INFO):
        return direct.write_templated(templates, request_id, sent, duration_ms)
    return True


def _json_object(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


class AccessLogger(AbstractAccessLogger):
    """Human lines: ``GET /s/…/seg.ts stream 200 1234B 5.1ms up=cdn.example cache=hit id=…``."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        log_access(self.logger, access_fields(request, response, time))


class JsonAccessLogger(AccessLogger):
    """The same record; :class:`JsonFormatter` writes its fields as one JSON object."""


def access_logger_for(log_format: str) -> type[AbstractAccessLogger]:
    return JsonAccessLogger if log_format == "json" else AccessLogger


class BatchedLogWriter(logging.Handler):
    """Log lines written to stderr in batches by a thread of its own.

    A write to stderr can block: a full pipe (a container runtime reading slowly), a disk under
    writeback. Made on the event loop's thread, every such wait stalled every request
    (bench_peers measured 250-1,300 ms stalls in the access log's write). Here the loop's thread
    only formats the line and appends it to a deque; the writer thread wakes every
    ``interval`` seconds and writes what gathered in one call. That is also cheaper than one
    write per line (a thread woken per line cost 35 % more CPU per cached playlist answer).
    While the output is stuck, at most ``max_lines`` wait; later ones are dropped, and counted
    in a line written when the output moves again.
    """

    def __init__(
        self, stream: TextIO | None = None, *, max_lines: int = 10_000, interval: float = 0.05
    ) -> None:
        super().__init__()
        self._stream = stream
        self._max_lines = max_lines
        self._interval = interval
        self._lines: deque[str] = deque()
        self._dropped = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hlsrelay-log-writer", daemon=True)
        self._thread.start()

    def write_access(self, fields: dict[str, Any]) -> None:
        """An access line, as :meth:`emit` would write an ``aiohttp.access`` info record."""
        formatter = self.formatter
        if isinstance(formatter, JsonFormatter | TextFormatter):
            self._append(formatter.access_line(clock.time(), fields))
        else:  # a formatter set from outside: logging's own way
            logging.getLogger(ACCESS_LOGGER).info(_message(fields), extra={FIELDS_ATTR: fields})

    def write_templated(
        self, templates: tuple[str, str], request_id: str, sent: int, duration_ms: float
    ) -> bool:
        """A line from :func:`line_templates`; False if the formatter is not one of ours."""
        formatter = self.formatter
        if isinstance(formatter, JsonFormatter):
            template = templates[1]
        elif isinstance(formatter, TextFormatter):
            template = templates[0]
        else:
            return False
        self._append(
            formatter.templated_line(clock.time(), template, request_id, sent, duration_ms)
        )
        return True

    def _append(self, line: str) -> None:
        if len(self._lines) >= self._max_lines:
            self._dropped += 1
            return
        self._lines.append(
            line
        )  # deque appends and pops are atomic: no lock shared with the writer

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # what logging.Handler does with a record it cannot format
            self.handleError(record)
            return
        self._append(line)

    def _run(self) -> None:
        while not self._closing.wait(self._interval):
            self._write_pending()
        self._write_pending()

    def _write_pending(self) -> None:
        lines = []
        while self._lines:
            lines.append(self._lines.popleft())
        dropped, self._dropped = self._dropped, 0
        if dropped:
            lines.append(f"hlsrelay: {dropped} log lines dropped: the log output was too slow")
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # stderr closed or gone: nothing left to tell
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending and stop the thread (within ``timeout``: the output may be stuck
        for good, and the thread is a daemon)."""
        global _direct
        if _direct is self:
            _direct = None
        self._closing.set()
        self._thread.join(timeout)
        super().close()


def configure_logging(log_format: str, level: int = logging.INFO) -> BatchedLogWriter:
    """Every log line through one :class:`BatchedLogWriter`; close it at exit.

    Access lines then go to it directly (see :func:`log_access`) while the access logger has
    no handler or filter of its own; and records skip what no line here shows (the caller's
    file and line, thread and process names), as logging's documentation advises for speed.
    """
    global _direct
    writer = BatchedLogWriter()
    writer.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [writer]
    root.setLevel(level)
    access = logging.getLogger(ACCESS_LOGGER)
    direct = access.propagate and not access.handlers and not access.filters
    _direct = writer if direct else None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup per record
    return writer


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, the time made once a second."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._time(record.created, record.msecs)

    def _time(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = clock.strftime(self.default_time_format, self.converter(created))
        return f"{self._stamp},{int(msecs):03d}"  # logging's default_msec_format

    def access_line(self, created: float, fields: dict[str, Any]) -> str:
        msecs = int((created - int(created)) * 1000) + 0.0  # what a LogRecord computes
        return f"{self._time(created, msecs)} INFO {ACCESS_LOGGER}: {_message(fields)}"

    def templated_line(
        self, created: float, template: str, request_id: str, sent: int, duration_ms: float
    ) -> str:
        """:meth:`access_line` from a template of :func:`line_templates`."""
        msecs = int((created - int(created)) * 1000) + 0.0
        message = template % (sent, duration_ms, request_id)
        return f"{self._time(created, msecs)} INFO {ACCESS_LOGGER}: {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, then the access fields or the message."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, dict):
            doc.update(fields)
        else:
            doc["message"] = record.getMessage()
            if record.exc_info:
                doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time(record.created, record.msecs)

    def _time(self, created: float, msecs: float) -> str:
        # RFC 3339 in UTC with milliseconds: what log shippers parse without configuration.
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = clock.strftime("%Y-%m-%dT%H:%M:%S", self.converter(created))
        return f"{self._stamp}.{int(msecs):03d}Z"

    def access_line(self, created: float, fields: dict[str, Any]) -> str:
        msecs = int((created - int(created)) * 1000) + 0.0  # what a LogRecord computes
        doc: dict[str, Any] = {
            "time": self._time(created, msecs),
            "level": "info",
            "logger": ACCESS_LOGGER,
        }
        doc.update(fields)
        return _json_object(doc)

    def templated_line(
        self, created: float, template: str, request_id: str, sent: int, duration_ms: float
    ) -> str:
        """:meth:`access_line` from a template of :func:`line_templates` (a float's JSON is its
        ``repr``, as ``json.dumps`` writes it)."""
        msecs = int((created - int(created)) * 1000) + 0.0
        return template % (self._time(created, msecs), request_id, sent, repr(duration_ms))

    converter = staticmethod(clock.gmtime)
    _second = -1
    _stamp = ""

"""Cached playlist hits answered in front of aiohttp: a lean HTTP/1.1 path for the commonest one.

A live playlist from the cache is what a crowd of players asks for most (every viewer, every
target duration). Through aiohttp's request machinery (request object, a task, routing, three
middlewares, response preparation) each one cost ~130 µs of CPU (bench_peers case 4: 7,900
requests/s on one core against nginx ``proxy_cache`` hits' 53,000); aiohttp's own floor for an
empty handler is ~33 µs. Here the answer is parsed, looked up and written straight to the socket.

How it fits in: every connection's protocol is a :class:`FastHitsProtocol` wrapping aiohttp's own
``RequestHandler``. What a viewer sends is parsed here first, strictly. A complete GET or HEAD
whose request-target the memo holds, fresh, and whose headers ask nothing this path does not
answer exactly as the handler would (conditionals and ranges go to aiohttp), is answered here.
Every other request is handed to aiohttp byte for byte; while aiohttp answers anything on a
connection, later requests follow it there, so answers keep their order. A request with a body,
an upgrade, or anything the parser here refuses hands the connection to aiohttp for good.

The memo is filled by the playlist handler (``web/streams.py``) when it answers from the store
or fills it, keyed by the request-target as sent, and holds an entry until the stored copy stops
being fresh or its stream token expires, whichever comes first. So it answers what the handler
would have: the same bytes, the same headers (``Date``, ``Age`` and ``X-Request-Id`` made per
request as there), the same metrics and the same access-log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Final, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from proxy.cache.store import CachedObject
from proxy.metrics import Metrics
from proxy.request_log import request_id_from
from proxy.turns import TurnBudget
from proxy.web.access_log import ACCESS_LOGGER, line_templates, log_access, log_templated
from proxy.web.cors import EXPOSE_HEADERS

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

# The route label and log name of a proxied stream (web/routes.py names it so).
ROUTE = "stream"
# Longest request head parsed here; longer ones go to aiohttp (which refuses past 8 KiB lines).
MAX_HEAD_BYTES = 16 * 1024
# Bodies up to this size go out in one write with their headers; bigger ones as two buffers.
JOIN_BELOW_BYTES = 64 * 1024
# Complete requests a connection may send while it waits for its turn; past it, its socket is
# not read until then.
MAX_DEFERRED_BYTES = 64 * 1024
# What aiohttp's run_app keeps an idle keep-alive connection open for: the same here.
KEEPALIVE_TIMEOUT_S = 75.0

GZIP_ETAG_SUFFIX = '-gz"'
# Request headers that change the answer in ways only the full handler deals with: conditionals
# (304s), ranges (an uncached upstream request), bodies and upgrades (not a simple GET).
_TO_HANDLER = frozenset(
    {
        b"range",
        b"if-range",
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"expect",
        b"upgrade",
    }
)
# Headers whose value is read here: more than one of them and the handler decides.
_READ_HERE = frozenset({b"accept-encoding", b"origin", b"x-request-id", b"connection"})
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_GET, _HEAD = b"GET", b"HEAD"

log = logging.getLogger(ACCESS_LOGGER)


# One memo entry: (until, stored_at, head, gzip_head, body, gzip_body, name, upstream_host, size,
# text_line, json_line). ``until``: wall-clock time it stops being fresh (store freshness or
# token expiry); ``head``: status line and fixed headers (each ending in CRLF, Content-Length
# included); the lines: its GETs' access-line templates (access_log.line_templates). A flat
# tuple of strings, bytes and numbers, so the garbage collector stops tracking it at its first
# collection (not a tuple subclass or a class instance, which it never untracks, nor a tuple of
# tuples, which takes one collection per level): 20,000 tracked entries made every full
# collection walk them, 20-180 ms of stall under a rewrite load.
_Answer = tuple[float, float, bytes, bytes, bytes, bytes, str, str, int, str, str]
_UNTIL: Final = 0
_SIZE: Final = 8


def _fixed_head(entry: CachedObject, body: bytes, gzipped: bool) -> bytes:
    lines = ["HTTP/1.1 200 OK"]
    for name, value in entry.headers:
        if gzipped and name.lower() == "etag":
            value = gzip_etag(value)
        lines.append(f"{name}: {value}")
    if gzipped:
        lines.append("Content-Encoding: gzip")
    lines.append(f"Content-Length: {len(body)}")
    lines.append(f"Server: {SERVER_SOFTWARE}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


def _access_fields(method: bytes, name: str, upstream_host: str) -> dict[str, Any]:
    """An answer's access-log fields (access_log.access_fields) but the open ones, in order."""
    return {
        "request_id": "",
        "method": method.decode(),
        "route": ROUTE,
        "path": f"/s/…/{name}",
        "status": 200,
        "bytes": 0,
        "duration_ms": 0.0,
        "upstream_host": upstream_host,
        "cache": "hit",
    }


def gzip_etag(etag: str) -> str:
    """The ETag of a playlist's gzip'd body: a strong validator names one representation."""
    return etag[:-1] + GZIP_ETAG_SUFFIX if etag.endswith('"') else etag


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value takes gzip (here and in web/streams.py)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            quality = params.strip().lower().removeprefix("q=").strip()
            return quality not in ("0", "0.0", "0.00", "0.000")
    return False


class FastHits:
    """The memo of cached playlist answers and what answering one costs (metrics, log line)."""

    def __init__(
        self,
        metrics: Metrics,
        cors_origins: tuple[str, ...],
        max_bytes: int,
        requests_per_turn: int = 0,
    ) -> None:
        self._metrics = metrics
        self.turns = TurnBudget(requests_per_turn)
        """Requests handed to aiohttp per event-loop turn, all connections together."""
        self._deferred: list[FastHitsProtocol] = []
        self._max_bytes = max_bytes
        self._bytes = 0
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._any_origin = "*" in cors_origins
        self._origins = frozenset(o.encode("latin-1") for o in cors_origins if o != "*")
        self._any_origin_headers = (
            f"Access-Control-Allow-Origin: *\r\nAccess-Control-Expose-Headers: {EXPOSE_HEADERS}\r\n"
        ).encode("latin-1")
        self._date_second = -1
        self._date = b""
        self.answered = 0
        """Requests answered here since start (tests and benchmarks read it)."""
        self.deferrals = 0
        """Times a connection's requests waited for the next turn (tests read it)."""
        self.connections: dict[RequestHandler, FastHitsProtocol] = {}
        """aiohttp's handler of each open connection -> its protocol here."""

    @property
    def enabled(self) -> bool:
        return self._max_bytes > 0

    def __len__(self) -> int:
        return len(self._answers)

    # -- the memo -------------------------------------------------------------------------------

    def remember(
        self,
        target: str,
        entry: CachedObject,
        *,
        token_expires: int | None,
        upstream_host: str,
    ) -> None:
        """Answer later requests for ``target`` (the request-target as sent) with ``entry``."""
        if not self.enabled or not target.isascii():
            return
        until = entry.stored_at + entry.fresh_for
        if token_expires is not None:
            until = min(until, float(token_expires))
        if until <= time.time():
            return
        head = _fixed_head(entry, entry.body, gzipped=False)
        gzip_head = _fixed_head(entry, entry.gzip_body, gzipped=True) if entry.gzip_body else b""
        size = len(entry.body) + len(entry.gzip_body) + len(head) + len(gzip_head) + 256
        if size > self._max_bytes // 4:
            return  # one huge VOD playlist must not push every live one out
        name = target.partition("?")[0].rpartition("/")[2]
        answer: _Answer = (
            until,
            entry.stored_at,
            head,
            gzip_head,
            entry.body,
            entry.gzip_body,
            name,
            upstream_host,
            size,
            *line_templates(_access_fields(_GET, name, upstream_host)),
        )
        old = self._answers.pop(target, None)
        if old is not None:
            self._bytes -= old[_SIZE]
        self._answers[target] = answer
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, dropped = self._answers.popitem(last=False)
            self._bytes -= dropped[_SIZE]

    def _fresh(self, target: str, now: float) -> _Answer | None:
        answer = self._answers.get(target)
        if answer is None:
            return None
        if now >= answer[_UNTIL]:
            del self._answers[target]
            self._bytes -= answer[_SIZE]
            return None
        return answer

    # -- answering ------------------------------------------------------------------------------

    def answer(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], started: float
    ) -> tuple[bytes, bytes] | None:
        """The response (head, body) for a parsed request, or None: the handler answers it."""
        now = time.time()
        answer = self._fresh(target.decode("latin-1"), now)
        if answer is None:
            return None
        stored_at, head, gzip_head, body, gzip_body, name, upstream_host = answer[1:8]
        lines = answer[9:11]  # the access-line templates
        extra = []
        origin = headers.get(b"origin")
        if self._any_origin:
            extra.append(self._any_origin_headers)
        elif origin is not None and origin in self._origins:
            extra.append(
                b"Access-Control-Allow-Origin: %s\r\nAccess-Control-Expose-Headers: %s\r\n"
                b"Vary: Origin\r\n" % (origin, EXPOSE_HEADERS.encode("latin-1"))
            )
        accept = headers.get(b"accept-encoding")
        if gzip_body and accept is not None and accepts_gzip(accept.decode("latin-1")):
            head, body = gzip_head, gzip_body
        header = headers.get(b"x-request-id")
        request_id = request_id_from(None if header is None else header.decode("latin-1"))
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date = formatdate(now, usegmt=True).encode("latin-1")
        out = b"".join(
            (
                head,
                b"Age: %d\r\n" % max(0, int(now - stored_at)),
                *extra,
                b"X-Request-Id: %s\r\nDate: %s\r\n\r\n" % (request_id.encode(), self._date),
            )
        )
        if method == _HEAD:
            body = b""
        self.answered += 1
        sent = len(out) + len(body)
        self._count(method, name, upstream_host, request_id, sent, len(body), started, lines)
        return out, body

    def _count(
        self,
        method: bytes,
        name: str,
        upstream_host: str,
        request_id: str,
        sent: int,
        body_bytes: int,
        started: float,
        lines: tuple[str, str],
    ) -> None:
        metrics = self._metrics
        metrics.cache_result("hit").inc()
        if body_bytes:
            metrics.relayed("playlist").inc(body_bytes)
        seconds = time.perf_counter() - started
        metrics.http.done(ROUTE, 200, seconds)
        duration_ms = round(seconds * 1000, 2)
        # The line web/access_log.py's AccessLogger writes for it: from the entry's templates
        # (its GETs') when serve's writer takes them, else from the fields.
        if method == _GET and log_templated(log, lines, request_id, sent, duration_ms):
            return
        fields = _access_fields(method, name, upstream_host)
        fields.update(request_id=request_id, bytes=sent, duration_ms=duration_ms)
        log_access(log, fields)

    # -- wiring ---------------------------------------------------------------------------------

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """What ``loop.create_server`` takes: aiohttp's handler of each connection, wrapped."""

        def factory() -> asyncio.Protocol:
            return FastHitsProtocol(self, server())

        return factory

    def defer(self, connection: FastHitsProtocol) -> None:
        """Go on with ``connection``'s requests in the next turn (this one's are all taken)."""
        self.deferrals += 1
        if not self._deferred:
            # Queued after the budget's own turn-end callback (a request was taken before any
            # was deferred), so the next turn starts with a fresh budget.
            asyncio.get_running_loop().call_soon(self._resume_deferred)
        self._deferred.append(connection)

    def _resume_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for index, connection in enumerate(deferred):
            if self.turns.exhausted():
                # This turn's requests are all taken: the others keep their places for the next.
                # (Resumed only to be deferred again, a crowd of 500 cost ~5,500 resumes over its
                # ~30 turns, a millisecond of every turn while the first one's upstream request
                # waited for its connection: bench_peers case 6.)
                if not self._deferred:
                    asyncio.get_running_loop().call_soon(self._resume_deferred)
                self._deferred.extend(deferred[index:])
                return
            connection.resume()

    def handler_started(self, request: web.BaseRequest) -> None:
        """Called as aiohttp starts a request: tell the connection when it is done.

        The task running the handler ends after the response is written (aiohttp writes a
        ``web.Response``'s body after the handler returns, in the same task), so its end is
        when the connection is aiohttp's no longer.
        """
        connection = self.connections.get(request.protocol)
        task = asyncio.current_task()
        if connection is not None and task is not None:
            connection.handler_started()
            task.add_done_callback(connection.handler_done)


class FastHitsProtocol(asyncio.Protocol):
    """One connection: cached playlist hits answered here, everything else by aiohttp."""

    __slots__ = (
        "_active",
        "_buffer",
        "_deferred",
        "_for_good",
        "_hits",
        "_idle_since",
        "_idle_timer",
        "_inner",
        "_loop",
        "_paused",
        "_pending",
        "_reading_paused",
        "_transport",
    )

    def __init__(self, hits: FastHits, inner: RequestHandler) -> None:
        self._hits = hits
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._pending = 0
        """Requests handed to aiohttp and not answered yet: until 0, later ones go there too."""
        self._active = 0
        """Requests aiohttp's handler is running (started, not done): the connection is busy."""
        self._for_good = False
        self._paused = False
        self._deferred = False
        """Complete requests wait in the buffer for a turn with room (FastHits.turns)."""
        self._reading_paused = False
        self._loop = asyncio.get_running_loop()
        self._idle_since = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; the interface is the same.
        self._transport = cast(asyncio.Transport, transport)
        self._inner.connection_made(transport)
        self._hits.connections[self._inner] = self
        self._idle_timer = self._loop.call_at(
            self._idle_since + KEEPALIVE_TIMEOUT_S, self._close_if_idle
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._hits.connections.pop(self._inner, None)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._transport = None
        self._buffer = b""
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._paused = False
        self._inner.resume_writing()

    def eof_received(self) -> None:
        self._inner.eof_received()  # None: the transport closes once the viewer has

    def data_received(self, data: bytes) -> None:
        if self._for_good:
            self._inner.data_received(data)
            return
        buffer = self._buffer + data if self._buffer else data
        if self._deferred:
            self._buffer = buffer
            if len(buffer) > MAX_DEFERRED_BYTES and not self._reading_paused:
                self._reading_paused = True  # no more from this viewer until its turn
                if self._transport is not None:
                    self._transport.pause_reading()
            return
        self._process(buffer)

    def resume(self) -> None:
        """A new turn: go on with the requests that waited for it."""
        self._deferred = False
        transport = self._transport
        if transport is None:
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        buffer, self._buffer = self._buffer, b""
        if buffer:
            self._process(buffer)

    def _process(self, buffer: bytes) -> None:
        turns = self._hits.turns
        start = 0
        while True:
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                rest = buffer[start:]
                if len(rest) > MAX_HEAD_BYTES:
                    self._hand_over(rest)
                    return
                self._buffer = rest
                return
            if turns.exhausted():
                # A crowd arrived at once: its requests go to aiohttp over several turns, so
                # that no turn makes hundreds of request objects and handlers in a row (and
                # the first one's upstream request is not sent after all the others' set-up).
                self._buffer = buffer[start:]
                self._deferred = True
                self._hits.defer(self)
                return
            head = buffer[start : end + 4]
            start = end + 4
            if not self._answer(head):
                if self._for_good:
                    self._hand_over(head + buffer[start:])
                    return
                turns.take()
                self._pending += 1
                self._inner.data_received(head)

    # -- here or there --------------------------------------------------------------------------

    def _answer(self, head: bytes) -> bool:
        """Answer one complete request head here; False: aiohttp does (and ``_for_good``
        when what follows it cannot be parsed here)."""
        started = time.perf_counter()
        lines = head[:-4].split(b"\r\n")
        request_line = lines[0].split(b" ")
        bare = head[:-4].replace(b"\r\n", b"")
        if len(request_line) != 3 or b"\n" in bare or b"\r" in bare:
            self._for_good = True  # a lone CR or LF, extra spaces: aiohttp's parser decides
            return False
        method, target, version = request_line
        headers: dict[bytes, bytes] = {}
        to_handler = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or not _TOKEN_CHARS.issuperset(name):
                self._for_good = True  # obs-fold, a space before the colon, garbage: aiohttp's
                return False
            name = name.lower()
            if name in (b"content-length", b"transfer-encoding"):
                if name == b"transfer-encoding" or value.strip() != b"0":
                    self._for_good = True  # a body follows: the connection is aiohttp's now
                    return False
                continue
            if name in _TO_HANDLER or (name in _READ_HERE and name in headers):
                to_handler = True
            headers[name] = value.strip()
        if (
            to_handler
            or self._pending
            or self._paused
            or version != b"HTTP/1.1"
            or method not in (_GET, _HEAD)
            or not target.startswith(b"/")
        ):
            return False
        connection = headers.get(b"connection")
        if connection is not None and connection.lower() != b"keep-alive":
            return False  # close (or anything else): aiohttp's handling of the connection
        transport = self._transport
        if transport is None:
            return True  # gone: nothing to answer
        answer = self._hits.answer(method, target, headers, started)
        if answer is None:
            return False
        out, body = answer
        if not body:
            transport.write(out)
        elif len(body) < JOIN_BELOW_BYTES:
            transport.write(out + body)
        else:
            transport.writelines((out, body))
        self._idle_since = self._loop.time()
        return True

    def _hand_over(self, data: bytes) -> None:
        self._for_good = True
        self._buffer = b""
        if data:
            self._inner.data_received(data)

    def handler_started(self) -> None:
        self._active += 1

    def handler_done(self, _: asyncio.Future[Any]) -> None:
        self._active -= 1
        self._pending = max(0, self._pending - 1)
        self._idle_since = self._loop.time()

    def _close_if_idle(self) -> None:
        # aiohttp's own keep-alive timer cannot see the answers given here, so the wrapped
        # handler runs with a long one and this closes connections idle for as long as its
        # default would: no request of aiohttp's running, none answered here, for the timeout.
        # (A head arriving slowly is not activity, as in aiohttp: a slow sender is closed too.)
        self._idle_timer = None
        transport = self._transport
        if transport is None:
            return
        now = self._loop.time()
        due = self._idle_since + KEEPALIVE_TIMEOUT_S
        if self._active or now < due:
            self._idle_timer = self._loop.call_at(max(due, now + 1.0), self._close_if_idle)
            return
        transport.close()

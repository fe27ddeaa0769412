"""A crowd's answers: headers made once per shared body, sent ahead with each viewer's first bytes.

When the first bytes of a body that many viewers wait for arrive (a live segment a whole
audience asks for at once), the pump writes every waiting viewer's headers and first bytes in
one loop (:mod:`proxy.cache.inflight`). Prepared by aiohttp there, each answer cost ~20 µs before
its write (a header dict per viewer, the defaults aiohttp adds, the two ``on_response_prepare``
hooks, serialization): with 500 viewers, 10-19 ms of the 20-30 ms between the upstream's first
byte and the last viewer's (bench_peers case 6), the writes themselves ~12 ms.

Here the header lines every viewer of a body shares are made once (the upstream's, ``Date``,
``Server``, the CORS headers when any origin is allowed) and each viewer's own are added to them
(``Connection``, an echoed ``Origin``, ``X-Request-Id``): a few string joins before the write.
aiohttp's response is prepared afterwards, by the viewer's own task, with those same headers
(:class:`SentAhead`); it sends nothing itself and checks that what aiohttp would have sent is
what went out. Answers this module cannot make exactly as aiohttp would (a body without a
``Content-Length``, response hooks it does not know) are left to aiohttp, as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11

from proxy.cache.inflight import BodyHead
from proxy.web.cors import EXPOSE_HEADERS, add_cors_headers, allowed_origin
from proxy.web.errors import add_request_id
from proxy.web.keys import REQUEST_FACTS, SETTINGS

log = logging.getLogger("hlsrelay.streams")

# The hooks whose headers this module adds itself, in the order aiohttp runs them (app.py).
_KNOWN_HOOKS = (add_cors_headers, add_request_id)
_REASONS = {status.value: status.phrase for status in HTTPStatus}


def _lines(headers: Iterable[tuple[str, str]]) -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in headers)


class Ahead:
    """What every viewer of one body gets: its headers, aiohttp's defaults, the shared CORS
    headers; made once per body (and second, for ``Date``) and app."""

    __slots__ = ("app", "cors", "date", "head", "lines", "second", "sendable", "status_lines")

    def __init__(self, head: BodyHead, app: web.Application, second: int) -> None:
        self.head = head
        self.app = app
        self.second = second
        names = {name.lower() for name, _ in head.headers}
        reason = _REASONS.get(head.status, "")
        self.status_lines = {
            version: f"HTTP/{version.major}.{version.minor} {head.status} {reason}\r\n"
            for version in (HttpVersion10, HttpVersion11)
        }
        defaults = []
        # The Date sent, given to aiohttp's response too (None: the upstream's own is in), after
        # the upstream's headers (SentAhead); then aiohttp's defaults, in its order
        # (StreamResponse._prepare_headers).
        self.date: str | None = None
        if "date" not in names:
            self.date = formatdate(second, usegmt=True)
            defaults.append(("Date", self.date))
        if "content-type" not in names and head.length != 0:
            defaults.append(("Content-Type", "application/octet-stream"))
        if "server" not in names:
            defaults.append(("Server", SERVER_SOFTWARE))
        self.lines = _lines(head.headers) + _lines(defaults)
        # CORS headers every viewer gets (any origin allowed); None: each viewer's own.
        origins = app[SETTINGS].security.cors_origins
        self.cors = _cors_lines("*") if "*" in origins else None
        # A body without a length is sent chunked, and other hooks add what this does not know.
        self.sendable = (
            head.length is not None
            and "content-length" in names
            and tuple(app.on_response_prepare) == _KNOWN_HOOKS
        )


def _cors_lines(allowed: str) -> str:
    # As add_cors_headers (web/cors.py) adds them.
    lines = f"Access-Control-Allow-Origin: {allowed}\r\nAccess-Control-Expose-Headers: "
    lines += f"{EXPOSE_HEADERS}\r\n"
    return lines if allowed == "*" else lines + "Vary: Origin\r\n"


_last: Ahead | None = None


def ahead_of(request: web.Request, head: BodyHead) -> Ahead | None:
    """What this viewer's headers are made from, or None if they cannot be made here exactly
    as aiohttp would make them (aiohttp's preparation then makes them)."""
    global _last
    second = int(time.time())
    app = request.app
    ahead = _last
    # A crowd is let go in one loop, all with the same head: one entry is all it takes.
    if ahead is None or ahead.head is not head or ahead.second != second or ahead.app is not app:
        ahead = _last = Ahead(head, app, second)
    if not ahead.sendable or request.version not in ahead.status_lines:
        return None
    return ahead


def head_bytes(request: web.Request, ahead: Ahead) -> bytes:
    """This viewer's status line and headers, ending in the blank line."""
    version = request.version
    parts = [ahead.status_lines[version], ahead.lines]
    # aiohttp's Connection header (StreamResponse._prepare_headers).
    if request.keep_alive:
        if version == HttpVersion10:
            parts.append("Connection: keep-alive\r\n")
    elif version == HttpVersion11:
        parts.append("Connection: close\r\n")
    # The on_response_prepare hooks: CORS (web/cors.py), then the request id (web/errors.py).
    if ahead.cors is not None:
        parts.append(ahead.cors)
    else:
        allowed = allowed_origin(request, ahead.app[SETTINGS].security.cors_origins)
        if allowed is not None:
            parts.append(_cors_lines(allowed))
    facts = request.get(REQUEST_FACTS)
    if facts is not None:
        parts.append(f"X-Request-Id: {facts.request_id}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode()  # UTF-8, as aiohttp encodes headers


class SentAhead(web.StreamResponse):
    """aiohttp's response for an answer whose headers and first bytes already went out.

    Preparing it runs aiohttp's own preparation and hooks (the response's state, keep-alive,
    the access log's facts) but sends nothing: the headers aiohttp would send are checked
    against the ones sent, and the body bytes already sent are taken off what may still go.
    """

    def __init__(self, ahead: Ahead, sent_head: bytes, sent_body: int) -> None:
        head, date = ahead.head, ahead.date
        # The same Date as the one sent, so aiohttp adds none of its own.
        headers = head.headers if date is None else (*head.headers, ("Date", date))
        super().__init__(status=head.status, headers=headers)
        self._sent_head = sent_head
        self._sent_body = sent_body

    async def _write_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None
        assert writer is not None
        would_send = (
            f"HTTP/{request.version.major}.{request.version.minor} {self.status} {self.reason}\r\n"
            + _lines(self.headers.items())
            + "\r\n"
        ).encode()
        if would_send != self._sent_head:
            _report_mismatch(self._sent_head, would_send)
        if writer.length is not None:
            writer.length -= self._sent_body


def send_ahead(request: web.Request, head: bytes, first: memoryview) -> bool:
    """Write a viewer's headers and first bytes straight to its connection, in one write.

    False when the viewer is gone already (nothing written: its own task then finds out).
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return False
    data = head + first
    transport.write(data)
    # aiohttp's count of what went out: past 0, its error handler knows an answer has begun and
    # closes the connection instead of writing a second one.
    request.writer.output_size += len(data)
    return True


_mismatch_reported = False


def _report_mismatch(sent: bytes, would_send: bytes) -> None:
    global _mismatch_reported
    if _mismatch_reported:
        return
    _mismatch_reported = True

    def names(block: bytes) -> list[str]:
        return [
            line.split(b":", 1)[0].decode("latin-1") for line in block.split(b"\r\n")[1:] if line
        ]

    log.error(
        "a crowd answer's headers were not aiohttp's (sent %s; aiohttp's %s): reported once",
        names(sent),
        names(would_send),
    )

"""The client protocol: a plain body's bytes go to its reader as they came off the socket.

aiohttp's response parser hands every piece of a body to the response's ``StreamReader`` as a
fresh copy (``cb_on_body`` slices the socket's buffer into new ``bytes``). For a segment relay
that is a second user-space copy of every byte (the event loop's read is the first) and, while
the store keeps bodies, fresh memory faulted in for each piece: measured at ~6 % of the CPU of
relaying 2 MiB segments (perf: ``memmove`` 11 % for the two copies, page clearing 7 %).

Once a response's headers are parsed and its body is a plain ``Content-Length`` body (not
chunked, nothing to decompress, the parser holding nothing back), :class:`DirectBodyHandler`
feeds what the socket delivers straight to the response's reader, counting the bytes itself,
and finishes the body when the count is reached, as the parser would. Everything else (headers,
chunked or compressed bodies, bodies that came whole with their headers, a parser paused by flow
control) is aiohttp's path, untouched. The parser of a response taken over is dropped once the
body is complete: it still counts bytes it never saw, and would report the body incomplete if
the connection closed; the next request on the connection gets a fresh parser
(``set_response_params``), as it always does.

This leans on ``ResponseHandler``'s attributes (``_payload``, ``_parser``, ``_buffer``, the
pause flags) as aiohttp 3.14 has them; tests/integration/test_direct_body.py holds them to it
with a real origin: plain, chunked, compressed, keep-alive reuse, early close, extra bytes.
Under any other aiohttp minor version (:data:`DIRECT_BODIES` false) the handler takes no body
over and is aiohttp's own protocol: private attributes may change between minor releases, and
a relay a little slower is better than one that loses bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader


def written_for(version: str) -> bool:
    """Whether *version* of aiohttp is one this handler was written and tested against."""
    return version.split(".")[:2] == ["3", "14"]


DIRECT_BODIES = written_for(aiohttp.__version__)
"""Whether bodies are taken over at all (else the parser feeds every body, as in aiohttp)."""


class DirectBodyHandler(ResponseHandler):
    """aiohttp's client protocol, with plain ``Content-Length`` bodies fed without a copy."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._body_length = 0
        """The current body's length while it is plain and still coming; else 0."""
        self._direct = False
        """Whether this protocol, not the parser, feeds the current body."""
        self._decompress = True
        self.direct_bytes = 0
        """Body bytes this connection fed without the parser, all answers together (tests)."""

    def set_response_params(self, **kwargs: Any) -> None:
        self._body_length = 0
        self._direct = False
        self._decompress = bool(kwargs.get("auto_decompress", True))
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        if not DIRECT_BODIES:
            super().data_received(data)  # another aiohttp: none of its private attributes read
            return
        if data and self._body_length and (self._direct or not self._reading_paused):
            # Not while paused: then the parser may still hold bytes of this body back.
            self._feed(data)
            return
        if data and self._parser is None and not self._upgraded:
            # Bytes after a body this protocol completed, before any request asked: broken
            # upstream. aiohttp's parser would fail on them and close; so does this.
            self._should_close = True
            if self.transport is not None:
                self.transport.close()
            return
        payload = self._payload
        super().data_received(data)
        if self._payload is not payload:
            self._body_length = self._plain_length()

    def _feed(self, data: bytes) -> None:
        self._direct = True
        self._reschedule_timeout()
        payload = self._payload
        assert payload is not None
        left = self._body_length - payload.total_bytes
        size = len(data)
        if size < left:
            self.direct_bytes += size
            payload.feed_data(data)
            return
        self._body_length = 0
        self._direct = False
        if size > left:
            # More than the body: a broken upstream. Not parsed as a next answer; not reused.
            self._should_close = True
            data = data[:left]
        self.direct_bytes += left
        payload.feed_data(data)
        # The parser counts bytes it never saw: drop it before anything could ask it (a close
        # now would have it report this complete body as cut short). The next request on this
        # connection gets a parser of its own anyway (``set_response_params``).
        self._parser = None
        payload.feed_eof()

    def _plain_length(self) -> int:
        """The length of the body just begun, if this protocol may feed it; else 0."""
        payload = self._payload
        if type(payload) is not StreamReader or payload.is_eof() or not self._buffer:
            return 0
        (message, queued), _size = self._buffer[-1]
        if queued is not payload or message.chunked or (message.compression and self._decompress):
            return 0
        length = message.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) <= payload.total_bytes:
            return 0
        return int(length)

"""The client protocol: a plain body's bytes go to its reader as they came off the socket.

aiohttp's response parser hands every piece of a body to the response's ``StreamReader`` as a
fresh copy (``cb_on_body`` slices the socket's buffer into new ``bytes``). For a segment relay
that is a second user-space copy of every byte (the event loop's read is the first) and, while
the store keeps bodies, fresh memory faulted in for each piece: measured at ~6 % of the CPU of
relaying 2 MiB segments (perf: ``memmove`` 11 % for the two copies, page clearing 7 %).

Once a response's headers are parsed and its body is a plain ``Content-Length`` body (not
chunked, nothing to decompress, the parser holding nothing back), :class:`DirectBodyHandler`
feeds what is read (into the body's own blocks, below) straight to the response's reader,
counting the bytes itself,
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

Reads go into the body's own memory too: the handler is a buffered protocol for the transport
(:class:`_BufferedReads`, set in ``connection_made``), so while a plain body is coming the event
loop reads straight into a block allocated for it (``bytearray``, at most :attr:`read_size`
bytes and never past the body's end) and the reader gets views of that block. What that buys is
the read size: uvloop reads at most 256 KiB at a time into its own buffer, a block takes up to
the body's share of the receive budget (:mod:`proxy.upstream.receive`, up to 2 MiB), so a body
is read, handed on and written to its viewer in fewer, bigger steps. bench_peers' segment
relay, 64 connections, 5 interleaved rounds: 1,233 -> 1,449 MB/s, CPU per request 1,700 ->
1,444 us, with half the reads, writes and ``epoll_ctl`` calls. Blocks of 256 KiB (uvloop's copy
into fresh ``bytes`` saved, reads as before) measured no faster. Heads and everything aiohttp
parses are read into a buffer of the thread's and handed on as ``bytes``, as the loop would.

The rest of a plain body may also be handed over (:meth:`DirectBodyHandler.hand_over`): the
transport stops reading, the caller moves the bytes from the socket itself (``splice(2)``,
:mod:`proxy.splice`) and hands the body back whole (:meth:`DirectBodyHandler.handed_back`),
which ends it as the last fed byte would; the connection is then read again and may be reused.

So a body's chunks (``StreamReader.readchunk()`` and ``readany()``, and ``read_chunk`` above
them) may be memoryviews, though aiohttp annotates them ``bytes``: bytes-like, written, joined and
sliced as bytes are, but without ``bytes``' methods (``decode``, ``startswith``). ``read()`` and
``read(n)`` join into ``bytes``; so does ``UpstreamResponse.first_chunk()``, for its callers.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader

from proxy.turns import TurnBudget


def written_for(version: str) -> bool:
    """Whether *version* of aiohttp is one this handler was written and tested against."""
    return version.split(".")[:2] == ["3", "14"]


DIRECT_BODIES = written_for(aiohttp.__version__)
"""Whether bodies are taken over at all (else the parser feeds every body, as in aiohttp)."""


DEFAULT_READ_BYTES = 256 * 1024
"""A read's size until the body's share is known (:attr:`DirectBodyHandler.read_size`): uvloop's
own, and the size of the buffer heads are read into."""

SPENT_READ_BYTES = 64 * 1024
"""The most one read takes into a body while the event-loop turn's reads have used their CPU
time (:class:`DirectBodyHandler`'s ``reads`` budget): the socket stays readable and is read in
full again in the next turn."""

FIRST_BLOCK_BYTES = 256 * 1024
"""The most a body's first block holds, whatever its read size: a burst's first bodies see few
others yet and would each get a block of their whole length (2 MiB segments: zeroed, so resident
at once) before the others arrive and their shares shrink; the block stays for the body's life.
The more so the slower a crowd is admitted: bench_peers' 500 slow downloads alone with
``server.requests_per_turn`` 8, peak RSS 183-205 MB without the cap, 171-187 with it (5 and 7
runs); at the default 16, 168-174 MB in 11 runs with it (159-177 in 7 without), and its 2 MiB
relay no slower (1,297 against 1,256 MB/s, 5 interleaved rounds). Later blocks follow the read
size."""

_threads = threading.local()


def _head_buffer() -> memoryview:
    """This thread's buffer for reads aiohttp parses (its event loop's: one read at a time)."""
    buffer: memoryview | None = getattr(_threads, "head", None)
    if buffer is None:
        buffer = _threads.head = memoryview(bytearray(DEFAULT_READ_BYTES))
    return buffer


class _BufferedReads(asyncio.BufferedProtocol):
    """What the transport of a :class:`DirectBodyHandler` calls: reads into buffers it gives.

    A separate object because aiohttp's protocol is an ``asyncio.Protocol``, which event loops
    only ever hand ``bytes`` (uvloop decides by the protocol's class when it is set)."""

    __slots__ = ("_handler",)

    def __init__(self, handler: DirectBodyHandler) -> None:
        self._handler = handler

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._handler.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._handler.buffer_updated(nbytes)

    def eof_received(self) -> None:
        self._handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()


class DirectBodyHandler(ResponseHandler):
    """aiohttp's client protocol, with plain ``Content-Length`` bodies read and fed without a
    copy."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reads: TurnBudget | None = None) -> None:
        super().__init__(loop)
        self._reads = reads
        """Counts the body reads of each event-loop turn, all connections together; once the
        turn's have used its CPU time, reads take at most :data:`SPENT_READ_BYTES` each until
        the next turn. A turn reads for every readable socket before it runs anything else: 64
        segments relayed at once read up to 1 MiB each, 13-42 MB in the longest turns (26-78 ms
        of CPU, bench_peers case 1), whatever the relays' own budget let through. None: no limit."""
        self.read_size = DEFAULT_READ_BYTES
        """The most one read may take into the current body: set to its share of the receive
        budget once its headers are in (:meth:`proxy.upstream.receive.ReceiveBudget.fit`)."""
        self._head = _head_buffer()
        self._block: memoryview | None = None
        """The current body's block being read into (None: a new one at the next read)."""
        self._block_at = 0
        """Bytes of the block read so far."""
        self._into_body = False
        """Whether the buffer handed out last was the body's block (else the head buffer)."""
        self._body_length = 0
        """The current body's length while it is plain and still coming; else 0."""
        self._direct = False
        """Whether this protocol, not the parser, feeds the current body."""
        self._decompress = True
        self.direct_bytes = 0
        """Body bytes this connection fed without the parser, all answers together (tests)."""
        self._handed_over = False
        """Whether the rest of the current body is being moved by someone else (:meth:`hand_over`):
        the transport is not read meanwhile."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if DIRECT_BODIES:
            transport.set_protocol(_BufferedReads(self))

    def set_response_params(self, **kwargs: Any) -> None:
        self._body_length = 0
        self._direct = False
        self._block = None
        self.read_size = DEFAULT_READ_BYTES
        self._decompress = bool(kwargs.get("auto_decompress", True))
        super().set_response_params(**kwargs)

    def get_buffer(self) -> memoryview:
        """Where the next read goes: the rest of the body's block, else the head buffer."""
        # Not while the parser holds bytes of this body back (paused before any was taken over).
        if self._body_length and (self._direct or not self._reading_paused):
            spent = self._reads is not None and self._reads.exhausted()
            block = self._block
            if block is None:
                payload = self._payload
                assert payload is not None
                # Never past the body's end: what follows belongs to no one yet.
                size = min(self._body_length - payload.total_bytes, self.read_size)
                if payload.total_bytes < FIRST_BLOCK_BYTES:
                    size = min(size, FIRST_BLOCK_BYTES)
                if spent:
                    # A small block too: making and zeroing a big one is much of a read's cost.
                    size = min(size, SPENT_READ_BYTES)
                # bytearray(size) zeroes it; measured no slower than leaving it uninitialized
                # (the pages are written by the read right after either way).
                self._block = block = memoryview(bytearray(size))
                self._block_at = 0
            self._into_body = True
            if spent:
                return block[self._block_at : self._block_at + SPENT_READ_BYTES]
            return block[self._block_at :]
        self._into_body = False
        return self._head

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were read into the buffer :meth:`get_buffer` gave."""
        if not self._into_body:
            self.data_received(bytes(self._head[:nbytes]))
            return
        if self._reads is not None:
            self._reads.take()
        block = self._block
        assert block is not None
        start = self._block_at
        end = start + nbytes
        if end == len(block):
            self._block = None
        else:
            self._block_at = end
        self._feed(block[start:end])

    def data_received(self, data: bytes) -> None:
        if not DIRECT_BODIES:
            super().data_received(data)  # another aiohttp: none of its private attributes read
            return
        # Body bytes taken over never come here: they are read into blocks (get_buffer); what
        # comes here was read into the head buffer, for the parser.
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

    def hand_over(self) -> int:
        """Stop reading the current plain body, to have its rest moved from the socket by the
        caller (:mod:`proxy.splice`); return how many of its bytes are still to come in (0: none
        can be handed over: not a plain body taken over, or all of it in already). What was
        read already stays for the response's reader; :meth:`handed_back` ends the body."""
        left = self._left_to_hand_over()
        if left:
            self._handed_over = True
            assert self.transport is not None
            self.transport.pause_reading()
            self._drop_timeout()  # the mover bounds its own waits
        return left

    def can_hand_over(self) -> bool:
        """Whether :meth:`hand_over` would hand the rest of the current body over (now)."""
        return bool(self._left_to_hand_over())

    def _left_to_hand_over(self) -> int:
        payload = self._payload
        transport = self.transport
        if (
            not DIRECT_BODIES
            or not self._body_length
            or self._handed_over
            or payload is None
            or transport is None
            or transport.is_closing()
            or transport.get_extra_info("sslcontext") is not None
            or transport.get_extra_info("socket") is None
            or (self._reading_paused and not self._direct)  # the parser may hold bytes back
        ):
            return 0
        return max(0, self._body_length - payload.total_bytes)

    def handed_back(self, moved: int) -> None:
        """The rest of the body was moved (``moved`` bytes, all of it): it ends here, as fed,
        and the connection reads again (for its next answer, or to see it close)."""
        payload = self._payload
        assert self._handed_over
        assert payload is not None
        self._handed_over = False
        self.direct_bytes += moved
        self._body_length = 0
        self._direct = False
        self._block = None
        self._parser = None  # as _feed at a body's end: it never saw these bytes
        payload.feed_eof()
        # Read again, whether the reader's flow control had paused it or the hand-over did.
        self._reading_paused = False
        self._drop_timeout()  # idle until the next request asks: no read timeout
        if self.transport is not None:
            self.transport.resume_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._handed_over:
            return  # the reader drained what was read: the rest is not for this protocol
        super().resume_reading(resume_parser)

    def _feed(self, data: memoryview) -> None:
        self._direct = True
        self._reschedule_timeout()
        payload = self._payload
        assert payload is not None
        left = self._body_length - payload.total_bytes
        size = len(data)
        if size < left:
            self.direct_bytes += size
            payload.feed_data(data)  # type: ignore[arg-type]  # any bytes-like: appended as is
            return
        self._body_length = 0
        self._direct = False
        self._block = None
        if size > left:
            # Cannot happen while blocks end where the body does (get_buffer); kept so that a
            # mistake there never hands this body bytes of the next answer. Not reused.
            self._should_close = True
            data = data[:left]
        self.direct_bytes += left
        payload.feed_data(data)  # type: ignore[arg-type]  # any bytes-like: appended as is
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

"""How much each upstream body being received may buffer: ``upstream.receive_budget_bytes``.

A body read from an upstream waits in two buffers before it is relayed: the connection's receive
buffer in the kernel, and aiohttp's read buffer in this process, which takes whatever the kernel
holds in reads of up to 256 KB (uvloop's read size, not configurable) and pauses the socket only
past twice its ``read_bufsize`` (256 KiB by default in aiohttp 3.14). With few bodies at once,
that is what relays fastest: big reads, few Python steps per byte, kernel autotuning keeping the
window open for distant origins. With hundreds at once it is hundreds of MB (500 downloads, each
of a segment of its own: 450 KB each in reads and read buffers, 520 MB of RSS), and one event-
loop turn that reads 256 KB for each of them stalls every request for a quarter of a second.

So the budget is shared: with N bodies arriving at once (counted from their request), each gets
``budget / N``, at least :data:`MIN_SHARE_BYTES`. A share of :data:`UNLIMITED_SHARE_BYTES` or
more changes nothing. A smaller one is cut in :data:`SHARE_PARTS`: the response's read buffer,
its socket's receive buffer (the kernel doubles it; a read never takes more than it holds) and
its largest chunk get one part each (the receive buffer never below
:data:`MIN_RECEIVE_BUFFER_BYTES`). A connection whose receive buffer was shrunk gets its former
size back when it is used again without a limit.

A body keeps following its share while it is received (:class:`BodyFit`): in a burst of
requests the first ones see few others yet and start with big buffers (a quarter of the 500
bodies of bench_peers' memory case held 61 MB of read buffers between them, by the sizes chosen
at their requests), so when the count of bodies has halved or doubled since a body was last
fitted, its buffers are fitted again at the next chunk read.

The price: a connection then receives about one receive buffer per round trip. With the default
budget and 500 bodies at once that is the floor, some 32-48 KiB: 650 KB/s or more (5 Mbit/s)
from an origin 50 ms away. With far origins and many viewers downloading at once, raise the
budget (memory grows with it). Measured with bench_peers' 500 slow 2 MiB downloads on loopback:
peak RSS 535 MB without the budget, about 205 MB with the default.

Only bodies that are relayed count: playlists and channel lists are read whole, up to a cap.

A body's share also sets how much one read may take into it (``DirectBodyHandler.read_size``,
reads straight into the body's memory): a limited share reads what its read buffer holds; an
unlimited one up to its whole share, at most :data:`MAX_BODY_READ_BYTES` (with 64 segments at
once, 1 MiB each). Fewer, bigger reads are what relays a fast segment cheapest per byte; while
its relay is behind, a body holds its read buffer's limit plus at most one such read.
"""

from __future__ import annotations

import socket
import weakref
from collections.abc import Callable

import aiohttp

from proxy.upstream.direct_body import DirectBodyHandler

# A share this large or larger leaves aiohttp's and the kernel's defaults alone: with the default
# budget, up to 128 bodies at once (64 segments relayed at full speed keep their big reads).
UNLIMITED_SHARE_BYTES = 512 * 1024
MIN_SHARE_BYTES = 64 * 1024
# A limited share is cut in eighths: the read buffer (aiohttp pauses the socket past twice it),
# the socket's receive buffer (the kernel doubles it, and a read takes at most what it holds)
# and the largest chunk handed on get one each. Smaller chunks save little more and cost CPU:
# 4 KiB chunks with 500 bodies took the peak RSS from ~205 to ~187 MB, and relayed a third less.
SHARE_PARTS = 8
# aiohttp's read buffer (it pauses the socket past twice it): aiohttp 3.14's default at most.
MAX_READ_BUFFER_BYTES = 256 * 1024
MIN_READ_BUFFER_BYTES = 16 * 1024
# Never a smaller socket receive buffer than this (the kernel doubles it): below about one
# loopback segment (64 KiB) a sender stalls in silly-window avoidance. Measured on loopback:
# 1.4 GB/s with 32 KiB, 20 MB/s with 16 KiB, 0.1 MB/s with 8 KiB.
MIN_RECEIVE_BUFFER_BYTES = 32 * 1024
# The most one read takes into a body whose share is not limited (the share itself below that).
# 64 segments relayed at full speed (1 MiB reads, their share): 1,233 -> 1,449 MB/s against
# uvloop's 256 KiB reads; 512 and 768 KiB reads measured no faster than 256 KiB.
MAX_BODY_READ_BYTES = 2 * 1024 * 1024
# Resource kinds (metric labels of UpstreamClient.open) read whole rather than relayed.
UNBUDGETED_KINDS = frozenset({"playlist", "channel_list"})


class ReceiveBudget:
    """The share of ``total`` bytes each upstream body being received may buffer."""

    def __init__(self, total: int) -> None:
        self._total = total
        self.open = 0
        """Bodies being received now (counted from their headers until closed or released)."""
        # Connections whose receive buffer was shrunk -> the size they had before (as the kernel
        # reports it: twice what was asked).
        self._shrunk: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()

    def share(self, kind: str) -> int | None:
        """Bytes a body of ``kind`` (counted in by :meth:`opened`) may buffer; None: no limit."""
        if not self._total or kind in UNBUDGETED_KINDS:
            return None
        share = self._total // max(1, self.open)  # the body asking is counted in already
        if share >= UNLIMITED_SHARE_BYTES:
            return None
        return max(share, MIN_SHARE_BYTES)

    def read_bufsize(self, kind: str) -> int | None:
        """aiohttp's read buffer for a body of ``kind`` about to be requested: an eighth of its
        share, within [:data:`MIN_READ_BUFFER_BYTES`, :data:`MAX_READ_BUFFER_BYTES`], even when
        the share is not limited. Chosen before the headers (aiohttp fixes it then); in a burst
        of requests, the first ones see few others yet, and a full default buffer each would
        add up. None: aiohttp's own."""
        if not self._total or kind in UNBUDGETED_KINDS:
            return None
        part = self._total // max(1, self.open) // SHARE_PARTS
        return min(MAX_READ_BUFFER_BYTES, max(part, MIN_READ_BUFFER_BYTES))

    def read_size(self, share: int | None) -> int:
        """The most one read may take into a body with ``share`` (None: not limited)."""
        if share is not None:
            return max(share // SHARE_PARTS, MIN_READ_BUFFER_BYTES)
        if not self._total:
            return MAX_BODY_READ_BYTES
        whole = self._total // max(1, self.open)
        return min(MAX_BODY_READ_BYTES, max(whole, UNLIMITED_SHARE_BYTES))

    def opened(self) -> Callable[[], None]:
        """Count a body in; the function returned counts it out (once, however often called)."""
        self.open += 1
        counted = True

        def closed() -> None:
            nonlocal counted
            if counted:
                counted = False
                self.open -= 1

        return closed

    def fit(self, raw: aiohttp.ClientResponse, share: int | None) -> None:
        """Give ``raw``'s connection the receive buffer ``share`` asks for (or its own back)."""
        connection = raw.connection
        if connection is None or connection.transport is None or connection.protocol is None:
            return
        protocol = connection.protocol
        set_read_size(raw, self.read_size(share))
        sock = connection.transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            if share is not None:
                if protocol not in self._shrunk:
                    self._shrunk[protocol] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                size = max(share // SHARE_PARTS, MIN_RECEIVE_BUFFER_BYTES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            elif protocol in self._shrunk:
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVBUF, self._shrunk.pop(protocol) // 2
                )
        except OSError:  # a socket that does not take it: the defaults stay, nothing breaks
            return


def set_read_limit(content: aiohttp.StreamReader, size: int) -> bool:
    """Make ``size`` the read buffer of ``content`` (aiohttp pauses its socket past twice it).

    aiohttp fixes it when the request is made and offers only to raise it
    (``set_read_chunk_size``); lowering it means setting the two limits the reader compares
    against. False when this aiohttp keeps them elsewhere: the buffer then stays as it was.
    """
    if content.get_read_buffer_limits() == (size, size * 2):
        return True
    try:
        content._low_water = size  # no public way to lower them
        content._high_water = size * 2
    except AttributeError:
        return False
    return content.get_read_buffer_limits() == (size, size * 2)


def set_read_size(raw: aiohttp.ClientResponse, size: int) -> None:
    """Let one read take up to ``size`` bytes into ``raw``'s body (when its connection reads
    into bodies: :class:`~proxy.upstream.direct_body.DirectBodyHandler`)."""
    connection = raw.connection
    protocol = connection.protocol if connection is not None else None
    if isinstance(protocol, DirectBodyHandler):
        protocol.read_size = size


class BodyFit:
    """One body's buffers kept at its share of the budget while it is received.

    Checked at every chunk read (:meth:`check`, a comparison while the count of bodies stays
    put); fitted again when its share has halved or doubled since, or changed between limited
    and not: the read buffer (what :meth:`ReceiveBudget.read_bufsize` gives a body requested
    then), the socket's receive buffer and the largest chunk follow it, so bodies that began in
    a burst with big buffers give them up as the others arrive, and get them back when the
    others are done. Bytes already buffered stay; none are read past the new limits.
    """

    __slots__ = ("_budget", "_cap", "_kind", "_raw", "_seen", "share")

    def __init__(self, budget: ReceiveBudget, raw: aiohttp.ClientResponse, kind: str) -> None:
        self._budget = budget
        self._raw = raw
        self._kind = kind
        self._seen = budget.open
        self._cap: int | None = None
        self.share: int | None = None
        """The share fitted now; None: no limit."""
        self._apply(budget.share(kind))

    @property
    def chunk_limit(self) -> int | None:
        """Largest chunk to hand on; None: all that is buffered."""
        if self.share is None:
            return None
        part = self.share // SHARE_PARTS
        return part if self._cap is None else min(part, self._cap)

    def limit_chunks(self, size: int) -> None:
        """Chunks of at most ``size`` from now on, while the share is limited."""
        self._cap = size if self._cap is None else min(size, self._cap)

    def check(self) -> bool:
        """Fit the body again if its share moved far enough since; True if it did."""
        budget = self._budget
        if budget.open == self._seen:
            return False
        self._seen = budget.open
        share = budget.share(self._kind)
        now = self.share
        if share == now or (share is not None and now is not None and now // 2 < share < now * 2):
            return False
        self._apply(share)
        return True

    def _apply(self, share: int | None) -> None:
        self.share = share
        budget = self._budget
        budget.fit(self._raw, share)
        # What a body requested now would get: an eighth of the share, within bounds. Set at
        # the headers too: the request chose it when fewer bodies may have been counted.
        size = budget.read_bufsize(self._kind)
        if size is not None:
            set_read_limit(self._raw.content, size)


__all__ = [
    "MAX_BODY_READ_BYTES",
    "MAX_READ_BUFFER_BYTES",
    "MIN_READ_BUFFER_BYTES",
    "MIN_RECEIVE_BUFFER_BYTES",
    "MIN_SHARE_BYTES",
    "SHARE_PARTS",
    "UNBUDGETED_KINDS",
    "UNLIMITED_SHARE_BYTES",
    "BodyFit",
    "ReceiveBudget",
    "set_read_limit",
    "set_read_size",
]

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

The price: a connection then receives about one receive buffer per round trip. With the default
budget and 500 bodies at once that is the floor, some 32-48 KiB: 650 KB/s or more (5 Mbit/s)
from an origin 50 ms away. With far origins and many viewers downloading at once, raise the
budget (memory grows with it). Measured with bench_peers' 500 slow 2 MiB downloads on loopback:
peak RSS 535 MB without the budget, about 205 MB with the default.

Only bodies that are relayed count: playlists and channel lists are read whole, up to a cap.
"""

from __future__ import annotations

import socket
import weakref
from collections.abc import Callable

import aiohttp

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


__all__ = [
    "MAX_READ_BUFFER_BYTES",
    "MIN_READ_BUFFER_BYTES",
    "MIN_RECEIVE_BUFFER_BYTES",
    "MIN_SHARE_BYTES",
    "SHARE_PARTS",
    "UNBUDGETED_KINDS",
    "UNLIMITED_SHARE_BYTES",
    "ReceiveBudget",
]

"""A budget of work items per turn of the event loop, shared by everyone who takes from it.

Everything ready in one turn of the loop runs before the loop looks at its timers and sockets
again. When hundreds of tasks become ready together (a crowd's requests arriving, the bodies of
hundreds of downloads each with a chunk), one turn runs all of them and every other request
waits that long. A :class:`TurnBudget` lets ``per_turn`` of them go on in a turn; the others
wait for a later turn, and the loop runs its timers and other work in between.

A budget may also stop a turn by time: once the turn has used ``cpu_s`` of this thread's CPU
time since its first item, the rest wait too. A count alone does not know what its items cost:
in bench_peers' memory case, 128 chunks of 16 KiB took a turn of 10-20 ms while the viewers'
sockets took everything, and 25-35 ms while 500 requests were being admitted in between, with a
young-generation collection (6-17 ms) or fresh memory faulted in falling in some of them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class TurnBudget:
    """At most ``per_turn`` items taken per event-loop turn, all takers together, and no more
    once the turn has used ``cpu_s`` seconds of CPU time since its first item; ``per_turn``
    0: no limit at all, ``cpu_s`` 0: counted only.

    Counted in items, and in the thread's CPU time rather than the clock's: the count is what
    grows with the work that became ready at once, and neither mistakes a busy machine (the
    process waiting for its core) for work of its own. The time covers everything the loop ran
    in the turn since the first item (other tasks, the garbage collector), not only the items.

    Takers that wait (:meth:`next`) go on in the order they began to wait, the first few at each
    turn's end: one more each turn while turns stay within their CPU time, half as many after
    one that did not (at least one). A taker may also join the line while others are in it
    (:attr:`waiting`, :meth:`must_wait`), though the turn has items left. Before, every waiter
    woke at each turn's end and looked again, and the takers woken by their sockets meanwhile
    had taken the new turn: in bench_peers' segment relay, a relay that had to wait woke 12.7
    times on average before it went on, and one whose turn kept being taken waited for seconds
    (p99 1.8 s where the relays also read their own upstreams).
    """

    __slots__ = (
        "_allow",
        "_cpu_s",
        "_new_turn",
        "_over",
        "_per_turn",
        "_started",
        "_taken",
        "_waiters",
        "_woke",
    )

    def __init__(self, per_turn: int, cpu_s: float = 0.0) -> None:
        self._per_turn = per_turn
        self._cpu_s = cpu_s
        self._taken = 0
        self._started: float | None = None
        self._over = False
        self._new_turn: asyncio.Handle | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._allow = max(1, per_turn // 8)
        self._woke = 0

    def take(self, items: int = 1) -> bool:
        """Count ``items`` taken now; True when this turn's items are all taken (then wait for
        :meth:`next` before taking another)."""
        if not self._per_turn:
            return False
        if self._new_turn is None:
            # Callbacks queued now run in the loop's next batch: that is where the turn ends.
            self._new_turn = asyncio.get_running_loop().call_soon(self._end)
        if self._cpu_s:
            if self._started is None:
                self._started = time.thread_time()
            elif time.thread_time() - self._started >= self._cpu_s:
                self._taken = self._per_turn  # this item is the turn's last
                self._over = True
        self._taken += items
        return self._taken >= self._per_turn

    def must_wait(self, items: int = 1) -> bool:
        """Count ``items`` taken now, as :meth:`take`; True when this taker should wait for
        :meth:`next`: the turn's items are all taken, or others wait for a later turn already
        (a taker that reads its own socket would otherwise take every new turn from them)."""
        return self.take(items) or bool(self._waiters)

    @property
    def waiting(self) -> bool:
        """Takers wait for a later turn (a newcomer that should not go before them calls
        :meth:`next` too)."""
        return bool(self._waiters)

    def exhausted(self) -> bool:
        """This turn's items are all taken."""
        return bool(self._per_turn) and self._taken >= self._per_turn

    async def next(self) -> None:
        """Wait, behind those already waiting, for a turn that lets this taker go on (no wait
        while the turn has items left and nobody waits)."""
        if not self._per_turn or (not self._waiters and self._taken < self._per_turn):
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        await future

    def _end(self) -> None:
        # How many waiters a turn lets go: one more after a turn that let some go and stayed
        # within its CPU time, half as many after one that went over.
        if self._woke:
            if self._over:
                self._allow = max(1, self._allow // 2)
            elif self._allow < self._per_turn:
                self._allow += 1
        self._taken = 0
        self._started = None
        self._over = False
        self._new_turn = None
        self._woke = 0
        waiters = self._waiters
        while waiters and self._woke < self._allow:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                self._woke += 1
        if self._woke or waiters:
            # This turn ends after the waiters let go have run (queued before it), and lets
            # the next ones go.
            self._new_turn = asyncio.get_running_loop().call_soon(self._end)


class TurnMark:
    """Whether the event loop has turned (run its other ready callbacks) since this was made.

    A task that must not hold the loop for long yields after each step; if the step waited
    (a write that waited for its socket to drain), the loop has turned already and another yield
    is one more task step for nothing: in bench_peers' memory case, 500 viewers each cost a
    write, a yield and a read per 8 KiB they took, and the turns that ran them reached 50-100 ms.
    """

    __slots__ = ("_handle", "_turned")

    def __init__(self) -> None:
        self._turned = False
        self._handle: asyncio.Handle | None = asyncio.get_running_loop().call_soon(self._mark)

    def _mark(self) -> None:
        self._turned = True
        # The handle holds this mark's method: kept, the two would be a reference cycle (with
        # the task's context in it) left for the garbage collector, one per relayed chunk.
        self._handle = None

    def passed(self) -> bool:
        """True once the loop has turned; if not yet, the mark is dropped (call once)."""
        handle = self._handle
        if handle is not None:
            handle.cancel()  # a cancelled handle lets go of its callback: no cycle either
            self._handle = None
        return self._turned

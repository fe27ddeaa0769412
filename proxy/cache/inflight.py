"""Shared in-flight bodies: one upstream body fed to N readers as its bytes arrive.

When N viewers ask for the same segment while it is still arriving, one upstream fetch (a
background task, the *pump*) feeds all of them. Each reader gets every chunk as soon as the pump
has it, not after the whole body; a late joiner first gets what has arrived so far, then follows.
A body with one viewer (most: a viewer per stream) is read by that viewer's own task instead,
until a second viewer joins or it leaves (:class:`_Feed`), unless memory is already short when
it opens (then a pump reads it).

* A body that completes within ``max_object_bytes`` is handed to ``on_complete`` (which stores
  it, as the chunks it came in: see :meth:`~proxy.cache.store.ObjectStore.set_parts`) before the
  flight is forgotten, so a request never finds neither the flight nor the entry.
* A failed or truncated upstream body is never handed on: every reader gets the error (the
  handler then cuts its connection, so no viewer mistakes a short body for a whole one).
* A body that grows past ``max_object_bytes`` (a large file, an endless stream) *spills*: no new
  reader may join, chunks every reader has passed are dropped, and the pump waits for the
  slowest reader once ``window_bytes`` are unread, so memory stays bounded. When a spilled body
  has no reader left, the upstream is closed.
* All bodies together hold about ``held_bytes`` in memory (counted until their chunks are dropped
  or their last reader is gone). A chunk that takes them past it spills its body at once, with
  the smaller ``pressure_window_bytes``: with many slow viewers on different segments memory
  stays near the budget plus a small window each, instead of every segment buffered whole
  (such a body is then neither stored nor joined by late viewers).

The pump never waits for readers before spilling: a slow viewer slows only itself.

All pumps together take at most ``turn_chunks`` chunks per turn of the event loop, and no more
once the turn has used ``turn_cpu_s`` of CPU time since the first
(:class:`~proxy.turns.TurnBudget`); past either they wait for the next turn, so hundreds of bodies
relayed at once never hold up every other request for the length of one chunk each: with
viewers whose socket buffers take all they are given, one turn relayed a chunk for each of 500
bodies (16 KiB each, 60-85 ms of one core in bench_peers' memory case). A chunk counts once per
:data:`TURN_CHUNK_BYTES` it holds (started): upstream reads of up to 1 MiB
(:mod:`proxy.upstream.receive`) made 64 fast downloads relay up to 64 MiB in a turn, and turns of
25-45 ms, some past 50, where 256 KiB chunks had made 10-20 ms; counted by size they take about
16 MiB a turn (fewer turns over 25 ms by three quarters, the bigger reads' CPU saving kept).

A crowd waiting for a body is let go by the pump itself: each waiting reader may hand it a
*first write* (:meth:`BodyReader.first_bytes`), run when the first chunk arrives (its viewer's
headers and first bytes). The pump runs every waiting reader's in one loop, instead of waking
every reader's task (hundreds of task turns between the upstream's first byte and the crowd's),
then wakes the readers a turn's worth at a time; they follow at their own pace. A first write is
run in the pump's turn and is expected not to wait (a write into an empty socket buffer); one
that does wait is finished by its own reader's task, not dropped.

This module knows nothing of HTTP clients: the upstream is a :class:`BodySource`.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from proxy.cache.tasks import BackgroundTasks
from proxy.errors import HlsRelayError, UpstreamUnreachable
from proxy.turns import TurnBudget

TURN_CHUNK_BYTES = 128 * 1024
"""A chunk counts against the turn budget once per this many bytes it holds (started)."""


def turn_items(size: int) -> int:
    """What a chunk of ``size`` bytes counts against the turn budget: 1 per
    :data:`TURN_CHUNK_BYTES` started, at least 1."""
    return max(1, -(-size // TURN_CHUNK_BYTES))


@dataclass(frozen=True, slots=True)
class BodyHead:
    """What is known once the upstream headers are in."""

    status: int
    headers: tuple[tuple[str, str], ...]
    """The viewers' response headers."""
    length: int | None
    storable: bool = True
    """False when the upstream said the body must not be stored (``Cache-Control: no-store``)."""


class BodySource(Protocol):
    """An open upstream body."""

    @property
    def head(self) -> BodyHead: ...

    def read_chunk(self) -> Awaitable[bytes | memoryview]:
        """The next bytes of the body as they arrive (bytes-like: a view of the body's memory
        when the upstream's reads go straight into it), b"" at its end; raises the project's errors
        when it fails or is cut short. Cancelling a caller leaves the body readable by the next
        call."""
        ...

    def bytes_ready(self) -> bool:
        """Whether :meth:`read_chunk` would return bytes without waiting (not the end or an error:
        those are in or not, reading them is no work worth a yield)."""
        ...

    def abort(self) -> None:
        """Drop the connection (the body was not read to the end)."""

    def finish(self) -> None:
        """Hand the connection back (the body was read to the end)."""

    def limit_chunks(self, size: int) -> None:
        """From now on, hand on chunks of at most ``size`` bytes."""


Opener = Callable[[], Awaitable[BodySource]]
OnComplete = Callable[[BodyHead, tuple[bytes | memoryview, ...]], Awaitable[None]]
"""Gets a whole body as the chunks it arrived in (joined by whoever needs one ``bytes``)."""
FirstWrite = Callable[[memoryview], Coroutine[Any, Any, int]]
"""Writes a reader's first bytes from the body's first chunk; returns how many it took."""

T = TypeVar("T")


class _Rest(Generic[T]):
    """What is left of a step the pump began for a reader and that waited for something.

    The pump cannot wait for one reader, and dropping the step would leave its viewer with half
    an answer: the reader's own task awaits this instead, which goes on with the step exactly
    where it stopped (the future it waited on included).
    """

    __slots__ = ("_step", "_waiting_on")

    def __init__(self, step: Coroutine[Any, Any, T], waiting_on: Any) -> None:
        self._step = step
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, T]:
        step, waiting_on = self._step, self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except GeneratorExit:
                step.close()
                raise
            except BaseException as exc:  # thrown into the awaiting task: the step gets it
                try:
                    waiting_on = step.throw(exc)
                except StopIteration as done:
                    result: T = done.value
                    return result
            else:
                try:
                    waiting_on = step.send(sent)
                except StopIteration as done:
                    result = done.value
                    return result


def _run_now(step: Coroutine[Any, Any, T], context: contextvars.Context) -> T | _Rest[T]:
    """Run ``step`` now, in the pump's turn, in its reader's context; what is left if it waits."""
    try:
        waiting_on = context.run(step.send, None)
    except StopIteration as done:
        result: T = done.value
        return result
    return _Rest(step, waiting_on)


@dataclass(slots=True)
class _FirstAnswer:
    """A reader's first write for the pump to run, and the future its task waits on meanwhile."""

    write: FirstWrite
    future: asyncio.Future[int | _Rest[int]]
    context: contextvars.Context


@dataclass(slots=True, eq=False)
class _Feed:
    """An upstream body being read into a :class:`SharedBody` by its one reader's task.

    While the body is the reader's (``SharedBody._feed`` is this feed), the reader reads each
    chunk when it wants the next: no pump task, no hand-over between two tasks per chunk (in
    bench_peers' segment relay, ~4 % less CPU per 2 MiB than a pump and a reader, 8 interleaved
    rounds). Once a second reader joins, or the one reader leaves before the end, a pump takes
    the feed over and reads at the upstream's pace, so a slow viewer again slows only itself.
    """

    key: str
    source: BodySource
    on_complete: OnComplete | None
    owner: SharedBodies
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by whoever reads the source: a pump taking over waits for a read in progress."""


class _Meter:
    """Bytes held in memory by a set of shared bodies (chunks not yet dropped or released)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


class SharedBody:
    """One upstream body and the readers following it."""

    def __init__(
        self, window_bytes: int, meter: _Meter | None = None, turn: TurnBudget | None = None
    ) -> None:
        self._window = window_bytes
        self._meter = meter if meter is not None else _Meter()
        # Readers let go after their first write count against it, as chunks relayed do.
        self._turn = turn if turn is not None else TurnBudget(0)
        self._counted = 0  # bytes of this body in the meter
        self._pumped = False  # the pump is over: nothing more will arrive
        self._chunks: list[bytes | memoryview] = []
        self._first = 0  # absolute index of _chunks[0] (chunks before it were dropped)
        self._unread_from = 0  # byte offset of _chunks[0]
        self.size = 0
        self._readers: dict[BodyReader, int] = {}
        self._more = asyncio.Event()
        self._room = asyncio.Event()
        # An event, not a future: a crowd waits on it, and a future would need a shield per
        # waiter (one waiter cancelled must not cancel it for all), two callbacks per wake-up.
        self._head_ready = asyncio.Event()
        self._head: BodyHead | None = None
        self._head_waiters = 0
        # Readers waiting for the first chunk with steps for the pump to run.
        self._first_writes: dict[BodyReader, _FirstAnswer] = {}
        self.done = False
        self.error: HlsRelayError | None = None
        self.spilled = False
        # The upstream while its one reader reads it itself (None once a pump does, or done).
        self._feed: _Feed | None = None

    # -- the reader side ----------------------------------------------------------------------

    def reader(self) -> BodyReader:
        """A new reader from the first byte (only before the body spilled)."""
        if self.spilled:
            raise RuntimeError("a spilled body takes no new readers")
        reader = BodyReader(self)
        self._readers[reader] = self._first
        return reader

    @property
    def readers(self) -> int:
        return len(self._readers)

    async def head(self) -> BodyHead:
        """The upstream's status and headers, once in; the body's error if it failed first."""
        if self._head is None and self.error is None:
            self._head_waiters += 1
            try:
                await self._head_ready.wait()
            finally:
                self._head_waiters -= 1
        if self._head is None:
            assert self.error is not None
            raise self.error
        return self._head

    def _bytes_or_end(self) -> bool:
        return bool(self._chunks or self._first or self.done or self.error is not None)

    async def _first_write(self, reader: BodyReader, write: FirstWrite) -> int:
        if self._bytes_or_end() or self._feed is not None:
            # Bytes are there (or never will be), or its one reader reads the body itself: the
            # reader writes its first bytes itself.
            return 0
        future: asyncio.Future[int | _Rest[int]] = asyncio.get_running_loop().create_future()
        self._first_writes[reader] = _FirstAnswer(write, future, contextvars.copy_context())
        try:
            taken = await future
        finally:
            self._first_writes.pop(reader, None)
        if isinstance(taken, _Rest):
            # A write that waited in the pump's turn: finished here, in the reader's own task.
            rest = await taken
            reader._skip = min(max(rest, 0), len(self._chunks[0]) if self._chunks else 0)
            return reader._skip
        return taken

    async def _next(self, reader: BodyReader) -> bytes | memoryview | None:
        while True:
            position = self._readers[reader]
            index = position - self._first
            if index < len(self._chunks):
                self._readers[reader] = position + 1
                if self.spilled:
                    self._room.set()
                return self._chunks[index]
            if self.error is not None:
                raise self.error
            if self.done:
                return None
            feed = self._feed
            if feed is not None:
                await feed.owner._pull(self, feed)  # the one reader reads the upstream itself
                continue
            more = self._more
            await more.wait()

    def _bytes_ready(self, reader: BodyReader) -> bool:
        if self._readers[reader] - self._first < len(self._chunks):
            return True
        feed = self._feed
        return feed is not None and not feed.lock.locked() and feed.source.bytes_ready()

    def _leave(self, reader: BodyReader) -> None:
        self._first_writes.pop(reader, None)
        if self._readers.pop(reader, None) is not None:
            self._room.set()
            feed = self._feed
            if feed is not None:
                # Its one reader left before the end: a pump finishes the body (to store it) or
                # drops the upstream (a spilled one), as it would have had it read it all along.
                feed.owner._pump_from_now(self, feed)
            self._release_if_unused()

    def _uncount(self, size: int) -> None:
        self._meter.held -= size
        self._counted -= size

    def _release_if_unused(self) -> None:
        """Pump over and no reader left: the chunks go (a stored copy lives in the store)."""
        if self._pumped and not self._readers and self._counted:
            self._chunks = []
            self._uncount(self._counted)

    # -- the pump side ------------------------------------------------------------------------

    def _set_head(self, head: BodyHead) -> None:
        if self._head is None and self.error is None:
            self._head = head
            self._head_ready.set()

    def _wake(self) -> None:
        more, self._more = self._more, asyncio.Event()
        more.set()

    def _append(self, chunk: bytes | memoryview) -> None:
        self._chunks.append(chunk)
        self.size += len(chunk)
        self._meter.held += len(chunk)
        self._counted += len(chunk)
        if self._first_writes:
            self._write_firsts(chunk)
        self._wake()

    def _write_firsts(self, chunk: bytes | memoryview) -> None:
        """Run the first write of every reader waiting for this, the body's first chunk."""
        writes, self._first_writes = self._first_writes, {}
        view = memoryview(chunk)
        written: list[tuple[asyncio.Future[int | _Rest[int]], int | _Rest[int]]] = []
        for reader, answer in writes.items():
            future = answer.future
            if future.done() or self._readers.get(reader) != 0:
                continue  # it left, or its task was cancelled: nothing to write to
            try:
                taken = _run_now(answer.write(view), answer.context)
            except Exception as exc:
                # That reader's own failure (its viewer left, say): raised in its own task.
                future.set_exception(exc)
                continue
            if isinstance(taken, _Rest):
                written.append((future, taken))
                continue
            reader._skip = min(max(taken, 0), len(chunk))
            written.append((future, reader._skip))
        self._let_go(written)

    def _let_go(
        self, written: list[tuple[asyncio.Future[int | _Rest[int]], int | _Rest[int]]]
    ) -> None:
        """Wake the readers whose first bytes are out, a turn's worth at a time.

        Each goes on with its answer when woken (aiohttp's response prepared, its next slice
        written): 500 woken together made one turn of 30-35 ms after the 12-15 ms of first
        writes, a stall of 40-50 ms for everything else on the loop (bench_peers case 6).
        """
        turn = self._turn
        for index, (future, result) in enumerate(written):
            if not future.done():
                future.set_result(result)
            if turn.take() and index + 1 < len(written):
                # The rest in the next turns (the budget's new turn begins before this runs).
                asyncio.get_running_loop().call_soon(self._let_go, written[index + 1 :])
                return

    def _finish(self) -> None:
        self.done = True
        # No first chunk came (an empty body): the readers waiting for one answer themselves.
        writes, self._first_writes = self._first_writes, {}
        for answer in writes.values():
            if not answer.future.done():
                answer.future.set_result(0)
        self._wake()

    def _fail(self, error: HlsRelayError) -> None:
        self.error = error
        self._head_ready.set()
        writes, self._first_writes = self._first_writes, {}
        for answer in writes.values():
            if not answer.future.done():
                answer.future.set_exception(error)
        self._wake()

    def parts(self) -> tuple[bytes | memoryview, ...]:
        """The whole body as the chunks it arrived in (no copy of their bytes)."""
        return tuple(self._chunks)

    def _drop_passed(self) -> None:
        """Spilled: drop the chunks every reader has passed."""
        slowest = min(self._readers.values())
        drop = slowest - self._first
        if drop > 0:
            dropped = sum(len(c) for c in self._chunks[:drop])
            self._unread_from += dropped
            self._uncount(dropped)
            del self._chunks[:drop]
            self._first = slowest

    async def _wait_for_room(self) -> None:
        """Spilled: drop what every reader has passed; wait while too much is unread."""
        while self._readers:
            self._drop_passed()
            if self.size - self._unread_from <= self._window:
                return
            self._room.clear()
            await self._room.wait()


class BodyReader:
    """One reader of a :class:`SharedBody`; iterate it for the chunks, ``close()`` when done."""

    __slots__ = ("_body", "_skip")

    def __init__(self, body: SharedBody) -> None:
        self._body = body
        self._skip = 0  # bytes of the next chunk a first write already took

    async def head(self) -> BodyHead:
        return await self._body.head()

    @property
    def known_head(self) -> BodyHead | None:
        """The upstream's status and headers if they are in (always, once a chunk is)."""
        return self._body._head

    async def first_bytes(self, write: FirstWrite) -> int:
        """Have the pump run ``write`` on the body's first chunk, with every other waiting
        reader's (the head is in by then: :attr:`known_head`).

        Returns how many bytes ``write`` took; iterating then goes on with the rest of that
        chunk. Returns 0 without running ``write`` when bytes are already there (a late joiner),
        or never will be: the reader then writes them itself. Raises the body's error, or
        whatever ``write`` raised.
        """
        return await self._body._first_write(self, write)

    @property
    def shared(self) -> bool:
        """Other readers follow the same body now."""
        return self._body.readers > 1

    @property
    def readers(self) -> int:
        """How many readers follow the same body now, this one included."""
        return self._body.readers

    def bytes_ready(self) -> bool:
        """Whether the next chunk's bytes are here: taking them would not wait. A reader that
        will wait anyway need not yield to be fair to others; nor one whose body is over (or
        failed), with only the end left to take: a yield would cost a step for nothing."""
        return self._body._bytes_ready(self)

    def __aiter__(self) -> BodyReader:
        return self

    async def __anext__(self) -> bytes | memoryview:
        while True:
            chunk = await self._body._next(self)
            if chunk is None:
                raise StopAsyncIteration
            if not self._skip:
                return chunk
            skip, self._skip = self._skip, 0
            if skip < len(chunk):
                return memoryview(chunk)[skip:]  # the rest, not a copy

    def close(self) -> None:
        self._body._leave(self)


class SharedBodies:
    """The bodies in flight in this process, by cache key."""

    def __init__(
        self,
        tasks: BackgroundTasks,
        max_object_bytes: int,
        window_bytes: int,
        *,
        held_bytes: int | None = None,
        pressure_window_bytes: int | None = None,
        turn_chunks: int = 0,
        turn_cpu_s: float = 0.0,
    ) -> None:
        self._tasks = tasks
        self._limit = max_object_bytes
        self._window = max(window_bytes, 1)
        self._held_limit = held_bytes
        self._pressure_window = max(1, min(pressure_window_bytes or window_bytes, window_bytes))
        self._meter = _Meter()
        self._bodies: dict[str, SharedBody] = {}
        self._turn = TurnBudget(turn_chunks, turn_cpu_s)

    @property
    def turn(self) -> TurnBudget:
        """The turn budget of every media body relayed from an upstream: these, and the ones a
        viewer reads alone (ranged requests, :func:`proxy.web.streams._relay_media`)."""
        return self._turn

    @property
    def held(self) -> int:
        """Bytes all shared bodies hold in memory now (in flight, or still being read)."""
        return self._meter.held

    def __len__(self) -> int:
        return len(self._bodies)

    def __contains__(self, key: str) -> bool:
        return key in self._bodies

    def join(self, key: str) -> BodyReader | None:
        """A reader of the body in flight for ``key``, or None."""
        body = self._bodies.get(key)
        if body is None:
            return None
        reader = body.reader()
        feed = body._feed
        if feed is not None:
            self._pump_from_now(body, feed)  # two readers now: each at its own pace
        return reader

    def start(self, key: str, opener: Opener, on_complete: OnComplete | None = None) -> SharedBody:
        """Start fetching ``key`` in the background (there must be no flight for it)."""
        body = SharedBody(self._window, self._meter, self._turn)
        self._bodies[key] = body
        self._tasks.spawn(self._open_and_pump(key, body, opener, on_complete), name="shared-body")
        return body

    async def open(
        self, key: str, opener: Opener, on_complete: OnComplete | None = None
    ) -> BodyReader:
        """Start fetching ``key`` for a viewer, and return that viewer's reader (see
        :meth:`open_or_take`)."""
        opened = await self.open_or_take(key, opener, on_complete)
        assert isinstance(opened, BodyReader)
        return opened

    async def open_or_take(
        self,
        key: str,
        opener: Opener,
        on_complete: OnComplete | None = None,
        take_alone: Callable[[BodySource], bool] | None = None,
    ) -> BodyReader | BodySource:
        """Start fetching ``key`` for a viewer, and return that viewer's reader; or the source
        itself, for the viewer to relay alone, when ``take_alone`` says so of a body spilled as
        it opened with this one viewer (memory short: nobody may join it, it is not stored), so
        that no pump and no chunk of it is needed here at all.

        The upstream request is made in the caller's own task, up to the response headers. A
        task spawned here would run only after every request already queued in this loop turn
        (a crowd of hundreds arriving at once), delaying the one upstream request they all wait
        for. If others joined meanwhile, a pump reads the body; if not, this reader does
        (:class:`_Feed`) until someone joins.
        """
        body = SharedBody(self._window, self._meter, self._turn)
        self._bodies[key] = body
        reader = body.reader()
        try:
            source = await opener()
        except HlsRelayError as exc:
            reader.close()
            body._fail(exc)
            self._forget(key, body)
            raise
        except BaseException:
            # This viewer left (or a bug) while the upstream was being asked; the others joined
            # for this body still want it, so a background task asks again.
            reader.close()
            if body.readers:
                self._tasks.spawn(
                    self._open_and_pump(key, body, opener, on_complete), name="shared-body"
                )
            else:
                body._fail(UpstreamUnreachable("upstream fetch was abandoned"))
                self._forget(key, body)
            raise
        feed = _Feed(key, source, on_complete, self)
        if body.readers > 1:
            self._tasks.spawn(self._pump(body, feed, begin=True), name="shared-body")
            return reader
        self._begin(body, feed)
        if body.spilled and take_alone is not None and body.readers == 1 and take_alone(source):
            # The flight ends here (spilled, it was forgotten already): its one reader goes,
            # and the source with it, to its viewer.
            body._pumped = True
            reader.close()
            return source
        if body.spilled:
            # Memory was short from the start (many bodies at once, most with slow viewers): a
            # pump, which keeps the upstream's buffers drained into the body's small window.
            # Read by their viewers' tasks, 500 such bodies peaked 10-20 MB higher (bench_peers
            # case 7: 190-202 MB against 168-179 MB, interleaved runs), most likely the read
            # buffers of upstreams read only when their slow viewer wants more.
            self._pump_from_now(body, feed)
        else:
            body._feed = feed
        return reader

    def _forget(self, key: str, body: SharedBody) -> None:
        if self._bodies.get(key) is body:
            del self._bodies[key]

    async def _open_and_pump(
        self, key: str, body: SharedBody, opener: Opener, on_complete: OnComplete | None
    ) -> None:
        try:
            source = await opener()
        except HlsRelayError as exc:
            body._fail(exc)
            self._forget(key, body)
            return
        except BaseException:
            body._fail(UpstreamUnreachable("upstream fetch was abandoned"))
            self._forget(key, body)
            raise
        await self._pump(body, _Feed(key, source, on_complete, self), begin=True)

    def _begin(self, body: SharedBody, feed: _Feed) -> None:
        body._set_head(feed.source.head)
        if self._under_pressure():
            self._spill_under_pressure(feed.key, body, feed.source)

    def _pump_from_now(self, body: SharedBody, feed: _Feed) -> None:
        """A pump reads ``body`` from now on, instead of its one reader."""
        body._feed = None
        self._tasks.spawn(self._pump(body, feed), name="shared-body")

    def _took(self, body: SharedBody, feed: _Feed, chunk: bytes | memoryview) -> None:
        """A chunk read from the upstream: to the readers; spilled if too big, or memory short."""
        body._append(chunk)
        if not body.spilled:
            if body.size > self._limit:
                self._spill(feed.key, body, self._window)  # too big to share or store
            elif self._under_pressure():
                self._spill_under_pressure(feed.key, body, feed.source)

    async def _pull(self, body: SharedBody, feed: _Feed) -> None:
        """The one reader's read of the next chunk (or of the end, or of the failure)."""
        async with feed.lock:
            if body._feed is not feed:
                return  # a pump took over while this reader waited: it reads from now on
            try:
                chunk = await feed.source.read_chunk()
            except HlsRelayError as exc:
                body._feed = None
                body._fail(exc)
                await self._end(body, feed, complete=False)
                return
            if not chunk:
                body._feed = None
                await self._end(body, feed, complete=True)
                return
            self._took(body, feed, chunk)
        if body.spilled:
            body._drop_passed()  # its reader has passed all but this chunk: nothing to wait for
        # Behind the readers already waiting for a turn, if any: a reader that reads its own
        # upstream would otherwise take every new turn from them, whenever its socket has
        # bytes (bench_peers' segment relay, two sets of 8 interleaved rounds: p99 386 and 340
        # against 492 and 384 ms, throughput within the noise; pumps are not held so: with
        # them too, case 7's 500 slow viewers peaked at 192 MB against 172).
        if self._turn.must_wait(turn_items(len(chunk))):
            await self._turn.next()

    async def _pump(self, body: SharedBody, feed: _Feed, *, begin: bool = False) -> None:
        complete = False
        turn = self._turn
        async with feed.lock:
            if begin:
                self._begin(body, feed)
                if body._head_waiters > 1:
                    # A crowd waits for the head: one turn, so its readers can hand over their
                    # first writes before a first chunk that is already here.
                    await asyncio.sleep(0)
            if body.done or body.error is not None:
                return  # its reader read it to the end (or the failure) before this pump ran
            try:
                while True:
                    if body.spilled:
                        await body._wait_for_room()
                        if not body.readers:
                            break  # nobody left to read it, and it will not be stored
                    chunk = await feed.source.read_chunk()
                    if not chunk:
                        complete = True
                        break
                    self._took(body, feed, chunk)
                    if turn.take(turn_items(len(chunk))):
                        await turn.next()
            except HlsRelayError as exc:
                body._fail(exc)
            except asyncio.CancelledError:
                body._fail(UpstreamUnreachable("upstream fetch was cancelled"))
                raise
            finally:
                await self._end(body, feed, complete=complete)

    async def _end(self, body: SharedBody, feed: _Feed, *, complete: bool) -> None:
        """The body's end: the upstream handed back (or dropped), stored if whole."""
        source = feed.source
        if complete:
            source.finish()
        else:
            source.abort()
            if body.error is None:
                body._fail(UpstreamUnreachable("upstream fetch was abandoned"))
        try:
            if complete:
                body._finish()
                if feed.on_complete is not None and not body.spilled:
                    # The flight stays findable until the entry is stored: no gap between.
                    await feed.on_complete(source.head, body.parts())
        finally:
            self._forget(feed.key, body)
            body._pumped = True
            body._release_if_unused()

    def _under_pressure(self) -> bool:
        return self._held_limit is not None and self._meter.held > self._held_limit

    def _spill_under_pressure(self, key: str, body: SharedBody, source: BodySource) -> None:
        self._spill(key, body, self._pressure_window)
        # Each buffer on the way (this body, the viewer's transport) then holds about one chunk:
        # small chunks keep hundreds of slow streams small.
        source.limit_chunks(self._pressure_window)

    def _spill(self, key: str, body: SharedBody, window: int) -> None:
        """From now on ``body`` is only streamed to its readers: no joiners, not stored."""
        body.spilled = True
        body._window = window
        self._forget(key, body)


__all__ = [
    "BodyHead",
    "BodyReader",
    "BodySource",
    "FirstWrite",
    "OnComplete",
    "Opener",
    "SharedBodies",
    "SharedBody",
]

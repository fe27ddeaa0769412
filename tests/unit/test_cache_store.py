"""The cache mechanisms alone: LRU byte budget, entry format, single-flight, shared bodies."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter, deque
from collections.abc import Awaitable, Callable

import pytest

from proxy.cache.inflight import (
    BodyHead,
    FirstWrite,
    SharedBodies,
    SharedBody,
)
from proxy.cache.singleflight import SingleFlight
from proxy.cache.store import (
    CachedObject,
    EntrySerializer,
    LruMemoryCache,
    ObjectStore,
    cache_key,
)
from proxy.cache.tasks import BackgroundTasks
from proxy.errors import UpstreamUnreachable


def entry(body: bytes, fresh_for: float = 10.0) -> CachedObject:
    return CachedObject(body, (("Content-Type", "video/mp2t"),), 1000.0, fresh_for)


async def test_lru_keeps_to_its_byte_budget_and_evicts_least_recently_used() -> None:
    cache = LruMemoryCache(max_bytes=3 * (100 + 256))
    store = ObjectStore(cache, backend="memory")
    for name in ("a", "b", "c"):
        await store.set(name, entry(name.encode() * 100), ttl=60)
    assert await store.get("a") is not None  # "a" is now the most recently used
    await store.set("d", entry(b"d" * 100), ttl=60)
    assert await store.get("b") is None  # the least recently used went
    assert {k for k in ("a", "c", "d") if await store.get(k)} == {"a", "c", "d"}
    assert store.entries == 3 and store.bytes <= cache.max_bytes
    assert cache.evictions == 1


async def test_lru_refuses_an_object_larger_than_the_budget_and_honours_ttl() -> None:
    store = ObjectStore(LruMemoryCache(max_bytes=1000), backend="memory")
    await store.set("big", entry(b"x" * 2000), ttl=60)
    assert await store.get("big") is None and store.bytes == 0
    await store.set("short", entry(b"x"), ttl=0.05)
    assert await store.get("short") is not None
    await asyncio.sleep(0.06)
    assert await store.get("short") is None and store.bytes == 0


async def test_zero_budget_stores_nothing() -> None:
    store = ObjectStore(LruMemoryCache(max_bytes=0), backend="memory")
    await store.set("k", entry(b"x"), ttl=60)
    assert await store.get("k") is None


def test_entry_serializer_round_trips_bytes_exactly() -> None:
    original = CachedObject(
        bytes(range(256)) * 3,
        (("Content-Type", "application/vnd.apple.mpegurl"), ("ETag", '"abc"')),
        1700000000.25,
        3.0,
        b"\x1f\x8b gzip",
    )
    serializer = EntrySerializer()
    assert serializer.encoding is None  # raw bytes to and from Redis, never text
    assert serializer.loads(serializer.dumps(original)) == original
    assert serializer.loads(None) is None
    assert serializer.loads(b"not an entry") is None
    assert serializer.loads(b"HR1\x00\x00\x00\x05{bad") is None


def test_cache_keys_are_hashes() -> None:
    key = cache_key("md", "ctx-token", "https://cdn.example.com/seg1.ts?token=secret")
    assert "cdn.example.com" not in key and "secret" not in key
    assert key.startswith("hlsrelay:1:md:")
    assert key != cache_key("md", "other-ctx", "https://cdn.example.com/seg1.ts?token=secret")


async def test_single_flight_runs_the_factory_once_and_survives_the_leader_leaving() -> None:
    tasks = BackgroundTasks()
    flight: SingleFlight[int] = SingleFlight(tasks, "test")
    calls = 0
    release = asyncio.Event()

    async def factory() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    leader = asyncio.ensure_future(flight.coalesce("k", factory))
    await asyncio.sleep(0)
    followers = [asyncio.ensure_future(flight.coalesce("k", factory)) for _ in range(5)]
    await asyncio.sleep(0)
    leader.cancel()
    release.set()
    results = await asyncio.gather(*followers)
    assert results == [(42, False)] * 5 and calls == 1
    assert len(flight) == 0
    await tasks.close()


async def test_single_flight_hands_every_caller_the_error() -> None:
    tasks = BackgroundTasks()
    flight: SingleFlight[int] = SingleFlight(tasks, "test")

    async def factory() -> int:
        await asyncio.sleep(0.01)
        raise UpstreamUnreachable("down")

    results = await asyncio.gather(
        *(flight.coalesce("k", factory) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, UpstreamUnreachable) for r in results)
    await tasks.close()


class _Chunks(asyncio.Queue[bytes | None]):
    """A queue whose next item can be looked at (its storage set up as asyncio.Queue's own
    ``_init`` does, so the type is known)."""

    def _init(self, maxsize: int) -> None:
        self._queue: deque[bytes | None] = deque()

    def next_is_bytes(self) -> bool:
        return bool(self._queue) and self._queue[0] is not None


class FakeSource:
    """A body source fed by the test (the real one is an upstream response: see integration)."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None) -> None:
        self.head = BodyHead(200, (), None)
        self.queue = _Chunks()
        for chunk in chunks:
            self.queue.put_nowait(chunk)
        self.fail_after = fail_after
        self.finished = self.aborted = False
        self.chunk_limit: int | None = None
        self.count = 0

    async def read_chunk(self) -> bytes:
        chunk = await self.queue.get()
        if chunk is None:
            return b""
        if self.fail_after is not None and self.count == self.fail_after:
            raise UpstreamUnreachable("upstream body was cut short")
        self.count += 1
        return chunk

    def bytes_ready(self) -> bool:
        # Bytes, not the end (None) and not the failure the next read would raise.
        return self.queue.next_is_bytes() and self.count != self.fail_after

    def abort(self) -> None:
        self.aborted = True

    def finish(self) -> None:
        self.finished = True

    def limit_chunks(self, size: int) -> None:
        self.chunk_limit = size


async def test_late_joiner_reads_what_arrived_then_follows() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"one", b"two"])
    stored: list[bytes] = []

    async def opener() -> FakeSource:
        return source

    async def on_complete(head: BodyHead, parts: tuple[bytes, ...]) -> None:
        stored.append(b"".join(parts))

    first = bodies.start("k", opener, on_complete).reader()
    assert await first.head() == source.head
    got_first = [await first.__anext__(), await first.__anext__()]
    late = bodies.join("k")
    assert late is not None
    source.queue.put_nowait(b"three")
    source.queue.put_nowait(None)
    got_first += [chunk async for chunk in first]
    got_late = [chunk async for chunk in late]
    assert got_first == got_late == [b"one", b"two", b"three"]
    await asyncio.sleep(0)
    assert stored == [b"onetwothree"] and source.finished
    assert bodies.join("k") is None
    await tasks.close()


async def test_failed_body_aborts_every_reader_and_is_not_stored() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"a", b"b", b"c", None], fail_after=2)
    stored: list[bytes] = []

    async def opener() -> FakeSource:
        return source

    async def on_complete(head: BodyHead, parts: tuple[bytes, ...]) -> None:
        stored.append(b"".join(parts))

    body = bodies.start("k", opener, on_complete)
    readers = [body.reader() for _ in range(3)]
    for reader in readers:
        with pytest.raises(UpstreamUnreachable):
            async for _ in reader:
                pass
    assert stored == [] and source.aborted
    assert bodies.join("k") is None
    await tasks.close()


async def test_spilled_body_stays_within_its_window_and_takes_no_joiners() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=10, window_bytes=8)
    source = FakeSource([b"x" * 4] * 10 + [None])

    async def opener() -> FakeSource:
        return source

    body = bodies.start("k", opener)
    reader = body.reader()
    first = await reader.__anext__()
    await asyncio.sleep(0.01)
    # The pump stopped once 8 bytes were unread by the slowest reader, and dropped what it had read.
    assert body.spilled and bodies.join("k") is None
    assert body.size - body._unread_from <= 8 + 4
    rest = [chunk async for chunk in reader]
    assert b"".join([first, *rest]) == b"x" * 40
    reader.close()
    await tasks.close()


async def test_bodies_kept_whole_stay_within_the_held_budget() -> None:
    """Many slow readers on different bodies: past held_bytes, bodies spill with a small window."""
    tasks = BackgroundTasks()
    bodies = SharedBodies(
        tasks, max_object_bytes=1000, window_bytes=100, held_bytes=20, pressure_window_bytes=8
    )
    sources = [FakeSource([b"x" * 4] * 10 + [None]) for _ in range(5)]
    stored: list[bytes] = []

    async def on_complete(head: BodyHead, parts: tuple[bytes, ...]) -> None:
        stored.append(b"".join(parts))

    readers = []
    for number, source in enumerate(sources):

        async def opener(source: FakeSource = source) -> FakeSource:
            return source

        readers.append(bodies.start(f"k{number}", opener, on_complete).reader())
    await asyncio.sleep(0.01)  # every pump runs as far as it may; nobody has read a byte
    in_memory = [r._body.size - r._body._unread_from for r in readers]
    assert bodies.held == sum(in_memory)
    # The budget (plus the chunk that crossed it), then the pressure window (plus a chunk) each.
    assert bodies.held <= (20 + 4) + 4 * (8 + 4)
    spilled = [r._body for r in readers if r._body.spilled]
    assert spilled, "the budget must have spilled bodies"
    # Spilled under pressure: small chunks from then on (the pressure window).
    assert [s.chunk_limit for s in sources].count(8) == len(spilled)
    kept = [r._body for r in readers if not r._body.spilled]
    # A body started while over the budget is streamed through from its first byte.
    late_source = FakeSource([b"z" * 4, None])

    async def late_opener() -> FakeSource:
        return late_source

    late = bodies.start("late", late_opener, on_complete)
    late_reader = late.reader()
    await asyncio.sleep(0)
    assert late.spilled and late_source.chunk_limit == 8 and bodies.join("late") is None
    assert [chunk async for chunk in late_reader] == [b"z" * 4]
    late_reader.close()
    for reader in readers:
        assert b"".join([chunk async for chunk in reader]) == b"x" * 40
        reader.close()
    await asyncio.sleep(0)
    # Bodies kept whole are still stored; spilled ones are not, and nothing stays counted.
    assert len(stored) == len(kept) and all(body == b"x" * 40 for body in stored)
    assert bodies.held == 0
    await tasks.close()


async def test_no_held_budget_keeps_every_body_whole() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"y" * 50] * 4)

    async def opener() -> FakeSource:
        return source

    body = bodies.start("k", opener)
    reader = body.reader()
    await asyncio.sleep(0.01)
    assert not body.spilled and bodies.held == 200
    source.queue.put_nowait(None)
    assert b"".join([chunk async for chunk in reader]) == b"y" * 200
    await asyncio.sleep(0)
    assert bodies.held == 200  # its reader has not let go yet
    reader.close()
    assert bodies.held == 0
    await tasks.close()


# -- first writes: the pump lets a crowd go in one loop ------------------------------------------


class Crowd:
    """Readers of one body that each hand the pump a first write, then read the rest."""

    def __init__(self, body: SharedBody) -> None:
        self.body = body
        self.events: list[tuple[str, int]] = []
        self.first_rest: list[type] = []  # what each reader got after its first write

    def write_taking(self, number: int, size: int) -> Callable[[memoryview], Awaitable[int]]:
        async def write(view: memoryview) -> int:
            self.events.append(("write", number))
            return min(size, len(view))

        return write

    async def viewer(
        self, number: int, write: FirstWrite | None = None, *, at_once: bool = False
    ) -> tuple[int, list[bytes]]:
        """``at_once``: hand over the first write without waiting for the head first (as
        web/streams.py does)."""
        reader = self.body.reader()
        try:
            if not at_once:
                await reader.head()
            taken = await reader.first_bytes(write or self.write_taking(number, 2))
            self.events.append(("resumed", number))
            rest: list[bytes] = []
            async for chunk in reader:
                if not rest:
                    self.first_rest.append(type(chunk))
                rest.append(bytes(chunk))
            return taken, rest
        finally:
            reader.close()


async def opened(source: FakeSource) -> FakeSource:
    return source


async def test_pump_runs_every_waiting_readers_first_write_before_any_reader_resumes() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([])
    crowd = Crowd(bodies.start("k", lambda: opened(source)))
    viewers = [asyncio.ensure_future(crowd.viewer(n)) for n in range(4)]
    await asyncio.sleep(0.01)  # every viewer waits for the first chunk
    assert crowd.events == []
    for chunk in (b"abcdef", b"gh", None):
        source.queue.put_nowait(chunk)
    results = await asyncio.gather(*viewers)
    assert crowd.events[:4] == [("write", n) for n in range(4)]
    assert sorted(crowd.events[4:]) == [("resumed", n) for n in range(4)]
    assert results == [(2, [b"cdef", b"gh"])] * 4
    assert crowd.first_rest == [memoryview] * 4  # the rest of the first chunk, not a copy
    await tasks.close()


async def test_a_crowd_let_go_resumes_a_turn_budget_at_a_time() -> None:
    """Every first write in the pump's one loop; then the readers resume at most ``turn_chunks``
    per event-loop turn (500 at once made one turn of 30-35 ms in bench_peers case 6)."""
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100, turn_chunks=3)
    source = FakeSource([])
    crowd = Crowd(bodies.start("k", lambda: opened(source)))
    turns = [0]

    def count_turn() -> None:
        turns[0] += 1
        if not all(viewer.done() for viewer in viewers):
            asyncio.get_running_loop().call_soon(count_turn)

    turn_of: dict[int, int] = {}

    class Events(list[tuple[str, int]]):
        def append(self, event: tuple[str, int]) -> None:
            if event[0] == "resumed":
                turn_of[event[1]] = turns[0]
            super().append(event)

    crowd.events = Events()
    viewers = [asyncio.ensure_future(crowd.viewer(n)) for n in range(8)]
    await asyncio.sleep(0.01)
    count_turn()
    for chunk in (b"abcdef", b"gh", None):
        source.queue.put_nowait(chunk)
    results = await asyncio.gather(*viewers)
    assert results == [(2, [b"cdef", b"gh"])] * 8
    writes = [event for event in crowd.events if event[0] == "write"]
    assert crowd.events[:8] == writes == [("write", n) for n in range(8)]
    per_turn = Counter(turn_of.values())
    assert sorted(turn_of) == list(range(8))
    assert max(per_turn.values()) <= 3
    assert len(per_turn) >= 3  # 8 readers, 3 a turn
    await tasks.close()


async def test_a_first_write_that_takes_the_whole_chunk_goes_on_with_the_next() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([])
    crowd = Crowd(bodies.start("k", lambda: opened(source)))
    viewer = asyncio.ensure_future(crowd.viewer(0, crowd.write_taking(0, 100)))
    await asyncio.sleep(0.01)
    for chunk in (b"abc", b"def", None):
        source.queue.put_nowait(chunk)
    assert await viewer == (3, [b"def"])
    await tasks.close()


async def test_a_late_joiner_writes_its_first_bytes_itself() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"abc"])
    crowd = Crowd(bodies.start("k", lambda: opened(source)))
    await asyncio.sleep(0.01)  # the first chunk is in
    late = asyncio.ensure_future(crowd.viewer(7))
    await asyncio.sleep(0.01)
    source.queue.put_nowait(None)
    assert await late == (0, [b"abc"])
    assert ("write", 7) not in crowd.events  # never run: there was nothing to wait for
    await tasks.close()


async def test_readers_that_left_or_failed_do_not_hold_up_the_others() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([])
    crowd = Crowd(bodies.start("k", lambda: opened(source)))
    closed: list[str] = []

    async def failing(view: memoryview) -> int:
        raise ConnectionResetError("viewer gone")

    async def waiting(view: memoryview) -> int:
        try:
            await asyncio.sleep(0)  # waits in the pump's turn: its own task finishes it
        finally:
            closed.append("waiting")
        return 1

    viewers = [
        asyncio.ensure_future(crowd.viewer(0)),
        asyncio.ensure_future(crowd.viewer(1)),  # cancelled while it waits
        asyncio.ensure_future(crowd.viewer(2, failing)),
        asyncio.ensure_future(crowd.viewer(3, waiting)),
        asyncio.ensure_future(crowd.viewer(4)),
    ]
    await asyncio.sleep(0.01)
    viewers[1].cancel()
    await asyncio.sleep(0)
    for chunk in (b"abcdef", None):
        source.queue.put_nowait(chunk)
    results = await asyncio.gather(*viewers, return_exceptions=True)
    assert results[0] == results[4] == (2, [b"cdef"])
    assert isinstance(results[1], asyncio.CancelledError)
    assert isinstance(results[2], ConnectionResetError)
    assert results[3] == (1, [b"bcdef"]) and closed == ["waiting"]
    assert ("write", 1) not in crowd.events
    assert crowd.body.readers == 0
    await tasks.close()


async def test_a_body_that_fails_before_its_first_chunk_fails_every_first_write() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([], fail_after=0)
    crowd = Crowd(bodies.start("k", lambda: opened(source)))
    viewers = [asyncio.ensure_future(crowd.viewer(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    source.queue.put_nowait(b"never sent")
    results = await asyncio.gather(*viewers, return_exceptions=True)
    assert all(isinstance(r, UpstreamUnreachable) for r in results)
    assert crowd.events == [] and source.aborted
    await tasks.close()


async def test_a_crowd_waiting_on_the_head_hands_over_writes_before_a_buffered_chunk() -> None:
    """Headers and the first bytes often come in one read: the crowd still goes in one loop."""
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"abcdef", None])  # the first chunk is there with the headers
    released = asyncio.Event()

    async def slow_opener() -> FakeSource:
        await released.wait()
        return source

    crowd = Crowd(bodies.start("k", slow_opener))
    viewers = [asyncio.ensure_future(crowd.viewer(n)) for n in range(3)]
    await asyncio.sleep(0.01)  # all three wait for the head
    released.set()
    assert await asyncio.gather(*viewers) == [(2, [b"cdef"])] * 3
    assert crowd.events[:3] == [("write", n) for n in range(3)]
    await tasks.close()


async def test_stored_objects_cost_the_garbage_collector_nothing() -> None:
    """Every full collection walks every tracked object: a store of 100,000 playlists must hold
    only what the collector stops tracking (bytes, strings, numbers and tuples of them)."""
    store = ObjectStore(LruMemoryCache(max_bytes=10_000_000), backend="memory")
    gc.collect()
    before = len(gc.get_objects())
    for i in range(2000):
        await store.set(f"k{i}", entry(b"%d" % i), ttl=60)
    # One young collection is enough: an entry is a flat tuple, nothing nested in it to untrack
    # first (nested tuples reached the oldest generation still tracked, for full collections).
    gc.collect(0)
    assert len(gc.get_objects()) - before < 50
    found = await store.get("k1999")
    assert found == entry(b"1999")


async def _sizes_seen_each_turn(turn_chunks: int) -> tuple[list[int], bytes]:
    """Pump one body whose upstream always has its next chunk ready; the body's size at every
    loop turn meanwhile, and the bytes a reader got."""
    tasks = BackgroundTasks()
    bodies = SharedBodies(
        tasks, max_object_bytes=10**6, window_bytes=10**6, turn_chunks=turn_chunks
    )
    chunks = [bytes([n]) * 10 for n in range(20)]
    source = FakeSource([*chunks, None])

    async def opener() -> FakeSource:
        return source

    body = bodies.start("k", opener)
    reader = body.reader()
    sizes: list[int] = []
    while not body.done:
        sizes.append(body.size)
        await asyncio.sleep(0)
    got = b"".join([bytes(chunk) async for chunk in reader])
    reader.close()
    await tasks.close()
    return sizes, got


async def test_pumps_wait_for_the_next_turn_once_its_chunks_are_taken() -> None:
    # Two chunks a turn: the task sampling the body's size sees it grow two chunks at a time.
    sizes, got = await _sizes_seen_each_turn(2)
    assert got == b"".join(bytes([n]) * 10 for n in range(20))
    assert sorted(set(sizes)) == list(range(0, 201, 20))
    # Without a limit the pump takes every ready chunk in one step.
    sizes, got = await _sizes_seen_each_turn(0)
    assert got == b"".join(bytes([n]) * 10 for n in range(20))
    assert len(set(sizes)) <= 2


async def head_later(source: FakeSource, gate: asyncio.Event) -> FakeSource:
    await gate.wait()  # the upstream's headers are not in yet
    return source


async def test_readers_hand_over_first_writes_before_the_head_or_after_it() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([])
    gate = asyncio.Event()
    crowd = Crowd(bodies.start("k", lambda: head_later(source, gate)))
    viewers = [asyncio.ensure_future(crowd.viewer(n, at_once=True)) for n in range(4)]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.sleep(0.01)
    late = asyncio.ensure_future(crowd.viewer(9, at_once=True))  # the head is in, no bytes yet
    await asyncio.sleep(0.01)
    assert crowd.events == []  # nothing written before the first chunk, nobody resumed
    for chunk in (b"abcdef", None):
        source.queue.put_nowait(chunk)
    results = await asyncio.gather(*viewers, late)
    assert crowd.events[:5] == [("write", n) for n in (0, 1, 2, 3, 9)]
    assert sorted(crowd.events[5:]) == [("resumed", n) for n in (0, 1, 2, 3, 9)]
    assert results == [(2, [b"cdef"])] * 5
    await tasks.close()


async def test_an_empty_body_lets_the_readers_waiting_for_its_first_chunk_go() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([])
    crowd = Crowd(bodies.start("k", lambda: opened(source)))
    viewers = [
        asyncio.ensure_future(crowd.viewer(0)),
        asyncio.ensure_future(crowd.viewer(1, at_once=True)),
    ]
    await asyncio.sleep(0.01)
    source.queue.put_nowait(None)
    results = await asyncio.wait_for(asyncio.gather(*viewers), 5)
    assert results == [(0, []), (0, [])]
    assert not any(e[0] == "write" for e in crowd.events)
    await tasks.close()


# -- a body with one reader is read by that reader's task --------------------------------------


def _stored_into(stored: list[bytes]) -> Callable[[BodyHead, tuple[bytes, ...]], Awaitable[None]]:
    async def on_complete(head: BodyHead, parts: tuple[bytes, ...]) -> None:
        stored.append(b"".join(parts))

    return on_complete


async def _opened(source: FakeSource) -> FakeSource:
    return source


async def test_a_lone_reader_reads_the_upstream_itself_and_the_body_is_stored() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"one", b"two", b"three", None])
    stored: list[bytes] = []
    reader = await bodies.open("k", lambda: _opened(source), _stored_into(stored))
    assert len(tasks) == 0  # no pump: the reader's own task reads the upstream
    assert reader.known_head == source.head  # the head is in when open() returns
    assert await reader.first_bytes(_never_written) == 0  # it writes its first bytes itself
    got = [bytes(chunk) async for chunk in reader]
    reader.close()
    assert got == [b"one", b"two", b"three"] and len(tasks) == 0
    assert stored == [b"onetwothree"] and source.finished and not source.aborted
    assert bodies.join("k") is None and bodies.held == 0
    await tasks.close()


async def test_a_reader_has_bytes_ready_only_when_its_next_read_gives_bytes_at_once() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"one"])
    lone = await bodies.open("k", lambda: _opened(source), None)
    assert lone.bytes_ready()  # "one" is in the upstream's buffer
    assert bytes(await lone.__anext__()) == b"one"
    assert not lone.bytes_ready()  # nothing more in: the relay need not yield, its read waits
    pulling = asyncio.ensure_future(lone.__anext__())
    await asyncio.sleep(0)
    source.queue.put_nowait(b"two")
    late = bodies.join("k")  # a pump now, waiting for the lone read in flight
    assert late is not None and late.bytes_ready()  # "one" is there for it
    assert bytes(await pulling) == b"two"
    assert not lone.bytes_ready()
    source.queue.put_nowait(None)
    assert [bytes(chunk) async for chunk in late] == [b"one", b"two"]
    # The end is in: nothing more to write, so no yield before taking it.
    assert not lone.bytes_ready() and not late.bytes_ready()
    assert [bytes(chunk) async for chunk in lone] == []
    lone.close()
    late.close()
    await tasks.close()


async def test_a_reader_whose_upstream_fails_next_has_no_bytes_ready() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"one", b"two"], fail_after=1)
    lone = await bodies.open("k", lambda: _opened(source), None)
    assert bytes(await lone.__anext__()) == b"one"
    assert not lone.bytes_ready()  # the next read raises: no bytes to write, no yield for it
    with pytest.raises(UpstreamUnreachable):
        await lone.__anext__()
    assert not lone.bytes_ready()
    lone.close()
    await tasks.close()


async def test_a_body_opened_when_memory_is_short_is_read_by_a_pump() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(
        tasks, max_object_bytes=1000, window_bytes=100, held_bytes=5, pressure_window_bytes=4
    )
    holding = FakeSource([b"x" * 10])
    first = await bodies.open("a", lambda: _opened(holding), None)
    await first.__anext__()  # 10 bytes held: past the budget of 5
    assert len(tasks) == 0  # memory was fine when it opened: its reader reads it
    source = FakeSource([b"late", None])
    second = await bodies.open("b", lambda: _opened(source), None)
    assert len(tasks) == 1  # spilled from the start: a pump reads it
    assert [bytes(chunk) async for chunk in second] == [b"late"]
    first.close()
    second.close()
    await tasks.close()


async def test_a_joiner_hands_a_lone_readers_body_to_a_pump() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"one"])
    stored: list[bytes] = []
    first = await bodies.open("k", lambda: _opened(source), _stored_into(stored))
    assert bytes(await first.__anext__()) == b"one"
    pulling = asyncio.ensure_future(first.__anext__())  # the reader waits on the upstream
    await asyncio.sleep(0)
    late = bodies.join("k")
    assert late is not None and len(tasks) == 1  # a pump now, waiting for that read to end
    source.queue.put_nowait(b"two")
    assert bytes(await pulling) == b"two"
    source.queue.put_nowait(b"three")
    source.queue.put_nowait(None)
    # The pump reads on whether or not the first reader goes on: the late one is not held up.
    got_late = [bytes(chunk) async for chunk in late]
    got_first = [bytes(chunk) async for chunk in first]
    assert got_late == [b"one", b"two", b"three"] and got_first == [b"three"]
    first.close()
    late.close()
    await asyncio.sleep(0)
    assert stored == [b"onetwothree"] and source.finished
    await tasks.close()


async def test_a_lone_reader_cancelled_mid_read_leaves_the_body_to_a_pump() -> None:
    """A viewer that leaves while its task waits on the upstream: the read it was in is not
    lost (a plain call, not a generator closed by the cancellation), the pump reads the rest
    and the body is stored for the next viewer."""
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"one"])
    stored: list[bytes] = []
    reader = await bodies.open("k", lambda: _opened(source), _stored_into(stored))

    async def viewer() -> list[bytes]:
        try:
            return [bytes(chunk) async for chunk in reader]
        finally:
            reader.close()

    task = asyncio.ensure_future(viewer())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(tasks) == 1  # the pump
    source.queue.put_nowait(b"two")
    source.queue.put_nowait(None)
    for _ in range(5):
        await asyncio.sleep(0)
    assert stored == [b"onetwo"] and source.finished and bodies.held == 0
    await tasks.close()


async def test_a_lone_readers_upstream_failure_is_its_error_and_nothing_is_stored() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=1000, window_bytes=100)
    source = FakeSource([b"a", b"b", b"c", None], fail_after=2)
    stored: list[bytes] = []
    reader = await bodies.open("k", lambda: _opened(source), _stored_into(stored))
    got: list[bytes] = []

    async def drain() -> None:
        async for chunk in reader:
            got.append(bytes(chunk))

    with pytest.raises(UpstreamUnreachable):
        await drain()
    reader.close()
    assert got == [b"a", b"b"] and stored == [] and source.aborted
    assert bodies.join("k") is None and bodies.held == 0 and len(tasks) == 0
    await tasks.close()


async def test_a_lone_reader_of_a_spilled_body_holds_one_chunk_and_drops_the_upstream() -> None:
    tasks = BackgroundTasks()
    bodies = SharedBodies(tasks, max_object_bytes=25, window_bytes=100)
    source = FakeSource([b"x" * 10 for _ in range(10)])
    stored: list[bytes] = []
    reader = await bodies.open("k", lambda: _opened(source), _stored_into(stored))
    held: list[int] = []
    for _ in range(6):
        await reader.__anext__()
        held.append(bodies.held)
    assert bodies.join("k") is None  # spilled past 25 bytes: no joiners
    assert max(held[3:]) == 10  # past the spill, only the chunk being read is held
    reader.close()  # the viewer leaves before the end: a pump drops the upstream
    for _ in range(3):
        await asyncio.sleep(0)
    assert source.aborted and not source.finished and stored == []
    assert bodies.held == 0
    await tasks.close()


async def _never_written(view: memoryview) -> int:
    raise AssertionError("a lone reader writes its first bytes itself")


async def test_a_body_stored_in_parts_is_joined_once_when_first_read() -> None:
    cache = LruMemoryCache(max_bytes=10_000)
    store = ObjectStore(cache, backend="memory")
    parts = (b"a" * 100, b"b" * 50, b"c")
    headers = (("Content-Type", "video/mp2t"),)
    await store.set_parts("k", parts, headers, 1000.0, ttl=60)
    assert store.bytes == 151 + 256  # counted as the same object joined would be
    assert cache._entries["k"][4:7] == parts  # the chunks themselves: nothing copied yet
    found = await store.get("k")
    assert found == CachedObject(b"".join(parts), headers, 1000.0, 60.0)
    again = await store.get("k")
    assert again is not None and again.body is found.body  # joined once: the same bytes again
    assert store.bytes == 151 + 256
    await store.set_parts("gone", parts, headers, 1000.0, ttl=0)
    assert await store.get("gone") is None

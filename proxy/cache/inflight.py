"""Shared in-flight bodies: one upstream body fed to N readers as its bytes arrive.

When N viewers ask for the same segment while it is still arriving, one upstream fetch (a
background task, the *pump*) feeds all of them. Each reader gets every chunk as soon as the pump
has it, not after the whole body; a late joiner first gets what has arrived so far, then follows.

* A body that completes within ``max_object_bytes`` is handed to ``on_complete`` (which stores
  it) before the flight is forgotten, so a request never finds neither the flight nor the entry.
* A failed or truncated upstream body is never handed on: every reader gets the error (the
  handler then cuts its connection, so no viewer mistakes a short body for a whole one).
* A body that grows past ``max_object_bytes`` (a large file, an endless stream) *spills*: no new
  reader may join, chunks every reader has passed are dropped, and the pump waits for the
  slowest reader once ``window_bytes`` are unread, so memory stays bounded. When a spilled body
  has no reader left, the upstream is closed.

The pump never waits for readers before spilling: a slow viewer slows only itself.
This module knows nothing of HTTP clients: the upstream is a :class:`BodySource`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.cache.tasks import BackgroundTasks
from proxy.errors import HlsRelayError, UpstreamUnreachable


@dataclass(frozen=True, slots=True)
class BodyHead:
    """What is known once the upstream headers are in."""

    status: int
    headers: tuple[tuple[str, str], ...]
    length: int | None


class BodySource(Protocol):
    """An open upstream body."""

    @property
    def head(self) -> BodyHead: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises the project's errors when it fails or is cut short."""
        ...

    def abort(self) -> None:
        """Drop the connection (the body was not read to the end)."""

    def finish(self) -> None:
        """Hand the connection back (the body was read to the end)."""


Opener = Callable[[], Awaitable[BodySource]]
OnComplete = Callable[[BodyHead, bytes], Awaitable[None]]


class SharedBody:
    """One upstream body and the readers following it."""

    def __init__(self, window_bytes: int) -> None:
        self._window = window_bytes
        self._chunks: list[bytes] = []
        self._first = 0  # absolute index of _chunks[0] (chunks before it were dropped)
        self._unread_from = 0  # byte offset of _chunks[0]
        self.size = 0
        self._readers: dict[BodyReader, int] = {}
        self._more = asyncio.Event()
        self._room = asyncio.Event()
        self._head: asyncio.Future[BodyHead] = asyncio.get_running_loop().create_future()
        self.done = False
        self.error: HlsRelayError | None = None
        self.spilled = False

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
        # shield: many readers await the one future; one leaving must not cancel it.
        return await asyncio.shield(self._head)

    async def _next(self, reader: BodyReader) -> bytes | None:
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
            more = self._more
            await more.wait()

    def _leave(self, reader: BodyReader) -> None:
        if self._readers.pop(reader, None) is not None:
            self._room.set()

    # -- the pump side ------------------------------------------------------------------------

    def _set_head(self, head: BodyHead) -> None:
        if not self._head.done():
            self._head.set_result(head)

    def _wake(self) -> None:
        more, self._more = self._more, asyncio.Event()
        more.set()

    def _append(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self.size += len(chunk)
        self._wake()

    def _finish(self) -> None:
        self.done = True
        self._wake()

    def _fail(self, error: HlsRelayError) -> None:
        self.error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: a flight nobody awaits must not log it as lost
        self._wake()

    def body(self) -> bytes:
        return b"".join(self._chunks)

    async def _wait_for_room(self) -> None:
        """Spilled: drop what every reader has passed; wait while too much is unread."""
        while self._readers:
            slowest = min(self._readers.values())
            drop = slowest - self._first
            if drop > 0:
                self._unread_from += sum(len(c) for c in self._chunks[:drop])
                del self._chunks[:drop]
                self._first = slowest
            if self.size - self._unread_from <= self._window:
                return
            self._room.clear()
            await self._room.wait()


class BodyReader:
    """One reader of a :class:`SharedBody`; iterate it for the chunks, ``close()`` when done."""

    __slots__ = ("_body",)

    def __init__(self, body: SharedBody) -> None:
        self._body = body

    async def head(self) -> BodyHead:
        return await self._body.head()

    def __aiter__(self) -> BodyReader:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._body._next(self)
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        self._body._leave(self)


class SharedBodies:
    """The bodies in flight in this process, by cache key."""

    def __init__(self, tasks: BackgroundTasks, max_object_bytes: int, window_bytes: int) -> None:
        self._tasks = tasks
        self._limit = max_object_bytes
        self._window = max(window_bytes, 1)
        self._bodies: dict[str, SharedBody] = {}

    def __len__(self) -> int:
        return len(self._bodies)

    def __contains__(self, key: str) -> bool:
        return key in self._bodies

    def join(self, key: str) -> BodyReader | None:
        """A reader of the body in flight for ``key``, or None."""
        body = self._bodies.get(key)
        return body.reader() if body is not None else None

    def start(self, key: str, opener: Opener, on_complete: OnComplete | None = None) -> SharedBody:
        """Start fetching ``key`` in the background (there must be no flight for it)."""
        body = SharedBody(self._window)
        self._bodies[key] = body
        self._tasks.spawn(self._open_and_pump(key, body, opener, on_complete), name="shared-body")
        return body

    async def open(
        self, key: str, opener: Opener, on_complete: OnComplete | None = None
    ) -> BodyReader:
        """Start fetching ``key`` for a viewer, and return that viewer's reader.

        The upstream request is made in the caller's own task, up to the response headers, and
        only the body is pumped by a background task. A task spawned here would run only after
        every request already queued in this loop turn (a crowd of hundreds arriving at once),
        delaying the one upstream request they all wait for.
        """
        body = SharedBody(self._window)
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
        self._tasks.spawn(self._pump(key, body, source, on_complete), name="shared-body")
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
        await self._pump(key, body, source, on_complete)

    async def _pump(
        self, key: str, body: SharedBody, source: BodySource, on_complete: OnComplete | None
    ) -> None:
        complete = False
        body._set_head(source.head)
        try:
            async for chunk in source.chunks():
                body._append(chunk)
                if not body.spilled and body.size > self._limit:
                    body.spilled = True
                    self._forget(key, body)  # too big to share with late joiners or store
                if body.spilled:
                    await body._wait_for_room()
                    if not body.readers:
                        break  # nobody left to read it, and it will not be stored
            else:
                complete = True
        except HlsRelayError as exc:
            body._fail(exc)
        except asyncio.CancelledError:
            body._fail(UpstreamUnreachable("upstream fetch was cancelled"))
            raise
        finally:
            if complete:
                source.finish()
            else:
                source.abort()
                if body.error is None:
                    body._fail(UpstreamUnreachable("upstream fetch was abandoned"))
            if complete:
                body._finish()
                if on_complete is not None and not body.spilled:
                    # The flight stays findable until the entry is stored: no gap between them.
                    await on_complete(source.head, body.body())
            self._forget(key, body)


__all__ = [
    "BodyHead",
    "BodyReader",
    "BodySource",
    "OnComplete",
    "Opener",
    "SharedBodies",
    "SharedBody",
]

"""The fan-out hub: one reader's TS packets to many consumers, none of which may stall it.

Every consumer (ffmpeg's stdin writer, each raw-TS viewer) has a :class:`Subscription`, a queue
bounded in bytes. :meth:`FanOutHub.publish` never waits: a consumer whose queue is full is
dropped (its next :meth:`Subscription.get` returns ``None``), the others go on.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Subscription:
    """One consumer's bounded queue of TS chunks."""

    def __init__(self, hub: FanOutHub, max_bytes: int) -> None:
        self._hub = hub
        self._chunks: deque[bytes] = deque()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()
        self.closed = False
        self.dropped = False
        """Closed because it fell behind by more than its buffer."""

    def _offer(self, chunk: bytes) -> bool:
        if self.closed:
            return False
        if self._bytes + len(chunk) > self._max_bytes:
            self.dropped = True
            self.close()
            return False
        self._chunks.append(chunk)
        self._bytes += len(chunk)
        self._ready.set()
        return True

    async def get(self) -> bytes | None:
        """The next chunk, or None when the subscription ended (hub closed, or dropped)."""
        while not self._chunks:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        chunk = self._chunks.popleft()
        self._bytes -= len(chunk)
        return chunk

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.dropped:
                self._chunks.clear()
                self._bytes = 0
            self._ready.set()
            self._hub._forget(self)


class FanOutHub:
    """Publishes chunks to every subscription; counts what went in."""

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        self.bytes_in = 0
        self.closed = False

    def subscribe(self, max_bytes: int) -> Subscription:
        sub = Subscription(self, max_bytes)
        if self.closed:
            sub.closed = True
        else:
            self._subscriptions.append(sub)
        return sub

    def publish(self, chunk: bytes) -> None:
        self.bytes_in += len(chunk)
        for sub in list(self._subscriptions):
            sub._offer(chunk)

    def _forget(self, sub: Subscription) -> None:
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def close(self) -> None:
        self.closed = True
        for sub in list(self._subscriptions):
            sub.close()

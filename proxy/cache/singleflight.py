"""Single-flight: concurrent callers asking for the same key share one call of the factory.

The factory runs as a background task of its own, not inside the first caller: when that
caller goes away (a viewer closing its connection), the others still get the result, and the
result still fills the cache. Every caller gets the same value, or the same exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from proxy.cache.tasks import BackgroundTasks

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Coalesces concurrent calls by key (in this process)."""

    def __init__(self, tasks: BackgroundTasks, name: str) -> None:
        self._tasks = tasks
        self._name = name
        self._flights: dict[str, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def coalesce(
        self, key: str, factory: Callable[[], Coroutine[Any, Any, T]]
    ) -> tuple[T, bool]:
        """The factory's result for ``key`` and whether this caller started the call."""
        task = self._flights.get(key)
        led = task is None
        if task is None:
            task = self._tasks.spawn(factory(), name=self._name)
            self._flights[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # shield: a caller that is cancelled leaves; the call goes on for the others.
        return await asyncio.shield(task), led

    def _forget(self, key: str, task: asyncio.Task[T]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]

"""Background tasks that are named, tracked, and cancelled on shutdown (never fire-and-forget).

Cache fills, shared upstream bodies and prefetches outlive the request that started them (the
first viewer may leave while others still read). Each one is started through
:meth:`BackgroundTasks.spawn`, which keeps a reference (asyncio holds tasks weakly), names it for
debugging, retrieves its outcome (no "exception was never retrieved" noise for errors that the
awaiting requests already handled) and logs anything unexpected. ``close()`` cancels and awaits
every task still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from proxy.errors import HlsRelayError

log = logging.getLogger("hlsrelay.tasks")
T = TypeVar("T")


class BackgroundTasks:
    """A set of running tasks owned by one app."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        if self._closed:
            coro.close()
            raise RuntimeError("background tasks are closed")
        task = asyncio.get_running_loop().create_task(coro, name=f"hlsrelay:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, so asyncio never reports it as lost
        if exc is not None and not isinstance(exc, HlsRelayError):
            log.error("background task %s failed", task.get_name(), exc_info=exc)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

"""Moving a body from one socket to another in the kernel: ``splice(2)`` through a pipe.

A relayed byte read into Python costs a copy in (the read), a copy out (the write) and the
interpreter's steps between them. A plain body (an upstream socket without TLS, a known
length, nothing to decompress, nobody else to share it with or to store it for) need not come
into this process at all: ``splice`` moves it from the upstream socket into a pipe and from
the pipe into the viewer's socket, the pages passed by reference. What is left in Python is a
call per pipeful and a wait when a side is not ready.

The two sockets stay their transports' (uvloop's or asyncio's): their reading is paused and
their write buffers empty while a body is moved, and the waits for readiness are on duplicates
of their descriptors (an event loop refuses readers on a transport's own descriptor).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable

from proxy.turns import TurnBudget

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
PIPE_BYTES = 1024 * 1024
"""A pipe's capacity when the body may go fast (its receive share unlimited): fewer calls a
body. The kernel's default (64 KiB) otherwise: a pipe holds up to its capacity of the body
while its viewer is slow, in the kernel's memory rather than this process'."""
TURN_ITEM_BYTES = 128 * 1024


class SourceEnded(Exception):
    """The source closed (or failed) before the body's end."""


class SinkGone(Exception):
    """The destination closed (the viewer left)."""


class SourceStalled(Exception):
    """Nothing came from the source for longer than allowed."""


def _wait(
    loop: asyncio.AbstractEventLoop, read_fd: int | None, write_fd: int | None
) -> asyncio.Future[None]:
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    if read_fd is not None:
        loop.add_reader(read_fd, ready)
    if write_fd is not None:
        loop.add_writer(write_fd, ready)
    return future


async def drained(transport: asyncio.WriteTransport, fd: int) -> None:
    """Once ``transport`` (of socket ``fd``) has sent everything queued: what is moved into the
    socket from now on follows it. Raises :class:`SinkGone` if it closes meanwhile."""
    loop = asyncio.get_running_loop()
    if not transport.get_write_buffer_size():
        return
    sink = os.dup(fd)
    try:
        while transport.get_write_buffer_size():
            if transport.is_closing():
                raise SinkGone("closed")
            waiter = _wait(loop, None, sink)
            try:
                await waiter
            finally:
                loop.remove_writer(sink)
            await asyncio.sleep(0)  # the transport's own writer runs in this turn too
    finally:
        os.close(sink)


async def splice_body(
    source_fd: int,
    sink_fd: int,
    length: int,
    *,
    turns: TurnBudget,
    read_timeout: float,
    big: bool = True,
    moved: Callable[[int], None] | None = None,
) -> int:
    """Move ``length`` bytes from ``source_fd`` to ``sink_fd`` (both non-blocking stream
    sockets, neither read nor written by anyone else meanwhile); return how many reached the
    sink (``length`` unless an exception says otherwise).

    Paced with ``turns`` as relayed chunks are (a pipeful counts as its 128 KiB pieces), and
    bounded by ``read_timeout`` while waiting for the source only. ``moved`` hears of every
    piece that reached the sink.
    """
    loop = asyncio.get_running_loop()
    source = os.dup(source_fd)
    sink = os.dup(sink_fd)
    pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        capacity = 64 * 1024
        if big:
            with contextlib.suppress(OSError):  # past the user's pipe limits: the default
                capacity = fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        left = length  # still to come from the source
        held = 0  # in the pipe
        sent = 0
        while sent < length:
            progress = 0
            if left and held < capacity:
                try:
                    got = os.splice(source, pipe_in, min(left, capacity - held), flags=SPLICE_FLAGS)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise SourceEnded(str(exc)) from None
                else:
                    if not got:
                        raise SourceEnded("closed")
                    left -= got
                    held += got
                    progress += got
            if held:
                try:
                    out = os.splice(pipe_out, sink, held, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise SinkGone(str(exc)) from None
                else:
                    held -= out
                    sent += out
                    progress += out
                    if moved is not None:
                        moved(out)
            if progress:
                if turns.must_wait(max(1, -(-progress // TURN_ITEM_BYTES))):
                    await turns.next()
                continue
            # Neither side was ready: wait for the one that holds things up.
            want_read = source if left and held < capacity else None
            want_write = sink if held else None
            waiter = _wait(loop, want_read, want_write)
            try:
                if want_write is None:
                    try:
                        async with asyncio.timeout(read_timeout):
                            await waiter
                    except TimeoutError:
                        raise SourceStalled(f"nothing for {read_timeout:g} s") from None
                else:
                    await waiter
            finally:
                if want_read is not None:
                    loop.remove_reader(want_read)
                if want_write is not None:
                    loop.remove_writer(want_write)
        return sent
    finally:
        for fd in (source, sink, pipe_out, pipe_in):
            os.close(fd)


__all__ = ["SinkGone", "SourceEnded", "SourceStalled", "drained", "splice_body"]

"""A crowd of raw HTTP/1.1 clients that times first body bytes by the kernel's clock, and the
slow origin it waits for.

Used by bench_cache (issue 4's crowd figure) and bench_peers (case 6), so the two measure the
same thing the same way: the same client, the same origin model (:func:`slow_answer`), and the
same reference (:func:`crowd_get`'s ``reference``: a request sent straight to the origin at the
crowd's moment). Each client is a plain
non-blocking socket with SO_TIMESTAMPNS: the time of its first body byte is when the kernel
received it, not when this one-core Python client got round to reading it, so 500 connections
answering within a few ms of each other are timed as they arrived. Connections are opened before
the requests are sent (players keep theirs open), so 500 handshakes are not what is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

# -- the slow origin ----------------------------------------------------------------------------

ORIGIN_DELAY_S = 0.5
"""How long the origin takes before its first byte (issue 4: "whose origin takes 0.5 s")."""
ORIGIN_RATE_BYTES_S = 125_000_000
"""Then the body at about 1 Gbit/s..."""
ORIGIN_CHUNK_BYTES = 64 * 1024
"""... in 64 KiB writes."""


async def send_paced(response: web.StreamResponse, data: bytes) -> None:
    """Write ``data`` at about ORIGIN_RATE_BYTES_S, ORIGIN_CHUNK_BYTES at a time.

    Why paced: the origin the figure is about sits across a network, so its body arrives at the
    link's rate (2 MiB at 1 Gbit/s: about 17 ms), not all at once. A loopback origin that hands
    the kernel 2 MiB in one write is no such origin, and on this machine it also costs the wrong
    party: it shares its core with the clients, and the 2 MiB it copies for one request (the
    reference, say) delay its first byte to the next (the proxy's). Paced on a deadline, not by
    sleeping a fixed 0.5 ms per chunk: uvloop rounds timers to whole milliseconds, and a 0.5 ms
    sleep there is no pause at all (which is what bench_cache's origin did before).
    """
    loop = asyncio.get_running_loop()
    due = loop.time()
    for start in range(0, len(data), ORIGIN_CHUNK_BYTES):
        chunk = data[start : start + ORIGIN_CHUNK_BYTES]
        await response.write(chunk)
        due += len(chunk) / ORIGIN_RATE_BYTES_S
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)


async def slow_answer(
    request: web.Request, data: bytes, *, headers_first: bool = False
) -> web.StreamResponse:
    """The origin both crowd benchmarks use: ``data`` (a segment) after ORIGIN_DELAY_S, paced.

    ``headers_first``: the headers go at once and the bytes after the delay (a segment still
    being made) instead of both after the delay.
    """
    response = web.StreamResponse(
        headers={"Content-Type": "video/mp2t", "Content-Length": str(len(data))}
    )
    if headers_first:
        await response.prepare(request)
    await asyncio.sleep(ORIGIN_DELAY_S)
    await response.prepare(request)  # (no-op when the headers went first)
    await send_paced(response, data)
    await response.write_eof()
    return response


# -- the crowd ----------------------------------------------------------------------------------

# Linux: SO_TIMESTAMPNS makes recvmsg() hand over, with each read, the time the kernel received
# its first packet (CLOCK_REALTIME, as struct timespec). Python does not name the constant.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")


class Probe:
    """One raw HTTP/1.1 GET that notes when its first body byte arrived and hashes the body.

    "Arrived" is the kernel's receive timestamp of the read that held the first body byte
    (SO_TIMESTAMPNS), not the moment this process got round to reading it: the client has one
    core too, and 500 connections handing their first bytes to one Python loop would otherwise
    time the client's own turn (measured 5-10 ms for the last of 500). The reference request to
    the origin is timed the same way. After its first body byte a probe stops reading until every
    probe of the crowd has one (``release``), so reading and hashing 500 x 2 MiB happens after the
    figure is taken; bytes that arrive meanwhile wait in socket buffers (hlsrelay's pump never
    waits for a viewer).
    """

    def __init__(self, crowd: Crowd, sock: socket.socket) -> None:
        self._crowd = crowd
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._head = b""
        self._length: int | None = None
        self._received = 0
        self._digest = hashlib.sha256()
        self.first_body_byte: float | None = None
        """Kernel receive time of the first body byte, ``time.time()`` seconds."""
        self.status = 0
        self.done: asyncio.Future[str] = self._loop.create_future()
        self._reading = False

    def send(self, request: bytes) -> None:
        self._sock.sendall(request)  # a few dozen bytes into an empty socket buffer
        self.resume()

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self._sock.recvmsg(1 << 20, socket.CMSG_SPACE(_TIMESPEC.size))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancillary = b"", []
        self._crowd.progress = time.monotonic()
        if not data:
            self._finish()
            return
        arrived = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack(payload[: _TIMESPEC.size])
                arrived = seconds + nanoseconds / 1e9
        if self._length is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end].decode("latin-1"), self._head[end + 4 :]
            self.status = int(head.split(" ", 2)[1])
            length = re.search(r"(?im)^content-length:\s*(\d+)", head)
            self._length = int(length.group(1)) if length else -1  # -1: until the close
        if data:
            if self.first_body_byte is None:
                self.first_body_byte = arrived if arrived is not None else time.time()
                self._pause()
                self._crowd.arrived(self)
            self._digest.update(data)
            self._received += len(data)
        if self._length is not None and self._length >= 0 and self._received >= self._length:
            self._finish()

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def resume(self) -> None:
        if not self._reading and self._sock.fileno() >= 0:
            self._loop.add_reader(self._sock.fileno(), self._readable)
            self._reading = True

    def stop(self) -> None:
        """Give up on this body (noted "incomplete" unless it was whole)."""
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            complete = self._length is not None and self._received >= max(self._length, 0)
            self.done.set_result(self._digest.hexdigest() if complete else "incomplete")
        self._pause()
        self._sock.close()


class Crowd:
    def __init__(self, size: int) -> None:
        self._size = size
        self._waiting: list[Probe] = []
        self.all_arrived = asyncio.Event()
        self.progress = time.monotonic()
        """When a byte last arrived for any client of the crowd."""

    def arrived(self, probe: Probe) -> None:
        self._waiting.append(probe)
        if len(self._waiting) >= self._size:
            self.all_arrived.set()

    def release(self) -> None:
        for probe in self._waiting:
            probe.resume()


async def connect(url: URL, crowd: Crowd) -> Probe:
    assert url.host is not None and url.port is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port))
    return Probe(crowd, sock)


def get_request(url: URL, headers: Mapping[str, str] | None = None) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (
        f"GET {url.raw_path_qs} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode()


@dataclass(frozen=True)
class CrowdResult:
    firsts: list[float]
    """Each client's first body byte, seconds from the crowd's first request sent."""
    digests: list[str]
    """SHA-256 of each body ("incomplete" when cut)."""
    reference: float | None
    """The reference request's first body byte, from the same instant."""
    ramp: float
    """Seconds from the first request sent to the last."""


BODY_STALL_S = 60.0
"""The crowd's bodies are given up (noted "incomplete") after this long with no byte for any."""


async def _bodies(crowd: Crowd, probes: list[Probe]) -> list[str]:
    """Every client's digest once its body is in; a slow proxy gets all the time it needs while
    bytes keep coming (a fixed limit would fail a slow but working one), a stuck one does not."""
    every = asyncio.gather(*(p.done for p in probes))
    while True:
        try:
            return list(await asyncio.wait_for(asyncio.shield(every), 1.0))
        except TimeoutError:
            if time.monotonic() - crowd.progress > BODY_STALL_S:
                for probe in probes:
                    probe.stop()
                return list(await every)


async def crowd_get(
    url: str,
    size: int,
    reference: str | None = None,
    reference_headers: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> CrowdResult:
    """``size`` GETs of ``url`` sent at once on open connections.

    Also the time to first body byte of ``reference`` (another URL, e.g. the origin itself), sent
    right after the crowd's first request and timed from the same instant: the same kind of
    request at the same moment, without the proxy.
    """
    target = URL(url)
    crowd = Crowd(size)
    # Players keep their connections open: connect first, so what is timed is the wait for the
    # segment, not 500 handshakes at once on a listen backlog.
    probes = [await connect(target, crowd) for _ in range(size)]
    ref_target = URL(reference) if reference else None
    ref_probe = await connect(ref_target, Crowd(1)) if ref_target else None
    request = get_request(target, headers)
    t0 = time.time()  # the clock of the kernel's receive timestamps (CLOCK_REALTIME)
    probes[0].send(request)
    if ref_probe is not None and ref_target is not None:
        ref_probe.send(get_request(ref_target, reference_headers))
    for probe in probes[1:]:
        probe.send(request)
    ramp = time.time() - t0
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(crowd.all_arrived.wait(), 30)
    crowd.release()
    digests = await _bodies(crowd, probes)
    firsts = [p.first_body_byte - t0 for p in probes if p.first_body_byte is not None]
    ref_first = None
    if ref_probe is not None:
        ref_probe.resume()
        await asyncio.wait_for(ref_probe.done, 60)
        if ref_probe.first_body_byte is not None:
            ref_first = ref_probe.first_body_byte - t0
    return CrowdResult(firsts, list(digests), ref_first, ramp)

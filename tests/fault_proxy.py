"""A FAKE outbound HTTP proxy (CONNECT tunnels) that misbehaves on demand.

This is a fake on purpose: real proxies (tinyproxy, microsocks, used elsewhere in the tests) do
not refuse, reset mid-body, blackhole, stall or answer 502 when a test asks them to. It speaks
just enough HTTP CONNECT for hlsrelay's tunnelling connector, listens on 127.0.0.1 on a free
port, and counts what it saw. Modes (``FaultProxy.mode``, changeable while it runs):

* ``ok``         tunnel faithfully;
* ``refuse``     accept, then reset the connection at once (like a dead proxy's RST);
* ``blackhole``  accept and read, never answer;
* ``stall``      answer ``200`` to CONNECT, then relay nothing back (no response headers ever);
* ``bad_gateway`` answer ``502 Bad Gateway`` to CONNECT;
* ``auth``       answer ``407 Proxy Authentication Required``;
* ``reset_mid_body`` tunnel, but reset both sides after ``reset_after`` bytes came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN: what a crashed or killed proxy looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class FaultProxy:
    mode: str = "ok"
    reset_after: int = 64 * 1024
    connections: int = 0
    tunnels: int = 0
    targets: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.mode
        if mode == "refuse":
            _reset(writer)
            return
        head = await reader.readuntil(b"\r\n\r\n")
        if mode == "blackhole":
            await asyncio.sleep(3600)
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        verb, _, rest = request_line.partition(" ")
        target = rest.partition(" ")[0]
        self.targets.append(target)
        if verb != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        if mode == "bad_gateway":
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        if mode == "auth":
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        host, _, port = target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        self.tunnels += 1
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        try:
            if mode == "stall":
                await asyncio.gather(self._pipe(reader, up_writer), asyncio.sleep(3600))
                return
            limit = self.reset_after if mode == "reset_mid_body" else None
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer, limit, up_writer)
            )
        finally:
            up_writer.transport.abort()

    @staticmethod
    async def _pipe(
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        limit: int | None = None,
        other: asyncio.StreamWriter | None = None,
    ) -> None:
        sent = 0
        while True:
            data = await src.read(16384)
            if not data:
                dst.transport.abort()
                return
            if limit is not None and sent + len(data) > limit:
                dst.write(data[: limit - sent])
                await dst.drain()
                _reset(dst)
                if other is not None:
                    _reset(other)
                return
            dst.write(data)
            sent += len(data)
            await dst.drain()

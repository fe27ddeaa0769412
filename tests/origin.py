"""A real aiohttp origin for tests: serves playlists and media, records what it was sent.

This is a real HTTP server on a loopback port (started through pytest-aiohttp's
``aiohttp_server``), not a mock: the proxy talks to it over TCP exactly as to a CDN.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class SeenRequest:
    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    peer: str


@dataclass
class Origin:
    """Routes by exact path; every request is recorded in :attr:`seen`."""

    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[SeenRequest] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(
            SeenRequest(
                request.method,
                request.path,
                request.rel_url.raw_query_string,
                CIMultiDict(request.headers),
                str(peer[0]) if peer else "",
            )
        )
        handler = self.routes.get(request.rel_url.raw_path) or self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="not here")
        return await handler(request)

    def requests_to(self, path: str) -> list[SeenRequest]:
        return [r for r in self.seen if r.path == path]

    # -- route helpers ------------------------------------------------------------------------

    def playlist(
        self, path: str, text: str | bytes, content_type: str = "application/vnd.apple.mpegurl"
    ) -> None:
        body = text.encode() if isinstance(text, str) else text

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(body=body, headers={"Content-Type": content_type})

        self.routes[path] = handler

    def media(self, path: str, data: bytes, content_type: str = "video/mp2t") -> None:
        """Static bytes with real Range support (aiohttp's own)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.Response(body=data, headers={"Content-Type": content_type})
            if request.http_range.start is not None or request.http_range.stop is not None:
                rng = request.http_range
                start = rng.start or 0
                stop = len(data) if rng.stop is None else min(rng.stop, len(data))
                if start < 0:
                    start, stop = len(data) + start, len(data)
                if start >= len(data):
                    return web.Response(
                        status=416, headers={"Content-Range": f"bytes */{len(data)}"}
                    )
                response = web.Response(
                    status=206,
                    body=data[start:stop],
                    headers={
                        "Content-Type": content_type,
                        "Content-Range": f"bytes {start}-{stop - 1}/{len(data)}",
                        "Accept-Ranges": "bytes",
                    },
                )
            else:
                response.headers["Accept-Ranges"] = "bytes"
            return response

        self.routes[path] = handler

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, headers={"Location": location})

        self.routes[path] = handler

    def status(self, path: str, status: int) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, text="upstream says no")

        self.routes[path] = handler

    def stall(self, path: str, seconds: float) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(seconds)
            return web.Response(text="#EXTM3U\n")

        self.routes[path] = handler

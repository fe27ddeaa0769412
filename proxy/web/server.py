"""Serving the app: aiohttp's runner, with the fast path for cached hits in front of its handler.

``web.run_app`` makes its own site, whose protocol is aiohttp's ``RequestHandler``; here a site
of ours wraps each connection's handler in :class:`~proxy.web.fast_hits.FastHitsProtocol`.
Everything else (start-up, signals, graceful shutdown with ``shutdown_timeout``, cleanup) is
aiohttp's ``AppRunner``, run the way ``run_app`` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from yarl import URL

from proxy.web.access_log import AccessLogger
from proxy.web.fast_hits import FastHits
from proxy.web.keys import FAST_HITS, SETTINGS

# aiohttp's own keep-alive timer cannot see answers given by the fast path, so it is set out of
# the way and the fast path closes idle connections after KEEPALIVE_TIMEOUT_S itself.
_HANDLER_KEEPALIVE_S = 10 * 24 * 3600.0


class FastHitsSite(web.BaseSite):
    """A TCP site whose connections go through the fast path first."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *, hits: FastHits, backlog: int
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._hits = hits

    @property
    def port(self) -> int:
        """The port listened on (the one picked when 0 was asked for, once started)."""
        sockets = getattr(self._server, "sockets", None)  # asyncio.Server's, once started
        if sockets:
            return int(sockets[0].getsockname()[1])
        return self._port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self.port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._hits.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )


async def start(
    app: web.Application,
    *,
    host: str,
    port: int,
    access_log_class: type[AbstractAccessLogger] | None = None,
    handle_signals: bool = False,
) -> tuple[web.AppRunner, FastHitsSite]:
    """Start ``app`` listening on ``host:port``; stop it with ``await runner.cleanup()``."""
    settings = app[SETTINGS]
    hits = app[FAST_HITS]
    if access_log_class is None:
        access_log_class = AccessLogger
    runner = web.AppRunner(
        app,
        handle_signals=handle_signals,
        access_log_class=access_log_class,
        shutdown_timeout=settings.server.shutdown_timeout,
        keepalive_timeout=_HANDLER_KEEPALIVE_S,
    )
    await runner.setup()
    site = FastHitsSite(runner, host, port, hits=hits, backlog=settings.server.backlog)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


def run(
    app: web.Application,
    *,
    loop: asyncio.AbstractEventLoop,
    access_log_class: type[AbstractAccessLogger],
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (what ``web.run_app`` does)."""
    settings = app[SETTINGS]

    async def serve() -> None:
        runner, _ = await start(
            app,
            host=settings.server.host,
            port=settings.server.port,
            access_log_class=access_log_class,
            handle_signals=True,  # SIGINT/SIGTERM raise web.GracefulExit out of the loop
        )
        try:
            await asyncio.Event().wait()  # until a signal ends the loop, or a cancel
        finally:
            await runner.cleanup()

    main = loop.create_task(serve())
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()  # runs serve()'s finally: the runner's graceful cleanup
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

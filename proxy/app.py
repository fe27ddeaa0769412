"""``create_app(settings)``: all wiring in one place.

Long-lived state (the client session, the token codec, the relay) is made in ``cleanup_ctx`` and
kept under typed ``AppKey``s; it is closed in the same place, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from proxy import __version__
from proxy.cache.layer import CacheLayer
from proxy.channels.catalog import ChannelCatalog
from proxy.live.lease import ChannelLeases, LocalLeases, RedisLeases
from proxy.live.pool import LivePool
from proxy.live.session import remove_stale_dirs
from proxy.metrics import Metrics, build_labels, sample_loop_lag
from proxy.settings import Settings, token_secret
from proxy.tokens import TokenCodec
from proxy.turns import TurnBudget
from proxy.upstream.client import UpstreamClient
from proxy.upstream.guard import DestinationGuard, GuardedResolver
from proxy.upstream.proxies import OutboundProxy, ProxyPool
from proxy.upstream.relay import StreamRelay
from proxy.upstream.transport import TunnelConnector, UpstreamConnector
from proxy.web.cors import add_cors_headers, preflight_middleware
from proxy.web.errors import add_request_id, error_middleware, metrics_middleware
from proxy.web.fast_hits import FastHits
from proxy.web.keys import (
    BACKGROUND,
    CHANNELS,
    CLIENT_SESSION,
    FAST_HITS,
    LIVE,
    METRICS,
    PROXY_POOL,
    READY,
    RELAY,
    SETTINGS,
    UPSTREAM,
)
from proxy.web.routes import setup_routes

log = logging.getLogger("hlsrelay")


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, preflight_middleware],
        client_max_size=64 * 1024,
    )
    app[SETTINGS] = settings
    metrics = Metrics()
    metrics.build_info.info(build_labels(__version__))
    app[METRICS] = metrics
    app[FAST_HITS] = FastHits(
        metrics,
        settings.security.cors_origins,
        settings.server.fast_hits_bytes,
        settings.server.requests_per_turn,
    )
    app[READY] = {"ready": False}
    setup_routes(app, settings.server.base_path)
    app.on_response_prepare.append(add_cors_headers)
    app.on_response_prepare.append(add_request_id)
    app.cleanup_ctx.append(_loop_lag)
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_live)
    app.on_shutdown.append(_not_ready)
    app.on_shutdown.append(_stop_live)
    return app


async def _loop_lag(app: web.Application) -> AsyncIterator[None]:
    """The event-loop lag sampler, first in and last out: start-up and shutdown stalls count."""
    sampler = asyncio.create_task(sample_loop_lag(app[METRICS].loop_lag), name="hlsrelay-loop-lag")
    try:
        yield
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    secret, origin = token_secret(settings)
    if origin == "generated":
        log.warning(
            "security.secret is not set: generated a token key%s",
            f" and saved it to {settings.security.secret_file}"
            if settings.security.secret_file
            else "; stream URLs stop working when the process restarts",
        )
    guard = DestinationGuard(settings.upstream.allow_networks)
    # One budget for the body reads of every connection (direct and through proxies): a turn's
    # reads are counted in CPU time only.
    reads = (
        TurnBudget(sys.maxsize, settings.upstream.receive_turn_ms / 1000)
        if settings.upstream.receive_turn_ms
        else None
    )
    connector = UpstreamConnector(
        reads=reads,
        resolver=GuardedResolver(guard),
        limit=settings.upstream.max_connections,
        limit_per_host=settings.upstream.max_connections_per_host,
        ttl_dns_cache=30,
        enable_cleanup_closed=False,
        **_keepalive(settings.upstream.keepalive_timeout),
    )
    session = _client_session(connector)
    # One session per outbound proxy, each with a tunnelling connector of its own: its resolver
    # is guarded (destinations are checked here, before the proxy sees them), while the proxy's
    # own address, chosen by the operator, is dialled without the guard.
    proxies = [
        OutboundProxy(
            entry.name,
            session=_client_session(
                TunnelConnector(
                    entry.name,
                    URL(entry.url.get_secret_value()),
                    reads=reads,
                    resolver=GuardedResolver(guard),
                    limit=settings.upstream.max_connections,
                    limit_per_host=settings.upstream.max_connections_per_host,
                    ttl_dns_cache=30,
                    enable_cleanup_closed=False,
                    **_keepalive(settings.upstream.keepalive_timeout),
                )
            ),
        )
        for entry in settings.proxies.urls
    ]
    pool = ProxyPool(proxies, settings.proxies, app[METRICS])
    codec = TokenCodec(
        secret,
        ttl_seconds=settings.security.token_ttl,
        expiry_bucket_seconds=settings.security.token_expiry_bucket,
    )
    client = UpstreamClient(
        session, settings.upstream, guard, app[METRICS], proxies=settings.proxies, pool=pool
    )
    cache = CacheLayer.open(settings.cache, app[METRICS])
    app[CLIENT_SESSION] = session
    app[PROXY_POOL] = pool
    app[UPSTREAM] = client
    app[RELAY] = StreamRelay(client, codec, settings, cache)
    probes: asyncio.Task[None] | None = None
    if proxies and settings.proxies.probe_url is not None:
        probes = asyncio.create_task(client.run_probes(), name="hlsrelay-proxy-probes")
    app[READY]["ready"] = True
    yield
    app[READY]["ready"] = False
    if probes is not None:
        probes.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probes
    # Fills and prefetches first: they use the session.
    await cache.close()
    await session.close()
    for proxy in proxies:
        if proxy.session is not None:
            await proxy.session.close()


def _keepalive(seconds: float) -> dict[str, Any]:
    # aiohttp refuses a keep-alive time together with force_close: 0 means no reuse at all.
    return {"keepalive_timeout": seconds} if seconds > 0 else {"force_close": True}


def _client_session(connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # upstream cookies never leak between streams
        auto_decompress=True,
        trust_env=False,  # never an HTTP(S)_PROXY from the environment: routing is ours
    )


async def _not_ready(app: web.Application) -> None:
    # Tell load balancers to stop sending work while in-flight responses finish.
    app[READY]["ready"] = False


def _background(app: web.Application, name: str, work: Coroutine[Any, Any, None]) -> None:
    """Start a named background task, tracked so cleanup can cancel and await it."""
    app[BACKGROUND][name] = asyncio.create_task(work, name=name)


async def _cancel_background(app: web.Application) -> None:
    tasks = list(app[BACKGROUND].values())
    app[BACKGROUND].clear()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _live(app: web.Application) -> AsyncIterator[None]:
    """The channel catalog (lists loaded, then reloaded in the background) and the live pool."""
    settings = app[SETTINGS]
    client = app[UPSTREAM]
    catalog = ChannelCatalog(settings, client)
    app[CHANNELS] = catalog
    leases: ChannelLeases
    if settings.cache.backend == "redis":
        # The Redis the cache shares is where instances agree on who runs which channel.
        leases = RedisLeases(
            settings.cache.redis_url,
            settings.live.instance_name,
            settings.live.lease_ttl,
            timeout=settings.cache.redis_timeout,
        )
    else:
        leases = LocalLeases(settings.live.instance_name)
    pool = LivePool(settings.live, client, app[METRICS], leases)
    app[LIVE] = pool
    await asyncio.to_thread(remove_stale_dirs)
    app[BACKGROUND] = {}
    # Lists load in the background: a slow list URL must not hold up start-up or /healthz.
    _background(app, "channel-lists", _load_lists(catalog))
    _background(app, "live-sweep", pool.sweep_forever())
    try:
        yield
    finally:
        await _cancel_background(app)
        await pool.close()
        await leases.close()


async def _load_lists(catalog: ChannelCatalog) -> None:
    await catalog.load_all()
    await catalog.refresh_forever()


async def _stop_live(app: web.Application) -> None:
    # At shutdown, before in-flight handlers are waited for: raw-TS viewers end now instead of
    # holding the shutdown for its whole timeout, and every ffmpeg is reaped.
    if LIVE in app:
        await app[LIVE].close()

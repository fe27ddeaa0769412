"""Typed application keys: the only place app state lives (never module globals)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.channels.catalog import ChannelCatalog
from proxy.live.pool import LivePool
from proxy.metrics import Metrics
from proxy.request_log import RequestFacts
from proxy.settings import Settings
from proxy.upstream.client import UpstreamClient
from proxy.upstream.proxies import ProxyPool
from proxy.upstream.relay import StreamRelay

if TYPE_CHECKING:  # fast_hits imports the access log, which needs these keys
    from proxy.web.fast_hits import FastHits

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
CLIENT_SESSION = web.AppKey("client_session", aiohttp.ClientSession)
RELAY = web.AppKey("relay", StreamRelay)
READY = web.AppKey("ready", dict[str, bool])
PROXY_POOL = web.AppKey("proxy_pool", ProxyPool)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
CHANNELS = web.AppKey("channels", ChannelCatalog)
LIVE = web.AppKey("live", LivePool)
FAST_HITS: web.AppKey[FastHits] = web.AppKey("fast_hits")
BACKGROUND = web.AppKey("background", dict[str, "asyncio.Task[None]"])
# Per request: what its access-log line says (request id, upstream host, cache result).
REQUEST_FACTS = web.RequestKey("request_facts", RequestFacts)
# Per request: the response whose headers went out (set when it is prepared).
PREPARED_RESPONSE = web.RequestKey("prepared_response", web.StreamResponse)

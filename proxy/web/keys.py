"""Typed application keys: the only place app state lives (never module globals)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.metrics import Metrics
from proxy.request_log import RequestFacts
from proxy.settings import Settings
from proxy.upstream.proxies import ProxyPool
from proxy.upstream.relay import StreamRelay

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
CLIENT_SESSION = web.AppKey("client_session", aiohttp.ClientSession)
RELAY = web.AppKey("relay", StreamRelay)
READY = web.AppKey("ready", dict[str, bool])
PROXY_POOL = web.AppKey("proxy_pool", ProxyPool)
# Per request: what its access-log line says (request id, upstream host, cache result).
REQUEST_FACTS = web.RequestKey("request_facts", RequestFacts)

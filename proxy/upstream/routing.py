"""Which way an upstream request leaves: through the pool, one named proxy, or direct.

Rules from ``[proxies] rules`` are tried in order, the first whose shell pattern (``fnmatch``,
case-insensitive) matches the upstream host wins. Hosts no rule matches go through the pool
when proxies are configured, else direct. ``*.example.com`` matches subdomains only; add
``example.com`` as its own rule for the apex.

Routing is not a security boundary: the SSRF guard checks every destination whatever the route.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from proxy.settings import ProxiesSettings


@dataclass(frozen=True, slots=True)
class Route:
    via: str
    """"pool", "direct", or the name of one proxy."""

    @property
    def is_pool(self) -> bool:
        return self.via == "pool"

    @property
    def is_direct(self) -> bool:
        return self.via == "direct"


POOL = Route("pool")
DIRECT = Route("direct")


class Router:
    def __init__(self, settings: ProxiesSettings) -> None:
        self._rules = tuple((rule.match.lower(), Route(rule.via)) for rule in settings.rules)
        self._default = POOL if settings.urls else DIRECT

    def route(self, host: str) -> Route:
        host = host.lower().rstrip(".")
        for pattern, route in self._rules:
            if fnmatchcase(host, pattern):
                return route
        return self._default

"""The SSRF boundary: which network addresses the proxy may connect to.

A destination is refused when it is loopback, private, link-local, carrier-grade NAT, multicast,
reserved or otherwise not globally routable, unless it lies in ``upstream.allow_networks``.

The check runs on *resolved addresses*, at connect time, through :class:`GuardedResolver` (so a
name that resolves to 127.0.0.1, or is rebound to it between two requests, is caught), and on IP
literals before a request is sent (aiohttp does not ask the resolver for those). The client calls
:meth:`DestinationGuard.check_url` again on every redirect hop.

This module must never decide by string matching on host names.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from proxy.errors import ForbiddenDestination

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAX_VERDICTS = 4096
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class DestinationGuard:
    """Decides whether an address may be reached."""

    def __init__(self, allow_networks: Iterable[IPNetwork] = ()) -> None:
        self._allow = tuple(allow_networks)
        # Verdicts on host strings (IP literal or name), as check_address reaches them: parsing an
        # address is a measurable share of a small request, and the verdict only depends on
        # the string and on allow_networks, which never change. Bounded: cleared when full.
        self._verdicts: dict[str, bool] = {}

    def is_allowed(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address):
            # ::ffff:127.0.0.1 and friends reach the IPv4 address they embed.
            embedded = address.ipv4_mapped or address.sixtofour
            if embedded is not None:
                address = embedded
        if any(address in net for net in self._allow if net.version == address.version):
            return True
        return address.is_global and not address.is_multicast

    def check_address(self, host: str) -> None:
        """Refuse ``host`` if it is an IP literal that may not be reached; names pass."""
        allowed = self._verdicts.get(host)
        if allowed is None:
            try:
                address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
            except ValueError:
                allowed = True  # a name: checked on every address it resolves to
            else:
                allowed = self.is_allowed(address)
            if len(self._verdicts) >= _MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[host] = allowed
        if not allowed:
            raise ForbiddenDestination("destination address is not allowed")

    def check_url(self, url: URL) -> None:
        """Refuse a URL whose scheme is not http(s) or whose host is a forbidden IP literal."""
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ForbiddenDestination("only absolute http and https URLs can be proxied")
        self.check_address(url.raw_host)


class GuardedResolver(AbstractResolver):
    """A resolver that drops every address the guard refuses, and fails if none is left."""

    def __init__(self, guard: DestinationGuard, inner: AbstractResolver | None = None) -> None:
        self._guard = guard
        self._inner = inner if inner is not None else ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._guard.is_allowed(ipaddress.ip_address(r["host"]))]
        if not allowed:
            raise ForbiddenDestination("destination resolves to an address that is not allowed")
        return allowed

    async def close(self) -> None:
        await self._inner.close()

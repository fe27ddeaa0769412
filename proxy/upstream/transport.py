"""A connector that dials upstreams through one outbound proxy, to an address checked here.

Every proxy type is used as a *tunnel* to an IP address this process resolved and checked:

* SOCKS4 / SOCKS5: CONNECT to the checked IP (never a name, so the proxy cannot resolve it to
  something else; "rdns" is moot);
* HTTP / HTTPS proxies: ``CONNECT ip:port`` (for ``http://`` upstreams too), so the proxy never
  sees a host name it could resolve to its own loopback or an internal network.

The destination name is resolved by the connector's own resolver (a ``GuardedResolver``, which
drops every forbidden address), and an IP literal is checked by the client before it gets here.
For ``https://`` upstreams TLS runs end to end inside the tunnel with SNI and certificate checks
against the *name* (aiohttp's ``server_hostname``), and the Host header carries the name, so
virtual hosting and certificates work although the tunnel goes to an IP.

The proxy's own host is dialled without the guard: the operator configured it, it may well live
on a private network. This module must never log or put into an error message the proxy URL or
its credentials; errors name the proxy by its configured name only.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import python_socks
from aiohttp.client_proto import ResponseHandler
from python_socks import ProxyType
from python_socks.async_.asyncio.v2 import Proxy
from yarl import URL

from proxy.turns import TurnBudget
from proxy.upstream import direct_body
from proxy.upstream.direct_body import DirectBodyHandler

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ClientRequest, ConnectionKey
    from aiohttp.connector import AddrInfoType

# Replies that mean "the proxy works but could not reach the destination": SOCKS5 network/host
# unreachable, connection refused, TTL expired; an HTTP proxy's 502/503/504 to CONNECT.
_DESTINATION_REPLIES = frozenset({3, 4, 5, 6, 502, 503, 504})


class ProxyFailure(aiohttp.ClientConnectionError):
    """The outbound proxy itself failed: unreachable, timed out, refused our credentials, broke
    its protocol. Counts against the proxy's health."""

    def __init__(self, proxy: str, reason: str) -> None:
        super().__init__(f"outbound proxy {proxy} failed ({reason})")
        self.proxy = proxy
        self.reason = reason


class TunnelRefused(aiohttp.ClientConnectorError):
    """The proxy works but could not reach the destination. Counts against the upstream host.

    A connector error, so aiohttp tries the destination's next address (IPv4 after IPv6)."""

    def __init__(self, proxy: str, connection_key: ConnectionKey) -> None:
        super().__init__(
            connection_key,
            OSError(errno.ECONNREFUSED, f"outbound proxy {proxy} could not reach the upstream"),
        )
        self.proxy = proxy


class _TunnelHandler(DirectBodyHandler):
    # Keeps the StreamWriter alive: since Python 3.11.5 its __del__ closes the transport.
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        writer: asyncio.StreamWriter,
        reads: TurnBudget | None = None,
    ) -> None:
        super().__init__(loop, reads)
        self._writer = writer


def proxy_type_of(url: URL) -> tuple[ProxyType, bool]:
    """The python-socks proxy type of a proxy URL, and whether the proxy speaks TLS."""
    scheme = url.scheme
    if scheme == "socks5":
        return ProxyType.SOCKS5, False
    if scheme == "socks4":
        return ProxyType.SOCKS4, False
    if scheme in ("http", "https"):
        return ProxyType.HTTP, scheme == "https"
    raise ValueError("unsupported proxy scheme")


class UpstreamConnector(aiohttp.TCPConnector):
    """aiohttp's ``TCPConnector`` whose connections speak :class:`DirectBodyHandler`, their
    body reads counted in ``reads`` (see :class:`DirectBodyHandler`; None: not limited)."""

    def __init__(self, *, reads: TurnBudget | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reads = reads
        if direct_body.DIRECT_BODIES:
            # The protocol factory aiohttp's connector dials with (its TLS connections too); a
            # private attribute, so only under the aiohttp the handler was written for.
            factory: Callable[..., ResponseHandler] = DirectBodyHandler
            self._factory = functools.partial(factory, loop=self._loop, reads=reads)


class TunnelConnector(UpstreamConnector):
    """A ``TCPConnector`` whose connections are tunnels through one proxy.

    Name resolution, connection pooling, keep-alive and limits are aiohttp's; only the last step
    (opening the socket) goes through the proxy. This is the extension point aiohttp-socks uses
    too; aiohttp-socks itself is not used because its connector replaces the resolver with one
    that passes names to the proxy (bypassing the guard) and starts the destination's TLS with
    the dialled address as server name (breaking certificate checks once the address is pinned).
    """

    def __init__(self, name: str, url: URL, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._proxy_name = name
        self._proxy_type, proxy_tls = proxy_type_of(url)
        self._proxy_host = url.raw_host or ""
        self._proxy_port = url.explicit_port or 0
        # Credentials as configured (percent-decoded); never shown anywhere.
        self._username = url.user
        self._password = url.password
        self._proxy_ssl = ssl.create_default_context() if proxy_tls else None

    async def _wrap_create_connection(
        self,
        *args: Any,
        addr_infos: list[AddrInfoType],
        req: ClientRequest,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
        client_error: type[Exception] = aiohttp.ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        address, port = addr_infos[0][4][0], addr_infos[0][4][1]
        dest_ssl: ssl.SSLContext | None = kwargs.get("ssl")
        server_hostname: str | None = kwargs.get("server_hostname")
        proxy = Proxy(
            proxy_type=self._proxy_type,
            host=self._proxy_host,
            port=self._proxy_port,
            username=self._username,
            password=self._password,
            rdns=False,
            proxy_ssl=self._proxy_ssl,
        )
        connect_timeout = timeout.sock_connect or timeout.total or 30.0
        try:
            stream = await proxy.connect(dest_host=address, dest_port=port, timeout=connect_timeout)
        except python_socks.ProxyTimeoutError:
            raise ProxyFailure(self._proxy_name, "timeout") from None
        except python_socks.ProxyConnectionError:
            raise ProxyFailure(self._proxy_name, "connect") from None
        except python_socks.ProxyError as exc:
            if exc.error_code in _DESTINATION_REPLIES:
                raise TunnelRefused(self._proxy_name, req.connection_key) from None
            # HTTP proxies say 407 (tinyproxy says 401); SOCKS5 has no code for a bad password.
            auth = exc.error_code in (401, 407) or "authentication" in str(exc).lower()
            raise ProxyFailure(self._proxy_name, "auth" if auth else "refused") from None
        except OSError:
            raise ProxyFailure(self._proxy_name, "reset") from None
        if dest_ssl is not None:
            try:
                async with asyncio.timeout(connect_timeout):
                    stream = await stream.start_tls(
                        hostname=server_hostname or address, ssl_context=dest_ssl
                    )
            except BaseException as exc:
                # Never leave the tunnel open, cancelled or not.
                stream.writer.transport.abort()
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise aiohttp.ClientConnectorCertificateError(req.connection_key, exc) from None
                if isinstance(exc, ssl.SSLError):
                    raise aiohttp.ClientConnectorSSLError(req.connection_key, exc) from None
                raise
        writer = stream.writer
        transport = writer.transport
        protocol = _TunnelHandler(self._loop, writer, self._reads)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        return transport, protocol  # type: ignore[return-value]

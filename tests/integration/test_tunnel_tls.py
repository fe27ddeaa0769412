"""HTTPS through a tunnel to a checked address: SNI, certificate and Host stay the name's.

The tunnel goes to the IP address hlsrelay resolved and checked; TLS inside it must still be made
for the host *name*, or certificates would fail (and SNI-routed CDNs would answer wrongly). A
real TLS origin (aiohttp, a certificate made here for ``localhost`` only) behind a real
microsocks and a real tinyproxy shows it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from yarl import URL

from proxy.upstream.guard import DestinationGuard, GuardedResolver
from proxy.upstream.transport import TunnelConnector
from tests.outbound import RealProxy, microsocks, tinyproxy


def make_cert(tmp: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextlib.asynccontextmanager
async def https_origin(
    server_ctx: ssl.SSLContext,
    path: str,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[int]:
    """An aiohttp HTTPS origin on 127.0.0.1 answering GET ``path``; yields its port."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.fixture
async def tls_origin(tmp_path: Path) -> AsyncIterator[tuple[int, Path, list[str], list[str]]]:
    """An HTTPS origin on 127.0.0.1 with a certificate for ``localhost`` only."""
    cert, key = make_cert(tmp_path, "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    snis: list[str] = []
    hosts: list[str] = []

    def on_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        snis.append(name or "")

    server_ctx.sni_callback = on_sni  # type: ignore[assignment]

    async def handler(request: web.Request) -> web.Response:
        hosts.append(request.headers.get("Host", ""))
        return web.Response(text="secret segment")

    async with https_origin(server_ctx, "/seg.ts", handler) as port:
        yield port, cert, snis, hosts


@pytest.fixture(params=["microsocks", "tinyproxy"])
def real_proxy(request: pytest.FixtureRequest) -> Iterator[RealProxy]:
    with microsocks() if request.param == "microsocks" else tinyproxy() as proxy:
        yield proxy


def tunnel_session(proxy: RealProxy) -> aiohttp.ClientSession:
    guard = DestinationGuard([ipaddress.ip_network("127.0.0.0/8")])
    connector = TunnelConnector("test", URL(proxy.url), resolver=GuardedResolver(guard))
    return aiohttp.ClientSession(connector=connector)


async def test_https_through_the_tunnel_verifies_the_name(
    tls_origin: tuple[int, Path, list[str], list[str]], real_proxy: RealProxy
) -> None:
    port, cert, snis, hosts = tls_origin
    trust = ssl.create_default_context(cafile=str(cert))
    async with (
        tunnel_session(real_proxy) as session,
        session.get(f"https://localhost:{port}/seg.ts", ssl=trust) as response,
    ):
        assert response.status == 200
        assert await response.text() == "secret segment"
    assert snis == ["localhost"]
    assert hosts == [f"localhost:{port}"]
    assert real_proxy.tunnels_to(port) == 1  # the proxy was given the address, not the name


async def test_a_certificate_for_another_name_is_refused_through_the_tunnel(
    tmp_path: Path, tls_origin: tuple[int, Path, list[str], list[str]], real_proxy: RealProxy
) -> None:
    port, _cert, _snis, _hosts = tls_origin
    other, _ = make_cert(tmp_path, "other.example")
    trust = ssl.create_default_context(cafile=str(other))
    async with tunnel_session(real_proxy) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"https://localhost:{port}/seg.ts", ssl=trust)

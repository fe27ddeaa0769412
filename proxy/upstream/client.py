"""Talking to origins: one pooled ``ClientSession``, explicit timeouts, redirects by hand.

Every upstream request goes through :meth:`UpstreamClient.open`, which

* sends the URL byte-exact (``yarl.URL(..., encoded=True)``): CDN signatures break when re-encoded;
* sends the stream's header profile on every hop, and nothing of the viewer's own (no cookies,
  no Authorization) except the Range headers the caller passes;
* follows redirects itself, up to ``upstream.max_redirects``, checking each hop's destination;
* bounds every wait: ``connect_timeout`` to connect, ``first_byte_timeout`` (or
  ``blocking_reload_timeout`` for LL-HLS blocking reloads) to the response headers,
  ``read_timeout`` between two body chunks;
* maps aiohttp's errors to the project's own (:func:`upstream_errors`), around body reads too.

The response it returns is open: the caller streams or reads it and must close it
(``async with``). A caller that stops early closes it, which drops the connection at once instead
of draining an unwanted body.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.errors import (
    HlsRelayError,
    PlaylistTooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.metrics import Metrics
from proxy.settings import UpstreamSettings
from proxy.upstream.guard import DestinationGuard

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@contextlib.contextmanager
def upstream_errors() -> Iterator[None]:
    """Map low-level client errors to :mod:`proxy.errors` (used around every upstream await)."""
    try:
        yield
    except HlsRelayError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamTimeout("upstream timed out") from None
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        raise UpstreamUnreachable(f"upstream unreachable ({reason})") from None
    except aiohttp.ClientPayloadError:
        raise UpstreamUnreachable("upstream body was cut short") from None
    except aiohttp.ServerDisconnectedError:
        raise UpstreamUnreachable("upstream closed the connection") from None
    except aiohttp.InvalidURL:
        raise UpstreamUnreachable("upstream URL is invalid") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnreachable(f"upstream error ({type(exc).__name__})") from None


@dataclass(slots=True)
class UpstreamResponse:
    """An open upstream response, after redirects, with its final URL."""

    raw: aiohttp.ClientResponse
    final_url: str
    decoded: bool = False
    """The body is decompressed: upstream length, encoding and range headers no longer apply."""

    @property
    def status(self) -> int:
        return self.raw.status

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.raw.headers

    @property
    def content_type(self) -> str:
        return self.raw.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    async def first_chunk(self) -> bytes:
        """The first bytes of the body as they arrive (b"" at end of body)."""
        with upstream_errors():
            return await self.raw.content.readany()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, mapped errors included; ends at end of body."""
        content = self.raw.content
        while True:
            with upstream_errors():
                chunk = await content.readany()
            if not chunk:
                return
            yield chunk

    async def read_capped(self, cap: int, head: bytes = b"") -> bytes:
        """The whole body (after ``head``, bytes already read), or PlaylistTooLarge past ``cap``."""
        declared = self.raw.content_length
        if declared is not None and declared > cap and not self.raw.headers.get("Content-Encoding"):
            raise PlaylistTooLarge(f"playlist is larger than upstream.max_playlist_bytes ({cap})")
        parts = [head] if head else []
        size = len(head)
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > cap:
                raise PlaylistTooLarge(
                    f"playlist is larger than upstream.max_playlist_bytes ({cap})"
                )
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Drop the connection (the body was not read to the end)."""
        self.raw.close()

    def release(self) -> None:
        """Hand the connection back to the pool (the body was read to the end)."""
        self.raw.release()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self.raw.content.is_eof():
            self.release()
        else:
            self.close()


class UpstreamClient:
    """Opens upstream responses under the configured policy."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: UpstreamSettings,
        guard: DestinationGuard,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._settings = settings
        self._guard = guard
        self._metrics = metrics if metrics is not None else Metrics()

    def count_error(self, code: str) -> None:
        """Count an upstream failure found after the headers (status, size, body)."""
        self._metrics.upstream_errors.labels(code).inc()

    async def open(
        self,
        url: str,
        headers: Mapping[str, str],
        *,
        method: str = "GET",
        first_byte_timeout: float | None = None,
        decompress: bool = True,
        kind: str = "media",
    ) -> UpstreamResponse:
        """Send ``method`` to ``url`` with exactly ``headers`` and follow redirects.

        Returns the first non-redirect response with its headers read and its body unread.
        ``kind`` labels the metrics (a resource kind, never anything from the URL).
        """
        metrics = self._metrics
        try:
            return await self._open(url, headers, method, first_byte_timeout, decompress, kind)
        except HlsRelayError as exc:
            metrics.upstream_errors.labels(exc.code).inc()
            raise

    async def _open(
        self,
        url: str,
        headers: Mapping[str, str],
        method: str,
        first_byte_timeout: float | None,
        decompress: bool,
        kind: str,
    ) -> UpstreamResponse:
        metrics = self._metrics
        settings = self._settings
        first_byte = first_byte_timeout or settings.first_byte_timeout
        timeout = aiohttp.ClientTimeout(
            sock_connect=settings.connect_timeout,
            # The socket-read timer also runs while waiting for headers; first_byte bounds that.
            sock_read=max(settings.read_timeout, first_byte),
        )
        send_headers = dict(headers)
        send_headers.setdefault("User-Agent", settings.user_agent)
        if not decompress:
            # Media is relayed byte for byte: ask for it as stored, so lengths and ranges hold.
            send_headers["Accept-Encoding"] = "identity"
        target = URL(url, encoded=True)
        for _hop in range(settings.max_redirects + 1):
            self._guard.check_url(target)
            metrics.upstream_requests.labels(kind).inc()
            started = time.perf_counter()
            with upstream_errors():
                async with asyncio.timeout(first_byte):
                    raw = await self._session.request(
                        method,
                        target,
                        headers=send_headers,
                        allow_redirects=False,
                        timeout=timeout,
                        auto_decompress=decompress,
                    )
            metrics.upstream_ttfb.labels(kind).observe(time.perf_counter() - started)
            location = raw.headers.get("Location")
            if raw.status not in REDIRECT_STATUSES or not location:
                encoding = raw.headers.get("Content-Encoding", "identity").strip().lower()
                return UpstreamResponse(
                    raw=raw, final_url=str(target), decoded=decompress and encoding != "identity"
                )
            raw.close()
            try:
                # Location is resolved against the hop it came from, byte-exact (RFC 9110 §10.2.2).
                target = target.join(URL(location.strip(), encoded=True))
            except ValueError:
                raise UpstreamUnreachable("upstream sent an invalid redirect") from None
            if raw.status == 303:
                method = "GET"
        raise UpstreamUnreachable(f"more than {settings.max_redirects} upstream redirects")

"""Talking to origins: one pooled ``ClientSession``, explicit timeouts, redirects by hand.

Every upstream request goes through :meth:`UpstreamClient.open`, which

* sends the URL byte-exact (``yarl.URL(..., encoded=True)``): CDN signatures break when re-encoded;
* sends the stream's header profile on every hop, and nothing of the viewer's own (no cookies,
  no Authorization) except the Range headers the caller passes;
* follows redirects itself, up to ``upstream.max_redirects``, checking each hop's destination;
* bounds every wait: ``connect_timeout`` to connect, ``first_byte_timeout`` (or
  ``blocking_reload_timeout`` for LL-HLS blocking reloads) to the response headers,
  ``read_timeout`` between two body chunks;
* maps aiohttp's errors to the project's own (:func:`upstream_errors`), around body reads too;
* chooses the way out (:mod:`proxy.upstream.routing`): direct, one named proxy, or the pool
  (:mod:`proxy.upstream.proxies`), sticky per stream when a ``stream_key`` is given;
* retries a GET or HEAD that failed before any byte went to the viewer (connect error, reset or
  timeout before the headers, 502/503/504) through the next proxy of the pool, with jittered
  exponential backoff, at most ``proxies.retry_attempts`` attempts within ``retry_deadline``;
* fails fast while the upstream host's circuit is open (:mod:`proxy.upstream.breaker`).

The SSRF check holds on every route: IP literals are checked here on every hop, names are
resolved and checked by each session's own ``GuardedResolver`` before a socket (or a proxy
tunnel, :mod:`proxy.upstream.transport`) is opened to the address.

The response it returns is open: the caller streams or reads it and must close it
(``async with``). A caller that stops early closes it, which drops the connection at once instead
of draining an unwanted body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn

import aiohttp
from multidict import CIMultiDictProxy
from prometheus_client import Counter, Histogram
from yarl import URL

from proxy import request_log
from proxy.errors import (
    HlsRelayError,
    PlaylistTooLarge,
    ServiceUnavailable,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.metrics import Metrics
from proxy.settings import ProxiesSettings, UpstreamSettings
from proxy.upstream.breaker import CircuitBreakers
from proxy.upstream.direct_body import DirectBodyHandler
from proxy.upstream.guard import DestinationGuard
from proxy.upstream.proxies import OutboundProxy, ProxyPool
from proxy.upstream.receive import (
    UNBUDGETED_KINDS,
    BodyFit,
    ReceiveBudget,
    set_read_size,
)
from proxy.upstream.routing import Route, Router
from proxy.upstream.transport import ProxyFailure, TunnelRefused

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Answers that another attempt (through another proxy) may well turn into a success.
RETRY_STATUSES = frozenset({502, 503, 504})
RETRY_METHODS = frozenset({"GET", "HEAD"})


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
    via: str = "direct"
    """The outbound proxy it came through (its configured name), or "direct"."""
    on_done: Callable[[], None] | None = None
    """Called once when the response is closed or released (ends a least-connections count)."""
    on_body_failure: Callable[[HlsRelayError], None] | None = None
    """Called once when the body breaks off (a reset or a stall through a proxy is its fault)."""
    chunk_limit: int | None = None
    """Largest chunk :meth:`iter_chunks` hands on from now on; None: all that is buffered (fewer,
    larger chunks, the fastest). Set from the receive share when many bodies arrive at once
    (:mod:`proxy.upstream.receive`); :meth:`limit_chunks` may lower it then."""
    taken: int = 0
    """Body bytes handed on by :meth:`read_chunk` so far."""
    on_closed: Callable[[], None] | None = None
    """Called once when the response is closed or released (counts it out of the receive
    budget)."""
    received: Counter | None = None
    """Counts body bytes as they arrive (``hlsrelay_upstream_received_bytes_total{kind}``)."""
    fit: BodyFit | None = None
    """Keeps the body's buffers and :attr:`chunk_limit` at its receive share as other bodies
    come and go (:mod:`proxy.upstream.receive`); None: no budget applies."""
    _handler: DirectBodyHandler | None = None
    """The protocol the rest of the body was taken from (:meth:`hand_over`), until it is back."""

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
        with self._body_errors():
            chunk = await self.raw.content.readany()
        if not isinstance(chunk, bytes):
            # A view of the body's memory (DirectBodyHandler): callers look into it with bytes'
            # methods. One copy, of one chunk, per body.
            chunk = bytes(chunk)
        self.taken += len(chunk)
        if self.received is not None:
            self.received.inc(len(chunk))
        return chunk

    async def read_chunk(self) -> bytes | memoryview:
        """The next bytes of the body as they arrive (b"" at end of body), errors mapped.

        A plain call, not a generator: cancelling the task that awaits it leaves the body
        readable by the next call (a generator would be closed by the cancellation).
        """
        content = self.raw.content
        fit = self.fit
        while True:
            try:
                if fit is not None and fit.check():
                    self.chunk_limit = fit.chunk_limit
                limit = self.chunk_limit
                if limit is None:
                    # Chunks as they were received: readany() would join what is buffered (a
                    # copy of every byte relayed).
                    chunk, boundary = await content.readchunk()
                    if not chunk and boundary:
                        continue  # the end of one HTTP chunk (chunked encoding), not of the body
                else:
                    chunk = await content.read(limit)
            except Exception as exc:
                # Mapped here, not by a context manager per chunk: two of those (~3 us each)
                # on every chunk of every relayed body.
                self._body_failed(exc)
            self.taken += len(chunk)
            if chunk and self.received is not None:
                self.received.inc(len(chunk))
            return chunk

    def bytes_ready(self) -> bool:
        """Whether :meth:`read_chunk` would return bytes without waiting: some are in already
        (not only the end, or an error)."""
        return self.raw.content.total_bytes > self.taken

    async def iter_chunks(self) -> AsyncIterator[bytes | memoryview]:
        """The body as it arrives, mapped errors included; ends at end of body."""
        while chunk := await self.read_chunk():
            yield chunk

    @contextlib.contextmanager
    def _body_errors(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self._body_failed(exc)

    def _body_failed(self, exc: Exception) -> NoReturn:
        """Raise ``exc`` as the project's error; report a broken body to ``on_body_failure``."""
        try:
            with upstream_errors():
                raise exc
        except (UpstreamUnreachable, UpstreamTimeout) as mapped:
            if self.on_body_failure is not None:
                on_failure, self.on_body_failure = self.on_body_failure, None
                on_failure(mapped)
            raise

    async def read_capped(self, cap: int, head: bytes = b"") -> bytes:
        """The whole body (after ``head``, bytes already read), or PlaylistTooLarge past ``cap``."""
        declared = self.raw.content_length
        if declared is not None and declared > cap and not self.raw.headers.get("Content-Encoding"):
            raise PlaylistTooLarge(f"playlist is larger than upstream.max_playlist_bytes ({cap})")
        parts: list[bytes | memoryview] = [head] if head else []
        size = len(head)
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > cap:
                raise PlaylistTooLarge(
                    f"playlist is larger than upstream.max_playlist_bytes ({cap})"
                )
            parts.append(chunk)
        return b"".join(parts)

    def hand_over(self) -> tuple[int, int] | None:
        """The upstream socket's descriptor and how many body bytes are still to come in, once
        reading has stopped for them to be moved by the caller (:mod:`proxy.splice`): first the
        chunks read already (:meth:`read_chunk` while :meth:`bytes_ready`), then those, then
        :meth:`handed_back`. None: this body is read here (TLS, chunked, decompressed, through
        aiohttp's own parser); nothing changed."""
        protocol = self._protocol()
        left = protocol.hand_over() if protocol is not None else 0
        if not left:
            return None
        assert protocol is not None
        assert protocol.transport is not None
        self._handler = protocol
        return protocol.transport.get_extra_info("socket").fileno(), left

    def movable(self) -> bool:
        """Whether :meth:`hand_over` would hand the rest of the body over (now)."""
        protocol = self._protocol()
        return protocol is not None and protocol.can_hand_over()

    def _protocol(self) -> DirectBodyHandler | None:
        connection = self.raw.connection
        protocol = connection.protocol if connection is not None else None
        if self.decoded or not isinstance(protocol, DirectBodyHandler):
            return None
        return protocol

    def moved(self, size: int) -> None:
        """``size`` more bytes of the body went from its socket to the viewer (counted as read)."""
        self.taken += size
        if self.received is not None:
            self.received.inc(size)

    def handed_back(self, moved: int) -> None:
        """The rest of the body (``moved`` bytes) went from the socket to the viewer: the body
        is whole, its connection may be reused."""
        protocol = self._handler
        assert protocol is not None
        self._handler = None
        protocol.handed_back(moved)

    def moving_failed(self, *, stalled: bool) -> NoReturn:
        """The rest of the body broke off while it was moved (cut, or ``stalled`` past the
        read timeout): raised as a read would raise it, and reported as a read's failure."""
        self._body_failed(TimeoutError() if stalled else aiohttp.ClientPayloadError("cut short"))

    def close(self) -> None:
        """Drop the connection (the body was not read to the end)."""
        self.raw.close()
        self._done()

    def release(self) -> None:
        """Hand the connection back to the pool (the body was read to the end)."""
        self.raw.release()
        self._done()

    def limit_chunks(self, size: int) -> None:
        """Hand on chunks of at most ``size`` bytes from now on, while this body's receive share
        is limited (many bodies arriving at once, :mod:`proxy.upstream.receive`): then memory is
        what matters. With few bodies, big reads cost little memory and relay fastest: kept."""
        if self.fit is not None:
            self.fit.limit_chunks(size)
            self.chunk_limit = self.fit.chunk_limit
        elif self.chunk_limit is not None:
            self.chunk_limit = min(size, self.chunk_limit)

    def _done(self) -> None:
        if self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            on_done()
        if self.on_closed is not None:
            on_closed, self.on_closed = self.on_closed, None
            on_closed()

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


class _AttemptFailed(Exception):
    """One attempt failed before the headers; what it says about the proxy and the host."""

    def __init__(
        self,
        error: HlsRelayError,
        *,
        proxy_reason: str | None,
        host_fault: bool,
        retryable: bool = True,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.proxy_reason = proxy_reason
        self.host_fault = host_fault
        self.retryable = retryable


class UpstreamClient:
    """Opens upstream responses under the configured policy."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: UpstreamSettings,
        guard: DestinationGuard,
        metrics: Metrics | None = None,
        *,
        proxies: ProxiesSettings | None = None,
        pool: ProxyPool | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self._settings = settings
        self._guard = guard
        self._metrics = metrics if metrics is not None else Metrics()
        self._proxies = proxies if proxies is not None else ProxiesSettings()
        self._pool = pool if pool is not None else ProxyPool((), self._proxies, self._metrics)
        self._router = Router(self._proxies)
        self._breakers = CircuitBreakers(
            self._proxies.breaker_failure_threshold,
            self._proxies.breaker_cooldown,
            self._metrics,
        )
        self._rng = rng or random.Random()  # jitter, not security
        self._receive = ReceiveBudget(settings.receive_budget_bytes)
        self._metrics.upstream_receiving.set_function(lambda: self._receive.open)
        self._per_kind: dict[str, tuple[Counter, Histogram, Counter]] = {}

    def _kind_metrics(self, kind: str) -> tuple[Counter, Histogram, Counter]:
        """The labelled children for one resource kind, made once (labels() takes a lock and
        checks its values on every call; kinds are a handful of fixed names)."""
        children = self._per_kind.get(kind)
        if children is None:
            m = self._metrics
            children = (
                m.upstream_requests.labels(kind),
                m.upstream_ttfb.labels(kind),
                m.upstream_bytes.labels(kind),
            )
            self._per_kind[kind] = children
        return children

    @property
    def pool(self) -> ProxyPool:
        return self._pool

    @property
    def receive_budget(self) -> ReceiveBudget:
        return self._receive

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
        stream_key: str | None = None,
    ) -> UpstreamResponse:
        """Send ``method`` to ``url`` with exactly ``headers`` and follow redirects.

        Returns the first non-redirect response with its headers read and its body unread.
        ``kind`` labels the metrics (a resource kind, never anything from the URL).
        ``stream_key`` (the stream's ctx token, or a live channel id) keeps a stream on one
        proxy and one rotated User-Agent; it is never logged.
        """
        try:
            return await self._open(
                url, headers, method, first_byte_timeout, decompress, kind, stream_key
            )
        except HlsRelayError as exc:
            self._metrics.upstream_errors.labels(exc.code).inc()
            raise

    def request_headers(
        self, headers: Mapping[str, str], decompress: bool, stream_key: str | None
    ) -> dict[str, str]:
        send_headers = dict(headers)
        if not any(name.lower() == "user-agent" for name in send_headers):
            send_headers["User-Agent"] = self._user_agent(stream_key)
        if not decompress:
            # Media is relayed byte for byte: ask for it as stored, so lengths and ranges hold.
            send_headers["Accept-Encoding"] = "identity"
        return send_headers

    def _user_agent(self, stream_key: str | None) -> str:
        agents = self._proxies.user_agents
        if not agents:
            return self._settings.user_agent
        if stream_key is None:
            return self._rng.choice(agents)
        # Stable per stream (and across instances): a stream keeps one browser identity.
        digest = hashlib.blake2b(stream_key.encode(), digest_size=8).digest()
        return agents[int.from_bytes(digest, "big") % len(agents)]

    async def _open(
        self,
        url: str,
        headers: Mapping[str, str],
        method: str,
        first_byte_timeout: float | None,
        decompress: bool,
        kind: str,
        stream_key: str | None,
    ) -> UpstreamResponse:
        target = URL(url, encoded=True)
        self._guard.check_url(target)
        host = f"{target.raw_host}:{target.port}"
        route = self._router.route(target.raw_host or "")
        send_headers = self.request_headers(headers, decompress, stream_key)
        first_byte = first_byte_timeout or self._settings.first_byte_timeout
        trial = self._breakers.check(host)
        try:
            return await self._attempts(
                route, target, host, method, send_headers, first_byte, decompress, kind, stream_key
            )
        finally:
            if trial:
                # Ends a trial that told nothing about the host (a forbidden redirect, a proxy
                # fault); a no-op once its success or failure was recorded.
                self._breakers.release_trial(host)

    async def _attempts(
        self,
        route: Route,
        target: URL,
        host: str,
        method: str,
        headers: Mapping[str, str],
        first_byte: float,
        decompress: bool,
        kind: str,
        stream_key: str | None,
    ) -> UpstreamResponse:
        """Try, and retry through the next proxy while attempts and the deadline allow."""
        proxies = self._proxies
        loop = asyncio.get_running_loop()
        retrying = route.is_pool and method in RETRY_METHODS
        attempts = proxies.retry_attempts if retrying else 1
        deadline = loop.time() + proxies.retry_deadline if retrying else math.inf
        tried: set[str] = set()
        for attempt in range(attempts):
            last = attempt == attempts - 1
            proxy = self._proxy_for(route, stream_key, frozenset(tried))
            if proxy is None:
                session = self._session
            elif proxy.session is not None:
                session = proxy.session
            else:  # never fall back to direct silently
                raise ServiceUnavailable(f"outbound proxy {proxy.name} is not open")
            done = self._pool.started(proxy) if proxy is not None else None
            wait = min(first_byte, max(0.001, deadline - loop.time()))
            started = time.perf_counter()
            try:
                response = await self._attempt(
                    session, target, method, headers, wait, decompress, kind
                )
            except _AttemptFailed as failed:
                if done is not None:
                    done()
                if proxy is not None and failed.proxy_reason is not None:
                    self._pool.failure(proxy, failed.proxy_reason)
                if failed.host_fault:
                    self._breakers.failure(host)
                if last or not failed.retryable or not await self._backoff(attempt, deadline):
                    raise failed.error from None
                if proxy is not None:
                    tried.add(proxy.name)
                self._metrics.proxy_retries.inc()
                continue
            except BaseException:
                if done is not None:
                    done()
                raise
            if proxy is not None:
                # The proxy delivered an answer: it works, whatever the upstream said.
                self._pool.success(proxy, time.perf_counter() - started)
                response.via = proxy.name
                response.on_body_failure = self._body_failure_of(proxy)
            response.on_done = done
            if response.status in RETRY_STATUSES:
                self._breakers.failure(host)
                if not last and await self._backoff(attempt, deadline):
                    response.close()
                    if proxy is not None:
                        tried.add(proxy.name)
                    self._metrics.proxy_retries.inc()
                    continue
            else:
                self._breakers.success(host)
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _body_failure_of(self, proxy: OutboundProxy) -> Callable[[HlsRelayError], None]:
        def body_failed(error: HlsRelayError) -> None:
            self._pool.failure(proxy, "timeout" if isinstance(error, UpstreamTimeout) else "reset")

        return body_failed

    def _proxy_for(
        self, route: Route, stream_key: str | None, tried: frozenset[str]
    ) -> OutboundProxy | None:
        """The proxy for the next attempt; None to go direct. Raises 503 when none is left."""
        if route.is_direct:
            return None
        pool = self._pool
        if route.is_pool:
            proxy = pool.choose(stream_key, tried)
            if proxy is None and tried:
                # Every proxy was tried once in this request: go round again.
                proxy = pool.choose(stream_key)
        else:
            named = pool.get(route.via)
            proxy = named if named is not None and pool.available(named) else None
        if proxy is not None:
            return proxy
        if self._proxies.when_all_down == "direct":
            self._metrics.proxy_fallbacks.labels("direct").inc()
            return None
        self._metrics.proxy_fallbacks.labels("fail").inc()
        raise ServiceUnavailable("no outbound proxy is available", retry_after=pool.retry_after())

    async def _backoff(self, attempt: int, deadline: float) -> bool:
        """Sleep a jittered exponential delay before the next attempt; False past the deadline."""
        loop = asyncio.get_running_loop()
        delay = self._rng.uniform(0, self._proxies.retry_backoff * 2**attempt)
        if loop.time() + delay >= deadline:
            return False
        await asyncio.sleep(delay)
        return True

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        target: URL,
        method: str,
        send_headers: Mapping[str, str],
        first_byte: float,
        decompress: bool,
        kind: str,
    ) -> UpstreamResponse:
        """One attempt through one session, redirects included (each hop checked again)."""
        budget = self._receive
        # Counted in from the request on: in a burst, the bodies whose headers are still on
        # their way share the budget too.
        closed = budget.opened() if kind not in UNBUDGETED_KINDS else None
        try:
            response = await self._hops(
                session, target, method, send_headers, first_byte, decompress, kind
            )
        except BaseException:
            if closed is not None:
                closed()
            raise
        response.on_closed = closed
        return response

    async def _hops(
        self,
        session: aiohttp.ClientSession,
        target: URL,
        method: str,
        send_headers: Mapping[str, str],
        first_byte: float,
        decompress: bool,
        kind: str,
    ) -> UpstreamResponse:
        sent, ttfb, received = self._kind_metrics(kind)
        settings = self._settings
        budget = self._receive
        timeout = aiohttp.ClientTimeout(
            sock_connect=settings.connect_timeout,
            # The socket-read timer also runs while waiting for headers; first_byte bounds that.
            sock_read=max(settings.read_timeout, first_byte),
        )
        for _hop in range(settings.max_redirects + 1):
            self._guard.check_url(target)
            sent.inc()
            started = time.perf_counter()
            read_bufsize = budget.read_bufsize(kind)
            with _attempt_errors():
                async with asyncio.timeout(first_byte):
                    raw = await session.request(
                        method,
                        target,
                        headers=send_headers,
                        allow_redirects=False,
                        timeout=timeout,
                        auto_decompress=decompress,
                        read_bufsize=read_bufsize,  # None: the session's own (aiohttp's)
                    )
            ttfb.observe(time.perf_counter() - started)
            location = raw.headers.get("Location")
            if raw.status not in REDIRECT_STATUSES or not location:
                # The host name only: a path or query can hold a signature or a credential.
                request_log.note_upstream_host(target.host)
                encoding = raw.headers.get("Content-Encoding", "identity").strip().lower()
                # Fitted now, when the bodies requested meanwhile count too, and again as
                # others come and go.
                fit = BodyFit(budget, raw, kind) if read_bufsize is not None else None
                if fit is None and kind not in UNBUDGETED_KINDS:
                    set_read_size(raw, budget.read_size(None))  # no budget: the largest reads
                return UpstreamResponse(
                    raw=raw,
                    final_url=str(target),
                    decoded=decompress and encoding != "identity",
                    received=received,
                    chunk_limit=fit.chunk_limit if fit is not None else None,
                    fit=fit,
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

    async def probe(self, proxy: OutboundProxy) -> bool:
        """Whether ``probe_url`` answers (below 400) through ``proxy``; never raises."""
        probe_url = self._proxies.probe_url
        if probe_url is None or proxy.session is None:
            return False
        target = URL(str(probe_url), encoded=True)
        timeout = aiohttp.ClientTimeout(
            total=self._proxies.probe_timeout, sock_connect=self._settings.connect_timeout
        )
        try:
            self._guard.check_url(target)
            async with proxy.session.get(
                target,
                headers={"User-Agent": self._settings.user_agent},
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                return response.status < 400
        except (HlsRelayError, aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def run_probes(self) -> None:
        """Probe ejected proxies every ``probe_interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self._proxies.probe_interval)
            await self._pool.probe_round(self.probe)


@contextlib.contextmanager
def _attempt_errors() -> Iterator[None]:
    """Map a failure before the headers to an :class:`_AttemptFailed` that says whose it was."""
    try:
        with upstream_errors():
            try:
                yield
            except ProxyFailure as exc:
                raise _AttemptFailed(
                    UpstreamUnreachable(f"outbound proxy {exc.proxy} failed ({exc.reason})"),
                    proxy_reason=exc.reason,
                    host_fault=False,
                ) from None
            except TunnelRefused as exc:
                raise _AttemptFailed(
                    UpstreamUnreachable(f"upstream unreachable through outbound proxy {exc.proxy}"),
                    proxy_reason=None,
                    host_fault=True,
                ) from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise  # a connect error: mapped below
                raise _AttemptFailed(
                    UpstreamUnreachable("upstream closed the connection before the headers"),
                    proxy_reason="reset",
                    host_fault=True,
                ) from None
    except _AttemptFailed:
        raise
    except UpstreamTimeout as exc:
        raise _AttemptFailed(exc, proxy_reason="timeout", host_fault=True) from None
    except UpstreamUnreachable as exc:
        raise _AttemptFailed(exc, proxy_reason=None, host_fault=True) from None

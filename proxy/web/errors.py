"""One middleware turns every failure into a JSON error; nothing else catches broadly."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy import request_log
from proxy.errors import HlsRelayError
from proxy.request_log import RequestFacts
from proxy.web.keys import FAST_HITS, METRICS, PREPARED_RESPONSE, REQUEST_FACTS

log = logging.getLogger("hlsrelay.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


def json_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}},
        status=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HlsRelayError as exc:
        return json_error(exc.status, exc.code, exc.message, exc.headers())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_error(exc.status, code, exc.reason, headers)
    except ConnectionResetError:
        prepared: web.StreamResponse | None = request.get(PREPARED_RESPONSE)
        if prepared is None:
            raise
        # The viewer went away mid-response (aiohttp's ClientConnectionResetError is one): how
        # a player that seeks or leaves ends a download, not a fault. aiohttp ends it quietly
        # and logs the request with what was sent. (Logged as an error, a crowd of 500 viewers
        # leaving at once formatted 500 tracebacks on the event loop: a stall of seconds.)
        return prepared
    except Exception:  # the one blanket catch: a bug must not reach the viewer as a traceback
        log.exception("unhandled error on %s", request.match_info.route.name or "unmatched")
        return json_error(500, "internal_error", "internal error")


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: counts and times every request, and opens its log facts.

    The facts (request id, upstream host, cache result) become the current ones for the
    handler's task, so lower layers can note what they did; the access logger reads them.
    """
    metrics = request.app[METRICS]
    route = request.match_info.route.name or "unmatched"
    facts = RequestFacts(request_log.request_id_from(request.headers.get("X-Request-Id")))
    request[REQUEST_FACTS] = facts
    token = request_log.begin(facts)
    started = time.perf_counter()
    stats = metrics.http
    stats.in_flight += 1
    # The fast path in front hands this connection's next requests back once this one is done.
    request.app[FAST_HITS].handler_started(request)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        request_log.end(token)
        stats.in_flight -= 1
        stats.done(route, status, time.perf_counter() - started)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: echo the request id, so a viewer's report finds its log line;
    and remember the response (its headers are going out)."""
    request[PREPARED_RESPONSE] = response
    facts = request.get(REQUEST_FACTS)
    if facts is not None:
        response.headers["X-Request-Id"] = facts.request_id

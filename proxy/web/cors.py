"""CORS for browser players: configurable origins, ``*`` without credentials by default."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.web.keys import SETTINGS

EXPOSE_HEADERS = (
    "Content-Length, Content-Range, Accept-Ranges, Content-Type, Age, ETag, Last-Modified, "
    "X-Request-Id"
)
_ALLOW_HEADERS = "Range, If-Range, If-None-Match, If-Modified-Since, Authorization, Content-Type"
_ALLOW_METHODS = "GET, HEAD, POST, OPTIONS"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allowed_origin(request: web.BaseRequest, origins: tuple[str, ...]) -> str | None:
    if "*" in origins:
        return "*"
    origin = request.headers.get("Origin")
    return origin if origin in origins else None


async def add_cors_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare hook: headers go on streamed responses too, before their first byte."""
    if not isinstance(request, web.Request):
        return
    origins = request.app[SETTINGS].security.cors_origins
    allowed = allowed_origin(request, origins)
    if allowed is None:
        return
    response.headers["Access-Control-Allow-Origin"] = allowed
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    if allowed != "*":
        response.headers.add("Vary", "Origin")


@web.middleware
async def preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer a CORS preflight for any path, before routing says 404 or 405."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return preflight()
    return await handler(request)


def preflight() -> web.Response:
    response = web.Response(status=204)
    response.headers["Access-Control-Allow-Methods"] = _ALLOW_METHODS
    response.headers["Access-Control-Allow-Headers"] = _ALLOW_HEADERS
    response.headers["Access-Control-Max-Age"] = "86400"
    return response

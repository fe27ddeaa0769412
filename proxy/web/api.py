"""The minting API: ``POST /api/v1/streams`` and ``GET /proxy.m3u8`` (for API key holders)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from yarl import URL

from proxy.errors import BadRequest, Forbidden, InvalidHeader, Unauthorized
from proxy.web.keys import RELAY, SETTINGS

_MAX_BODY_BYTES = 64 * 1024


def _check_api_key(request: web.Request, offered: str | None) -> None:
    keys = request.app[SETTINGS].security.api_keys
    if not keys:
        raise Forbidden("minting is disabled: set security.api_keys to enable it")
    if offered is None:
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        offered = value.strip() if scheme.lower() == "bearer" else None
    if not offered:
        raise Unauthorized("an API key is required (Authorization: Bearer <key>)")
    # Compare with every key, in constant time each, so timing says nothing about which matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(offered.encode(), key.get_secret_value().encode())
    if not matched:
        raise Unauthorized("invalid API key")


def _check_upstream_url(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest("'url' must be an absolute http or https URL")
    try:
        url = URL(value, encoded=True)
    except ValueError:
        raise BadRequest("'url' is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise BadRequest("'url' must be an absolute http or https URL")
    if any(c in value for c in "\r\n\x00 "):
        raise BadRequest("'url' contains whitespace or control characters")
    return value


def _public_base(request: web.Request) -> str:
    relay = request.app[RELAY]
    if relay.prefix.startswith("http"):
        return relay.prefix
    return f"{request.scheme}://{request.host}{relay.prefix}"


def _header_profile(headers: Any) -> Mapping[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise InvalidHeader("'headers' must be an object of string names to string values")
    return headers


async def create_stream(request: web.Request) -> web.Response:
    _check_api_key(request, None)
    if request.content_length is not None and request.content_length > _MAX_BODY_BYTES:
        raise BadRequest("request body too large")
    try:
        body = json.loads(await request.content.read(_MAX_BODY_BYTES + 1) or b"null")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest('body must be a JSON object: {"url": ..., "headers": {...}}')
    url = _check_upstream_url(body.get("url"))
    path = request.app[RELAY].mint(url, _header_profile(body.get("headers")))
    return web.json_response({"playlist_url": _public_base(request) + path}, status=201)


async def proxy_m3u8(request: web.Request) -> web.Response:
    query = request.query
    _check_api_key(request, query.get("api_key"))
    url = _check_upstream_url(query.get("url"))
    headers: dict[str, str] = {}
    for param, header in (
        ("referer", "Referer"),
        ("origin", "Origin"),
        ("user_agent", "User-Agent"),
    ):
        if query.get(param):
            headers[header] = query[param]
    for raw in query.getall("header", []):
        name, sep, value = raw.partition(":")
        if not sep:
            raise InvalidHeader("'header' must look like 'Name: value'")
        headers[name.strip()] = value.strip()
    path = request.app[RELAY].mint(url, headers)
    raise web.HTTPFound(location=request.app[RELAY].prefix + path)

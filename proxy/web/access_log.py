"""One log line per request, text or JSON; never a query string, token or credential.

Query strings can hold an API key (``/proxy.m3u8?api_key=``) or an upstream URL, and stream
tokens are bearer credentials for a stream: the line names the route and the cosmetic file name
instead of the path.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger


def _describe(request: web.BaseRequest) -> tuple[str, str]:
    if not isinstance(request, web.Request):
        return "unmatched", "-"
    info = request.match_info  # a dict of path parameters: empty (falsy) for /healthz
    route = info.route.name if info is not None and info.route.name else "unmatched"
    if route == "stream":
        return route, f"/s/…/{info.get('name', '')}"
    return route, request.path if route != "unmatched" else "-"


class AccessLogger(AbstractAccessLogger):
    json_lines = False

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route, path = _describe(request)
        request_id = request.headers.get("X-Request-Id", "")[:64]
        if self.json_lines:
            self.logger.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": request.method,
                        "route": route,
                        "path": path,
                        "status": response.status,
                        "bytes": response.body_length,  # headers included, as aiohttp counts
                        "duration_ms": round(time * 1000, 2),
                    },
                    separators=(",", ":"),
                )
            )
        else:
            self.logger.info(
                "%s %s %s %d %dB %.1fms %s",
                request.method,
                path,
                route,
                response.status,
                response.body_length,
                time * 1000,
                request_id,
            )


class JsonAccessLogger(AccessLogger):
    json_lines = True


def access_logger_for(log_format: str) -> type[AbstractAccessLogger]:
    return JsonAccessLogger if log_format == "json" else AccessLogger


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == "aiohttp.access" and message.startswith("{"):
            return message
        return json.dumps(
            {
                "time": self.formatTime(record),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": message,
            },
            separators=(",", ":"),
        )

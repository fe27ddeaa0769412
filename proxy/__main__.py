"""Command line: ``hlsrelay serve | sign | check-config`` (``python -m proxy`` works too).

Exit codes: 0 success, 2 a configuration or usage error (one line on stderr naming it).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from proxy.errors import HlsRelayError
from proxy.settings import ConfigError, Settings, load_settings, masked, token_secret
from proxy.tokens import TokenCodec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hlsrelay", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--config", help="config file (default: $HLSRELAY_CONFIG or config/hlsrelay.toml)"
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)

    sign = sub.add_parser("sign", help="print the proxied playlist URL for an upstream URL")
    sign.add_argument("url")
    sign.add_argument("--referer")
    sign.add_argument("--origin")
    sign.add_argument("--user-agent")
    sign.add_argument(
        "--header", action="append", default=[], metavar="'Name: value'", help="repeatable"
    )
    sign.add_argument("--config")

    check = sub.add_parser("check-config", help="validate and print the effective settings")
    check.add_argument("--config")
    return parser


# The collector's thresholds while serving: young collections after 1,500 container objects
# (net) and a middle one every 2 of them, so neither ever walks more than ~4,500 young objects;
# a full collection at most every 100 middle ones (and, as always, only once the survivors have
# grown by a quarter). Measured with 500 viewers arriving at once (bench_peers case 7): Python's
# (700, 10, 10) or (7,000, 10, 10) let the middle generation fill with a crowd's live requests,
# ~70,000 objects, and each collection of it took 20-37 ms, landing on turns already ~25 ms long
# (lag samples of 43-78 ms). (3,000, 3, 100) made them 6-17 ms (a young object costs ~1 us to
# walk there: the crowd's objects are spread over a heap of ~170 MB); these, 10 interleaved runs
# each: lag samples over 50 ms 24 -> 5, over 40 ms 53 -> 31, runs with any 7 -> 3; playlist
# rewrites and 2 MiB relays no slower.
GC_THRESHOLDS = (1_500, 2, 100)


# glibc's allocator while serving: blocks up to this size come from the heap, and up to the trim
# threshold of free memory at the heap's top is kept for the next blocks instead of being given
# back. Upstream bodies are read into blocks of up to 2 MiB (proxy/upstream/direct_body.py);
# under glibc's own adaptive thresholds (they start at 128 KiB, move with every large free, and
# trim the top at twice the mmap threshold) those blocks kept switching between fresh mmaps and a
# trimmed heap: 13-128 page faults per 2 MiB segment relayed, where these settings give 0-4, and
# bench_peers case 1 (64 segment downloads, a fresh process) 1,190 MB/s against 1,443 with them.
# The trim threshold is what an idle process may hold beyond its live memory.
MALLOC_MMAP_THRESHOLD = 4 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # glibc's mallopt() parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Set glibc's allocator thresholds for serving; False (nothing changed) under another C
    library, where these parameters mean something else or nothing."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: present there, nowhere else
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


async def tune_gc(app: web.Application) -> None:
    """Keep the garbage collector's pauses out of a crowd's first bytes.

    Modules, settings, the app and its long-lived state live as long as the process, yet a full
    collection walks all of them (~70,000 objects): 30-100 ms on this project's machine, now and
    then in the middle of 500 viewers' first bytes. Frozen, they are never walked again, and
    collections see only what requests made since; :data:`GC_THRESHOLDS` keeps each of those
    short. A server process only: a test process makes and drops many apps.
    """
    gc.collect()  # what startup left behind goes first, not into the frozen set forever
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _serve(settings: Settings) -> int:
    # Imported here so `sign` and `check-config` stay quick and need no event loop.
    from proxy.app import create_app
    from proxy.web import server
    from proxy.web.access_log import access_logger_for, configure_logging

    log_writer = configure_logging(settings.server.log_format)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = asyncio.new_event_loop()
    tune_malloc()
    app = create_app(settings)
    app.on_startup.append(tune_gc)  # after every cleanup_ctx has made its state
    logging.getLogger("hlsrelay").info(
        "hlsrelay listening on http://%s:%d%s",
        settings.server.host,
        settings.server.port,
        settings.server.base_path,
    )
    try:
        server.run(app, loop=loop, access_log_class=access_logger_for(settings.server.log_format))
    finally:
        log_writer.close()  # every pending line written before the process ends
    return 0


def _sign(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.upstream.relay import StreamMinter  # the same minting code as the API

    secret, origin = token_secret(settings)
    if origin == "generated" and settings.security.secret_file is None:
        raise ConfigError(
            "security.secret: not set, so a server would not accept what sign prints; "
            "set security.secret or security.secret_file"
        )
    headers: dict[str, str] = {}
    for value, name in (
        (args.referer, "Referer"),
        (args.origin, "Origin"),
        (args.user_agent, "User-Agent"),
    ):
        if value:
            headers[name] = value
    for raw in args.header:
        name, sep, value = raw.partition(":")
        if not sep:
            raise ConfigError(f"--header {raw!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    if not args.url.startswith(("http://", "https://")):
        raise ConfigError(f"url {args.url!r}: expected an absolute http(s) URL")
    codec = TokenCodec(
        secret,
        ttl_seconds=settings.security.token_ttl,
        expiry_bucket_seconds=settings.security.token_expiry_bucket,
    )
    relay = StreamMinter(codec, settings)
    try:
        path = relay.mint(args.url, headers)
    except HlsRelayError as exc:
        raise ConfigError(exc.message) from None
    base = relay.prefix
    if not base.startswith("http"):
        host = (
            settings.server.host if settings.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
        )
        base = f"http://{host}:{settings.server.port}{base}"
    print(base + path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        server: dict[str, object] = {}
        if getattr(args, "host", None):
            server["host"] = args.host
        if getattr(args, "port", None) is not None:
            server["port"] = args.port
        settings = load_settings(args.config, **({"server": server} if server else {}))
        if args.command == "check-config":
            token_secret_origin = (
                "set"
                if settings.security.secret is not None
                else (
                    f"from {settings.security.secret_file}"
                    if settings.security.secret_file
                    else "generated at start"
                )
            )
            doc = masked(settings)
            doc["security"]["secret_source"] = token_secret_origin
            print(json.dumps(doc, indent=2))
            return 0
        if args.command == "sign":
            return _sign(args, settings)
        return _serve(settings)
    except ConfigError as exc:
        print(f"hlsrelay: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""What one request did, for its access-log line, noted by the layers it passes through.

The web layer makes a :class:`RequestFacts` per request and makes it the current one (a context
variable) while the handler runs; lower layers note what they learn through the functions here
(the upstream client the host it reached, the cache layer its result) without knowing about
requests. The access logger reads the facts when the response is done.

Holds only what may be logged: a host name (never a path, query, port or credential), a cache
result from a fixed set, a request id that was checked. It must never hold a URL, a token or a
header value of the viewer's other than a valid request id.
"""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar, Token
from dataclasses import dataclass

# Letters, digits and a few separators: what request-id generators (nginx $request_id, UUIDs,
# ULIDs, trace ids) produce; anything else could forge log fields or smuggle a secret in.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(slots=True)
class RequestFacts:
    request_id: str
    upstream_host: str = ""
    cache: str = ""


_current: ContextVar[RequestFacts | None] = ContextVar("hlsrelay_request_facts", default=None)


# New ids are cut from a batch of random bytes: one ``getrandom`` call per id (what
# ``secrets.token_hex(8)`` makes) was ~1 µs of a cached playlist hit's ~10 µs of Python.
_ID_HEX_CHARS = 16
_IDS_PER_BATCH = 256
_new_ids: list[str] = []


def request_id_from(header: str | None) -> str:
    """The viewer's (or edge's) ``X-Request-Id`` when it is a plain token, else a new one
    (16 hex digits from the operating system's random source)."""
    if header is not None and _VALID_REQUEST_ID.fullmatch(header):
        return header
    try:
        return _new_ids.pop()
    except IndexError:
        batch = secrets.token_hex(_ID_HEX_CHARS // 2 * _IDS_PER_BATCH)
        ids = [batch[at : at + _ID_HEX_CHARS] for at in range(0, len(batch), _ID_HEX_CHARS)]
        new = ids.pop()
        _new_ids.extend(ids)
        return new


def begin(facts: RequestFacts) -> Token[RequestFacts | None]:
    return _current.set(facts)


def end(token: Token[RequestFacts | None]) -> None:
    _current.reset(token)


def current() -> RequestFacts | None:
    return _current.get()


def note_upstream_host(host: str | None) -> None:
    """Record the upstream host name the current request reached (the last hop wins)."""
    facts = _current.get()
    if facts is not None and host:
        facts.upstream_host = host


def note_cache(result: str) -> None:
    """Record the cache result of the current request (hit, miss, stale, coalesced)."""
    facts = _current.get()
    if facts is not None:
        facts.cache = result

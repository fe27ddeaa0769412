"""The object store: rewritten playlists and small media objects, in memory or in Redis.

Both backends are aiocache caches behind one small :class:`ObjectStore` API (``get``, ``set``):

* ``memory`` (default, nothing to install): :class:`LruMemoryCache`, an aiocache backend with a
  byte budget and least-recently-used eviction. aiocache 0.12's own ``SimpleMemoryCache`` has
  neither (it grows without bound, and arms one timer handle per key for expiry), so this one
  keeps an ``OrderedDict`` in recency order, checks expiry when an entry is read and evicts from
  the old end whenever the budget is exceeded.
* ``redis``: aiocache's ``RedisCache`` (on ``redis.asyncio``) with :class:`EntrySerializer`, a
  plain length-prefixed byte format. Never pickle: whoever can write to a shared Redis must not
  be able to run code in the proxy.

Keys are hashes (:func:`cache_key`): no upstream URL, header value, token or credential is ever
readable in a key. A store failure (Redis down or slow) is a miss, never an error for the viewer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiocache.base import BaseCache
from aiocache.serializers import BaseSerializer, NullSerializer
from redis.exceptions import RedisError
from yarl import URL

from proxy.metrics import Metrics
from proxy.settings import CacheSettings

log = logging.getLogger("hlsrelay.cache")

KEY_PREFIX = "hlsrelay:1:"
_MAGIC = b"HR1"
_META_LEN = struct.Struct(">I")
# What a store operation can fail with: Redis errors, a refused or cut socket, a timeout.
_STORE_ERRORS = (RedisError, OSError, TimeoutError, ValueError)


# What an entry costs besides its bodies (headers, the entry's tuple), in the store's byte budget.
_ENTRY_OVERHEAD = 256


@functools.lru_cache(maxsize=8192)  # the same few live keys are asked for again and again
def cache_key(namespace: str, *parts: str) -> str:
    """A store key for ``parts`` (token, URL, directives...): a hash, nothing readable."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:40]
    return f"{KEY_PREFIX}{namespace}:{digest}"


@dataclass(frozen=True, slots=True)
class CachedObject:
    """A response body with the headers to send it with, and when it was fetched."""

    body: bytes
    headers: tuple[tuple[str, str], ...]
    """Response headers (Content-Type, Cache-Control, ETag, Last-Modified...)."""
    stored_at: float
    """Wall-clock time (``time.time()``) it was fetched: instances sharing Redis agree on ages."""
    fresh_for: float
    """Seconds it is fresh after ``stored_at``."""
    gzip_body: bytes = b""
    """The body gzip-compressed (playlists), or empty."""

    @property
    def size(self) -> int:
        return len(self.body) + len(self.gzip_body) + _ENTRY_OVERHEAD

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.stored_at)

    def is_fresh(self, now: float | None = None) -> bool:
        return self.age(now) < self.fresh_for

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


class EntrySerializer(BaseSerializer):  # type: ignore[misc]
    """:class:`CachedObject` to bytes and back: magic, meta length, JSON meta, body, gzip body."""

    DEFAULT_ENCODING = None  # raw bytes in and out of Redis

    def dumps(self, value: CachedObject) -> bytes:
        meta = json.dumps(
            {
                "h": value.headers,
                "s": value.stored_at,
                "f": value.fresh_for,
                "b": len(value.body),
            },
            separators=(",", ":"),
        ).encode()
        return b"".join((_MAGIC, _META_LEN.pack(len(meta)), meta, value.body, value.gzip_body))

    def loads(self, value: bytes | None) -> CachedObject | None:
        if value is None:
            return None
        try:
            if value[:3] != _MAGIC:
                return None
            (meta_len,) = _META_LEN.unpack_from(value, 3)
            start = 3 + _META_LEN.size
            meta = json.loads(value[start : start + meta_len])
            body_start = start + meta_len
            body_end = body_start + int(meta["b"])
            return CachedObject(
                body=value[body_start:body_end],
                headers=tuple((str(k), str(v)) for k, v in meta["h"]),
                stored_at=float(meta["s"]),
                fresh_for=float(meta["f"]),
                gzip_body=value[body_end:],
            )
        except (ValueError, KeyError, TypeError, struct.error):
            log.warning("cache: dropped an unreadable entry")
            return None


def _raw(value: bytes) -> bytes:
    return value


# A stored entry is one flat tuple of bytes, strings and numbers: (deadline, size, value), or for
# a CachedObject (deadline, size, _PACKED, body, stored_at, fresh_for, gzip_body, then its header
# names and values in turn). The garbage collector stops tracking such a tuple at the first
# collection that sees it, a young one included. A CachedObject would stay tracked; tuples
# nested in tuples are untracked a level a collection, so they reached the oldest generation
# still tracked, and full collections walked every recent entry: with some 15,000 playlists
# stored, 30 to 100 ms of a stalled event loop each. Rebuilt on a hit (~1 µs).
_PACKED = "hlsrelay:CachedObject"
_Entry = tuple[Any, ...]


# A media body stored as the chunks it arrived in: (deadline, size, _PARTS, chunk count, the
# chunks, stored_at, fresh_for, then header names and values in turn). Joined into one bytes
# when first read, and kept joined: a segment nobody asks for again (most, with one viewer per
# stream) is never copied. Joining every 2 MiB body as it completed took ~6 % of the CPU of a
# segment relay (bench_peers case 1), its fresh memory faulted in page by page.
_PARTS = "hlsrelay:parts"
Parts = tuple[bytes | memoryview, ...]
"""A body as the chunks it arrived in (views of the body's memory when read straight into it)."""


def _pack_parts(
    parts: Parts,
    headers: tuple[tuple[str, str], ...],
    stored_at: float,
    fresh_for: float,
    deadline: float | None,
    size: int,
) -> _Entry:
    flat: list[Any] = [deadline, size, _PARTS, len(parts), *parts, stored_at, fresh_for]
    for name, header in headers:
        flat += (name, header)
    return tuple(flat)


def _pack(value: Any, deadline: float | None, size: int) -> _Entry:
    if type(value) is CachedObject:
        flat: list[Any] = [deadline, size, _PACKED, value.body, value.stored_at, value.fresh_for,
                           value.gzip_body]  # fmt: skip
        for name, header in value.headers:
            flat += (name, header)
        return tuple(flat)
    return (deadline, size, value)


def _unpack(entry: _Entry) -> Any:
    if len(entry) > 3:
        if entry[2] is _PACKED:
            headers = tuple(zip(entry[7::2], entry[8::2], strict=True))
            return CachedObject(entry[3], headers, entry[4], entry[5], entry[6])
        if entry[2] is _PARTS:
            end = 4 + entry[3]
            headers = tuple(zip(entry[end + 2 :: 2], entry[end + 3 :: 2], strict=True))
            body = b"".join(entry[4:end])
            return CachedObject(body, headers, entry[end], entry[end + 1])
    return entry[2]


def _entry_size(value: Any) -> int:
    if isinstance(value, CachedObject):
        return value.size
    if isinstance(value, (bytes, str)):
        return len(value) + 64
    return 64


class LruMemoryCache(BaseCache):  # type: ignore[misc]
    """An aiocache backend bounded by bytes, evicting the least recently used entries."""

    NAME = "lru-memory"

    def __init__(
        self, max_bytes: int, sizeof: Callable[[Any], int] = _entry_size, **kwargs: Any
    ) -> None:
        # timeout=None: memory operations never wait, and aiocache's timeout wrapper would cost
        # a task per call.
        kwargs.setdefault("timeout", None)
        super().__init__(serializer=NullSerializer(), **kwargs)
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        # key -> (value, deadline on the monotonic clock or None, size)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> Any:
        """The live value under ``key`` (marked as just used), or None; never waits."""
        item = self._entries.get(key)
        if item is None:
            return None
        deadline = item[0]
        if deadline is not None and deadline <= time.monotonic():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        value = _unpack(item)
        if item[2] is _PARTS:
            self._entries[key] = _pack(value, deadline, item[1])  # joined once, kept joined
        return value

    def _remove(self, key: str) -> bool:
        item = self._entries.pop(key, None)
        if item is None:
            return False
        self.bytes -= item[1]
        return True

    async def _get(self, key: str, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        return self.lookup(key)

    async def _gets(self, key: str, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        return self.lookup(key)

    async def _multi_get(
        self, keys: list[str], encoding: str | None = "utf-8", _conn: Any = None
    ) -> list[Any]:
        return [self.lookup(key) for key in keys]

    def put(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` under ``key`` (evicting the least recently used); never waits."""
        size = self._sizeof(value)
        return self._put(key, size, ttl, lambda deadline: _pack(value, deadline, size))

    def put_parts(
        self,
        key: str,
        parts: Parts,
        headers: tuple[tuple[str, str], ...],
        stored_at: float,
        ttl: float,
    ) -> bool:
        """Store a :class:`CachedObject` of ``parts`` (joined when first read), fresh for
        ``ttl`` s."""
        size = sum(map(len, parts)) + _ENTRY_OVERHEAD
        return self._put(
            key,
            size,
            ttl,
            lambda deadline: _pack_parts(parts, headers, stored_at, ttl, deadline, size),
        )

    def _put(
        self, key: str, size: int, ttl: float | None, entry: Callable[[float | None], _Entry]
    ) -> bool:
        self._remove(key)
        if size > self.max_bytes:
            return False
        self._entries[key] = entry(time.monotonic() + ttl if ttl else None)
        self.bytes += size
        while self.bytes > self.max_bytes and self._entries:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.evictions += 1
        return True

    async def _set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        _cas_token: Any = None,
        _conn: Any = None,
    ) -> bool:
        return self.put(key, value, ttl)

    async def _multi_set(
        self, pairs: list[tuple[str, Any]], ttl: float | None = None, _conn: Any = None
    ) -> bool:
        for key, value in pairs:
            await self._set(key, value, ttl=ttl)
        return True

    async def _add(self, key: str, value: Any, ttl: float | None = None, _conn: Any = None) -> bool:
        if self.lookup(key) is not None:
            raise ValueError("key already exists")
        return await self._set(key, value, ttl=ttl)

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return self.lookup(key) is not None

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return int(self._remove(key))

    async def _expire(self, key: str, ttl: float, _conn: Any = None) -> bool:
        if self.lookup(key) is None:
            return False
        item = self._entries[key]
        self._entries[key] = (time.monotonic() + ttl if ttl else None, *item[1:])
        return True

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        for key in [k for k in self._entries if not namespace or k.startswith(namespace)]:
            self._remove(key)
        return True

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        return None


class ObjectStore:
    """``get``/``set`` of :class:`CachedObject` by key on an aiocache cache; failures are misses."""

    def __init__(self, cache: Any, *, backend: str, metrics: Metrics | None = None) -> None:
        self._cache = cache
        self._memory = cache if isinstance(cache, LruMemoryCache) else None
        self.backend = backend
        self._metrics = metrics if metrics is not None else Metrics()
        self._last_error_log = 0.0

    @property
    def shared(self) -> bool:
        """Whether other instances see what this one stores."""
        return self.backend == "redis"

    @property
    def bytes(self) -> int:
        return int(getattr(self._cache, "bytes", 0))

    @property
    def entries(self) -> int:
        return len(self._cache) if isinstance(self._cache, LruMemoryCache) else 0

    async def get(self, key: str) -> CachedObject | None:
        if self._memory is not None:
            # The hot path of every hit: read the LRU directly rather than through aiocache's
            # per-call wrappers (timeout, plugins, environment lookup), which do nothing here.
            value = self._memory.lookup(key)
            return value if isinstance(value, CachedObject) else None
        try:
            value = await self._cache.get(key)
        except _STORE_ERRORS as exc:
            self._failed("get", exc)
            return None
        return value if isinstance(value, CachedObject) else None

    async def set(self, key: str, value: CachedObject, ttl: float) -> None:
        if ttl <= 0:
            return
        if self._memory is not None:
            self._memory.put(key, value, float(ttl))  # as get: aiocache's wrappers do nothing here
            return
        try:
            await self._cache.set(key, value, ttl=float(ttl))
        except _STORE_ERRORS as exc:
            self._failed("set", exc)

    async def set_parts(
        self,
        key: str,
        parts: Parts,
        headers: tuple[tuple[str, str], ...],
        stored_at: float,
        ttl: float,
    ) -> None:
        """Store a body that arrived in ``parts`` (fresh for ``ttl`` s), joined only when needed:
        in memory, when first read; in Redis, by the serializer's one join as it is sent."""
        if ttl <= 0:
            return
        if self._memory is not None:
            self._memory.put_parts(key, parts, headers, stored_at, float(ttl))
            return
        await self.set(key, CachedObject(b"".join(parts), headers, stored_at, ttl), ttl)

    async def lease(self, key: str, ttl: float) -> bool:
        """Whether this instance may fetch ``key`` now (other instances sharing the store wait).

        Only a shared store has leases; in memory, the process's own single-flight is enough.
        A lease nobody releases expires after ``ttl``. A failing store grants it: better one
        more upstream request than none.
        """
        if not self.shared:
            return True
        try:
            await self._cache.add(f"{key}:lease", b"1", ttl=float(ttl), dumps_fn=_raw)
        except ValueError:
            return False  # another instance holds it
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("lease", exc)
        return True

    async def leased(self, key: str) -> bool:
        """Whether another instance still holds the lease on ``key``."""
        if not self.shared:
            return False
        try:
            return bool(await self._cache.exists(f"{key}:lease"))
        except _STORE_ERRORS as exc:
            self._failed("lease", exc)
            return False

    async def release(self, key: str) -> None:
        if not self.shared:
            return
        try:
            await self._cache.delete(f"{key}:lease")
        except _STORE_ERRORS as exc:
            self._failed("release", exc)

    def _failed(self, operation: str, exc: BaseException) -> None:
        self._metrics.cache_errors.labels(operation).inc()
        now = time.monotonic()
        if now - self._last_error_log > 10:  # one line per 10 s, not one per request
            self._last_error_log = now
            log.warning("cache %s failed on %s: %s", self.backend, operation, type(exc).__name__)

    async def close(self) -> None:
        client = getattr(self._cache, "client", None)
        if client is not None and hasattr(client, "aclose"):
            # aiocache 0.12's close() calls redis' deprecated close(); aclose() is the same.
            await client.aclose()
        else:
            await self._cache.close()


def open_store(settings: CacheSettings, metrics: Metrics | None = None) -> ObjectStore:
    """The store ``[cache]`` asks for (not connected yet: Redis connects on first use)."""
    if settings.backend == "redis":
        from aiocache import RedisCache  # needs the redis package, only for this backend

        url = URL(settings.redis_url)
        pool_kwargs: dict[str, Any] = {}
        if url.user:
            pool_kwargs["username"] = url.user
        cache = RedisCache(
            serializer=EntrySerializer(),
            endpoint=url.host or "127.0.0.1",
            port=url.port or 6379,
            db=int(url.path.strip("/") or 0),
            password=url.password,
            ssl=url.scheme == "rediss",
            timeout=settings.redis_timeout,
            create_connection_timeout=settings.redis_timeout,
            connection_pool_kwargs=pool_kwargs,
        )
        return ObjectStore(cache, backend="redis", metrics=metrics)
    return ObjectStore(LruMemoryCache(settings.memory_bytes), backend="memory", metrics=metrics)


__all__ = [
    "CachedObject",
    "EntrySerializer",
    "LruMemoryCache",
    "ObjectStore",
    "cache_key",
    "open_store",
]

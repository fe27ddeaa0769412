"""Channel leases: at most one instance runs a live channel's ffmpeg at a time.

Instances sharing a Redis (``cache.backend = "redis"``) take a lease per channel before they
start its session: ``SET hlsrelay:live-lease:{channel} {owner} NX PX {ttl}``. The owner renews
it while the session runs (a compare-and-``PEXPIRE`` script, so only the holder can extend it)
and deletes it when the session stops (compare-and-``DEL``). When the owner dies, its lease
expires after at most ``live.lease_ttl`` seconds and the next instance asked for the channel
takes it over. The owner value is the instance name plus a random part per process, so two
instances configured with the same name still never share a lease.

Without Redis (one instance) :class:`LocalLeases` grants everything.

Safety over availability: a lease that cannot be taken (Redis unreachable) refuses the start
(503 with Retry-After), and a session whose lease could not be renewed for a whole TTL, or was
found taken by another instance, is reported lost and stopped by the pool. Never logs the Redis
URL (it may hold a password).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Iterable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("hlsrelay.live")

KEY_PREFIX = "hlsrelay:live-lease:"

# Extend the lease only while it is still ours (another owner's lease is never touched).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LeaseUnavailable(Exception):
    """The lease store cannot be reached: whether another instance runs the channel is unknown."""


class ChannelLeases(Protocol):
    owner: str

    async def acquire(self, channel_id: str) -> float | None:
        """Take the channel's lease: None when it is ours now, else the seconds until the
        current owner's lease runs out. Raises :class:`LeaseUnavailable`."""

    async def renew(self, channel_ids: Iterable[str]) -> set[str]:
        """Extend the leases of running channels; the channels whose lease is lost."""

    async def release(self, channel_id: str) -> None:
        """Give the lease up (the session stopped); never raises."""

    async def close(self) -> None: ...


class LocalLeases:
    """One instance, no shared store: every lease is granted."""

    def __init__(self, owner: str) -> None:
        self.owner = owner

    async def acquire(self, channel_id: str) -> float | None:
        return None

    async def renew(self, channel_ids: Iterable[str]) -> set[str]:
        return set()

    async def release(self, channel_id: str) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisLeases:
    """Leases in a Redis shared by every instance."""

    def __init__(self, redis_url: str, instance_name: str, ttl: float, timeout: float) -> None:
        self.owner = f"{instance_name}/{secrets.token_hex(4)}"
        self._ttl_ms = max(1, int(ttl * 1000))
        self._ttl = ttl
        self._redis: Redis = Redis.from_url(
            redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        # Monotonic time until which each held lease is known to be ours.
        self._valid_until: dict[str, float] = {}

    async def acquire(self, channel_id: str) -> float | None:
        key = KEY_PREFIX + channel_id
        started = time.monotonic()
        try:
            if await self._redis.set(key, self.owner, nx=True, px=self._ttl_ms):
                self._valid_until[channel_id] = started + self._ttl
                return None
            remaining_ms = await self._redis.pttl(key)
        except (RedisError, OSError) as exc:
            raise LeaseUnavailable(f"lease store unreachable ({type(exc).__name__})") from None
        # -2: the key expired between SET and PTTL; the next try takes it.
        return max(0.0, remaining_ms / 1000) if remaining_ms >= 0 else 0.0

    async def renew(self, channel_ids: Iterable[str]) -> set[str]:
        lost: set[str] = set()
        now = time.monotonic()
        for channel_id in channel_ids:
            try:
                kept = await self._renew(
                    keys=[KEY_PREFIX + channel_id], args=[self.owner, self._ttl_ms]
                )
            except (RedisError, OSError) as exc:
                # Still ours until the last renewal's TTL runs out; past it, another instance
                # may have taken the channel over.
                if now >= self._valid_until.get(channel_id, 0.0):
                    log.warning("live %s: lease not renewed (%s)", channel_id, type(exc).__name__)
                    lost.add(channel_id)
                continue
            if kept:
                self._valid_until[channel_id] = now + self._ttl
            else:
                log.warning("live %s: lease taken by another instance", channel_id)
                lost.add(channel_id)
        for channel_id in lost:
            self._valid_until.pop(channel_id, None)
        return lost

    async def release(self, channel_id: str) -> None:
        self._valid_until.pop(channel_id, None)
        try:
            await self._release(keys=[KEY_PREFIX + channel_id], args=[self.owner])
        except (RedisError, OSError) as exc:  # it expires on its own
            log.warning("live %s: lease not released (%s)", channel_id, type(exc).__name__)

    async def close(self) -> None:
        await self._redis.aclose()


def retry_after(seconds: float) -> int:
    """Whole seconds to tell a viewer to wait for another owner's lease (at least one)."""
    return max(1, math.ceil(seconds))

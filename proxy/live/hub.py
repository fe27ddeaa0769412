"""The fan-out hub: one reader's TS packets to many consumers, none of which may stall it.

Every consumer (ffmpeg's stdin writer, each raw-TS viewer) has a :class:`Subscription`, a queue
bounded in bytes. :meth:`FanOutHub.publish` never waits: a consumer whose queue is full is
dropped (its next :meth:`Subscription.get` returns ``None``), the others go on.

The hub also keeps the stream since its last video keyframe (a "GOP cache": the last PAT and
PMT, then every packet from the keyframe on). A new consumer starts with it, so a restarted
ffmpeg cuts its first segment one GOP sooner and a raw-TS viewer's picture appears at once.
Keyframes are found from the TS headers alone: a packet that starts a video PES (stream id
0xE0-0xEF) with the random-access indicator set.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Subscription:
    """One consumer's bounded queue of TS chunks."""

    def __init__(self, hub: FanOutHub, max_bytes: int) -> None:
        self._hub = hub
        self._chunks: deque[bytes] = deque()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()
        self.closed = False
        self.dropped = False
        """Closed because it fell behind by more than its buffer."""

    def _offer(self, chunk: bytes) -> bool:
        if self.closed:
            return False
        if self._bytes + len(chunk) > self._max_bytes:
            self.dropped = True
            self.close()
            return False
        self._chunks.append(chunk)
        self._bytes += len(chunk)
        self._ready.set()
        return True

    async def get(self) -> bytes | None:
        """The next chunk, or None when the subscription ended (hub closed, or dropped)."""
        while not self._chunks:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        chunk = self._chunks.popleft()
        self._bytes -= len(chunk)
        return chunk

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.dropped:
                self._chunks.clear()
                self._bytes = 0
            self._ready.set()
            self._hub._forget(self)


TS_PACKET = 188
# The GOP cache gives up (until the next keyframe) past this size: a source without usable
# keyframe flags must not grow it without end.
_GOP_CACHE_MAX_BYTES = 16 * 1024 * 1024


class FanOutHub:
    """Publishes whole TS packets to every subscription; counts what went in."""

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        self.bytes_in = 0
        self.closed = False
        self._pat = b""
        self._pmt_pids: set[int] = set()
        self._pmts: dict[int, bytes] = {}
        self._gop: list[bytes] = []
        self._gop_bytes = 0

    def subscribe(self, max_bytes: int) -> Subscription:
        """A new consumer, starting at the last keyframe when there is one."""
        sub = Subscription(self, max_bytes)
        if self.closed:
            sub.closed = True
            return sub
        self._subscriptions.append(sub)
        if self._gop and self._pat and self._pmts and self._gop_bytes < max_bytes // 2:
            sub._offer(self._pat + b"".join(self._pmts.values()))
            for chunk in self._gop:
                sub._offer(chunk)
        return sub

    def publish(self, chunk: bytes) -> None:
        """Offer ``chunk`` (whole packets, from a sync byte) to every consumer; never waits."""
        self.bytes_in += len(chunk)
        self._cache(chunk)
        for sub in list(self._subscriptions):
            sub._offer(chunk)

    def reset(self) -> None:
        """The source switched: what is cached belongs to the old stream."""
        self._pat, self._pmt_pids, self._pmts = b"", set(), {}
        self._gop, self._gop_bytes = [], 0

    def _cache(self, chunk: bytes) -> None:
        keyframe_at = -1
        # Only packets that start a payload (PUSI) can be PAT, PMT or a keyframe's PES.
        for index, flags in enumerate(chunk[1::TS_PACKET]):
            if not flags & 0x40:
                continue
            offset = index * TS_PACKET
            packet = chunk[offset : offset + TS_PACKET]
            pid = ((flags & 0x1F) << 8) | packet[2]
            if pid == 0:
                self._pat = packet
                self._pmt_pids = _pmt_pids(packet)
            elif pid in self._pmt_pids:
                self._pmts[pid] = packet
            elif _is_video_keyframe(packet):
                keyframe_at = offset
        if keyframe_at >= 0:
            tail = chunk[keyframe_at:]
            self._gop, self._gop_bytes = [tail], len(tail)
        elif self._gop:
            self._gop.append(chunk)
            self._gop_bytes += len(chunk)
            if self._gop_bytes > _GOP_CACHE_MAX_BYTES:
                self._gop, self._gop_bytes = [], 0

    def _forget(self, sub: Subscription) -> None:
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def close(self) -> None:
        self.closed = True
        for sub in list(self._subscriptions):
            sub.close()


def _payload(packet: bytes) -> bytes:
    control = (packet[3] >> 4) & 0x3
    if not control & 0x1:
        return b""
    start = 4 + (1 + packet[4] if control & 0x2 else 0)
    return packet[start:]


def _pmt_pids(pat: bytes) -> set[int]:
    """PMT PIDs listed in a single-packet PAT."""
    payload = _payload(pat)
    if not payload:
        return set()
    section = payload[1 + payload[0] :]  # skip the pointer field
    if len(section) < 8 or section[0] != 0x00:
        return set()
    length = ((section[1] & 0x0F) << 8) | section[2]
    entries = section[8 : min(len(section), 3 + length - 4)]  # minus the CRC
    pids = set()
    for i in range(0, len(entries) - 3, 4):
        program = (entries[i] << 8) | entries[i + 1]
        if program != 0:  # 0 is the network PID
            pids.add(((entries[i + 2] & 0x1F) << 8) | entries[i + 3])
    return pids


def _is_video_keyframe(packet: bytes) -> bool:
    """A packet starting a video PES, flagged as a random access point."""
    control = (packet[3] >> 4) & 0x3
    if not control & 0x2 or packet[4] == 0 or not packet[5] & 0x40:
        return False
    payload = _payload(packet)
    return len(payload) >= 4 and payload[:3] == b"\x00\x00\x01" and 0xE0 <= payload[3] <= 0xEF

"""The segment window, the playlist written from it, the hub and the TS packet aligner."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.live.hub import FanOutHub
from proxy.live.session import remove_stale_dirs
from proxy.live.source import NotTransportStream, PacketAligner, backoff_delay
from proxy.live.window import SegmentWindow

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_window_playlist_sequences_and_discontinuities() -> None:
    window = SegmentWindow(3, 2.0, first_sequence=100)
    for _ in range(4):
        window.add(b"x", 2.0, T0)
    window.mark_discontinuity()
    window.add(b"y", 1.5, T0)
    text = window.render().decode()
    lines = text.splitlines()
    assert lines[0] == "#EXTM3U"
    assert "#EXT-X-TARGETDURATION:2" in lines
    assert "#EXT-X-MEDIA-SEQUENCE:102" in lines
    assert "#EXT-X-DISCONTINUITY-SEQUENCE:0" in lines
    assert [line for line in lines if line.endswith(".ts")] == ["102.ts", "103.ts", "104.ts"]
    assert lines.index("#EXT-X-DISCONTINUITY") == lines.index("104.ts") - 3
    assert text.count("#EXT-X-PROGRAM-DATE-TIME:") == 3
    # Contiguous segments: each date follows the previous by its duration.
    assert "#EXT-X-PROGRAM-DATE-TIME:2026-01-01T00:00:02.000Z" in lines  # 102
    assert "#EXT-X-PROGRAM-DATE-TIME:2026-01-01T00:00:04.000Z" in lines  # 103
    # After the discontinuity the date comes from the wall clock again.
    assert "#EXT-X-PROGRAM-DATE-TIME:2025-12-31T23:59:58.500Z" in lines  # 104
    for _ in range(3):
        window.add(b"z", 2.0, T0)
    # The discontinuity left the playlist: the discontinuity sequence counts it.
    assert "#EXT-X-DISCONTINUITY-SEQUENCE:1" in window.render().decode()
    assert "#EXT-X-DISCONTINUITY\n" not in window.render().decode()
    assert window.get(104) is not None and window.get(99) is None
    for _ in range(10):
        window.add(b"z", 2.0, T0)
    assert "#EXT-X-DISCONTINUITY-SEQUENCE:1" in window.render().decode()
    assert "#EXT-X-TARGETDURATION:2" in window.render().decode()


def test_target_duration_fixed_from_the_first_segment() -> None:
    window = SegmentWindow(3, 1.0)
    window.add(b"x", 2.5, T0)
    window.add(b"x", 1.0, T0)
    assert "#EXT-X-TARGETDURATION:3" in window.render().decode()


async def test_hub_drops_a_slow_subscriber_and_keeps_the_others() -> None:
    hub = FanOutHub()
    slow = hub.subscribe(1000)
    fast = hub.subscribe(1000)
    received = []

    async def consume() -> None:
        while (chunk := await fast.get()) is not None:
            received.append(chunk)

    task = asyncio.create_task(consume())
    for _ in range(20):
        hub.publish(b"\x47" * 188)
        await asyncio.sleep(0)
    assert slow.dropped and slow.closed
    assert await slow.get() is None
    assert not fast.dropped
    hub.close()
    await task
    assert len(received) == 20
    assert hub.subscribers == 0


def test_packet_aligner() -> None:
    packets = b"".join(b"\x47" + bytes([i]) * 187 for i in range(10))
    aligner = PacketAligner()
    out = aligner.feed(b"junk" + packets[:500]) + aligner.feed(packets[500:])
    assert out == packets[: len(out)] and len(out) % 188 == 0 and len(out) >= 188 * 9
    bad = PacketAligner()
    page = b"<!DOCTYPE html><html>" + b"x" * 100_000
    with pytest.raises(NotTransportStream, match="HTML"):
        bad.feed(page)


def test_backoff_grows_jittered_and_capped() -> None:
    assert 0.4 <= backoff_delay(0, 30) <= 0.6
    assert 3.2 <= backoff_delay(3, 30) <= 4.8
    assert backoff_delay(40, 30) <= 36


def _packet(pid: int, *, pusi: bool = False, payload: bytes = b"", rai: bool = False) -> bytes:
    head = bytes([0x47, (0x40 if pusi else 0) | (pid >> 8), pid & 0xFF])
    if rai:
        adaptation = bytes([1, 0x40])
        body = adaptation + payload
        packet = head + bytes([0x30]) + body
    else:
        packet = head + bytes([0x10]) + payload
    return packet + b"\xff" * (188 - len(packet))


def test_hub_starts_new_consumers_at_the_last_keyframe() -> None:
    # PAT: program 1 -> PMT PID 0x1000 (section: table 0, length 13, ..., entry, CRC).
    pat_section = bytes([0x00, 0xB0, 13, 0, 1, 0xC1, 0, 0, 0, 1, 0xF0, 0x00, 0, 0, 0, 0])
    pat = _packet(0, pusi=True, payload=b"\x00" + pat_section)
    pmt = _packet(0x1000, pusi=True, payload=b"\x00\x02pmt")
    key = _packet(0x100, pusi=True, rai=True, payload=b"\x00\x00\x01\xe0key")
    audio_key = _packet(0x101, pusi=True, rai=True, payload=b"\x00\x00\x01\xc0aud")
    delta = _packet(0x100, pusi=True, payload=b"\x00\x00\x01\xe0delta")
    hub = FanOutHub()
    hub.publish(pat + pmt + delta + delta)
    late = hub.subscribe(10_000)
    assert late._chunks == deque()  # no keyframe seen yet: nothing to start from
    hub.publish(delta + key + audio_key + delta)
    hub.publish(delta)
    joiner = hub.subscribe(10_000)
    assert b"".join(joiner._chunks) == pat + pmt + key + audio_key + delta + delta
    hub.reset()
    assert hub.subscribe(10_000)._chunks == deque()


def test_stale_session_dirs_of_dead_servers_are_removed(tmp_path: Path) -> None:
    gone = tmp_path / "hlsrelay-live-999999999-abc"
    gone.mkdir()
    (gone / "r1-0.ts").write_bytes(b"x")
    mine = tmp_path / f"hlsrelay-live-{os.getpid()}-def"
    mine.mkdir()
    other = tmp_path / "unrelated"
    other.mkdir()
    assert remove_stale_dirs(tmp_path) == 1
    assert not gone.exists() and mine.exists() and other.exists()

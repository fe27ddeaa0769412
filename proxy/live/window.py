"""The segment window of a live session, and the playlist the proxy writes from it.

Pure bookkeeping, no I/O. Media sequence numbers only grow (also across ffmpeg restarts and
source switches); a segment that follows a restart carries ``EXT-X-DISCONTINUITY`` and the
discontinuity sequence counts those that left the window. The target duration is fixed once
the first segment is known.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

# Segments kept after they leave the playlist, for players a reload behind.
_GRACE_SEGMENTS = 3


@dataclass(frozen=True, slots=True)
class Segment:
    sequence: int
    duration: float
    data: bytes = field(repr=False)
    discontinuity: bool
    program_date_time: datetime


class SegmentWindow:
    """The last ``size`` segments of a session (plus a few kept for late players)."""

    def __init__(self, size: int, segment_seconds: float, first_sequence: int = 0) -> None:
        self.size = size
        self._segment_seconds = segment_seconds
        self._segments: deque[Segment] = deque()
        self._next_sequence = first_sequence
        self._first_sequence = first_sequence
        self._pending_discontinuity = False
        self.discontinuity_sequence = 0
        self.target_duration: int | None = None

    def mark_discontinuity(self) -> None:
        """The next segment follows a restart or a source switch."""
        if self._next_sequence != self._first_sequence:
            self._pending_discontinuity = True

    def add(self, data: bytes, duration: float, now: datetime | None = None) -> Segment:
        now = now or datetime.now(UTC)
        last = self._segments[-1] if self._segments else None
        discontinuity = self._pending_discontinuity
        if last is not None and not discontinuity:
            # Contiguous media: the clock follows the media, not the wall.
            pdt = last.program_date_time + timedelta(seconds=last.duration)
        else:
            pdt = now - timedelta(seconds=duration)
        segment = Segment(self._next_sequence, duration, data, discontinuity, pdt)
        self._next_sequence += 1
        self._pending_discontinuity = False
        if self.target_duration is None:
            self.target_duration = max(math.ceil(self._segment_seconds), _nearest(duration), 1)
        elif _nearest(duration) > self.target_duration:
            # EXTINF rounded must not exceed the target duration; of the two rules players
            # follow that one, so the target grows when the source's GOP does.
            self.target_duration = _nearest(duration)
        self._segments.append(segment)
        while len(self._segments) > self.size + _GRACE_SEGMENTS:
            if self._segments.popleft().discontinuity:
                self.discontinuity_sequence += 1
        return segment

    def listed(self) -> list[Segment]:
        return list(self._segments)[-self.size :]

    def get(self, sequence: int) -> Segment | None:
        if not self._segments:
            return None
        index = sequence - self._segments[0].sequence
        if 0 <= index < len(self._segments):
            return self._segments[index]
        return None

    @property
    def last_sequence(self) -> int:
        return self._next_sequence - 1

    def __len__(self) -> int:
        return len(self._segments)

    def render(self) -> bytes:
        """The live media playlist of the window (segment URIs relative: ``{sequence}.ts``)."""
        listed = self.listed()
        first = listed[0].sequence if listed else self._next_sequence
        # Discontinuities that left the playlist count into EXT-X-DISCONTINUITY-SEQUENCE.
        gone = sum(1 for s in self._segments if s.sequence < first and s.discontinuity)
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            f"#EXT-X-TARGETDURATION:{self.target_duration or math.ceil(self._segment_seconds)}",
            f"#EXT-X-MEDIA-SEQUENCE:{first}",
            f"#EXT-X-DISCONTINUITY-SEQUENCE:{self.discontinuity_sequence + gone}",
            "#EXT-X-INDEPENDENT-SEGMENTS",
        ]
        for segment in listed:
            if segment.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            stamp = segment.program_date_time.isoformat(timespec="milliseconds")
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{stamp.replace('+00:00', 'Z')}")
            lines.append(f"#EXTINF:{segment.duration:.3f},")
            lines.append(f"{segment.sequence}.ts")
        return ("\n".join(lines) + "\n").encode()


def _nearest(seconds: float) -> int:
    """Rounded to the nearest integer, halves up (RFC 8216 §4.3.3.1), not to even."""
    return int(seconds + 0.5)

"""What the supervisor watches besides its children: mic audio dropped because the mic ring was
full (its reader, the realtime process, stalled or was restarting). Pure: the supervisor feeds
the ring's overrun count each round and publishes what :class:`DropWatch` says, once per stall.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.pcm import RATE_HZ

DROP_REPORT_EVERY_S = 5.0        #: mic audio dropped in a stall that goes on is reported this often


@dataclass
class DropWatch:
    """A ring's overrun count as episodes (pure): :meth:`update` with the count each round returns
    the frames to report once the count stops growing, or every ``every_s`` while it grows."""
    every_s: float = DROP_REPORT_EVERY_S
    reported: int = 0                 #: the count at the last report
    seen: int = 0                     #: the count at the last update
    since: float | None = None        #: when the unreported frames began

    def update(self, total: int, now: float) -> int | None:
        grew = total > self.seen
        self.seen = total
        pending = total - self.reported
        if pending <= 0:
            return None
        if self.since is None:
            self.since = now
        if grew and now - self.since < self.every_s:
            return None
        self.reported, self.since = total, None
        return pending


def mic_dropped(frames: int, total: int) -> dict[str, Any]:
    """The ``engine.error`` (code ``mic_dropped``) for ``frames`` dropped, ``total`` in the session."""
    return {"source": "supervisor", "code": "mic_dropped", "ring": "mic",
            "dropped_frames": frames, "dropped_ms": frames * 1000 // RATE_HZ, "dropped_frames_total": total,
            "message": f"{frames / RATE_HZ:.2f} s of mic audio dropped: the mic ring was full "
                       "(its reader, the realtime process, stalled or was restarting); "
                       f"{total / RATE_HZ:.2f} s in this session"}

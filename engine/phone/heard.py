"""What the caller has heard, from the marks the phone side echoes. Pure: the clock comes in.

The call's "ring index" is the count of µ-law frames (bytes, 8 kHz) sent to the phone side, in
the same index space as the realtime core's playout (each ``Play`` is sent whole, at once).

Rules:
- A mark goes after every ``mark_every_frames`` of sent audio and at the end of each item; the
  phone side echoes it once the audio before it has played (Twilio's documented behaviour).
- The heard index is the index of the latest echoed mark, plus the wall time since that echo at
  8 frames a ms; it never passes the oldest mark not yet echoed (its audio has not all been
  heard), nor what was sent.
- Audio sent while the caller hears nothing (everything sent was heard) starts playing when it
  is sent: the interpolation restarts from there.
- ``clear`` ends everything sent: the heard index at that instant is what the caller heard; the
  marks still pending come back at once (Twilio echoes them when clear drops their audio) and are
  ignored; the index space goes on from what was sent.
- A *gap* is an item's audio sent after the caller, by the heard index, had heard everything sent
  before it, mid-item (not the item's first audio: after an end mark or a ``clear`` the phone is
  meant to be quiet). Its length is from when the phone ran out (the anchor plus what was sent
  after it, at 8 frames a ms) to the send; one over GAP_TOLERANCE_MS is counted. The network's
  latency moves both ends alike, so it cancels. The echoes are not timed for this: an echo our
  own loop or the network holds back would look like a gap, while it only moves the heard index
  later (gaps are then missed, never invented).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.phone.twilio import MEDIA_RATE_HZ

FRAMES_PER_S = MEDIA_RATE_HZ
#: a gap shorter than this is not counted: the phone's 20 ms player starts a stretch up to a tick
#: after it arrives (so the estimate runs up to 20 ms early), plus 10 ms of scheduling
GAP_TOLERANCE_MS = 30


@dataclass(frozen=True)
class PendingMark:
    name: str
    index: int                 #: frames sent before it
    end_of_item: bool
    item_start: int | None     #: for an end mark: the item's first frame


@dataclass(frozen=True)
class Echo:
    """An echoed mark we were waiting for."""
    mark: PendingMark
    heard_index: int


class HeardClock:
    def __init__(self, mark_every_frames: int = 1600, start_index: int = 0) -> None:
        self.mark_every_frames = mark_every_frames
        self.sent_frames = start_index
        self.pending: OrderedDict[str, PendingMark] = OrderedDict()
        self.anchor_index = start_index        #: heard at anchor_s
        self.anchor_s = 0.0
        self.last_mark_index = start_index
        self.marks_sent = 0
        self.echoes = 0
        self.stale_echoes = 0                  #: echoes of marks a clear dropped, or unknown names
        self.gaps = 0                          #: gaps at the phone (audio sent after it ran out mid-item)
        self.gap_ms = 0.0                      #: their length in all
        self.new_gaps: list[tuple[float, int]] = []   #: (ms, index) of gaps not yet taken (:meth:`take_gaps`)
        self._item_start_next = True           #: the next audio sent is an item's first (after an end mark, a clear)

    def heard_index(self, now_s: float) -> int:
        limit = self.sent_frames
        if self.pending:
            limit = min(limit, next(iter(self.pending.values())).index)
        guess = self.anchor_index + round(max(0.0, now_s - self.anchor_s) * FRAMES_PER_S)
        return max(self.anchor_index, min(guess, limit))

    def frames_to_next_mark(self) -> int:
        """Frames still to send before the next periodic mark is due (at least 1)."""
        return max(1, self.mark_every_frames - (self.sent_frames - self.last_mark_index))

    def sent(self, frames: int, now_s: float) -> list[PendingMark]:
        """``frames`` more were sent; returns the marks to send after them (due every mark_every_frames)."""
        if self.heard_index(now_s) >= self.sent_frames:   # the caller heard all: this starts playing now
            if not self._item_start_next:                 # mid-item: the phone ran out before this came
                gap_s = now_s - self.anchor_s - (self.sent_frames - self.anchor_index) / FRAMES_PER_S
                if gap_s * 1000 > GAP_TOLERANCE_MS:
                    self.gaps += 1
                    self.gap_ms += gap_s * 1000
                    self.new_gaps.append((gap_s * 1000, self.sent_frames))
            self.anchor_index, self.anchor_s = self.sent_frames, now_s
        self._item_start_next = False
        self.sent_frames += frames
        if self.sent_frames - self.last_mark_index >= self.mark_every_frames:
            return [self._mark(False, None)]
        return []

    def end_of_item(self, item_start: int | None) -> PendingMark:
        self._item_start_next = True
        return self._mark(True, item_start)

    def _mark(self, end: bool, item_start: int | None) -> PendingMark:
        self.marks_sent += 1
        mark = PendingMark(f"rt{self.marks_sent}", self.sent_frames, end, item_start)
        self.pending[mark.name] = mark
        self.last_mark_index = self.sent_frames
        return mark

    def echoed(self, name: str, now_s: float) -> Echo | None:
        mark = self.pending.get(name)
        if mark is None:
            self.stale_echoes += 1
            return None
        for older in list(self.pending):   # marks come back in order: earlier ones are played too
            done = self.pending.pop(older)
            if done is mark:
                break
        self.echoes += 1
        if mark.index >= self.heard_index(now_s) or mark.index > self.anchor_index:
            self.anchor_index, self.anchor_s = mark.index, now_s
        return Echo(mark, self.heard_index(now_s))

    def take_gaps(self) -> list[tuple[float, int]]:
        """The gaps (ms, index) counted since the last call."""
        out, self.new_gaps = self.new_gaps, []
        return out

    def clear(self, now_s: float) -> int:
        """``clear`` was sent: returns what the caller heard; everything sent is gone from their ear."""
        heard = self.heard_index(now_s)
        self.pending.clear()
        self.anchor_index, self.anchor_s = self.sent_frames, now_s
        self.last_mark_index = self.sent_frames
        self._item_start_next = True
        return heard

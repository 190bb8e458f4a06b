"""What the caller has heard, from the marks the phone side echoes. Pure: the clock comes in.

The call's "ring index" is the count of µ-law frames (bytes, 8 kHz) sent to the phone side, in
the same index space as the realtime core's playout (each ``Play`` is sent whole, at once).

Rules:
- A mark goes after every ``mark_every_frames`` of sent audio and at the end of each item; the
  frames a cushion inserted (engine.phone.cushion) do not count toward the next mark, so marks
  stay on the reply's delta boundaries and a delta is not cut in two for one. The phone side
  echoes a mark once the audio before it has played (Twilio's documented behaviour).
- The heard index is the index of the latest echoed mark, plus the wall time since that echo at
  8 frames a ms; it never passes the oldest mark not yet echoed (its audio has not all been
  heard), nor what was sent.
- Audio sent while the caller hears nothing (everything sent was heard) starts playing when it
  is sent: the interpolation restarts from there.
- ``clear`` ends everything sent: the heard index at that instant is what the caller heard; the
  marks still pending come back at once (Twilio echoes them when clear drops their audio) and are
  ignored; the index space goes on from what was sent.
- The phone *ran out* when the heard index reached what was sent: at the anchor plus what was
  sent after it, at 8 frames a ms. The estimate runs up to a player tick (20 ms) early.
- A *gap* is an item's audio sent more than GAP_TOLERANCE_MS after the phone ran out, mid-item
  (not the item's first audio: after an end mark or a ``clear`` the phone is meant to be quiet);
  counted, with its length from the run-out to the send. The network's latency moves both ends
  alike, so it cancels. The echoes are not timed for this: an echo our own loop or the network
  holds back would look like a gap, while it only moves the heard index later (gaps are then
  missed). A message's wait in the bridge's own send queue is not seen (under load a gap can read
  longer than the caller heard).
- ``drained`` (the start hold's question: does the next audio start a stretch?): the phone ran out,
  and mid-item over GAP_TOLERANCE_MS ago (a gap). So a delta that may still be in time is never
  held: holding it would make the gap it feared.
- Frames the core counted that were never sent (a ``clear`` dropped them while held) are passed
  to ``clear``: the index space moves past them, as the core's does.
- The heard index runs late by the echo's trip back, and what was sent counts audio still on its
  way: so ``sent_frames - heard_index`` reads the phone's buffer high by the round trip. Audio
  sent to a phone that has heard everything starts playing once it arrives; the first echo after
  it, less the audio before its mark, is the round trip (plus the phone's player tick, 0-20 ms).
  ``round_trip_s`` is the least of those (None before the first): a reader that must not
  overestimate the buffer (engine.phone.catchup) subtracts it.
- What the *caller* heard (:meth:`HeardClock.heard_by_caller`, what a barge-in truncates at): the
  heard index, but audio that started a stretch is heard only once it reached the phone, half
  the least round trip after it was sent; the heard index itself (gaps, the buffer's level) stays
  on the send's clock, where the latency cancels.
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
        #: sent frames a cushion inserted (not the reply's), less the reply's frames left out (never sent)
        self.inserted_frames = 0
        self._inserted_at_last_mark = 0
        self.marks_sent = 0
        self.echoes = 0
        self.stale_echoes = 0                  #: echoes of marks a clear dropped, or unknown names
        self.gaps = 0                          #: gaps at the phone (audio sent after it ran out mid-item)
        self.gap_ms = 0.0                      #: their length in all
        self.new_gaps: list[tuple[float, int]] = []   #: (ms, index) of gaps not yet taken (:meth:`take_gaps`)
        self.skipped_frames = 0                #: counted by the core, never sent (``clear``'s unsent_frames)
        self._item_start_next = True           #: the next audio sent is an item's first (after an end mark, a clear)
        self.round_trip_s: float | None = None  #: the least round trip measured (rules)
        self._drained_send: tuple[int, float] | None = None   #: (index, time) audio last started a stretch
        self._anchored_at_send = False         #: the anchor is a send that started a stretch (not an echo)

    def heard_index(self, now_s: float) -> int:
        limit = self.sent_frames
        if self.pending:
            limit = min(limit, next(iter(self.pending.values())).index)
        guess = self.anchor_index + round(max(0.0, now_s - self.anchor_s) * FRAMES_PER_S)
        return max(self.anchor_index, min(guess, limit))

    def heard_by_caller(self, now_s: float) -> int:
        """What the caller has heard (module rules): the heard index, less the one-way trip while the
        anchor is audio that started a stretch (without a measured round trip, the heard index)."""
        if self._anchored_at_send and self.round_trip_s is not None:
            return self.heard_index(now_s - self.round_trip_s / 2)
        return self.heard_index(now_s)

    def ran_out_s(self, now_s: float) -> float | None:
        """How long ago the phone ran out of what was sent (None: it has not, by the heard index)."""
        if self.heard_index(now_s) < self.sent_frames:
            return None
        return max(0.0, now_s - self.anchor_s - (self.sent_frames - self.anchor_index) / FRAMES_PER_S)

    def _is_gap(self, ran_out_s: float | None) -> bool:
        """Whether audio sent ``ran_out_s`` after the phone ran out is a gap (mid-item, over the tolerance)."""
        return ran_out_s is not None and not self._item_start_next and ran_out_s * 1000 > GAP_TOLERANCE_MS

    def drained(self, now_s: float) -> bool:
        """Whether audio now starts a stretch: an item's first audio once the phone ran out, or a gap."""
        ran_out_s = self.ran_out_s(now_s)
        return (ran_out_s is not None and self._item_start_next) or self._is_gap(ran_out_s)

    def _since_mark(self) -> int:
        """The reply's frames sent since the last mark (a cushion's insertions left out)."""
        return self.sent_frames - self.last_mark_index - (self.inserted_frames - self._inserted_at_last_mark)

    def frames_to_next_mark(self) -> int:
        """The reply's frames still to send before the next periodic mark is due (at least 1)."""
        return max(1, self.mark_every_frames - self._since_mark())

    def sent(self, frames: int, now_s: float, inserted_frames: int = 0) -> list[PendingMark]:
        """``frames`` more were sent (``inserted_frames`` of them a cushion's); returns the marks to
        send after them (due every mark_every_frames of the reply's)."""
        ran_out_s = self.ran_out_s(now_s)
        if ran_out_s is not None:                           # the caller heard all: this starts playing now
            if self._is_gap(ran_out_s):
                self.gaps += 1
                self.gap_ms += ran_out_s * 1000
                self.new_gaps.append((ran_out_s * 1000, self.sent_frames))
            self.anchor_index, self.anchor_s = self.sent_frames, now_s
            self._anchored_at_send = True
            if frames > 0:
                self._drained_send = (self.sent_frames, now_s)
        self._item_start_next = False
        self.sent_frames += frames
        self.inserted_frames += inserted_frames
        if self._since_mark() >= self.mark_every_frames:
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
        self._inserted_at_last_mark = self.inserted_frames
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
        if self._drained_send is not None and mark.index > self._drained_send[0]:
            first, sent_s = self._drained_send
            trip_s = max(0.0, now_s - sent_s - (mark.index - first) / FRAMES_PER_S)
            self.round_trip_s = trip_s if self.round_trip_s is None else min(self.round_trip_s, trip_s)
            self._drained_send = None
        if mark.index >= self.heard_index(now_s) or mark.index > self.anchor_index:
            self.anchor_index, self.anchor_s = mark.index, now_s
            self._anchored_at_send = False
        return Echo(mark, self.heard_index(now_s))

    def take_gaps(self) -> list[tuple[float, int]]:
        """The gaps (ms, index) counted since the last call."""
        out, self.new_gaps = self.new_gaps, []
        return out

    def clear(self, now_s: float, unsent_frames: int = 0) -> int:
        """``clear`` was sent: returns what the caller heard; everything sent is gone from their ear.
        ``unsent_frames``: what the core counted that the clear dropped before it was sent (held):
        the index space moves past it too."""
        heard = self.heard_index(now_s)
        self.sent_frames += unsent_frames
        self.skipped_frames += unsent_frames
        self.pending.clear()
        self._drained_send = None
        self.anchor_index, self.anchor_s = self.sent_frames, now_s
        self._anchored_at_send = False
        self.last_mark_index = self.sent_frames
        self._inserted_at_last_mark = self.inserted_frames
        self._item_start_next = True
        return heard

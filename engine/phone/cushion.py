"""The cushion: once a stretch of audio to the phone has started, its first audio is slowed a
little (pitch periods inserted: engine/audio/stretch.py at 8 kHz) until the phone's buffer
holds ``cushion_ms`` more than the start hold gave it. Pure: µ-law in, µ-law out.

Why: Twilio plays what it is sent from its own buffer, and audio once sent cannot be slowed.
The start hold (engine.phone.hold) gives a stretch the jitter buffer's target as margin: the
99th percentile of the delta delays the call measured, plus 10 ms. That start meets the latency
goal, but one delta in a hundred is later than it, and each such delta is a gap the caller
hears. The engine's speaker time-stretches the audio it still holds when its level falls
(NetEQ's preemptive expand); the phone's buffer is Twilio's, so the bridge stretches audio as it
sends it instead, right after the start: the reply starts after the hold alone, and the margin
grows to hold + cushion within the first deltas. That costs nothing at the start, and the
cushion's few ms of slower speech are spread over its first few hundred ms.

Rules:
- :meth:`start` begins a stretch (audio goes to a phone that has heard all it was sent): the
  stretcher's history is forgotten, and ``cushion_ms`` of frames is the budget to insert
  (:func:`cushion_ms`: half the hold, 10 to 60 ms; a 1 % delta later than hold + cushion is
  the rare one at any jitter the hold's percentile describes).
- :meth:`audio` returns the µ-law to send, and where frames were inserted in it. The original
  bytes go unchanged; insertions go between them, one after every PIECE_FRAMES of audio at
  most, each one pitch period (2.5-15 ms) or, in a period shorter than MAX_INSERT_FRAMES, as
  many periods as fit. Nothing is inserted before the stretch has sent a longest period (the
  history the splice is matched against), nor once the budget is spent, nor into ``fmt``s
  other than G.711.
- Inserted frames are the phone's, not the reply's: :class:`IndexMap` turns a phone index
  (frames sent, insertions included: the heard clock's space) into the core's ring index (the
  reply's own frames), so a truncation still names the reply's audio the caller heard. A phone
  index inside an insertion maps to the reply frame the insertion came before. The map also
  takes frames left out (engine.phone.catchup: a negative insertion, the reply's frames the phone
  never got): past them, a phone index maps that many frames further on; at the very index they
  were left out, to the frame before them for what was heard, after them for what is sent next.
- The budget is spent once per stretch: a stretch's later audio goes through untouched, so the
  cushion does not ratchet up with each late delta (a gap starts a new stretch, after a new hold).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import numpy as np

from engine.audio.stretch import CUSHION_EVERY_MS, CUSHION_MAX_MS, CUSHION_MIN_MS, CUSHION_SHARE, TimeStretcher
from engine.codec import G711_RATE_HZ, g711_decode, g711_encode

FRAMES_PER_MS = G711_RATE_HZ // 1000
#: at most one insertion per CUSHION_EVERY_MS of audio (≤ 15 ms each: ≤ 27 % slower)
PIECE_FRAMES = CUSHION_EVERY_MS * FRAMES_PER_MS
MAX_INSERT_FRAMES = 10 * FRAMES_PER_MS  #: short periods repeat up to this (one long one may exceed it)
#: insertions the index map remembers: older indices are long heard (a reply's worth is a handful)
INDEX_MAP_POINTS = 512


def cushion_ms(hold_ms: float) -> float:
    """The cushion a stretch builds after a hold of ``hold_ms`` (engine/audio/stretch.py's policy:
    CUSHION_SHARE of it, within [CUSHION_MIN_MS, CUSHION_MAX_MS]; a clean link's 5 ms hold gets the
    least)."""
    return float(min(CUSHION_MAX_MS, max(CUSHION_MIN_MS, CUSHION_SHARE * hold_ms)))


@dataclass(frozen=True)
class Insertion:
    """``frames`` inserted at ``offset`` (bytes of the returned µ-law before them)."""
    offset: int
    frames: int


class Cushion:
    def __init__(self, fmt: str = "audio/pcmu") -> None:
        self.fmt = fmt
        self.stretcher = TimeStretcher(rate_hz=G711_RATE_HZ)
        self.budget_frames = 0          #: still to insert in this stretch
        self._since_insert = 0          #: frames sent since the last insertion (or the stretch's start)
        self._out = np.zeros(self.stretcher.max_period + MAX_INSERT_FRAMES, dtype=np.int16)
        self.stretches = 0              #: stretches started
        self.inserted_frames = 0        #: frames inserted in all
        self.insertions = 0

    def start(self, cushion_ms: float) -> None:
        """A stretch begins: forget the history; insert up to ``cushion_ms`` in its first audio."""
        self.stretcher.reset()
        self.budget_frames = max(0, round(cushion_ms * FRAMES_PER_MS)) if self.fmt in ("audio/pcmu", "audio/pcma") else 0
        self._since_insert = 0
        self.stretches += 1

    def audio(self, data: bytes) -> tuple[bytes, list[Insertion]]:
        """G.711 ``data`` to send; returns it with this stretch's insertions, and where they are."""
        if self.budget_frames <= 0:
            return data, []
        pcm = g711_decode(data, self.fmt)
        st = self.stretcher
        parts: list[bytes] = []
        insertions: list[Insertion] = []
        sent = 0          # bytes of the returned µ-law so far
        i = 0
        while i < len(pcm):
            if self.budget_frames > 0 and self._since_insert >= PIECE_FRAMES and st.history_frames >= st.max_period:
                n = st.expand(pcm[i:], self._out, min(self.budget_frames, MAX_INSERT_FRAMES))
                if n:
                    inserted = self._out[:n]
                    parts.append(g711_encode(inserted, self.fmt))
                    st.remember(inserted)
                    insertions.append(Insertion(sent, n))
                    sent += n
                    self.budget_frames -= n
                    self.inserted_frames += n
                    self.insertions += 1
                    self._since_insert = 0
            # on to the next place an insertion may go, or the end of the data (an insertion due
            # but not made: too little audio left after it to splice into; the next data tries)
            due_in = PIECE_FRAMES - self._since_insert
            step = min(len(pcm) - i, due_in if due_in > 0 else len(pcm))
            parts.append(data[i:i + step])
            st.remember(pcm[i:i + step])
            sent += step
            self._since_insert += step
            i += step
        return b"".join(parts), insertions


class IndexMap:
    """Phone index (frames sent to the phone, insertions included, frames left out not) -> the
    core's ring index."""

    def __init__(self) -> None:
        self._at: list[int] = []          #: phone index of each insertion's first frame, ascending
        self._before: list[int] = []      #: frames inserted before it (net of those left out)
        self._frames: list[int] = []      #: its length (negative: frames left out there)
        self.total_frames = 0             #: inserted in all, less the frames left out

    def inserted(self, phone_index: int, frames: int) -> None:
        """``frames`` were inserted at ``phone_index`` (at or after every earlier insertion's end);
        negative: that many of the reply's frames were left out there."""
        self._at.append(phone_index)
        self._before.append(self.total_frames)
        self._frames.append(frames)
        self.total_frames += frames
        if len(self._at) > INDEX_MAP_POINTS:
            del self._at[0], self._before[0], self._frames[0]

    def core_index(self, phone_index: int, next_sent: bool = False) -> int:
        """The reply frame the phone was at: ``phone_index`` less the inserted frames before it
        (plus those left out). ``next_sent``: the reply frame the phone index of the next frame to
        send stands for (past frames left out at that very index)."""
        # the last insertion starting before phone_index (at it too, for the next frame to send)
        k = (bisect_right if next_sent else bisect_left)(self._at, phone_index) - 1
        if k < 0:
            return phone_index - (self._before[0] if self._before else self.total_frames)
        return phone_index - self._before[k] - min(self._frames[k], phone_index - self._at[k])

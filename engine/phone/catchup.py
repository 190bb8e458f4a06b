"""Catch-up on a continuous track: the latency a stall added to the phone's buffer is given back
by leaving out silent frames. Pure: the level and the clock come in, G.711 in, G.711 out.

Why: a GPT-Live call's output is one track for the whole call, silence included (docs
live-protocol.md: two deltas in three of a real session were digital silence). When the link
stalls, the phone's buffer runs dry (a gap the caller hears, counted by engine.phone.heard), and
the stalled deltas then come in a burst. The bridge sends them on at once (the phone side paces
them), so the phone's buffer holds the stall from then on: a 200 ms stall is 200 ms more latency
for the rest of the call, in every answer and every barge-in. Realtime's replies do not keep it:
each reply starts on a drained phone. The engine's speaker gives it back by time-stretching
(engine/playback/renderer.py, a continuous stream); audio once sent to the phone cannot be
stretched, so the bridge leaves out frames it has not sent yet, and only silent ones, which the
caller cannot hear missing.

Rules:
- Only for a continuous track (``Play.continuous``); a Realtime reply is never touched.
- :meth:`observe` takes the phone's level (frames sent and not yet heard, less the round trip:
  engine.phone.heard) each time audio goes out, before it goes. The least level of each
  LEVEL_WINDOW_S window (the level that closes it included) is what the buffer kept through the
  window: latency, not margin. When a window closes with its least above ``keep + SLACK_MS``,
  the budget becomes the least less ``keep`` (back to keep, not below); a window that closes at
  or under it sets the budget to 0. The budget is set, never added to, and each level caps it
  at that level less ``keep``: what was left out is never left out twice, and a phone that ran
  low (or dry) meanwhile loses nothing more. A window overdue (no audio went out for a while)
  starts again from the level that closed it.
- Before the round trip is measured (None) nothing is left out: the level read from the echoes
  would be high by it.
- ``keep`` is what the phone is meant to hold: the start hold plus the cushion after it
  (engine.phone.hold, engine.phone.cushion), so the two never work against each other.
- :meth:`audio` leaves out whole SKIP_FRAMES frames (20 ms) in which every sample is within
  QUIET_LEVEL of zero, while the budget holds a whole frame; a frame of speech, a part frame at
  the end of the data, and anything while the budget is short go unchanged. It returns where
  frames were left out, so the index map (engine.phone.cushion) keeps a truncation on the
  reply's frames.
- The round trip the level is corrected by is the least measured, plus up to one 20 ms tick of
  the phone's player: it errs long, so the phone keeps at least ``keep``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.codec import G711_RATE_HZ, g711_table

FRAMES_PER_MS = G711_RATE_HZ // 1000
LEVEL_WINDOW_S = 1.0           #: the window whose least level is latency the buffer kept
SLACK_MS = 20                  #: a least level this far above keep is left alone (one phone frame)
SKIP_FRAMES = 20 * FRAMES_PER_MS   #: what is left out at a time: one 20 ms phone frame
#: a frame is silent when every sample is within this of zero (int16; about -54 dBFS): the model's
#: digital silence and its near-silent tails, never speech
QUIET_LEVEL = 64


@dataclass(frozen=True)
class Skip:
    """``frames`` left out after ``offset`` bytes of the returned G.711."""
    offset: int
    frames: int


class CatchUp:
    def __init__(self, fmt: str = "audio/pcmu") -> None:
        self.quiet = np.abs(g711_table(fmt).astype(np.int32)) <= QUIET_LEVEL   #: code byte -> silent
        self.budget_frames = 0           #: still to leave out
        self.keep_frames = 0             #: what the phone is meant to hold, as last observed
        self.window_end_s: float | None = None
        self.window_least_frames: int | None = None
        self.skipped_frames = 0          #: left out in all

    def observe(self, level_frames: int | None, keep_frames: int, now_s: float) -> None:
        """The phone holds ``level_frames`` at ``now_s`` (None: not known yet, the round trip not
        measured) and is meant to hold ``keep_frames``."""
        self.keep_frames = keep_frames
        if level_frames is None:
            self.budget_frames, self.window_end_s, self.window_least_frames = 0, None, None
            return
        least = level_frames if self.window_least_frames is None else min(self.window_least_frames, level_frames)
        if self.window_end_s is None:
            self.window_end_s = now_s + LEVEL_WINDOW_S
        elif now_s >= self.window_end_s:
            over = least - keep_frames
            self.budget_frames = over if over > SLACK_MS * FRAMES_PER_MS else 0
            overdue = now_s >= self.window_end_s + LEVEL_WINDOW_S
            self.window_end_s = now_s + LEVEL_WINDOW_S if overdue else self.window_end_s + LEVEL_WINDOW_S
            least = level_frames
        self.window_least_frames = least
        self.budget_frames = max(0, min(self.budget_frames, level_frames - keep_frames))

    def audio(self, data: bytes) -> tuple[bytes, list[Skip]]:
        """G.711 ``data`` about to be sent; returns it without the frames the budget leaves out,
        and where they were."""
        if self.budget_frames < SKIP_FRAMES or len(data) < SKIP_FRAMES:
            return data, []
        whole = len(data) // SKIP_FRAMES
        codes = np.frombuffer(data, dtype=np.uint8, count=whole * SKIP_FRAMES).reshape(whole, SKIP_FRAMES)
        silent = self.quiet[codes].all(axis=1)
        if not silent.any():
            return data, []
        parts: list[bytes] = []
        skips: list[Skip] = []
        kept = 0            # bytes of the returned data so far
        start = 0           # the first byte of data not yet placed
        for k in np.flatnonzero(silent):
            if self.budget_frames < SKIP_FRAMES:
                break
            at = int(k) * SKIP_FRAMES
            parts.append(data[start:at])
            kept += at - start
            if skips and skips[-1].offset == kept:
                skips[-1] = Skip(kept, skips[-1].frames + SKIP_FRAMES)
            else:
                skips.append(Skip(kept, SKIP_FRAMES))
            start = at + SKIP_FRAMES
            self.budget_frames -= SKIP_FRAMES
            self.skipped_frames += SKIP_FRAMES
        parts.append(data[start:])
        return b"".join(parts), skips

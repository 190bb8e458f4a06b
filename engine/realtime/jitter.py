"""The adaptive jitter buffer's target: how long a stream waits before it plays, from the delta
arrival jitter this session has measured. Pure: arrival times and audio lengths in, a target out.

WebRTC's NetEQ sets its target delay from the jitter it measures and changes it continuously
(``DelayManager``: relative arrival delays into a forgetting histogram, a high quantile of it as
the target). This is that idea, written for this engine's streams:

Rules:
- A stream is one reply's audio (Realtime) or a session's continuous track (GPT-Live). Each
  delta's *relative arrival delay* is how much later than real-time playout it came, measured
  against the earliest-arriving schedule of the stream's last :data:`WINDOW_S` seconds:
  ``r = (arrival - audio_before_it) - min(arrival_j - audio_before_j)`` over that window. The
  first delta of a stream has ``r = 0``; a server sending ahead of real time gives ``r = 0``
  (the buffer fills by itself); a late delta gives the lateness the buffer must have absorbed.
  The window makes a continuous track immune to clock drift, as NetEQ's is.
- Delays go into a histogram of :data:`BUCKET_MS` buckets up to :data:`MAX_MS`, which forgets:
  each new delay scales the others by :data:`FORGET` (a half-life of about 500 deltas: a late
  delta is remembered for several replies, a clean stretch slowly lowers the target). The
  buckets are 1 ms: the quantile is read at its bucket's upper edge, and NetEQ's 20 ms (or
  our first 5 ms) would add up to a bucket of pure rounding to a clean link's 15 ms target.
  Forgetting is done by weighing each new delay 1/FORGET more than the last (renormalised
  now and then), so a delta costs one bucket's update, not a pass over the histogram.
- The target is the :data:`QUANTILE` of the histogram (:data:`PHONE_QUANTILE` for a phone
  call), at least :data:`JITTER_FLOOR_MS`, plus
  a margin: :data:`MARGIN_MS` for the speaker (one device period: a stream starts inside the
  callback that reaches its start); none for a phone call, whose player runs on the phone's
  side (its phase only adds margin) and whose bridge builds a cushion after each start
  (engine.phone.cushion), clamped to
  [:data:`MIN_MS`, :data:`MAX_MS`]. Until :data:`MIN_DELTAS` delays are measured the target is
  the configured start value (``audio.prebuffer_ms``): no history, no bet.
- A delay the histogram holds as an outlier (beyond the quantile) does not move the target: the
  time-stretcher rides it out, and if the player still runs dry, the player's own growth after
  an underrun (the speaker's renderer, the phone's start hold: +20 ms, half given back per clean
  reply) adds to the target. So one late delta costs latency for a few replies, not the session.
- Hosts time each delta where it arrives (:meth:`audio`, in the callback that took the API
  event) and hand the target on: the realtime process in the speaker ring's ``target_frames``
  (engine/audio/ring.py), a phone call to its start hold. ``audio.jitter_buffer: fixed`` makes
  no estimator at all: the players keep the configured ``audio.prebuffer_ms``.
"""
from __future__ import annotations

from collections import deque

import numpy as np

BUCKET_MS = 1
MAX_MS = 500
MIN_MS = 0
WINDOW_S = 2.0
FORGET = 0.9986           #: 0.5 ** (1 / 500): a delay weighs half as much 500 deltas later
#: the speaker's: its renderer's time-stretcher covers the rest (it expands below half the target).
#: NetEQ's DelayManager reads 0.95 of its histogram, and its expand conceals what comes later still.
#: At 30 ms of jitter, 16 replies twice each: 0.99 started at p99 93.5-94.0 ms, 0.98 at 79.8-81.2,
#: 0.97 at 72.5-90.7 with an underrun in one run; none at 0.98 or 0.99 (bench/results/2026-12.md)
QUANTILE = 0.98
#: a phone call's: audio once sent to the phone cannot be slowed (only the cushion after each
#: start stretches it), so the hold covers more of the tail
PHONE_QUANTILE = 0.99
MARGIN_MS = 10.0
#: the least jitter any link is credited with. A clean loopback's p99 of 1-3 ms gave 13 ms targets
#: that left a delta 1-2 ms before the callback that reads it, and the native backend ran dry once
#: in 8 replies (each underrun then adds 20 ms to the next start): bench/results/2026-12.md
JITTER_FLOOR_MS = 5.0
MIN_DELTAS = 20


class JitterEstimator:
    """``audio`` (or ``stream_started`` / ``delta``) as audio arrives; ``target_ms()`` for the next
    start and the level while a stream plays."""

    def __init__(self, start_ms: float, margin_ms: float = MARGIN_MS, quantile: float = QUANTILE) -> None:
        self.start_ms = float(start_ms)
        self.margin_ms = float(margin_ms)      #: added to the quantile (MARGIN_MS: the speaker's device period)
        self.quantile = float(quantile)        #: of the delays the target covers (QUANTILE: the speaker's)
        self.buckets = np.zeros(MAX_MS // BUCKET_MS + 1)
        self.weight = 0.0                      #: the histogram's total weight (in units of ``_inc``)
        self._inc = 1.0                        #: the weight the next delay gets: 1/FORGET times the last
        self.deltas = 0                        #: delays measured in this session
        self._audio_s = 0.0                    #: audio of the current stream before the next delta
        #: (arrival - audio before it) of the window's deltas, for the earliest-schedule minimum
        self._schedule: deque[tuple[float, float]] = deque()
        self.last_delay_ms = 0.0
        self.max_delay_ms = 0.0

    def audio(self, arrival_s: float, audio_s: float, starts: bool) -> float:
        """A delta of ``audio_s`` seconds arrived at ``arrival_s`` (``starts``: a stream's first);
        the target after it, in ms."""
        if starts:
            self.stream_started()
        self.delta(arrival_s, audio_s)
        return self.target_ms()

    def stream_started(self) -> None:
        """The next delta is a new stream's first: it anchors the schedule."""
        self._audio_s = 0.0
        self._schedule.clear()

    def delta(self, arrival_s: float, audio_s: float) -> float:
        """A delta of ``audio_s`` seconds of audio arrived at ``arrival_s``; its relative delay (ms)."""
        offset = arrival_s - self._audio_s             # when real-time playout of it would be due, less a constant
        self._audio_s += audio_s
        sched = self._schedule
        while sched and arrival_s - sched[0][0] > WINDOW_S:
            sched.popleft()
        while sched and sched[-1][1] >= offset:       # a monotonic queue: its front is the window's minimum
            sched.pop()
        sched.append((arrival_s, offset))
        delay_ms = max(0.0, (offset - sched[0][1]) * 1000.0)
        self._add(delay_ms)
        self.last_delay_ms = delay_ms
        self.max_delay_ms = max(self.max_delay_ms, delay_ms)
        return delay_ms

    def _add(self, delay_ms: float) -> None:
        i = min(len(self.buckets) - 1, int(delay_ms // BUCKET_MS))
        self.buckets[i] += self._inc
        self.weight += self._inc
        self._inc /= FORGET            # the same as scaling every older delay by FORGET
        if self._inc > 1e12:           # renormalise long before a float could lose a delay's weight
            self.buckets /= self._inc
            self.weight /= self._inc
            self._inc = 1.0
        self.deltas += 1

    def quantile_ms(self, q: float | None = None) -> float:
        """The ``q`` quantile (default: the estimator's) of the measured delays (upper edge of its bucket)."""
        if q is None:
            q = self.quantile
        if self.weight <= 0:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.buckets), q * self.weight * (1 - 1e-12)))
        return float(min(MAX_MS, (i + 1) * BUCKET_MS))

    @property
    def measured(self) -> bool:
        """Enough delays are measured to trust the estimate (before: the configured start)."""
        return self.deltas >= MIN_DELTAS

    def target_ms(self) -> float:
        """How long the next stream waits after its first delta arrived, in ms."""
        if not self.measured:
            return self.start_ms
        return float(min(MAX_MS, max(MIN_MS, max(self.quantile_ms(), JITTER_FLOOR_MS) + self.margin_ms)))

    def target_frames(self, rate_hz: int) -> int:
        """``target_ms()`` in frames at ``rate_hz`` (at least 1: 0 means "no target" in the ring)."""
        return max(1, round(self.target_ms() * rate_hz / 1000))

"""Time-stretching for the jitter buffer: pitch-period insertion and removal.

What WebRTC's NetEQ calls *preemptive expand* and *accelerate*, on int16 mono (24 kHz, the
speaker's; or 8 kHz, the phone's, with ``TimeStretcher(rate_hz=8000)``):
when the playback ring runs low mid-response, :meth:`TimeStretcher.expand` plays one
pitch period of the latest output again (so the ring drains slower and a late delta
arrives before it runs dry); once the buffer is ample again, :meth:`TimeStretcher.accelerate`
leaves one period out, giving back the latency the expansion added. Both splice at the lag
where the waveform best matches itself (normalized cross-correlation) and cross-fade over
that period, so voiced speech keeps its pitch and nothing clicks.

Sizes are fixed up front; a call works in preallocated buffers (numpy temporaries of a few
hundred samples aside), for the device callback. No I/O, no logging. No maintained Python
library does this in a streaming callback (audiotsm and librosa work on whole signals).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

RATE_HZ = 24_000            #: the rate the frame constants below are for (the speaker's stream)
MIN_PERIOD_FRAMES = 60     #: 400 Hz, the highest pitch looked for
MAX_PERIOD_FRAMES = 360    #: 66 Hz, the lowest
MATCH_FRAMES = 120         #: 5 ms compared at each candidate lag
QUIET_RMS = 100.0          #: below this RMS (-50 dBFS) any lag splices cleanly: take the longest
LOOKAHEAD_FRAMES = 2 * MAX_PERIOD_FRAMES + MATCH_FRAMES  #: the most of the audio due next either call uses

#: The cushion, one policy for the speaker's renderer (engine/playback/renderer.py, and its C twin)
#: and the phone bridge (engine/phone/cushion.py): once a stream starts on an adaptive target, it
#: expands early until it has added CUSHION_SHARE of the target, within [CUSHION_MIN_MS,
#: CUSHION_MAX_MS], at most one insertion per CUSHION_EVERY_MS of its output.
CUSHION_SHARE = 0.5
CUSHION_MIN_MS = 10
CUSHION_MAX_MS = 60
CUSHION_EVERY_MS = 40


class TimeStretcher:
    """Inserts or removes one pitch period at the start of an output block.

    Contract: :meth:`remember` is given every block handed out, in order, so the history is
    the output's continuous past; :meth:`reset` forgets it (a new stream, or after a gap).
    """

    def __init__(self, rate_hz: int = RATE_HZ) -> None:
        #: the same pitch range and match length in time at any rate (the constants are 24 kHz's)
        self.min_period = MIN_PERIOD_FRAMES * rate_hz // RATE_HZ
        self.max_period = MAX_PERIOD_FRAMES * rate_hz // RATE_HZ
        self.match = MATCH_FRAMES * rate_hz // RATE_HZ
        self.lookahead_frames = 2 * self.max_period + self.match
        self._quiet_energy = QUIET_RMS ** 2 * self.match
        self.history = np.zeros(self.max_period, dtype=np.int16)  # the latest frames handed out
        self.history_frames = 0                                   # how many of them are valid
        self._y = np.zeros(2 * self.max_period + self.match, dtype=np.float32)
        self._steps = np.arange(self.max_period, dtype=np.float32)
        self._ramp = np.zeros(self.max_period, dtype=np.float32)
        self._mix = np.zeros(self.max_period, dtype=np.float32)

    def reset(self) -> None:
        self.history_frames = 0

    def remember(self, out: np.ndarray) -> None:
        """Append a block just handed out to the history."""
        n = len(out)
        h = self.history
        if n >= len(h):
            h[:] = out[-len(h):]
        else:
            h[:-n] = h[n:]
            h[-n:] = out
        self.history_frames = min(len(h), self.history_frames + n)

    def _best_lag(self, y: np.ndarray, at: int, lo: int, hi: int) -> int:
        """The lag in [lo, hi] where ``y[at-lag:][:MATCH]`` best matches ``y[at:][:MATCH]``;
        the longest lag when the signal is too quiet to tell."""
        seg = y[at:at + self.match]
        seg_energy = float(seg @ seg)
        if seg_energy < self._quiet_energy:
            return hi
        span = y[at - hi:at - lo + self.match]
        cand = sliding_window_view(span, self.match)      # row j: lag hi - j
        cross = cand @ seg
        sq = np.cumsum(np.square(span, dtype=np.float64))
        energy = sq[self.match - 1:] - np.concatenate(([0.0], sq[:-self.match]))
        score = cross / np.sqrt(np.maximum(energy, 1.0) * seg_energy)
        return hi - int(np.argmax(score))                   # ties go to the longest lag

    def _crossfade(self, out: np.ndarray, fading_out: np.ndarray, fading_in: np.ndarray) -> None:
        t = len(out)
        ramp = self._ramp[:t]
        np.multiply(self._steps[:t], 1.0 / t, out=ramp)
        mix = self._mix[:t]
        np.subtract(fading_in, fading_out, out=mix, dtype=np.float32)
        mix *= ramp
        mix += fading_out
        np.rint(mix, out=mix)   # rounded, not truncated toward zero (that turned +-1 LSB into runs of exact zeros)
        out[:] = mix

    def expand(self, ahead: np.ndarray, out: np.ndarray, max_frames: int) -> int:
        """Write pitch periods into the start of ``out`` that lead from the output's past back
        into it: ``ahead`` (the frames due next, not consumed) fades into the last period T of
        the history, and that period repeats while the total stays within ``max_frames`` (one
        period at least). Play ``ahead`` from its start after them. Returns the frames written
        (0: too little audio to do it)."""
        hi = min(self.max_period, len(out), len(ahead), self.history_frames)
        if hi < self.min_period or len(ahead) < self.match:
            return 0
        y = self._y[:hi + self.match]
        y[:hi] = self.history[-hi:]
        y[hi:] = ahead[:self.match]
        t = self._best_lag(y, hi, self.min_period, hi)
        period = self.history[-t:]
        self._crossfade(out[:t], ahead[:t], period)
        written = t
        while written + t <= min(max_frames, len(out)):
            out[written:written + t] = period   # the waveform matches itself at lag t: seamless
            written += t
        return written

    def accelerate(self, ahead: np.ndarray, out: np.ndarray, max_frames: int) -> int:
        """Write into ``out[:T]`` the frames due next with one pitch period (T ≤ ``max_frames``)
        left out: ``ahead[:T]`` fades into ``ahead[T:2T]``. The caller consumes 2T frames of
        ``ahead``. Returns T (0: too little audio to do it)."""
        hi = min(self.max_period, len(out), max_frames, (len(ahead) - self.match) // 2)
        if hi < self.min_period:
            return 0
        # compare the start of each candidate period with the start of the block: y reversed
        # in time so the same search applies (a lag back in y is a lag forward in ahead)
        y = self._y[:hi + self.match]
        y[:] = ahead[hi + self.match - 1::-1]
        t = self._best_lag(y, hi, self.min_period, hi)
        self._crossfade(out[:t], ahead[:t], ahead[t:2 * t])
        return t

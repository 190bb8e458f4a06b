"""Level meters: dBFS envelopes of what an audio process hands over (the console draws them).

:class:`LevelTap` splits the work between two threads of one process. The audio callback
calls :meth:`LevelTap.push` with the block it already has: a copy into a preallocated
circular buffer and two stamps, no lock, no logging, no allocation beyond numpy views.
Another thread of the process (the one that publishes ``capture.echo`` /
``playback.cadence``) calls :meth:`LevelTap.drain` and gets the RMS and peak of each whole
``window_ms`` window written since its last call. Only these numbers go on the bus
(``capture.levels`` / ``playback.levels``); raw PCM never does.

Times: each window carries the CLOCK_MONOTONIC instant its first frame was handed over
(the callback's clock when it pushed the block, minus the frames after that one), so
envelopes of different processes share one time axis with the bus's ``mono_ns`` and the
``*_mono_ns`` fields of playback's reports.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.pcm import RATE_HZ

FLOOR_DBFS = -90.0           #: digital silence is drawn and reported at this level
FULL_SCALE = 32768.0
_FLOOR_AMPLITUDE = FULL_SCALE * 10 ** (FLOOR_DBFS / 20)   #: at or below this: FLOOR_DBFS
_STAMPS = 64


@dataclass(frozen=True)
class Levels:
    """What :meth:`LevelTap.drain` found: ``start_mono_ns`` of the first window (None when
    there is none), one RMS and one peak dBFS per window, and frames lost since the last call
    (overwritten before the reader came: the reader was more than the buffer late)."""
    start_mono_ns: int | None
    rms_dbfs: list[float]
    peak_dbfs: list[float]
    lost_frames: int


def amplitude_dbfs(value: float) -> float:
    """One amplitude (0..32768) as dBFS rounded to 0.1 dB, floored at :data:`FLOOR_DBFS`."""
    return round(20.0 * math.log10(value / FULL_SCALE), 1) if value > _FLOOR_AMPLITUDE else FLOOR_DBFS


def dbfs(values: np.ndarray) -> list[float]:
    """Amplitudes (0..32768) as dBFS, each as :func:`amplitude_dbfs` gives it."""
    return [amplitude_dbfs(v) for v in np.asarray(values, dtype=np.float64).tolist()]


class LevelTap:
    """One writer thread (:meth:`push`, real-time safe), one reader thread (:meth:`drain`)."""

    def __init__(self, rate_hz: int = RATE_HZ, window_ms: int = 20, capacity_ms: int = 2000) -> None:
        """Set-up only: allocates the buffer (``capacity_ms`` of audio)."""
        if window_ms <= 0 or capacity_ms < 4 * window_ms:
            raise ValueError("LevelTap needs window_ms > 0 and capacity_ms >= 4 * window_ms")
        self.rate_hz = rate_hz
        self.window_ms = window_ms
        self.window_frames = rate_hz * window_ms // 1000
        self._buf = np.zeros(rate_hz * capacity_ms // 1000, dtype=np.int16)
        self._stamps = np.zeros((_STAMPS, 2), dtype=np.int64)   # (frames written after a push, mono_ns)
        self._pushes = 0          # writer-owned
        self._written = 0         # writer-owned: frames pushed in all
        self._read = 0            # reader-owned: the next frame to measure
        self._lost = 0            # reader-owned

    def push(self, pcm: np.ndarray) -> None:
        """Audio callback: remember ``pcm`` (int16 mono). Real-time safe: a copy into the
        preallocated buffer, no lock, no allocation beyond views, never raises on length."""
        buf = self._buf
        cap = len(buf)
        n = len(pcm)
        if n == 0:
            return
        if n > cap:               # more than the whole buffer: only its tail can be kept
            self._written += n - cap
            pcm = pcm[n - cap:]
            n = cap
        pos = self._written % cap
        first = min(n, cap - pos)
        buf[pos:pos + first] = pcm[:first]
        if first < n:
            buf[:n - first] = pcm[first:]
        self._written += n
        slot = self._pushes % _STAMPS
        self._stamps[slot, 0] = self._written
        self._stamps[slot, 1] = time.monotonic_ns()
        self._pushes += 1          # last: the slot is complete before the reader may use it

    def drain(self) -> Levels:
        """Reader thread: the windows written since the last call (whole windows only; the
        rest waits for the next call)."""
        pushes = self._pushes
        if pushes == 0:
            return Levels(None, [], [], 0)
        limit, limit_ns = (int(v) for v in self._stamps[(pushes - 1) % _STAMPS])
        cap = len(self._buf)
        w = self.window_frames
        if limit - self._read > cap - 2 * w:      # the writer is lapping us: keep the newest part
            keep = (cap // 2) // w * w
            self._lost += limit - keep - self._read
            self._read = limit - keep
        count = (limit - self._read) // w
        lost, self._lost = self._lost, 0
        if count <= 0:
            return Levels(None, [], [], lost)
        start = self._read
        energy, peak = self._measure(start % cap, count)
        self._read = start + count * w
        start_ns = limit_ns - (limit - start) * 1_000_000_000 // self.rate_hz
        return Levels(int(start_ns), [amplitude_dbfs(math.sqrt(e / w)) for e in energy],
                      [amplitude_dbfs(p) for p in peak], lost)


    def _measure(self, pos: int, count: int) -> tuple[list[float], list[float]]:
        """The energy (sum of squares) and peak of ``count`` windows from buffer position ``pos``."""
        w, cap = self.window_frames, len(self._buf)
        take = count * w
        if pos + take <= cap:
            block = self._buf[pos:pos + take].astype(np.float32)
        else:
            block = np.concatenate([self._buf[pos:], self._buf[:pos + take - cap]]).astype(np.float32)
        # four numpy calls for all the windows, then a few floats in Python: run every 200 ms
        # on a cold cache, each numpy call costs tens of microseconds
        x = block.reshape(count, w)
        return np.einsum("ij,ij->i", x, x).tolist(), np.abs(x).max(axis=1).tolist()


class ExternalLevelTap(LevelTap):
    """A :class:`LevelTap` whose writer may be native code (the native audio backend's callbacks,
    engine/audio/_native.c): the writer's two counters live in an int64 array that code updates
    (pushes last, after the stamp slot), so :meth:`drain` reads them unchanged. ``arrays`` is what
    the native writer is handed: (buffer, stamps, counts). :meth:`push` still works from Python."""

    def __init__(self, rate_hz: int = 24000, window_ms: int = 20, capacity_ms: int = 2000,
                 measure: Callable[[np.ndarray, int, int, int], tuple[list[float], list[float]]] | None = None) -> None:
        """``measure(buffer, pos, count, window_frames)``, if given, measures the windows in one call
        (the native backend's, in C) instead of numpy's four."""
        self._counts = np.zeros(2, dtype=np.int64)   # pushes, frames written
        self._native_measure = measure
        super().__init__(rate_hz, window_ms, capacity_ms)

    def _measure(self, pos: int, count: int) -> tuple[list[float], list[float]]:
        if self._native_measure is None:
            return super()._measure(pos, count)
        return self._native_measure(self._buf, pos, count, self.window_frames)

    @property
    def _pushes(self) -> int:
        return int(self._counts[0])

    @_pushes.setter
    def _pushes(self, value: int) -> None:
        self._counts[0] = value

    @property
    def _written(self) -> int:
        return int(self._counts[1])

    @_written.setter
    def _written(self, value: int) -> None:
        self._counts[1] = value

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(buffer, stamps, counts): the writer's side, for native code."""
        return self._buf, self._stamps, self._counts

"""Session recording: one stereo WAV per session, left the mic as captured, right the
model as the speaker actually played it (silence, underrun gaps and truncation included),
both 24 kHz PCM16, frame-aligned as the capture process sees them.

:class:`Recorder` has an audio side (``push``: a copy into a preallocated in-process
ring, dropped frames counted, never blocks) and a writer side (``drain``: the capture
process's main thread appends to the WAV file).
"""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

RATE_HZ = 24000


class Recorder:
    def __init__(self, path: str | Path, capacity_frames: int = RATE_HZ * 8) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wav = wave.open(str(self.path), "wb")
        self._wav.setnchannels(2)
        self._wav.setsampwidth(2)
        self._wav.setframerate(RATE_HZ)
        self._buf = np.zeros((capacity_frames, 2), dtype=np.int16)
        self._cap = capacity_frames
        self._w = 0              # frames pushed (audio side only)
        self._r = 0              # frames written to the file (writer side only)
        self.dropped_frames = 0
        self.frames_written = 0

    def push(self, mic: np.ndarray, played: np.ndarray) -> None:
        """Audio side: queue ``len(mic)`` stereo frames (``played`` is as long or longer)."""
        n = len(mic)
        if self._w + n - self._r > self._cap:
            self.dropped_frames += n
            return
        pos = self._w % self._cap
        first = min(n, self._cap - pos)
        self._buf[pos:pos + first, 0] = mic[:first]
        self._buf[pos:pos + first, 1] = played[:first]
        if n > first:
            self._buf[:n - first, 0] = mic[first:n]
            self._buf[:n - first, 1] = played[first:n]
        self._w += n

    def drain(self) -> None:
        """Writer side: append what was pushed to the file."""
        w = self._w
        while self._r < w:
            pos = self._r % self._cap
            n = min(w - self._r, self._cap - pos)
            self._wav.writeframes(self._buf[pos:pos + n].tobytes())
            self._r += n
            self.frames_written += n

    def close(self) -> None:
        self.drain()
        self._wav.close()

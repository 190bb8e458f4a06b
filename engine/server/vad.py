"""Server-side voice activity detection, as ``server_vad`` behaves: energy per 10 ms
frame against a threshold, with prefix padding and a silence duration.

Pure: feed PCM16 24 kHz with ``feed``; it returns ``("started", audio_start_ms)`` and
``("stopped", audio_end_ms)`` events, in milliseconds since the first audio of the
session (the API's clock). Following the API reference, ``audio_start_ms`` includes
the prefix padding and ``audio_end_ms`` includes the silence duration.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_MS = 10
FRAME_SAMPLES = 240  # 10 ms at 24 kHz
MIN_SPEECH_FRAMES = 3  # 30 ms of voiced frames in a row start speech


def threshold_to_dbfs(threshold: float) -> float:
    """Map the API's 0..1 threshold to an RMS level: 0.5 -> -40 dBFS, 0 -> -55, 1 -> -25."""
    return -55.0 + 30.0 * threshold


@dataclass
class VadEvent:
    kind: str  # "started" | "stopped"
    ms: int


class ServerVad:
    def __init__(self, threshold: float = 0.5, prefix_padding_ms: int = 300,
                 silence_duration_ms: int = 500) -> None:
        self.threshold_dbfs = threshold_to_dbfs(threshold)
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self._pending = np.zeros(0, dtype=np.int16)
        self.frames_seen = 0  # 10 ms frames since the session's first audio
        self.in_speech = False
        self._voiced_run = 0
        self._silence_run = 0
        self.speech_start_ms = 0
        self._last_voiced_end_ms = 0

    def configure(self, threshold: float, prefix_padding_ms: int, silence_duration_ms: int) -> None:
        self.threshold_dbfs = threshold_to_dbfs(threshold)
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms

    def skip(self, samples: int) -> None:
        """Advance the clock over audio that is not examined (VAD off)."""
        self.frames_seen += samples // FRAME_SAMPLES

    def feed(self, pcm: np.ndarray) -> list[VadEvent]:
        buf = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        n_frames = len(buf) // FRAME_SAMPLES
        self._pending = buf[n_frames * FRAME_SAMPLES:].copy()
        if n_frames == 0:
            return []
        frames = buf[: n_frames * FRAME_SAMPLES].reshape(n_frames, FRAME_SAMPLES).astype(np.float32)
        rms = np.sqrt(np.mean(frames * frames, axis=1)) / 32768.0
        dbfs = 20.0 * np.log10(np.maximum(rms, 1e-9))
        events: list[VadEvent] = []
        for level in dbfs:
            self.frames_seen += 1
            now_ms = self.frames_seen * FRAME_MS
            voiced = level >= self.threshold_dbfs
            if not self.in_speech:
                self._voiced_run = self._voiced_run + 1 if voiced else 0
                if self._voiced_run >= MIN_SPEECH_FRAMES:
                    self.in_speech = True
                    onset_ms = now_ms - MIN_SPEECH_FRAMES * FRAME_MS
                    self.speech_start_ms = max(0, onset_ms - self.prefix_padding_ms)
                    self._silence_run = 0
                    self._last_voiced_end_ms = now_ms
                    events.append(VadEvent("started", self.speech_start_ms))
            else:
                if voiced:
                    self._silence_run = 0
                    self._last_voiced_end_ms = now_ms
                else:
                    self._silence_run += 1
                    if self._silence_run * FRAME_MS >= self.silence_duration_ms:
                        self.in_speech = False
                        self._voiced_run = 0
                        events.append(VadEvent("stopped", self._last_voiced_end_ms + self.silence_duration_ms))
        return events

    @property
    def speech_ms(self) -> int:
        """In speech: from its start (with the prefix padding) to the end of its last voiced
        frame; 0 outside speech. (GPT-Live's stand-in yields on it.)"""
        return self._last_voiced_end_ms - self.speech_start_ms if self.in_speech else 0

    def reset_speech(self) -> None:
        """Forget a speech segment in progress (buffer cleared)."""
        self.in_speech = False
        self._voiced_run = 0
        self._silence_run = 0

"""The capture process: microphone -> mic ring (PCM16 24 kHz).

Backends: a PyAudio input callback stream at the device's rate (soxr to 24 kHz), or a
WAV file played into the ring in real time, then silence (scripted runs). The callback
never blocks: a full ring counts overrun frames.

Echo handling (``audio.echo``): ``half_duplex`` writes silence while the model is
audible (the playback ring still has unheard frames); ``aec`` runs WebRTC's echo
canceller with what playback actually played as the far-end reference when it is
available, and falls back to half-duplex otherwise; ``off`` passes the mic through.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import wave
from typing import Any

import numpy as np

from bus import Publisher
from engine import child
from engine.child import run_reporting, stop_on_signals
from engine.codec import resample
from engine.ring import Ring

RATE_HZ = 24000


class EchoGate:
    """Half-duplex: silence the mic while the speaker ring holds audio not yet heard."""

    def __init__(self, speaker: Ring | None, tail_s: float = 0.25) -> None:
        self.speaker = speaker
        self.tail_s = tail_s             # keep muting this long after the ring runs empty (device latency, room)
        self.muted_frames = 0
        self._last_audible = -1e9

    def model_audible(self) -> bool:
        s = self.speaker
        if s is None:
            return False
        now = time.monotonic()
        if s.read_available > 0:
            self._last_audible = now
        return now - self._last_audible < self.tail_s

    def apply(self, pcm: np.ndarray) -> np.ndarray:
        if self.model_audible():
            self.muted_frames += len(pcm)
            return np.zeros_like(pcm)
        return pcm


class CaptureProcess:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        cfg = spec["config"]["audio"]
        self.mic = spec.get("mic_source", cfg["mic"])
        self.period_ms = cfg["period_ms"]
        self.ring = Ring.attach(spec["mic_ring"])
        speaker = Ring.attach(spec["speaker_ring"]) if spec.get("speaker_ring") else None
        echo = cfg["echo"]
        if echo == "auto":
            echo = "half_duplex" if speaker is not None and spec.get("speaker_is_device") else "off"
        self.echo_mode = echo
        self.gate = EchoGate(speaker) if echo in ("half_duplex", "aec") else None
        self.stop = threading.Event()
        self.pub = Publisher(spec["bus"]["publish"], f"capture:{os.getpid()}")
        self.pub.join(spec["bus"]["subscribe"])

    def _write(self, pcm: np.ndarray) -> None:
        if self.gate is not None:
            pcm = self.gate.apply(pcm)
        self.ring.write(pcm)

    def run_wav(self, path: str) -> None:
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"{path}: only 16-bit PCM WAV files can be used as a mic")
            rate, channels = w.getframerate(), w.getnchannels()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        if channels > 1:
            pcm = pcm.reshape(-1, channels)[:, 0].copy()
        pcm = resample(pcm, rate, RATE_HZ)
        period = RATE_HZ * self.period_ms // 1000
        silence = np.zeros(period, dtype=np.int16)
        pos = 0
        next_t = time.monotonic()
        self.pub.publish("capture.device", {"name": path, "rate_hz": rate, "duration_ms": len(pcm) * 1000 // RATE_HZ})
        while not self.stop.is_set():
            chunk = pcm[pos:pos + period] if pos < len(pcm) else silence
            if len(chunk) < period:
                chunk = np.concatenate([chunk, silence[: period - len(chunk)]])
            pos += period
            if pos >= len(pcm) and pos - period < len(pcm):
                self.pub.publish("capture.file_done", {"name": path})
            self._write(chunk)
            next_t += self.period_ms / 1000
            delay = next_t - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)

    def run_pyaudio(self) -> None:
        import pyaudio
        import soxr
        from engine.audio import find_device, open_pyaudio
        pa = open_pyaudio()
        dev = find_device(pa, self.mic, "input")
        rate = self.spec["config"]["audio"]["device_rate_hz"] or dev["default_rate_hz"]
        frames = rate * self.period_ms // 1000
        resampler = soxr.ResampleStream(rate, RATE_HZ, 1, dtype="int16") if rate != RATE_HZ else None
        errors = [0]

        def callback(in_data: bytes | None, frame_count: int, time_info: Any, status: int) -> tuple[None, int]:
            try:
                pcm = np.frombuffer(in_data or b"", dtype=np.int16)
                if resampler is not None:
                    pcm = resampler.resample_chunk(pcm)
                self._write(pcm)
            except Exception:
                errors[0] += 1
            return None, pyaudio.paContinue

        stream = pa.open(format=pyaudio.paInt16, channels=1, rate=rate, input=True, input_device_index=dev["index"],
                         frames_per_buffer=frames, stream_callback=callback)
        self.pub.publish("capture.device", {"name": dev["name"], "rate_hz": rate, "period_frames": frames,
                                            "latency_ms": round(stream.get_input_latency() * 1000, 1),
                                            "echo": self.echo_mode})
        try:
            while not self.stop.is_set() and stream.is_active():
                self.stop.wait(0.1)
        finally:
            stream.stop_stream()
            stream.close()
            pa.terminate()

    def run(self) -> int:
        stop_on_signals(self.stop)
        if isinstance(self.mic, str) and self.mic.lower().endswith(".wav"):
            return run_reporting(self.pub, "capture", lambda: self.run_wav(self.mic))
        return run_reporting(self.pub, "capture", self.run_pyaudio)


if __name__ == "__main__":
    sys.exit(child.main(CaptureProcess))

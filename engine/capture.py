"""The capture process: microphone -> mic ring (PCM16 24 kHz).

Backends: a PyAudio input callback stream at the device's rate (soxr to 24 kHz), or a
WAV file played into the ring in real time, then silence (scripted runs). The callback
never blocks: a full ring counts overrun frames.

Echo handling (``audio.echo``, see :mod:`engine.echo`): ``aec`` runs WebRTC's echo
canceller with what playback actually played (the reference ring) as the far end;
``half_duplex`` writes silence while the model is audible; ``off`` passes the mic
through. ``auto`` is ``aec`` when the speaker is a device, else ``off``.

Recording (``record``): the mic as captured and the reference, side by side in one
stereo WAV (:mod:`engine.record`).
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
from engine.child import every_period, run_reporting, stop_on_signals
from engine.codec import resample
from engine.echo import EchoCanceller, EchoGate, FarEnd
from engine.record import Recorder
from engine.ring import Ring

RATE_HZ = 24000
STATS_EVERY_S = 2.0


class CaptureProcess:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        cfg = spec["config"]["audio"]
        self.mic = spec.get("mic_source", cfg["mic"])
        self.period_ms = cfg["period_ms"]
        self.ring = Ring.attach(spec["mic_ring"], spec.get("mic_fd"))  # the eventfd wakes the sender
        speaker = Ring.attach(spec["speaker_ring"]) if spec.get("speaker_ring") else None
        self.far = FarEnd(Ring.attach(spec["ref_ring"])) if spec.get("ref_ring") else None
        echo = cfg["echo"]
        if echo == "auto":
            echo = "aec" if speaker is not None and spec.get("speaker_is_device") else "off"
        if echo == "aec" and self.far is None:
            echo = "half_duplex"  # no reference to cancel with
        self.echo_mode = echo
        self.aec = EchoCanceller(guard_db=cfg["echo_guard_db"]) if echo == "aec" else None
        self.gate = EchoGate(speaker) if echo == "half_duplex" else None
        self.recorder = Recorder(spec["record_path"]) if spec.get("record_path") else None
        self.stop = threading.Event()
        self.pub = Publisher(spec["bus"]["publish"], f"capture:{os.getpid()}")
        self.pub.join(spec["bus"]["subscribe"])
        self.next_stats_at = time.monotonic() + STATS_EVERY_S

    def _write(self, pcm: np.ndarray) -> None:
        """Audio path: mic frames (24 kHz) -> echo handling -> mic ring (and the recording)."""
        far = self.far.take(len(pcm)) if self.far is not None else None
        if self.recorder is not None:
            self.recorder.push(pcm, far if far is not None else np.zeros_like(pcm))
        if self.aec is not None and far is not None:
            pcm = self.aec.process(pcm, far)
        elif self.gate is not None:
            pcm = self.gate.apply(pcm)
        self.ring.write(pcm)

    def housekeeping(self) -> None:
        """Main-thread chores: write the recording, publish echo statistics."""
        if self.recorder is not None:
            self.recorder.drain()
        now = time.monotonic()
        if now >= self.next_stats_at:
            self.next_stats_at = now + STATS_EVERY_S
            stats: dict[str, Any] = {"mode": self.echo_mode}
            if self.aec is not None:
                stats.update(self.aec.stats())
            if self.far is not None:
                stats.update(far_missing_frames=self.far.missing_frames, far_skipped_frames=self.far.skipped_frames)
            if self.gate is not None:
                stats["muted_frames"] = self.gate.muted_frames
            if self.recorder is not None:
                stats["record_dropped_frames"] = self.recorder.dropped_frames
            self.pub.publish("capture.echo", stats)

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
        self.pub.publish("capture.device", {"name": path, "rate_hz": rate, "duration_ms": len(pcm) * 1000 // RATE_HZ})
        for _ in every_period(self.stop, self.period_ms / 1000):
            chunk = pcm[pos:pos + period] if pos < len(pcm) else silence
            if len(chunk) < period:
                chunk = np.concatenate([chunk, silence[: period - len(chunk)]])
            pos += period
            if pos >= len(pcm) and pos - period < len(pcm):
                self.pub.publish("capture.file_done", {"name": path})
            self._write(chunk)
            self.housekeeping()

    def run_pyaudio(self) -> None:
        import pyaudio
        from engine.audio import find_device, keep_running, open_pyaudio, resample_stream
        pa = open_pyaudio()
        dev = find_device(pa, self.mic, "input")
        rate = self.spec["config"]["audio"]["device_rate_hz"] or dev["default_rate_hz"]
        frames = rate * self.period_ms // 1000
        resampler = resample_stream(rate, RATE_HZ) if rate != RATE_HZ else None
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
        keep_running(pa, stream, self.stop, self.housekeeping, 0.1)

    def run(self) -> int:
        stop_on_signals(self.stop)
        try:
            if isinstance(self.mic, str) and self.mic.lower().endswith(".wav"):
                return run_reporting(self.pub, "capture", lambda: self.run_wav(self.mic))
            return run_reporting(self.pub, "capture", self.run_pyaudio)
        finally:
            if self.recorder is not None:
                self.recorder.close()


if __name__ == "__main__":
    sys.exit(child.main(CaptureProcess))

"""The local server's voice and ears: espeak-ng text-to-speech, pocketsphinx speech-to-text.

Both are offline. ``synthesize`` returns PCM16 at 24 kHz; ``transcribe`` returns a rough
transcript (pocketsphinx is poor on synthetic speech; nothing may depend on its words).
"""
from __future__ import annotations

import io
import shutil
import subprocess
import threading
import wave
from functools import lru_cache

import numpy as np

from engine.codec import API_RATE_HZ, resample

#: API voice -> espeak-ng voice variant (any unknown voice speaks en-us)
ESPEAK_VOICES = {
    "alloy": "en-us", "ash": "en-us+m2", "ballad": "en-us+m4", "coral": "en-us+f2",
    "echo": "en-us+m3", "sage": "en-us+f4", "shimmer": "en-us+f3", "verse": "en-us+m1",
    "marin": "en-us+f5", "cedar": "en-us+m7",
}


class VoiceError(RuntimeError):
    """espeak-ng is missing or failed."""


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


@lru_cache(maxsize=512)
def synthesize(text: str, voice: str = "marin", speed: float = 1.0) -> np.ndarray:
    """Speak ``text`` with espeak-ng; PCM16 mono at 24 kHz (read-only array, cached)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise VoiceError("espeak-ng is not installed; run: bash tools/setup-system.sh")
    words_per_min = int(max(80, min(450, 175 * speed)))
    proc = subprocess.run(
        [exe, "-v", ESPEAK_VOICES.get(voice, "en-us"), "-s", str(words_per_min), "--stdout", text or " "],
        capture_output=True, timeout=30, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise VoiceError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[:200]}")
    with wave.open(io.BytesIO(proc.stdout)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    out = resample(pcm, rate, API_RATE_HZ)
    out.setflags(write=False)
    return out


class Recognizer:
    """Offline rough speech recognition; thread-safe, loads its model on first use."""

    _lock = threading.Lock()
    _decoder = None
    _failed = False

    @classmethod
    def transcribe(cls, pcm24k: np.ndarray) -> str:
        """Best-effort transcript of PCM16 24 kHz speech; "" when nothing is recognised."""
        if len(pcm24k) < API_RATE_HZ // 10:
            return ""
        with cls._lock:
            if cls._decoder is None and not cls._failed:
                try:
                    from pocketsphinx import Decoder  # type: ignore[import-not-found]
                    cls._decoder = Decoder(samprate=16000, loglevel="FATAL")
                except Exception:
                    cls._failed = True
            if cls._decoder is None:
                return ""
            pcm16k = resample(pcm24k, API_RATE_HZ, 16000)
            dec = cls._decoder
            dec.start_utt()
            dec.process_raw(pcm16k.tobytes(), full_utt=True)
            dec.end_utt()
            hyp = dec.hyp()
            return hyp.hypstr.strip() if hyp is not None else ""

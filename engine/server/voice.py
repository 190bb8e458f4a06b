"""The local server's voice and ears: espeak-ng text-to-speech, pocketsphinx speech-to-text.

Both are offline. ``synthesize`` returns PCM16 at 24 kHz; ``transcribe`` returns a rough
transcript (pocketsphinx is poor on synthetic speech; nothing may depend on its words).
"""
from __future__ import annotations

import io
import shutil
import subprocess
import threading
import time
import wave
from collections import OrderedDict
from typing import Any

import numpy as np

from engine.codec import API_RATE_HZ, resample
from engine.server.errors import ServerError

#: API voice -> espeak-ng voice variant (any unknown voice speaks en-us)
ESPEAK_VOICES = {
    "alloy": "en-us", "ash": "en-us+m2", "ballad": "en-us+m4", "coral": "en-us+f2",
    "echo": "en-us+m3", "sage": "en-us+f4", "shimmer": "en-us+f3", "verse": "en-us+m1",
    "marin": "en-us+f5", "cedar": "en-us+m7",
}


class VoiceError(ServerError, RuntimeError):
    """espeak-ng is missing or failed."""


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


SPEECH_CACHE_BYTES = 4 << 20   #: speech kept for repeated replies (about 90 s of PCM)


class _SpeechCache:
    """A least-recently-used cache bounded in bytes (not entries: one reply can be a
    minute of audio); thread-safe, since synthesis runs in worker threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str, float], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, float]) -> np.ndarray | None:
        with self._lock:
            pcm = self._entries.get(key)
            if pcm is not None:
                self._entries.move_to_end(key)
            return pcm

    def put(self, key: tuple[str, str, float], pcm: np.ndarray) -> None:
        with self._lock:
            if key in self._entries or pcm.nbytes > self.max_bytes:
                return
            self._entries[key] = pcm
            self._bytes += pcm.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes


_speech_cache = _SpeechCache(SPEECH_CACHE_BYTES)


class _Flight:
    """One synthesis in progress; callers asking for the same speech meanwhile wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.pcm: np.ndarray | None = None
        self.error: BaseException | None = None


_flights: dict[tuple[str, str, float], _Flight] = {}
_flights_lock = threading.Lock()


def synthesize(text: str, voice: str = "marin", speed: float = 1.0) -> np.ndarray:
    """Speak ``text`` with espeak-ng; PCM16 mono at 24 kHz (read-only array, cached up to
    SPEECH_CACHE_BYTES). Raises :class:`VoiceError` if espeak-ng is missing or fails.

    Concurrent calls for the same speech share one espeak-ng run (40 phone calls asking for the
    same reply at once made 40 runs, and every call's first deltas came ~350 ms late)."""
    key = (text, voice, float(speed))
    cached = _speech_cache.get(key)
    if cached is not None:
        return cached
    with _flights_lock:
        cached = _speech_cache.get(key)   # again: a run may have finished since (it caches before it lands)
        if cached is not None:
            return cached
        flight = _flights.get(key)
        leader = flight is None
        if flight is None:
            flight = _flights[key] = _Flight()
    if not leader:
        flight.done.wait()
        if flight.pcm is None:
            raise VoiceError(f"speech synthesis failed: {flight.error}")
        return flight.pcm
    try:
        flight.pcm = _espeak(text, voice, speed)
        _speech_cache.put(key, flight.pcm)
        return flight.pcm
    except BaseException as exc:
        flight.error = exc
        raise
    finally:
        with _flights_lock:
            del _flights[key]
        flight.done.set()


def _espeak(text: str, voice: str, speed: float) -> np.ndarray:
    """One espeak-ng run: ``text`` as PCM16 mono at 24 kHz, read-only; VoiceError if it fails."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise VoiceError("espeak-ng is not installed; run: bash tools/setup-system.sh")
    words_per_min = int(max(80, min(450, 175 * speed)))
    try:
        proc = subprocess.run(
            [exe, "-v", ESPEAK_VOICES.get(voice, "en-us"), "-s", str(words_per_min), "--stdout", text or " "],
            capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VoiceError(f"espeak-ng could not run: {exc}") from None
    if proc.returncode != 0 or not proc.stdout:
        raise VoiceError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[:200]}")
    with wave.open(io.BytesIO(proc.stdout)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    out = resample(pcm, rate, API_RATE_HZ)
    out.setflags(write=False)
    return out


class Recognizer:
    """Offline rough speech recognition; thread-safe, loads its model on first use.

    A failure (the model cannot load, or decoding raises) is never final: it is counted
    (``failures``), kept with its cause (``last_error``) and raised as :class:`VoiceError`;
    loading is tried again RETRY_S after a failed load, and a decoder that raised is
    rebuilt on the next call."""

    RETRY_S = 10.0
    _lock = threading.Lock()
    _decoder: Any = None
    _load_failed_at: float | None = None
    failures = 0
    last_error: str | None = None

    @classmethod
    def _fail(cls, what: str, exc: BaseException) -> VoiceError:
        cls.failures += 1
        cls.last_error = f"{what}: {type(exc).__name__}: {exc}"
        return VoiceError(f"speech recognition failed ({cls.last_error})")

    @classmethod
    def _load(cls) -> Any:
        if cls._decoder is not None:
            return cls._decoder
        if cls._load_failed_at is not None and time.monotonic() - cls._load_failed_at < cls.RETRY_S:
            raise VoiceError(f"speech recognition unavailable ({cls.last_error}); retrying in "
                             f"{cls.RETRY_S - (time.monotonic() - cls._load_failed_at):.0f} s")
        try:
            from pocketsphinx import Decoder
            cls._decoder = Decoder(samprate=16000, loglevel="FATAL")
        except Exception as exc:  # noqa: BLE001 - any load failure is reported, then retried
            cls._load_failed_at = time.monotonic()
            raise cls._fail("cannot load pocketsphinx (pip install pocketsphinx, or run engine serve --no-asr)",
                            exc) from None
        cls._load_failed_at = None
        return cls._decoder

    @classmethod
    def transcribe(cls, pcm24k: np.ndarray) -> str:
        """Best-effort transcript of PCM16 24 kHz speech; "" when nothing is recognised.
        Raises :class:`VoiceError` (with the cause) when recognition fails."""
        if len(pcm24k) < API_RATE_HZ // 10:
            return ""
        with cls._lock:
            dec = cls._load()
            try:
                pcm16k = resample(pcm24k, API_RATE_HZ, 16000)
                dec.start_utt()
                dec.process_raw(pcm16k.tobytes(), full_utt=True)
                dec.end_utt()
                hyp = dec.hyp()
            except Exception as exc:  # noqa: BLE001 - reported with its cause; the decoder is rebuilt
                cls._decoder = None
                raise cls._fail("decoding failed", exc) from None
            return hyp.hypstr.strip() if hyp is not None else ""

"""The local server's voice and ears: espeak-ng text-to-speech, pocketsphinx speech-to-text.

Both are offline. ``synthesize`` returns PCM16 at 24 kHz; ``transcribe`` returns a transcript.

Hearing (pocketsphinx, its US English model): free decoding with the general language model is
rough on synthetic speech, and worse on the phone (G.711 at 8 kHz): "Where is the collection point?"
came out as "when we look at you calling". So when the session expects phrases
(engine/server/expect.py says which), ``recognize`` decodes against them first:

1. a JSGF grammar whose sentences are the phrases: a whole phrase heard is the transcript (a prefix
   of exactly one phrase, at least two words and two thirds of it, stands for that phrase);
2. otherwise keyword spotting (pocketsphinx ``kws``) for the phrases of two or more words (or six
   phones), each at a threshold of 1e-5 per phone, spliced by time into the free decoding of the
   same audio (the free words a spotted phrase overlaps give way to it);
3. no phrases, or nothing of them heard: free decoding, as before.

Words without a pronunciation in the dictionary split a phrase into the runs around them.
Figures (word accuracy before and after): bench/README.md, "asr".
"""
from __future__ import annotations

import io
import shutil
import subprocess
import threading
import math
import os
import tempfile
import time
import wave
from collections import OrderedDict
from dataclasses import dataclass
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
    """One espeak-ng run: ``text`` as PCM16 mono at 24 kHz, read-only; VoiceError if it fails. The text
    follows ``--``: a session's text that starts with ``-`` is spoken, never taken as an option (``-f``
    would read a file as this user)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise VoiceError("espeak-ng is not installed; run: bash tools/setup-system.sh")
    words_per_min = int(max(80, min(450, 175 * speed)))
    try:
        proc = subprocess.run(
            [exe, "-v", ESPEAK_VOICES.get(voice, "en-us"), "-s", str(words_per_min), "--stdout", "--", text or " "],
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


KWS_PER_PHONE_EXP = 5          #: keyword threshold 1e-(5 x phones): no false alarm in the bench, about half the hits
PREFIX_SHARE = 2 / 3           #: a grammar prefix this share of one phrase (and 2+ words) stands for it
SEARCHES_KEPT = 8              #: phrase sets whose grammar and keyword searches stay built


@dataclass(frozen=True)
class Heard:
    """What the recogniser made of an utterance, and how: ``grammar`` (a whole expected phrase),
    ``keyword`` (expected phrases spotted in the free decoding), ``free``, or ``short`` (no speech)."""
    text: str
    how: str


@dataclass(frozen=True)
class _Searches:
    grammar: str                 #: JSGF search name
    keywords: str | None         #: kws search name
    sentences: tuple[tuple[str, ...], ...]   #: the grammar's sentences, as words


class Recognizer:
    """Offline speech recognition; thread-safe, loads its model on first use.

    A failure (the model cannot load, or decoding raises) is never final: it is counted
    (``failures``), kept with its cause (``last_error``) and raised as :class:`VoiceError`;
    loading is tried again RETRY_S after a failed load, and a decoder that raised is
    rebuilt on the next call."""

    RETRY_S = 10.0
    _lock = threading.Lock()
    _decoder: Any = None
    _free_search = "_default"
    _searches: "OrderedDict[tuple[str, ...], _Searches]" = OrderedDict()
    _made = 0
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
            cls._free_search = cls._decoder.current_search() if hasattr(cls._decoder, "current_search") else "_default"
            cls._searches = OrderedDict()
        except Exception as exc:  # noqa: BLE001 - any load failure is reported, then retried
            cls._load_failed_at = time.monotonic()
            raise cls._fail("cannot load pocketsphinx (pip install pocketsphinx, or run engine serve --no-asr)",
                            exc) from None
        cls._load_failed_at = None
        return cls._decoder

    @classmethod
    def transcribe(cls, pcm24k: np.ndarray, phrases: tuple[str, ...] = ()) -> str:
        """The transcript of PCM16 24 kHz speech ("" when nothing is recognised), decoded against
        ``phrases`` when there are some. Raises :class:`VoiceError` (with the cause) when recognition fails."""
        return cls.recognize(pcm24k, phrases).text

    @classmethod
    def recognize(cls, pcm24k: np.ndarray, phrases: tuple[str, ...] = ()) -> Heard:
        """:meth:`transcribe`, saying how the words were found (module docstring)."""
        if len(pcm24k) < API_RATE_HZ // 10:
            return Heard("", "short")
        with cls._lock:
            dec = cls._load()
            try:
                raw = resample(pcm24k, API_RATE_HZ, 16000).tobytes()
                searches = cls._searches_for(dec, phrases) if phrases else None
                if searches is None:
                    return Heard(cls._free(dec, raw), "free")
                sentence = cls._grammar(dec, raw, searches)
                spotted = _best_spotted(dec, cls._decode(dec, raw, searches.keywords)) if searches.keywords else []
                # a sentence stands unless a phrase spotted in the audio is not in it (a long
                # utterance forced into the wrong sentence)
                if sentence and all(f" {w} " in f" {sentence} " for w, _, _ in spotted):
                    return Heard(sentence, "grammar")
                free = cls._decode(dec, raw, cls._free_search)
                if spotted:
                    return Heard(_splice(free, spotted), "keyword")
                return Heard(" ".join(w for w, _, _ in free), "free")
            except VoiceError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported with its cause; the decoder is rebuilt
                cls._decoder = None
                raise cls._fail("decoding failed", exc) from None

    @classmethod
    def _free(cls, dec: Any, raw: bytes) -> str:
        """Free decoding with the general language model: its best hypothesis."""
        if cls._searches:
            dec.activate_search(cls._free_search)
        dec.start_utt()
        dec.process_raw(raw, full_utt=True)
        dec.end_utt()
        hyp = dec.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""

    @staticmethod
    def _decode(dec: Any, raw: bytes, search: str) -> list[tuple[str, int, int]]:
        """(word, start frame, end frame) of each word heard with ``search``, fillers left out."""
        dec.activate_search(search)
        dec.start_utt()
        dec.process_raw(raw, full_utt=True)
        dec.end_utt()
        out = []
        for seg in dec.seg() or []:
            word = seg.word.strip()
            if not word or word.startswith(("<", "[", "+")):
                continue
            if word.endswith(")") and "(" in word:   # an alternate pronunciation: point(2)
                word = word[:word.index("(")]
            out.append((word, seg.start_frame, seg.end_frame))
        return out

    @classmethod
    def _grammar(cls, dec: Any, raw: bytes, searches: _Searches) -> str:
        heard = tuple(w for w, _, _ in cls._decode(dec, raw, searches.grammar))
        if not heard:
            return ""
        if heard in searches.sentences:
            return " ".join(heard)
        # the search did not reach the grammar's end (a last word lost): a long prefix of one sentence
        longer = [s for s in searches.sentences if s[:len(heard)] == heard]
        if len(longer) == 1 and len(heard) >= max(2, math.ceil(PREFIX_SHARE * len(longer[0]))):
            return " ".join(longer[0])
        return ""

    @classmethod
    def _searches_for(cls, dec: Any, phrases: tuple[str, ...]) -> _Searches | None:
        """The grammar and keyword searches of ``phrases`` (built once, SEARCHES_KEPT sets kept)."""
        cached = cls._searches.get(phrases)
        if cached is not None:
            cls._searches.move_to_end(phrases)
            return cached
        sentences: list[tuple[str, ...]] = []
        for p in phrases:
            run: list[str] = []
            for word in p.split() + [""]:
                if word and dec.lookup_word(word) is not None:
                    run.append(word)
                elif run:
                    if tuple(run) not in sentences:
                        sentences.append(tuple(run))
                    run = []
        if not sentences:
            return None
        cls._made += 1
        kname = None
        gname = f"expect_g{cls._made}"
        dec.add_jsgf_string(gname, "#JSGF V1.0;\ngrammar expect;\npublic <s> = "
                            + " | ".join(" ".join(s) for s in sentences) + ";\n")
        keys = []
        for s in sentences:
            phones = sum(len(dec.lookup_word(w).split()) for w in s)
            if len(s) >= 2 or phones >= 6:
                keys.append(f"{' '.join(s)} /1e-{KWS_PER_PHONE_EXP * phones}/")
        if keys:
            kname = f"expect_k{cls._made}"
            fd, path = tempfile.mkstemp(prefix="realtalk-kws-", suffix=".txt")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write("\n".join(keys) + "\n")
                dec.add_kws(kname, path)
            finally:
                os.unlink(path)
        built = _Searches(gname, kname, tuple(sentences))
        cls._searches[phrases] = built
        while len(cls._searches) > SEARCHES_KEPT:
            _, old = cls._searches.popitem(last=False)
            for name in (old.grammar, old.keywords):
                if name is not None:
                    dec.remove_search(name)
        return built


def _best_spotted(dec: Any, spotted: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Spotted phrases that overlap in time: the one with the most phones stays."""
    def phones(p: str) -> int:
        return sum(len((dec.lookup_word(w) or "").split()) for w in p.split())
    kept: list[tuple[str, int, int]] = []
    for p in sorted(spotted, key=lambda s: -phones(s[0])):
        if all(p[2] < a or p[1] > b for _, a, b in kept):
            kept.append(p)
    return sorted(kept, key=lambda s: s[1])


def _splice(free: list[tuple[str, int, int]], spotted: list[tuple[str, int, int]]) -> str:
    """The free decoding's words with the spotted phrases put in by time: a free word whose middle
    lies within a spotted phrase gives way to it."""
    spans = [(a, b) for _, a, b in spotted]
    kept = [(a, w) for w, a, b in free if not any(lo <= (a + b) / 2 <= hi for lo, hi in spans)]
    return " ".join(w for _, w in sorted(kept + [(a, w) for w, a, _ in spotted]))

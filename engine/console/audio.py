"""Listen and talk: the console's audio, through two shared-memory rings (never the bus).

* **listen** ring (playback → console): while a page listens, the playback callback copies
  every 24 kHz block it hands the device into it. The console reads it every 20 ms and sends
  the PCM to the listening pages over their WebSocket (``/listen``). Playback writes only
  while a listener is attached (``console.listen`` ``{on, lease_ms}``, renewed every second);
  a full ring (the console fell behind) drops what does not fit and counts it, as frames not
  listened.
* **browser** ring (console → capture): the talking page's microphone (``/talk``), resampled
  to 24 kHz int16 here (:class:`TalkPcm`) and written by the console. While
  ``console.mic.source`` ``{source: "browser", lease_ms}`` holds, capture takes its frames
  from this ring instead of the device's. The console renews the lease every second.

The audio processes' side of both (the leases' logic, capture's browser-mic reader) is
:mod:`engine.audio.listen_talk`: capture and playback never import the console.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError
from engine.pcm import RATE_HZ

MAX_TALK_MESSAGE_BYTES = 256 * 1024      #: one binary talk message at most (about 2.7 s at 48 kHz)
TALK_RATES_HZ = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)


class ConsoleAudioError(EngineError):
    """A listen or talk socket cannot be served (no engine rings, a bad message)."""


# ---------------------------------------------------------------- the console's side
class TalkPcm:
    """A talking page's binary messages (int16 little-endian mono at ``rate_hz``) → 24 kHz
    int16 frames for the browser ring. A message is any whole number of samples; the
    resampler (soxr, streaming) keeps its state between messages, so the framing the page
    chose does not matter. Raises :class:`ConsoleAudioError` naming what is wrong."""

    def __init__(self, rate_hz: int) -> None:
        if rate_hz not in TALK_RATES_HZ:
            raise ConsoleAudioError(f"talk: rate_hz {rate_hz!r} is not one of {', '.join(map(str, TALK_RATES_HZ))}")
        self.rate_hz = rate_hz
        self.in_frames = 0
        self._resampler: Any = None
        if rate_hz != RATE_HZ:
            import soxr
            self._resampler = soxr.ResampleStream(rate_hz, RATE_HZ, 1, dtype="int16", quality="LQ")

    def convert(self, data: bytes) -> np.ndarray:
        """One binary message → the 24 kHz frames it yields (may be empty while soxr fills)."""
        if len(data) % 2:
            raise ConsoleAudioError(f"talk: a binary message is int16 samples; {len(data)} bytes is not a whole number")
        if len(data) > MAX_TALK_MESSAGE_BYTES:
            raise ConsoleAudioError(f"talk: a binary message is at most {MAX_TALK_MESSAGE_BYTES} bytes, got {len(data)}")
        pcm = np.frombuffer(data, dtype="<i2")
        self.in_frames += len(pcm)
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(pcm)
        return np.ascontiguousarray(pcm, dtype=np.int16)


def parse_talk_start(raw: str | bytes) -> int:
    """The talk socket's first message, ``{"op": "start", "rate_hz": R}``: returns R."""
    try:
        msg = json.loads(raw)
    except ValueError:
        raise ConsoleAudioError("talk: the first message must be JSON {\"op\": \"start\", \"rate_hz\": R}") from None
    if not isinstance(msg, dict) or msg.get("op") != "start":
        raise ConsoleAudioError("talk: the first message must be {\"op\": \"start\", \"rate_hz\": R}")
    rate = msg.get("rate_hz")
    if isinstance(rate, float) and rate.is_integer():
        rate = int(rate)
    if not isinstance(rate, int) or isinstance(rate, bool):
        raise ConsoleAudioError(f"talk: rate_hz must be an integer, got {rate!r}")
    return rate


def ring_names_from(conn: dict[str, Any]) -> dict[str, str]:
    """The engine's ring names by kind (``listen``, ``browser``, …) from its connection file's
    ``ring_names`` map (kind -> name; the names are random, the kind is never read from them)."""
    names = conn.get("ring_names")
    if not isinstance(names, dict):
        return {}
    return {k: n for k, n in names.items() if isinstance(k, str) and isinstance(n, str)}


def engine_ring_names(path: Path | None = None) -> dict[str, str]:
    """The running engine's ring names by kind (its ``engine.json``, believed only when it is this
    user's own private file: bus/runtime.py); empty without one."""
    from bus import BusError
    from bus.runtime import read_connection
    try:
        conn = read_connection(path)
    except (OSError, BusError):
        return {}
    return ring_names_from(conn)

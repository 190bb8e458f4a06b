"""The engine's PCM format, defined once: 24 kHz, signed 16-bit little-endian, mono.

It is the voice APIs' ``audio/pcm`` (Realtime GA and GPT-Live alike), so nothing between the mic
and the API socket, or between the socket and the speaker, converts a sample. Every ring (their
headers say so, and ``Ring.attach`` checks it), the session recording (two such channels), the
saved replies, the console's listen and talk sockets and the local server speak it. A device at
another rate is resampled at its edge (soxr, in capture and playback); a phone call's G.711 at
8 kHz is the phone bridge's and the codec's (:mod:`engine.codec`).

Every other module imports these names; none defines its own rate.
"""
from __future__ import annotations

RATE_HZ = 24000                       #: samples per second
SAMPLE_WIDTH_BYTES = 2                #: signed 16-bit
CHANNELS = 1                          #: mono
FRAMES_PER_MS = RATE_HZ // 1000
MIME_TYPE = "audio/pcm"               #: the APIs' name for it (their format descriptor: ``{type, rate}``)


def api_format() -> dict[str, object]:
    """The APIs' descriptor of this format, ``{"type": "audio/pcm", "rate": 24000}`` (a new dict:
    it goes into session payloads that are changed later)."""
    return {"type": MIME_TYPE, "rate": RATE_HZ}

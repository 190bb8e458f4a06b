"""Audio sample formats of the Realtime API: PCM16 24 kHz, G.711 µ-law and A-law (8 kHz).

Pure functions over numpy arrays. G.711 uses lookup tables built once (ITU-T G.711);
rate conversion uses soxr.
"""
from __future__ import annotations

import base64
import binascii
from functools import lru_cache

import numpy as np
import soxr

from engine.pcm import RATE_HZ as API_RATE_HZ   # the APIs' audio/pcm is the engine's format (engine/pcm.py)
from engine.pcm import SAMPLE_WIDTH_BYTES

G711_RATE_HZ = 8000

#: GA format descriptor type -> (sample rate, bytes per sample)
FORMATS = {"audio/pcm": (API_RATE_HZ, SAMPLE_WIDTH_BYTES), "audio/pcmu": (G711_RATE_HZ, 1), "audio/pcma": (G711_RATE_HZ, 1)}


def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    sign = a & 0x80
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1))
    return np.where(sign != 0, magnitude, -magnitude).astype(np.int16)


@lru_cache(maxsize=None)
def _tables() -> dict[str, np.ndarray]:
    ulaw_dec, alaw_dec = _ulaw_decode_table(), _alaw_decode_table()
    # encoders: nearest code for every int16 value (exact inverse on decoded values)
    values = np.arange(-32768, 32768, dtype=np.int32)
    enc = {}
    for name, dec in (("ulaw", ulaw_dec), ("alaw", alaw_dec)):
        order = np.argsort(dec.astype(np.int32), kind="stable")
        sorted_vals = dec.astype(np.int32)[order]
        idx = np.clip(np.searchsorted(sorted_vals, values), 1, 255)
        left, right = sorted_vals[idx - 1], sorted_vals[idx]
        pick = np.where(values - left <= right - values, idx - 1, idx)
        enc[name] = order[pick].astype(np.uint8)
    return {"ulaw_dec": ulaw_dec, "alaw_dec": alaw_dec, "ulaw_enc": enc["ulaw"], "alaw_enc": enc["alaw"]}


def resample(pcm: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Resample int16 mono; returns int16."""
    if from_hz == to_hz or len(pcm) == 0:
        return pcm.astype(np.int16, copy=False)
    return soxr.resample(pcm.astype(np.int16, copy=False), from_hz, to_hz, quality="HQ").astype(np.int16)


def g711_table(fmt: str) -> np.ndarray:
    """The decode table of ``audio/pcmu`` or ``audio/pcma``: code byte -> int16 sample (8 kHz)."""
    return _tables()["ulaw_dec" if fmt == "audio/pcmu" else "alaw_dec"]


def decode_audio(data: bytes, fmt: str) -> np.ndarray:
    """Wire bytes in ``fmt`` -> PCM16 at 24 kHz."""
    if fmt == "audio/pcm":
        return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")
    key = "ulaw_dec" if fmt == "audio/pcmu" else "alaw_dec"
    pcm8k = _tables()[key][np.frombuffer(data, dtype=np.uint8)]
    return resample(pcm8k, G711_RATE_HZ, API_RATE_HZ)


def encode_audio(pcm24k: np.ndarray, fmt: str) -> bytes:
    """PCM16 at 24 kHz -> wire bytes in ``fmt``."""
    if fmt == "audio/pcm":
        return pcm24k.astype("<i2", copy=False).tobytes()
    pcm8k = resample(pcm24k, API_RATE_HZ, G711_RATE_HZ)
    key = "ulaw_enc" if fmt == "audio/pcmu" else "alaw_enc"
    return _tables()[key][pcm8k.astype(np.int32) + 32768].tobytes()


def g711_decode(data: bytes, fmt: str) -> np.ndarray:
    """G.711 wire bytes (``audio/pcmu`` or ``audio/pcma``) -> PCM16 at 8 kHz (no resampling)."""
    return _tables()["ulaw_dec" if fmt == "audio/pcmu" else "alaw_dec"][np.frombuffer(data, dtype=np.uint8)]


def g711_encode(pcm8k: np.ndarray, fmt: str) -> bytes:
    """PCM16 at 8 kHz -> G.711 wire bytes (``audio/pcmu`` or ``audio/pcma``), no resampling."""
    key = "ulaw_enc" if fmt == "audio/pcmu" else "alaw_enc"
    return _tables()[key][pcm8k.astype(np.int32) + 32768].tobytes()


def duration_ms(n_bytes: int, fmt: str) -> float:
    """Duration of ``n_bytes`` of wire audio in ``fmt``."""
    rate, width = FORMATS[fmt]
    return n_bytes / width / rate * 1000.0


def b64decode_strict(text: str) -> bytes:
    """Decode base64, raising ValueError on anything that is not valid base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(str(exc)) from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

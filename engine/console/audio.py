"""Listen and talk: the console's audio, through two shared-memory rings (never the bus).

* **listen** ring (playback → console): while a page listens, the playback callback copies
  every 24 kHz block it hands the device (silence, fades and stretch included) into it, the
  way it feeds the reference ring. The console reads it every 20 ms and sends the PCM to the
  listening pages over their WebSocket (``/listen``). Playback writes only while a listener
  is attached (``console.listen`` ``{on, lease_ms}``, renewed every second); a full ring
  (the console fell behind) drops what does not fit and counts it, as frames not listened.
* **browser** ring (console → capture): the talking page's microphone (``/talk``), resampled
  to 24 kHz int16 here (:class:`TalkPcm`) and written by the console. While
  ``console.mic.source`` ``{source: "browser", lease_ms}`` holds, capture takes its frames
  from this ring instead of the device's (:class:`BrowserMicReader`, real-time safe) and
  keeps its device stream running for the timing; when the ring is short it pads silence
  and counts it. The console renews the lease every second; ``{source: "device"}`` (the
  talk socket closed) or a lapsed lease (the console died) switches back.

:class:`SourceSwitch` and :class:`ListenSwitch` are the leases' pure logic, used by capture
and playback on their non-callback thread; the callback only reads a bool they set.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError

RATE_HZ = 24000
FRAMES_PER_MS = RATE_HZ // 1000
LISTEN_TOPIC = "console.listen"          #: {on: bool, lease_ms}: playback copies what it plays to the listen ring
SOURCE_TOPIC = "console.mic.source"      #: {source: "browser"|"device", lease_ms}: capture's mic source
LEASE_MS = 3000                          #: a switch holds this long unless renewed
RENEW_S = 1.0                            #: the console renews a held switch this often
JITTER_FRAMES = 60 * FRAMES_PER_MS       #: capture waits for this much browser audio before it reads
MAX_JITTER_FRAMES = 200 * FRAMES_PER_MS  #: the wait grows by GAP_STEP_FRAMES with each gap, up to this
GAP_STEP_FRAMES = 20 * FRAMES_PER_MS
MAX_BACKLOG_FRAMES = 180 * FRAMES_PER_MS  #: more than this beyond the wait (the browser's clock runs fast): cut to the wait
MAX_TALK_MESSAGE_BYTES = 256 * 1024      #: one binary talk message at most (about 2.7 s at 48 kHz)
TALK_RATES_HZ = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)


class ConsoleAudioError(EngineError):
    """A listen or talk socket cannot be served (no engine rings, a bad message)."""


# ---------------------------------------------------------------- the leases (non-callback thread)
class Lease:
    """On while the latest grant holds: ``lease_ms`` from the message (default LEASE_MS, held
    to 0..60 s; a malformed one counts as the default). Pure: the caller hands in the clock."""

    def __init__(self) -> None:
        self.until_s = 0.0

    def grant(self, body: dict[str, Any], now_s: float) -> None:
        lease = body.get("lease_ms", LEASE_MS)
        lease_ms = float(lease) if isinstance(lease, (int, float)) and not isinstance(lease, bool) else LEASE_MS
        self.until_s = now_s + min(max(lease_ms, 0.0), 60_000.0) / 1000

    def revoke(self) -> None:
        self.until_s = 0.0

    def held(self, now_s: float) -> bool:
        return now_s < self.until_s


class SourceSwitch(Lease):
    """Capture's mic source from ``console.mic.source`` messages: ``browser`` while a lease
    holds, ``device`` otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.switches = 0          #: changes of source so far

    def on_message(self, body: dict[str, Any], now_s: float) -> None:
        """Apply one ``console.mic.source`` body (a malformed one is ignored)."""
        source = body.get("source")
        if source == "browser":
            self.grant(body, now_s)
        elif source == "device":
            self.revoke()

    def source(self, now_s: float) -> str:
        """``browser`` or ``device`` at ``now_s``."""
        return "browser" if self.held(now_s) else "device"


class ListenSwitch(Lease):
    """Playback's listen copy from ``console.listen`` messages: on while a lease holds."""

    def on_message(self, body: dict[str, Any], now_s: float) -> None:
        """Apply one ``console.listen`` body (a malformed one is ignored)."""
        on = body.get("on")
        if on is True:
            self.grant(body, now_s)
        elif on is False:
            self.revoke()

    def on(self, now_s: float) -> bool:
        return self.held(now_s)


# ---------------------------------------------------------------- capture's side (audio callback)
class BrowserMicReader:
    """Capture's consumer of the browser ring. :meth:`read` is called by the mic callback with
    as many frames as the device gave; it returns exactly that many (browser audio, silence
    where the ring is short). Real-time safe: reads into a preallocated buffer, never blocks,
    never raises on length, allocates only views.

    Jitter: after a switch or a dry spell it waits until :data:`JITTER_FRAMES` are in the ring
    (silence meanwhile: ``wait_frames`` until the first browser audio after a switch, while the
    page's microphone starts; ``short_frames`` after it, a gap, in ``gaps``). Each gap makes
    the wait 20 ms longer, up to :data:`MAX_JITTER_FRAMES`, so a jittery network or a busy
    page costs a few gaps, not one a second. A backlog over the wait plus
    :data:`MAX_BACKLOG_FRAMES` (the browser's clock faster than the device's, or a burst after
    a network stall) is cut back to the wait, counted in ``dropped_frames``.
    """

    def __init__(self, ring: Any, max_block_frames: int = 16384, jitter_frames: int = JITTER_FRAMES,
                 max_backlog_frames: int = MAX_BACKLOG_FRAMES, max_jitter_frames: int = MAX_JITTER_FRAMES) -> None:
        """Set-up only: allocates the block buffer. ``ring`` is a :class:`engine.audio.ring.Ring`."""
        self.ring = ring
        self.base_jitter_frames = jitter_frames
        self.jitter_frames = jitter_frames              #: the wait now (grows with each gap)
        self.max_jitter_frames = max(max_jitter_frames, jitter_frames)
        self.max_backlog_frames = max_backlog_frames    #: beyond the wait
        self.gaps = 0
        self._buf = np.zeros(max_block_frames, dtype=np.int16)
        self.filling = True
        self.heard = False         #: browser audio came since the latest switch
        self.frames = 0            #: browser frames handed on
        self.wait_frames = 0       #: silence after a switch, before the browser's first audio
        self.short_frames = 0      #: silence padded in their place later (the ring ran short: a gap)
        self.dropped_frames = 0    #: backlog cut (older browser audio skipped)

    def start(self) -> None:
        """At a switch to the browser (callback thread): drop what was left from an earlier talk."""
        ring = self.ring
        ring.skip(ring.read_available)
        self.filling = True
        self.heard = False
        self.jitter_frames = self.base_jitter_frames

    def read(self, n: int) -> np.ndarray:
        """``n`` frames: the browser's, or silence where there are none (counted)."""
        n = min(n, len(self._buf))
        out = self._buf[:n]
        ring = self.ring
        avail = ring.read_available
        if avail > self.jitter_frames + self.max_backlog_frames:
            cut = avail - self.jitter_frames
            self.dropped_frames += ring.skip(cut)
            avail -= cut
        if self.filling:
            if avail < self.jitter_frames:
                out[:] = 0
                if self.heard:
                    self.short_frames += n
                else:
                    self.wait_frames += n
                return out
            self.filling = False
            self.heard = True
        got = ring.read_into(out)
        if got < n:   # a gap: wait longer before reading again
            out[got:] = 0
            self.short_frames += n - got
            self.filling = True
            self.gaps += 1
            self.jitter_frames = min(self.max_jitter_frames, self.jitter_frames + GAP_STEP_FRAMES)
        self.frames += got
        return out


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

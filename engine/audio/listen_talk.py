"""Listen and talk, the audio processes' side: the leases that switch them and capture's
browser-mic reader. The debug console (:mod:`engine.console`) grants the leases and moves the
PCM; capture and playback import only this module, never the console.

* **listen** ring (playback → console): while a ``console.listen`` lease holds
  (:class:`ListenSwitch`), the playback callback copies every 24 kHz block it hands the device
  (silence, fades and stretch included) into it, the way it feeds the reference ring; a full
  ring (the console fell behind) drops what does not fit and counts it.
* **browser** ring (console → capture): while a ``console.mic.source`` ``{source: "browser",
  lease_ms}`` lease holds (:class:`SourceSwitch`), capture takes its frames from this ring
  instead of the device's (:class:`BrowserMicReader`, real-time safe) and keeps its device
  stream running for the timing; when the ring is short it pads silence and counts it.
  ``{source: "device"}`` (the talk socket closed) or a lapsed lease (the console died) switches
  back.

:class:`SourceSwitch` and :class:`ListenSwitch` are the leases' pure logic, used by capture
and playback on their non-callback thread; the callback only reads a bool they set.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engine.pcm import FRAMES_PER_MS

LISTEN_TOPIC = "console.listen"          #: {on: bool, lease_ms}: playback copies what it plays to the listen ring
SOURCE_TOPIC = "console.mic.source"      #: {source: "browser"|"device", lease_ms}: capture's mic source
LEASE_MS = 3000                          #: a switch holds this long unless renewed
RENEW_S = 1.0                            #: the console renews a held switch this often
JITTER_FRAMES = 60 * FRAMES_PER_MS       #: capture waits for this much browser audio before it reads
MAX_JITTER_FRAMES = 200 * FRAMES_PER_MS  #: the wait grows by GAP_STEP_FRAMES with each gap, up to this
GAP_STEP_FRAMES = 20 * FRAMES_PER_MS
MAX_BACKLOG_FRAMES = 180 * FRAMES_PER_MS  #: more than this beyond the wait (the browser's clock runs fast): cut to the wait


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

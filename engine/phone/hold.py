"""The start of each stretch of audio to the phone is held back ``hold_ms`` (a prebuffer). Pure:
the clock comes in.

Twilio plays ``media`` as it comes, from a buffer that is empty when a reply starts. Sent at once,
a reply's first delta leaves the phone's buffer only the phase of its 20 ms player as margin
(0-20 ms), so when the API paces audio at real time any later delta a few ms late is a gap in
what the caller hears. The engine's own playback starts a response ``audio.prebuffer_ms`` after its
first audio for the same reason; this is the phone side's prebuffer, the same setting.

Rules:
- Audio offered while the caller has heard everything sent (``drained``, engine.phone.heard: a
  reply's start, or mid-item a gap) and nothing is held starts a hold: it and whatever follows
  wait until ``release_at_s`` (its arrival + ``hold_ms``), then all go in order (:meth:`due`).
- Audio offered while not drained and nothing is held goes at once: a reply's later deltas are
  never delayed, so the hold is margin gained once, not latency added to every delta.
- The end of the item while holding releases everything at once (the whole reply is here: there
  is nothing to wait for), the end after it.
- ``drop`` (a barge-in's ``clear``): what is held is never sent.
- A gap at the phone (audio sent after it ran out mid-item: engine.phone.heard) grows the hold
  GROW_MS, up to MAX_HOLD_MS; a reply whose audio all played without one gives half the growth
  back. So one late delta does not cost latency for the rest of the call (the engine's speaker
  prebuffer does the same).
- A continuous track (GPT-Live: one item for the whole call) has no reply that ends: the bridge
  calls :meth:`item_played` every CONTINUOUS_SETTLE_S of it instead, so its growth goes back too.
- ``hold_ms`` 0: nothing is ever held, and the hold never grows.
- Adaptive (``audio.jitter_buffer: adaptive``): the call's jitter estimator
  (engine.realtime.jitter) sets the base with :meth:`retarget` as API deltas arrive, and the
  growth after gaps adds to it; the configured ``hold_ms`` is only the start, before the
  estimator has history. ``fixed``: the base stays ``hold_ms``.
"""
from __future__ import annotations

from dataclasses import dataclass

GROW_MS = 20          #: the hold's growth per gap at the phone (one frame)
MAX_HOLD_MS = 300     #: the most it grows to (the speaker's max prebuffer)
#: a continuous track's stand-in for "a reply played": half the growth back after this long without a gap
CONTINUOUS_SETTLE_S = 10.0


@dataclass(frozen=True)
class Out:
    """One thing to send to the phone, in order: audio (``pcm``) or the item's end (``pcm`` None)."""
    pcm: bytes | None
    since_s: float        #: when it came in (audio: its API delta; held audio: the hold's release)


class StartHold:
    def __init__(self, hold_ms: int) -> None:
        self.base_ms = max(0, hold_ms)           #: the configured hold, or the jitter buffer's target
        self.growth_ms = 0                       #: added by gaps at the phone, half given back per clean reply
        self.hold_ms_max = self.hold_ms          #: the most it was
        self.gaps = 0                            #: gaps at the phone reported to it
        self._gap_in_item = False
        self.held: list[Out] = []
        self.release_at_s: float | None = None   #: while holding: when the held audio goes
        self.holds = 0                           #: holds started
        self.early_releases = 0                  #: holds ended by the item's end before release_at_s
        self.dropped_bytes = 0                   #: held audio a clear dropped (never sent)

    @property
    def hold_ms(self) -> int:
        """What the next hold waits: the base plus the growth after gaps, at most MAX_HOLD_MS."""
        return min(MAX_HOLD_MS, self.base_ms + self.growth_ms) if self.base_ms > 0 else 0

    def retarget(self, target_ms: float) -> None:
        """The jitter buffer's target (ms) is the base from the next hold on (never 0: 0 means no hold)."""
        if self.base_ms > 0:
            self.base_ms = max(1, round(target_ms))

    @property
    def holding(self) -> bool:
        return self.release_at_s is not None

    def audio(self, pcm: bytes, since_s: float, now_s: float, drained: bool) -> list[Out]:
        """``pcm`` came (at ``since_s``); returns what to send now (nothing while holding)."""
        if self.release_at_s is None:
            if not drained or self.hold_ms <= 0:
                return [Out(pcm, since_s)]
            self.release_at_s = now_s + self.hold_ms / 1000
            self.holds += 1
        self.held.append(Out(pcm, since_s))
        return []

    def end_of_item(self, now_s: float) -> list[Out]:
        """The item's audio is all here (at ``now_s``): what is held, then the end (``Out(None, ...)``),
        to send now."""
        if self.release_at_s is None:
            return [Out(None, now_s)]
        self.early_releases += 1
        return self._release(min(self.release_at_s, now_s)) + [Out(None, now_s)]

    def due(self, now_s: float) -> list[Out]:
        """What the hold releases by ``now_s`` (all it holds once ``release_at_s`` has come)."""
        if self.release_at_s is None or now_s < self.release_at_s:
            return []
        return self._release(self.release_at_s)

    def gap(self) -> None:
        """The phone's buffer ran dry mid-reply: hold longer from the next start."""
        self.gaps += 1
        self._gap_in_item = True
        if self.base_ms > 0:
            self.growth_ms = min(MAX_HOLD_MS, self.growth_ms + GROW_MS)
            self.hold_ms_max = max(self.hold_ms_max, self.hold_ms)

    def item_played(self) -> None:
        """A reply's audio has all played (its end mark came back): without a gap, half the growth back."""
        if not self._gap_in_item:
            self.growth_ms //= 2
        self._gap_in_item = False

    def drop(self) -> int:
        """A ``clear``: forget what is held; returns its bytes (never sent)."""
        n = sum(len(o.pcm or b"") for o in self.held)
        self.held, self.release_at_s = [], None
        self.dropped_bytes += n
        self._gap_in_item = False   # that item's end mark never comes: the next item is judged on its own
        return n

    def _release(self, at_s: float) -> list[Out]:
        out = [Out(o.pcm, max(o.since_s, at_s)) for o in self.held]
        self.held, self.release_at_s = [], None
        return out

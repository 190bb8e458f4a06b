"""The playback renderer: the consumer of the speaker ring, run inside the device callback.

:class:`Renderer` never blocks, allocates nothing per call, logs nothing, and counts what goes
wrong. It keeps a prebuffer before a stream starts, fades out within 5 ms when asked to flush
(barge-in), fades over a ring that runs dry mid-stream and counts it as an underrun, and tells the
ring what the listener has heard (``heard_index``). :class:`DeviceFeeder` is the resampling half of
a PyAudio callback. engine/audio/_native.c is the same renderer in C (the native backend); both are
driven with the same input by tests/test_native.py.

The renderer is a state machine (:class:`RenderState`, table :data:`TRANSITIONS`):

=============  ==========================================================================
IDLE           no stream: silence; everything handed to the device counts as heard
PREBUFFERING   a stream's first frames arrived: silence until the prebuffer time has passed
               since they arrived (or at once if the whole stream is in the ring)
PLAYING        the stream goes to the device (time-stretched around the jitter target)
DRY            the ring ran dry mid-stream: silence, and the gap grows; more of the stream
               makes it an underrun, the stream's end mark makes it the end
REBUFFERING    audio came back after running dry (the underrun is counted, the prebuffer
               grows): silence until the prebuffer time has passed again, then a fade-in
=============  ==========================================================================

Rules (binding for this module and for its twin in engine/audio/_native.c):

1. The state changes only in :meth:`Renderer._go`, by a row of :data:`TRANSITIONS`. An event the
   table does not allow in the current state changes nothing and is counted
   (``transition_errors``): an audio callback never raises.
2. A callback first computes what it hands out and its counts, then takes the transition, so a
   state's data (below) is always whole when the state is.
3. A pending flush is applied before anything else, from any state, to IDLE.
4. State data: ``waiting_since`` is set in PREBUFFERING and REBUFFERING only; ``dry_frames`` and
   ``dry_index`` describe DRY (``dry_frames`` is 0 elsewhere); a stream is on (``in_stream``) in
   PLAYING, DRY and REBUFFERING.
5. Several transitions may happen in one callback (a stream that starts inside a block can run
   dry in the same block), each by rule 1.
6. The C renderer has the same states, events and table, numbered alike; tests check both tables
   are equal and both renderers pass through the same states block by block.
"""
from __future__ import annotations

import enum
import os
from typing import NamedTuple

import numpy as np

from engine.audio.levels import LevelTap
from engine.audio.ring import Ring, SampleFifo
from engine.audio.stretch import (CUSHION_EVERY_MS, CUSHION_MAX_MS, CUSHION_MIN_MS, CUSHION_SHARE, LOOKAHEAD_FRAMES,
                                  MAX_PERIOD_FRAMES, MIN_PERIOD_FRAMES, TimeStretcher)
from engine.pcm import FRAMES_PER_MS, RATE_HZ

FADE_FRAMES = 120            # 5 ms fade over gaps
#: 3 ms fade on barge-in (raised cosine: no click, and silent sooner). Its splatter above 3 kHz
#: on a voiced cut is -95 dB re the signal (5 ms: -102, a hard cut: -38), and it is silent 1.9 ms
#: sooner than the 5 ms fade was (bench/results/2026-12.md)
FLUSH_FADE_FRAMES = 72
FLUSH_FADE_MS = FLUSH_FADE_FRAMES // FRAMES_PER_MS
#: the cushion (class docstring; engine/audio/stretch.py's policy), each insertion at most half a block
CUSHION_MIN_FRAMES = CUSHION_MIN_MS * FRAMES_PER_MS
CUSHION_MAX_FRAMES = CUSHION_MAX_MS * FRAMES_PER_MS
CUSHION_EVERY_FRAMES = CUSHION_EVERY_MS * FRAMES_PER_MS
REF_RUN_TOLERANCE_NS = 2_000_000   # a reference block due this much off the end of the last begins a new run
#: the device's read-ahead spread (Renderer._measure_lead): the mean lead follows over ~100 blocks
#: (1 s at 10 ms), the spread's peaks are held and forgotten over ~200 blocks
LEAD_MEAN_WEIGHT = 0.01
LEAD_PEAK_DECAY = 0.995
#: the device's steady timeline (Renderer._measure_lead): known once this many blocks came without
#: a step of more than a block (0.5 s at 10 ms), then the mean over the latest ~100
TIMELINE_MIN_BLOCKS = 50
TIMELINE_MEAN_BLOCKS = 100
#: a continuous stream (the ring's ``continuous``: a GPT-Live track, one stream for the session):
#: the ring's level is read as its least over each LEVEL_WINDOW_FRAMES of output (it peaks by a
#: delta's length as each comes), and whatever that least stands above the level the stretcher
#: keeps, by more than CONTINUOUS_SLACK_FRAMES, is latency a stall added: accelerated away. A
#: Realtime reply's server sends ahead of real time, so its ring's level is not latency: only the
#: stretch the renderer added is given back there.
LEVEL_WINDOW_FRAMES = RATE_HZ            # 1 s
CONTINUOUS_SLACK_FRAMES = 10 * FRAMES_PER_MS


class RenderState(enum.IntEnum):
    """The renderer's states (module docstring); the numbers are the C renderer's too."""
    IDLE = 0
    PREBUFFERING = 1
    PLAYING = 2
    DRY = 3
    REBUFFERING = 4


class RenderEvent(enum.IntEnum):
    """What moves the renderer (module docstring); the numbers are the C renderer's too."""
    ARRIVED = 0       # frames of a new stream are in the ring
    PREBUFFERED = 1   # the prebuffer time has passed since they (or the audio after a gap) arrived
    RAN_DRY = 2       # the ring ran out mid-stream, before its end mark
    RETURNED = 3      # audio came back after running dry: an underrun
    ENDED = 4         # the stream's end mark was reached
    FLUSHED = 5       # a flush (barge-in) was applied


S, E = RenderState, RenderEvent
#: every transition the renderer takes: (state, event) -> next state
TRANSITIONS: dict[tuple[RenderState, RenderEvent], RenderState] = {
    (S.IDLE, E.ARRIVED): S.PREBUFFERING,
    (S.PREBUFFERING, E.PREBUFFERED): S.PLAYING,
    (S.PLAYING, E.RAN_DRY): S.DRY,
    (S.PLAYING, E.ENDED): S.IDLE,
    (S.DRY, E.RETURNED): S.REBUFFERING,
    (S.DRY, E.ENDED): S.IDLE,
    (S.REBUFFERING, E.PREBUFFERED): S.PLAYING,
    **{(state, E.FLUSHED): S.IDLE for state in S},
}
#: TRANSITIONS as a lookup the audio path can use without allocating: _NEXT[state][event]
_NEXT: tuple[tuple[RenderState | None, ...], ...] = tuple(
    tuple(TRANSITIONS.get((state, event)) for event in E) for state in S)
IDLE, PREBUFFERING, PLAYING, DRY, REBUFFERING = S.IDLE, S.PREBUFFERING, S.PLAYING, S.DRY, S.REBUFFERING
del S, E


def fade_out(frames: int) -> np.ndarray:
    """A raised-cosine ramp from 1 down to (nearly) 0 over ``frames``."""
    return (0.5 + 0.5 * np.cos(np.pi * np.arange(frames) / frames)).astype(np.float32)


class FlushFade:
    """The barge-in fade, the one implementation of it: a raised cosine over
    :data:`FLUSH_FADE_MS` at ``rate_hz``, then silence. The renderer applies it at 24 kHz; a
    resampling device callback applies it instead, at the device rate, to all it hands out
    (resampled leftovers included), so each path fades exactly once."""

    def __init__(self, rate_hz: int) -> None:
        self.ramp = fade_out(rate_hz * FLUSH_FADE_MS // 1000)

    def apply(self, buf: np.ndarray, valid_frames: int) -> int:
        """Fade ``buf[:valid_frames]`` in place from its start, silence the rest of ``buf``
        (frames past the ramp included); return how many frames still sound. Real-time safe:
        no allocation."""
        k = min(valid_frames, len(buf), len(self.ramp))
        if k > 0:
            np.multiply(buf[:k], self.ramp[:k], out=buf[:k], casting="unsafe")
        buf[max(k, 0):] = 0
        return max(k, 0)


class StreamEvent(NamedTuple):
    """What the renderer saw, for the publishing thread: ``kind`` is started, stopped, underrun
    or flushed; the counts are the current stream's so far. Indices are ring frame indices:
    playback knows streams, not items (the realtime process maps indices to items)."""
    kind: str
    index: int  # type: ignore[assignment]  # shadows tuple.index: the bus field's name; ring frame index it happened at (flushed: heard when the fade ends)
    start_index: int            # ring index of the stream's first frame
    stretch_frames: int         # net time-stretch (output frames minus stream frames)
    expanded_frames: int        # pitch periods played again
    device_underflows: int      # times the device ran dry (a gap the listener heard)


class Renderer:
    """Fills output buffers from the ring (24 kHz int16 mono).

    A *stream* is one response's audio: it starts at the callback nearest to the prebuffer time
    after its first frames arrived (or at once when the
    whole stream is already in the ring) and ends when the reader reaches the end mark
    the producer set for it. Running dry before that is an underrun once more of the stream
    comes (if the end mark comes first, it was the stream's end): the tail fades out, the gap
    is counted, playback waits for the prebuffer again, and the prebuffer grows by 20 ms
    (``growth_frames``, up to ``max_prebuffer_frames`` in all) so the next stream rides out the
    jitter; each stream that plays without an underrun gives half of that growth back, so one
    late delta does not cost latency for the rest of the session.

    The prebuffer is the jitter buffer's target plus that growth: the ring's ``target_frames``
    when the producer sets one (``audio.jitter_buffer: adaptive``: the realtime process's
    estimate from the delta arrival jitter it measures, engine/realtime/jitter.py), else the
    configured ``prebuffer_frames``. An adaptive target also gets the device's read-ahead
    spread (``device_lead_frames``): the target's margin covers the one block a callback reads
    ahead, but a device whose callbacks bunch (PulseAudio's ALSA plugin asks for 10 ms blocks
    13.3 and 6.6 ms apart, and catches up after a stall) reads some blocks earlier still than the
    one a stream started in; that spread is measured here (the lead of each block's handoff
    against the clock, its peaks above and below its mean held and slowly forgotten, at most one
    block; a step of more than 4 blocks, a stall the device lost frames over, starts afresh) and
    waited on top, so deltas on time never find the ring dry. It is read at every callback: a stream's start delay and the
    level the time-stretcher keeps follow the target as it changes (engine/audio/ring.py states
    the field's contract).

    Time-stretching (``stretch``, NetEQ-style): while a stream is still arriving and the ring
    holds less than half the prebuffer's *headroom* beyond this block, a pitch period of the
    latest output plays again (the ring drains slower, so a late delta lands before it runs
    dry); once the ring holds the headroom again with a period to spare, periods are left out
    until that stream's added latency is given back. The headroom is the prebuffer less one
    block: each callback reads a block ahead of the device, so a stream whose deltas come on
    time dips to exactly the headroom beyond the block just before each delta (with 100 ms
    deltas and a 15 ms target, 5 ms), and only a delta later than that is a risk. Half the
    whole prebuffer would sit above that dip on a small target and expand around every delta.
    A stream that is already complete is never stretched, and neither is audio that arrives
    faster than real time (the ring is full then).

    The cushion: a new stream on an adaptive target (the ring has one) also expands early,
    whatever its level, until it has added half the target (10 to 60 ms): one insertion of at
    most half a block per 40 ms of its output, so its first few hundred ms play a little slower
    and the headroom grows from the target to target + cushion. The start stays as early as the
    target says; a delta later than the target's percentile then finds the ring holding more.
    Accelerating gives back only the stretch beyond the cushion (the cushion is the level it
    keeps). A fixed prebuffer builds none (``audio.jitter_buffer: fixed`` plays as before).
    ``stretch_frames`` is the current stream's net stretch (output frames minus stream frames).
    """

    def __init__(self, ring: Ring, prebuffer_frames: int, max_prebuffer_frames: int = 7200,
                 ref: Ring | None = None, stretch: bool = True, fade_on_flush: bool = True) -> None:
        self.ring = ring
        self.control = ring.control   # flush, end mark, start stamp, heard index
        #: False when the caller fades a flush itself, later in the chain (:class:`DeviceFeeder`)
        self.fade_on_flush = fade_on_flush
        self.ref = ref
        self._ref_next_due_ns = 0    # when the frame after the latest reference block is due at the DAC
        self._ref_run_index = 0      # where the reference's latest run without a gap began
        #: level meter of what is handed to the device (the console's speaker envelope); set by the process
        self.tap: LevelTap | None = None
        #: the console's listen ring, written while ``listen_on`` (set by the publishing thread)
        self.listen: Ring | None = None
        self.listen_on = False
        self.stretch = stretch
        self.stretcher = TimeStretcher()
        self._ahead = np.zeros(LOOKAHEAD_FRAMES, dtype=np.int16)
        self.low_water_frames = prebuffer_frames // 2   # the time-stretcher expands below it (see _retarget)
        self.render_frames = 0                          # the latest block's length (one device period)
        #: how far ahead of the clock the device reads at its earliest against its latest, in frames
        #: (added to an adaptive target; see _measure_lead)
        self.device_lead_frames = 0
        self.handed_frames = 0                          # frames rendered, less the backlog: handed to the device
        self.lead_mean_frames = 0.0
        self.lead_up_frames = 0.0                       # the held peak of the lead above its mean
        self.lead_down_frames = 0.0                     # and below it
        #: the device's steady timeline (_measure_lead): the mean lead since the device last
        #: stepped, over how many blocks, and this block's handoff time on it (CLOCK_MONOTONIC s)
        self.timeline_mean_frames = 0.0
        self.timeline_blocks = 0
        self.timeline_now = 0.0
        self.stretch_frames = 0                         # the current stream's net stretch
        #: a continuous stream's level (LEVEL_WINDOW_FRAMES): the least of this window so far, the
        #: last whole window's less what was accelerated since (-1: none yet), output this window
        self.level_low_frames = -1
        self.level_floor_frames = -1
        self.level_seen_frames = 0
        self.cushion_left_frames = 0                    # the current stream's cushion still to insert
        self.cushion_frames = 0                         # and what it inserted (of stretch_frames)
        self.since_cushion_frames = 0                   # output since its latest insertion (or its start)
        self.stream_expanded_frames = 0                 # the current stream's expansions
        self.expanded_frames = 0                        # in total, for playback.cadence
        self.accelerated_frames = 0
        self.prebuffer_frames = prebuffer_frames        # in effect: the target plus the growth (see _retarget)
        self.base_prebuffer_frames = prebuffer_frames   # what the config asked for: used when the ring has no target
        self.max_prebuffer_frames = max(prebuffer_frames, max_prebuffer_frames)
        self.growth_frames = 0                          # added by underruns, half given back per clean stream
        self.start_delay_frames = 0                     # the prebuffer the latest stream started with
        self.start_device_lead_frames = 0               # the device lead in it
        self.stream_underruns = 0                       # underruns in the current stream
        self.dry_index = 0                              # where the ring ran dry mid-stream
        self.dry_frames = 0                             # silence since then, counted if audio comes back
        self.state = IDLE                               # the only writer is _go (rule 1)
        self.transition_errors = 0                      # events the table did not allow (0 expected)
        #: transitions taken, by row: ``transition_counts[state * len(RenderEvent) + event]``
        self.transition_counts = [0] * (len(RenderState) * len(RenderEvent))
        self.stream_start = 0
        self.waiting_since: float | None = None         # PREBUFFERING, REBUFFERING: since when
        self._flush_fade = FlushFade(RATE_HZ)
        self._fade_down = np.linspace(1.0, 0.0, FADE_FRAMES, dtype=np.float32)
        self._fade_up = np.linspace(0.0, 1.0, FADE_FRAMES, dtype=np.float32)
        self.events: list[StreamEvent] = []        # drained by a thread
        #: an eventfd the renderer writes when it adds an event (the publishing thread sleeps on it)
        self.wake_fd: int | None = None
        self.wake_errors = 0                       #: eventfd writes that failed (the event waits for the next chore)
        self.stream_device_underflows = 0          # counted by the device callback while a stream plays
        self.backlog_frames = 0                    # set by the callback: frames read but not yet handed to the device
        self.first_sample_mono_ns = 0              # the latest stream's first sample handed to the device (steady timeline)
        self.arrived_mono_ns = 0                   # when its first frames arrived (the prebuffer counts from there)
        self.flush_mono_ns = 0                     # when the latest flush was applied (fade handed to the device)

    @property
    def in_stream(self) -> bool:
        """A stream is on: playing, or waiting out a gap in it (rule 4)."""
        return self.state is PLAYING or self.state is DRY or self.state is REBUFFERING

    def _go(self, event: RenderEvent) -> None:
        """Take ``event``'s transition from the current state (rule 1): the one writer of
        ``state``. Real-time safe: a tuple lookup, no allocation."""
        to = _NEXT[self.state][event]
        if to is None:
            self.transition_errors += 1
            return
        self.transition_counts[self.state * len(RenderEvent) + event] += 1
        self.state = to

    def device_underflowed(self) -> None:
        """The device ran dry before this callback (a gap the listener heard, not in the audio):
        counted against the stream playing, and the steady timeline starts afresh, since the device
        went on from there. Real-time safe."""
        if self.in_stream:
            self.stream_device_underflows += 1
        self.timeline_blocks = 0

    def _stream_complete(self) -> bool:
        """The producer marked the end of the current stream and everything up to it is written."""
        ring = self.ring
        end = self.control.end_index
        return end > self.stream_start and end >= ring.write_index

    def _at_stream_end(self) -> bool:
        """The current stream is complete and all of it has been read."""
        return self._stream_complete() and self.ring.read_index >= self.control.end_index

    def render(self, out: np.ndarray, latency_frames: int, now: float) -> None:
        """Fill ``out`` completely (silence where there is nothing to play); copy it to the reference
        ring, stamped with when its first frame reaches the DAC: ``now`` (the callback's
        CLOCK_MONOTONIC time) plus the device's output latency and the frames handed to the device
        before it (``backlog_frames``)."""
        self._render(out, latency_frames, now)
        if self.ref is not None:
            self._stamp_ref(len(out), latency_frames, now)
            self.ref.write(out)  # a full reference ring (no capture reading it) only counts overruns
        if self.tap is not None:
            self.tap.push(out)   # a copy into a preallocated buffer; measured by the publishing thread
        if self.listen_on and self.listen is not None:
            self.listen.write(out)  # a full listen ring (the console behind) only counts overruns

    def _stamp_ref(self, frames: int, latency_frames: int, now: float) -> None:
        """The reference block about to be written: when it is due at the DAC, and whether it follows
        the last one without a gap (the device ran dry after a late callback: a new run)."""
        ref = self.ref
        assert ref is not None
        due_ns = int(now * 1e9) + (latency_frames + self.backlog_frames) * 1_000_000_000 // RATE_HZ
        if abs(due_ns - self._ref_next_due_ns) > REF_RUN_TOLERANCE_NS:
            self._ref_run_index = ref.write_index
        self._ref_next_due_ns = due_ns + frames * 1_000_000_000 // RATE_HZ
        ref.stamp_due(ref.write_index, due_ns, self._ref_run_index)

    def _retarget(self) -> None:
        """The prebuffer in effect: the ring's jitter-buffer target (else the configured one) plus
        the growth after underruns, capped. Real-time safe (one shared-memory read)."""
        target = self.control.target_frames
        lead = self.device_lead_frames if target > 0 else 0
        p = min(self.max_prebuffer_frames, (target + lead if target > 0 else self.base_prebuffer_frames)
                + self.growth_frames)
        self.prebuffer_frames = p
        # half the headroom (class docstring): the device's read-ahead spread is not headroom
        self.low_water_frames = max(0, p - self.render_frames - lead) // 2

    def _measure_lead(self, n: int, now: float) -> None:
        """The device's read-ahead spread (class docstring) and its steady timeline
        (``timeline_now``), from this block's handoff: the frames handed to the device before it
        against ``now``. Real-time safe (arithmetic only)."""
        lead = (self.handed_frames - self.backlog_frames) - now * RATE_HZ   # plus a constant
        d = lead - self.lead_mean_frames
        if self.handed_frames == 0 or abs(d) > 4 * n:
            # the first block, or a step: a stall the device lost frames over (it underflowed and
            # goes on from there), or a clock that jumped: the past no longer describes the device
            self.lead_mean_frames = lead
            self.lead_up_frames = self.lead_down_frames = 0.0
            d = 0.0
        self.lead_mean_frames += d * LEAD_MEAN_WEIGHT
        self.lead_up_frames = max(d, self.lead_up_frames * LEAD_PEAK_DECAY)
        self.lead_down_frames = max(-d, self.lead_down_frames * LEAD_PEAK_DECAY)
        self.device_lead_frames = min(n, round(self.lead_up_frames + self.lead_down_frames))
        # the steady timeline: the device takes its blocks one after another at its rate, so this
        # block's handoff on it is the mean lead's, not the callback's own (a PulseAudio speaker
        # calls 6.7 or 13.3 ms apart for 10 ms blocks); a step of more than a block (a stall) or
        # the device running dry (device_underflowed) starts it afresh, and until it is known the
        # callback's time stands
        t = lead - self.timeline_mean_frames
        if self.timeline_blocks == 0 or abs(t) > n:
            self.timeline_mean_frames = lead
            self.timeline_blocks = 0
            t = 0.0
        self.timeline_blocks += 1
        self.timeline_mean_frames += t / min(self.timeline_blocks, TIMELINE_MEAN_BLOCKS)
        self.timeline_now = (now + (lead - self.timeline_mean_frames) / RATE_HZ
                             if self.timeline_blocks >= TIMELINE_MIN_BLOCKS else now)
        self.handed_frames += n

    def _render(self, out: np.ndarray, latency_frames: int, now: float) -> None:
        ring = self.ring
        n = len(out)
        self.render_frames = n
        self._measure_lead(n, now)
        self._retarget()
        # the first ring frame not yet handed to the device (the callback may hold resampled frames)
        heard_base = ring.read_index - self.backlog_frames
        if self.control.flush_pending:
            self._flush(out, heard_base, latency_frames)
            return
        state = self.state
        if state is PLAYING:
            self._play(out, 0, heard_base, latency_frames, fade_in=False)
            return
        if state is IDLE or state is DRY:
            if not self._arrive(out, heard_base, latency_frames, now):
                return
        self._wait_prebuffer(out, heard_base, latency_frames)

    def _flush(self, out: np.ndarray, heard_base: int, latency_frames: int) -> None:
        """Apply a pending flush from any state (rule 3): fade out what plays, drop the rest."""
        ring, ctl, n = self.ring, self.control, len(out)
        got = 0
        if self.state is PLAYING:
            # only frames written before the flush request (a new stream may follow them); a
            # caller that fades later in the chain gets the whole block, so its fade has audio
            # to work on whatever its resampler holds back
            want = min(n if not self.fade_on_flush else FLUSH_FADE_FRAMES, n,
                       max(0, ctl.flush_index - ring.read_index))
            got = ring.read_into(out[:want])
        if self.fade_on_flush:
            self._flush_fade.apply(out, got)
        else:
            out[got:] = 0
        # what the listener will have heard when the fade ends: everything already handed to the
        # device (its buffer plays out, nothing takes it back), then the fade
        played_index = heard_base + min(FLUSH_FADE_FRAMES, self.backlog_frames + got)
        ring.take_flush()
        self.flush_mono_ns = int(self.timeline_now * 1e9)   # this block's first frame, on the steady timeline
        if self.state is IDLE:
            # no stream playing or waiting for its prebuffer: the flush cut nothing
            self.stream_start = played_index
            self.stretch_frames = self.stream_expanded_frames = self.stream_device_underflows = 0
        self._emit("flushed", played_index)
        self.waiting_since = None
        self.dry_frames = 0
        self._go(RenderEvent.FLUSHED)
        # the report and the shared heard index carry the same number (one source of the heard position)
        ctl.set_heard(played_index, latency_frames)

    def _arrive(self, out: np.ndarray, heard_base: int, latency_frames: int, now: float) -> bool:
        """IDLE or DRY: silence while the ring is empty (DRY: the gap grows, or the stream ends
        when its end mark came late); when frames are there, start waiting for the prebuffer
        (a new stream, or an underrun after a gap) and return True."""
        ring, ctl = self.ring, self.control
        if ring.read_available == 0:
            out[:] = 0
            if self.state is DRY:
                if self._at_stream_end():
                    self._stream_ended()  # it ran dry at its very end: the end mark came late
                else:
                    self.dry_frames += len(out)  # the gap grows (an underrun if more audio comes)
            if self.state is IDLE:
                ctl.set_heard(heard_base, latency_frames)  # idle: everything handed out has been heard
            return False
        if self.state is DRY:
            # audio came back after the ring ran dry mid-stream: that was an underrun; wait the
            # prebuffer again from now
            self.stream_underruns += 1
            ring.count_underrun(self.dry_frames)
            self._emit("underrun", self.dry_index)
            self.growth_frames = min(self.max_prebuffer_frames, self.growth_frames + RATE_HZ // 50)
            self._retarget()
            self.dry_frames = 0
            self.waiting_since = self.timeline_now
            self._go(RenderEvent.RETURNED)
        else:
            # count the prebuffer from when the stream's first frames arrived: the producer's
            # stamp, else the latest write (a later bound)
            self.stream_start = ring.read_index
            start_ns = ctl.stream_start_ns(self.stream_start)
            self.waiting_since = min(now, (start_ns or ring.write_stamp[1]) / 1e9)
            self._go(RenderEvent.ARRIVED)
        return True

    def _wait_prebuffer(self, out: np.ndarray, heard_base: int, latency_frames: int) -> None:
        """PREBUFFERING or REBUFFERING: silence until the prebuffer has passed, then play.

        Wait the prebuffer *time* after the first frame arrived: with deltas paced at real time
        that is the margin every later delta has (a fill threshold would give none). A new stream
        starts inside the block that reaches it, after ``lead`` frames of silence, so its first
        sample is due exactly then (not up to half a period early or late); this block goes to the
        device after the ``backlog_frames`` a resampling caller still holds. Both are reckoned on
        the device's steady timeline (``timeline_now``), where the device takes this block, not at
        the callback's own time: a callback 3.3 ms late after one that came too early to start
        would otherwise start its block's first frame, 3.3 ms before the stream is due on the
        device, and report it 3.3 ms late. After an underrun, play resumes at the block nearest to
        it (fading in from the block's start)."""
        ring, n = self.ring, len(out)
        rebuffering = self.state is REBUFFERING
        assert self.waiting_since is not None   # rule 4
        now = self.timeline_now
        waited_frames = (now - self.waiting_since) * RATE_HZ + self.backlog_frames
        complete = self._stream_complete()
        early_frames = n // 2 if rebuffering else n
        if waited_frames + early_frames <= self.prebuffer_frames and not complete:
            out[:] = 0
            return
        lead = 0 if complete or rebuffering else min(n - 1, max(0, round(self.prebuffer_frames - waited_frames)))
        if not rebuffering:
            self.first_sample_mono_ns = int(now * 1e9) + (self.backlog_frames + lead) * 1_000_000_000 // RATE_HZ
            self.arrived_mono_ns = int(self.waiting_since * 1e9)
            self.start_delay_frames = self.prebuffer_frames
            target = self.control.target_frames
            self.start_device_lead_frames = self.device_lead_frames if target > 0 else 0
            self.stretch_frames = self.stream_expanded_frames = self.stream_device_underflows = 0
            self.level_low_frames = self.level_floor_frames = -1
            self.level_seen_frames = 0
            self.cushion_left_frames = (min(CUSHION_MAX_FRAMES, max(CUSHION_MIN_FRAMES, int(target * CUSHION_SHARE)))
                                        if target > 0 else 0)
            self.cushion_frames = self.since_cushion_frames = 0
            self._emit("started", ring.read_index)
        self.stretcher.reset()   # a new stream or after a gap: no past to splice to
        self.waiting_since = None
        self._go(RenderEvent.PREBUFFERED)
        self._play(out, lead, heard_base, latency_frames, fade_in=rebuffering)

    def _play(self, out: np.ndarray, lead: int, heard_base: int, latency_frames: int, fade_in: bool) -> None:
        """PLAYING: ``lead`` frames of silence, then the stream (time-stretched unless it starts
        here or fades in after a gap)."""
        ring = self.ring
        if lead:
            out[:lead] = 0
            self._played(out[lead:], ring.read_into(out[lead:]), heard_base, latency_frames, fade_in)
            return
        got = self._stretch(out) if self.stretch and not fade_in else 0
        got += ring.read_into(out[got:])
        self._played(out, got, heard_base, latency_frames, fade_in)

    def _played(self, out: np.ndarray, got: int, heard_base: int, latency_frames: int, fade_in: bool) -> None:
        """The rest of a playing block: ``got`` of ``out``'s frames were filled (fades, a
        stream's end or a dry ring, the heard index from ``heard_base``, the first ring frame not
        yet handed to the device before this block)."""
        ring, ctl, n = self.ring, self.control, len(out)
        if fade_in and got > 0:
            k = min(got, FADE_FRAMES)
            out[:k] = (out[:k] * self._fade_up[:k]).astype(np.int16)
        self.since_cushion_frames += got
        if got < n:
            out[got:] = 0
            if got > 0:
                k = min(got, FADE_FRAMES)
                out[got - k:got] = (out[got - k:got] * self._fade_down[FADE_FRAMES - k:]).astype(np.int16)
            if self._at_stream_end():
                self._stream_ended()
            else:
                # dry mid-stream: an underrun if more of this stream comes, its end if the end mark
                # comes first (the API may say "done" a little after the last delta)
                self.dry_index = ring.read_index
                self.dry_frames = n - got
                self._go(RenderEvent.RAN_DRY)
        else:
            self.stretcher.remember(out)
        ctl.set_heard(max(ctl.heard_index, heard_base - latency_frames), latency_frames)

    def _emit(self, kind: str, index: int) -> None:
        """Queue a stream event for the publishing thread and wake it."""
        self.events.append(self._event(kind, index))
        self.wake()

    def wake(self) -> None:
        """Wake the publishing thread, if it sleeps on ``wake_fd``: one non-blocking eventfd write,
        real-time safe (a failure is counted in ``wake_errors``, published on playback.cadence)."""
        if self.wake_fd is not None:
            try:
                os.eventfd_write(self.wake_fd, 1)
            except OSError:
                self.wake_errors += 1

    def _event(self, kind: str, index: int) -> StreamEvent:
        return StreamEvent(kind, index, self.stream_start, self.stretch_frames, self.stream_expanded_frames,
                           self.stream_device_underflows)

    def _stretch(self, out: np.ndarray) -> int:
        """Expand or accelerate at the start of ``out`` (see the class docstring); returns how
        many frames of ``out`` it wrote, the ring's read position left where playing goes on."""
        ring = self.ring
        n = len(out)
        level_frames = ring.read_available - n   # what stays in the ring after this block
        low = level_frames < self.low_water_frames
        cushion = self.cushion_left_frames > 0 and self.since_cushion_frames >= CUSHION_EVERY_FRAMES
        expand = low or cushion
        # give the added latency beyond the cushion back while the ring holds at least its usual
        # level (the prebuffer less a block, plus the cushion) even without the period left out
        extra = self.stretch_frames - self.cushion_frames
        keep = self.prebuffer_frames - n + self.cushion_frames   # the level the stretcher keeps
        if self.control.continuous:
            # a continuous stream: its least level of the last window above that is latency too
            least = self.level_low_frames
            self.level_low_frames = level_frames if least < 0 else min(least, level_frames)
            self.level_seen_frames += n
            if self.level_seen_frames >= LEVEL_WINDOW_FRAMES:
                self.level_floor_frames, self.level_low_frames, self.level_seen_frames = self.level_low_frames, -1, 0
            if self.level_floor_frames >= 0:
                extra = max(extra, self.level_floor_frames - keep - CONTINUOUS_SLACK_FRAMES)
        accelerate = extra >= MIN_PERIOD_FRAMES and level_frames - min(MAX_PERIOD_FRAMES, extra) >= keep
        if not (expand or accelerate) or self._stream_complete():
            return 0  # a complete stream has nothing to wait for and nothing to catch up
        # the audio due next, read in place; copied only where it wraps around the ring's end
        first, rest = ring.read_regions(LOOKAHEAD_FRAMES)
        ahead = first if not len(rest) else self._ahead[:ring.peek_into(self._ahead)]
        if expand:
            # the lower the ring, the more of the block is stretch: half of it, three quarters
            # under a quarter of the prebuffer (a 40 ms margin then lasts 160 ms)
            urgent = level_frames < self.low_water_frames // 2
            t = self.stretcher.expand(ahead, out, (3 * n // 4 if urgent else n // 2) if low
                                      else min(self.cushion_left_frames, n // 2))
            if not low and t:
                self.cushion_left_frames = max(0, self.cushion_left_frames - t)
                self.cushion_frames += t
                self.since_cushion_frames = 0
            self.stretch_frames += t
            self.stream_expanded_frames += t
            self.expanded_frames += t
            return t
        t = self.stretcher.accelerate(ahead, out, extra)
        ring.skip(2 * t)
        self.stretch_frames -= min(t, max(0, self.stretch_frames - self.cushion_frames))   # its own stretch first
        if self.level_floor_frames >= 0:
            self.level_floor_frames = max(0, self.level_floor_frames - t)
        self.accelerated_frames += t
        return t

    def _stream_ended(self) -> None:
        """PLAYING or DRY at the stream's end mark: report it, give growth back, go IDLE."""
        self.dry_frames = 0
        self._emit("stopped", self.ring.read_index)
        if self.stream_underruns == 0:  # a clean stream: give back half of what underruns added
            extra = self.growth_frames
            self.growth_frames -= extra // 2 if extra > RATE_HZ // 100 else extra
            self._retarget()
        self.stream_underruns = 0
        self._go(RenderEvent.ENDED)


class DeviceFeeder:
    """The resampling half of a device callback: renders 24 kHz blocks, resamples them to the
    device rate (soxr) and hands out exactly what the device asks for, keeping the rest in a FIFO.

    On a flush it renders once without the renderer's fade, fades what this callback hands out
    from its start (resampled leftovers included) with :class:`FlushFade` at the device rate,
    drops the rest and clears the resampler, so nothing of the flushed audio plays later.
    ``fill`` is real-time safe apart from the bytes it returns.
    """

    def __init__(self, renderer: Renderer, block_frames: int, device_rate_hz: int) -> None:
        from engine.audio.devices import resample_stream
        self.renderer = renderer
        renderer.fade_on_flush = False   # faded once, here, at the device rate
        self.device_rate_hz = device_rate_hz
        self.resampler = resample_stream(RATE_HZ, device_rate_hz)
        self._block = np.zeros(block_frames, dtype=np.int16)
        device_block = device_rate_hz * block_frames // RATE_HZ
        self.fifo = SampleFifo(device_block * 8)          # resampled frames waiting for the device
        self._fade = FlushFade(device_rate_hz)
        self._flush_out = np.zeros(device_block * 4, dtype=np.int16)
        self._rendered_frames = 0         # 24 kHz frames rendered since the last flush
        self._handed_device_frames = 0    # device frames handed out since the last flush

    def fill(self, frame_count: int, latency_frames: int, now: float) -> bytes:
        """``frame_count`` device-rate frames for the device (silence where there is nothing)."""
        r, fifo = self.renderer, self.fifo
        flushing = r.control.flush_pending  # one render applies it
        while fifo.length < frame_count or flushing:
            # what was rendered and not handed to the device yet: in the FIFO, and in the resampler,
            # which hands out its output in bunches (none for one block, two blocks' for the next)
            r.backlog_frames = max(0, (self._rendered_frames * self.device_rate_hz - self._handed_device_frames * RATE_HZ)
                                   // self.device_rate_hz)
            r.render(self._block, latency_frames, now)
            self._rendered_frames += len(self._block)
            fifo.push(self.resampler.resample_chunk(self._block))
            if flushing:
                break
        if flushing:  # fade what this callback hands out from its start; drop the rest
            out = self._flush_out[:frame_count]
            m = min(len(out), fifo.length)
            out[:m] = fifo.head(m)
            self._fade.apply(out, m)
            fifo.drop(fifo.length)
            self.resampler.clear()
            # the device goes on from this callback's frames: what was rendered beyond them is never
            # handed over, so the renderer's hand-off count (its read-ahead and steady timeline) takes
            # it back (or adds the silence this callback pads with)
            r.handed_frames -= (self._rendered_frames * self.device_rate_hz
                                - (self._handed_device_frames + frame_count) * RATE_HZ) // self.device_rate_hz
            self._rendered_frames = self._handed_device_frames = 0   # nothing rendered waits any more
            return out.tobytes() + bytes(2 * max(0, frame_count - len(out)))
        data = fifo.head(frame_count).tobytes()
        self._handed_device_frames += min(frame_count, fifo.length)
        fifo.drop(frame_count)
        return data

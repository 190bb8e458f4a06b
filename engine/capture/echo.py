"""Echo handling in the capture process: what the speaker played must not come back as
the user's voice.

* :class:`FarEnd` reads the reference ring, which the playback process fills with every
  frame it hands to the device (silence and truncation included) and stamps with when the
  frame reaches the DAC. It hands the canceller, with each mic block, the reference frames
  the speaker plays :data:`FAR_LEAD_MS` after that block was captured (:class:`MicClock`
  says when, from the device's ADC times): lined up by time, not by count, so a late
  playback callback, or a stall that made the speaker run dry, never moves the echo's delay
  for good. Where it must guess (frames not written yet, the silence of a gap right after the
  speaker ran dry), the far end is *uncertain* for that block.
* :class:`EchoCanceller` is WebRTC's audio processing module (pywebrtc-audio, AEC3) at
  32 kHz, fed 10 ms blocks of mic (near end) and reference (far end), in and out at the
  engine's 24 kHz through soxr. It also measures its echo return loss enhancement (ERLE).
* :class:`TalkGuard` is the residual-echo guard behind AEC3: it tells someone talking over
  the model from the echo AEC3 leaks, and holds while the far end is uncertain.
* :class:`EchoGate` is half-duplex: the mic is silent while the model is audible.

Everything here runs in the audio callback: no logging, no raising, counters only.
"""
from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from engine.audio.ring import Ring, SampleFifo
from engine.pcm import RATE_HZ
from engine.stats import percentiles

# AEC3's rate: the lowest of its rates (16, 32, 48 kHz) that holds the 24 kHz stream's whole band
# (to 12 kHz). AEC3 cancels in its 0-8 kHz band and gains the bands above; at 32 kHz there is one
# band above, at 48 kHz two, and a three-band filter bank to split them: 32 kHz costs about a quarter
# less a block for the same band (bench/results/2026-12.md, "AEC3 at 32 kHz, and soxr's blocks").
AEC_RATE_HZ = 32000
AEC_BLOCK_FRAMES = AEC_RATE_HZ // 100      # WebRTC processes 10 ms blocks
FAR_ACTIVE_DBFS = -50.0                    # a reference block louder than this counts for ERLE
ERLE_WINDOW_BLOCKS = 100                   # one ERLE figure per second of far-end speech
GUARD_WINDOW_BLOCKS = 50                   # 500 ms of far-end history: longer than any echo path
GUARD_ATTENUATION = 0.03                   # -30 dB on blocks the guard takes for residual echo
TALK_DB = -40.0                            # a block above this (re the far end's recent peak) may be a talker
TALK_ONSET_BLOCKS = 15                     # 150 ms above TALK_DB in a row: a talker (AEC3's leaks are shorter)
TALK_HANG_BLOCKS = 50                      # a talker's blocks pass 500 ms past their last one above TALK_DB
HOLD_BLOCKS = 20                           # the guard holds at least 200 ms past a block whose far end was uncertain
HOLD_RELEASE_DB = 6.0                      # ...and then until what AEC3 leaves is this far under the talk threshold
HOLD_MAX_BLOCKS = 150                      # ...but 1.5 s of far-end speech past that block at most
HOLD_DECAY = 0.8                           # what AEC3 leaves: an energy sum decaying 1 dB a block (50 ms time constant)
ECHO_BEAT_DB = 6.0                         # held: a block is speech if the mic is this far above the echo it may hold
ERL_UP_DB, ERL_DOWN_DB = 0.2, 0.02        # the echo path's gain estimate moves this far a block toward a block's
ERL_LEARN_BLOCKS = 50                      # ratio above it, below it (its 90th percentile); the loudest of the first
                                           # this many blocks to start with (0 dB before them)
FAR_LEAD_MS = 10                           # the reference handed with a mic block plays this long after its capture
FAR_TOLERANCE_MS = 6                       # a misalignment this small is left to AEC3 (the stream stays continuous)
FAR_RETIME_MS = 1                          # ...but after zeros for missing frames, it is re-timed to the ms
FAR_SETTLE_MS = 2                          # ...and for FAR_SETTLE_S after the speaker ran dry, to this
FAR_SETTLE_S = 2                           # (its DAC times are off by a few ms for a while after: they settle)
FAR_UNCERTAIN_MS = 30                      # zeros for missing frames this long in a row make the far end uncertain
MIC_CLOCK_TOLERANCE_MS = 6                 # an ADC time this far off the mic's clock is jitter, or a jump
MIC_CLOCK_JUMP_BLOCKS = 3                  # so many in a row: the clock jumps to them
MIC_CLOCK_SETTLE_REPORTS = 16              # the clock is the mean of its first reports, then follows 1/16 of each
NS_PER_S = 1_000_000_000


def native_constants() -> dict[str, float]:
    """The echo statistics' and the guard's constants by name, for the native backend's twin of
    :class:`EchoCanceller` and :class:`TalkGuard` (engine/audio/_native.c): one source for both."""
    return {"TALK_DB": TALK_DB, "HOLD_RELEASE_DB": HOLD_RELEASE_DB, "HOLD_DECAY": HOLD_DECAY,
            "ECHO_BEAT_DB": ECHO_BEAT_DB, "ERL_UP_DB": ERL_UP_DB, "ERL_DOWN_DB": ERL_DOWN_DB,
            "FAR_ACTIVE_DBFS": FAR_ACTIVE_DBFS,
            "GUARD_ATTENUATION": GUARD_ATTENUATION, "TALK_ONSET_BLOCKS": TALK_ONSET_BLOCKS,
            "TALK_HANG_BLOCKS": TALK_HANG_BLOCKS, "HOLD_BLOCKS": HOLD_BLOCKS, "HOLD_MAX_BLOCKS": HOLD_MAX_BLOCKS,
            "ERL_LEARN_BLOCKS": ERL_LEARN_BLOCKS, "GUARD_WINDOW_BLOCKS": GUARD_WINDOW_BLOCKS,
            "ERLE_WINDOW_BLOCKS": ERLE_WINDOW_BLOCKS}


def far_constants(lead_ms: int = FAR_LEAD_MS, tolerance_ms: int = FAR_TOLERANCE_MS) -> dict[str, int]:
    """FarEnd's and MicClock's constants by name, for their twin in C (engine.audio.native.NativeFarEnd)."""
    return {"lead_ms": lead_ms, "tolerance_ms": tolerance_ms, "FAR_RETIME_MS": FAR_RETIME_MS,
            "FAR_SETTLE_MS": FAR_SETTLE_MS, "FAR_SETTLE_S": FAR_SETTLE_S, "FAR_UNCERTAIN_MS": FAR_UNCERTAIN_MS,
            "MIC_CLOCK_TOLERANCE_MS": MIC_CLOCK_TOLERANCE_MS, "MIC_CLOCK_JUMP_BLOCKS": MIC_CLOCK_JUMP_BLOCKS,
            "MIC_CLOCK_SETTLE_REPORTS": MIC_CLOCK_SETTLE_REPORTS}


def _frames_ns(frames: int) -> int:
    """The duration of ``frames`` frames at RATE_HZ, in ns."""
    return frames * NS_PER_S // RATE_HZ


class MicClock:
    """When each mic frame was captured, on CLOCK_MONOTONIC. Pure.

    The device callback is told the ADC time of its block's first frame. Through PulseAudio
    those times jitter (0.1 ms median, 2.8 ms at the 99th percentile here, and a block now
    and then 50 ms off, the next one back), while the frames come at the device's steady
    rate. So the clock is a line: frame ``j`` was captured at ``origin_ns + j / RATE_HZ``. A
    report within MIC_CLOCK_TOLERANCE_MS of it moves the origin 1/16 of the way (that follows
    the device clock's drift, not its jitter; the first 16 are averaged: ``settled`` after
    them); one further off is taken for jitter; when
    MIC_CLOCK_JUMP_BLOCKS reports in a row are, the stream jumped (frames lost to an overrun,
    a restarted stream) and the origin moves to the latest. The clock is ``doubtful`` from the
    second such report on (it may be wrong by the jump) until one is back within tolerance.
    """

    def __init__(self) -> None:
        self.frames = 0                    #: mic frames placed so far
        self.origin_ns: int | None = None
        self.reports = 0                   # reports on the line so far (the first ones are averaged)
        self.off_reports = 0               # reports in a row off the line
        self.jumps = 0                     #: times the clock jumped to the reports
        self.doubtful = False

    @property
    def settled(self) -> bool:
        """Its first reports are in: the origin is their mean, no longer the first one's jitter."""
        return self.reports >= MIC_CLOCK_SETTLE_REPORTS

    def place(self, frames: int, adc_ns: int) -> int:
        """The capture time (ns) of the first of the next ``frames`` mic frames, the device's
        report being ``adc_ns``."""
        if self.origin_ns is None:
            self.origin_ns = adc_ns - _frames_ns(self.frames)
        at_ns = self.origin_ns + _frames_ns(self.frames)
        off_ns = adc_ns - at_ns
        if abs(off_ns) <= MIC_CLOCK_TOLERANCE_MS * 1_000_000:
            self.reports += 1
            self.origin_ns += off_ns // min(self.reports, MIC_CLOCK_SETTLE_REPORTS)
            self.off_reports = 0
            self.doubtful = False
        else:
            self.off_reports += 1
            self.doubtful = self.off_reports >= 2
            if self.off_reports >= MIC_CLOCK_JUMP_BLOCKS:
                self.origin_ns += off_ns
                at_ns = adc_ns
                self.jumps += 1
                self.off_reports = 0
        self.frames += frames
        return at_ns


class FarEnd:
    """The consumer side of the reference ring: for each mic block, the reference frames the
    speaker played with it, lined up by time.

    Playback stamps each block it writes with when its first frame reaches the DAC
    (``Ring.stamp_due``: PortAudio's output time, which through PulseAudio is exact to a
    quarter of a millisecond callback to callback) and where the latest run of frames without
    a gap between them began. Capture knows when its mic block was captured
    (:class:`MicClock`). So ``take`` hands out, for a block captured at ``t``, the frames due at
    ``t + FAR_LEAD_MS`` on: the far end leads its echo by the lead plus the echo path's own
    delay, whatever the device buffers hold and however late the playback callback runs.

    Why not by count (the frames as they come, one per mic frame): a playback callback
    more than the device buffer late makes the speaker run dry; zero-padding the reference
    for the wait and then taking the late frames as they come moves the reference against
    its echo by the difference of the two (the buffer, the refill), for good, and AEC3 leaks
    for seconds while it finds the new delay (on a loaded machine: false barge-ins). By
    time, every such event lines up again by itself:

    - frames due after the block's time (the speaker ran dry, its stamps say until when):
      silence before them, counted in ``gap_frames`` (the speaker did play silence then);
    - frames due before it (they played while the canceller got zeros for them, because
      they were not written yet): skipped (``skipped_frames``);
    - frames not written yet when the block needs them: zeros (``missing_frames``, which
      also counts the gap's): the speaker may still play them.

    A misalignment under FAR_TOLERANCE_MS is left alone (the reference stays one continuous
    stream; AEC3 follows that much: through PulseAudio the DAC times are off by a few ms for a
    while after the speaker ran dry, and following every step would move the reference again
    and again), except after zeros for missing frames (the frames that come then are stamped in
    the same run, so exactly) and while the mic clock settles (the first 320 ms): then it is
    re-timed to FAR_RETIME_MS; and for FAR_SETTLE_S after a gap, to FAR_SETTLE_MS (the run's
    later stamps are truer than its first, and the guard holds then anyway).

    ``uncertain`` says whether the latest take had to guess: zeros for missing frames for
    FAR_UNCERTAIN_MS in a row or more, the silence of a gap and moves in the FAR_SETTLE_S after
    it (the speaker's stamps are off by a few ms right after it ran dry, and under load it runs
    dry for a few ms many times a minute), frames of a new run (after a flush, or an idle
    speaker) skipped into line before any of it was taken (its first DAC times can be 15 ms off:
    a reply's start then leaked enough for a false barge-in), the mic clock in doubt. The
    canceller's guard then holds. Shorter runs of zeros for missing frames (a playback callback a little late: its
    frames come with their stamps and are skipped) make AEC3 leak for less than the guard's
    talker onset: no hold. Skipping frames due before their time is otherwise no guess (the
    stamps are exact within a run, and a flush's dropped frames never played).
    Before playback has stamped anything, frames are taken by count.

    The native backend runs its twin in C (engine.audio.native.NativeFarEnd, this class's constants
    by name from :func:`far_constants`): a change here is a change there, in the same commit;
    tests/test_echo_far_end.py drives both with the same input and checks they agree.
    """

    def __init__(self, ring: Ring, lead_ms: int = FAR_LEAD_MS, tolerance_ms: int = FAR_TOLERANCE_MS) -> None:
        self.ring = ring
        self.lead_ns = lead_ms * 1_000_000
        self.tolerance_frames = RATE_HZ * tolerance_ms // 1000
        self.retime_frames = RATE_HZ * FAR_RETIME_MS // 1000
        self.clock = MicClock()
        self.buf = np.zeros(RATE_HZ, dtype=np.int16)   # one second: more than any callback asks for
        self.missing_frames = 0         #: zeros handed out in place of reference frames (gap_frames included)
        self.gap_frames = 0             #: of those, time the speaker's own stamps say it had nothing to play
        self.skipped_frames = 0         #: reference frames dropped: due before the mic frames they would go with
        self.realignments = 0           #: moves of the reference to its frames' due time (after the first)
        self.uncertain_frames = 0       #: mic frames whose far end was uncertain
        self.uncertain = False          #: the latest take's far end was uncertain
        self._anchor: tuple[int, int] | None = None   # (ring index, due ns): the run the read position is in
        self._next: tuple[int, int] | None = None     # (first index, its due ns) of a later run
        self._aligned = False
        self._padded = False      # zeros went out for frames not written yet: the next ones are re-timed to the ms
        self.settle_frames = RATE_HZ * FAR_SETTLE_MS // 1000
        self._settle_until = 0    # mic frame (the clock's count) until which the tolerance is settle_frames
        self.uncertain_zero_frames = RATE_HZ * FAR_UNCERTAIN_MS // 1000
        self._zero_run = 0        # zeros handed out in takes in a row
        self._run = -1            # ring index where the read position's run began
        self._run_fresh = False   # no frame of that run taken yet: its first DAC times may be off

    def _follow_stamps(self, read_index: int) -> None:
        stamp = self.ring.due_stamp()
        if stamp is None:
            return
        index, due_ns, run_index = stamp
        if run_index <= read_index or self._anchor is None:
            self._anchor, self._next = (index, due_ns), None
            self._begin_run(run_index)
        else:   # unread frames of an earlier run before it: they keep that run's anchor
            self._next = (run_index, due_ns - _frames_ns(index - run_index))

    def take(self, frames: int, adc_ns: int) -> np.ndarray:
        """The reference for the next ``frames`` mic frames, the first captured at ``adc_ns``
        (as the device reports it; CLOCK_MONOTONIC). A view, valid until the next take."""
        frames = min(frames, len(self.buf))
        out = self.buf[:frames]
        ring = self.ring
        start_ns = self.clock.place(frames, adc_ns) + self.lead_ns
        uncertain = self.clock.doubtful
        self._follow_stamps(ring.read_index)
        if self._anchor is None:   # nothing stamped yet: by count
            got = ring.read_into(out)
            if got < frames:
                out[got:] = 0
                self.missing_frames += frames - got
            self._set_uncertain(uncertain, frames)
            return out
        pos = zeros = 0           # zeros: for missing frames (a gap's are measured)
        while pos < frames:
            r = ring.read_index
            if self._next is not None and r >= self._next[0]:
                self._begin_run(self._next[0])
                self._anchor, self._next = self._next, None
            index, due_ns = self._anchor
            # > 0: frame r is due after the mic frame at pos (silence first); < 0: it is due before (skip)
            early_frames = (due_ns + _frames_ns(r - index) - start_ns - _frames_ns(pos)) * RATE_HZ // NS_PER_S
            available = ring.write_index - r
            tolerance = (self.retime_frames if self._padded or not self._aligned or not self.clock.settled
                         else self.settle_frames if self.clock.frames < self._settle_until
                         else self.tolerance_frames)
            if early_frames < -tolerance and available > 0:
                # frames due before their time: they played while zeros went out for them, or were
                # never played (a flush dropped what the device feeder held): measured, not a guess,
                # unless the DAC times are still settling after the speaker ran dry
                self.skipped_frames += ring.skip(min(-early_frames, available))
                # ...or a new run's first DAC times (after a flush, or an idle speaker) are off
                if self._moved() and (self._run_fresh or self.clock.frames < self._settle_until):
                    uncertain = True
                    if self._run_fresh:
                        self._settle_until = self.clock.frames + RATE_HZ * FAR_SETTLE_S
            elif early_frames > tolerance:
                n = min(early_frames, frames - pos)
                out[pos:pos + n] = 0
                pos += n
                self.missing_frames += n
                self.gap_frames += n
                # the speaker ran dry: its DAC times right after that are off by a few ms for a while
                if self._moved():
                    uncertain = True
                    self._settle_until = self.clock.frames + RATE_HZ * FAR_SETTLE_S
            elif available <= 0:
                out[pos:] = 0
                zeros += frames - pos
                self.missing_frames += frames - pos
                self._padded = True
                break
            else:
                n = min(frames - pos, available)
                if self._next is not None:
                    n = min(n, self._next[0] - r)
                pos += ring.read_into(out[pos:pos + n])
                self._aligned, self._padded, self._run_fresh = True, False, False
        # zeros for missing frames for a while in a row (a stall) are a guess AEC3 leaks on for longer
        # than the guard's onset; a few (a callback a little late, its frames then skipped) are not
        self._zero_run = self._zero_run + zeros if zeros else 0
        uncertain = uncertain or self._zero_run >= self.uncertain_zero_frames
        self._set_uncertain(uncertain, frames)
        return out

    def _begin_run(self, run_index: int) -> None:
        if run_index != self._run:
            self._run, self._run_fresh = run_index, True

    def _moved(self) -> bool:
        """Count a realignment (not those at the start, while the mic clock settles); whether it counted."""
        if self._aligned and self.clock.settled:
            self.realignments += 1
            return True
        return False

    def _set_uncertain(self, uncertain: bool, frames: int) -> None:
        self.uncertain = uncertain
        if uncertain:
            self.uncertain_frames += frames


class TalkGuard:
    """The residual-echo guard behind AEC3: per 10 ms block, whether to attenuate it. Pure.

    States: ``QUIET`` (the far end silent for the last 500 ms), ``ECHO`` (the far end active and
    no talker found), ``TALK`` (a talker is speaking over the far end). Inputs per block: the
    cancelled block's RMS (``out``), the mic block's RMS before cancelling (``near``), and the
    loudest far-end block RMS of the last 500 ms (``far_peak``; the canceller keeps it up while
    the reference is zeros for missing frames). A *hold* (``hold``: the far end was uncertain,
    see :class:`FarEnd`) lasts HOLD_BLOCKS past its latest uncertain block, then until what AEC3
    leaves (its recent output while the far end speaks, an energy sum decaying 1 dB a block) is
    HOLD_RELEASE_DB under the talk threshold, so it can no longer make a talker (after a stall
    AEC3 re-converges in 0.2 to 1 s on this machine's echo path), HOLD_MAX_BLOCKS of far-end
    speech at most. The guard also holds from its start until AEC3 has first converged (its first
    seconds of far-end speech leak as much: on a loaded machine they made talkers), for
    HOLD_BLOCKS of far-end speech at least: the echo path's delay leaves AEC3's output silent
    for the first blocks, converged or not.

    Evidence of a talker in a block:

    - ``out`` above TALK_DB re ``far_peak`` (well above what AEC3 leaves of echo), except in
      ECHO while held: AEC3's output may then be echo it could not cancel;
    - there, instead: ``near`` ECHO_BEAT_DB above the echo estimate, ``far_peak`` times the
      echo path's measured gain (``erl``: learned on echo-only blocks, the 90th percentile of the
      ratio of mic to far end, tracked in dB from the loudest of the first ERL_LEARN_BLOCKS; 0 dB
      before them):
      the mic is louder than any echo it can hold, so someone is talking whatever the
      canceller did.

    | state       | block                                        | next  | block is   |
    |-------------|----------------------------------------------|-------|------------|
    | any         | far_peak not active                          | QUIET | passed     |
    | QUIET       | far_peak active                              | ECHO  | (as ECHO)  |
    | ECHO        | not held, ``out`` above ``loud_db``          | ECHO  | passed     |
    | ECHO        | evidence, TALK_ONSET_BLOCKS in a row         | TALK  | passed     |
    | ECHO        | held, evidence                               | ECHO  | passed     |
    | ECHO        | otherwise                                    | ECHO  | attenuated |
    | TALK        | evidence                                     | TALK  | passed     |
    | TALK        | none, within TALK_HANG_BLOCKS of the last    | TALK  | passed     |
    | TALK        | none, longer                                 | ECHO  | attenuated |

    Why: AEC3 leaves the echo 50 dB down once converged, but leaks for tens of ms after the echo
    path moves, and leaks it whole while its far end is wrong (a stalled playback: the reference
    is short, or has just been moved back into line). A threshold on level alone (``loud_db``,
    the old guard) cannot tell a leak from someone talking more softly than the model's echo,
    and so lost soft double talk. A talker lasts: 150 ms above TALK_DB (well above a converged
    residual) makes one, whose speech then passes until 500 ms after it last rose above it (in
    double talk AEC3's suppressor cuts the talker to bursts; the server's VAD waits 500 ms too).
    While held, a new talker must be louder than the echo could be; one already talking keeps
    talking (a barge-in's own flush moves the reference, and must not cut the barge-in short).
    The cost: the first 150 ms of soft double talk are attenuated (a loud talker passes at
    once), and while held, a new talker under the echo's level is.
    """

    QUIET, ECHO, TALK = "quiet", "echo", "talk"

    def __init__(self, loud_db: float, active_rms: float) -> None:
        self.loud_ratio = 10 ** (loud_db / 20)
        self.talk_ratio = 10 ** (TALK_DB / 20)
        self.beat_ratio = 10 ** (ECHO_BEAT_DB / 20)
        self.release_ratio = 10 ** ((TALK_DB - HOLD_RELEASE_DB) / 20)
        self.active_rms = active_rms
        self.state = self.QUIET
        self.run_blocks = 0       # blocks with evidence in a row (ECHO)
        self.hang_blocks = 0      # blocks since the last one with evidence (TALK)
        self.holding = True       # from the start: until AEC3 has converged on the echo path
        self.hold_min_age = HOLD_BLOCKS   # far-end speech blocks the first hold lasts at least (its echo must arrive)
        self.hold_blocks = 0      # blocks the hold lasts at least
        self.hold_age = 0         # far-end speech blocks since the latest uncertain one
        self.out_energy = 0.0     # recent output energy while the far end is active (a decaying sum)
        self.far_peak = 0.0       # the latest block's far_peak
        self.erl_db = 0.0         # the echo path's gain (mic RMS / far_peak, dB): its 90th percentile, tracked
        self.erl_blocks = 0       # echo-only blocks it learnt from
        self.talks = 0            #: ECHO -> TALK transitions (talkers found over the far end)
        self.holds = 0            #: holds begun while the far end was active
        self.held_blocks = 0      #: blocks judged while held, with the far end active

    @property
    def erl(self) -> float:
        """The echo path's gain the guard uses: the 90th percentile of mic RMS over far_peak in echo (1 until learnt)."""
        return 10 ** (self.erl_db / 20) if self.erl_blocks >= ERL_LEARN_BLOCKS else 1.0

    def hold(self, blocks: int) -> None:
        """The far end is uncertain: hold for at least the next ``blocks`` blocks, then until AEC3
        leaves HOLD_RELEASE_DB under the talk threshold again, HOLD_MAX_BLOCKS at most."""
        if not self.holding:
            self.holding = True
            self.holds += self.far_peak > self.active_rms
        self.hold_blocks = max(self.hold_blocks, blocks)
        self.hold_age = 0

    @property
    def recent_out_rms(self) -> float:
        """The RMS of AEC3's recent output while the far end was active (its energy sum decays 1 dB a block)."""
        return math.sqrt(self.out_energy * (1 - HOLD_DECAY))

    def attenuate(self, out_rms: float, far_peak: float, near_rms: float = 0.0) -> bool:
        """Advance by one block; True if this block is taken for residual echo."""
        held = self.holding
        self.far_peak = far_peak
        if far_peak > self.active_rms:
            self.out_energy = self.out_energy * HOLD_DECAY + out_rms * out_rms
        if held:   # this block is judged held; the hold may end after it
            self.hold_age += far_peak > self.active_rms
            if self.hold_blocks > 0:
                self.hold_blocks -= 1
            elif ((self.hold_age >= self.hold_min_age and self.recent_out_rms <= self.release_ratio * far_peak)
                  or self.hold_age >= HOLD_MAX_BLOCKS):
                self.holding, self.hold_min_age = False, 0
        if far_peak <= self.active_rms:
            self.state, self.run_blocks, self.hang_blocks = self.QUIET, 0, 0
            return False
        if held:
            self.held_blocks += 1
        if held and self.state != self.TALK:
            evidence = near_rms >= self.beat_ratio * self.erl * far_peak
        else:
            evidence = out_rms >= self.talk_ratio * far_peak
        if self.state == self.TALK:
            if evidence:
                self.hang_blocks = 0
                return False
            self.hang_blocks += 1
            if self.hang_blocks <= TALK_HANG_BLOCKS:
                return False
            self.state, self.run_blocks = self.ECHO, 0
            return True
        self.state = self.ECHO
        if not evidence:   # echo only (the mic's level says nothing of AEC3): learn the echo path's gain
            ratio_db = 20 * math.log10(max(near_rms, 1e-3) / far_peak)
            if self.erl_blocks < ERL_LEARN_BLOCKS:    # the loudest of the first blocks: an upper start
                self.erl_db = ratio_db if self.erl_blocks == 0 else max(self.erl_db, ratio_db)
            else:
                self.erl_db += ERL_UP_DB if ratio_db > self.erl_db else -ERL_DOWN_DB
            self.erl_blocks += 1
        self.run_blocks = self.run_blocks + 1 if evidence else 0
        if self.run_blocks >= TALK_ONSET_BLOCKS:
            self.state, self.hang_blocks = self.TALK, 0
            self.talks += 1
            return False
        if held:
            return not evidence
        return out_rms < self.loud_ratio * far_peak


class EchoCanceller:
    """WebRTC AEC3 at AEC_RATE_HZ (32 kHz) behind a 24 kHz interface; ``process`` keeps the stream's length.

    Behind AEC3 sits a residual-echo guard (:class:`TalkGuard`): while the far end has been
    active within the last 500 ms, an output block is attenuated by 30 dB unless it is louder
    than ``guard_db`` below the loudest recent far-end block, or belongs to a talker (150 ms
    above TALK_DB in a row, then until 500 ms after it last was). AEC3 removes the echo; the
    guard catches what leaks for tens of ms while AEC3 re-converges after the echo path changes
    (a device's latency jumps). A block whose far end is uncertain (``far_uncertain``) makes the
    guard hold (see :class:`TalkGuard`): then only a mic louder than its echo estimate passes.
    ``guard_db=None`` turns the guard off. ERLE is measured on AEC3's output, before the guard.
    """

    def __init__(self, stream_delay_ms: int = 0, guard_db: float | None = -6.0) -> None:
        from engine.audio.devices import resample_stream
        from pywebrtc_audio import EchoCanceller as WebRtcAec
        self._aec = WebRtcAec(sample_rate=AEC_RATE_HZ, num_channels=1, stream_delay_ms=stream_delay_ms)
        self._up_near = resample_stream(RATE_HZ, AEC_RATE_HZ)
        self._up_far = resample_stream(RATE_HZ, AEC_RATE_HZ)
        self._down = resample_stream(AEC_RATE_HZ, RATE_HZ)
        self._near = SampleFifo(AEC_RATE_HZ)    # at AEC_RATE_HZ, waiting for whole 10 ms blocks
        self._far = SampleFifo(AEC_RATE_HZ)
        self._out = np.zeros(AEC_RATE_HZ, dtype=np.int16)
        self._far_rms = np.zeros(GUARD_WINDOW_BLOCKS, dtype=np.float64)   # recent far-end block levels
        self._far_pos = 0
        self._active_rms = 32768.0 * 10 ** (FAR_ACTIVE_DBFS / 20)
        self.guard = TalkGuard(guard_db, self._active_rms) if guard_db is not None else None
        self.guarded_blocks = 0
        # ERLE over blocks where the far end is active: 10*log10(sum near^2 / sum out^2)
        self.near_energy = 0.0
        self.out_energy = 0.0
        self.far_active_blocks = 0
        # ERLE per second of far-end speech: the median is the steady state, unmoved by the
        # re-convergence after an echo-path jump (which the guard covers, and which would
        # dominate one ratio over the whole session)
        self._window_near = 0.0
        self._window_out = 0.0
        self._window_blocks = 0
        self.erle_windows_db: deque[float] = deque(maxlen=600)
        self.blocks = 0
        self.errors = 0                                #: process() calls that failed (the mic went through as is)
        self.last_error: BaseException | None = None   #: the latest such failure, for the main thread to report
        self.busy_ns = 0

    def process(self, near: np.ndarray, far: np.ndarray, far_uncertain: bool = False) -> np.ndarray:
        """Cancel ``far``'s echo from ``near`` (both 24 kHz int16, same length); ``far_uncertain``:
        ``far`` may not be what the speaker played with ``near`` (the guard holds). Never raises: a
        failure counts in ``errors``, is kept in ``last_error`` and returns ``near`` uncancelled."""
        t0 = time.perf_counter_ns()
        try:
            if far_uncertain and self.guard is not None:
                self.guard.hold(HOLD_BLOCKS)
            self._near.push(self._up_near.resample_chunk(near))
            self._far.push(self._up_far.resample_chunk(far))
            blocks = min(self._near.length, self._far.length) // AEC_BLOCK_FRAMES
            n = blocks * AEC_BLOCK_FRAMES
            near_all, far_all = self._near.head(n), self._far.head(n)
            if blocks:
                # AEC3 takes several 10 ms blocks in one call; the statistics are per block
                out_f = np.asarray(self._aec.process(near_all, far_all), dtype=np.float32).reshape(blocks, -1)
                far_f = far_all.reshape(blocks, -1).astype(np.float32)
                near_f = near_all.reshape(blocks, -1).astype(np.float32)
                far_rms_all = np.sqrt(np.einsum("ij,ij->i", far_f, far_f) / AEC_BLOCK_FRAMES)
                out_energy_all = np.einsum("ij,ij->i", out_f, out_f)
                near_energy_all = np.einsum("ij,ij->i", near_f, near_f)
            for b in range(blocks):
                self.blocks += 1
                far_rms = float(far_rms_all[b])
                out_energy = float(out_energy_all[b])
                if far_rms > self._active_rms:
                    near_energy = float(near_energy_all[b])
                    self.near_energy += near_energy
                    self.out_energy += out_energy
                    self.far_active_blocks += 1
                    self._window_near += near_energy
                    self._window_out += out_energy
                    self._window_blocks += 1
                    if self._window_blocks == ERLE_WINDOW_BLOCKS:
                        if self._window_near > 0:
                            self.erle_windows_db.append(10 * math.log10(self._window_near / max(self._window_out, 1.0)))
                        self._window_near = self._window_out = 0.0
                        self._window_blocks = 0
                # a reference that may not be what the speaker played (zeros for missing frames) says
                # nothing of the far end's level: the window keeps its loudest instead
                self._far_rms[self._far_pos] = max(far_rms, float(self._far_rms.max())) if far_uncertain else far_rms
                self._far_pos = (self._far_pos + 1) % GUARD_WINDOW_BLOCKS
                if self.guard is not None and \
                        self.guard.attenuate((out_energy / AEC_BLOCK_FRAMES) ** 0.5, float(self._far_rms.max()),
                                             (float(near_energy_all[b]) / AEC_BLOCK_FRAMES) ** 0.5):
                    out_f[b] *= GUARD_ATTENUATION
                    self.guarded_blocks += 1
            if blocks:
                self._out[:n] = out_f.reshape(-1)
            self._near.drop(n)
            self._far.drop(n)
            out = self._down.resample_chunk(self._out[:n]) if n else np.zeros(0, dtype=np.int16)
        except Exception as exc:  # counted and kept; capture's main thread reports it on engine.error
            self.errors += 1
            self.last_error = exc
            out = near
        self.busy_ns += time.perf_counter_ns() - t0
        return out

    def erle_db(self) -> float | None:
        """Echo return loss enhancement, steady state: the median over seconds of far-end speech
        (before the first whole second: the ratio so far)."""
        return self._erle_percentiles_db()[1]

    def erle_total_db(self) -> float | None:
        """One ratio over every block where the far end was active, re-convergence included."""
        if self.far_active_blocks == 0 or self.near_energy <= 0:
            return None
        return round(10 * math.log10(self.near_energy / max(self.out_energy, 1.0)), 1)

    def _erle_percentiles_db(self) -> tuple[float | None, float | None]:
        """(10th percentile, median) of the per-second ERLE, in one pass; before the first whole
        second (None, the ratio so far)."""
        if not self.erle_windows_db:
            return None, self.erle_total_db()
        p10, p50 = percentiles(self.erle_windows_db, (10, 50))
        return round(p10, 1), round(p50, 1)

    def stats(self) -> dict[str, float | int | None]:
        erle_p10_db, erle_db = self._erle_percentiles_db()
        return {"erle_db": erle_db, "erle_total_db": self.erle_total_db(), "erle_p10_db": erle_p10_db,
                "far_active_ms": self.far_active_blocks * 10, "blocks": self.blocks,
                "guarded_ms": self.guarded_blocks * 10,
                "talkers": self.guard.talks if self.guard is not None else 0,
                "guard_holds": self.guard.holds if self.guard is not None else 0,
                "guard_held_ms": self.guard.held_blocks * 10 if self.guard is not None else 0,
                "echo_path_db": (round(self.guard.erl_db, 1)
                                 if self.guard is not None and self.guard.erl_blocks else None),
                "errors": self.errors,
                "cpu_ms": round(self.busy_ns / 1e6, 1)}


class EchoGate:
    """Half-duplex: silence the mic while the speaker ring holds audio not yet heard."""

    def __init__(self, speaker: Ring | None, tail_s: float = 0.25) -> None:
        self.speaker = speaker
        self.tail_s = tail_s             # keep muting this long after the ring runs empty (device latency, room)
        self.muted_frames = 0
        self._last_audible = -1e9

    def model_audible(self) -> bool:
        s = self.speaker
        if s is None:
            return False
        now = time.monotonic()
        if s.read_available > 0:
            self._last_audible = now
        return now - self._last_audible < self.tail_s

    def apply(self, pcm: np.ndarray) -> np.ndarray:
        if self.model_audible():
            self.muted_frames += len(pcm)
            return np.zeros_like(pcm)
        return pcm

"""The echo canceller's far end (engine.capture.echo.FarEnd, MicClock): the reference handed with
each mic block is what the speaker played then, lined up by the DAC times playback stamps on the
reference ring, so a late playback callback or a stall never moves the echo's delay for good.

Each test runs on both implementations: echo.py's, and its twin in C (engine.audio.native.NativeFarEnd,
which the native backend's capture step reads without a Python call)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from engine.audio import native
from engine.audio.ring import Ring
from engine.capture.echo import FAR_LEAD_MS, FAR_UNCERTAIN_MS, MIC_CLOCK_JUMP_BLOCKS, FarEnd, MicClock, far_constants

pytestmark = pytest.mark.timeout(30)

BLOCK = 480                    # 20 ms at 24 kHz
BLOCK_NS = 20_000_000
MakeFar = Callable[[Ring], Any]  # FarEnd, or its twin in C
T0 = 10**12                    # CLOCK_MONOTONIC of frame 0 of the mic and of the reference


@pytest.fixture
def ring(request: pytest.FixtureRequest) -> Iterator[Ring]:
    name = f"realtalk-test-{os.getpid()}-{request.node.name[:30]}"
    r = Ring.create(name, 16384, with_eventfd=False)
    yield r
    r.close()
    Path("/dev/shm", name).unlink(missing_ok=True)


def _native_far(ring: Ring) -> Any:
    return native.NativeFarEnd(ring, far_constants())


@pytest.fixture(params=["python", "native"])
def make_far(request: pytest.FixtureRequest) -> MakeFar:
    """FarEnd, or its twin in C."""
    if request.param == "native":
        if not native.available():
            pytest.skip(f"the native backend is not built: {native.unavailable_reason()}")
        return _native_far
    return FarEnd


def ramp(start: int, n: int) -> np.ndarray:
    """Frames numbered from ``start`` (mod 30000, never 0): a stream whose order can be checked."""
    return ((np.arange(start, start + n) % 30000) + 1).astype(np.int16)


class Speaker:
    """Playback's side: writes 20 ms blocks of the ramp, each stamped with when it reaches the DAC
    (``due_ns``), a new run where it does not follow the last block without a gap."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.frames = 0              # ramp frames written
        self.next_due_ns: int | None = None
        self.run_index = 0

    def write(self, due_ns: int, n: int = BLOCK) -> None:
        if self.next_due_ns is None or abs(due_ns - self.next_due_ns) > 2_000_000:
            self.run_index = self.ring.write_index
        self.ring.stamp_due(self.ring.write_index, due_ns, self.run_index)
        self.ring.write(ramp(self.frames, n))
        self.frames += n
        self.next_due_ns = due_ns + n * 10**9 // 24000


def due_of(value: int, first_due_ns: int) -> int:
    """When ramp frame ``value`` (its sample value) was due, its run having begun at ``first_due_ns``."""
    return first_due_ns + (value - 1) * 10**9 // 24000


def test_a_late_playback_callback_does_not_move_the_reference(ring: Ring, make_far: MakeFar) -> None:
    """The speaker's buffer holds 30 ms; once, playback's callback is 25 ms late (the buffer covers
    it: the speaker plays on). The reference stays one stream, every frame with the mic frame
    captured FAR_LEAD_MS before it plays, no zero and nothing skipped."""
    far, spk = make_far(ring), Speaker(ring)
    taken = []
    start = (0, 0, 0)
    for i in range(40):
        mic_ns = T0 + i * BLOCK_NS
        if i == 5:     # the speaker's first 30 ms were silence: the counts from here on
            start = (far.missing_frames, far.skipped_frames, far.realignments)
        late = i == 20
        if not late:
            spk.write(mic_ns + 30_000_000)          # written 30 ms before it is due
        taken.append(far.take(BLOCK, mic_ns).copy())
        if late:
            spk.write(mic_ns + 30_000_000)          # after the take, still in time for the speaker
        assert not far.uncertain or i < 2
    stream = np.concatenate(taken).astype(np.int64)
    body = stream[np.flatnonzero(stream)[0]:]
    assert (far.missing_frames, far.skipped_frames, far.realignments) == start
    assert np.all(np.diff(body) % 30000 == 1), "the reference stream has a jump (its delay moved)"
    # frame value v plays at T0 + 30 ms + (v-1)/rate; it was handed with the mic frame captured FAR_LEAD_MS before
    k = int(np.flatnonzero(stream)[0])
    assert abs(due_of(int(stream[k]), T0 + 30_000_000) - (T0 + k * 10**9 // 24000) - FAR_LEAD_MS * 10**6) < 100_000


def test_a_stall_that_ran_the_speaker_dry_lines_the_late_frames_up_by_their_stamps(ring: Ring, make_far: MakeFar) -> None:
    """Playback stops for 120 ms; the speaker plays its 30 ms buffer, then nothing, then the late
    frames from when they come (their stamps say when). Counting would zero-pad the wait and then
    take the late frames as they come: the reference would lag its echo by the padding less the
    speaker's silence, for good. By time, every frame goes with the mic frame captured the lead
    before it plays, before and after the stall, and the far end is uncertain while it is short."""
    far, spk = make_far(ring), Speaker(ring)
    taken, uncertain = [], []
    run_due_ns = T0 + 30_000_000     # when frame 1 is due
    for i in range(60):
        mic_ns = T0 + i * BLOCK_NS
        if i < 20 or i >= 26:
            if i == 26:   # back after 120 ms: the speaker ran dry at mic block 21's time, plays again 30 ms on
                run_due_ns = mic_ns + 30_000_000 - spk.frames * 10**9 // 24000
            spk.write(mic_ns + 30_000_000 if i < 20 else run_due_ns + spk.frames * 10**9 // 24000)
        taken.append(far.take(BLOCK, mic_ns).copy())
        uncertain.append(far.uncertain)
    stream = np.concatenate(taken).astype(np.int64)
    lead_ns = FAR_LEAD_MS * 10**6
    for j in np.flatnonzero(stream):
        v = int(stream[j])
        first = T0 + 30_000_000 if v <= 20 * BLOCK else run_due_ns
        assert abs(due_of(v, first) - (T0 + int(j) * 10**9 // 24000) - lead_ns) < 100_000, \
            f"frame {v} went with the mic frame {j}: not the one captured the lead before it played"
    assert far.gap_frames > 0 and far.missing_frames >= far.gap_frames
    assert any(uncertain[20:28]) and not any(uncertain[30:])
    assert far.realignments >= 1


def test_frames_written_too_late_for_their_time_are_skipped(ring: Ring, make_far: MakeFar) -> None:
    """Playback's callback is 80 ms late, the speaker's buffer (80 ms) covers it: the late frames
    still play on time, but the mic needed them before they were written and got zeros. When they
    come, those already past are dropped, so the reference is back in line at once."""
    far, spk = make_far(ring), Speaker(ring)
    taken = []
    gap_at_start = 0
    for i in range(40):
        mic_ns = T0 + i * BLOCK_NS
        if i == 10:
            gap_at_start = far.gap_frames    # the speaker's first 80 ms: nothing played yet
        if not 20 <= i < 24:
            for _ in range(5 if i == 24 else 1):
                spk.write(T0 + 80_000_000 + spk.frames * 10**9 // 24000)
        taken.append(far.take(BLOCK, mic_ns).copy())
    stream = np.concatenate(taken).astype(np.int64)
    assert far.skipped_frames > 0 and far.missing_frames > gap_at_start and far.gap_frames == gap_at_start
    for j in np.flatnonzero(stream)[-BLOCK * 10:]:
        assert abs(due_of(int(stream[j]), T0 + 80_000_000) - (T0 + int(j) * 10**9 // 24000)
                   - FAR_LEAD_MS * 10**6) < 100_000
    assert not far.uncertain


def test_a_new_run_whose_stamps_jump_back_is_skipped_into_line_but_uncertain(ring: Ring, make_far: MakeFar) -> None:
    """After a flush (a barge-in, ``cmd.cancel``) or an idle speaker the next reply is a new run,
    and its first DAC times can be off by 15 ms and more (bench: 365 frames skipped at a reply's
    start, then AEC3 leaked enough for a false barge-in, guard on and off). Its frames are skipped
    into line by their stamps, but that move is a guess: the far end is uncertain, so the guard
    holds, and the stamps are followed to the ms for a while after."""
    far, spk = make_far(ring), Speaker(ring)
    uncertain, gap_before, run_due_ns = [], 0, 0
    for i in range(40):
        mic_ns = T0 + i * BLOCK_NS
        if i < 20:
            spk.write(mic_ns + 30_000_000)
        elif i == 20:   # the new run, 60 ms at once: stamped 45 ms before the last run's pace had it
            run_due_ns = mic_ns - 15_000_000
            for k in range(3):
                spk.write(run_due_ns + k * BLOCK_NS)
        else:
            spk.write(run_due_ns + (i - 18) * BLOCK_NS)
        far.take(BLOCK, mic_ns)
        uncertain.append(far.uncertain)
        if i == 19:
            gap_before = far.gap_frames       # the speaker's first 30 ms: nothing played yet
    assert far.skipped_frames > 0 and far.realignments >= 1 and far.gap_frames == gap_before
    assert not any(uncertain[5:20]) and any(uncertain[20:23]), uncertain


def test_a_few_missing_frames_are_no_guess_but_a_stall_is(ring: Ring, make_far: MakeFar) -> None:
    """Under load playback's callback is a little late many times a minute: a few ms of zeros make
    AEC3 leak for less than the guard's talker onset, so the far end is not uncertain for them;
    zeros for FAR_UNCERTAIN_MS in a row or more (a stall) are."""
    far, spk = make_far(ring), Speaker(ring)
    uncertain, zeros = [], []
    for i in range(60):
        mic_ns = T0 + i * BLOCK_NS
        late = i in (10, 20, 30) or 40 <= i < 44    # three callbacks 20 ms late; later one 80 ms late
        if not late:   # written 15 ms before it is due; a late callback's blocks come with the next
            for _ in range({11: 2, 21: 2, 31: 2, 44: 5}.get(i, 1)):
                spk.write(T0 + 15_000_000 + spk.frames * 10**9 // 24000)
        missing = far.missing_frames
        far.take(BLOCK, mic_ns)
        uncertain.append(far.uncertain)
        zeros.append(far.missing_frames - missing)
    assert all(zeros[i] > 0 for i in (10, 20, 30, 40, 41, 42, 43)), zeros     # each late callback left zeros
    assert not any(uncertain[5:40]), "a callback 20 ms late made the far end uncertain"
    assert any(uncertain[40:46]), "zeros for 75 ms in a row left the far end certain"
    assert FAR_UNCERTAIN_MS <= 40


def test_without_stamps_the_reference_goes_by_count(ring: Ring, make_far: MakeFar) -> None:
    far = make_far(ring)
    ring.write(ramp(0, BLOCK))
    assert np.array_equal(far.take(BLOCK, T0), ramp(0, BLOCK))
    assert np.all(far.take(BLOCK, T0 + BLOCK_NS) == 0) and far.missing_frames == BLOCK


def test_the_mic_clock_ignores_jitter_and_follows_a_jump() -> None:
    clock = MicClock()
    rng = np.random.default_rng(3)
    for i in range(50):
        at = clock.place(BLOCK, T0 + i * BLOCK_NS + int(rng.normal(0, 1.0) * 1e6))
        assert not clock.doubtful
        assert i < 30 or abs(at - (T0 + i * BLOCK_NS)) < 1_000_000     # settled on the line through the reports
    assert abs(clock.place(BLOCK, T0 + 50 * BLOCK_NS + 50_000_000) - (T0 + 50 * BLOCK_NS)) < 1_500_000
    assert not clock.doubtful            # one report 50 ms off: jitter
    lost_ns = 100_000_000                # 100 ms of mic frames lost: every report from now is that far on
    for i in range(51, 51 + MIC_CLOCK_JUMP_BLOCKS):
        at = clock.place(BLOCK, T0 + i * BLOCK_NS + lost_ns)
    assert clock.jumps == 1 and abs(at - (T0 + (51 + MIC_CLOCK_JUMP_BLOCKS - 1) * BLOCK_NS + lost_ns)) < 1_500_000
    i = 51 + MIC_CLOCK_JUMP_BLOCKS
    assert abs(clock.place(BLOCK, T0 + i * BLOCK_NS + lost_ns) - (T0 + i * BLOCK_NS + lost_ns)) < 1_500_000
    assert not clock.doubtful


def test_playback_stamps_each_reference_block_with_when_it_reaches_the_dac(ring: Ring) -> None:
    """The renderer stamps each block it copies to the reference ring: due at the callback's time
    plus the device's output latency plus what the device feeder still holds before it; a block
    that does not follow the last one in time (the callback came after the device ran dry)
    begins a new run."""
    from engine.playback.renderer import Renderer
    name = ring.name + "-spk"
    speaker = Ring.create(name, 16384, with_eventfd=False)
    try:
        r = Renderer(speaker, 1920, ref=ring)
        out = np.zeros(240, dtype=np.int16)
        now = 1000.0
        for i in range(3):                      # 10 ms callbacks, 30 ms output latency
            r.render(out, 720, now + i * 0.01)
        assert ring.due_stamp() == (480, int((now + 0.02) * 1e9) + 30_000_000, 0)
        r.backlog_frames = 120                  # the feeder holds 5 ms before this block
        r.render(out, 600, now + 0.03)          # latency 25 ms: due as the last block ends
        assert ring.due_stamp() == (720, int((now + 0.03) * 1e9) + 30_000_000, 0)
        r.backlog_frames = 0
        r.render(out, 720, now + 0.14)          # 100 ms late: the device ran dry, a new run
        assert ring.due_stamp() == (960, int((now + 0.14) * 1e9) + 30_000_000, 960)
    finally:
        speaker.close()
        Path("/dev/shm", name).unlink(missing_ok=True)


@pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")
def test_the_native_far_end_hands_out_what_echo_py_does() -> None:
    """Two rings written alike: a speaker whose callbacks come late, stall it dry, start new runs
    with stamps off by up to 20 ms; a mic whose reports jitter and jump. FarEnd and its C twin
    hand out the same frames, with the same counts and the same uncertainty, block for block."""
    seen = np.zeros(5, dtype=bool)   # the seeds together skipped, ran dry, realigned, jumped, were uncertain
    for seed in range(6):
        seen |= _same_far_ends(seed)
    assert seen.all(), seen


def _same_far_ends(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rings = [Ring.create(f"realtalk-test-{os.getpid()}-eq{seed}-{k}", 16384, with_eventfd=False) for k in range(2)]
    try:
        fars = [FarEnd(rings[0]), _native_far(rings[1])]
        spks = [Speaker(r) for r in rings]
        due_ns = T0 + 30_000_000
        held = 0                       # blocks a late callback holds back
        mic_off_ns = 0                 # the mic's frames lost so far
        for i in range(400):
            mic_ns = T0 + i * BLOCK_NS
            event = rng.random()
            if event < 0.05:
                held += int(rng.integers(1, 7))                    # a late callback, or a stall
            elif event < 0.08:
                due_ns = mic_ns + int(rng.integers(-20, 40)) * 1_000_000   # a new run (a flush, an idle speaker)
            elif event < 0.09:
                mic_off_ns += int(rng.integers(30, 120)) * 1_000_000      # mic frames lost: the clock jumps
            writes = 0 if held and rng.random() < 0.5 else 1 + held    # a late callback's blocks come together
            held = held if writes == 0 else 0
            for _ in range(writes):
                stamp_ns = due_ns + int(rng.integers(-300, 300)) * 1000   # the DAC times' jitter
                for spk in spks:
                    spk.write(stamp_ns)
                due_ns += BLOCK_NS
            adc_ns = mic_ns + mic_off_ns + int(rng.normal(0, 0.8) * 1e6) + (50_000_000 if rng.random() < 0.02 else 0)
            n = int(rng.choice([BLOCK, BLOCK, BLOCK - 7, BLOCK + 9]))
            got = [far.take(n, adc_ns).copy() for far in fars]
            assert np.array_equal(got[0], got[1]), f"block {i}: the two far ends handed out different frames"
            counts = [(f.missing_frames, f.gap_frames, f.skipped_frames, f.realignments, f.uncertain_frames,
                       f.uncertain, f.clock.jumps, f.clock.doubtful, f.clock.settled) for f in fars]
            assert counts[0] == counts[1], f"block {i}: {counts}"
        f = fars[0]
        return np.array([f.skipped_frames, f.gap_frames, f.realignments, f.clock.jumps, f.uncertain_frames]) > 0
    finally:
        for r in rings:
            r.close()
            Path("/dev/shm", r.name).unlink(missing_ok=True)

"""The native audio backend (engine/audio/_native.c) without a device: the C renderer against the
Python one sample for sample, the C guard against TalkGuard, the capture step (resampling, the
echo canceller's call and statistics, the mic ring), and the fallback when it is not built."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from engine.audio import native
from engine.audio.ring import Ring
from engine.capture.echo import EchoCanceller, FAR_ACTIVE_DBFS, TalkGuard
from engine.audio.levels import ExternalLevelTap
from engine.playback.renderer import DeviceFeeder, Renderer
from tests.helpers import REPO, bunched_callback_s, speaker_ring_schedule, voiced

needs_native = pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")


@pytest.fixture
def rings() -> Iterator[list[Ring]]:
    made: list[Ring] = []

    def make(capacity: int = 1 << 14, eventfd: bool = False) -> Ring:
        r = Ring.create(f"realtalk-test-native-{os.getpid()}-{len(made)}", capacity, with_eventfd=eventfd)
        made.append(r)
        return r
    yield make  # type: ignore[misc]
    for r in made:
        r.close()
        r.unlink()


@needs_native
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("stretch", [True, False])
@pytest.mark.parametrize("bunch", [False, True])
@pytest.mark.parametrize("continuous", [False, True])
def test_the_native_renderer_plays_what_the_python_one_plays(rings: Any, seed: int, stretch: bool,
                                                             bunch: bool, continuous: bool) -> None:
    """Same writes, marks, flushes, jitter-buffer targets and callbacks: the same samples out, the
    same events, the same ring indices, heard index and counters, block after block. ``bunch``:
    the callbacks come 4/3 and 2/3 of a block apart and now and then a stall, as PulseAudio's do,
    so the device's read-ahead spread (and the start delay it adds to a target) is measured.
    ``continuous``: the ring says its streams come in real time (a GPT-Live track), so what
    stands in it beyond the target is accelerated away too."""
    py_ring, c_ring = rings(), rings()
    py_ring.control.set_continuous(continuous)
    c_ring.control.set_continuous(continuous)
    py_ref, c_ref = rings(), rings()
    py = Renderer(py_ring, prebuffer_frames=1440, ref=py_ref, stretch=stretch)
    c = native.NativeRenderer(c_ring, prebuffer_frames=1440, ref=c_ref, stretch=stretch)
    pcm = voiced(1 << 16)
    pos, now, k = 0, 0.0, 0
    leads: list[int] = []
    for act, n in speaker_ring_schedule(seed):
        if act == "write":
            chunk = pcm[pos % 60000:pos % 60000 + n]
            pos += n
            py_ring.write(chunk)
            c_ring.write(chunk)
        elif act == "end":
            py_ring.mark_end()
            c_ring.mark_end()
        elif act == "flush":
            py_ring.request_flush()
            c_ring.request_flush()
        elif act == "start":
            py_ring.mark_start()
            c_ring.mark_start()
        elif act == "target":
            py_ring.control.set_target(n)
            c_ring.control.set_target(n)
        else:
            a, b = np.zeros(n, dtype=np.int16), np.zeros(n, dtype=np.int16)
            latency = n // 2
            py.render(a, latency, now)
            c.render(b, latency, now)
            k += 1
            leads.append(py.device_lead_frames)
            now += n / 24000 * ((4 / 3 if k % 2 else 2 / 3) if bunch else 1) + (0.05 if bunch and k % 97 == 0 else 0)
            assert np.array_equal(a, b), f"block {now:.3f} s differs at {np.nonzero(a != b)[0][:5]}"
            assert [tuple(e) for e in py.events] == [tuple(e) for e in c.events]
            for attr in ("read_index", "heard_index", "underrun_frames", "device_latency_frames"):
                assert getattr(py_ring, attr) == getattr(c_ring, attr), attr
            # the reference's due stamp: when the block reaches the DAC, and where its run began
            assert py_ref.due_stamp() == c_ref.due_stamp() is not None
            for attr in ("prebuffer_frames", "expanded_frames", "accelerated_frames", "stretch_frames",
                         "in_stream", "stream_start", "arrived_mono_ns", "low_water_frames", "growth_frames",
                         "start_delay_frames", "start_device_lead_frames", "device_lead_frames",
                         "render_frames", "state", "transition_errors", "first_sample_mono_ns", "timeline_blocks",
                         "flush_mono_ns", "level_floor_frames"):
                assert getattr(py, attr) == getattr(c, attr), attr
    assert py_ref.write_index == c_ref.write_index > 0
    assert np.array_equal(py_ref.read(py_ref.read_available), c_ref.read(c_ref.read_available))
    assert len(py.events) > 5
    if bunch:
        assert max(leads) > 0   # the spread was measured (and both measured it alike, block after block)


@needs_native
def test_the_native_feeder_resamples_and_fades_as_the_python_one(rings: Any) -> None:
    """At 48 kHz: the same blocks through soxr (within its dither) and the flush's fade at the device
    rate; on callbacks 13.3 and 6.7 ms apart, the same stamps on the steady timeline (within what
    the two resamplers hold back), which the flush does not step."""
    py_ring, c_ring = rings(), rings()
    py = Renderer(py_ring, prebuffer_frames=0, stretch=False)
    feeder = DeviceFeeder(py, 240, 48000)
    c = native.NativeRenderer(c_ring, prebuffer_frames=0, stretch=False, device_rate_hz=48000, block_frames=240)
    for k in range(90):
        now = bunched_callback_s(k)
        if k == 60:   # the timeline is known: a stream, then a flush inside it
            pcm = voiced(24000)
            py_ring.write(pcm)
            c_ring.write(pcm)
        if k == 75:
            py_ring.request_flush()
            c_ring.request_flush()
        a = np.frombuffer(feeder.fill(480, 0, now), dtype=np.int16)
        b = np.frombuffer(c.fill(480, 0, now), dtype=np.int16)
        assert np.abs(a.astype(np.int32) - b).max() <= 3, k   # soxr's TPDF dither: a few LSB
        # python-soxr and libsoxr hand out their output in other bunches, so the twins render
        # their blocks in other callbacks here: the stamps agree within that (the FIFOs' difference)
        assert abs(py.first_sample_mono_ns - c.first_sample_mono_ns) < 1_000_000, k
        assert abs(py.flush_mono_ns - c.flush_mono_ns) < 1_000_000, k
    # neither timeline stepped at the flush: it keeps counting from the first block
    assert py.timeline_blocks > 90 and c.timeline_blocks > 90
    assert [tuple(e) for e in py.events] == [tuple(e) for e in c.events]
    assert [e.kind for e in c.events] == ["started", "flushed"]


@needs_native
def test_the_native_guard_decides_as_talk_guard() -> None:
    """The same blocks (far end on and off, echo, leaks, soft and loud talkers, holds for an
    uncertain far end) through TalkGuard and its C twin: the same decision for every block, and
    the same counts."""
    from engine.capture.echo import HOLD_BLOCKS, native_constants
    rng = np.random.default_rng(3)
    active = 32768.0 * 10 ** (FAR_ACTIVE_DBFS / 20)
    n = 6000
    far = np.where(rng.random(n) < 0.8, 10_000.0, active / 2) * rng.uniform(0.5, 1.5, n)
    out = far * 10 ** (rng.choice([-60, -45, -38, -30, -20, -3], n) / 20)
    near = far * 10 ** (rng.choice([-13, -10, -3, 0, 6], n) / 20)
    hold = np.where(rng.random(n) < 0.01, HOLD_BLOCKS, 0)
    # runs of the same levels, as speech and silence come
    blocks = [(float(out[i // 7 * 7]), float(far[i // 5 * 5]), float(near[i // 7 * 7]), int(hold[i])) for i in range(n)]
    py = TalkGuard(-6.0, active)
    expect = []
    for o, f, nr, h in blocks:
        if h:
            py.hold(h)
        expect.append(py.attenuate(o, f, nr))
    decisions, counts = native.talk_guard(native_constants(), -6.0, blocks)
    assert decisions == expect
    assert counts == {"talks": py.talks, "holds": py.holds, "held_blocks": py.held_blocks, "erl_db": py.erl_db,
                      "erl_blocks": py.erl_blocks, "state": py.state}
    assert py.talks > 3 and py.holds > 3 and py.held_blocks > 100 and sum(expect) > 100 and py.erl_blocks > 100


def _echo_signals(seconds: float, rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far 24 kHz, mic at ``rate``: the far end's echo 40 ms later at -10 dB, the echo alone at rate)."""
    n24 = int(seconds * 24000)
    far = (voiced(n24, 130) * 0.8).astype(np.int16)
    far[n24 // 2:n24 // 2 + 2400] = 0
    up = np.interp(np.arange(int(seconds * rate)) * 24000 / rate, np.arange(n24), far)
    delay = rate * 40 // 1000
    echo = np.zeros_like(up)
    echo[delay:] = 0.3 * up[:-delay]
    return far, echo.astype(np.int16), echo.astype(np.int16)


@needs_native
@pytest.mark.parametrize("rate", [48000, 44100])
def test_the_capture_step_cancels_the_echo_and_writes_one_chunk_per_period(rings: Any, rate: int) -> None:
    mic = rings(1 << 16, eventfd=True)
    tap_in, tap_out = ExternalLevelTap(24000), ExternalLevelTap(24000)
    from engine.capture.echo import native_constants
    cap = native.NativeCapture(mic, rate, rate // 50, aec=True, guard_db=-6.0, tap_in=tap_in, tap_out=tap_out,
                               echo=native_constants())
    far, mic_pcm, _ = _echo_signals(8.0, rate)
    period = rate // 50
    far_pos = [0]

    def far_take(n: int) -> np.ndarray:
        out = far[far_pos[0]:far_pos[0] + n]
        far_pos[0] += n
        return out if len(out) == n else np.zeros(n, dtype=np.int16)
    writes: list[int] = []
    heard: list[float] = []
    sent: list[float] = []
    for k in range(len(mic_pcm) // period):
        if k % 10 == 0:   # the main thread's 100 ms chores
            heard += tap_in.drain().rms_dbfs
            sent += tap_out.drain().rms_dbfs
        cap.push(mic_pcm[k * period:(k + 1) * period])
        assert cap.wait(0.0)
        w0 = mic.write_index
        assert cap.step(far_take) == 1
        writes.append(mic.write_index - w0)
        mic.skip(mic.read_available)   # the realtime process's part
    assert not cap.wait(0.0)
    assert abs(sum(writes) - 8 * 24000) < 1500 and max(writes) <= 960   # one write per chunk, the stream's length
    stats = cap.stats()
    assert stats.keys() == EchoCanceller(guard_db=-6.0).stats().keys()
    assert stats["errors"] == 0 and (stats["far_active_ms"] or 0) > 5000 and (stats["blocks"] or 0) > 700
    erle_db = stats["erle_db"]
    assert erle_db is not None and erle_db > 20, stats
    # the Python EchoCanceller on the same mic (resampled to 24 kHz as the PyAudio callback does) and far end
    from engine.audio.devices import resample_stream
    py, rs = EchoCanceller(guard_db=-6.0), resample_stream(rate, 24000)
    pos = 0
    for k in range(len(mic_pcm) // period):
        near = rs.resample_chunk(mic_pcm[k * period:(k + 1) * period])
        py.process(near, far[pos:pos + len(near)] if pos + len(near) <= len(far) else np.zeros(len(near), np.int16))
        pos += len(near)
    py_erle = py.stats()["erle_db"]
    assert py_erle is not None and abs(erle_db - py_erle) < 3, (erle_db, py_erle)
    assert len(heard) > 380 and len(sent) > 380 and max(heard) > -30
    assert np.median(sent[-100:]) < np.median(heard[-100:]) - 15   # what was sent: the echo cancelled
    # the worker's CPU in the steps, and the part of it in the AEC's and the far end's Python calls
    step_ns, aec_ns, far_ns = cap.cpu_split_ns()
    assert 0 < aec_ns and 0 < far_ns and aec_ns + far_ns < step_ns


@needs_native
def test_the_capture_step_holds_the_mic_back_little() -> None:
    """The mic's audio waits in the capture step only for the resamplers' filters and AEC3's 10 ms
    blocks. soxr's default DFT blocks held it 49.8 ms on average (59.6 at most) on a 48 kHz device
    with echo cancellation: three stages of 10.8 ms (20.4 at most) each, and the blocks."""
    from bench.capture_step import mic_held_back_ms
    with_aec, plain = mic_held_back_ms(48000, aec=True), mic_held_back_ms(48000, aec=False)
    assert with_aec["max"] <= 16 and plain["max"] <= 6, (with_aec, plain)
    for held in (with_aec, plain):   # capture.echo's mic_held_back_ms, _max: the step's own count
        assert held["reported_mean"] is not None and held["reported_max"] is not None, held
        assert abs(held["reported_mean"] - held["mean"]) <= 0.1 and abs(held["reported_max"] - held["max"]) <= 0.1, held


def test_the_echo_canceller_runs_at_one_rate_everywhere() -> None:
    """AEC3's rate: echo.py's (the PyAudio backend, the floor), native.py's and the extension's."""
    from engine.capture.echo import AEC_RATE_HZ
    assert native.AEC_RATE_HZ == AEC_RATE_HZ == 32000
    if native.available():
        assert native._ext.AEC_RATE_HZ == AEC_RATE_HZ


@needs_native
def test_the_capture_step_guards_as_the_echo_canceller_through_a_stall(rings: Any) -> None:
    """A 24 kHz device (no resampling before the canceller), the echo 40 ms late, a talker 6 dB over
    it, and two stalls (the far end zeros and uncertain): the C step and EchoCanceller.process, each
    with the guard, hold as often and as long, guard as much, find the same talker and learn the
    same echo path. AEC3 is not deterministic (nor is soxr's dither: the same input through the
    same canceller twice gives echo paths 4 dB apart), so both get the same fixed canceller in its
    place: it takes the known echo off. What differs is then only the dither, a bit of the input."""
    from engine.capture.echo import native_constants
    rate, period = 24000, 480
    n = rate * 10
    far = (voiced(n, 130) * 0.8).astype(np.int16)
    echo = np.zeros(n)
    echo[960:] = 0.3 * far[:-960]
    talker = np.zeros(n)
    talker[rate * 6:rate * 8] = voiced(rate * 2, 220) * 0.6
    mic_pcm = (echo + talker).astype(np.int16)
    stalled = set(range(150, 160)) | set(range(400, 403))   # chunks whose reference was not there
    far_seen = far.copy()
    for k in stalled:
        far_seen[k * period:(k + 1) * period] = 0

    class Far:   # FarEnd's face: take(n, adc_ns), then uncertain
        uncertain = False
        pos = 0

        def take(self, frames: int, adc_ns: int) -> np.ndarray:
            self.uncertain = self.pos // period in stalled
            self.pos += frames
            return far_seen[self.pos - frames:self.pos]

    from engine.capture.echo import AEC_RATE_HZ
    echo_frames = AEC_RATE_HZ * 40 // 1000

    class FixedCanceller:   # AEC3's place at its rate: the echo path known (0.3, 40 ms), no adaptation
        def __init__(self) -> None:
            self.past = np.zeros(echo_frames)

        def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
            f = np.concatenate([self.past, far.astype(np.float64)])
            self.past = f[-echo_frames:]
            return np.clip(near - 0.3 * f[:len(far)], -32768, 32767).astype(np.int16)
    mic = rings(1 << 16, eventfd=True)
    cap = native.NativeCapture(mic, rate, period, aec=True, guard_db=-6.0, far_adc=True, echo=native_constants())
    cap.aec = FixedCanceller()
    py = EchoCanceller(guard_db=-6.0)
    py._aec = FixedCanceller()   # type: ignore[assignment]  # AEC3's face: process(near, far)
    far_end = Far()
    for k in range(n // period):
        chunk = mic_pcm[k * period:(k + 1) * period]
        cap.push(chunk)
        cap.step(far_end)
        mic.skip(mic.read_available)
        py.process(chunk, far_seen[k * period:(k + 1) * period], k in stalled)
    c = {k: float(v) for k, v in cap.stats().items() if v is not None}
    p = {k: float(v) for k, v in py.stats().items() if v is not None}
    assert c["guard_holds"] == p["guard_holds"] >= 2 and c["guard_held_ms"] == p["guard_held_ms"] > 0, (c, p)
    assert c["talkers"] == p["talkers"] == 1 and c["guarded_ms"] == p["guarded_ms"] > 0, (c, p)
    assert abs(c["echo_path_db"] - p["echo_path_db"]) <= 0.1 and abs(c["erle_db"] - p["erle_db"]) <= 0.5, (c, p)


@needs_native
def test_the_capture_step_without_echo_handling_passes_the_mic_and_extras_get_views(rings: Any) -> None:
    mic = rings(1 << 16, eventfd=True)
    cap = native.NativeCapture(mic, 48000, 960, aec=False)
    pcm = voiced(48000 * 2, 300)
    for k in range(100):
        cap.push(pcm[k * 960:(k + 1) * 960])
        cap.step(None)
    got = mic.read(mic.read_available)
    from engine.audio.devices import resample_stream   # what the PyAudio path does: python-soxr, LQ
    rs = resample_stream(48000, 24000)
    want = np.concatenate([rs.resample_chunk(pcm[k * 960:(k + 1) * 960]) for k in range(100)])
    # the same samples (soxr's dither aside); C's soxr hands them out in smaller blocks
    # (SOXR_LOG2_DFT), python-soxr's in 2^10-frame ones, so either may hold back more at an instant
    n = min(len(got), len(want))
    assert abs(len(got) - len(want)) <= 24 * 21 and np.abs(got[:n].astype(np.int32) - want[:n]).max() <= 3
    seen: list[tuple[int, int, bool]] = []

    def extras(raw: np.ndarray, far: np.ndarray, sent: np.ndarray | None) -> None:
        seen.append((len(raw), len(far), sent is None))
        mic.write(raw)
    w0 = mic.write_index
    cap.push(pcm[:960])
    cap.step(lambda n: np.ones(n, dtype=np.int16), extras)
    assert seen and seen[0][0] == seen[0][1] and 400 < seen[0][0] < 560 and seen[0][2]
    assert mic.write_index - w0 == seen[0][0]   # extras wrote the ring, the step did not


@needs_native
def test_the_far_end_is_asked_for_when_each_chunk_was_captured(rings: Any) -> None:
    """far_take(n, adc_ns): the chunk's first 24 kHz frame's capture time, from the device's stamp (a
    pushed block counts as captured over the period before its push) less what soxr held back."""
    import time
    mic = rings(1 << 16, eventfd=True)
    cap = native.NativeCapture(mic, 48000, 960, aec=False, far_adc=True)
    pcm = voiced(960 * 30, 300)
    asks: list[tuple[int, int, int]] = []
    for k in range(30):
        pushed = time.monotonic_ns()
        cap.push(pcm[k * 960:(k + 1) * 960])

        def take(n: int, adc_ns: int, pushed: int = pushed) -> np.ndarray:
            asks.append((n, adc_ns, pushed))
            return np.zeros(n, dtype=np.int16)
        cap.step(take)
    # each chunk the device gave is one step here: chunk k's first device frame was captured 20 ms before
    # its push; soxr holds back what it has not handed out yet (device frames before it less 24 kHz ones)
    made = 0
    chunk = 30 - len(asks)   # the first steps may hand out nothing (soxr's delay): no far end asked for
    for n, adc, pushed in asks:
        held_ns = chunk * 960 * 1_000_000_000 // 48000 - made * 1_000_000_000 // 24000
        assert abs(pushed - 20_000_000 - held_ns - adc) < 1_000_000, (chunk, n, held_ns)
        assert 0 <= held_ns < 25_000_000   # soxr LQ's own delay, not a drift
        made += n
        chunk += 1
    assert len(asks) >= 28


def _dated_capture(rings: Any) -> tuple[Any, list[int], Callable[[int, int], np.ndarray]]:
    """A capture of a 24 kHz device (no resampler holds frames back) and the far end it asks:
    (the capture, the capture times it asked for, the far end: silence)."""
    cap = native.NativeCapture(rings(1 << 16, eventfd=True), 24000, 480, aec=False, far_adc=True)
    asks: list[int] = []

    def take(n: int, adc_ns: int) -> np.ndarray:
        asks.append(adc_ns)
        return np.zeros(n, dtype=np.int16)
    return cap, asks, take


@needs_native
def test_pushed_frames_carry_the_capture_time_they_are_given(rings: Any) -> None:
    """push(frames, adc_ns): a replay in simulated time hands each block's capture time, and the
    far end is asked for exactly that time (a 24 kHz device: no resampler holds frames back)."""
    cap, asks, take = _dated_capture(rings)
    base = 10**12
    for k in range(5):
        cap.push(voiced(480, 300), base + k * 20_000_000 + 7)
        cap.step(take)
    cap.push(voiced(960, 300), base + 500_000_000)   # two blocks in one push: one chunk, its first frame's time
    cap.step(take)
    assert asks == [base + k * 20_000_000 + 7 for k in range(5)] + [base + 500_000_000]


@needs_native
def test_a_backlog_longer_than_the_stamps_kept_is_dated_from_the_oldest_kept(rings: Any) -> None:
    """More periods waiting than the capture keeps stamps for (a source's backlog when a stream
    connects, a stalled worker): the chunks whose own stamps were rewritten are dated from the
    oldest kept, paced back. They were dated 0 (CLOCK_MONOTONIC's origin): the far end's clock
    took that for a jump of the mic's frames."""
    cap, asks, take = _dated_capture(rings)
    base = 10**12
    periods = 66                                   # more than the 64 stamps kept; under the device ring's second
    for k in range(periods):
        cap.push(voiced(480, 300), base + k * 20_000_000)
    while cap.step(take):
        pass
    assert len(asks) == periods // 4 + 1           # 4 periods a chunk at most
    assert asks == [base + k * 4 * 20_000_000 for k in range(len(asks))]


@needs_native
def test_with_echo_cancellation_extras_never_get_the_mic_in_place_of_what_it_made(rings: Any) -> None:
    """A chunk too short for a whole 10 ms block leaves the canceller nothing to hand out yet: extras
    (the recording's path) gets an empty ``sent``, not None (None means "no canceller", and the
    mic, echo and all, went to the API in its place: false barge-ins on a 24 kHz device)."""
    mic = rings(1 << 16, eventfd=True)
    from engine.capture.echo import native_constants
    cap = native.NativeCapture(mic, 24000, 480, aec=True, echo=native_constants())
    sents: list[int | None] = []

    def extras(raw: np.ndarray, far: np.ndarray, sent: np.ndarray | None) -> None:
        sents.append(None if sent is None else len(sent))
    pcm = voiced(24000, 300)
    for k in range(60):
        cap.push(pcm[k * 130:(k + 1) * 130])   # 5.4 ms a chunk: most make no whole block
        cap.step(lambda n: np.zeros(n, dtype=np.int16), extras)
    assert None not in sents and 0 in sents and max(s or 0 for s in sents) > 0


@needs_native
def test_a_failing_echo_canceller_is_counted_and_the_mic_goes_through(rings: Any) -> None:
    mic = rings(1 << 16, eventfd=True)
    from engine.capture.echo import native_constants
    cap = native.NativeCapture(mic, 48000, 960, aec=True, echo=native_constants())

    class Broken:
        def process(self, near: Any, far: Any) -> Any:
            raise ValueError("no echo today")
    cap.aec = Broken()
    pcm = voiced(960 * 10, 300)
    for k in range(10):
        cap.push(pcm[k * 960:(k + 1) * 960])
        cap.step(lambda n: np.zeros(n, dtype=np.int16))
    assert cap.errors >= 8 and isinstance(cap.last_error, ValueError) and "no echo today" in str(cap.last_error)
    assert mic.write_index > 4000   # uncancelled, but sent


@needs_native
def test_the_renderer_refuses_a_ring_of_another_format(rings: Any) -> None:
    name = f"realtalk-test-native-bad-{os.getpid()}"
    bad = Ring.create(name, 1 << 10, with_eventfd=False, channels=2)
    try:
        with pytest.raises(ValueError, match="int16 mono"):
            native.NativeRenderer(bad, prebuffer_frames=0)
    finally:
        bad.close()
        bad.unlink()


def test_without_the_extension_the_backend_falls_back_to_pyaudio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALTALK_NATIVE", "0")
    assert not native.available()
    backend, note = native.resolve_backend("native")
    assert backend == "pyaudio" and note is not None and "REALTALK_NATIVE=0" in note
    assert native.resolve_backend("pyaudio") == ("pyaudio", None)
    assert "falls back to pyaudio" in native.status_line()
    with pytest.raises(RuntimeError, match="not available"):
        native.NativeRenderer(None, prebuffer_frames=0)  # type: ignore[arg-type]


def test_an_extension_built_from_another_source_is_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build left over from an older _native.c (an in-place build not redone after a pull) would run
    the old C behind the new Python: the backend falls back to pyaudio and says how to rebuild."""
    monkeypatch.delenv("REALTALK_NATIVE", raising=False)
    monkeypatch.setattr(native, "_ext", types.SimpleNamespace(source_sha="0" * 16))
    why = native.unavailable_reason()
    assert why is not None and "built from another _native.c" in why and "build_ext --inplace" in why
    backend, note = native.resolve_backend("native")
    assert backend == "pyaudio" and note is not None and "built from another _native.c" in note


@pytest.mark.skipif(native._ext is None, reason="the extension is not built here")
def test_the_built_extension_is_built_from_this_source() -> None:
    """The extension carries the hash of the _native.c it was built from (setup.py), and it is this one's."""
    assert native._ext.source_sha == native.source_sha(), (
        "engine/audio/_native.c changed since the extension was built: python setup.py build_ext --inplace")


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_an_install_without_a_compiler_says_so_in_one_line_and_the_package_imports(tmp_path: Any) -> None:
    """setup.py's build without a working compiler: no failure, one line naming the fallback, and
    the engine (its audio modules included) imports without the extension."""
    env = dict(os.environ, CC="/nonexistent/cc", LDSHARED="/nonexistent/cc -shared")
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "native audio backend was not built" in ln]
    assert len(lines) == 1 and "falls back to pyaudio" in lines[0]
    assert not list((tmp_path / "lib").rglob("_native*.so"))
    code = ("import sys; sys.modules['engine.audio._native'] = None\n"
            "from engine.audio import native; import engine.playback.process, engine.capture.process\n"
            "assert not native.available(); print(native.resolve_backend('native')[0])")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "pyaudio", run.stderr


@needs_native
def test_the_meters_measured_in_c_read_as_numpy_measures_them() -> None:
    """ExternalLevelTap(measure=window_levels): the same windows, levels and stamps as LevelTap's own."""
    from engine.audio.levels import LevelTap
    rng = np.random.default_rng(5)
    py, c = LevelTap(24000, capacity_ms=200), ExternalLevelTap(24000, capacity_ms=200, measure=native.window_levels)
    for k in range(60):
        pcm = (rng.normal(0, 10 ** rng.uniform(1, 4), int(rng.integers(100, 1500)))).clip(-32768, 32767).astype(np.int16)
        py.push(pcm)
        c.push(pcm)
        c._stamps[:] = py._stamps   # the same push times
        if k % 7 == 6:
            a, b = py.drain(), c.drain()
            assert a.start_mono_ns == b.start_mono_ns and a.lost_frames == b.lost_frames
            assert np.allclose(a.rms_dbfs, b.rms_dbfs, atol=0.11) and a.peak_dbfs == b.peak_dbfs
            assert len(a.rms_dbfs) > 0 or k < 7

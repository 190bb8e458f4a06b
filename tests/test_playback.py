"""The playback renderer: prebuffer, stream end vs underrun, flush with fade, heard position."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Iterator, Any

import numpy as np
import pytest

from engine.audio import native
from engine.playback.process import PlaybackProcess
from engine.playback.renderer import CUSHION_MIN_FRAMES, DeviceFeeder, Renderer as PyRenderer
from engine.audio.ring import Ring
from tests.helpers import bunched_callback_s, made_ring, steepest, voiced

#: every renderer test runs on the Python renderer and on the native one (engine/audio/_native.c),
#: which must behave identically; the native one where it is built
IMPLS = ["python", "native"] if native.available() else ["python"]
_impl = "python"


@pytest.fixture(autouse=True, params=IMPLS)
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    global _impl
    _impl = request.param
    yield request.param
    _impl = "python"


def Renderer(ring: Ring, **kw: Any) -> Any:  # noqa: N802 - stands in for the class in every test
    """The renderer under test: the Python one, or the native one with the same arguments."""
    return PyRenderer(ring, **kw) if _impl == "python" else native.NativeRenderer(ring, **kw)


def feeder(ring: Ring, block_frames: int, device_rate_hz: int, **kw: Any) -> tuple[Any, Any]:
    """(renderer, what fills device-rate frames): Renderer + DeviceFeeder, or one native renderer."""
    if _impl == "python":
        py = PyRenderer(ring, **kw)
        return py, DeviceFeeder(py, block_frames, device_rate_hz)
    r = native.NativeRenderer(ring, device_rate_hz=device_rate_hz, block_frames=block_frames, **kw)
    return r, r


@pytest.fixture
def ring_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The rings' clock, in s from 100.0, set by the test (``ring_clock[0] = t``): the times they
    stamp writes and stream starts with, on the test's own timeline of callbacks."""
    import engine.audio.ring as ring_module
    clock = [100.0]
    monkeypatch.setattr(ring_module, "time", SimpleNamespace(monotonic_ns=lambda: int(clock[0] * 1e9)))
    return clock

@pytest.fixture
def ring() -> Iterator[Ring]:
    with made_ring() as r:
        yield r


def loud(n: int) -> np.ndarray:
    return np.full(n, 10000, dtype=np.int16)


def ev(r: Any) -> list[tuple[str, int]]:
    """The renderer's events without the stretch figure."""
    return [(e.kind, e.index) for e in r.events]


def test_prebuffer_then_stream_end_is_not_an_underrun(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=1440)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(960))
    r.render(out, 0, now=0.0)
    assert not out.any()  # a stream still arriving waits the prebuffer time (60 ms)
    r.render(out, 0, now=0.03)
    assert not out.any()
    ring.write(loud(960))
    ring.mark_end()
    r.render(out, 0, now=0.061)
    assert out.all() and ev(r) == [("started", 0)]
    for _ in range(4):
        r.render(out, 0, now=0.1)
    assert ev(r)[-1] == ("stopped", 1920)
    assert ring.underrun_frames == 0


def test_prebuffer_counts_from_when_the_stream_began_to_arrive(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=1920)  # 80 ms
    out = np.zeros(480, dtype=np.int16)
    ring.mark_start()
    ring.write(loud(480))
    start_ns = ring.stream_start_ns(0)
    assert start_ns is not None
    first_s = start_ns / 1e9
    time.sleep(0.03)  # a gap between deltas, so the latest write is 30 ms later than the first
    ring.write(loud(4800))
    assert ring.write_stamp[1] / 1e9 - first_s >= 0.03
    r.render(out, 0, now=first_s + 0.059)
    assert not out.any()          # this 20 ms block ends before the 80 ms are up
    # the block that reaches 80 ms after the first frames came (not after the latest): the stream
    # starts inside it, after 11 ms of silence, so its first sample is due exactly at 80 ms
    r.render(out, 0, now=first_s + 0.069)
    lead = 11 * 24
    assert not out[:lead].any() and out[lead:].all() and ev(r) == [("started", 0)]
    assert r.first_sample_mono_ns == pytest.approx(start_ns + 80_000_000, abs=1000)
    assert ring.read_index == 480 - lead
    assert ring.stream_start_ns(480) is None  # only the marked index has a start time


def test_a_complete_stream_plays_at_once(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=1440)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(480))
    ring.mark_end()
    r.render(out, 0, now=0.0)
    assert out.all()


def test_stale_end_mark_does_not_end_the_next_stream(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=480, stretch=False)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(480))
    ring.mark_end()
    r.render(out, 0, 0.0)
    r.render(out, 0, 0.0)
    assert r.events[-1][0] == "stopped"
    ring.write(loud(600))        # the next response, still streaming (no end mark yet)
    r.render(out, 0, 1.0)        # waits the prebuffer time
    r.render(out, 0, 1.03)       # plays 480
    r.render(out, 0, 1.05)       # runs dry mid-stream
    assert out[119] == 0 and 0 < abs(int(out[100])) < 10000  # faded, then silence
    assert r.events[-1][0] == "started" and ring.underrun_frames == 0  # a gap or the end? not known yet
    r.render(out, 0, 1.07)       # still dry: the gap grows
    ring.write(loud(480))        # more of that stream: it was an underrun, of the whole gap
    r.render(out, 0, 1.09)
    assert ev(r)[-1] == ("underrun", 1080) and ring.underrun_frames == 360 + 480
    assert r.prebuffer_frames > 480  # adapts
    grown = r.prebuffer_frames
    ring.mark_end()              # the rest of that stream: it ends with its underrun, nothing given back
    for t in (2.0, 2.0, 2.0):
        r.render(out, 0, t)
    assert r.events[-1][0] == "stopped" and r.prebuffer_frames == grown
    for k in range(4):           # clean streams give the growth back, down to the configured prebuffer
        ring.write(loud(480))
        ring.mark_end()
        r.render(out, 0, 3.0 + k)
        r.render(out, 0, 3.0 + k)
        assert r.events[-1][0] == "stopped"
    assert r.prebuffer_frames == 480


def test_running_dry_just_before_a_late_end_mark_is_the_end_not_an_underrun(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=0, stretch=False)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(720))
    r.render(out, 0, 0.0)
    r.render(out, 0, 0.02)       # dry: "done" has not come yet
    r.render(out, 0, 0.04)
    ring.mark_end()              # the API's done, a little after the last delta
    r.render(out, 0, 0.06)
    assert [e for e, _ in ev(r)] == ["started", "stopped"] and ring.underrun_frames == 0
    ring.write(loud(480))        # the next response is a new stream, announced as such
    ring.mark_end()
    r.render(out, 0, 1.0)
    r.render(out, 0, 1.02)
    assert ev(r)[-2:] == [("started", 720), ("stopped", 1200)]


def test_flush_fades_within_3_ms_and_drops_the_rest(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=0)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(4800))
    r.render(out, 0, 0.0)
    ring.request_flush()
    r.render(out, 0, 0.0)
    assert out[0] > 9000 and 0 < out[71] < 100 and not out[72:].any()  # 3 ms ramp at 24 kHz, then silence
    assert ring.read_available == 0 and r.events[-1][0] == "flushed"
    # heard at the fade's end: all that was handed out (the device buffer plays out) plus the fade,
    # whatever the output latency
    assert r.events[-1][1] == 480 + 72


def test_flush_counts_what_the_callback_still_holds(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=0)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(4800))
    r.render(out, 480, 0.0)
    r.render(out, 480, 0.0)     # 960 read; the callback still holds 300 of them, resampled
    r.backlog_frames = 300
    ring.request_flush()
    r.render(out, 480, 0.0)     # the device-rate fade covers 72 of the 300 held: those are heard
    assert ev(r)[-1] == ("flushed", 960 - 300 + 72)


def test_heard_index_lags_by_device_latency(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=0)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(4800))
    for _ in range(4):
        r.render(out, 960, 0.0)
    assert ring.heard_index == 1440 - 960  # read position before the last buffer, minus the latency


def play_deltas(r: Any, ring: Ring, arrivals_s: list[float], pcm: np.ndarray,
                period_frames: int = 480, delta_frames: int | None = None) -> np.ndarray:
    """Deltas of ``delta_frames`` (default ``period_frames``) arriving at ``arrivals_s`` (in
    order), the end mark with the last; device callbacks every period from t=0 until the stream
    stops. Returns what was played."""
    delta_frames = delta_frames or period_frames
    out = np.zeros(period_frames, dtype=np.int16)
    period_s = period_frames / 24000
    played, sent, k = [], 0, 0
    stops = [kind for kind, _ in ev(r)].count("stopped")
    while [kind for kind, _ in ev(r)].count("stopped") == stops:
        now = k * period_s
        while sent < len(arrivals_s) and arrivals_s[sent] <= now:
            ring.write(pcm[sent * delta_frames:(sent + 1) * delta_frames])
            sent += 1
            if sent == len(arrivals_s):
                ring.mark_end()
        r.render(out, 0, now)
        played.append(out.copy())
        k += 1
        assert k < 5000, "the stream never ended"
    return np.concatenate(played)


def late_delta_schedule(count: int, late_index: int, late_s: float) -> list[float]:
    """Deltas paced at 20 ms; one is ``late_s`` late and holds back those behind it."""
    arrivals, t = [], 0.0
    for i in range(count):
        t = max(t, i * 0.02 + (late_s if i == late_index else 0.0))
        arrivals.append(t)
    return arrivals


def test_a_late_delta_is_an_underrun_without_time_stretching(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=1920, stretch=False)   # 80 ms
    play_deltas(r, ring, late_delta_schedule(60, 20, 0.11), voiced(60 * 480))
    assert [k for k, _ in ev(r)] == ["started", "underrun", "stopped"]


def test_time_stretching_rides_out_a_late_delta_and_gives_the_latency_back(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=1920)
    pcm = voiced(60 * 480)
    played = play_deltas(r, ring, late_delta_schedule(60, 20, 0.11), pcm)
    assert [k for k, _ in ev(r)] == ["started", "stopped"] and ring.underrun_frames == 0
    assert r.expanded_frames > 0 and r.accelerated_frames > 0
    assert r.stretch_frames == r.expanded_frames - r.accelerated_frames == r.events[-1].stretch_frames
    assert r.events[-1].expanded_frames == r.expanded_frames
    assert r.stretch_frames <= 360          # most of the added latency given back by the end
    sound = np.nonzero(played)[0]
    played = played[sound[0]:sound[-1] + 1]
    assert len(played) == len(pcm) + r.stretch_frames   # nothing lost, nothing doubled but the periods
    # the splices keep the waveform smooth: no step larger than the tone's own steepest
    assert steepest(played) <= steepest(pcm) * 1.1


def test_audio_on_time_or_ahead_is_never_stretched(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=1920)
    play_deltas(r, ring, [i * 0.02 for i in range(40)], voiced(40 * 480))        # paced at real time
    play_deltas(r, ring, [0.0] * 40, voiced(40 * 480))                           # a burst, far ahead
    assert r.expanded_frames == r.accelerated_frames == 0 and ring.underrun_frames == 0


class FakePub:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.sent.append((topic, payload))


def reporter(ring: Ring, r: Any) -> tuple[PlaybackProcess, FakePub]:
    """The playback process's publishing half, with no bus: it reads nothing from the bus."""
    p = PlaybackProcess.__new__(PlaybackProcess)
    fake = FakePub()
    p.ring, p.renderer, p.pub = ring, r, fake  # type: ignore[assignment]
    p.callbacks, p.next_cadence_at, p.next_position_at = 0, float("inf"), 0.0
    p.callback_errors = p.reported_callback_errors = 0
    p.last_callback_error, p.next_error_report_at = None, 0.0
    return p, fake


def test_reports_carry_ring_indices_not_items(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=0, stretch=False)
    p, pub = reporter(ring, r)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(960))          # a first stream, played to its end
    ring.mark_end()
    for _ in range(3):
        r.render(out, 0, 0.0)
    ring.write(loud(4800))         # a second one, playing when the position goes out
    r.render(out, 240, 1.0)
    r.render(out, 240, 1.02)
    p.publish_events()
    topics = [t for t, _ in pub.sent]
    assert topics == ["playback.started", "playback.stopped", "playback.started", "playback.position"]
    for _, body in pub.sent:
        assert "item_id" not in body and "response_id" not in body
    started, stopped, started2, position = (b for _, b in pub.sent)
    assert started["start_index"] == started["index"] == 0 and "first_sample_mono_ns" in started
    assert {"arrived_mono_ns", "output_latency_ms", "underrun_frames"} <= started.keys()
    assert stopped["start_index"] == 0 and stopped["index"] == 960 and stopped["played_ms"] == 40
    assert {"stretch_ms", "expanded_ms", "device_underflows"} <= stopped.keys()
    assert started2["start_index"] == 960
    # the heard position: one number, the one the callback wrote to the ring
    assert position == {"start_index": 960, "index": ring.heard_index} and ring.heard_index == 960 + 480 - 240


def test_flush_report_and_heard_index_are_the_same_number(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=0)
    p, pub = reporter(ring, r)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(480))
    ring.mark_end()
    r.render(out, 0, 0.0)
    r.render(out, 0, 0.0)          # that stream ends
    ring.write(loud(4800))
    r.render(out, 0, 1.0)
    ring.request_flush()
    r.render(out, 0, 1.0)
    p.publish_events()
    flushed = pub.sent[-1][1]
    assert pub.sent[-1][0] == "playback.flushed"
    assert flushed["start_index"] == 480 and flushed["index"] == 480 + 480 + 72
    assert ring.heard_index == flushed["index"]   # not the read position the flush jumped to
    assert flushed["played_ms"] == (480 + 72) // 24 and "flush_mono_ns" in flushed


def test_a_flush_with_nothing_playing_cut_nothing(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=0)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(480))
    ring.mark_end()
    r.render(out, 0, 0.0)
    r.render(out, 0, 0.0)
    ring.request_flush()
    r.render(out, 0, 1.0)
    e = r.events[-1]
    assert e.kind == "flushed" and e.start_index == e.index == 480 and e.stretch_frames == 0


def test_device_rate_flush_fades_once_and_leaves_nothing_behind(ring: Ring) -> None:
    """Through the resampler (48 kHz device): the flush fades what the callback hands out, from its
    start, over 5 ms at the device rate; nothing of the flushed audio comes out later."""
    r, dev = feeder(ring, 480, 48000, prebuffer_frames=0, stretch=False)
    assert not r.fade_on_flush
    ring.write(loud(24000))
    for _ in range(5):
        pcm = np.frombuffer(dev.fill(960, 0, 0.0), dtype=np.int16)
    assert abs(int(pcm[500])) > 9000
    ring.request_flush()
    pcm = np.frombuffer(dev.fill(960, 0, 0.0), dtype=np.int16)
    assert abs(int(pcm[0])) > 9000 and abs(int(pcm[72])) > 4000   # a 3 ms ramp is 144 frames at 48 kHz
    assert 0 < abs(int(pcm[138])) < 100 and not pcm[144:].any()
    assert np.all(np.abs(np.diff(pcm[:144].astype(np.int32))) < 200)  # one smooth ramp, no step
    assert r.events[-1].kind == "flushed" and ring.read_available == 0
    for _ in range(3):                                                # the resampler kept nothing
        assert np.abs(np.frombuffer(dev.fill(960, 0, 0.0), dtype=np.int16)).max() <= 2  # soxr dither


def test_flush_keeps_what_was_written_after_the_request(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=0, stretch=False)
    out = np.zeros(480, dtype=np.int16)
    ring.write(loud(480 + 60))
    r.render(out, 0, 0.0)
    ring.request_flush()          # 60 frames of the old stream are left when the next one begins
    ring.write(np.full(480, 7, dtype=np.int16))
    ring.mark_end()
    r.render(out, 0, 0.0)         # the fade takes the 60 old frames and none of the new stream
    assert r.events[-1].kind == "flushed" and r.events[-1].index == 480 + 60
    assert not out[60:].any()
    assert ring.read_available == 480


def test_the_stretcher_reads_the_ring_in_place(ring: Ring, monkeypatch: pytest.MonkeyPatch, impl: str) -> None:
    """The look-ahead is a view of the ring's data; a copy only where it wraps the ring's end."""
    if impl == "native":
        pytest.skip("the Python renderer's allocations: the native one copies 35 ms of look-ahead in C")
    copies: list[int] = []
    peek = ring.peek_into
    from engine.audio.stretch import LOOKAHEAD_FRAMES

    def counting_peek(out: Any) -> int:  # read_into peeks too: count only the look-ahead's
        if len(out) == LOOKAHEAD_FRAMES:
            copies.append(len(out))
        return peek(out)
    monkeypatch.setattr(ring, "peek_into", counting_peek)
    r = Renderer(ring, prebuffer_frames=1920)
    play_deltas(r, ring, late_delta_schedule(30, 10, 0.11), voiced(30 * 480))
    assert r.expanded_frames > 0 and copies == []     # 14400 frames in a 16384-frame ring: no wrap


def test_what_the_device_callback_caught_is_reported(ring: Ring) -> None:
    """Issue 14 point 9: the callback answers an exception with silence and counts it; the count
    alone said nothing of what failed. Now its type and message go out on engine.error."""
    p, pub = reporter(ring, Renderer(ring, prebuffer_frames=0))
    p.publish_events()
    assert pub.sent == []
    p.callback_errors, p.last_callback_error = 3, ValueError("operands could not be broadcast")
    p.publish_events()
    (topic, body), = pub.sent
    assert topic == "engine.error" and body["source"] == "playback" and body["code"] == "callback_error"
    assert "ValueError: operands could not be broadcast" in body["message"] and body["count"] == 3
    p.callback_errors = 5
    p.publish_events()
    assert len(pub.sent) == 1          # at most once a second
    p.next_error_report_at = 0.0
    p.publish_events()
    assert len(pub.sent) == 2 and "2 time(s)" in pub.sent[-1][1]["message"]


def test_each_stream_event_wakes_the_publishing_thread(ring: Ring) -> None:
    """The publisher sleeps 100 ms between chores; a started / stopped / flushed report must not
    wait for that: the renderer writes its eventfd once per event (and not for plain blocks)."""
    r = Renderer(ring, prebuffer_frames=0, stretch=False)
    r.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        out = np.zeros(480, dtype=np.int16)
        ring.write(loud(960))
        ring.mark_end()
        r.render(out, 0, 0.0)                       # started
        assert os.eventfd_read(r.wake_fd) == 1
        r.render(out, 0, 0.01)                      # a plain block: no wake
        with pytest.raises(BlockingIOError):
            os.eventfd_read(r.wake_fd)
        r.render(out, 0, 0.02)                      # stopped
        ring.write(loud(960))
        r.render(out, 0, 0.03)                      # the next stream starts
        ring.request_flush()
        r.render(out, 0, 0.04)                      # flushed
        assert os.eventfd_read(r.wake_fd) == 3
        assert [k for k, _ in ev(r)] == ["started", "stopped", "started", "flushed"]
    finally:
        os.close(r.wake_fd)


class _Stream:
    def __init__(self) -> None:
        self.closed = False

    def is_active(self) -> bool:
        return True

    def stop_stream(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class _Pa:
    def terminate(self) -> None:
        pass


@pytest.mark.timeout(10)
def test_keep_running_does_its_chore_at_once_when_woken() -> None:
    import threading
    from engine.audio.devices import keep_running
    stop = threading.Event()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    chores: list[float] = []
    first, woke = threading.Event(), threading.Event()

    def chore() -> None:
        chores.append(time.monotonic())
        (first if len(chores) == 1 else woke).set()
    stream = _Stream()
    t = threading.Thread(target=keep_running, args=(_Pa(), stream, stop, chore, 5.0, fd), daemon=True)
    t.start()
    assert first.wait(2.0)
    sent = time.monotonic()
    os.eventfd_write(fd, 1)
    assert woke.wait(2.0), "the eventfd did not wake the chore loop"
    assert chores[1] - sent < 1.0       # not the 5 s period
    stop.set()
    os.eventfd_write(fd, 1)             # what a stop signal does
    t.join(2.0)
    assert not t.is_alive() and stream.closed
    os.close(fd)


# ---------------------------------------------------------------- the adaptive jitter buffer's target
def first_sample_after_ms(r: Any, ring: Ring, period_frames: int = 240) -> float:
    """A stream marked at t=0 and written whole (still arriving: no end mark); callbacks every
    period from t=0; when its first sample is due, in ms after its first frames arrived."""
    out = np.zeros(period_frames, dtype=np.int16)
    ring.mark_start()
    start_s = (ring.stream_start_ns(ring.write_index) or 0) / 1e9
    ring.write(loud(4800))
    for k in range(100):
        r.render(out, 0, start_s + k * period_frames / 24000)
        if r.in_stream:   # it started in this block
            lead = int(np.argmax(out != 0))
            return (k * period_frames + lead) / 24
    raise AssertionError("the stream never started")


def test_a_stream_starts_at_the_rings_target_else_at_the_configured_prebuffer(ring: Ring) -> None:
    """First reply (no target yet: 0) waits the configured prebuffer; once the producer publishes a
    target, a stream starts that long after its first frames arrived, to the frame."""
    r = Renderer(ring, prebuffer_frames=1920)                    # 80 ms configured
    assert first_sample_after_ms(r, ring) == pytest.approx(80, abs=0.05)
    ring.mark_end()
    while r.in_stream:
        r.render(np.zeros(240, dtype=np.int16), 0, 99.0)
    ring.control.set_target(360)                                 # 15 ms, the estimate on a clean link
    assert first_sample_after_ms(r, ring) == pytest.approx(15, abs=0.05)
    assert r.start_delay_frames == 360


def test_an_underrun_grows_the_start_on_top_of_the_target_and_clean_streams_give_it_back(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=1920, stretch=False)
    ring.control.set_target(480)                                 # 20 ms
    play_deltas(r, ring, late_delta_schedule(30, 10, 0.11), voiced(30 * 480))
    assert [k for k, _ in ev(r)] == ["started", "underrun", "stopped"]
    assert r.growth_frames == 480 and r.prebuffer_frames == 960  # the target plus 20 ms
    ring.control.set_target(720)                                 # the target moved: the growth stays on top
    play_deltas(r, ring, [i * 0.02 for i in range(10)], voiced(10 * 480))
    assert r.growth_frames == 240 and r.prebuffer_frames == 960  # a clean stream gave half back
    play_deltas(r, ring, [i * 0.02 for i in range(10)], voiced(10 * 480))
    assert r.growth_frames == 0 and r.prebuffer_frames == 720    # under 10 ms left: all of it


def test_the_time_stretcher_keeps_the_level_the_target_asks_for(ring: Ring) -> None:
    """A 50 ms late delta under a 60 ms target, 20 ms periods: the stretcher would expand once the
    ring holds under half the target's headroom beyond a period ((60 - 20) / 2 = 20 ms, not from
    the configured 80); the stream's cushion (half the target, built early) rides it out first."""
    r = Renderer(ring, prebuffer_frames=1920)
    ring.control.set_target(1440)                                # 60 ms
    play_deltas(r, ring, late_delta_schedule(60, 20, 0.05), voiced(60 * 480))
    assert ring.underrun_frames == 0 and r.low_water_frames == 480
    # the stream's cushion (30 ms and a period, early) kept the ring over the low water through it
    assert r.expanded_frames == r.cushion_frames >= 720 and r.accelerated_frames == 0



@pytest.mark.parametrize("continuous", [True, False])
def test_a_continuous_track_gives_back_what_a_stall_added_and_a_reply_keeps_its_lead(ring: Ring,
                                                                                    continuous: bool) -> None:
    """A GPT-Live track is one stream for the session, its 20 ms deltas on time, a 25 ms target.
    The player stalls 200 ms at 3 s (a loaded machine, a device that ran dry): 200 ms more stand
    in the ring. They are latency: the renderer gave back only what its own expansion added, so the
    track was heard 200 ms late for the rest of the session (and a GPT-Live turn's 'first sound
    heard' read 300-840 ms over its gap beside niced busy loops, 150-240 idle). Marked continuous,
    the track's least level of each second above the target is accelerated away. Unmarked (a
    Realtime reply, whose server sends ahead), what the ring holds is kept."""
    r = Renderer(ring, prebuffer_frames=1920)
    ring.control.set_target(600)
    ring.control.set_continuous(continuous)
    out = np.zeros(240, dtype=np.int16)
    pcm = voiced(24000 * 12)
    ring.mark_start()
    t0 = (ring.stream_start_ns(ring.write_index) or 0) / 1e9
    sent, levels_ms = 0, {}
    for k in range(1000):                      # 10 s of 10 ms callbacks
        while sent * 480 < (k + 1) * 240:       # a 20 ms delta every 20 ms
            ring.write(pcm[sent * 480:(sent + 1) * 480])
            sent += 1
        if not 300 <= k < 320:                 # the player stalls 200 ms at 3 s
            r.render(out, 0, t0 + k * 0.01)
        if k in (299, 330, 999):
            levels_ms[k] = ring.read_available / 24
    assert ring.underrun_frames == 0 and levels_ms[330] - levels_ms[299] >= 190, levels_ms
    if continuous:
        assert levels_ms[999] <= levels_ms[299] + 15 and 180 <= r.accelerated_frames / 24 <= 220, levels_ms
    else:
        assert levels_ms[999] >= levels_ms[299] + 180 and r.accelerated_frames == 0, levels_ms


def play_stream(r: Any, ring: Ring, arrivals_s: list[float], pcm: np.ndarray, delta_frames: int = 2400,
                period_frames: int = 240, phase_s: float = 0.0) -> None:
    """One stream as the engine delivers it: the producer stamps its start when the first delta
    arrives (``mark_start``, arrivals_s[0] = 0), deltas of ``delta_frames`` at ``arrivals_s``
    after it, the end mark with the last; device callbacks every period, ``phase_s`` before the
    first delta's arrival and on, until the stream stops."""
    out = np.zeros(period_frames, dtype=np.int16)
    ring.mark_start()
    stamp_s = (ring.stream_start_ns(ring.write_index) or 0) / 1e9
    stops = [kind for kind, _ in ev(r)].count("stopped")
    sent, k = 0, 0
    while [kind for kind, _ in ev(r)].count("stopped") == stops:
        now = stamp_s - phase_s + k * period_frames / 24000
        while sent < len(arrivals_s) and stamp_s + arrivals_s[sent] <= now:
            ring.write(pcm[sent * delta_frames:(sent + 1) * delta_frames])
            sent += 1
            if sent == len(arrivals_s):
                ring.mark_end()
        r.render(out, 0, now)
        k += 1
        assert k < 5000, "the stream never ended"


@pytest.mark.parametrize("target_ms", [15, 20, 30])
@pytest.mark.parametrize("phase_s", [0.0003, 0.005, 0.0097])
def test_deltas_on_time_are_not_stretched_under_a_small_target(ring: Ring, target_ms: int, phase_s: float) -> None:
    """A clean link: 100 ms deltas on time, 10 ms device periods, the target the estimator gives
    such a link (the ring's level dips to the target less a period just before each delta). The
    time-stretcher has nothing to ride out: it must not expand (nor accelerate) around every delta."""
    r = Renderer(ring, prebuffer_frames=1920)
    ring.control.set_target(target_ms * 24)
    for _ in range(2):
        play_stream(r, ring, [i * 0.1 for i in range(30)], voiced(30 * 2400), phase_s=phase_s)
    assert ring.underrun_frames == 0
    # each stream inserted its cushion early (10 ms here) and nothing else: no stretch around deltas
    assert r.accelerated_frames == 0 and r.stretch_frames == r.cushion_frames >= CUSHION_MIN_FRAMES
    assert r.expanded_frames <= 2 * (CUSHION_MIN_FRAMES + 240)


def test_under_30_ms_of_delta_jitter_the_target_rides_it_out(ring: Ring) -> None:
    """100 ms deltas each up to |N(0, 30 ms)| late (the bench's jitter30 link, seeded; a late delta
    holds back those behind it), under the target the estimator measures for them: no underrun."""
    import random
    from engine.realtime.jitter import JitterEstimator
    rng = random.Random(7)
    est = JitterEstimator(80)
    r = Renderer(ring, prebuffer_frames=1920)
    for reply in range(16):
        arrivals, t = [], 0.0
        for i in range(30):
            t = max(t, i * 0.1 + abs(rng.gauss(0, 0.030)))
            arrivals.append(t)
        arrivals = [a - arrivals[0] for a in arrivals]
        est.stream_started()
        for a in arrivals:
            est.delta(reply * 10.0 + a, 0.1)
        ring.control.set_target(est.target_frames(24000))
        play_stream(r, ring, arrivals, voiced(30 * 2400), phase_s=rng.random() * 0.01)
    assert ring.underrun_frames == 0, (ring.underrun_frames, est.target_ms())
    assert 50 <= est.target_ms() <= 100


def test_a_device_whose_callbacks_bunch_gets_its_read_ahead_spread_on_top_of_the_target(
        ring: Ring, ring_clock: list[float]) -> None:
    """PulseAudio's ALSA plugin asks for 10 ms blocks 13.3 and 6.7 ms apart: a block read right
    after another is read 3.3 ms earlier than one a stream may have started in. The renderer
    measures that spread and waits it on top of an adaptive target, so 100 ms deltas on time
    under a 13 ms target are neither stretched nor run dry (without it, every few deltas
    expanded); the fixed prebuffer stays what it is."""
    r = Renderer(ring, prebuffer_frames=1920)
    ring.control.set_target(13 * 24)
    out = np.zeros(240, dtype=np.int16)
    pcm = voiced(30 * 2400)

    k = 0
    for reply in range(10):
        first_s = bunched_callback_s(k) + 0.3 + reply * 0.0031    # each reply's first delta at another phase
        sent = 0
        while sent < 30 or r.in_stream:
            now = bunched_callback_s(k)
            while sent < 30 and first_s + sent * 0.1 <= now:
                ring_clock[0] = first_s + sent * 0.1
                if sent == 0:
                    ring.mark_start()
                ring.write(pcm[sent * 2400:(sent + 1) * 2400])
                sent += 1
                if sent == 30:
                    ring.mark_end()
            r.render(out, 0, now)
            k += 1
    # nothing stretched around the deltas: each reply's cushion (10 ms and at most a block) alone
    assert ring.underrun_frames == 0 and r.accelerated_frames == 0 and r.stretch_frames == r.cushion_frames
    assert r.expanded_frames <= 10 * (CUSHION_MIN_FRAMES + 240)
    assert r.device_lead_frames == pytest.approx(79, abs=2)          # 13.3 - 10 ms, in frames
    assert r.prebuffer_frames == 13 * 24 + r.device_lead_frames
    ring.control.set_target(0)                                       # fixed: the configured prebuffer alone
    r.render(out, 0, bunched_callback_s(k))
    assert r.prebuffer_frames == 1920


def test_a_stream_starts_when_due_on_the_devices_timeline_when_callbacks_bunch(
        ring: Ring, ring_clock: list[float]) -> None:
    """The same bunching speaker (10 ms blocks asked for 13.3 and 6.7 ms apart): the device takes
    the blocks one after another, so block k plays at a steady 10 ms a block whatever the
    callback's time. A start due 10-13.3 ms after an early callback was left to the late one,
    which started its block's first frame: 3.3 ms before the stream was due on the device, and
    reported (``first_sample_mono_ns``) at the late callback's time, up to 3.3 ms after where the
    device plays it. Each start is now due to the frame, and reported where the device plays it."""
    r = Renderer(ring, prebuffer_frames=1920, stretch=False)
    ring.control.set_target(13 * 24)
    out = np.zeros(240, dtype=np.int16)

    steady_offset_s = 0.0133 / 2 - 0.01 / 2          # the callbacks' mean lag behind 10 ms a block
    k = 0
    errors_ms: list[tuple[float, float]] = []
    for reply in range(12):
        first_s = bunched_callback_s(k) + 0.6 + reply * 0.0017   # past the timeline's first 0.5 s; each at another phase
        while bunched_callback_s(k) < first_s:
            r.render(out, 0, bunched_callback_s(k))
            k += 1
        ring_clock[0] = first_s
        ring.mark_start()
        ring.write(loud(2400))
        while not r.in_stream:
            r.render(out, 0, bunched_callback_s(k))
            k += 1
        ring.mark_end()
        played_s = 100.0 + steady_offset_s + (k - 1) * 0.01 + int(np.argmax(out != 0)) / 24000
        due_s = first_s + r.start_delay_frames / 24000
        errors_ms.append(((played_s - due_s) * 1000, (r.first_sample_mono_ns / 1e9 - played_s) * 1000))
        while r.in_stream:
            r.render(out, 0, bunched_callback_s(k))
            k += 1
    assert r.start_delay_frames == 13 * 24 + r.device_lead_frames > 13 * 24
    for early_ms, reported_late_ms in errors_ms:
        assert abs(early_ms) <= 0.05 and abs(reported_late_ms) <= 0.05, errors_ms


def test_the_steady_timeline_starts_afresh_after_a_step_and_is_the_callbacks_own_time_until_known(
        ring: Ring) -> None:
    """A stall the device lost frames over (a step of more than a block, here 2.5) leaves the past
    undescriptive: the timeline starts afresh, and for its first 50 blocks (0.5 s at 10 ms) a start
    is planned on the callback's own time, as before the timeline; a late callback within a block
    is jitter the timeline rides out."""
    r = Renderer(ring, prebuffer_frames=1920)
    out = np.zeros(240, dtype=np.int16)
    now = 100.0
    for _ in range(60):
        r.render(out, 0, now)
        now += 0.01
    assert r.timeline_blocks == 60
    r.render(out, 0, now + 0.004)          # 4 ms late: jitter within a block
    assert r.timeline_blocks == 61
    now += 0.01
    now += 0.025                           # a 25 ms stall: the device went on from there
    r.render(out, 0, now)
    assert r.timeline_blocks == 1
    for _ in range(48):
        now += 0.01
        r.render(out, 0, now)
    assert r.timeline_blocks == 49


def test_a_flush_through_the_resampler_leaves_the_steady_timeline_where_the_device_is(
        ring: Ring, ring_clock: list[float]) -> None:
    """At 48 kHz a flush drops what the FIFO and the resampler held, rendered but never handed to
    the device. The renderer had counted those frames as handed, so the device's timeline stepped
    by up to a block (under the step that restarts it) and the next reply was planned and stamped
    that much off where the device plays it, for a second. Two replies on steady callbacks, a
    barge-in's flush between them: each first sample is stamped the same distance from where the
    device plays it (the resampler's own delay)."""
    r, dev = feeder(ring, 240, 48000, prebuffer_frames=480, stretch=False)
    t = [100.0]

    def callback() -> tuple[np.ndarray, float]:
        at = t[0]
        t[0] += 0.01
        return np.frombuffer(dev.fill(480, 0, at), dtype=np.int16), at
    for _ in range(60):                     # the timeline is known
        callback()
    offsets_ms = []
    for _ in range(2):
        ring_clock[0] = t[0] - 0.003
        ring.mark_start()
        ring.write(loud(4800))
        while True:
            out, at = callback()
            loud_at = np.flatnonzero(np.abs(out.astype(np.int32)) > 5000)
            if len(loud_at):
                break
        plays_s = at + int(loud_at[0]) / 48000
        offsets_ms.append((plays_s - r.first_sample_mono_ns / 1e9) * 1000)
        for _ in range(7):
            callback()
        ring.request_flush()                # a barge-in mid-reply
        for _ in range(5):
            callback()
    assert abs(offsets_ms[1] - offsets_ms[0]) <= 0.05, offsets_ms


@pytest.mark.parametrize("late_ms", [25, 30])
def test_a_new_streams_cushion_rides_out_a_delta_later_than_a_clean_links_target(ring: Ring, late_ms: int) -> None:
    """A clean link's 15 ms target leaves 5 ms of headroom beyond a 10 ms block, and the stretcher's
    low water (2.5 ms) rides out a delta up to ~20 ms late; one 25-30 ms late ran the ring dry. The
    cushion (10 ms and a period, inserted within the stream's first 100 ms) rides it out; the same
    15 ms as a fixed prebuffer (no target: no cushion) underruns."""
    arrivals = [i * 0.1 + (late_ms / 1000 if i == 4 else 0.0) for i in range(12)]
    r = Renderer(ring, prebuffer_frames=1920)
    ring.control.set_target(360)
    play_stream(r, ring, arrivals, voiced(12 * 2400))
    assert ring.underrun_frames == 0 and r.cushion_frames >= CUSHION_MIN_FRAMES
    ring.control.set_target(0)
    r = Renderer(ring, prebuffer_frames=360)
    play_stream(r, ring, arrivals, voiced(12 * 2400))
    assert ring.underrun_frames > 0 and r.cushion_frames == 0


def test_the_reference_is_stamped_in_one_run_through_the_resampler() -> None:
    """At 48 kHz soxr hands out its output in bunches (none for one 10 ms block, two blocks' for
    the next): the second block of each pair was stamped with the first's due time, 10 ms early,
    so every block began a new run, and the echo canceller's far end realigned again and again
    (the conversation suite's ERLE read 28.6 dB on a slower machine)."""
    with made_ring() as speaker, made_ring(1 << 15) as ref:
        _, dev = feeder(speaker, 240, 48000, prebuffer_frames=0, stretch=False, ref=ref)
        speaker.write(voiced(24000))
        now = 100.0
        stamps: list[tuple[int, int, int]] = []
        for _ in range(80):                       # 5 ms device callbacks, 20 ms of output latency
            dev.fill(240, 480, now)
            stamp = ref.due_stamp()
            if stamp is not None and (not stamps or stamp != stamps[-1]):
                stamps.append(stamp)
            now += 0.005
        steady = stamps[4:]                       # (soxr's start-up)
        assert len(steady) > 10
        for (i0, due0, _), (i1, due1, _) in zip(steady, steady[1:]):
            assert abs((due1 - due0) - (i1 - i0) * 1_000_000_000 // 24000) < 1_000_000, (i0, i1, due1 - due0)
        assert len({run for _, _, run in steady}) == 1   # one run: the speaker never ran dry

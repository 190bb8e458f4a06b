"""A GPT-Live call's track gives back the latency a stall added at the phone: the bridge leaves
out silent frames while the phone's buffer has stood above what it is meant to hold
(engine.phone.catchup). Pure tests of the catch-up, then a call through a bridge in this test's
own loop, the local GPT-Live server in a thread with a stall, a fake phone."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from engine.codec import g711_encode
from engine.phone.catchup import FRAMES_PER_MS, LEVEL_WINDOW_S, SKIP_FRAMES, SLACK_MS, CatchUp, Skip
from engine.phone.cushion import IndexMap
from engine.phone.heard import HeardClock
from tests.helpers import voiced

SILENCE = b"\xff" * SKIP_FRAMES          # µ-law digital silence, one 20 ms frame
SPEECH = g711_encode(voiced(SKIP_FRAMES * 3, period_frames=50)[:SKIP_FRAMES], "audio/pcmu")


def budgeted(frames: int) -> CatchUp:
    """A catch-up whose last window closed ``frames`` above keep."""
    c = CatchUp()
    c.observe(1000 + frames, 1000, 0.0)
    c.observe(1000 + frames, 1000, LEVEL_WINDOW_S)
    assert c.budget_frames == frames
    return c


def test_a_window_above_keep_plus_slack_sets_the_budget_back_to_keep() -> None:
    c = CatchUp()
    for t, level in [(0.0, 4000), (0.3, 3200), (0.6, 3900), (0.9, 3500)]:
        c.observe(level, 800, t)
    assert c.budget_frames == 0                 # the window has not closed
    c.observe(3400, 800, 1.0)
    assert c.budget_frames == 3200 - 800        # its least, less keep
    c.observe(900, 800, 1.5)
    c.observe(2000, 800, 2.0)                   # the next window's least, 900, is within the slack
    assert 900 - 800 <= SLACK_MS * FRAMES_PER_MS and c.budget_frames == 0


def test_what_was_left_out_is_not_left_out_again_nor_below_keep() -> None:
    """The review's case: keep 80 ms, a window at 380 ms; the budget (300 ms) is spent in the
    window's last chunk, after its last level was taken. The next window's least must not count
    that level again: before, the next close set 300 ms more and the phone ended at -20 ms."""
    keep = 80 * FRAMES_PER_MS
    c = CatchUp()
    c.observe(380 * FRAMES_PER_MS, keep, 0.0)
    c.observe(380 * FRAMES_PER_MS, keep, 1.0)
    assert c.budget_frames == 300 * FRAMES_PER_MS
    out, _ = c.audio(SILENCE * 15)                       # 300 ms left out, after the level was taken
    assert out == b"" and c.budget_frames == 0
    c.observe(80 * FRAMES_PER_MS, keep, 2.0)             # the level that closes the next window
    assert c.budget_frames == 0
    # a budget not yet spent is capped by each level: a phone that ran low loses nothing more
    c.observe(80 * FRAMES_PER_MS, keep, 2.5)
    c.observe(300 * FRAMES_PER_MS, keep, 3.0)
    assert c.budget_frames == 0                          # the window's least, 80 ms, is keep
    c = budgeted(2000)
    c.observe(1000 + 200, 1000, 1.2)
    assert c.budget_frames == 200
    c.observe(None, 1000, 1.3)                           # the round trip unknown: nothing is left out
    assert c.budget_frames == 0 and c.audio(SILENCE * 4) == (SILENCE * 4, [])


def test_only_whole_silent_frames_go_and_only_while_the_budget_holds_one() -> None:
    c = budgeted(3 * SKIP_FRAMES + 10)
    data = SPEECH + SILENCE + SILENCE + SPEECH + SILENCE + SILENCE + SILENCE[:100]
    out, skips = c.audio(data)
    # the two silent frames after the first speech, one after the second (the budget then holds
    # less than a frame); speech and the part frame at the end go unchanged
    assert out == SPEECH + SPEECH + SILENCE + SILENCE[:100]
    assert skips == [Skip(SKIP_FRAMES, 2 * SKIP_FRAMES), Skip(2 * SKIP_FRAMES, SKIP_FRAMES)]
    assert c.budget_frames == 10 and c.skipped_frames == 3 * SKIP_FRAMES
    assert c.audio(SILENCE * 4) == (SILENCE * 4, [])


def test_speech_is_never_left_out() -> None:
    c = budgeted(10_000)
    # speech at -43 dBFS (peaks of 220): far quieter than a voice, still over the quiet level
    quiet_speech = g711_encode((voiced(SKIP_FRAMES * 4, period_frames=50) // 50).astype(np.int16), "audio/pcmu")
    assert c.audio(SPEECH * 5) == (SPEECH * 5, [])
    assert c.audio(quiet_speech) == (quiet_speech, [])
    assert c.skipped_frames == 0


def test_frames_left_out_keep_the_cores_index_and_the_marks_on_the_replys_frames() -> None:
    """The phone was sent 800 frames, 480 of the reply's left out after its first 160: the phone's
    frame 400 is the reply's 880; marks still fall every 1600 of the reply's frames."""
    index_map, clock = IndexMap(), HeardClock(mark_every_frames=1600)
    index_map.inserted(160, -480)
    assert [index_map.core_index(i) for i in (100, 160, 161, 400)] == [100, 160, 641, 880]
    # the next frame sent at the very index they were left out is the one after them
    assert index_map.core_index(160, next_sent=True) == 640 and index_map.core_index(100, next_sent=True) == 100
    index_map.inserted(800, 40)   # a cushion's insertion after it: both ways alike
    assert index_map.core_index(800) == index_map.core_index(800, next_sent=True) == 1280
    assert clock.sent(800, 0.0, inserted_frames=-480) == []
    assert clock.frames_to_next_mark() == 1600 - 1280
    assert [m.index for m in clock.sent(320, 0.1)] == [1120]   # the mark's phone index: 1600 of the reply's


def test_the_heard_clock_measures_the_round_trip_at_a_drained_start() -> None:
    """800 frames (100 ms) sent at 10.0 s to a phone that heard everything; the mark after them
    comes back at 10.16 s: a 60 ms round trip. A later start measured longer does not raise it."""
    clock = HeardClock(mark_every_frames=800)
    assert clock.round_trip_s is None
    [mark] = clock.sent(800, 10.0)
    clock.echoed(mark.name, 10.16)
    assert clock.round_trip_s == pytest.approx(0.06)
    [mark] = clock.sent(800, 20.0)             # the phone ran out long ago: a new start
    clock.echoed(mark.name, 20.2)
    assert clock.round_trip_s == pytest.approx(0.06)
    [mark] = clock.sent(800, 30.0)
    clock.clear(30.05)                         # a clear: its echo says nothing of the trip
    clock.echoed(mark.name, 30.06)
    assert clock.round_trip_s == pytest.approx(0.06)


@pytest.mark.e2e
@pytest.mark.timed   # the phone's buffer is measured at real time
@pytest.mark.timeout(60)
@pytest.mark.parametrize("jitter_buffer", ["adaptive", "fixed"])
def test_a_stall_on_a_live_call_is_given_back_at_the_phone(monkeypatch: pytest.MonkeyPatch, jitter_buffer: str) -> None:
    from engine.phone.bridge import PhoneBridge
    from engine.phone.simulator import FakePhone
    from engine.server.faults import Faults
    from tests.helpers import LocalServer, RecordingPublisher, bridge_spec, set_twilio_token
    set_twilio_token(monkeypatch)
    stall_s, stall_ms = 3.0, 400.0
    server = LocalServer(speed=1.0, asr=False, faults=Faults(stall_at_s=stall_s, stall_ms=stall_ms))
    pub = RecordingPublisher()

    async def main() -> tuple[list[tuple[float, int]], float, dict[str, Any]]:
        spec = bridge_spec(server.base + "/live/sessions", model="gpt-live-1")
        spec.config["audio"]["jitter_buffer"] = jitter_buffer
        bridge = PhoneBridge(spec, publisher=pub)  # type: ignore[arg-type]
        await bridge.listen()
        phone = await FakePhone(bridge.url).dial()
        await pub.wait("session.config", phone_call_id=phone.call_sid)
        t0 = time.monotonic()
        levels: list[tuple[float, int]] = []      # (s since the session began, frames the phone holds)
        while time.monotonic() - t0 < stall_s + 7.0:
            now = time.monotonic()
            levels.append((now - t0, phone.received_frames - phone.played_frames_at(now)))
            await asyncio.sleep(0.05)
        await phone.hang_up()
        ended = await pub.wait("phone.call.ended", phone_call_id=phone.call_sid)
        await bridge.close()
        return levels, phone.underruns, ended
    try:
        levels, underruns, ended = asyncio.run(main())
    finally:
        server.close()

    def least_ms(since_s: float, until_s: float) -> float:
        return min(f for t, f in levels if since_s <= t < until_s) / FRAMES_PER_MS
    before = least_ms(1.0, stall_s - 0.5)
    after = least_ms(stall_s + 4.0, stall_s + 7.0)
    keep = ended["catch_up_keep_ms"]
    summary = f"least level before the stall {before} ms, after {after} ms; the call's end: {ended}"
    # the stall ran the phone dry once, and its 400 ms then came at once; without the catch-up the
    # phone held them for the rest of the call (least level after: 475 ms fixed, 772 adaptive)
    assert ended["phone_underruns"] == 1, summary     # and leaving silence out never ran it dry
    assert ended["catch_up_skipped_ms"] >= stall_ms - 100, summary
    # back to what it is meant to hold: the hold and its cushion (adaptive: the jitter target, which
    # covers the stall's burst early in a call) and the slack the catch-up leaves, plus two ticks of
    # the phone's player (one in the round trip it measured, one in where its player is)
    assert ended["phone_round_trip_ms"] is not None and ended["phone_round_trip_ms"] < 40, summary
    assert after <= keep + SLACK_MS + 40, summary
    if jitter_buffer == "fixed":
        assert after <= before + 60, summary          # the hold's one growth (20 ms) and a tick or two

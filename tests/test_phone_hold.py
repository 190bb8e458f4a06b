"""The phone side's prebuffer (engine.phone.hold.StartHold): a reply's start is held
``audio.prebuffer_ms`` so that, when the API paces audio at real time, a delta a few ms late does
not leave the phone's buffer dry. Pure: a deterministic model of the fake phone's player (its own
gap counter, FakePhone._count_gap) fed by what the hold lets go."""
from __future__ import annotations

import pytest

from engine.phone.hold import Out, StartHold
from engine.phone.simulator import FRAME_BYTES, FakePhone

pytestmark = pytest.mark.timeout(5)

DELTA_BYTES = 800          # the local server's 100 ms deltas (µ-law, 8 kHz)


def underruns_at_the_phone(hold_ms: int, arrivals_ms: list[float], phase_ms: float) -> int:
    """Deltas reach the bridge at ``arrivals_ms``; the hold decides when each goes to the phone
    (the wire adds nothing); the phone's player ticks every 20 ms from ``phase_ms`` and counts
    gaps as FakePhone does. Returns its underruns."""
    hold = StartHold(hold_ms)
    sent: list[tuple[float, int]] = []        # (ms at the phone, bytes)
    for i, t in enumerate(arrivals_ms):
        # the phone has heard everything sent only before the first delta (a reply's start)
        for out in hold.due(t / 1000):
            sent.append((t, len(out.pcm or b"")))
        for out in hold.audio(b"\xff" * DELTA_BYTES, t / 1000, t / 1000, drained=i == 0):
            sent.append((t, len(out.pcm or b"")))
        if hold.release_at_s is not None and (i + 1 == len(arrivals_ms) or arrivals_ms[i + 1] / 1000 > hold.release_at_s):
            at = hold.release_at_s * 1000
            sent.extend((at, len(o.pcm or b"")) for o in hold.due(hold.release_at_s))
    phone = FakePhone("ws://unused")
    buffered, k = 0, 0
    tick = phase_ms
    end = max(t for t, _ in sent) + 1000
    while tick < end:
        while k < len(sent) and sent[k][0] <= tick:
            buffered += sent[k][1]
            k += 1
        take = min(FRAME_BYTES, buffered)
        buffered -= take
        phone._count_gap(take)
        tick += 20
    return phone.underruns


# real-time pacing (the local server at speed 1): delta k at 100 k ms, the fifth 6 ms late (the
# server's or the bridge's scheduling under load); the phone's player ticks 3 ms after the first
PACED = [100.0 * k + (6.0 if k == 5 else 0.0) for k in range(38)]


def test_sent_at_once_a_reply_paced_at_real_time_underruns_when_one_delta_is_a_few_ms_late() -> None:
    # the bridge before the hold: each delta went to the phone as it came; margin = the player's phase
    assert underruns_at_the_phone(0, PACED, phase_ms=3.0) == 1
    assert underruns_at_the_phone(0, [100.0 * k for k in range(38)], phase_ms=3.0) == 0   # on time: none


def test_held_60_ms_the_same_reply_plays_without_a_gap_whatever_the_players_phase() -> None:
    for phase_ms in (0.5, 3.0, 10.0, 19.5):
        assert underruns_at_the_phone(60, PACED, phase_ms) == 0
    # up to the hold (plus the phase) late: still no gap
    late = [100.0 * k + (55.0 if k % 7 == 3 else 0.0) for k in range(38)]
    assert underruns_at_the_phone(60, late, phase_ms=1.0) == 0
    assert underruns_at_the_phone(0, late, phase_ms=1.0) > 0


def test_only_a_replys_start_is_held_and_what_follows_the_hold_waits_in_order() -> None:
    hold = StartHold(60)
    assert hold.audio(b"a", 1.000, 1.000, drained=True) == [] and hold.release_at_s == pytest.approx(1.060)
    assert hold.audio(b"b", 1.030, 1.030, drained=False) == []          # behind the hold
    assert hold.due(1.059) == []
    assert hold.due(1.061) == [Out(b"a", 1.060), Out(b"b", 1.060)]     # latency counted from the release
    assert not hold.holding
    assert hold.audio(b"c", 1.100, 1.100, drained=False) == [Out(b"c", 1.100)]   # later deltas at once
    assert hold.holds == 1


def test_the_items_end_releases_at_once_and_a_clear_drops_what_is_held() -> None:
    hold = StartHold(60)
    hold.audio(b"a", 2.0, 2.0, drained=True)
    assert hold.end_of_item(2.010) == [Out(b"a", 2.010), Out(None, 2.010)]   # the whole reply is here
    assert hold.early_releases == 1 and not hold.holding
    assert hold.end_of_item(2.5) == [Out(None, 2.5)]
    hold.audio(b"xyz", 3.0, 3.0, drained=True)
    assert hold.drop() == 3 and not hold.holding and hold.due(9.0) == []


def test_hold_0_holds_nothing() -> None:
    hold = StartHold(0)
    assert hold.audio(b"a", 1.0, 1.0, drained=True) == [Out(b"a", 1.0)] and not hold.holding


def test_the_bridge_holds_as_long_as_the_engines_playback_prebuffer(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.config import load_config
    from engine.phone.bridge import PhoneBridge
    from tests.helpers import RecordingPublisher, bridge_spec, set_twilio_token
    set_twilio_token(monkeypatch)
    cfg = load_config(None, {"backend": "local"})
    bridge = PhoneBridge(bridge_spec("ws://127.0.0.1:9/v1/realtime"), publisher=RecordingPublisher())  # type: ignore[arg-type]
    assert bridge.prebuffer_ms == cfg["audio"]["prebuffer_ms"] == 60


# ---------------------------------------------------------------- a gap the marks show grows the hold
def test_a_gap_grows_the_hold_20_ms_up_to_its_cap_and_a_reply_without_one_gives_half_back() -> None:
    """As the engine's own speaker prebuffer does (playback Renderer): +20 ms per gap, at most
    MAX_HOLD_MS; a reply played through without a gap gives half the growth back."""
    from engine.phone.hold import GROW_MS, MAX_HOLD_MS
    hold = StartHold(60)
    hold.gap()
    assert hold.hold_ms == 60 + GROW_MS == 80
    hold.item_played()                      # that reply had the gap: no give-back
    assert hold.hold_ms == 80
    hold.item_played()                      # the next played clean
    assert hold.hold_ms == 70
    for _ in range(50):
        hold.gap()
    assert hold.hold_ms == MAX_HOLD_MS and hold.hold_ms_max == MAX_HOLD_MS and hold.gaps == 51
    assert StartHold(60).audio(b"x", 0.0, 0.0, drained=True) == [] and hold.audio(b"x", 0.0, 1.0, drained=True) == []
    assert hold.release_at_s == 1.0 + MAX_HOLD_MS / 1000   # the grown hold is what the next start waits
    off = StartHold(0)                      # phone.prebuffer_ms 0: never held, never grows
    off.gap()
    assert off.hold_ms == 0 and off.audio(b"x", 0.0, 0.0, drained=True) == [Out(b"x", 0.0)]


def test_one_gap_later_the_grown_hold_rides_out_the_same_late_delta() -> None:
    late = [100.0 * k + (70.0 if k == 5 else 0.0) for k in range(38)]   # the fifth delta 70 ms late
    assert underruns_at_the_phone(60, late, phase_ms=3.0) == 1
    hold = StartHold(60)
    hold.gap()
    assert underruns_at_the_phone(hold.hold_ms, late, phase_ms=3.0) == 0


def test_audio_sent_after_the_phone_ran_out_mid_item_is_a_gap_and_a_late_echo_is_not() -> None:
    """The heard clock's gap: an item's audio sent after the caller had heard all that was sent
    before it (by the marks); its length from when the phone ran out. Not a gap: an item's first
    audio, a shortfall within GAP_TOLERANCE_MS, an echo that comes late."""
    from engine.phone.heard import GAP_TOLERANCE_MS, HeardClock
    clock = HeardClock(mark_every_frames=1600)
    first = clock.sent(1600, 10.0)                  # an item's first 200 ms: not a gap (the phone was quiet)
    assert clock.take_gaps() == [] and first
    second = clock.sent(1600, 10.1)                 # 400 ms sent by 10.1: the phone plays until 10.4
    # the first mark's echo, due at 10.2, held back 150 ms (our loop, the network): it moves the
    # heard index later, and the audio sent at 10.38 (before the phone ran out) is no gap
    clock.echoed(first[0].name, 10.35)
    clock.sent(800, 10.38)
    assert clock.take_gaps() == [] and second
    # the second mark's echo on time (10.4): the phone plays the last 800 frames until 10.5; audio
    # sent at 10.7 came 200 ms after it ran out
    clock.echoed(second[0].name, 10.4)
    clock.sent(800, 10.7)
    gaps = clock.take_gaps()
    assert [(round(ms), i) for ms, i in gaps] == [(200, 4000)] and clock.gaps == 1 and round(clock.gap_ms) == 200
    assert clock.take_gaps() == []
    # within the tolerance of running out (10.8): not counted
    clock.sent(800, 10.8 + GAP_TOLERANCE_MS / 1000 - 0.005)
    assert clock.take_gaps() == []
    # the item ends; the next item's first audio, however long after, is not a gap; nor after a clear
    clock.end_of_item(0)
    clock.sent(800, 20.0)
    clock.clear(20.05)
    clock.sent(800, 30.0)
    assert clock.take_gaps() == [] and clock.gaps == 1


def test_mid_item_the_hold_starts_only_at_a_gap_and_a_dropped_hold_is_skipped_in_the_index_space() -> None:
    """A delta that may still be in time (the run-out estimate is up to a tick early) is not held:
    holding it would make the very gap it feared. Frames a clear dropped while held were counted by
    the core: the clock's index space moves past them."""
    from engine.phone.heard import GAP_TOLERANCE_MS, HeardClock
    clock = HeardClock(mark_every_frames=1600)
    assert clock.drained(0.0)                                   # an item's start: the phone is quiet
    clock.sent(800, 1.0)                                        # 100 ms: the phone runs out at 1.1
    assert not clock.drained(1.05) and clock.ran_out_s(1.05) is None
    assert clock.ran_out_s(1.11) is not None and not clock.drained(1.11)   # just out: maybe still in time
    assert clock.drained(1.1 + GAP_TOLERANCE_MS / 1000 + 0.001)           # out for longer: a gap, hold
    clock.clear(1.2, unsent_frames=4800)                        # 600 ms held and dropped by that clear
    assert clock.sent_frames == 5600 and clock.skipped_frames == 4800 and clock.drained(1.3)
    assert clock.heard_index(1.3) == 5600 and clock.frames_to_next_mark() == 1600


def test_the_jitter_target_sets_the_hold_and_gaps_grow_on_top_of_it() -> None:
    """audio.jitter_buffer adaptive: the call's estimate is the hold's base (a clean link: a short
    hold), a gap grows it by GROW_MS on top, a clean reply gives half of that back; a hold of 0
    (phone.prebuffer_ms 0) stays off whatever the estimate."""
    from engine.phone.hold import GROW_MS
    hold = StartHold(60)
    hold.retarget(15.2)
    assert hold.hold_ms == 15
    hold.audio(b"a", 1.0, 1.0, drained=True)
    assert hold.release_at_s == pytest.approx(1.015)
    hold.due(2.0)
    hold.gap()
    assert hold.hold_ms == 15 + GROW_MS
    hold.retarget(40)
    assert hold.hold_ms == 40 + GROW_MS
    hold.item_played()
    hold.item_played()
    assert hold.hold_ms == 40 + GROW_MS // 2
    off = StartHold(0)
    off.retarget(50)
    assert off.hold_ms == 0 and off.audio(b"x", 0.0, 0.0, drained=True) == [Out(b"x", 0.0)]

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


def test_the_bridge_holds_as_long_as_the_engines_playback_prebuffer() -> None:
    from engine.config import load_config
    from engine.phone.bridge import PhoneBridge
    from tests.test_phone_isolation import RecordingPublisher, bridge_spec
    cfg = load_config(None, {"backend": "local"})
    bridge = PhoneBridge(bridge_spec("ws://127.0.0.1:9/v1/realtime"), publisher=RecordingPublisher())  # type: ignore[arg-type]
    assert bridge.prebuffer_ms == cfg["audio"]["prebuffer_ms"] == 60

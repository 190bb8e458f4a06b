"""The phone's cushion (engine/phone/cushion.py): pitch periods inserted into a stretch's first
audio, the reply's own bytes unchanged between them, and the index map back to the reply."""
from __future__ import annotations

import numpy as np

from engine.codec import g711_decode, g711_encode
from engine.phone.cushion import (MAX_INSERT_FRAMES, PIECE_FRAMES, Cushion, IndexMap, Insertion,
                                  cushion_ms)
from engine.phone.heard import HeardClock
from engine.phone.hold import StartHold

RATE = 8000
DELTA_FRAMES = 800      #: a 100 ms delta


def voiced(seconds: float, f0_hz: float = 140.0) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    x = 8000 * np.sin(2 * np.pi * f0_hz * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
    return g711_encode(x.astype(np.int16), "audio/pcmu")


def cushioned(reply: bytes, budget_ms: float) -> tuple[bytes, list[Insertion]]:
    """The reply sent as 100 ms deltas in one stretch: what went out, insertions at their offsets in it."""
    c = Cushion()
    c.start(budget_ms)
    out, where = b"", []
    for k in range(0, len(reply), DELTA_FRAMES):
        sent, ins = c.audio(reply[k:k + DELTA_FRAMES])
        where += [Insertion(len(out) + i.offset, i.frames) for i in ins]
        out += sent
    return out, where


def without(out: bytes, where: list[Insertion]) -> bytes:
    kept, at = b"", 0
    for ins in where:
        kept += out[at:ins.offset]
        at = ins.offset + ins.frames
    return kept + out[at:]


def test_no_budget_sends_the_audio_as_it_came() -> None:
    reply = voiced(0.5)
    c = Cushion()
    assert c.audio(reply) == (reply, [])          # no stretch started
    c.start(0)
    assert c.audio(reply) == (reply, [])


def test_a_stretch_inserts_its_cushion_early_and_leaves_the_replys_bytes_as_they_were() -> None:
    reply = voiced(2.0)
    out, where = cushioned(reply, 40)
    inserted = sum(i.frames for i in where)
    assert 320 <= inserted < 320 + 120, where                 # 40 ms, give or take one period
    assert without(out, where) == reply                       # the reply's own bytes, in order
    assert where[0].offset >= PIECE_FRAMES                    # after a longest period of history
    assert all(b.offset - (a.offset + a.frames) >= PIECE_FRAMES for a, b in zip(where, where[1:]))
    assert all(i.frames <= max(MAX_INSERT_FRAMES, 120) for i in where)
    assert where[-1].offset < 0.5 * RATE                       # built within the first half second


def test_an_insertion_splices_without_a_click() -> None:
    reply = voiced(1.0)
    out, where = cushioned(reply, 40)
    steps = np.abs(np.diff(g711_decode(out, "audio/pcmu").astype(np.int32)))
    plain = np.abs(np.diff(g711_decode(reply, "audio/pcmu").astype(np.int32)))
    assert steps.max() <= 1.2 * plain.max(), (steps.max(), plain.max())


def test_the_index_map_gives_the_replys_frame_the_phone_was_at() -> None:
    m = IndexMap()
    assert m.core_index(1234) == 1234
    m.inserted(1000, 50)
    m.inserted(2000, 30)
    assert [m.core_index(p) for p in (999, 1000, 1025, 1050, 1051)] == [999, 1000, 1000, 1000, 1001]
    assert [m.core_index(p) for p in (2000, 2010, 2030, 2100)] == [1950, 1950, 1950, 2020]


def test_the_cushion_is_half_the_hold_from_10_to_60_ms() -> None:
    assert cushion_ms(80) == 40 and cushion_ms(300) == 60 and cushion_ms(5) == 10


def gaps_at_the_phone(late_ms: dict[int, float], with_cushion: bool, hold_ms: int = 80) -> int:
    """One reply of 100 ms deltas due every 100 ms, some late, through the start hold, the cushion
    (or not) and the heard clock, as the bridge drives them: the gaps the phone had."""
    reply = voiced(2.4)
    clock, hold, cushion = HeardClock(), StartHold(hold_ms), Cushion()
    arrivals: list[tuple[float, int]] = []     # in order: a late delta holds back those after it (one socket)
    for k in range(len(reply) // DELTA_FRAMES):
        arrivals.append((max(k * 0.1 + late_ms.get(k, 0) / 1000, arrivals[-1][0] if arrivals else 0.0), k))

    phone_done_s = 0.0                          # when the phone will have played all it was sent
    marks: list[tuple[float, str]] = []         # (when the phone plays past it, name): echoed then

    def send(pcm: bytes, now: float) -> None:
        nonlocal phone_done_s
        echo_by(now)
        ins: list[Insertion] = []
        if with_cushion:
            if clock.ran_out_s(now) is not None:
                cushion.start(cushion_ms(hold.hold_ms))
            pcm, ins = cushion.audio(pcm)
        phone_done_s = max(now, phone_done_s) + len(pcm) / RATE
        marks.extend((phone_done_s, m.name) for m in clock.sent(len(pcm), now, sum(i.frames for i in ins)))

    def echo_by(t: float) -> None:
        while marks and marks[0][0] <= t:
            clock.echoed(marks[0][1], marks.pop(0)[0])

    def release_by(t: float) -> None:
        released_at = hold.release_at_s
        if released_at is not None and t >= released_at:     # the hold's timer fired by then
            for out in hold.due(released_at):
                send(out.pcm or b"", released_at)

    for at, k in arrivals:
        release_by(at)
        echo_by(at)
        for out in hold.audio(reply[k * DELTA_FRAMES:(k + 1) * DELTA_FRAMES], at, at, clock.drained(at)):
            send(out.pcm or b"", at)
    release_by(float("inf"))
    return clock.gaps


def test_a_delta_later_than_the_hold_is_a_gap_without_the_cushion_and_none_with_it() -> None:
    # 35 ms more than the 80 ms hold, mid-reply: the phone ran dry over the 30 ms a gap must last
    late = {6: 115.0}
    assert gaps_at_the_phone(late, with_cushion=False) == 1
    assert gaps_at_the_phone(late, with_cushion=True) == 0
    assert gaps_at_the_phone({6: 165.0}, with_cushion=True) == 1   # beyond hold + cushion + 30 ms: a gap


def test_a_cushions_frames_do_not_move_the_marks_off_the_deltas() -> None:
    """Marks fall every 1600 of the reply's frames (200 ms): inserted frames are not the reply's, so
    the mark still falls at the end of the second 800-frame delta, not inside the third."""
    clock = HeardClock(mark_every_frames=1600)
    assert clock.sent(857, 0.0, inserted_frames=57) == []
    assert clock.frames_to_next_mark() == 800
    assert [m.index for m in clock.sent(857, 0.1, inserted_frames=57)] == [1714]
    assert clock.frames_to_next_mark() == 1600

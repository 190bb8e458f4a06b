"""The residual-echo guard's state machine (engine.capture.echo.TalkGuard): AEC3's brief leaks
are attenuated, a talker softer than the echo gets through after its onset, a loud one at once;
while the far end is uncertain (held) only a mic louder than its echo estimate counts."""
from __future__ import annotations

import numpy as np

from engine.capture.echo import (ECHO_BEAT_DB, ERL_LEARN_BLOCKS, HOLD_BLOCKS, HOLD_MAX_BLOCKS, TALK_DB, TALK_HANG_BLOCKS,
                                 TALK_ONSET_BLOCKS, TalkGuard)

ACTIVE = 100.0
FAR = 10_000.0                              # the far end's recent peak (well above ACTIVE)
RESIDUAL = FAR * 10 ** (-55 / 20)           # what AEC3 leaves when converged
SOFT = FAR * 10 ** ((TALK_DB + 12) / 20)    # a talker far below the old guard's -6 dB
LOUD = FAR * 10 ** (-3 / 20)


def run(guard: TalkGuard, levels: list[float], far: float = FAR) -> list[bool]:
    return [guard.attenuate(level, far) for level in levels]


def converged() -> TalkGuard:
    """A guard past its first hold: AEC3 has converged (its output is the residual)."""
    g = TalkGuard(-6.0, ACTIVE)
    run(g, [RESIDUAL] * HOLD_BLOCKS)
    assert not g.holding
    return g


def test_a_leak_shorter_than_the_onset_is_attenuated_whole() -> None:
    g = TalkGuard(-6.0, ACTIVE)
    out = run(g, [RESIDUAL] * 20 + [SOFT] * (TALK_ONSET_BLOCKS - 1) + [RESIDUAL] * 20)
    assert all(out)               # residual and the leak: all taken for echo
    assert g.state == TalkGuard.ECHO and g.talks == 0


def test_a_soft_talker_passes_after_its_onset_and_through_its_pauses() -> None:
    g = converged()
    speech = [SOFT] * 40 + [RESIDUAL] * (TALK_HANG_BLOCKS - 1) + [SOFT] * 20
    out = run(g, [RESIDUAL] * 10 + speech)
    onset = 10 + TALK_ONSET_BLOCKS - 1          # the block that completes the onset passes
    assert all(out[:onset]) and not any(out[onset:])
    assert g.state == TalkGuard.TALK and g.talks == 1
    after = run(g, [RESIDUAL] * (TALK_HANG_BLOCKS + 1))
    assert not any(after[:-1]) and after[-1]   # the hangover ends: back to ECHO
    assert g.state == TalkGuard.ECHO


def test_a_loud_talker_passes_at_once_and_nothing_is_guarded_without_a_far_end() -> None:
    g = converged()
    assert run(g, [LOUD] * 3) == [False] * 3
    g = TalkGuard(-6.0, ACTIVE)
    assert run(g, [RESIDUAL, SOFT, LOUD], far=ACTIVE / 2) == [False] * 3
    assert g.state == TalkGuard.QUIET


def test_the_far_end_stopping_ends_a_talk_and_its_return_needs_a_new_onset() -> None:
    g = converged()
    run(g, [SOFT] * TALK_ONSET_BLOCKS)
    assert g.state == TalkGuard.TALK
    run(g, [SOFT], far=0.0)
    assert g.state == TalkGuard.QUIET
    assert run(g, [SOFT] * 2) == [True, True]   # the far end is back: a new onset


ECHO = FAR * 10 ** (-13 / 20)               # the echo at the mic: 13 dB under the far end (the echo path)


def learn_echo_path(g: TalkGuard) -> None:
    """Echo-only blocks: the mic holds the echo, AEC3's output the residual."""
    for _ in range(ERL_LEARN_BLOCKS + 10):
        g.attenuate(RESIDUAL, FAR, ECHO)
    assert abs(20 * np.log10(g.erl / (ECHO / FAR))) < 0.5


def test_while_held_a_leak_as_loud_as_the_echo_makes_no_talker() -> None:
    """The far end was uncertain (a stalled playback): AEC3's output may be the echo it could not
    cancel, so a level above TALK_DB is no evidence; the mic at the echo's level is no talker."""
    g = TalkGuard(-6.0, ACTIVE)
    learn_echo_path(g)
    g.hold(HOLD_BLOCKS)
    leak = [g.attenuate(ECHO, FAR, ECHO) for _ in range(HOLD_BLOCKS + 20)]
    assert all(leak) and g.talks == 0 and g.state == TalkGuard.ECHO and g.holds == 1
    assert g.holding             # AEC3 leaks the echo whole: it has not re-converged, the hold goes on
    # it re-converges (the output is the residual again): the hold ends, the usual rules are back
    settle = [g.attenuate(RESIDUAL, FAR, ECHO) for _ in range(50)]
    assert all(settle) and not g.holding
    assert run(g, [SOFT] * TALK_ONSET_BLOCKS)[-1] is False and g.talks == 1


def test_a_hold_lasts_its_minimum_and_at_most_its_maximum() -> None:
    g = TalkGuard(-6.0, ACTIVE)
    learn_echo_path(g)
    g.hold(HOLD_BLOCKS)
    for _ in range(HOLD_BLOCKS):      # AEC3 cancels all along: the hold still lasts its minimum
        assert g.holding
        g.attenuate(RESIDUAL, FAR, ECHO)
    g.attenuate(RESIDUAL, FAR, ECHO)
    assert not g.holding
    g.hold(HOLD_BLOCKS)
    for _ in range(HOLD_MAX_BLOCKS):  # AEC3 never re-converges: the hold ends anyway
        g.attenuate(ECHO, FAR, ECHO)
    assert not g.holding


def test_while_held_a_talker_louder_than_the_echo_passes_and_is_found() -> None:
    g = TalkGuard(-6.0, ACTIVE)
    learn_echo_path(g)
    g.hold(100)
    talker = ECHO * 10 ** ((ECHO_BEAT_DB + 3) / 20)      # the mic well above the echo it could hold
    out = [g.attenuate(talker, FAR, talker) for _ in range(TALK_ONSET_BLOCKS + 5)]
    assert not any(out) and g.state == TalkGuard.TALK and g.talks == 1


def test_a_talker_already_found_keeps_talking_through_a_hold() -> None:
    """A barge-in's own flush moves the reference (the device feeder's frames are dropped): the
    hold that may follow must not cut the user off mid-sentence, however soft."""
    g = TalkGuard(-6.0, ACTIVE)
    learn_echo_path(g)
    run(g, [SOFT] * TALK_ONSET_BLOCKS)
    assert g.state == TalkGuard.TALK
    g.hold(HOLD_BLOCKS)
    assert run(g, [SOFT] * 40) == [False] * 40 and g.state == TalkGuard.TALK


def test_a_hold_does_not_keep_a_far_end_that_is_known_to_be_silent() -> None:
    """After a barge-in the model is silent, and the reference says so: held or not, the guard is
    QUIET (and passes the user) once the far end has been silent 500 ms."""
    g = TalkGuard(-6.0, ACTIVE)
    learn_echo_path(g)
    g.hold(HOLD_BLOCKS)
    assert g.attenuate(SOFT, 0.0, SOFT) is False and g.state == TalkGuard.QUIET


def test_zeros_for_missing_reference_keep_the_far_end_level() -> None:
    """A stall hands the canceller zeros for frames playback has not written: they say nothing of
    what the speaker played, so the guard's far-end level stays (it holds and attenuates the
    echo AEC3 cannot cancel), where zeros that are the reference keep it only 500 ms."""
    from engine.capture.echo import EchoCanceller
    from engine.server.voice import synthesize
    far = synthesize("The sea is wide and the ships are many, and every sailor knows the way home.", "marin", 1.0)
    far = np.concatenate([far, far])
    delay = 24 * 40
    near = np.zeros_like(far)
    near[delay:] = (far[:-delay] * 0.2).astype(np.int16)
    stall = range(24000 * 3, 24000 * 3 + 24 * 800)          # 800 ms, within speech
    for uncertain in (True, False):
        aec = EchoCanceller()
        guard = aec.guard
        assert guard is not None
        states = []
        for i in range(0, 24000 * 4, 480):
            f = far[i:i + 480].copy()
            missing = i in stall
            if missing:
                f[:] = 0
            aec.process(near[i:i + 480], f, uncertain and missing)
            if missing:
                states.append(guard.state)
        if uncertain:
            assert set(states) == {TalkGuard.ECHO} and guard.holds >= 1
        else:
            assert states[-1] == TalkGuard.QUIET


def test_the_guard_holds_from_its_start_until_aec3_has_converged() -> None:
    """AEC3's first seconds of far-end speech leak as much as a stall does: no talker from them."""
    g = TalkGuard(-6.0, ACTIVE)
    assert g.holding
    assert all(run(g, [SOFT] * 40)) and g.talks == 0      # the leak, above TALK_DB: no talker
    run(g, [RESIDUAL] * 60)                                # converged
    assert not g.holding


def test_the_first_hold_outlasts_the_echo_path_delay() -> None:
    """The far end's first blocks have no echo in the mic yet (the echo path's delay): AEC3's
    silent output then says nothing of its convergence, and the first hold goes on through the
    leak that follows."""
    g = TalkGuard(-6.0, ACTIVE)
    run(g, [0.0] * 10, far=0.0)                            # before the model speaks
    run(g, [RESIDUAL] * 8)                                 # its first 80 ms: the echo has not arrived
    assert g.holding
    assert all(run(g, [SOFT] * 40)) and g.talks == 0

def test_no_hold_begins_while_the_far_end_is_silent() -> None:
    g = TalkGuard(-6.0, ACTIVE)
    g.hold(HOLD_BLOCKS)
    assert run(g, [LOUD] * 5, far=0.0) == [False] * 5 and g.holds == 0

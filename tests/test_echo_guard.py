"""The residual-echo guard's state machine (engine.capture.echo.TalkGuard): AEC3's brief leaks
are attenuated, a talker softer than the echo gets through after its onset, a loud one at once."""
from __future__ import annotations

from engine.capture.echo import TALK_DB, TALK_HANG_BLOCKS, TALK_ONSET_BLOCKS, TalkGuard

ACTIVE = 100.0
FAR = 10_000.0                              # the far end's recent peak (well above ACTIVE)
RESIDUAL = FAR * 10 ** (-55 / 20)           # what AEC3 leaves when converged
SOFT = FAR * 10 ** ((TALK_DB + 12) / 20)    # a talker far below the old guard's -6 dB
LOUD = FAR * 10 ** (-3 / 20)


def run(guard: TalkGuard, levels: list[float], far: float = FAR) -> list[bool]:
    return [guard.attenuate(level, far) for level in levels]


def test_a_leak_shorter_than_the_onset_is_attenuated_whole() -> None:
    g = TalkGuard(-6.0, ACTIVE)
    out = run(g, [RESIDUAL] * 20 + [SOFT] * (TALK_ONSET_BLOCKS - 1) + [RESIDUAL] * 20)
    assert all(out)               # residual and the leak: all taken for echo
    assert g.state == TalkGuard.ECHO and g.talks == 0


def test_a_soft_talker_passes_after_its_onset_and_through_its_pauses() -> None:
    g = TalkGuard(-6.0, ACTIVE)
    speech = [SOFT] * 40 + [RESIDUAL] * (TALK_HANG_BLOCKS - 1) + [SOFT] * 20
    out = run(g, [RESIDUAL] * 10 + speech)
    onset = 10 + TALK_ONSET_BLOCKS - 1          # the block that completes the onset passes
    assert all(out[:onset]) and not any(out[onset:])
    assert g.state == TalkGuard.TALK and g.talks == 1
    after = run(g, [RESIDUAL] * (TALK_HANG_BLOCKS + 1))
    assert not any(after[:-1]) and after[-1]   # the hangover ends: back to ECHO
    assert g.state == TalkGuard.ECHO


def test_a_loud_talker_passes_at_once_and_nothing_is_guarded_without_a_far_end() -> None:
    g = TalkGuard(-6.0, ACTIVE)
    assert run(g, [LOUD] * 3) == [False] * 3
    g = TalkGuard(-6.0, ACTIVE)
    assert run(g, [RESIDUAL, SOFT, LOUD], far=ACTIVE / 2) == [False] * 3
    assert g.state == TalkGuard.QUIET


def test_the_far_end_stopping_ends_a_talk_and_its_return_needs_a_new_onset() -> None:
    g = TalkGuard(-6.0, ACTIVE)
    run(g, [SOFT] * TALK_ONSET_BLOCKS)
    assert g.state == TalkGuard.TALK
    run(g, [SOFT], far=0.0)
    assert g.state == TalkGuard.QUIET
    assert run(g, [SOFT] * 2) == [True, True]   # the far end is back: a new onset

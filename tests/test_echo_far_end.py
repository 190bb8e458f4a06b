"""The echo canceller's far end (engine.capture.echo.FarEnd): the reference stream must stay
continuous when playback's callback is a little late, or the echo's delay jumps and AEC3
leaks echo while it finds the new delay (on a loaded machine: false barge-ins)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from engine.audio.ring import Ring
from engine.capture.echo import EchoCanceller, FarEnd

pytestmark = pytest.mark.timeout(30)

BLOCK = 480  # 20 ms at 24 kHz


@pytest.fixture
def ring(request: pytest.FixtureRequest) -> Iterator[Ring]:
    name = f"realtalk-test-{os.getpid()}-{request.node.name[:30]}"
    r = Ring.create(name, 16384, with_eventfd=False)
    yield r
    r.close()
    Path("/dev/shm", name).unlink(missing_ok=True)


def ramp(start: int, n: int) -> np.ndarray:
    """Frames numbered from ``start`` (mod 30000): a stream whose continuity can be checked."""
    return ((np.arange(start, start + n) % 30000) + 1).astype(np.int16)


def test_a_late_playback_callback_does_not_shift_the_reference(ring: Ring) -> None:
    """Playback writes a 20 ms block per 20 ms; once, its callback is 10 ms late (the block comes
    after the mic's take). The reference handed to the canceller must stay one continuous stream,
    with no zeros inserted: inserted zeros move every later frame, i.e. the echo's delay."""
    far = FarEnd(ring)
    written = 0
    taken: list[np.ndarray] = []
    for i in range(40):
        late = i == 20
        if not late:
            ring.write(ramp(written, BLOCK))
            written += BLOCK
        taken.append(far.take(BLOCK).copy())
        if late:                      # the late block arrives after the take
            ring.write(ramp(written, BLOCK))
            written += BLOCK
    stream = np.concatenate(taken)
    first = int(np.flatnonzero(stream)[0])
    body = stream[first:].astype(np.int64)
    assert far.missing_frames == 0, f"{far.missing_frames} reference frames were zero-padded"
    assert np.all(np.diff(body) % 30000 == 1), "the reference stream has a jump (its delay moved)"


def test_the_reserve_is_kept_at_alignment_and_a_backlog_is_still_cut(ring: Ring) -> None:
    """At the first take the backlog is cut down to the reserve; a lasting backlog far above it
    (clock drift) is cut after the patience, and a short burst is not."""
    far = FarEnd(ring, max_backlog_frames=2400, patience_takes=5)
    ring.write(ramp(0, 5000))
    far.take(BLOCK)
    assert ring.read_available == far.reserve_frames
    ring.write(ramp(5000, 4000))         # a burst: 4000 frames more than the mic takes
    for _ in range(4):
        ring.write(ramp(0, BLOCK))
        far.take(BLOCK)
    assert far.skipped_frames == 5000 - BLOCK - far.reserve_frames   # only the alignment's cut so far
    ring.write(ramp(0, BLOCK))
    far.take(BLOCK)                      # the fifth take over the limit: cut to the reserve
    assert ring.read_available == far.reserve_frames


def test_the_reserve_is_built_once_with_silence_then_playback_later_than_it_is_padded(ring: Ring) -> None:
    """The first takes hand out silence until the reserve is held (not counted as missing);
    after that, a take that finds less than it needs is padded and counted."""
    far = FarEnd(ring)
    for i in range(3):
        ring.write(ramp(i * BLOCK, BLOCK))
        far.take(BLOCK)
    assert far.missing_frames == 0 and far.held_frames == far.reserve_frames
    assert ring.read_available == far.reserve_frames
    far.take(BLOCK)                       # playback wrote nothing for one take: the reserve covers it
    assert far.missing_frames == 0
    far.take(BLOCK)                       # nor for the next: the reserve is gone, the rest is missing
    assert far.missing_frames == 2 * BLOCK - far.reserve_frames


def _run(aec: EchoCanceller, near: np.ndarray, far: np.ndarray, bump_at_frame: int | None = None) -> np.ndarray:
    out = []
    for i in range(0, len(far) - BLOCK + 1, BLOCK):
        if bump_at_frame is not None and i == bump_at_frame and aec.far_end is not None:
            aec.far_end.missing_frames += BLOCK   # as if playback had been late past the reserve here
        out.append(aec.process(near[i:i + BLOCK], far[i:i + BLOCK]))
    return np.concatenate(out)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-9)


def test_the_guard_lets_a_soft_user_through_in_steady_state_and_arms_after_a_delay_change(ring: Ring) -> None:
    """Double talk: the user speaks 20 dB below the model's echo at the mic. In steady state
    (AEC3 converged) the guard must not attenuate them; for 2 s after the echo's delay changed
    it does (that is when AEC3 leaks)."""
    rng = np.random.default_rng(5)
    seconds = 12
    n = 24000 * seconds
    # the model: loud noise bursts (speech-like on/off), its echo at the mic 100 ms later at 40 %
    env = np.repeat(rng.random(n // 2400) > 0.2, 2400).astype(np.float64)
    far = (rng.standard_normal(n) * 6000 * env).clip(-32000, 32000).astype(np.int16)
    echo = np.zeros(n)
    echo[2400:] = far[:-2400] * 0.4
    user = np.zeros(n)
    echo_rms = _rms(echo[env > 0])
    for start_s in (5, 9):           # the user at -20 dB re the echo: 5..7 s (steady), 9..11 s (after a change)
        a, b = start_s * 24000, (start_s + 2) * 24000
        user[a:b] = rng.standard_normal(b - a) * echo_rms * 0.1
    near = (echo + user).clip(-32000, 32000).astype(np.int16)
    plain = _run(EchoCanceller(guard_db=None), near, far)
    guarded = _run(EchoCanceller(guard_db=-6.0, far_end=FarEnd(ring)), near, far, bump_at_frame=9 * 24000 - 4800)
    lag = 1200  # the resamplers' delay is well under 50 ms: compare windows a little inside the user's speech
    steady = slice(5 * 24000 + lag, 7 * 24000 - lag)
    after = slice(9 * 24000 + lag, 11 * 24000 - lag)
    assert 20 * np.log10(_rms(plain[steady]) / echo_rms) > -30, "AEC3 alone removed the user (test broken)"
    loss_steady_db = 20 * np.log10(_rms(guarded[steady]) / _rms(plain[steady]))
    loss_after_db = 20 * np.log10(_rms(guarded[after]) / _rms(plain[after]))
    assert loss_steady_db > -1.0, f"the guard took {loss_steady_db:.1f} dB off a soft user in steady state"
    assert loss_after_db < -10.0, f"the guard was not armed after the delay change ({loss_after_db:.1f} dB)"

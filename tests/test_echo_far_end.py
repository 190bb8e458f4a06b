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
from engine.capture.echo import FarEnd

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

"""The renderer's state machine (engine/playback/renderer.py, its twin in engine/audio/_native.c):
the table is whole and the same in both, and the renderers take only its rows. Pure: no device."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest

from engine.audio import native
from engine.audio.ring import Ring
from engine.playback.renderer import _NEXT, TRANSITIONS, Renderer, RenderEvent, RenderState
from tests.helpers import made_ring, speaker_ring_schedule, voiced

S, E = RenderState, RenderEvent
pytestmark = pytest.mark.timeout(30)
IMPLS = ["python", "native"] if native.available() else ["python"]


@pytest.fixture
def ring() -> Iterator[Ring]:
    with made_ring() as r:
        yield r


def test_a_flush_takes_every_state_to_idle() -> None:
    assert all(TRANSITIONS[(state, E.FLUSHED)] is S.IDLE for state in S)


def test_every_state_is_reached_from_idle_and_leads_back_to_it_without_a_flush() -> None:
    def reach(start: RenderState, rows: dict[tuple[RenderState, RenderEvent], RenderState]) -> set[RenderState]:
        seen, todo = {start}, [start]
        while todo:
            here = todo.pop()
            for (state, _), to in rows.items():
                if state is here and to not in seen:
                    seen.add(to)
                    todo.append(to)
        return seen
    no_flush = {k: v for k, v in TRANSITIONS.items() if k[1] is not E.FLUSHED}
    assert reach(S.IDLE, no_flush) == set(S)
    assert all(S.IDLE in reach(state, no_flush) for state in S)


def test_every_event_moves_some_state_and_the_lookup_is_the_table() -> None:
    assert {event for _, event in TRANSITIONS} == set(E)
    for state in S:
        for event in E:
            assert _NEXT[state][event] is TRANSITIONS.get((state, event))


@pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")
def test_the_c_renderer_has_the_same_states_events_and_table() -> None:
    from engine.audio import _native
    states, events, rows = _native.RENDER_TABLE
    assert states == tuple(s.name for s in S)
    assert events == tuple(e.name for e in E)
    assert set(rows) == {(int(s), int(e), int(to)) for (s, e), to in TRANSITIONS.items()}


def test_an_event_the_state_does_not_allow_changes_nothing_and_is_counted(ring: Ring) -> None:
    r = Renderer(ring, prebuffer_frames=480)
    r._go(E.RETURNED)   # IDLE has no gap to come back from
    assert r.state is S.IDLE and r.transition_errors == 1
    assert sum(r.transition_counts) == 0


def _drive(r: Any, ring: Ring, seed: int) -> list[RenderState]:
    """Run a random speaker-ring schedule through ``r``; check rule 4 after every block; return the
    states it was in after each block."""
    pcm = voiced(1 << 16)
    pos, now, seen = 0, 0.0, []
    for act, n in speaker_ring_schedule(seed):
        if act == "write":
            ring.write(pcm[pos % 60000:pos % 60000 + n])
            pos += n
        elif act == "end":
            ring.mark_end()
        elif act == "flush":
            ring.request_flush()
        elif act == "start":
            ring.mark_start()
        elif act == "target":
            ring.control.set_target(n)
        else:
            r.render(np.zeros(n, dtype=np.int16), n // 2, now)
            now += n / 24000
            state = S(r.state)
            assert r.transition_errors == 0, f"seed {seed}: a transition outside the table"
            assert r.in_stream == (state in (S.PLAYING, S.DRY, S.REBUFFERING))
            assert (r.dry_frames > 0) == (state is S.DRY), (state, r.dry_frames)
            if isinstance(r, Renderer):
                assert (r.waiting_since is not None) == (state in (S.PREBUFFERING, S.REBUFFERING))
            seen.append(state)
    return seen


@pytest.mark.parametrize("impl", IMPLS)
def test_random_schedules_take_only_the_tables_rows_and_keep_each_states_data(ring: Ring, impl: str) -> None:
    """Writes, end marks, flushes, targets and callbacks at random: every block ends in a state
    whose data is whole (rule 4) and no event falls outside the table (rule 1)."""
    make = Renderer if impl == "python" else native.NativeRenderer
    states: set[int] = set()
    for seed in range(4):
        r = make(ring, prebuffer_frames=1440)
        states.update(_drive(r, ring, seed))
        ring.request_flush()
        r.render(np.zeros(480, dtype=np.int16), 240, 1e6)
        assert S(r.state) is S.IDLE
    assert states == set(S), f"states never reached: {set(S) - states}"


def test_random_schedules_take_every_row_of_the_table(ring: Ring) -> None:
    """No row is dead: driven at random, the Python renderer takes each of them."""
    taken = [0] * len(_NEXT) * len(E)
    for seed in range(8):   # a stream's cushion keeps some rings from running dry: DRY -> FLUSHED needs seed 6
        r = Renderer(ring, prebuffer_frames=1440)
        _drive(r, ring, seed)
        taken = [a + b for a, b in zip(taken, r.transition_counts)]
    untaken = [(s.name, e.name) for (s, e) in TRANSITIONS if not taken[s * len(E) + e]]
    assert not untaken, f"rows never taken: {untaken}"

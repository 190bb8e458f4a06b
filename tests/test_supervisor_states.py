"""The child state machine (engine.supervisor.children): pure, no processes."""
from __future__ import annotations

import pytest

from engine.supervisor.children import (EXIT_DEVICE_FAILED, TRANSITIONS, ChildMachine, ChildState, ChildStateError, GaveUp,
                               Kill, Policy, Restarting, Spawn, Terminate)

S = ChildState
pytestmark = pytest.mark.timeout(10)


def machine(**kw: float) -> ChildMachine:
    return ChildMachine("capture", Policy(**kw))  # type: ignore[arg-type]


def test_running_only_after_startsecs() -> None:
    m = machine(startsecs=1.0)
    m.spawned(10.0)
    assert m.state is S.STARTING
    assert m.tick(10.9) is None and m.state is S.STARTING
    m.tick(11.0)
    assert m.state is S.RUNNING


def test_dying_while_starting_backs_off_then_is_fatal_after_startretries() -> None:
    m = machine(startsecs=1.0, startretries=3, backoff_s=0.5)
    now = 0.0
    for attempt in (1, 2):
        m.spawned(now)
        act = m.exited(1, now + 0.2)
        assert isinstance(act, Restarting) and act.during_start
        assert m.state is S.BACKOFF and act.at == pytest.approx(now + 0.2 + 0.5 * attempt)
        assert m.tick(act.at - 0.01) is None
        assert isinstance(m.tick(act.at), Spawn)
        now = act.at
    m.spawned(now)
    act = m.exited(1, now + 0.2)
    assert isinstance(act, GaveUp) and m.state is S.FATAL
    assert "3 tries" in act.reason and "capture exited with code 1" in act.reason
    with pytest.raises(ChildStateError):
        m.spawned(now + 5)  # FATAL is final


def test_a_start_that_succeeded_resets_the_start_retries() -> None:
    m = machine(startsecs=1.0, startretries=2)
    m.spawned(0.0)
    assert isinstance(m.exited(1, 0.5), Restarting)
    m.spawned(1.0)
    m.tick(2.5)
    assert m.state is S.RUNNING and m.failed_starts == 0
    act = m.exited(-9, 10.0)   # a crash mid-call: restart soon
    assert isinstance(act, Restarting) and not act.during_start and act.at - 10.0 <= 0.5
    assert m.restarts == 1


def test_device_failure_is_fatal_at_once_with_the_childs_message() -> None:
    m = machine()
    m.spawned(0.0)
    act = m.exited(EXIT_DEVICE_FAILED, 0.3, "no input device matches 'no-such-mic'")
    assert isinstance(act, GaveUp) and m.state is S.FATAL
    assert act.reason == "no input device matches 'no-such-mic'"


def test_flapping_while_running_is_fatal() -> None:
    m = machine(startsecs=0.0, max_restarts=2, flap_window_s=60.0)
    now = 0.0
    for _ in range(2):
        m.spawned(now)
        m.tick(now)
        act = m.exited(1, now + 1)
        assert isinstance(act, Restarting)
        now = act.at
    m.spawned(now)
    m.tick(now)
    assert isinstance(m.exited(1, now + 1), GaveUp)


def test_stop_terminates_then_kills_after_the_grace() -> None:
    m = machine(stop_grace_s=3.0)
    m.spawned(0.0)
    assert isinstance(m.stop(1.0), Terminate) and m.state is S.STOPPING
    assert m.tick(3.9) is None
    assert isinstance(m.tick(4.0), Kill)
    assert m.exited(-9, 4.1) is None and m.state is S.EXITED


def test_stop_in_backoff_never_restarts() -> None:
    m = machine()
    m.spawned(0.0)
    m.exited(1, 0.1)
    assert m.stop(0.2) is None and m.state is S.EXITED
    assert m.tick(100.0) is None and m.state is S.EXITED


def test_event_not_allowed_changes_nothing() -> None:
    m = machine()
    with pytest.raises(ChildStateError):
        m.exited(0, 1.0)     # never spawned
    assert m.state is S.STOPPED and m.exit_code is None
    m.spawned(0.0)
    with pytest.raises(ChildStateError):
        m.spawned(0.5)       # already STARTING
    assert m.state is S.STARTING and m.started_at == 0.0


def test_every_transition_target_is_a_state_and_final_states_stay_final() -> None:
    for (state, event), targets in TRANSITIONS.items():
        assert targets
        if state in (S.EXITED, S.FATAL):
            assert targets == {state}, (state, event)

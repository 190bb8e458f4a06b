"""The child state machine (engine.supervisor.children): pure, no processes."""
from __future__ import annotations

import pytest

from engine.child import EXIT_DEVICE_FAILED
from engine.supervisor.children import (TRANSITIONS, ChildMachine, ChildState, ChildStateError, GaveUp, Kill, Policy,
                                        Restarting, Spawn, Terminate, Unresponsive)

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


# ---------------------------------------------------------------- liveness (heartbeats)
def beating(**kw: float) -> ChildMachine:
    return machine(startsecs=1.0, heartbeat_timeout_s=3.0, first_beat_timeout_s=10.0, **kw)


def test_with_heartbeats_running_needs_a_first_beat() -> None:
    m = beating()
    m.spawned(0.0)
    assert m.tick(1.5) is None and m.state is S.STARTING   # up 1 s, but it has not said it is alive
    m.beat(1.6)
    m.tick(1.7)
    assert m.state is S.RUNNING


def test_a_silent_child_is_unresponsive_then_killed_and_restarted() -> None:
    """Issue 23 point 5: a child stopped (SIGSTOP) for 5 s was never reported nor restarted."""
    m = beating()
    m.spawned(0.0)
    m.beat(0.1)
    m.tick(1.1)
    m.beat(2.0)
    assert m.tick(4.9) is None and m.state is S.RUNNING      # silent 2.9 s: within the timeout
    act = m.tick(5.1)
    assert isinstance(act, Unresponsive) and act.silent_s == pytest.approx(3.1) and not act.during_start
    assert m.state is S.UNRESPONSIVE and m.alive_states
    m.beat(5.2)                                             # a beat after the verdict changes nothing
    assert m.state is S.UNRESPONSIVE and m.tick(5.3) is None
    restart = m.exited(-9, 5.4)
    assert isinstance(restart, Restarting) and not restart.during_start and m.state is S.BACKOFF
    assert isinstance(m.tick(restart.at), Spawn)
    m.spawned(restart.at)
    assert m.restarts == 1 and m.last_beat_at == restart.at   # the new process's clock starts at its spawn


def test_a_child_that_never_beats_fails_its_starts_and_is_fatal() -> None:
    m = beating(startretries=2, backoff_s=0.5)
    m.spawned(0.0)
    act = m.tick(10.1)
    assert isinstance(act, Unresponsive) and act.during_start
    restart = m.exited(-9, 10.2)
    assert isinstance(restart, Restarting) and restart.during_start
    m.spawned(restart.at)
    assert isinstance(m.tick(restart.at + 10.1), Unresponsive)
    gave_up = m.exited(-9, restart.at + 10.2)
    assert isinstance(gave_up, GaveUp) and m.state is S.FATAL and "did not answer" in gave_up.reason


def test_stop_while_unresponsive_ends_it_without_a_restart() -> None:
    m = beating()
    m.spawned(0.0)
    m.beat(0.5)
    m.tick(1.0)
    assert isinstance(m.tick(4.0), Unresponsive)
    assert m.stop(4.1) is None and m.state is S.STOPPING     # SIGKILL is already on its way
    assert m.exited(-9, 4.2) is None and m.state is S.EXITED


def test_without_heartbeats_silence_is_never_a_verdict() -> None:
    m = machine(startsecs=1.0)
    m.spawned(0.0)
    m.tick(1.0)
    assert m.state is S.RUNNING and m.tick(1000.0) is None and m.state is S.RUNNING


def test_a_beat_from_a_process_that_is_gone_is_a_supervisor_bug() -> None:
    m = beating()
    m.spawned(0.0)
    m.exited(1, 0.2)
    with pytest.raises(ChildStateError):
        m.beat(0.3)            # BACKOFF: no process; the supervisor reads beats of alive children only
    assert m.state is S.BACKOFF and m.beats == 0

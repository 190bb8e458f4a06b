"""The API link's policy (engine/link/policy.py), pure: no sockets, times passed in."""
from __future__ import annotations

from typing import Sequence

import pytest

from engine.link.policy import (BACKOFF_S, FIRST_REACH_TIMEOUT_S, OPEN_TIMEOUT_S, RECYCLE_CHECK_S, TRANSITIONS,
                                Cause, Close, Connect, ConnectFailure, Fatal, LinkPolicy, LinkRules, LinkState,
                                LinkStateError, ToCore, Wait)
from engine.realtime.records import Connected, Disconnected, Publish

URL = "wss://api.example.com/v1/realtime"
REFUSED = ConnectFailure(Cause.REFUSED, "[Errno 111] Connection refused")


def opened(rules: LinkRules | None = None, now_s: float = 0.0) -> LinkPolicy:
    p = LinkPolicy(rules or LinkRules(URL))
    p.start(now_s)
    p.opened(now_s)
    return p


def only(acts: Sequence[object], kind: type) -> list[object]:
    return [a for a in acts if isinstance(a, kind)]


# ---------------------------------------------------------------- rule 1: the first socket
def test_the_first_socket_reaches_the_host_within_the_short_timeout_and_waits_for_its_upgrade() -> None:
    p = LinkPolicy(LinkRules(URL))
    assert p.start(0.0) == [Connect(FIRST_REACH_TIMEOUT_S, OPEN_TIMEOUT_S)]
    assert FIRST_REACH_TIMEOUT_S < 4.0     # with the engine's start-up, `engine start` ends within 5 s
    assert p.opened(1.0) == [ToCore(Connected(reconnect=False, reason="start"))]
    assert p.state is LinkState.OPEN


@pytest.mark.parametrize("failure", [
    REFUSED,
    ConnectFailure(Cause.DNS, "[Errno -2] Name or service not known"),
    ConnectFailure(Cause.TLS, "CERTIFICATE_VERIFY_FAILED"),
    ConnectFailure(Cause.BAD_URL, "http://x isn't a valid URI"),
    ConnectFailure(Cause.TIMEOUT, "no answer from the host within 3 s"),
    ConnectFailure(Cause.HTTP, status=404),
    ConnectFailure(Cause.HTTP, status=503),
])
def test_any_failure_of_the_first_socket_is_fatal_at_once_naming_the_url_and_the_cause(failure: ConnectFailure) -> None:
    p = LinkPolicy(LinkRules(URL, hint="check openai_url"))
    p.start(0.0)
    acts = p.failed(failure, 0.1)
    assert len(acts) == 1 and isinstance(acts[0], Fatal), acts
    assert acts[0].code == "unreachable" and URL in acts[0].message and failure.describe() in acts[0].message
    assert acts[0].message.endswith("; check openai_url")
    assert p.state is LinkState.FATAL and p.final


def test_a_refused_key_is_fatal_naming_the_variable_at_the_first_socket_and_after() -> None:
    for resumed in (False, True):
        p = LinkPolicy(LinkRules(URL, key_env="MY_KEY", resumed=resumed))
        p.start(0.0)
        (fatal,) = p.failed(ConnectFailure(Cause.HTTP, status=401), 0.0)
        assert isinstance(fatal, Fatal) and fatal.code == "auth_refused"
        assert "HTTP 401" in fatal.message and "$MY_KEY" in fatal.message and "--backend local" in fatal.message
    p = opened()
    p.closed(1006, "", 5.0)                          # a drop: reconnecting at once ...
    (fatal,) = p.failed(ConnectFailure(Cause.HTTP, status=403), 5.0)
    assert isinstance(fatal, Fatal) and fatal.code == "auth_refused"   # ... but the key is refused: over


# ---------------------------------------------------------------- rule 3: after a session existed
def test_a_drop_reconnects_at_once_then_backs_off_and_gives_up_after_max_tries() -> None:
    p = opened(LinkRules(URL, max_tries=5))
    acts = p.closed(1011, "server error", 10.0)
    assert acts[0] == ToCore(Disconnected(1011, "server error"))
    assert Publish("engine.status", {"state": "reconnecting", "close_code": 1011}) in acts
    assert acts[-1] == Connect(OPEN_TIMEOUT_S, OPEN_TIMEOUT_S)      # the first try at once
    now = 10.0
    for n in range(1, 5):
        acts = p.failed(REFUSED, now)
        (report,) = only(acts, Publish)
        assert isinstance(report, Publish) and report.payload["code"] == "connect_failed"
        assert report.payload["first_try"] is (n == 1) and URL in report.payload["message"]
        if n < 5:
            (wait,) = only(acts, Wait)
            assert isinstance(wait, Wait) and wait.until_s == pytest.approx(now + BACKOFF_S[n])
            assert p.state is LinkState.BACKOFF
            now = wait.until_s
            assert p.due(now) == [Connect(OPEN_TIMEOUT_S, OPEN_TIMEOUT_S)]
    (fatal,) = p.failed(REFUSED, now)
    assert isinstance(fatal, Fatal) and fatal.code == "gave_up" and "5 tries" in fatal.message
    assert "connection refused" in fatal.message


def test_the_backoff_repeats_its_last_step_and_an_open_socket_resets_the_count() -> None:
    p = opened(LinkRules(URL, backoff_s=(0.0, 1.0, 3.0)))
    p.closed(1006, "", 0.0)
    waits = []
    now = 0.0
    for _ in range(4):
        (wait,) = only(p.failed(REFUSED, now), Wait)
        assert isinstance(wait, Wait)
        waits.append(wait.until_s - now)
        now = wait.until_s
        p.due(now)
    assert waits == [1.0, 3.0, 3.0, 3.0]
    assert p.opened(now) == [ToCore(Connected(reconnect=True, reason="reconnect"))]
    p.closed(1006, "", now)
    (wait,) = only(p.failed(REFUSED, now), Wait)
    assert isinstance(wait, Wait) and wait.until_s - now == 1.0      # counted from the start again


def test_a_resumed_link_retries_from_its_first_socket_and_replays_as_a_restart() -> None:
    p = LinkPolicy(LinkRules(URL, resumed=True))
    assert p.start(0.0) == [Connect(OPEN_TIMEOUT_S, OPEN_TIMEOUT_S)]
    acts = p.failed(REFUSED, 0.0)
    assert not only(acts, Fatal) and only(acts, Wait)
    p.due(1.0)
    assert p.opened(1.0) == [ToCore(Connected(reconnect=True, reason="restart"))]


# ---------------------------------------------------------------- rules 4, 5: what a close means
def test_a_close_without_a_close_frame_is_1006_with_its_reason() -> None:
    p = opened()
    assert p.closed(None, "", 1.0)[0] == ToCore(Disconnected(1006, "connection lost without a close frame"))
    p = opened()
    assert p.closed(None, "ConnectionResetError", 1.0)[0] == ToCore(Disconnected(1006, "ConnectionResetError"))


@pytest.mark.parametrize("code, refused", [(4000, False), (1000, True)])
def test_a_refused_protocol_is_fatal_after_the_core_heard_the_close(code: int, refused: bool) -> None:
    p = opened()
    acts = p.closed(code, "beta", 1.0, protocol_refused=refused)
    assert acts[0] == ToCore(Disconnected(code, "beta"))
    assert isinstance(acts[1], Fatal) and acts[1].code == "protocol_refused" and URL in acts[1].message
    assert len(acts) == 2 and p.state is LinkState.FATAL


# ---------------------------------------------------------------- rule 6: recycling
def test_a_session_is_recycled_at_its_age_only_at_a_quiet_moment_and_reopens_at_once() -> None:
    p = opened(LinkRules(URL, recycle_after_s=100.0), now_s=5.0)
    assert p.recycle_check_s == 105.0
    assert p.tick(50.0, quiet=True) == []                  # too young
    assert p.tick(105.0, quiet=False) == []                # busy: looked at again soon
    assert p.recycle_check_s == pytest.approx(105.0 + RECYCLE_CHECK_S)
    (close,) = p.tick(105.5, quiet=True)
    assert isinstance(close, Close) and close.code == 1000 and p.state is LinkState.RECYCLING
    assert p.tick(106.0, quiet=True) == [] and p.recycle(106.0, "again") == []   # once
    acts = p.closed(1000, "session recycle", 106.0)
    assert acts == [ToCore(Disconnected(1000, "session recycle")), Connect(OPEN_TIMEOUT_S, OPEN_TIMEOUT_S)]
    assert p.opened(106.1) == [ToCore(Connected(reconnect=True, reason="recycle"))]   # no "reconnecting"


def test_a_core_may_ask_for_a_recycle_before_the_age() -> None:
    p = opened()
    (close,) = p.recycle(3.0, "expires soon")
    assert isinstance(close, Close) and "expires soon" in close.reason


# ---------------------------------------------------------------- rule 7: stop
def test_a_stop_closes_an_open_socket_and_nothing_opens_after_it() -> None:
    p = opened()
    assert p.stop() == [Close(1000, "stopping")]
    assert p.closed(1000, "stopping", 1.0) == [ToCore(Disconnected(1000, "stopping"))]   # the core settles
    assert p.final and p.tick(2.0, quiet=True) == []
    q = LinkPolicy(LinkRules(URL))
    q.start(0.0)
    q.stop()
    assert q.opened(0.5) == [Close(1000, "stopping")] and q.state is LinkState.STOPPED   # a connect in flight
    r = opened()
    r.closed(1006, "", 0.0)
    r.failed(REFUSED, 0.0)
    assert r.stop() == [] and r.due(1.0) == []


# ---------------------------------------------------------------- rule 8: the table
def test_an_event_the_state_does_not_allow_raises_and_changes_nothing() -> None:
    p = LinkPolicy(LinkRules(URL))
    with pytest.raises(LinkStateError, match="'opened' is not allowed in state idle"):
        p.opened(0.0)
    assert p.state is LinkState.IDLE
    p = opened()
    with pytest.raises(LinkStateError):
        p.start(0.0)
    assert p.state is LinkState.OPEN
    with pytest.raises(LinkStateError):
        p.failed(REFUSED, 0.0)
    assert p.state is LinkState.OPEN


def test_every_state_can_be_stopped_and_the_final_ones_are_left_by_nothing() -> None:
    for state in LinkState:
        assert (state, "stop") in TRANSITIONS
    for (state, event), targets in TRANSITIONS.items():
        if state in (LinkState.FATAL, LinkState.STOPPED):
            assert targets <= {state}, (state, event, targets)

"""Defects a review of the protocol cores found (R2-R10, P4, P6), each as it showed: command bodies
JSON cannot carry, cost and in-flight updates lost across a restart, replayed items published as
new, endless tool timeouts, handlers that failed halfway, GPT-Live's DTMF and sideband socket
drops. Pure: the cores and the link's apply step, no sockets."""
from __future__ import annotations

import json
from typing import Any, Generic, Mapping, TypeVar

import pytest

from engine.link.backends import REALTIME
from engine.link.policy import LinkRules
from engine.link.shell import ApiLink
from engine.realtime.core import RealtimeCore
from engine.realtime.live_core import LiveCore, LiveState
from engine.realtime.records import Action, Command, Connected, Disconnected, Input, Publish, Send, ServerEvent, Tick
from engine.realtime.tools import Tools, parse_registration

#: gpt-live-1's price, written out here (not read from the code under test)
LIVE_USD_PER_MINUTE = 0.05


def published(acts: list[Any], topic: str) -> list[dict[str, Any]]:
    return [a.payload for a in acts if isinstance(a, Publish) and a.topic == topic]


def sent(acts: list[Any], etype: str | None = None) -> list[dict[str, Any]]:
    return [a.event for a in acts if isinstance(a, Send) and (etype is None or a.event["type"] == etype)]


def encodable(acts: list[Any]) -> None:
    """Every client event the core decided goes on the wire as JSON (the shell's json.dumps)."""
    for event in sent(acts):
        json.dumps(event, allow_nan=False)


C = TypeVar("C", RealtimeCore, LiveCore)


class Core(Generic[C]):
    """A core with the clock the test moves; every Send it decides is checked JSON."""

    def __init__(self, core: C) -> None:
        self.core: C = core
        self.now = 0.0

    def __call__(self, rec: Input) -> list[Any]:
        acts = self.core.handle(rec, self.now, 0)
        encodable(acts)
        return acts

    def ev(self, event: dict[str, Any]) -> list[Any]:
        return self(ServerEvent(event))

    def cmd(self, topic: str, body: dict[str, Any]) -> list[Any]:
        return self(Command(topic, body))


def realtime(connect: bool = True, **kw: Any) -> Core[RealtimeCore]:
    c = Core(RealtimeCore("gpt-realtime", {"type": "realtime"}, **kw))
    if connect:
        c(Connected())
    return c


def live(sideband: bool = False, **kw: Any) -> Core[LiveCore]:
    c = Core(LiveCore("gpt-live-1", {"instructions": "Be brief."}, sideband=sideband, **kw))
    acts = c(Connected())
    if not sideband:
        c.ev({"type": "session.started", "client_event_id": sent(acts)[0]["event_id"],
              "session": {"id": "live_1", "expires_at": 2_000_000_000}})
    return c


def refused(acts: list[Any], cmd_id: str, *words: str) -> dict[str, Any]:
    """The command's one cmd.done, ok false with code bad_command, its error naming ``words``."""
    (done,) = [d for d in published(acts, "cmd.done") if d["id"] == cmd_id]
    assert done["ok"] is False and done.get("code") == "bad_command", done
    for w in words:
        assert w in done["error"], done["error"]
    return done


# ------------------------------------------------------------------ R2: values JSON cannot carry
@pytest.mark.parametrize("connect", [True, False])
def test_r2_a_session_update_holding_binary_is_refused_naming_the_field(connect: bool) -> None:
    """msgpack bin in a session went into the session.update (the shell's json.dumps raised: a
    crash), or, while disconnected, into the state a successor sends on every restart."""
    c = realtime(connect)
    before = dict(c.core.session_config)
    acts = c.cmd("cmd.session.update", {"session": {"audio": {"input": {"noise": b"\x00\x01"}}}, "id": "u1"})
    refused(acts, "u1", "session", "audio.input.noise", "base64")
    assert not sent(acts) and c.core.session_config == before
    assert c.core.history_message().payload["session"] == before


@pytest.mark.parametrize("topic, body, words", [
    ("cmd.tool.register", {"name": "lookup", "parameters": {"type": "object", "x": b"\xff"}}, ("parameters", "x")),
    ("cmd.say", {"text": "hi", "response": {"conversation": "none", "input": [{"type": "message", "b": b"z"}]}},
     ("response", "input[0].b")),
    ("cmd.respond", {"response": {"tool_choice": {"type": "function", "name": "f", "x": b"z"}}},
     ("response", "tool_choice.x")),
    ("cmd.respond", {"response": {"input": [{"type": "message", "n": float("nan")}]}}, ("response", "input[0].n")),
    ("cmd.session.update", {"session": {"tools": [{"type": "function", "name": "f", "p": {b"k": 1}}]}},
     ("session", "tools[0].p")),
])
def test_r2_command_fields_json_cannot_carry_are_refused_at_once(topic: str, body: dict[str, Any],
                                                                 words: tuple[str, ...]) -> None:
    c = realtime()
    acts = c.cmd(topic, {**body, "id": "c1"})
    refused(acts, "c1", *words)
    assert not sent(acts) and not c.core.tools.registered and not c.core.requests.queue


def test_r2_live_session_update_holding_binary_is_refused() -> None:
    c = live()
    acts = c.cmd("cmd.session.update", {"session": {"delegation": {"x": b"\x00"}}, "id": "u1"})
    refused(acts, "u1", "session", "delegation.x")
    assert not sent(acts) and "delegation" not in c.core.session_config


class _StubCore:
    """Decides one client event JSON cannot carry, whatever it is handed."""

    def handle(self, rec: Input, now_s: float, heard: int) -> list[Action]:
        return [Send({"type": "session.update", "event_id": "e1", "session": {"x": b"\x00"}})]

    def next_deadline(self) -> float | None:
        return None


class _Out:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def put(self, text: str, since_s: float = 0.0, latency: Any = None, frames: int = 1) -> bool:
        self.texts.append(text)
        return True


class _Host:
    def __init__(self) -> None:
        self.published: list[Publish] = []

    def heard_index(self, now_s: float) -> int:
        return 0

    def perform(self, act: Any, now_s: float) -> Input | None:
        if isinstance(act, Publish):
            self.published.append(act)
        return None

    def received(self, event: Mapping[str, Any], in_s: float) -> None:
        pass


def test_r2_a_send_the_shell_cannot_encode_is_reported_not_a_crash() -> None:
    host = _Host()
    link = ApiLink(REALTIME, _StubCore(), host, "ws://127.0.0.1:9/v1/realtime", {},  # type: ignore[arg-type]
                   LinkRules(url="ws://127.0.0.1:9/v1/realtime"))
    out = _Out()
    link._out = out  # type: ignore[assignment]   # a socket is up
    link.step(Tick())                               # raised TypeError: the realtime process crashed
    assert out.texts == []
    (err,) = published(host.published, "engine.error")
    assert err["code"] == "unsendable_event" and not err.get("fatal") and "session.update" in err["message"]
    assert not published(host.published, "client.session.update")   # it was not sent


# ------------------------------------------------------------------ R3: cost across a restart
def _restart_realtime(c: Core) -> tuple[Core, list[Any]]:
    state = c.core.history_message().payload
    fresh = Core(RealtimeCore("gpt-realtime", {"type": "realtime"}, budget_usd=c.core.budget.budget_usd))
    acts = fresh.core.restore_history(state)
    return fresh, acts + fresh(Connected(reconnect=True, reason="restart"))


def test_r3_the_cost_and_the_budget_warning_survive_a_restart() -> None:
    c = realtime(budget_usd=0.012)
    c.ev({"type": "session.updated", "session": {"type": "realtime", "audio": {"input": {
        "transcription": {"model": "gpt-4o-mini-transcribe"}}}}})
    c.ev({"type": "response.created", "response": {"id": "r1", "conversation_id": "c"}})
    usage = {"input_token_details": {"text_tokens": 1000}, "output_token_details": {"text_tokens": 400}}
    warned = c.ev({"type": "response.done", "response": {"id": "r1", "status": "completed", "usage": usage,
                                                         "output": []}})
    assert published(warned, "engine.budget") and c.core.budget.warned    # $0.0104 of $0.012: 80 % spent
    c.ev({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i1", "transcript": "hi",
          "usage": {"type": "duration", "seconds": 30}})
    spent = c.core.total_usd()
    assert c.core.budget.transcription_usd > 0 and c.core.budget.responses_usd > 0
    fresh, acts = _restart_realtime(c)
    assert fresh.core.total_usd() == pytest.approx(spent)                  # was $0 after the restart
    assert fresh.core.budget.responses_usd == pytest.approx(c.core.budget.responses_usd)
    assert fresh.core.budget.transcription_usd == pytest.approx(c.core.budget.transcription_usd)
    assert fresh.core.budget.warned and not published(acts, "engine.budget")   # warned once, not again
    assert published(acts, "cost.session")[-1]["usd"] == pytest.approx(spent)


def test_r3_a_transcription_cost_alone_is_in_the_published_state() -> None:
    c = realtime()
    c.ev({"type": "session.updated", "session": {"type": "realtime", "audio": {"input": {
        "transcription": {"model": "gpt-4o-mini-transcribe"}}}}})
    acts = c.ev({"type": "conversation.item.input_audio_transcription.completed", "item_id": "nope",
                 "transcript": "hi", "usage": {"type": "duration", "seconds": 30}})
    (state,) = published(acts, "conversation.history")
    assert c.core.budget.transcription_usd > 0
    assert state["cost"]["transcription_usd"] == pytest.approx(c.core.budget.transcription_usd)


def test_r3_a_bad_cost_in_a_state_is_ignored() -> None:
    fresh = RealtimeCore("gpt-realtime", {"type": "realtime"})
    fresh.restore_history({"cost": {"responses_usd": float("nan"), "transcription_usd": -1, "budget_warned": "x"}})
    assert fresh.total_usd() == 0.0 and fresh.budget.warned is False


def test_r3_live_cost_survives_a_restart() -> None:
    c = live(budget_usd=1.0)
    acts = c.ev({"type": "session.usage.updated", "usage": {"seconds": 60}})
    assert published(acts, "conversation.history")[-1]["cost"]["usd"] == pytest.approx(LIVE_USD_PER_MINUTE)
    c.core.budget_warned = True
    state = c.core.history_message().payload
    fresh = Core(LiveCore("gpt-live-1", {}, budget_usd=1.0))
    restored = fresh.core.restore_history(state)
    assert published(restored, "cost.session")[-1]["usd"] == pytest.approx(LIVE_USD_PER_MINUTE)
    assert fresh.core.budget_warned
    start = fresh(Connected(reconnect=True, reason="restart"))
    fresh.ev({"type": "session.started", "client_event_id": sent(start)[0]["event_id"], "session": {"id": "live_2"}})
    (cost,) = published(fresh.ev({"type": "session.usage.updated", "usage": {"seconds": 30}}), "cost.session")
    assert cost["usd"] == pytest.approx(1.5 * LIVE_USD_PER_MINUTE) and cost["seconds"] == 90   # was $0.025, 30 s


# ------------------------------------------------------------------ R5: a session update in flight at a crash
def test_r5_a_session_update_in_flight_at_a_crash_is_answered_by_the_successor() -> None:
    c = realtime()
    acts = c.cmd("cmd.session.update", {"session": {"instructions": "Be brief."}, "id": "u1"})
    assert sent(acts, "session.update") and not published(acts, "cmd.done")   # waits for session.updated
    fresh, restored = _restart_realtime(c)
    assert published(restored, "cmd.done") == [{"id": "u1", "ok": True, "applied": "on reconnect"}]
    assert sent(restored, "session.update")[0]["session"]["instructions"] == "Be brief."
    assert published(fresh.cmd("cmd.session.update", {"session": {"instructions": "Be brief."}, "id": "u1"}),
                      "cmd.done")[0]["repeated"] is True                         # remembered like any outcome


def test_r5_an_update_confirmed_before_the_crash_is_not_answered_again() -> None:
    c = realtime()
    c.ev({"type": "session.updated", "session": {"type": "realtime"}})           # the connect's own update
    c.cmd("cmd.session.update", {"session": {"instructions": "Be brief."}, "id": "u1"})
    state = c.core.history_message().payload                                    # the state with u1 in flight
    done = c.ev({"type": "session.updated", "session": {"type": "realtime", "instructions": "Be brief."}})
    outcomes = {p["taken"][0]: p["outcomes"][p["taken"][0]] for p in published(done, "intake.taken")}
    fresh = RealtimeCore("gpt-realtime", {"type": "realtime"})
    fresh.restore_outcomes(outcomes)                                            # the broker's hand-over
    assert not published(fresh.restore_history(state), "cmd.done")


# ------------------------------------------------------------------ R6: replayed items are not new user text
def test_r6_a_reconnects_replayed_user_message_is_not_published_as_new_user_text() -> None:
    c = realtime()
    item = {"id": "item_u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    assert published(c.ev({"type": "conversation.item.added", "item": item}), "user.text") == [
        {"text": "hello", "item_id": "item_u1"}]                                 # another client's: published once
    c(Disconnected(1006))
    replay = c(Connected(reconnect=True, reason="reconnect"))
    assert [e["item"]["id"] for e in sent(replay, "conversation.item.create")] == ["item_u1"]
    echo = c.ev({"type": "conversation.item.added", "item": item})               # the server's echo of the replay
    assert not published(echo, "user.text")


def test_r6_a_restarts_replayed_user_message_is_not_published_as_new_user_text() -> None:
    c = realtime()
    item = {"id": "item_u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    c.ev({"type": "conversation.item.added", "item": item})
    fresh, _ = _restart_realtime(c)
    assert not published(fresh.ev({"type": "conversation.item.added", "item": item}), "user.text")


# ------------------------------------------------------------------ R9: tool timeouts that never end
@pytest.mark.parametrize("timeout_s", [float("nan"), float("inf"), 601, 1e308])
def test_r9_a_tool_timeout_that_is_not_finite_or_too_long_is_refused(timeout_s: float) -> None:
    c = realtime()
    acts = c.cmd("cmd.tool.register", {"name": "lookup", "timeout_s": timeout_s, "id": "t1"})
    refused(acts, "t1", "timeout_s", "600")
    assert not c.core.tools.registered
    assert parse_registration({"name": "ok", "timeout_s": 600}).timeout_s == 600.0


@pytest.mark.parametrize("make", [realtime, live])
def test_r9_a_restored_tool_with_a_bad_timeout_is_left_out_and_said_so(make: Any) -> None:
    c = make()
    acts = c.core.restore_history({"tools": [{"name": "lookup", "timeout_s": float("nan"), "owner": "x"},
                                             {"name": "fine", "timeout_s": 3, "owner": "x"}]})
    assert list(c.core.tools.registered) == ["fine"]
    (err,) = published(acts, "engine.error")
    assert "lookup" in err["message"] and "timeout_s" in err["message"] and not err.get("fatal")


# ------------------------------------------------------------------ R10: handlers that fail halfway
def test_r10_a_tool_output_json_cannot_carry_keeps_the_call_open() -> None:
    tools = Tools()
    tools.called("call_1", "lookup", 0.0)
    with pytest.raises(ValueError, match="output"):
        tools.result("call_1", {"data": b"\x00"})
    assert "call_1" in tools.calls                                                # was deleted: the call was lost
    assert tools.result("call_1", {"data": "ok"}) == '{"data": "ok"}'


def test_r10_a_bad_tool_result_is_refused_and_a_good_one_still_answers() -> None:
    c = realtime()
    c.cmd("cmd.tool.register", {"name": "lookup", "id": "t1"})
    c.ev({"type": "response.function_call_arguments.done", "call_id": "call_1", "name": "lookup", "arguments": "{}"})
    refused(c.cmd("cmd.tool.result", {"call_id": "call_1", "output": {"x": b"\x00"}, "id": "r1"}), "r1", "output")
    acts = c.cmd("cmd.tool.result", {"call_id": "call_1", "output": {"x": 1}, "id": "r2"})
    assert published(acts, "cmd.done") == [{"id": "r2", "ok": True}]
    assert sent(acts, "conversation.item.create")[0]["item"]["output"] == '{"x": 1}'


@pytest.mark.parametrize("make", [realtime, live])
def test_r10_a_command_handler_that_fails_past_its_checks_still_answers_the_command(make: Any) -> None:
    c = make()

    def broken(body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        raise RuntimeError("a bug")
    c.core._commands["cmd.mic"] = broken
    acts = c.cmd("cmd.mic", {"open": False, "id": "m1"})
    assert published(acts, "engine.error")[0]["code"] == "handler_failed"
    (done,) = published(acts, "cmd.done")
    assert done["id"] == "m1" and done["ok"] is False and done["code"] == "handler_failed" and "a bug" in done["error"]
    (taken,) = published(acts, "intake.taken")
    assert taken["taken"] == ["m1"] and taken["outcomes"]["m1"]["done"] == done
    keyless = c(Command("cmd.mic", {"open": False, "pub": "p", "seq": 7}))       # no id: the key is let go
    assert published(keyless, "intake.taken")[0]["taken"] == ["p#7"] and not published(keyless, "cmd.done")


# ------------------------------------------------------------------ P6: GPT-Live DTMF that fails
def test_p6_a_dtmf_key_the_server_refuses_fails_its_command_once() -> None:
    c = live(sideband=True)
    acts = c.cmd("cmd.dtmf", {"keys": "12#", "id": "d1"})
    first, second, last = (e["event_id"] for e in sent(acts, "transport.dtmf.send"))
    err = c.ev({"type": "error", "error": {"code": "dtmf_failed", "message": "the trunk refused it",
                                           "client_event_id": first}})
    (done,) = published(err, "cmd.done")
    assert done == {"id": "d1", "ok": False, "error": "the trunk refused it", "code": "dtmf_failed"}
    assert published(err, "engine.error")[0]["request_id"] == "d1"
    later = c.ev({"type": "transport.dtmf.sent", "event": "#", "client_event_id": last})
    later += c.ev({"type": "error", "error": {"code": "dtmf_failed", "message": "again", "client_event_id": second}})
    assert not published(later, "cmd.done") and not c.core.sent_dtmf


def test_p6_a_dtmf_command_is_done_when_every_key_reached_the_trunk() -> None:
    c = live(sideband=True)
    acts = c.cmd("cmd.dtmf", {"keys": "12", "id": "d1"})
    first, last = (e["event_id"] for e in sent(acts, "transport.dtmf.send"))
    assert not published(c.ev({"type": "transport.dtmf.sent", "event": "2", "client_event_id": last}), "cmd.done")
    assert published(c.ev({"type": "transport.dtmf.sent", "event": "1", "client_event_id": first}),
                     "cmd.done") == [{"id": "d1", "ok": True, "key": "1"}]


# ------------------------------------------------------------------ P4: a sideband's socket drop
def test_p4_a_sideband_socket_drop_keeps_the_sessions_usage_context_and_delegations() -> None:
    c = live(sideband=True)
    c.cmd("cmd.tool.register", {"name": "lookup", "id": "t1"})
    c.ev({"type": "session.usage.updated", "usage": {"seconds": 60}})
    ctx = c.cmd("cmd.commentary", {"text": "The booking is ZX9.", "id": "c1"})
    assert sent(ctx, "session.commentary.append")
    c.ev({"type": "session.delegation.created", "delegation": {"id": "del_1", "target": "client"}})
    c(Disconnected(1006))
    again = c(Connected(reconnect=True, reason="reconnect"))
    assert c.core.state is LiveState.ACTIVE
    assert not sent(again, "session.commentary.append")                          # placed by the session, not re-sent
    (cost,) = published(c.ev({"type": "session.usage.updated", "usage": {"seconds": 90}}), "cost.session")
    assert cost["usd"] == pytest.approx(1.5 * LIVE_USD_PER_MINUTE)               # was $0.125: 60 s counted twice
    answer = c.cmd("cmd.tool.result", {"call_id": "del_1", "output": "It is sunny.", "id": "r1"})
    assert sent(answer, "session.commentary.append")[0]["delegation_id"] == "del_1"   # the session still waits


def test_p4_a_normal_live_drop_still_counts_the_old_sessions_usage() -> None:
    c = live()
    c.ev({"type": "session.usage.updated", "usage": {"seconds": 60}})
    c(Disconnected(1006))
    start = c(Connected(reconnect=True, reason="reconnect"))
    c.ev({"type": "session.started", "client_event_id": sent(start)[0]["event_id"], "session": {"id": "live_2"}})
    (cost,) = published(c.ev({"type": "session.usage.updated", "usage": {"seconds": 30}}), "cost.session")
    assert cost["usd"] == pytest.approx(1.5 * LIVE_USD_PER_MINUTE)



# ------------------------------------------------------------------ GPT-Live: session updates across a restart
def test_live_session_updates_survive_a_restart_and_one_in_flight_is_answered() -> None:
    """The GPT-Live core's state held neither its session's changed settings nor the updates in
    flight: a restart lost a cmd.session.update (delegation, triggers) and left one unanswered."""
    c = live()
    acts = c.cmd("cmd.session.update", {"session": {"triggers": [{"type": "keyword", "keywords": ["agent"]}]},
                                        "id": "t1"})
    assert sent(acts, "session.update") and not published(acts, "cmd.done")      # waits for session.updated
    state = published(acts, "conversation.history")[-1] if published(acts, "conversation.history") \
        else c.core.history_message().payload
    fresh = Core(LiveCore("gpt-live-1", {"instructions": "Be brief."}))
    restored = fresh.core.restore_history(state)
    assert published(restored, "cmd.done") == [{"id": "t1", "ok": True, "applied": "on start"}]
    start = sent(fresh(Connected(reconnect=True, reason="restart")), "session.start")[0]
    assert start["session"]["triggers"] == [{"type": "keyword", "keywords": ["agent"]}]


def test_a_live_session_update_in_flight_when_the_session_ends_is_answered() -> None:
    c = live()
    c.cmd("cmd.session.update", {"session": {"triggers": []}, "id": "t2"})
    acts = c(Disconnected(1006))
    assert {"id": "t2", "ok": True, "applied": "on start"} in published(acts, "cmd.done")


def test_a_live_session_update_the_server_refuses_is_taken_back() -> None:
    """A refused GPT-Live session.update stayed in the config: the next session.start (a renewal, a
    restarted process) carried it, the start was refused, and that is fatal (the review)."""
    c = live()
    good = sent(c.cmd("cmd.session.update", {"session": {"triggers": []}, "id": "g"}), "session.update")[0]
    c.ev({"type": "session.updated", "client_event_id": good["event_id"], "session": {"id": "live_1"}})
    bad = sent(c.cmd("cmd.session.update", {"session": {"triggers": [{"type": "nonsense"}]}, "id": "b"}),
               "session.update")[0]
    acts = c.ev({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_value",
                                            "message": "bad trigger", "client_event_id": bad["event_id"]}})
    assert {"id": "b", "ok": False, "error": "bad trigger", "code": "invalid_value"} in published(acts, "cmd.done")
    assert c.core.session_config["triggers"] == []                       # the confirmed value, not the refused one
    assert published(acts, "conversation.history")[-1]["session"] == {"triggers": []}   # a successor starts so
    assert c.core.history_message().payload["session"] == {"triggers": []}
    assert c.core.start_event()["session"]["triggers"] == []


def test_a_live_mute_in_flight_at_a_crash_is_answered_by_the_successor() -> None:
    c = live()
    c.cmd("cmd.mic", {"open": False, "id": "m1"})
    state = c.core.history_message().payload
    fresh = Core(LiveCore("gpt-live-1", {"instructions": "Be brief."}))
    restored = fresh.core.restore_history(state)
    assert {"id": "m1", "ok": True, "applied": "on start"} in published(restored, "cmd.done")
    again = fresh.cmd("cmd.mic", {"open": False, "id": "m1"})                 # the client's copy: its outcome again
    assert [d.get("code") for d in published(again, "cmd.done")] != ["id_reused"]


def test_a_sideband_drop_sends_the_updates_still_in_flight_again() -> None:
    """A SIP call's GPT-Live session outlives its socket: an update unconfirmed when the socket
    dropped was never answered, and the client re-sent it until its timeout (the review)."""
    c = live(sideband=True)
    c.ev({"type": "session.started", "session": {"id": "live_1"}})
    first = sent(c.cmd("cmd.session.update", {"session": {"triggers": []}, "id": "u1"}), "session.update")
    assert first
    c(Disconnected(1006))
    again = sent(c(Connected(reconnect=True)), "session.update")
    assert [u["session"] for u in again] == [{"triggers": []}] and again[0]["event_id"] != first[0]["event_id"]
    done = c.ev({"type": "session.updated", "client_event_id": again[0]["event_id"], "session": {"id": "live_1"}})
    assert {"id": "u1", "ok": True} in published(done, "cmd.done")

"""The GPT-Live core, fed hand-made event sequences as if from the socket. No I/O: the clock and
the heard index are given with each record. Every client event it sends is checked against the
official SDK's ``openai.types.live.ClientEventParam``."""
from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from bus.intake import Intake
from engine.errors import ConfigError
from engine.realtime.live_core import (INPUT_MESSAGES, LIVE_COMMAND_TOPICS, NOT_ON_LIVE, TRANSITIONS, LiveCore,
                                       LiveState, newest_within_limits, pick_tool)
from engine.realtime.records import (Command, Connected, Disconnected, EndOfAudio, Ending, MicAudio, Play,
                                     PlaybackReport, Publish, Reconnect, Send, SendAudio, ServerEvent, Tick)

live_types = pytest.importorskip("openai.types.live")
from pydantic import TypeAdapter  # noqa: E402

CLIENT_EVENT = TypeAdapter(live_types.ClientEventParam)
#: gpt-live-1's price, written out here (not read from the code under test)
USD_PER_MINUTE = 0.05


class Harness:
    def __init__(self, model: str = "gpt-live-1", config: dict[str, Any] | None = None, **kw: Any) -> None:
        self.core = LiveCore(model, config or {"instructions": "Be brief.", "audio": {"output": {"voice": "cedar"}}},
                             **kw)
        self.now = 100.0
        self.heard = 0
        self.ids = 0
        self.broker = Intake()   #: the broker's intake, fed what this core publishes to it (its hand-over)

    def __call__(self, rec: Any) -> list[Any]:
        acts = self.core.handle(rec, self.now, self.heard)
        for a in acts:
            if isinstance(a, Publish) and a.topic in ("conversation.history", "intake.taken"):
                self.broker.state(a.payload)
        for a in acts:
            if isinstance(a, Send):   # every event the core sends is a valid GPT-Live client event
                CLIENT_EVENT.validate_python(a.event)
        return acts

    def ev(self, event: dict[str, Any]) -> list[Any]:
        self.ids += 1
        return self(ServerEvent({"event_id": f"ev_{self.ids}", **event}))

    def cmd(self, topic: str, body: dict[str, Any], offered: bool = False) -> list[Any]:
        return self(Command(topic, body, offered))

    def started(self) -> list[Any]:
        acts = self(Connected())
        acts += self.ev({"type": "session.started", "client_event_id": sent(acts)[0]["event_id"],
                         "session": {"id": "live_abc", "model": "gpt-live-1", "status": "active",
                                     "expires_at": 2_000_000_000}})
        return acts

    def fragment(self, who: str, text: str, start_ms: int, end_ms: int) -> list[Any]:
        etype = "session.input_transcript.delta" if who == "user" else "session.output_transcript.delta"
        return self.ev({"type": etype, "delta": text, "start_ms": start_ms, "end_ms": end_ms})


def sent(acts: list[Any], etype: str | None = None) -> list[dict[str, Any]]:
    return [a.event for a in acts if isinstance(a, Send) and (etype is None or a.event["type"] == etype)]


def published(acts: list[Any], topic: str) -> list[dict[str, Any]]:
    return [a.payload for a in acts if isinstance(a, Publish) and a.topic == topic]


def audio(ms: int, loud_from_ms: int | None = None) -> str:
    frames = ms * 24
    pcm = bytearray(frames * 2)
    if loud_from_ms is not None:
        for i in range(loud_from_ms * 24, frames):
            pcm[2 * i:2 * i + 2] = (3000).to_bytes(2, "little", signed=True)
    return base64.b64encode(bytes(pcm)).decode()


# ------------------------------------------------------------------ the table
def test_the_transition_table_names_every_state_and_only_known_inputs() -> None:
    states = {s for pair in TRANSITIONS for s in (pair[0],)} | set(TRANSITIONS.values())
    assert states == set(LiveState)
    inputs = {what for _, what in TRANSITIONS}
    assert inputs == {"connected", "attached", "session.started", "error", "disconnected", "close", "end", "renew",
                      "closed for good", "budget spent",
                      "session.closed"}


def test_a_realtime_model_is_refused_naming_the_live_models() -> None:
    with pytest.raises(ConfigError, match="gpt-live-1"):
        LiveCore("gpt-realtime", {})


# ------------------------------------------------------------------ starting
def test_the_socket_opening_sends_only_session_start_with_the_config() -> None:
    h = Harness()
    acts = h(Connected())
    (start,) = sent(acts)
    assert start["type"] == "session.start"
    assert start["session"] == {"model": "gpt-live-1", "instructions": "Be brief.",
                                "audio": {"format": {"type": "audio/pcm", "rate": 24000}, "output": {"voice": "cedar"}}}
    assert h.core.state is LiveState.STARTING
    # nothing else goes out before session.started: not the mic, not context
    assert h(MicAudio(b"\x00" * 960, h.now)) == []
    assert sent(h.cmd("cmd.say", {"text": "The booking is ZX9.", "role": "system", "id": "c1"})) == []


def test_context_sent_before_the_session_started_goes_out_after_it_in_order() -> None:
    h = Harness()
    h(Connected())
    h.cmd("cmd.say", {"text": "The booking is ZX9.", "role": "system", "id": "c1"})
    h.cmd("cmd.instructions", {"text": "Speak French.", "id": "c2"})
    acts = h.ev({"type": "session.started", "session": {"id": "live_1"}})
    assert [(e["type"], e["content"]) for e in sent(acts)] == [
        ("session.thinking.append", "The booking is ZX9."), ("session.instructions.append", "Speak French.")]
    assert published(acts, "engine.status")[0]["state"] == "connected"


def test_an_error_before_session_started_refuses_the_session_for_good() -> None:
    h = Harness()
    h(Connected())
    acts = h.ev({"type": "error", "error": {"type": "invalid_request_error", "code": "model_not_found",
                                            "message": "no such model"}})
    (err,) = published(acts, "engine.error")
    assert err["fatal"] is True and err["code"] == "model_not_found"
    assert h.core.protocol_refused
    assert h(Disconnected(1000)) == []


# ------------------------------------------------------------------ audio
def test_the_output_track_is_one_stream_until_the_session_ends() -> None:
    h = Harness()
    h.started()
    first = h.ev({"type": "session.output_audio.delta", "delta": audio(100)})
    second = h.ev({"type": "session.output_audio.delta", "delta": audio(100)})
    plays = [a for a in first + second if isinstance(a, Play)]
    assert [p.starts_item for p in plays] == [True, False]
    assert all(len(p.pcm) == 4800 for p in plays)
    assert not any(isinstance(a, EndOfAudio) for a in first + second)
    assert not published(first, "server.session.output_audio.delta")   # audio is for the ring, not the bus
    assert any(isinstance(a, EndOfAudio) for a in h(Disconnected(1006)))


def test_with_no_mic_at_all_silence_starts_at_once_whatever_the_clock_reads() -> None:
    """Text only on a machine up 5 hours (monotonic 18655.655 s): ``now - (now - 0.1)`` is
    0.09999999999854481 < 0.1, so the first keepalive never went out; its deadline stayed in the
    past and the link's timer spun (540,000 ticks in 6 s) while the session clock never moved, so
    no context was ever placed."""
    h = Harness()
    h.now = 18655.655071114
    h.started()
    due = h.core.next_deadline()
    assert due is not None and due <= h.now
    silences = [x for x in h(Tick()) if isinstance(x, SendAudio)]
    assert len(silences) == 1 and len(silences[0].pcm) == 2 * 2400   # 100 ms at 24 kHz
    nxt = h.core.next_deadline()
    assert nxt is not None and nxt > h.now   # the next one is in the future: no spinning timer


def test_mic_audio_streams_once_active_and_silence_keeps_the_clock_moving_without_it() -> None:
    h = Harness()
    h.started()
    (a,) = h(MicAudio(b"\x01\x00" * 480, h.now))
    assert isinstance(a, SendAudio) and len(a.pcm) == 960
    h.now += 0.3   # no mic for 300 ms (text only, or a file that ended)
    due = h.core.next_deadline()
    assert due is not None and due <= h.now
    silences = [x for x in h(Tick()) if isinstance(x, SendAudio)]
    assert len(silences) == 1 and silences[0].pcm == b"\x00\x00" * 7200


def test_a_phone_callers_late_frames_are_not_taken_for_a_stopped_mic() -> None:
    """A phone's media stream never stops while the call is up, but its frames can come 150 ms
    late: at the 100 ms keepalive, 100 ms of silence went in between the caller's words, and the
    real frames followed it (the session's timeline ran ahead of the call). The bridge sets the
    network keepalive: silence only after a second without audio."""
    from engine.realtime.live_core import NETWORK_KEEPALIVE_S
    h = Harness(audio_format="audio/pcmu")
    h.core.keepalive_s = NETWORK_KEEPALIVE_S
    h.started()
    h(MicAudio(b"\x10" * 160, h.now))
    h.now += 0.15                                        # the next frame is 150 ms late
    assert not [x for x in h(Tick()) if isinstance(x, SendAudio)]
    h.now += 1.0                                         # the stream stopped: silence keeps the clock
    silences = [x for x in h(Tick()) if isinstance(x, SendAudio)]
    assert len(silences) == 1 and set(silences[0].pcm) == {0xFF}
    # from then on silence goes in at the mic's pace, every 100 ms (the review: at 1 s ticks of at
    # most 0.5 s, the session's clock ran at half speed)
    sent_frames, since = 0, h.now
    for _ in range(50):
        due = h.core.next_deadline()
        assert due is not None
        h.now = max(h.now, due)
        sent_frames += sum(len(x.pcm) for x in h(Tick()) if isinstance(x, SendAudio))
    assert sent_frames / 8000 >= 0.95 * (h.now - since) and h.now - since < 6   # real time, in 100 ms ticks
    h(MicAudio(b"\x10" * 160, h.now))                   # the caller again: late frames are tolerated again
    h.now += 0.15
    assert not [x for x in h(Tick()) if isinstance(x, SendAudio)]


# ------------------------------------------------------------------ transcripts and turns
def test_fragments_are_grouped_into_turns_and_the_history_keeps_them() -> None:
    h = Harness()
    h.started()
    acts = h.fragment("user", "Where is", 600, 800) + h.fragment("user", " the car?", 800, 1000)
    assert [p["text"] for p in published(acts, "user.transcript.delta")] == ["Where is", " the car?"]
    assert len(published(acts, "live.transcript.fragment")) == 2
    assert published(acts, "user.speech.started")
    assert not published(acts, "user.transcript.done")
    h.now += 0.9   # no fragment for longer than the turn gap
    done = h(Tick())
    (turn,) = published(done, "user.transcript.done")
    assert turn["text"] == "Where is the car?" and turn["reason"] == "inactivity"
    assert published(done, "conversation.history")[-1]["items"] == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Where is the car?"}]}]
    model = h.fragment("model", "At desk", 1400, 1600) + h.fragment("model", " four.", 3800, 4000)
    (first_model_turn,) = published(model, "model.transcript.done")   # a gap over 2,000 ms of timeline
    assert first_model_turn["text"] == "At desk" and first_model_turn["reason"] == "gap"


def test_a_model_pausing_mid_reply_on_a_busy_machine_stays_one_turn() -> None:
    """CI, under load: the model's reply "...collected at" / 1 s pause / "Northern Train Station"
    came as three model.transcript.done (800 ms of silence closed the turn). The model's silence
    is the SDK grouper's 2 s; the user's stays 800 ms."""
    h = Harness()
    h.started()
    h.fragment("model", "The car is collected at", 4200, 7600)
    h.now += 1.2   # the fragments come late: the machine is busy, the model paused on the timeline
    acts = h(Tick()) + h.fragment("model", " Northern", 8600, 8800)
    assert not published(acts, "model.transcript.done")
    h.now += 1.0
    acts = h(Tick()) + h.fragment("model", " Train Station.", 9400, 10000)
    assert not published(acts, "model.transcript.done")
    h.now += 2.1
    (turn,) = published(h(Tick()), "model.transcript.done")
    assert turn["text"] == "The car is collected at Northern Train Station." and turn["reason"] == "inactivity"


def test_a_reconnect_starts_a_new_session_told_the_conversation_so_far() -> None:
    h = Harness()
    h.started()
    h.fragment("user", "Hello", 0, 200)
    h.now += 1
    h(Tick())
    h.cmd("cmd.say", {"text": "Ada is a gold member.", "role": "system", "id": "c1"})
    acts = h(Disconnected(1006))
    assert published(acts, "engine.status")[0]["state"] == "disconnected"
    h.cmd("cmd.commentary", {"text": "Welcome back.", "id": "c2"})  # said during the outage
    acts = h(Connected(reconnect=True, reason="reconnect"))
    (start,) = sent(acts)
    assert start["session"]["input"] == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}]
    acts = h.ev({"type": "session.started", "session": {"id": "live_2"}})
    # the append the old session never placed, then the one sent during the outage: after the history
    assert [e["content"] for e in sent(acts)] == ["Ada is a gold member.", "Welcome back."]


def test_the_new_session_gets_at_most_128_messages_of_history() -> None:
    h = Harness()
    h.core.restore_history({"items": [{"type": "message", "role": "system", "content": [
        {"type": "input_text", "text": f"fact {i}"}]} for i in range(200)]})
    (start,) = sent(h(Connected()))
    msgs = start["session"]["input"]
    assert len(msgs) == INPUT_MESSAGES and msgs[-1]["content"][0]["text"] == "fact 199"
    assert {m["role"] for m in msgs} == {"developer"}   # Realtime's system role is Live's developer


def test_the_new_session_gets_the_newest_history_within_the_input_token_limit() -> None:
    """128 long turns render far past the API's 8,192 input tokens: that start was refused, and a
    long call lost its conversation with its session. The newest that fit (by estimate) go."""
    h = Harness()
    turn = "word " * 400                                  # 2,000 characters: about 500 tokens
    h.core.restore_history({"items": [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": f"{i} {turn}"}]} for i in range(128)]})
    (start,) = sent(h(Connected()))
    msgs = start["session"]["input"]
    assert 5 <= len(msgs) <= 16 and msgs[-1]["content"][0]["text"].startswith("127 ")
    assert sum(len(m["content"][0]["text"]) for m in msgs) // 4 <= 8192 - 1024   # room for the rendering
    # one newest message too long alone is left out, not the whole history; other scripts count a
    # token a character (4 ASCII characters a token undercounts them)
    def msg(text: str) -> dict[str, Any]:
        return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    assert newest_within_limits([msg("old"), msg("x" * 40_000)]) == [msg("old")]
    assert len(newest_within_limits([msg("車" * 1000)] * 10)) == 6


# ------------------------------------------------------------------ commands
def test_context_is_acked_when_the_server_places_it_and_refused_with_its_error() -> None:
    h = Harness()
    h.started()
    (ev,) = sent(h.cmd("cmd.commentary", {"text": "Say hello to Ada.", "id": "c1"}))
    assert ev["type"] == "session.commentary.append" and ev["delegation_id"] is None
    acts = h.ev({"type": "session.commentary.appended", "client_event_id": ev["event_id"], "start_ms": 400,
                 "end_ms": 400})
    assert published(acts, "cmd.done") == [{"id": "c1", "ok": True, "start_ms": 400, "end_ms": 400}]
    (ev2,) = sent(h.cmd("cmd.instructions", {"text": "x", "id": "c2"}))
    acts = h.ev({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_value",
                                            "message": "Context append text must not exceed 500 tokens.",
                                            "param": "content", "client_event_id": ev2["event_id"]}})
    (ack,) = published(acts, "cmd.done")
    assert ack["id"] == "c2" and ack["ok"] is False and "500 tokens" in ack["error"]


def test_a_long_append_is_refused_at_once_naming_the_limit() -> None:
    h = Harness()
    h.started()
    acts = h.cmd("cmd.instructions", {"text": "word " * 1000, "id": "c1"})
    assert sent(acts) == []
    (ack,) = published(acts, "cmd.done")
    assert ack["ok"] is False and "500 tokens" in ack["error"]


@pytest.mark.parametrize("topic", sorted(NOT_ON_LIVE))
def test_a_command_live_cannot_do_is_refused_naming_the_alternative(topic: str) -> None:
    h = Harness()
    h.started()
    acts = h.cmd(topic, {"id": "c1"})
    (ack,) = published(acts, "cmd.done")
    assert ack["ok"] is False and "GPT-Live" in ack["error"] and topic in ack["error"]
    assert sent(acts) == []


def test_a_user_text_message_is_refused_naming_speech_and_the_context_commands() -> None:
    h = Harness()
    h.started()
    (ack,) = published(h.cmd("cmd.say", {"text": "What time is it?", "id": "c1"}), "cmd.done")
    assert ack["ok"] is False
    assert "cmd.commentary" in ack["error"] and "role system" in ack["error"]
    assert "cmd.commentary" in LIVE_COMMAND_TOPICS


def test_the_mic_command_mutes_with_lives_own_mute() -> None:
    h = Harness()
    h.started()
    (ev,) = sent(h.cmd("cmd.mic", {"open": False, "id": "m1"}))
    assert ev["type"] == "session.input_audio.mute"
    acts = h.ev({"type": "session.input_audio.muted", "client_event_id": ev["event_id"]})
    assert published(acts, "cmd.done") == [{"id": "m1", "ok": True, "open": False}]
    assert published(acts, "input.mic") == [{"open": False}]


def test_only_delegation_and_triggers_can_change_mid_session() -> None:
    h = Harness()
    h.started()
    (ack,) = published(h.cmd("cmd.session.update", {"session": {"instructions": "x"}, "id": "u1"}), "cmd.done")
    assert ack["ok"] is False and "instructions" in ack["error"]
    (ev,) = sent(h.cmd("cmd.session.update", {"session": {"triggers": []}, "id": "u2"}))
    acts = h.ev({"type": "session.updated", "client_event_id": ev["event_id"], "session": {"id": "live_abc"}})
    assert published(acts, "cmd.done") == [{"id": "u2", "ok": True}]


# ------------------------------------------------------------------ delegation
def test_a_delegation_goes_to_the_bus_tool_and_its_answer_is_spoken_as_commentary() -> None:
    h = Harness()
    h.started()
    h.cmd("cmd.tool.register", {"name": "collection_point", "description": "Where a booking's car is collected.",
                                "parameters": {"type": "object", "properties": {"booking": {"type": "string"}},
                                               "required": ["booking"]}, "owner": "crm"})
    h.cmd("cmd.tool.register", {"name": "weather", "description": "The weather forecast.", "owner": "crm"})
    h.fragment("user", "Where is the collection point", 0, 200)
    h.fragment("user", " for my car?", 200, 400)
    acts = h.ev({"type": "session.delegation.created", "offset_ms": 600,
                 "delegation": {"id": "item_d1", "type": "delegation", "target": "client"}})
    (call,) = published(acts, "tool.call")
    assert call["name"] == "collection_point" and call["call_id"] == "item_d1" and call["delegation"] is True
    args = json.loads(call["arguments"])
    assert args["request"] == "Where is the collection point for my car?" and args["booking"] == args["request"]
    acts = h.cmd("cmd.tool.result", {"call_id": "item_d1", "output": "Northern Train Station, desk 4", "id": "r1"})
    (ev,) = sent(acts)
    assert ev["type"] == "session.commentary.append" and ev["delegation_id"] == "item_d1"
    assert ev["content"] == "Northern Train Station, desk 4"
    assert published(acts, "cmd.done") == [{"id": "r1", "ok": True}]
    # a second answer is late: ignored
    assert sent(h.cmd("cmd.tool.result", {"call_id": "item_d1", "output": "x", "id": "r2"})) == []


def test_a_delegation_nobody_answers_is_told_to_the_model_in_time() -> None:
    h = Harness()
    h.started()
    h.cmd("cmd.tool.register", {"name": "lookup", "timeout_s": 2, "owner": "crm"})
    h.ev({"type": "session.delegation.created", "offset_ms": 0,
          "delegation": {"id": "item_d2", "type": "delegation", "target": "client"}})
    h.now += 2.1
    acts = h(Tick())
    (ev,) = sent(acts, "session.commentary.append")
    assert ev["delegation_id"] == "item_d2"
    assert published(acts, "engine.error")[0]["code"] == "tool_timeout"


def test_a_tool_result_after_the_session_was_renewed_goes_as_plain_commentary() -> None:
    """The old session's delegation id went to the new session, which refuses ids it does not know
    (the answer was lost); and an append not yet placed when the session expired was failed,
    though the docs say context is placed after a renewal."""
    h = Harness()
    h.started()
    h.cmd("cmd.tool.register", {"name": "lookup", "timeout_s": 30, "owner": "crm"})
    h.ev({"type": "session.delegation.created", "offset_ms": 0,
          "delegation": {"id": "item_d1", "type": "delegation", "target": "client"}})
    (fact,) = sent(h.cmd("cmd.say", {"text": "Ada is a gold member.", "role": "system", "id": "s1"}))
    # the API says it will not place it, before its session.closed (live-protocol.md 6.2)
    acts = h.ev({"type": "error", "error": {"type": "invalid_request_error", "code": "context_injection_incomplete",
                                            "message": "The session closed before this thinking append was placed.",
                                            "client_event_id": fact["event_id"]}})
    acts += h.ev({"type": "session.closed", "reason": "expired", "session": {"id": "live_abc"},
                  "usage": {"seconds": 7200}})
    assert not published(acts, "cmd.done")               # not failed: it waits for the next session
    # the answer comes while the new session starts: it waits, without the old id
    assert sent(h.cmd("cmd.tool.result", {"call_id": "item_d1", "output": "Desk 4", "id": "r1"})) == []
    h(Disconnected(1000))
    h(Connected(reconnect=True))
    acts = h.ev({"type": "session.started", "session": {"id": "live_2"}})
    assert [(e["type"], e["content"], e["delegation_id"]) for e in sent(acts)] == [
        ("session.thinking.append", fact["content"], None), ("session.commentary.append", "Desk 4", None)]
    h.now += 31                                          # the old delegation's deadline: no commentary
    acts = h(Tick())
    assert not sent(acts, "session.commentary.append") and published(acts, "engine.error") == []


def test_a_delegation_with_no_tool_registered_is_answered_at_once() -> None:
    h = Harness()
    h.started()
    acts = h.ev({"type": "session.delegation.created", "offset_ms": 0,
                 "delegation": {"id": "item_d3", "type": "delegation", "target": "client"}})
    (ev,) = sent(acts, "session.commentary.append")
    assert ev["delegation_id"] == "item_d3"
    assert published(acts, "tool.call")[0]["registered"] is False


def test_pick_tool_prefers_the_tool_whose_words_match_the_request() -> None:
    from engine.realtime.tools import Tools, parse_registration
    tools = Tools()
    for name, desc in (("weather", "Forecast for a city."), ("collection_point", "Where the car is collected.")):
        tools.register(parse_registration({"name": name, "description": desc, "owner": "x"}))
    assert pick_tool(tools, "where do I collect the car") == "collection_point"
    assert pick_tool(tools, "is it raining in the city") == "weather"


# ------------------------------------------------------------------ cost, budget, end
def test_cost_comes_from_the_cumulative_seconds_across_sessions() -> None:
    h = Harness()
    h.started()
    (cost,) = published(h.ev({"type": "session.usage.updated", "usage": {"seconds": 30}}), "cost.session")
    assert cost["usd"] == pytest.approx(30 / 60 * USD_PER_MINUTE)
    (cost,) = published(h.ev({"type": "session.usage.updated", "usage": {"seconds": 45}}), "cost.session")
    assert cost["usd"] == pytest.approx(45 / 60 * USD_PER_MINUTE)   # cumulative: never summed
    h(Disconnected(1006))
    h(Connected(reconnect=True))
    h.ev({"type": "session.started", "session": {"id": "live_2"}})
    (cost,) = published(h.ev({"type": "session.usage.updated", "usage": {"seconds": 15}}), "cost.session")
    assert cost["usd"] == pytest.approx(60 / 60 * USD_PER_MINUTE) and cost["seconds"] == 60


def test_the_budget_closes_the_session() -> None:
    h = Harness(budget_usd=0.05)
    h.started()
    acts = h.ev({"type": "session.usage.updated", "usage": {"seconds": 60}})
    assert sent(acts, "session.close")
    assert published(acts, "engine.budget")[0]["exceeded"] is True
    assert h.core.state is LiveState.CLOSING
    acts = h.ev({"type": "session.closed", "reason": "close_requested", "session": {"id": "live_abc"},
                 "usage": {"seconds": 61}})
    assert not any(isinstance(a, Reconnect) for a in acts)
    assert published(acts, "engine.status")[0] == {"state": "session_closed", "reason": "close_requested",
                                                    "session_id": "live_abc"}
    # the spent budget ends the host once, after the last usage: before, the server's close of the
    # socket made the link reconnect and the core start a new session at once (and spend again)
    (end,) = published(acts, "engine.error")
    assert end["code"] == "budget_exceeded" and end["fatal"] is True and "$0.0500" in end["message"]
    assert h.core.state is LiveState.SPENT
    assert h(Disconnected(1000)) == []
    assert h(Connected(reconnect=True)) == []          # a socket the link opened anyway: no session.start
    assert h(Disconnected(1006)) == []


def test_a_budget_close_cut_short_by_the_socket_still_ends_the_host() -> None:
    h = Harness(budget_usd=0.05)
    h.started()
    assert sent(h.ev({"type": "session.usage.updated", "usage": {"seconds": 60}}), "session.close")
    acts = h(Disconnected(1006))                        # no session.closed came
    assert [e["code"] for e in published(acts, "engine.error")] == ["budget_exceeded"]
    assert h.core.state is LiveState.SPENT and h(Connected(reconnect=True)) == []


def test_the_hosts_end_closes_the_session_for_its_last_usage_and_nothing_reopens() -> None:
    h = Harness()
    h.started()
    (close,) = sent(h(Ending()))
    assert close["type"] == "session.close" and h.core.ending
    acts = h.ev({"type": "session.closed", "reason": "close_requested", "session": {"id": "live_abc"},
                 "usage": {"seconds": 7}})
    assert published(acts, "cost.session")[0]["seconds"] == 7
    assert not any(isinstance(a, Reconnect) for a in acts) and not published(acts, "engine.error")
    assert h.core.state is LiveState.ENDED and not h.core.ending
    assert h(Ending()) == []                            # no session: nothing to close
    assert h(Disconnected(1000)) == [] and h(Connected(reconnect=True)) == []   # and none starts again
    side = Harness(sideband=True)
    side(Connected())
    assert side(Ending()) == []                         # a SIP call's session is the call's, not ours


def test_a_session_that_expires_while_the_host_ends_is_not_renewed() -> None:
    h = Harness()
    h.started()
    h(Ending())
    acts = h.ev({"type": "session.closed", "reason": "expired", "session": {"id": "live_abc"},
                 "usage": {"seconds": 7200}})
    assert not any(isinstance(a, Reconnect) for a in acts) and h.core.state is LiveState.ENDED


def test_a_session_is_renewed_at_a_quiet_moment_before_it_expires() -> None:
    """At ``expires_at`` the server cuts the model mid-sentence and the user's words meanwhile
    are lost (the review). From RENEW_BEFORE_S before it, the first quiet moment renews it."""
    from engine.realtime.live_core import RENEW_BEFORE_S, RENEW_CHECK_S, RENEW_REPLY_WAIT_S
    wall = 1_000_000.0
    h = Harness(wall_clock=lambda: wall)
    acts = h(Connected())
    h.ev({"type": "session.started", "client_event_id": sent(acts)[0]["event_id"],
          "session": {"id": "live_abc", "model": "gpt-live-1", "status": "active", "expires_at": wall + 300}})
    renew_at = h.now + 300 - RENEW_BEFORE_S
    assert h.core.renew_from_s == pytest.approx(renew_at)
    h.now = renew_at - 1
    h(MicAudio(b"\x00\x00" * 480, h.now))
    assert sent(h(Tick()), "session.close") == []
    # the user is audible at the due time (no transcript yet): not now
    h.now = renew_at
    h(MicAudio((3000).to_bytes(2, "little", signed=True) * 480, h.now))
    assert sent(h(Tick()), "session.close") == []
    # the model is speaking at the due time: not now; nor while the user's turn is open
    h.now = renew_at
    h.ev({"type": "session.output_audio.delta", "delta": audio(100, loud_from_ms=0)})
    assert sent(h(Tick()), "session.close") == [] and h.core.renew_from_s == pytest.approx(renew_at + RENEW_CHECK_S)
    h.ev({"type": "session.output_audio.delta", "delta": audio(100)})
    h.fragment("user", "So about the", 0, 200)
    h.now += RENEW_CHECK_S
    assert sent(h(Tick()), "session.close") == []
    h.now += 1.0                                         # the user's turn closes (800 ms without a fragment)
    assert sent(h(Tick()), "session.close") == []        # the model's reply is awaited
    h.now += RENEW_REPLY_WAIT_S                          # none came (the model may choose not to answer)
    acts = h(Tick())
    (close,) = sent(acts, "session.close")
    assert h.core.state is LiveState.RENEWING and published(acts, "engine.status")[-1]["state"] == "renewing"
    acts = h.ev({"type": "session.closed", "reason": "close_requested", "session": {"id": "live_abc"},
                 "usage": {"seconds": 180}})
    assert [a.reason for a in acts if isinstance(a, Reconnect)] == ["session renewed before it expired"]
    assert not published(acts, "engine.error")


def renewing(**kw: Any) -> Harness:
    """A core whose session (300 s long) is being renewed."""
    from engine.realtime.live_core import RENEW_BEFORE_S
    h = Harness(wall_clock=lambda: 1_000_000.0, **kw)
    acts = h(Connected())
    h.ev({"type": "session.started", "client_event_id": sent(acts)[0]["event_id"],
          "session": {"id": "live_abc", "expires_at": 1_000_300}})
    h.now += 300 - RENEW_BEFORE_S
    assert sent(h(Tick()), "session.close") and h.core.state is LiveState.RENEWING
    return h


def test_a_renewal_keeps_the_mic_to_the_old_session_and_stops_for_the_budget_or_the_hosts_end() -> None:
    h = renewing(budget_usd=0.5)
    assert [a for a in h(MicAudio(b"\x00\x00" * 480, h.now)) if isinstance(a, SendAudio)]   # heard until closed
    acts = h.ev({"type": "session.closed", "reason": "close_requested", "session": {"id": "live_abc"},
                 "usage": {"seconds": 600}})               # its last usage is past the budget
    assert not any(isinstance(a, Reconnect) for a in acts) and published(acts, "engine.error")[0]["code"] == \
        "budget_exceeded" and h.core.state is LiveState.SPENT
    h = renewing()
    assert h(Ending()) == [] and h.core.ending              # the close is out: wait for it, reopen nothing
    acts = h.ev({"type": "session.closed", "reason": "close_requested", "session": {"id": "live_abc"}})
    assert not any(isinstance(a, Reconnect) for a in acts) and h.core.state is LiveState.ENDED


def test_a_renewal_is_not_held_off_by_a_rooms_noise_and_a_muted_mic_sends_silence() -> None:
    """Judged by the model's digital-silence peak (64), a mic's faint room noise (peak 100) never
    gave a quiet moment: no renewal in a whole session. And a mute during a renewal was acked
    while the unmuted audio still went to the closing session."""
    from engine.realtime.live_core import RENEW_BEFORE_S
    h = Harness(wall_clock=lambda: 1_000_000.0)
    acts = h(Connected())
    h.ev({"type": "session.started", "client_event_id": sent(acts)[0]["event_id"],
          "session": {"id": "live_abc", "expires_at": 1_000_300}})
    noise = np.random.default_rng(3).integers(-100, 101, 480).astype("<i2").tobytes()
    h.now += 300 - RENEW_BEFORE_S - 2
    closes = []
    for _ in range(150):                                  # 3 s of noise, 20 ms a chunk, ticking as it goes
        h.now += 0.02
        h(MicAudio(noise, h.now))
        closes += sent(h(Tick()), "session.close")
    assert len(closes) == 1 and h.core.state is LiveState.RENEWING
    h.cmd("cmd.mic", {"open": False, "id": "m1"})
    (out,) = [a for a in h(MicAudio(noise, h.now)) if isinstance(a, SendAudio)]
    assert out.pcm == bytes(len(noise))


def test_a_renewal_whose_usage_reaches_the_budget_is_told_once_and_a_drop_then_reopens_nothing() -> None:
    h = renewing(budget_usd=0.5)
    acts = h.ev({"type": "session.usage.updated", "usage": {"seconds": 600}})
    assert [(b["exceeded"], "80%" in b["message"]) for b in published(acts, "engine.budget")] == [(True, False)]
    acts = h(Disconnected(1006))                          # the socket drops before session.closed
    assert [e["code"] for e in published(acts, "engine.error")] == ["budget_exceeded"]
    assert h.core.state is LiveState.SPENT and h(Connected(reconnect=True)) == []


def test_a_short_session_is_not_renewed_before_it_is_a_minute_old() -> None:
    """expires_at within RENEW_BEFORE_S (a short session, or a clock ahead of the server's): each
    session was renewed as soon as it started."""
    from engine.realtime.live_core import RENEW_MIN_AGE_S
    h = Harness(wall_clock=lambda: 1_000_000.0)
    acts = h(Connected())
    h.ev({"type": "session.started", "client_event_id": sent(acts)[0]["event_id"],
          "session": {"id": "live_abc", "expires_at": 1_000_090}})
    assert h.core.renew_from_s == pytest.approx(h.now + RENEW_MIN_AGE_S)


def test_a_session_closed_for_another_reason_is_reopened_by_the_link() -> None:
    h = Harness()
    h.started()
    acts = h.ev({"type": "session.closed", "reason": "", "session": {"id": "live_abc"}})
    assert not published(acts, "engine.error") and h.core.state is LiveState.DISCONNECTED
    assert sent(h(Connected(reconnect=True)), "session.start")


@pytest.mark.parametrize("reason", ["content", "close_requested"])
def test_a_session_the_server_closes_for_good_is_not_reopened(reason: str) -> None:
    """Closed for its content, or by another client: the server's close of the socket then made the
    link reconnect and the core start a new session at once (a content close again and again)."""
    h = Harness()
    h.started()
    acts = h.ev({"type": "session.closed", "reason": reason, "session": {"id": "live_abc"}, "usage": {"seconds": 9}})
    (err,) = published(acts, "engine.error")
    assert err["fatal"] is True and err["code"] == "session_closed" and reason in err["message"]
    assert not any(isinstance(a, Reconnect) for a in acts) and h.core.state is LiveState.ENDED
    assert h(Disconnected(1000)) == [] and h(Connected(reconnect=True)) == []
    side = Harness(sideband=True)                        # a SIP call's: its close is the call's end
    side(Connected())
    assert not published(side.ev({"type": "session.closed", "reason": reason, "session": {"id": "rtc_1"}}),
                         "engine.error")


def test_an_expired_session_is_renewed_with_the_conversation() -> None:
    h = Harness()
    h.started()
    h.ev({"type": "session.output_audio.delta", "delta": audio(100)})
    acts = h.ev({"type": "session.closed", "reason": "expired", "session": {"id": "live_abc"},
                 "usage": {"seconds": 7200}})
    assert [a.reason for a in acts if isinstance(a, Reconnect)] == ["session expired"]
    assert any(isinstance(a, EndOfAudio) for a in acts)


# ------------------------------------------------------------------ latency
def test_latency_runs_from_the_users_speech_end_to_the_first_audible_sample_heard() -> None:
    h = Harness()
    h.started()
    for _ in range(50):   # one second of mic: the input clock maps timeline ms to capture time
        h(MicAudio(b"\x00\x00" * 480, h.now))
        h.now += 0.02
    speech_end_s = h.now - 0.02 - 0.2   # the last chunk's capture time, 200 ms before the timeline's end
    h.fragment("user", "Hi", 600, 800)
    h.now += 0.9
    h(Tick())   # the user's turn closes
    h.ev({"type": "session.output_audio.delta", "delta": audio(100)})           # silence: frames 0-2399
    h.ev({"type": "session.output_audio.delta", "delta": audio(100, loud_from_ms=50)})  # sound from 3600
    h.heard = 3000
    assert not published(h(Tick()), "latency.turn")
    h.now += 0.1
    h.heard = 3600 + 240     # 10 ms past the first sound
    (lat,) = published(h(Tick()), "latency.turn")
    heard_at = h.now - 0.010
    assert lat["speech_end_to_heard_ms"] == pytest.approx((heard_at - speech_end_s) * 1000, abs=1)


def test_latency_counts_from_the_replys_first_sound_even_when_it_came_before_the_turn_closed() -> None:
    """The console showed ~2 s for a reply that began 0.8 s after the question: the server sends the
    user's fragments when its turn ends and answers at once, but the engine closes the user's turn
    only 800 ms later (the grouper's gap), and measured to the first sound after that, inside the reply."""
    h = Harness()
    h.started()
    for _ in range(50):
        h(MicAudio(b"\x00\x00" * 480, h.now))
        h.now += 0.02
    speech_end_s = h.now - 0.02 - 0.2
    h.ev({"type": "session.output_audio.delta", "delta": audio(100)})                   # silence: frames 0-2399
    (started,) = published(h.fragment("user", "Hi", 600, 800), "user.speech.started")
    # the speech's times on the capture clock, for the console's marks (the fragments come after it)
    assert started["audio_start_mono_ns"] == pytest.approx((speech_end_s - 0.2) * 1e9, abs=1e6)
    h.ev({"type": "session.output_audio.delta", "delta": audio(100, loud_from_ms=50)})  # the reply: sound from 3600
    h.heard = 3600 + 240      # 10 ms past the first sound
    reply_heard_at = h.now - 0.010
    for _ in range(8):        # the reply goes on while the user's turn is still open
        h.now += 0.1
        h.heard += 2400
        h.ev({"type": "session.output_audio.delta", "delta": audio(100, loud_from_ms=0)})
    h.now += 0.1
    h.heard += 2400
    acts = h(Tick())          # the user's turn closes (800 ms without a fragment)
    (stopped,) = published(acts, "user.speech.stopped")
    assert stopped["audio_end_mono_ns"] == pytest.approx(speech_end_s * 1e9, abs=1e6)
    (lat,) = published(acts + h(Tick()), "latency.turn")
    assert lat["speech_end_to_heard_ms"] == pytest.approx((reply_heard_at - speech_end_s) * 1000, abs=1)


def test_playback_reports_become_playout_topics_of_the_track() -> None:
    h = Harness()
    h.started()
    acts = h(PlaybackReport("underrun", 0, 4800, {"underrun_frames": 240}))
    (u,) = published(acts, "playout.underrun")
    assert u["underrun_frames"] == 240 and u["response_id"] == "live_abc"


# ------------------------------------------------------------------ commands across a crash
def test_a_command_is_taken_once_and_the_state_lets_the_broker_go() -> None:
    h = Harness()
    h.started()
    body = {"text": "The booking is ZX9.", "role": "system", "id": "c1"}
    first = h.cmd("cmd.say", body)
    assert len(sent(first, "session.thinking.append")) == 1
    (state,) = published(first, "conversation.history")          # the append it holds is safe first
    assert "c1" in state["taken"] and state["live_pending"][0]["content"] == "The booking is ZX9."
    again = h.cmd("cmd.say", body, offered=True)                  # the broker's hand-over of a live copy
    assert sent(again) == [] and published(again, "intake.taken") == [{"taken": ["c1"]}]
    assert not published(again, "cmd.done")


def test_a_sender_that_sends_a_command_again_hears_its_outcome_again() -> None:
    """As on Realtime: a client that missed a command's cmd.done (its subscriber joined late) and
    sends it again gets it again, marked ``repeated``; the command is not carried out twice."""
    h = Harness()
    h.started()
    body = {"name": "lookup", "owner": "crm", "id": "t1"}
    assert published(h.cmd("cmd.tool.register", body), "cmd.done") == [{"id": "t1", "ok": True}]
    again = h.cmd("cmd.tool.register", body)
    assert sent(again) == [] and published(again, "intake.taken") == [{"taken": ["t1"]}]
    assert published(again, "cmd.done") == [{"id": "t1", "ok": True, "repeated": True}]


def test_a_restarted_process_repeats_the_outcomes_its_predecessor_published() -> None:
    """A sender's re-send across a restart got only ``taken``, never its cmd.done again."""
    old = Harness()
    old.started()
    assert published(old.cmd("cmd.tool.register", {"name": "lookup", "owner": "crm", "id": "t1"}),
                     "cmd.done") == [{"id": "t1", "ok": True}]
    (done,) = published(old.cmd("cmd.tool.unregister", {"name": "lookup", "id": "u1"}), "cmd.done")
    assert done["ok"] is True and set(old.broker.outcomes) == {"t1", "u1"}
    new = Harness()
    new.core.restore_outcomes(dict(old.broker.outcomes))
    new.core.restore_history(old.core.history_message().payload)
    new(Connected(reconnect=True, reason="restart"))
    again = new.cmd("cmd.tool.register", {"name": "lookup", "owner": "crm", "id": "t1"})
    assert sent(again) == [] and published(again, "cmd.done") == [{"id": "t1", "ok": True, "repeated": True}]
    unregister = {"name": "lookup", "id": "u1"}
    assert published(new.cmd("cmd.tool.unregister", unregister), "cmd.done") == [{**done, "repeated": True}]
    assert not published(new.cmd("cmd.tool.unregister", unregister, offered=True), "cmd.done")
    reused = new.cmd("cmd.mic", {"open": False, "id": "t1"})       # the successor knows t1's topic too
    assert published(reused, "cmd.done")[0]["code"] == "id_reused" and new.core.mic_open is True


def test_a_restarted_process_starts_from_its_predecessors_state() -> None:
    old = Harness()
    old.started()
    old.cmd("cmd.tool.register", {"name": "lookup", "owner": "crm", "id": "t1"})
    old.fragment("user", "Hello there", 0, 200)
    old.now += 1
    old(Tick())
    acts = old.cmd("cmd.commentary", {"text": "Greet Ada.", "id": "c2"})   # sent, not placed when it died
    state = published(acts, "conversation.history")[-1]
    new = Harness()
    new.core.restore_history(state)
    assert sorted(new.core.tools.registered) == ["lookup"]
    (start,) = sent(new(Connected(reconnect=True, reason="restart")))
    assert start["session"]["input"][0]["content"][0]["text"] == "Hello there"
    acts = new.ev({"type": "session.started", "session": {"id": "live_9"}})
    assert [e["content"] for e in sent(acts, "session.commentary.append")] == ["Greet Ada."]
    assert published(new.cmd("cmd.commentary", {"text": "Greet Ada.", "id": "c2"}), "intake.taken")


def test_a_renewal_hears_a_loud_rooms_steady_noise_as_quiet_and_speech_over_it_as_not() -> None:
    """A fan or a street at -30 dBFS is over the fixed -40 dBFS threshold: no quiet moment came,
    and the session expired mid-sentence as if no renewal were built. The mic is now audible
    over the louder of that threshold and its own noise floor plus MIC_OVER_FLOOR_DB."""
    from engine.realtime.live_core import RENEW_BEFORE_S
    rng = np.random.default_rng(5)

    def chunk(rms: float) -> bytes:
        return np.clip(rng.normal(0, rms, 480), -32768, 32767).astype("<i2").tobytes()

    def run(talking: bool) -> int:
        h = Harness(wall_clock=lambda: 1_000_000.0)
        acts = h(Connected())
        h.ev({"type": "session.started", "client_event_id": sent(acts)[0]["event_id"],
              "session": {"id": "live_abc", "expires_at": 1_000_300}})
        h.now += 300 - RENEW_BEFORE_S - 5
        closes = []
        for i in range(400):                              # 8 s of a -30 dBFS room, 20 ms a chunk
            h.now += 0.02
            # a talker over it: syllables 12 dB over the room, 200 ms of each 300, pauses at the room's level
            loud = talking and (i % 15) < 10
            h(MicAudio(chunk(1036 * (4.0 if loud else 1.0)), h.now))
            closes += sent(h(Tick()), "session.close")
        return len(closes)

    assert run(talking=False) == 1
    assert run(talking=True) == 0

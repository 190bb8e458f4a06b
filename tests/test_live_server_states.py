"""The local server's GPT-Live session (engine.server.live_session): pure, no sockets, no
espeak-ng. Every event it makes is validated against openai 3.63.0's ``openai.types.live``."""
from __future__ import annotations

import base64
import json
import typing
from typing import Any

import numpy as np
import pytest

from engine.server.live_protocol import AudioFormat, InputDecoder, OutputEncoder
from engine.server.live_session import (ACCEPTS, ALL, END_OF_TURN_MS, GRID_MS, HANDLERS, LIVE_MAX_SESSION_S, PHASES,
                                        PLACE_AFTER_MS, PRIMARY, SIDEBANDS, VOICES, YIELD_AFTER_MS, LiveActions,
                                        LiveSession, Phase, Voice, spread_words)
from engine.server.scenario import parse_scenario
from tests.helpers import voiced

pytestmark = pytest.mark.timeout(20)
CHUNK = 2400          # 100 ms at 24 kHz
NOW = 1_000_000.0


def fake_speech(text: str) -> np.ndarray:
    """Stands in for espeak-ng: 100 ms of voiced tone a word."""
    return voiced(CHUNK * max(1, len(text.split())))


class Live:
    """Drives a LiveSession as the I/O layer would: each 100 ms of input is followed by one
    output step; recognition answers with the scripted words (or ``words``), synthesis with
    fake_speech. Every event is validated and kept with its audience."""

    def __init__(self, validator: Any, scenario: dict[str, Any] | None = None, words: str = "",
                 synth: bool = True) -> None:
        self.s = LiveSession(parse_scenario(scenario) if scenario else None, wall_clock=lambda: NOW)
        self.v = validator
        self.words = words
        self.synth = synth
        self.out: list[tuple[str, dict[str, Any]]] = []
        self.unspoken: list[Any] = []

    def take(self, acts: LiveActions) -> LiveActions:
        for aud, ev in acts.out:
            self.v.check(ev, sideband=aud not in (PRIMARY, ALL))
            if aud == ALL:
                self.v.check(ev, sideband=True)   # what every connection gets validates on a sideband too
        self.out.extend(acts.out)
        for turn in acts.hear:
            self.take(self.s.heard(turn.id, turn.heard if turn.heard is not None else self.words))
        for utt in acts.speak:
            if self.synth:
                self.take(self.s.spoken(utt.id, fake_speech(utt.text)))
            else:
                self.unspoken.append(utt)
        return acts

    def send(self, event: dict[str, Any], sender: str = PRIMARY) -> LiveActions:
        return self.take(self.s.receive_text(json.dumps(event), sender))

    def start(self, **session: Any) -> dict[str, Any]:
        acts = self.send({"type": "session.start", "session": {"model": "gpt-live-1", **session}, "event_id": "start"})
        return acts.out[0][1]

    def audio(self, pcm: np.ndarray, tick: bool = True) -> None:
        """Stream ``pcm`` (24 kHz) in 100 ms appends, one output step after each."""
        for i in range(0, len(pcm), CHUNK):
            self.send({"type": "session.input_audio.append", "audio": b64(pcm[i:i + CHUNK])})
            if tick:
                self.take(self.s.tick())

    def silence(self, ms: int, tick: bool = True) -> None:
        self.audio(np.zeros(ms * 24, dtype=np.int16), tick)

    def ticks(self, n: int) -> None:
        for _ in range(n):
            self.take(self.s.tick())

    def events(self, etype: str | None = None, audience: str = PRIMARY) -> list[dict[str, Any]]:
        got = LiveActions(out=self.out).events(audience)
        return [e for e in got if etype is None or e["type"] == etype]

    def deltas(self) -> list[np.ndarray]:
        return [np.frombuffer(base64.b64decode(e["delta"]), dtype="<i2") for e in self.events("session.output_audio.delta")]

    def said(self) -> str:
        return "".join(e["delta"] for e in self.events("session.output_transcript.delta"))

    def heard_text(self) -> str:
        return "".join(e["delta"] for e in self.events("session.input_transcript.delta"))

    def errors(self) -> list[dict[str, Any]]:
        return [e["error"] for e in self.events("error")]


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode()


def loud(chunk: np.ndarray) -> bool:
    return bool(len(chunk)) and int(np.abs(chunk.astype(np.int32)).max()) > 0


@pytest.fixture
def live(live_validator: Any) -> Any:
    def make(**kw: Any) -> Live:
        return Live(live_validator, **kw)
    return make


# ---------------------------------------------------------------- the tables
def test_every_transition_target_is_a_state_and_closed_is_final() -> None:
    for (state, event), targets in PHASES.items():
        assert targets and all(isinstance(t, Phase) for t in targets), (state, event)
        assert state is not Phase.CLOSED, "no event leaves CLOSED"
    for (voice, event), voices in VOICES.items():
        assert voices and all(isinstance(t, Voice) for t in voices), (voice, event)
    reachable = {Phase.NEW}
    for _ in PHASES:
        reachable |= {t for (s, _e), ts in PHASES.items() if s in reachable for t in ts}
    assert reachable == set(Phase)
    assert {t for ts in VOICES.values() for t in ts} | {Voice.SILENT} == set(Voice)


def test_every_client_event_of_the_sdk_has_a_handler_and_phases() -> None:
    from openai.types.live import ClientEvent, ConnectClientEvent

    def types(union: Any) -> set[str]:
        return {typing.get_args(m.model_fields["type"].annotation)[0] for m in typing.get_args(typing.get_args(union)[0])}
    sdk = types(ClientEvent) | types(ConnectClientEvent)
    assert sdk == set(HANDLERS) == set(ACCEPTS)
    assert ACCEPTS["session.start"] == {Phase.NEW}
    assert all(Phase.CLOSED not in phases for phases in ACCEPTS.values())


# ---------------------------------------------------------------- start
def test_nothing_is_sent_before_start_and_other_events_are_refused(live: Any) -> None:
    lv = live()
    lv.ticks(5)
    assert lv.out == []
    lv.send({"type": "session.thinking.append", "content": "x", "delegation_id": None, "event_id": "e1"})
    (err,) = lv.errors()
    assert err["code"] == "session_not_started" and err["client_event_id"] == "e1"
    assert lv.s.phase is Phase.NEW


def test_start_resolves_the_defaults(live: Any) -> None:
    lv = live()
    started = lv.start()
    assert started["type"] == "session.started" and started["client_event_id"] == "start"
    ses = started["session"]
    assert ses["id"].startswith("live_") and ses["status"] == "active" and ses["model"] == "gpt-live-1"
    assert ses["expires_at"] == int(NOW + LIVE_MAX_SESSION_S)
    assert ses["audio"] == {"output": {"voice": "marin"}, "format": {"type": "audio/pcm", "rate": 24000}}
    assert ses["delegation"] == {"type": "client"} and ses["input"] == [] and ses["instructions"]
    lv.send({"type": "session.start", "session": {"model": "gpt-live-1"}})
    assert lv.errors()[-1]["code"] == "session_already_started"


@pytest.mark.parametrize("session, code, param", [
    ({"model": "gpt-live-1", "voice": "marin"}, "unknown_parameter", "session.voice"),
    ({"model": "gpt-live-1", "audio": {"output": {"voice": "marin", "speed": 1.2}}}, "unknown_parameter",
     "session.audio.output.speed"),
    ({}, "missing_required_parameter", "session.model"),
    ({"model": "gpt-realtime"}, "model_not_found", "session.model"),
    ({"model": 7}, "invalid_type", "session.model"),
    ({"model": "gpt-live-1.1", "audio": {"format": {"type": "audio/pcm", "rate": 8000}}}, "invalid_value",
     "session.audio.format.rate"),
    ({"model": "gpt-live-1.1", "audio": {"format": {"type": "audio/pcmu"}}}, "missing_required_parameter",
     "session.audio.format.rate"),
    ({"model": "gpt-live-1.1", "audio": {"format": {"type": "audio/pcma", "rate": 16000}}}, "invalid_value",
     "session.audio.format.rate"),
    ({"model": "gpt-live-1.1", "audio": {"format": {"type": "audio/opus", "rate": 48000}}}, "invalid_value",
     "session.audio.format.type"),
    ({"model": "gpt-live-1", "audio": {"output": {"voice": "nova"}}}, "forbidden", "session.audio.output.voice"),
    ({"model": "gpt-live-1", "delegation": {"type": "responses", "responses": {"model": "gpt-5"}}},
     "unsupported_delegation", "session.delegation.type"),
    ({"model": "gpt-live-1", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"},
                                                                   {"type": "input_text", "text": "b"}]}]},
     "invalid_value", "session.input[0].content"),
    ({"model": "gpt-live-1", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}]}] * 129},
     "invalid_value", "session.input"),
])
def test_a_bad_start_is_refused_naming_the_field_and_can_be_retried(live: Any, session: dict[str, Any], code: str,
                                                                   param: str) -> None:
    lv = live()
    lv.send({"type": "session.start", "session": session, "event_id": "s1"})
    (err,) = lv.errors()
    assert (err["code"], err["param"], err["client_event_id"]) == (code, param, "s1"), err
    assert lv.s.phase is Phase.NEW
    assert lv.start(audio={"format": {"type": "audio/pcmu", "rate": 8000}})["type"] == "session.started"


def test_history_counts_turns_and_developer_context(live: Any) -> None:
    lv = live(scenario={"turns": [{"match": {"turn": 2}, "reply": "Second turn; {context}"}]}, words="hello")
    lv.start(input=[{"role": "developer", "content": [{"type": "input_text", "text": "The user is Ada."}]},
                    {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                    {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]}])
    lv.audio(voiced(CHUNK * 5))
    lv.silence(END_OF_TURN_MS + 2000)
    assert lv.said() == "Second turn; The user is Ada."


# ---------------------------------------------------------------- validation of events
@pytest.mark.parametrize("event, code, param", [
    ({"type": "input_audio_buffer.commit"}, "invalid_value", "type"),
    ({"type": "session.thinking.append", "content": "x"}, "missing_required_parameter", "delegation_id"),
    ({"type": "session.thinking.append", "content": "x", "delegation_id": None, "role": "system"},
     "unknown_parameter", "role"),
    ({"type": "session.commentary.append", "content": 5, "delegation_id": None}, "invalid_type", "content"),
    ({"type": "session.instructions.append", "content": "word " * 500, "delegation_id": None}, "invalid_value",
     "content"),
    ({"type": "session.commentary.append", "content": "x", "delegation_id": "item_nope"}, "invalid_value",
     "delegation_id"),
    ({"type": "session.input_audio.append", "audio": "not base64!"}, "invalid_value", "audio"),
    ({"type": "session.input_audio.append", "audio": base64.b64encode(b"abc").decode()}, "invalid_value", "audio"),
    ({"type": "session.output_audio.fixture.play", "audio": b64(np.zeros(24000 * 31, dtype=np.int16))},
     "invalid_value", "audio"),
    ({"type": "session.update", "session": {"model": "gpt-live-1.1"}}, "immutable_field_update", "session.model"),
    ({"type": "session.update", "session": {"delegation": {"type": "decisions", "decisions": {}}}},
     "unsupported_delegation", "session.delegation.type"),
    ({"type": "decision.create"}, "missing_required_parameter", "event_id"),
    ({"type": "decision.item.delete", "item_id": "x"}, "unsupported_decisions", "type"),
    ({"type": "response.create"}, "delegation_mismatch", "type"),
])
def test_each_invalid_event_gets_one_error_naming_the_field(live: Any, event: dict[str, Any], code: str,
                                                            param: str) -> None:
    lv = live()
    lv.start()
    n = len(lv.out)
    lv.send({**event, "event_id": "bad"} if event["type"] != "decision.create" else event)
    errs = [e for _, e in lv.out[n:]]
    assert len(errs) == 1 and errs[0]["type"] == "error"
    err = errs[0]["error"]
    assert (err["code"], err.get("param")) == (code, param), err
    if event["type"] != "decision.create":
        assert err["client_event_id"] == "bad" == errs[0]["client_event_id"]
    assert lv.s.phase is Phase.ACTIVE and not lv.s.appends


def test_response_commands_under_client_delegation_say_why(live: Any) -> None:
    lv = live()
    lv.start()
    lv.send({"type": "response.item.create", "item": {"type": "function_call_output", "call_id": "c", "output": "x"}})
    assert lv.errors()[-1]["message"] == "response.item.create requires Responses delegation."


def test_unknown_event_lists_the_supported_ones_and_bad_json_is_reported(live: Any) -> None:
    lv = live()
    lv.start()
    lv.send({"type": "response.cancel"})
    assert "'session.commentary.append'" in lv.errors()[-1]["message"]
    lv.take(lv.s.receive_text("{not json"))
    assert lv.errors()[-1]["code"] == "invalid_json"


# ---------------------------------------------------------------- the timeline and appends
def test_appends_are_placed_on_the_grid_only_while_input_streams(live: Any) -> None:
    lv = live()
    lv.start()
    lv.silence(300)
    lv.send({"type": "session.thinking.append", "content": "The user is Ada.", "delegation_id": None, "event_id": "t1"})
    lv.ticks(50)   # output goes on, the timeline does not: no ack
    assert not lv.events("session.thinking.appended")
    lv.silence(PLACE_AFTER_MS + GRID_MS * 2)
    (ack,) = lv.events("session.thinking.appended")
    assert ack["client_event_id"] == "t1"
    assert ack["start_ms"] % GRID_MS == 0 and ack["start_ms"] >= 300 + PLACE_AFTER_MS
    assert ack["end_ms"] == ack["start_ms"] + GRID_MS <= lv.s.timeline_ms
    assert lv.s.context == ["The user is Ada."]


def test_appends_never_placed_are_reported_at_close(live: Any) -> None:
    lv = live()
    lv.start()
    lv.send({"type": "session.commentary.append", "content": "Hello", "delegation_id": None, "event_id": "c1"})
    lv.send({"type": "session.instructions.append", "content": "Be brief", "delegation_id": None})
    lv.send({"type": "session.close", "event_id": "bye"})
    acts = lv.take(lv.s.tick())
    assert acts.close and lv.s.phase is Phase.CLOSED
    types = [e["type"] for _, e in acts.out]
    assert types == ["session.output_audio.delta", "error", "error", "session.closed"]
    errs = [e for _, e in acts.out if e["type"] == "error"]
    assert [e["error"]["code"] for e in errs] == ["context_injection_incomplete"] * 2
    assert errs[0]["client_event_id"] == "c1" and "client_event_id" not in errs[1]
    closed = acts.out[-1][1]
    assert closed["reason"] == "close_requested" and closed["client_event_id"] == "bye"
    assert closed["usage"] == {"seconds": 0} and closed["session"]["status"] == "active"
    assert lv.s.receive_text(json.dumps({"type": "session.close"})).out == []


def test_usage_about_every_15_s_of_timeline_and_in_closed(live: Any) -> None:
    lv = live()
    lv.start()
    lv.silence(31_000, tick=False)
    assert [e["usage"]["seconds"] for e in lv.events("session.usage.updated")] == [15, 30]
    lv.silence(400, tick=False)
    lv.send({"type": "session.close"})
    lv.ticks(1)
    assert lv.events("session.closed")[0]["usage"] == {"seconds": 32}


# ---------------------------------------------------------------- turns, replies, transcripts
def test_a_turn_is_answered_after_it_ends_with_timed_transcripts(live: Any) -> None:
    lv = live(scenario={"turns": [{"match": {"turn": 1}, "hear": "what is the capital of France",
                                   "reply": "The capital of France is Paris."}]})
    lv.start()
    lv.silence(500)
    lv.audio(voiced(CHUNK * 15))          # 1.5 s of "speech" from 500 ms
    assert not lv.events("session.input_transcript.delta")
    lv.silence(END_OF_TURN_MS + 100)
    fragments = lv.events("session.input_transcript.delta")
    assert lv.heard_text() == "what is the capital of France"
    assert all(f["start_ms"] % GRID_MS == 0 and f["end_ms"] == f["start_ms"] + GRID_MS for f in fragments)
    assert 400 <= fragments[0]["start_ms"] and fragments[-1]["end_ms"] <= 2200
    assert fragments[1]["delta"].startswith(" ")
    lv.silence(1500)
    assert lv.said() == "The capital of France is Paris."
    out = lv.events("session.output_transcript.delta")
    assert out[0]["start_ms"] >= fragments[-1]["end_ms"]
    assert [f["start_ms"] for f in out] == sorted(f["start_ms"] for f in out)
    assert all(f["start_ms"] % GRID_MS == 0 for f in out)
    deltas = lv.deltas()
    assert all(len(d) == CHUNK for d in deltas)                 # one continuous track, 100 ms a delta
    assert sum(loud(d) for d in deltas) == 6                    # 6 words of fake speech
    assert not loud(deltas[-1])                                 # silence after the reply
    assert all("event_id" not in e for e in lv.events("session.output_audio.delta"))


def test_no_words_are_made_up_and_short_noises_are_not_turns(live: Any) -> None:
    lv = live()
    lv.start()
    lv.audio(voiced(CHUNK))               # 100 ms: a backchannel
    lv.silence(1500)
    assert lv.s.counts["backchannels"] == 1 and not lv.s.queue and lv.said() == ""
    lv.audio(voiced(CHUNK * 5))
    lv.silence(2500)
    assert lv.said() == "You said: something I could not make out."


def test_the_model_yields_when_talked_over(live: Any) -> None:
    story = "Once upon a time " + "there was a very long story " * 4
    lv = live(scenario={"turns": [{"match": {"turn": 1}, "reply": story}, {"match": {"turn": 2}, "reply": "Sorry, go on."}]})
    lv.start()
    lv.audio(voiced(CHUNK * 5))
    lv.silence(END_OF_TURN_MS + 300)
    assert lv.s.voice is Voice.SPEAKING
    n_before = len(lv.deltas())
    # the user talks over it: 100 ms appends, one output step each
    spoken_ms = 0
    while lv.s.voice is Voice.SPEAKING and spoken_ms < 800:
        lv.audio(voiced(CHUNK))
        spoken_ms += 100
    assert YIELD_AFTER_MS <= spoken_ms <= YIELD_AFTER_MS + 100 and lv.s.counts["yields"] == 1
    deltas = lv.deltas()
    assert not loud(deltas[-1]), "the step after the yield is silence"
    assert all(loud(d) for d in deltas[n_before:-1])
    said = lv.said()
    assert story.startswith(said) and len(said) < len(story) / 2
    lv.audio(voiced(CHUNK * 3))
    lv.silence(END_OF_TURN_MS + 1000)
    assert lv.said() == said + "Sorry, go on."   # it answers the interruption, and does not resume the story


def test_the_model_does_not_start_while_the_user_speaks(live: Any) -> None:
    lv = live(synth=False)
    lv.start()
    lv.audio(voiced(CHUNK * 3))
    lv.silence(END_OF_TURN_MS + 100)
    (utt,) = lv.unspoken
    lv.audio(voiced(CHUNK))                 # the user says a little more (under the yield time)
    lv.take(lv.s.spoken(utt.id, fake_speech(utt.text)))
    lv.silence(END_OF_TURN_MS - 100)        # the reply is ready, but the user has not finished
    assert lv.s.voice is Voice.SILENT and not any(loud(d) for d in lv.deltas())
    lv.silence(300)
    assert lv.s.voice is Voice.SPEAKING and lv.s.counts["backchannels"] == 1


def test_a_failed_synthesis_is_reported_and_the_session_goes_on(live: Any) -> None:
    lv = live(synth=False)
    lv.start()
    lv.audio(voiced(CHUNK * 3))
    lv.silence(END_OF_TURN_MS + 100)
    (utt,) = lv.unspoken
    lv.take(lv.s.spoken(utt.id, None, "espeak-ng is not installed"))
    err = lv.errors()[-1]
    assert err["code"] == "speech_synthesis_failed" and err["type"] == "server_error"
    assert not lv.s.queue and lv.s.phase is Phase.ACTIVE


# ---------------------------------------------------------------- context and commentary
def test_thinking_shapes_the_next_reply(live: Any) -> None:
    lv = live(scenario={"turns": [{"match": {"text": "name", "context": "name is"}, "reply": "Yes: {context}"}]},
              words="what is my name")
    lv.start()
    lv.silence(200)
    lv.send({"type": "session.thinking.append", "content": "The user's name is Ada.", "delegation_id": None})
    lv.silence(1000)
    assert lv.said() == "" and lv.events("session.thinking.appended")   # silent
    lv.audio(voiced(CHUNK * 5))
    lv.silence(2000)
    assert lv.said() == "Yes: The user's name is Ada."


def test_fresh_thinking_follows_the_default_reply_once(live: Any) -> None:
    lv = live(words="where is my car")
    lv.start()
    lv.silence(200)
    lv.send({"type": "session.thinking.append", "content": "The car is a blue Fiat.", "delegation_id": None})
    lv.silence(800)
    for _ in range(2):
        lv.audio(voiced(CHUNK * 5))
        lv.silence(2500)
    assert lv.said() == "You said: where is my car. The car is a blue Fiat.You said: where is my car."


def test_commentary_is_said_by_the_model(live: Any) -> None:
    lv = live()
    lv.start()
    lv.silence(100)
    lv.send({"type": "session.commentary.append", "content": "Welcome to the car rental desk.",
             "delegation_id": None, "event_id": "hi"})
    lv.silence(2000)
    ack = lv.events("session.commentary.appended")[0]
    assert ack["client_event_id"] == "hi"
    assert lv.said() == "Welcome to the car rental desk."


# ---------------------------------------------------------------- delegation
DELEGATE = {"turns": [{"match": {"text": "collection point"}, "delegate": {"ack": "Let me check."},
                       "then": "Your car is at {output}."}]}


def test_client_delegation_round_trip(live: Any) -> None:
    lv = live(scenario=DELEGATE, words="where is the collection point")
    lv.start()
    lv.audio(voiced(CHUNK * 5))
    lv.silence(END_OF_TURN_MS + 100)
    (created,) = lv.events("session.delegation.created")
    d = created["delegation"]
    assert d["id"].startswith("item_") and d == {"id": d["id"], "type": "delegation", "target": "client"}
    assert created["offset_ms"] == 1000 and "client_event_id" not in created   # where the turn was taken
    lv.silence(1000)
    assert lv.said() == "Let me check."
    lv.send({"type": "session.thinking.append", "content": "looking it up", "delegation_id": d["id"]})
    lv.send({"type": "session.commentary.append", "content": "desk 4 of the train station",
             "delegation_id": d["id"], "event_id": "answer"})
    lv.silence(2500)
    assert lv.said() == "Let me check.Your car is at desk 4 of the train station."
    assert lv.events("session.commentary.appended")[0]["client_event_id"] == "answer"


def test_a_call_rule_delegates_too_and_an_early_answer_cancels_the_delayed_ack(live: Any) -> None:
    lv = live(scenario={"turns": [{"match": {"turn": 1}, "call": {"name": "lookup"}}]})
    lv.start(delegation={"type": "client", "acknowledgement_delay_ms": 2000})
    lv.audio(voiced(CHUNK * 5))
    lv.silence(END_OF_TURN_MS + 100)
    did = lv.events("session.delegation.created")[0]["delegation"]["id"]
    lv.send({"type": "session.commentary.append", "content": "It is sunny.", "delegation_id": did})
    lv.silence(3000)
    assert lv.said() == "It is sunny."   # no "One moment": the answer came before the ack was due


def test_session_update_changes_the_ack_delay_only(live: Any) -> None:
    lv = live()
    lv.start()
    lv.send({"type": "session.update", "session": {"delegation": {"type": "client", "acknowledgement_delay_ms": 300}},
             "event_id": "u"})
    upd = lv.events("session.updated")[0]
    assert upd["client_event_id"] == "u"
    assert upd["session"]["delegation"] == {"type": "client", "acknowledgement_delay_ms": 300}
    lv.send({"type": "session.update", "session": {"delegation": None}})
    assert lv.s.session["delegation"]["acknowledgement_delay_ms"] == 300


# ---------------------------------------------------------------- mute and fixtures
def test_muted_input_is_silence_to_the_model(live: Any) -> None:
    lv = live()
    lv.start()
    lv.send({"type": "session.input_audio.mute", "event_id": "m"})
    lv.audio(voiced(CHUNK * 5))
    lv.silence(1500)
    assert lv.s.counts["turns"] == 0 and lv.s.timeline_ms == 2000   # the timeline still moves
    lv.send({"type": "session.input_audio.unmute", "event_id": "u"})
    lv.audio(voiced(CHUNK * 5))
    lv.silence(1000)
    assert lv.s.counts["turns"] == 1
    assert [e["client_event_id"] for e in lv.events() if e["type"].startswith("session.input_audio.")] == ["m", "u"]


def test_a_fixture_interrupts_the_model_plays_then_resumes(live: Any) -> None:
    lv = live(scenario={"default_reply": "one two three four five six seven eight"})
    lv.start()
    lv.audio(voiced(CHUNK * 5))
    lv.silence(END_OF_TURN_MS + 200)
    assert lv.s.voice is Voice.SPEAKING
    fixture = np.full(CHUNK * 3 // 2, 1234, dtype=np.int16)     # 150 ms
    lv.send({"type": "session.output_audio.fixture.play", "audio": b64(fixture), "event_id": "fx"})
    assert lv.events()[-1] == {**lv.events()[-1], "type": "session.output_audio.fixture.playing", "client_event_id": "fx"}
    lv.send({"type": "session.commentary.append", "content": "x", "delegation_id": None, "event_id": "no"})
    lv.send({"type": "session.output_audio.fixture.play", "audio": b64(fixture)})
    assert [e["code"] for e in lv.errors()] == ["fixture_active", "fixture_active"]
    lv.audio(voiced(CHUNK * 5))          # the user speaks during the fixture: dropped
    played = lv.events("session.output_audio.fixture.played")
    assert played and played[0]["client_event_id"] == "fx"
    assert lv.s.counts["turns"] == 1 and lv.s.counts["yields"] == 0
    fixture_deltas = [d for d in lv.deltas() if loud(d) and int(d.max()) == 1234]
    assert len(fixture_deltas) == 2
    assert len(lv.said()) < len("one two three four five six seven eight")


# ---------------------------------------------------------------- close, expiry, disconnect
def test_close_drains_what_the_model_is_saying(live: Any) -> None:
    lv = live(scenario={"default_reply": "one two three four"})
    lv.start()
    lv.audio(voiced(CHUNK * 5))
    lv.silence(END_OF_TURN_MS + 200)
    assert lv.s.voice is Voice.SPEAKING
    lv.send({"type": "session.close"})
    lv.send({"type": "session.thinking.append", "content": "late", "delegation_id": None})
    assert lv.errors()[-1]["code"] == "session_closing"
    lv.ticks(10)
    assert lv.said() == "one two three four" and lv.s.phase is Phase.CLOSED
    assert lv.events()[-1]["type"] == "session.closed"


def test_expiry_and_disconnect_close_the_session(live: Any) -> None:
    lv = live()
    lv.start()
    acts = lv.take(lv.s.expire())
    assert acts.close and acts.out[-1][1]["reason"] == "expired" and lv.s.phase is Phase.CLOSED
    lv2 = live()
    lv2.start()
    acts = lv2.take(lv2.s.disconnected())
    assert acts.out[-1][1]["reason"] == "connection_lost"
    lv3 = live()
    assert lv3.s.disconnected().out == [] and lv3.s.phase is Phase.CLOSED


# ---------------------------------------------------------------- sidebands
def test_a_sideband_gets_reflected_audio_with_times_and_its_own_acks(live: Any) -> None:
    lv = live()
    lv.start()
    lv.take(lv.s.attach("sb_1"))
    assert lv.events(audience="sb_1")[0]["type"] == "session.started"
    lv.send({"type": "session.input_audio.mute"})
    lv.audio(voiced(CHUNK))
    reflected = lv.events("session.input_audio.append", audience="sb_1")
    assert len(reflected) == 1 and loud(np.frombuffer(base64.b64decode(reflected[0]["audio"]), dtype="<i2"))
    out = lv.events("session.output_audio.delta", audience="sb_1")
    assert [(e["start_ms"], e["end_ms"]) for e in out] == [(0, 100)]
    lv.send({"type": "session.thinking.append", "content": "x", "delegation_id": None, "event_id": "sb"}, "sb_1")
    lv.send({"type": "session.start", "session": {"model": "gpt-live-1"}}, "sb_1")
    assert lv.events("error", audience="sb_1")[-1]["error"]["param"] == "type"
    assert not lv.events("error")                              # the primary hears nothing of it
    lv.silence(1000)
    assert lv.events("session.thinking.appended", audience="sb_1") and not lv.events("session.thinking.appended")
    assert all(aud != SIDEBANDS or "start_ms" in e or e["type"] == "session.input_audio.append"
               for aud, e in lv.out)


# ---------------------------------------------------------------- audio formats
@pytest.mark.parametrize("fmt, bytes_per_delta", [({"type": "audio/pcm", "rate": 16000}, 3200),
                                                  ({"type": "audio/pcmu", "rate": 8000}, 800),
                                                  ({"type": "audio/pcma", "rate": 8000}, 800)])
def test_other_formats_both_ways(live: Any, fmt: dict[str, Any], bytes_per_delta: int) -> None:
    lv = live()
    lv.start(audio={"format": fmt})
    rate, width = fmt["rate"], 2 if fmt["type"] == "audio/pcm" else 1
    wire = bytes(rate * width // 10 * 7)    # 700 ms of zeros... as wire bytes
    if fmt["type"] != "audio/pcm":
        wire = bytes([0xFF if fmt["type"] == "audio/pcmu" else 0xD5]) * (rate // 10 * 7)
    lv.send({"type": "session.input_audio.append", "audio": base64.b64encode(wire).decode()})
    assert lv.s.timeline_ms == 700
    lv.ticks(5)
    assert [len(base64.b64decode(e["delta"])) for e in lv.events("session.output_audio.delta")] == [bytes_per_delta] * 5


def test_streaming_codecs_keep_the_duration_exact() -> None:
    enc = OutputEncoder(AudioFormat("audio/pcm", 16000))
    assert all(len(enc.encode(voiced(CHUNK))) == 3200 for _ in range(50))
    dec = InputDecoder(AudioFormat("audio/pcmu", 8000))
    assert dec.samples(bytes(800)) == 800
    total = sum(len(dec.decode(bytes([0xFF]) * 800)) for _ in range(50))
    assert abs(total - 50 * CHUNK) < CHUNK   # the resampler's delay, no more


def test_spread_words_keeps_leading_spaces_in_order() -> None:
    assert spread_words("a bb ccc", 800) == [(0, "a"), (100, " bb"), (400, " ccc")]
    assert spread_words("", 100) == []


def test_a_bug_in_a_handler_is_a_server_error_and_the_session_goes_on(live: Any, monkeypatch: Any) -> None:
    import engine.server.live_session as ls

    def broken(self: Any, ev: Any, acts: Any, sender: Any) -> None:
        raise KeyError("boom")
    lv = live()
    lv.start()
    monkeypatch.setitem(ls.HANDLERS, "session.input_audio.mute", broken)
    lv.send({"type": "session.input_audio.mute", "event_id": "m"})
    err = lv.errors()[-1]
    assert err["type"] == "server_error" and "boom" in err["message"] and err["client_event_id"] == "m"
    lv.send({"type": "session.input_audio.unmute"})
    assert lv.events()[-1]["type"] == "session.input_audio.unmuted" and lv.s.phase is Phase.ACTIVE


def test_an_output_fragment_follows_the_audio_it_transcribes(live: Any) -> None:
    lv = live(scenario={"default_reply": "one two three"})
    lv.start()
    lv.audio(voiced(CHUNK * 5))
    lv.silence(END_OF_TURN_MS + 1000)
    seq = [e["type"] for e in lv.events() if e["type"] in ("session.output_audio.delta", "session.output_transcript.delta")]
    deltas = lv.deltas()
    loud_at = [i for i, t in enumerate(seq) if t == "session.output_audio.delta"]
    last_loud = max(n for n, d in zip(loud_at, deltas) if loud(d))
    last_fragment = max(i for i, t in enumerate(seq) if t == "session.output_transcript.delta")
    assert last_fragment == last_loud + 1


def test_memory_stays_flat_over_a_long_session(live: Any) -> None:
    lv = live()
    lv.start()
    second = np.concatenate([voiced(CHUNK * 4), np.zeros(CHUNK * 6, dtype=np.int16)])   # 400 ms speech a second
    for _ in range(300):                                                                 # five minutes
        lv.take(lv.s.receive_text(json.dumps({"type": "session.input_audio.append", "audio": b64(second)})))
    assert lv.s.timeline_ms == 300_000 and lv.s.counts["turns"] == 300 and len(lv.s.queue) <= 2
    assert lv.s.heard_samples <= 24 * 4000 and not lv.s.turns
    lv.out.clear()


def test_speech_inside_one_long_append_still_makes_the_model_yield(live: Any) -> None:
    lv = live(scenario={"default_reply": "one two three four five six seven eight nine ten"})
    lv.start()
    lv.audio(voiced(CHUNK * 5))
    lv.silence(END_OF_TURN_MS + 200)
    assert lv.s.voice is Voice.SPEAKING
    one_second = np.concatenate([voiced(CHUNK * 4), np.zeros(CHUNK * 6, dtype=np.int16)])
    lv.send({"type": "session.input_audio.append", "audio": b64(one_second)})
    assert lv.s.counts["yields"] == 1 and lv.s.voice is Voice.SILENT

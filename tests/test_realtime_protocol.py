"""The realtime process's protocol logic, fed real server traces as if from the socket."""
from __future__ import annotations

import json
from typing import Any

import pytest

from engine.cost import response_cost_usd, transcription_cost_usd
from engine.realtime.protocol import EndOfAudio, Flush, Play, Publish, RealtimeProtocol, Send
from tests.conftest import TRACES

GA_TRACES = sorted(p.name for p in TRACES.glob("*.jsonl") if "-beta-" not in p.name)
BETA_TRACES = sorted(p.name for p in TRACES.glob("*.jsonl") if "-beta-" in p.name)


def replay(name: str, proto: RealtimeProtocol | None = None) -> tuple[RealtimeProtocol, list[Any], list[dict[str, Any]]]:
    # no speaker: everything received counts as heard, so no barge-in of our own interferes
    proto = proto or RealtimeProtocol("gpt-realtime", {"type": "realtime"}, heard_index=lambda: 1 << 62)
    events = [json.loads(line) for line in (TRACES / name).read_text().splitlines() if line.strip()]
    acts: list[Any] = []
    for ev in events:
        acts.extend(proto.on_server_event(ev))
    return proto, acts, events


def published(acts: list[Any], topic: str) -> list[dict[str, Any]]:
    return [a.payload for a in acts if isinstance(a, Publish) and a.topic == topic]


def test_there_are_traces() -> None:
    assert len(GA_TRACES) >= 10 and len(BETA_TRACES) == 3


@pytest.mark.parametrize("name", GA_TRACES)
def test_ga_trace_replays(name: str) -> None:
    proto, acts, events = replay(name)
    # every server event is on the bus, audio replaced by its size
    server_msgs = [a for a in acts if isinstance(a, Publish) and a.topic.startswith("server.")]
    assert len(server_msgs) == len(events)
    for a in server_msgs:
        assert "delta" not in a.payload or a.topic != "server.response.output_audio.delta"
    # the engine's own errors: only the API errors the trace itself holds
    api_errors = [e for e in events if e["type"] == "error"]
    failed_tr = [e for e in events if e["type"].endswith("transcription.failed")]
    errors = published(acts, "engine.error")
    assert len(errors) == len(api_errors) + len(failed_tr), errors
    assert all(e["source"] == "api" for e in errors)
    # model text and transcripts on the bus match the trace
    want_text = [e["text"] for e in events if e["type"] == "response.output_text.done"]
    assert [p["text"] for p in published(acts, "model.text.done")] == want_text
    want_tr = [e["transcript"] for e in events if e["type"] == "response.output_audio_transcript.done"]
    assert [p["text"] for p in published(acts, "model.transcript.done")] == want_tr
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    assert "".join(p["text"] for p in published(acts, "model.transcript.delta")) == deltas
    want_user = [e["transcript"] for e in events if e["type"].endswith("input_audio_transcription.completed")]
    assert sorted(p["text"] for p in published(acts, "user.transcript.done")) == sorted(want_user)
    assert_turn_order(acts, events)
    # cost: the sum of every response's usage at the model's prices
    model = next((e["session"]["model"] for e in events if e["type"] == "session.created"), "gpt-realtime")
    tr_model = next((((e["session"]["audio"]["input"].get("transcription")) or {}).get("model", "")
                     for e in events if e["type"] == "session.updated"), "")
    want_usd = sum(response_cost_usd(model, e["response"].get("usage")) for e in events if e["type"] == "response.done")
    want_usd += sum(transcription_cost_usd(tr_model, e.get("usage")) for e in events
                    if e["type"].endswith("input_audio_transcription.completed"))
    assert proto.total_usd() == pytest.approx(want_usd)
    costs = published(acts, "cost.session")
    if any(e["type"] == "response.done" for e in events):
        assert costs[-1]["usd"] == pytest.approx(want_usd) and want_usd > 0
    # audio deltas become playback frames
    pcm = b"".join(a.pcm for a in acts if isinstance(a, Play))
    import base64
    want_pcm = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    assert len(pcm) == len(want_pcm) // 2 * 2


def assert_turn_order(acts: list[Any], events: list[dict[str, Any]]) -> None:
    """Each user turn's transcript is on the bus before the words of the responses that follow it."""
    transcribed = {e["item_id"] for e in events if e["type"].endswith("input_audio_transcription.completed")}
    committed: list[str] = []
    follows: dict[str, set[str]] = {}  # response id -> user items committed before it
    for e in events:
        if e["type"] == "input_audio_buffer.committed" and e["item_id"] in transcribed:
            committed.append(e["item_id"])
        elif e["type"] == "response.created":
            follows[e["response"]["id"]] = set(committed)
    seen_user: set[str] = set()
    for a in acts:
        if not isinstance(a, Publish):
            continue
        if a.topic == "user.transcript.done":
            seen_user.add(a.payload["item_id"])
        elif a.topic.startswith(("model.transcript.", "model.text.")):
            missing = follows.get(a.payload.get("response_id"), set()) - seen_user
            assert not missing, f"{a.topic} of {a.payload['response_id']} before the user transcript of {missing}"


def test_trace_with_late_user_transcripts_reads_in_turn_order() -> None:
    """Trace 08: the API finishes transcribing turn 1 after the reply to it; the bus says user, model, user, model."""
    _, acts, _ = replay("08-ga-barge-in-cancel-truncate.jsonl")
    order = [a.topic for a in acts if isinstance(a, Publish) and a.topic in ("user.transcript.done", "model.transcript.done")]
    assert order == ["user.transcript.done", "model.transcript.done"] * 2


def test_model_words_are_released_when_a_user_transcript_never_comes() -> None:
    now = {"t": 0.0}
    proto = RealtimeProtocol("gpt-realtime", {}, heard_index=lambda: 1 << 62, clock=lambda: now["t"])
    proto.on_server_event({"type": "session.updated", "session": {"audio": {"input": {
        "transcription": {"model": "whisper-1"}}}}})
    proto.on_server_event({"type": "input_audio_buffer.committed", "item_id": "u1"})
    _audio_turn(proto)
    held = proto.on_server_event({"type": "response.output_audio_transcript.done", "response_id": "resp_1",
                                  "item_id": "item_a", "transcript": "one two three four"})
    assert published(held, "model.transcript.done") == []
    assert published(proto.on_tick(), "model.transcript.done") == []
    now["t"] = 3.5
    late = proto.on_tick()
    assert [p["text"] for p in published(late, "model.transcript.done")] == ["one two three four"]
    assert published(late, "model.transcript.delta")  # the deltas too, in their order
    assert proto.transcripts_late == 1


@pytest.mark.parametrize("name", BETA_TRACES)
def test_beta_trace_is_refused_by_name(name: str) -> None:
    proto, acts, _ = replay(name)
    errors = published(acts, "engine.error")
    assert errors and errors[0]["code"] == "beta_protocol" and errors[0]["fatal"]
    assert "retired beta" in errors[0]["message"] and "GA" in errors[0]["message"]
    assert proto.protocol_refused
    assert not published(acts, "model.text.done") and not any(isinstance(a, Play) for a in acts)


# ------------------------------------------------------------------ barge-in and truncation
def _audio_turn(proto: RealtimeProtocol, rid: str = "resp_1", item: str = "item_a", ms: int = 1000) -> None:
    import base64
    proto.on_server_event({"type": "response.created", "response": {"id": rid, "conversation_id": "conv_1"}})
    proto.on_server_event({"type": "response.output_item.added", "response_id": rid, "item":
                           {"id": item, "type": "message", "role": "assistant"}})
    for _ in range(ms // 100):
        proto.on_server_event({"type": "response.output_audio.delta", "response_id": rid, "item_id": item,
                               "delta": base64.b64encode(bytes(4800)).decode()})
    proto.on_server_event({"type": "response.output_audio_transcript.delta", "response_id": rid, "item_id": item,
                           "delta": "one two three four"})


def _session(interrupt: bool) -> dict[str, Any]:
    return {"type": "session.updated", "session": {"model": "gpt-realtime", "audio": {"input": {
        "turn_detection": {"type": "server_vad", "interrupt_response": interrupt}}}}}


@pytest.mark.parametrize("played_ms, want", [(0, None), (250, 250), (999, 999), (5000, 1000)])
def test_barge_in_truncates_at_what_playback_played(played_ms: int, want: int | None) -> None:
    heard = {"index": 100 * 24}  # the estimate before the flush: 100 ms
    proto = RealtimeProtocol("gpt-realtime", {}, heard_index=lambda: heard["index"], start_index=0)
    proto.on_server_event(_session(interrupt=True))
    _audio_turn(proto, ms=1000)
    acts = proto.on_server_event({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5, "item_id": "u"})
    assert any(isinstance(a, Flush) for a in acts)
    assert not any(isinstance(a, Send) for a in acts)  # the server cancels by itself; truncation waits
    # playback reports the index the listener had heard when the fade ended
    acts = proto.on_command("playback.flushed", {"index": played_ms * 24})
    truncs = [a.event for a in acts if isinstance(a, Send) and a.event["type"] == "conversation.item.truncate"]
    if want is None:
        assert truncs == []  # nothing played: nothing truncated
    else:
        assert truncs == [{"type": "conversation.item.truncate", "item_id": "item_a", "content_index": 0,
                           "audio_end_ms": want}]  # clamped to the 1000 ms received
    assert published(acts, "playback.interrupted")[0]["measured"]
    # later deltas of the interrupted response are dropped
    import base64
    late = proto.on_server_event({"type": "response.output_audio.delta", "response_id": "resp_1", "item_id": "item_a",
                                  "delta": base64.b64encode(bytes(480)).decode()})
    assert not any(isinstance(a, Play) for a in late)


def test_truncation_falls_back_to_the_estimate_without_a_playback_report() -> None:
    now = {"t": 0.0}
    proto = RealtimeProtocol("gpt-realtime", {}, heard_index=lambda: 300 * 24, clock=lambda: now["t"])
    proto.on_server_event(_session(interrupt=True))
    _audio_turn(proto, ms=1000)
    proto.on_server_event({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5, "item_id": "u"})
    assert proto.on_tick() == []
    now["t"] = 1.0
    acts = proto.on_tick()
    truncs = [a.event for a in acts if isinstance(a, Send)]
    assert truncs and truncs[0]["audio_end_ms"] == 300
    assert not published(acts, "playback.interrupted")[0]["measured"]


def test_cancel_command_cancels_when_server_would_not() -> None:
    proto = RealtimeProtocol("gpt-realtime", {}, heard_index=lambda: 2400)
    proto.on_server_event(_session(interrupt=False))
    _audio_turn(proto)
    acts = proto.on_command("cmd.cancel", {"id": "c1"})
    types = [a.event["type"] for a in acts if isinstance(a, Send)]
    assert types == ["response.cancel"]
    assert published(acts, "cmd.ack") == [{"id": "c1", "ok": True}]
    acts = proto.on_command("playback.flushed", {"index": 2400})
    assert [a.event["type"] for a in acts if isinstance(a, Send)] == ["conversation.item.truncate"]
    heard = published(acts, "model.transcript.done")[0]
    assert heard["truncated"] and heard["text"] == ""  # 100 ms of 1000: not one of four words yet


def test_no_barge_in_when_audio_already_heard() -> None:
    proto = RealtimeProtocol("gpt-realtime", {}, heard_index=lambda: 10**9)
    proto.on_server_event(_session(interrupt=True))
    _audio_turn(proto)
    proto.on_server_event({"type": "response.done", "response": {"id": "resp_1", "status": "completed", "output": []}})
    acts = proto.on_server_event({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5, "item_id": "u"})
    assert not any(isinstance(a, (Send, Flush)) for a in acts)


# ------------------------------------------------------------------ client text
def test_say_waits_for_the_active_response() -> None:
    proto = RealtimeProtocol("gpt-realtime", {})
    proto.on_server_event({"type": "response.created", "response": {"id": "r1", "conversation_id": "c"}})
    acts = proto.on_command("cmd.say", {"text": "hi", "id": "s1"})
    assert not any(isinstance(a, Send) for a in acts)
    acts = proto.on_server_event({"type": "response.done", "response": {"id": "r1", "status": "completed", "output": []}})
    sends = [a.event for a in acts if isinstance(a, Send)]
    assert [e["type"] for e in sends] == ["conversation.item.create", "response.create"]
    item_id = sends[0]["item"]["id"]
    acks = published(proto.on_server_event({"type": "conversation.item.added", "item": {"id": item_id, "type": "message",
                                                                                          "role": "user", "content": []}}), "cmd.ack")
    assert acks == [{"id": "s1", "ok": True, "item_id": item_id}]
    # a duplicate (a client re-sending until it sees the ack) is ignored
    assert proto.on_command("cmd.say", {"text": "hi", "id": "s1"}) == []


def test_system_message_without_response() -> None:
    proto = RealtimeProtocol("gpt-realtime", {})
    acts = proto.on_command("cmd.say", {"text": "The user is Ada.", "role": "system", "respond": False})
    sends = [a.event for a in acts if isinstance(a, Send)]
    assert len(sends) == 1 and sends[0]["item"]["role"] == "system"


@pytest.mark.parametrize("body, words", [({"text": ""}, "non-empty"), ({"text": "x", "role": "robot"}, "role"),
                                         ({"text": "x", "respond": "yes"}, "respond")])
def test_bad_commands_are_reported(body: dict[str, Any], words: str) -> None:
    proto = RealtimeProtocol("gpt-realtime", {})
    acts = proto.on_command("cmd.say", {**body, "id": "bad"})
    assert words in published(acts, "engine.error")[0]["message"]
    assert published(acts, "cmd.ack")[0]["ok"] is False
    assert proto.malformed_commands == 1


def test_budget_stops_new_responses() -> None:
    proto = RealtimeProtocol("gpt-realtime", {}, budget_usd=0.0001)
    usage = {"input_token_details": {"text_tokens": 1000}, "output_token_details": {"audio_tokens": 100}}
    acts = proto.on_server_event({"type": "response.done", "response": {"id": "r", "status": "completed",
                                                                         "output": [], "usage": usage}})
    assert published(acts, "engine.budget")[0]["exceeded"]
    acts = proto.on_command("cmd.say", {"text": "more"})
    assert not any(isinstance(a, Send) and a.event["type"] == "response.create" for a in acts)


def test_tool_timeout_answers_the_model() -> None:
    now = {"t": 0.0}
    proto = RealtimeProtocol("gpt-realtime", {}, clock=lambda: now["t"])
    proto.on_command("cmd.tool.register", {"name": "ask_client", "timeout_s": 2})
    proto.on_server_event({"type": "response.function_call_arguments.done", "call_id": "call_1", "name": "ask_client",
                           "arguments": "{}", "item_id": "i", "response_id": "r"})
    assert proto.on_tick() == []
    now["t"] = 3.0
    sends = [a.event for a in proto.on_tick() if isinstance(a, Send)]
    assert sends[0]["item"]["type"] == "function_call_output" and "did not answer" in sends[0]["item"]["output"]
    assert sends[1]["type"] == "response.create"


def test_end_of_audio_marks_the_stream() -> None:
    proto = RealtimeProtocol("gpt-realtime", {})
    acts = proto.on_server_event({"type": "response.output_audio.done", "response_id": "r", "item_id": "i",
                                  "output_index": 0, "content_index": 0})
    assert any(isinstance(a, EndOfAudio) for a in acts)


def test_next_deadline_names_the_earliest_timer() -> None:
    now = [100.0]
    p = RealtimeProtocol("gpt-realtime", {}, heard_index=lambda: 0, clock=lambda: now[0], min_speech_ms=300)
    assert p.next_deadline() is None
    p.tool_calls["c1"] = ("lookup", 130.0)
    p.user_transcripts_due["i1"] = 103.0
    assert p.next_deadline() == 103.0
    p.pending_barge_in, p.speech_started_at = True, 100.0
    assert p.next_deadline() == pytest.approx(100.3)

"""GA session fields the local server used to refuse or ignore (issue 12): transcription
languages/keywords/delay, max_output_tokens up to the model's limit and enforced,
tool_choice honoured, idle_timeout_ms. Every event is validated against the official types."""
from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import RawClient

pytestmark = pytest.mark.timeout(60)

WEATHER = {"type": "function", "name": "get_weather", "description": "weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CLOCK = {"type": "function", "name": "get_time", "description": "time", "parameters": {"type": "object", "properties": {}}}


def _connect(server: Any, validator: Any, model: str = "gpt-realtime") -> RawClient:
    c = RawClient(server.url + f"?model={model}", validator)
    c.until("session.created")
    return c


def _update(c: RawClient, **session: Any) -> dict[str, Any]:
    c.send({"type": "session.update", "session": {"type": "realtime", **session}})
    while True:
        ev = c.recv()
        if ev["type"] in ("session.updated", "error"):
            return ev


def _ask(c: RawClient, text: str, **response: Any) -> dict[str, Any]:
    c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                         "content": [{"type": "input_text", "text": text}]}})
    c.send({"type": "response.create", **({"response": response} if response else {})})
    return c.until("response.done")["response"]


def test_transcription_languages_keywords_delay_are_accepted(server: Any, validator: Any) -> None:
    c = _connect(server, validator)
    tr = {"model": "gpt-realtime-whisper", "languages": ["en", "fr"], "keywords": ["realtalk"], "delay": "low"}
    ev = _update(c, audio={"input": {"transcription": tr}})
    assert ev["type"] == "session.updated", ev
    got = ev["session"]["audio"]["input"]["transcription"]
    assert {k: got[k] for k in tr} == tr
    for bad, param in (({"delay": "instant"}, "delay"), ({"languages": "en"}, "languages"),
                       ({"keywords": [1]}, "keywords"), ({"dialect": "x"}, "dialect")):
        err = _update(c, audio={"input": {"transcription": {"model": "whisper-1", **bad}}})
        assert err["type"] == "error" and err["error"]["param"] == f"session.audio.input.transcription.{param}", err
    c.close()


def test_max_output_tokens_limit_follows_the_model(server: Any, validator: Any) -> None:
    c = _connect(server, validator, "gpt-realtime-2")
    assert _update(c, max_output_tokens=32000)["session"]["max_output_tokens"] == 32000
    err = _update(c, max_output_tokens=32001)["error"]
    assert err["param"] == "session.max_output_tokens" and "32000" in err["message"]
    c.close()
    c = _connect(server, validator, "gpt-realtime")
    err = _update(c, max_output_tokens=5000)["error"]
    assert err["param"] == "session.max_output_tokens" and "4096" in err["message"]
    c.close()


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_max_output_tokens_is_enforced(server: Any, validator: Any, modality: str) -> None:
    c = _connect(server, validator)
    _update(c, output_modalities=[modality])
    done = _ask(c, "please repeat this rather long sentence back to me in full, word by word", max_output_tokens=6)
    assert done["status"] == "incomplete", done
    assert done["status_details"]["type"] == "incomplete"
    assert done["status_details"]["reason"] == "max_output_tokens"
    assert done["usage"]["output_tokens"] <= 6
    assert done["output"][0]["status"] == "incomplete"
    assert _ask(c, "short")["status"] == "completed"  # the session default ('inf') still applies
    c.close()


def _call_name(done: dict[str, Any]) -> str | None:
    calls = [o for o in done["output"] if o["type"] == "function_call"]
    return calls[0]["name"] if calls else None


def test_tool_choice_is_honoured(make_server: Any, validator: Any) -> None:
    from engine.server.scenario import parse_scenario
    sc = parse_scenario({"turns": [{"match": {"text": "weather"}, "call": {"name": "get_weather",
                                                                            "arguments": {"city": "Paris"}}}]})
    server = make_server(scenario=sc)
    c = _connect(server, validator)
    _update(c, output_modalities=["text"], tools=[WEATHER, CLOCK])
    assert _call_name(_ask(c, "what is the weather")) == "get_weather"               # auto
    assert _call_name(_ask(c, "what is the weather", tool_choice="none")) is None
    assert _call_name(_ask(c, "hello", tool_choice="required")) is not None
    named = _ask(c, "what is the weather", tool_choice={"type": "function", "name": "get_time"})
    assert _call_name(named) == "get_time"
    assert _update(c, tool_choice="none")["session"]["tool_choice"] == "none"
    assert _call_name(_ask(c, "what is the weather")) is None                         # the session's choice
    err = _update(c, tool_choice={"type": "function", "name": "nope"})
    assert err["type"] == "error" and err["error"]["param"] == "session.tool_choice", err
    err = _update(c, tool_choice="sometimes")
    assert err["type"] == "error" and err["error"]["param"] == "session.tool_choice", err
    c.close()


def test_idle_timeout_triggers_a_response(server: Any, validator: Any) -> None:
    """server is at speed 20: idle_timeout_ms 5000 runs out after 0.25 s of silence."""
    import base64
    c = _connect(server, validator)
    ev = _update(c, output_modalities=["text"], audio={"input": {"turn_detection": {
        "type": "server_vad", "idle_timeout_ms": 5000}}})
    assert ev["session"]["audio"]["input"]["turn_detection"]["idle_timeout_ms"] == 5000
    silence = base64.b64encode(bytes(4800)).decode()
    for _ in range(5):
        c.send({"type": "input_audio_buffer.append", "audio": silence})  # a mic streaming silence is still idle
    t = c.until("input_audio_buffer.timeout_triggered", timeout=10)
    assert t["audio_end_ms"] >= t["audio_start_ms"] >= 0 and t["item_id"].startswith("item_")
    committed = c.until("input_audio_buffer.committed")
    assert committed["item_id"] == t["item_id"]
    done = c.until("response.done")["response"]
    assert done["status"] == "completed"
    text = done["output"][0]["content"][0]["text"]
    assert text == "Are you still there?"
    # and again after that reply, once the silence lasts
    assert c.until("input_audio_buffer.timeout_triggered", timeout=10)["item_id"] != t["item_id"]
    err = _update(c, audio={"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": -1}}})
    assert err["type"] == "error" and err["error"]["param"].endswith("idle_timeout_ms")
    c.close()


def test_no_idle_timeout_without_the_setting(server: Any, validator: Any) -> None:
    c = _connect(server, validator)
    assert _ask(c, "hi", output_modalities=["text"])["status"] == "completed"
    c.ws.settimeout(1.0)
    import websocket
    with pytest.raises(websocket.WebSocketTimeoutException):
        c.ws.recv()  # nothing arrives on its own
    c.close()


def test_semantic_vad_eagerness_sets_the_end_of_turn_silence() -> None:
    import base64
    import json
    import numpy as np
    from engine.server.session import ServerSession
    from engine.server.voice import synthesize
    pcm = np.concatenate([np.zeros(12000, np.int16), synthesize("hello there how are you", "alloy", 1.0),
                          np.zeros(24000 * 3, np.int16)])
    ends = {}
    for eagerness in ("low", "medium", "high", "auto"):
        s = ServerSession("gpt-realtime")
        s.receive_text(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "semantic_vad", "eagerness": eagerness}}}}}))
        for i in range(0, len(pcm), 2400):
            acts = s.receive_text(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(pcm[i:i + 2400].tobytes()).decode()}))
            for ev in acts.send:
                if ev["type"] == "input_audio_buffer.speech_stopped":
                    ends[eagerness] = ev["audio_end_ms"]
    assert ends["high"] < ends["medium"] < ends["low"]
    assert ends["auto"] == ends["medium"]  # auto is medium, as the GA docs say


@pytest.mark.parametrize("field, good, bad", [
    ("truncation", {"type": "retention_ratio", "retention_ratio": 0.8, "token_limits": {"post_instructions": 5000}},
     {"type": "retention_ratio", "retention_ratio": 2}),
    ("truncation", "disabled", "sometimes"),
    ("reasoning", {"effort": "low"}, {"effort": "extreme"}),
    ("tracing", {"workflow_name": "w", "group_id": "g", "metadata": {"a": 1}}, "on"),
    ("include", ["item.input_audio_transcription.logprobs"], ["everything"]),
    ("parallel_tool_calls", False, "yes"),
    ("prompt", {"id": "pmpt_1", "version": "2", "variables": {"name": "Ada"}}, {"version": "2"}),
])
def test_stored_session_fields_are_checked_by_their_ga_types(server: Any, validator: Any, field: str,
                                                             good: Any, bad: Any) -> None:
    c = _connect(server, validator)
    ev = _update(c, **{field: good})
    assert ev["type"] == "session.updated" and ev["session"][field] == good, ev
    err = _update(c, **{field: bad})
    assert err["type"] == "error" and err["error"]["param"].startswith(f"session.{field}"), err
    c.close()


@pytest.mark.parametrize("response, param", [
    ({"reasoning": {"effort": "extreme"}}, "response.reasoning.effort"),
    ({"parallel_tool_calls": "yes"}, "response.parallel_tool_calls"),
    ({"instructions": 3}, "response.instructions"),
])
def test_response_options_are_checked_too(server: Any, validator: Any, response: dict[str, Any], param: str) -> None:
    c = _connect(server, validator)
    c.send({"type": "response.create", "response": response})
    assert c.until("error")["error"]["param"] == param
    c.close()

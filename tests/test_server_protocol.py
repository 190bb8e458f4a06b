"""Local server: protocol rules, bad input, faults, and event order against real traces."""
from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
import websocket

from tests.helpers import TRACES, RawClient, chunks_b64, read_wav, structural

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(server: Any, validator: Any) -> Any:
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    assert c.recv()["type"] == "session.created"
    yield c
    c.close()


def user_text(text: str) -> dict[str, Any]:
    return {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                          "content": [{"type": "input_text", "text": text}]}}


def text_mode(c: RawClient) -> None:
    c.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}})
    c.until("session.updated")


# ------------------------------------------------------------------ bad input: error, socket stays open
@pytest.mark.parametrize("payload, code, param", [
    ("this is not json", "invalid_json", None),
    ({"type": "no.such.event", "event_id": "evt_1"}, "invalid_value", "type"),
    ({"event_id": "evt_1"}, "invalid_event", "type"),
    ({"type": "conversation.item.retrieve", "event_id": "evt_1"}, "missing_required_parameter", "item_id"),
    ({"type": "conversation.item.truncate", "event_id": "evt_1", "item_id": "x", "content_index": "0",
      "audio_end_ms": 5}, "invalid_type", "content_index"),
    ({"type": "input_audio_buffer.append", "event_id": "evt_1", "audio": "@@not base64@@"}, "invalid_value", "audio"),
    ({"type": "session.update", "event_id": "evt_1", "session": {"type": "realtime", "temperature": 0.8}},
     "unknown_parameter", "session.temperature"),
    ({"type": "session.update", "event_id": "evt_1", "session": {"modalities": ["text"]}},
     "unknown_parameter", "session.modalities"),
    ({"type": "session.update", "event_id": "evt_1", "session": {"output_modalities": ["text"]}},
     "missing_required_parameter", "session.type"),
    ({"type": "response.create", "event_id": "evt_1", "bogus": 1}, "unknown_parameter", "bogus"),
])
def test_bad_input_gets_error_and_session_survives(client: RawClient, payload: Any, code: str, param: str | None) -> None:
    client.send(payload if isinstance(payload, str) else json.dumps(payload))
    err = client.until("error")["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code
    assert err["param"] == param
    assert err["message"]
    if isinstance(payload, dict) and "event_id" in payload:
        assert err["event_id"] == "evt_1"
    # the session is intact: a text turn still works
    text_mode(client)
    client.send(user_text("still there?"))
    client.send({"type": "response.create"})
    assert client.until("response.done")["response"]["status"] == "completed"


def test_event_over_15_mib(client: RawClient) -> None:
    big = "A" * (15 * 1024 * 1024 + 16)
    client.send(json.dumps({"type": "input_audio_buffer.append", "event_id": "big", "audio": big}))
    err = client.until("error")["error"]
    assert "15 MiB" in err["message"]
    client.send({"type": "input_audio_buffer.clear"})
    client.until("input_audio_buffer.cleared")


def test_beta_header_is_refused_like_the_real_service(server: Any, validator: Any) -> None:
    ws = websocket.create_connection(server.url + "?model=gpt-realtime",
                                     header=["Authorization: Bearer x", "OpenAI-Beta: realtime=v1"], timeout=5)
    ev = json.loads(ws.recv())
    validator.check(ev)
    assert ev["error"]["code"] == "beta_api_shape_disabled"
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(data[:2], "big") == 4000


def test_required_key(make_server: Any) -> None:
    server = make_server(api_key="sk-secret")
    with pytest.raises(websocket.WebSocketBadStatusException) as exc:
        websocket.create_connection(server.url + "?model=gpt-realtime", header=["Authorization: Bearer wrong"])
    assert exc.value.status_code == 401
    ok = websocket.create_connection(server.url + "?model=gpt-realtime", header=["Authorization: Bearer sk-secret"])
    assert json.loads(ok.recv())["type"] == "session.created"
    ok.close()


# ------------------------------------------------------------------ protocol rules
def test_commit_needs_100_ms(client: RawClient) -> None:
    client.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}})
    client.until("session.updated")
    client.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(48 * 50)).decode()})
    client.send({"type": "input_audio_buffer.commit"})
    err = client.until("error")["error"]
    assert err["code"] == "input_audio_buffer_commit_empty"
    assert "50.00ms" in err["message"]
    client.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(48 * 60)).decode()})
    client.send({"type": "input_audio_buffer.commit"})
    assert client.until("input_audio_buffer.committed")["item_id"].startswith("item_")


def test_one_active_response_and_out_of_band(make_server: Any, validator: Any) -> None:
    server = make_server(speed=1.0)
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    c.until("session.created")
    c.send(user_text("Tell me something long enough to still be talking"))
    c.send({"type": "response.create"})
    first = c.until("response.created")["response"]["id"]
    c.send({"type": "response.create", "event_id": "second"})
    err = c.until("error")["error"]
    assert err["code"] == "conversation_already_has_active_response" and first in err["message"]
    assert err["event_id"] == "second"
    c.send({"type": "response.create", "response": {"conversation": "none", "output_modalities": ["text"],
                                                    "metadata": {"purpose": "summary"}}})
    oob = None
    while oob is None:
        ev = c.until("response.done")
        if ev["response"]["metadata"] == {"purpose": "summary"}:
            oob = ev
    assert oob["response"]["conversation_id"] is None
    c.send({"type": "response.cancel"})
    done = c.until("response.done")
    assert done["response"]["id"] == first and done["response"]["status"] == "cancelled"
    c.close()


def test_items_previous_id_retrieve_delete(client: RawClient) -> None:
    client.send(user_text("one"))
    a = client.until("conversation.item.done")["item"]["id"]
    client.send({"type": "conversation.item.create", "previous_item_id": "root",
                 "item": {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "zero"}]}})
    ev = client.until("conversation.item.added")
    assert ev["previous_item_id"] is None
    zero = ev["item"]["id"]
    client.send({"type": "conversation.item.create", "previous_item_id": "item_doesnotexist", "item": user_text("x")["item"]})
    assert client.until("error")["error"]["param"] == "previous_item_id"
    client.send({"type": "conversation.item.retrieve", "item_id": a})
    got = client.until("conversation.item.retrieved")["item"]
    assert got["content"][0]["text"] == "one"
    client.send({"type": "conversation.item.delete", "item_id": zero})
    assert client.until("conversation.item.deleted")["item_id"] == zero
    client.send({"type": "conversation.item.retrieve", "item_id": zero})
    assert "not found" in client.until("error")["error"]["message"]


def test_truncate_rules(client: RawClient) -> None:
    client.send(user_text("hi"))
    user_id = client.until("conversation.item.done")["item"]["id"]
    client.send({"type": "conversation.item.truncate", "item_id": user_id, "content_index": 0, "audio_end_ms": 0})
    assert "Only model output audio" in client.until("error")["error"]["message"]


@pytest.mark.parametrize("fmt", ["audio/pcmu", "audio/pcma"])
def test_g711_both_ways(server: Any, validator: Any, speech_wav: Any, fmt: str) -> None:
    from engine.codec import encode_audio
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    c.until("session.created")
    c.send({"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"format": {"type": fmt}, "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}},
        "output": {"format": {"type": fmt}}}}})
    assert c.until("session.updated")["session"]["audio"]["output"]["format"] == {"type": fmt}
    pcm = read_wav(speech_wav("Hello there, this is a test.", pad_s=0.8))
    g711 = encode_audio(pcm, fmt)
    for i in range(0, len(g711), 160):  # 20 ms at 8 kHz
        c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(g711[i:i + 160]).decode()})
    c.until("input_audio_buffer.speech_started")
    evs = []
    while True:
        ev = c.recv()
        evs.append(ev)
        if ev["type"] == "response.done":
            break
    out = b"".join(base64.b64decode(e["delta"]) for e in evs if e["type"] == "response.output_audio.delta")
    assert len(out) > 4000  # > 0.5 s at 8 kHz, one byte per sample
    c.close()


# ------------------------------------------------------------------ faults
@pytest.mark.parametrize("code", [1001, 1006, 1011])
def test_drop_connection(make_server: Any, code: int) -> None:
    from engine.server.faults import Faults
    server = make_server(faults=Faults(drop_at_event="response.created", drop_code=code))
    c = RawClient(server.url + "?model=gpt-realtime")
    c.until("session.created")
    c.send(user_text("hi"))
    c.send({"type": "response.create"})
    close_code = None
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
        for _ in range(10):
            opcode, data = c.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                close_code = int.from_bytes(data[:2], "big")
                c.ws.recv_data(control_frame=True)
    assert close_code == (None if code == 1006 else code)


def test_max_session_duration(make_server: Any) -> None:
    from engine.server.faults import Faults
    server = make_server(faults=Faults(max_session_s=0.3))
    ws = websocket.create_connection(server.url + "?model=gpt-realtime", header=["Authorization: Bearer x"])
    ws.recv()
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(data[:2], "big") == 1001
    assert data[2:].decode() == "Your session hit the maximum duration of 60 minutes."


def test_injected_error_and_first_delta_delay(make_server: Any, validator: Any) -> None:
    import time
    from engine.server.faults import Faults
    server = make_server(faults=Faults(first_delta_delay_ms=300, errors=[
        {"after_event": "response.created", "code": "server_error", "message": "boom", "type": "server_error"}]))
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    c.until("session.created")
    text_mode(c)
    c.send(user_text("hi"))
    t0 = time.monotonic()
    c.send({"type": "response.create"})
    assert c.until("error")["error"]["message"] == "boom"
    c.until("response.output_text.delta")
    assert time.monotonic() - t0 >= 0.28
    c.until("response.done")


# ------------------------------------------------------------------ sequences like the real service's
def trace_types(name: str) -> list[str]:
    return [json.loads(line)["type"] for line in (TRACES / name).read_text().splitlines()]


def test_text_in_audio_out_sequence_matches_trace_01(client: RawClient) -> None:
    client.send({"type": "session.update", "session": {"type": "realtime", "instructions": "Answer briefly."}})
    client.send(user_text("Say a short greeting."))
    client.send({"type": "response.create"})
    client.until("response.done")
    assert structural([e["type"] for e in client.events]) == structural(trace_types("01-ga-text-in-audio-out.jsonl"))


def test_function_call_sequence_matches_trace_03(make_server: Any, validator: Any) -> None:
    from engine.server.scenario import parse_scenario
    server = make_server(scenario=parse_scenario({"turns": [{"match": {"turn": 1}, "call": {
        "name": "get_weather", "arguments": {"city": "London"}}, "then": "It is {output}."}]}))
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    c.until("session.created")
    c.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"], "tools": [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]}})
    c.send(user_text("weather in London?"))
    c.send({"type": "response.create"})
    call = c.until("response.function_call_arguments.done")
    c.until("response.done")
    c.send({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": call["call_id"],
                                                         "output": "foggy"}})
    c.send({"type": "response.create"})
    c.until("response.done")
    assert structural([e["type"] for e in c.events]) == structural(trace_types("03-ga-function-call-round.jsonl"))
    c.close()


def _vad_session(c: RawClient) -> None:
    c.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "transcription": {"model": "gpt-realtime-whisper"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})


def test_vad_turn_with_transcription_matches_trace_02(server: Any, validator: Any, speech_wav: Any) -> None:
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    c.until("session.created")
    _vad_session(c)
    for b64 in chunks_b64(read_wav(speech_wav("Hello, my name is Marcelo.", pad_s=0.8))):
        c.send({"type": "input_audio_buffer.append", "audio": b64})
    c.until("response.done")
    types = [e["type"] for e in c.events]
    assert structural(types) == structural(trace_types("02-ga-server-vad-input-transcription.jsonl"))
    assert "conversation.item.input_audio_transcription.completed" in types
    completed = next(e for e in c.events if e["type"] == "conversation.item.input_audio_transcription.completed")
    assert completed["usage"]["type"] == "duration"
    c.close()


def test_barge_in_sequence_matches_trace_08(make_server: Any, validator: Any, speech_wav: Any) -> None:
    server = make_server(speed=1.0)
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    c.until("session.created")
    _vad_session(c)
    quiet = np.zeros(24 * 400, dtype=np.int16)
    speech = read_wav(speech_wav("Hello, my name is Marcelo.", pad_s=0.1))
    for b64 in chunks_b64(np.concatenate([quiet, speech, quiet])):
        c.send({"type": "input_audio_buffer.append", "audio": b64})
    delta = c.until("response.output_audio.delta")
    # the user talks over the reply: the server cancels it (turn_detected)
    for b64 in chunks_b64(np.concatenate([speech, quiet])):
        c.send({"type": "input_audio_buffer.append", "audio": b64})
    done = c.until("response.done")
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    assert done["response"]["output"][0]["status"] == "incomplete"
    c.until("conversation.item.done")  # the new user item
    c.send({"type": "conversation.item.truncate", "item_id": delta["item_id"], "content_index": 0, "audio_end_ms": 0})
    c.until("conversation.item.truncated")
    c.until("response.done")
    ours = structural([e["type"] for e in c.events])
    theirs = structural(trace_types("08-ga-barge-in-cancel-truncate.jsonl"))
    # the truncate is the client's, so where its answer lands depends on the client's timing
    assert ours.index("conversation.item.truncated") > ours.index("response.done")
    assert [t for t in ours if t != "conversation.item.truncated"] == [t for t in theirs if t != "conversation.item.truncated"]
    c.close()


def test_a_send_to_a_client_gone_mid_reply_ends_the_session_quietly() -> None:
    """An engine that stops while a reply streams closes its socket between two deltas: the stream's
    next send finds it closed. That ends the session (the reader cancels the streams); it is no
    server error. The send raised, and the server logged "response task failed" with a traceback."""
    import asyncio
    from typing import cast

    from websockets.exceptions import ConnectionClosedOK
    from websockets.frames import Close

    from engine.server.app import Connection, ServerConfig

    class GoneSocket:
        sent = 0

        async def send(self, text: str) -> None:
            self.sent += 1
            raise ConnectionClosedOK(Close(1000, "stopping"), Close(1000, "stopping"), True)

    ws = GoneSocket()
    conn = Connection(cast(Any, ws), ServerConfig(asr=False), "gpt-realtime", 1.0)
    delta = {"type": "response.output_audio.delta", "event_id": "event_1", "response_id": "resp_1",
             "item_id": "item_1", "output_index": 0, "content_index": 0, "delta": ""}
    asyncio.run(conn.send(delta))
    assert conn.closed and ws.sent == 1
    asyncio.run(conn.send(delta))   # the session is over: nothing more goes to the socket
    assert ws.sent == 1

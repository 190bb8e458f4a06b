"""The official openai SDK against the local server; every event validated against
the SDK's own GA types."""
from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.helpers import chunks_b64, read_wav

pytestmark = pytest.mark.timeout(60)


def _client(server: Any) -> Any:
    from openai import OpenAI
    return OpenAI(api_key="sk-local", websocket_base_url=server.base)


def collect(conn: Any, validator: Any, until: str, timeout: float = 20) -> list[dict[str, Any]]:
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = conn.recv_bytes()
        ev = json.loads(raw)
        validator.check(ev)
        out.append(ev)
        if ev["type"] == until:
            return out
    raise AssertionError(f"no {until}")


def test_text_turn(server: Any, validator: Any) -> None:
    with _client(server).realtime.connect(model="gpt-realtime") as conn:
        first = collect(conn, validator, "session.created")
        assert first[0]["session"]["id"].startswith("sess_")
        conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "Hello server"}]})
        conn.response.create()
        evs = collect(conn, validator, "response.done")
        text = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
        assert "Hello server" in text
        done = evs[-1]["response"]
        assert done["status"] == "completed" and done["id"].startswith("resp_")
        assert done["usage"]["output_token_details"]["text_tokens"] > 0


def test_audio_turn_server_vad(server: Any, validator: Any, speech_wav: Any) -> None:
    pcm = read_wav(speech_wav("What is the capital of France?", pad_s=1.0))
    with _client(server).realtime.connect(model="gpt-realtime") as conn:
        collect(conn, validator, "session.created")
        conn.session.update(session={"type": "realtime", "audio": {"input": {
            "transcription": {"model": "whisper-1"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 400}}}})
        collect(conn, validator, "session.updated")
        for b64 in chunks_b64(pcm, 20):
            conn.input_audio_buffer.append(audio=b64)
        evs = collect(conn, validator, "response.done")
        types = [e["type"] for e in evs]
        for t in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                  "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
                  "response.output_audio.delta", "response.output_audio_transcript.done"):
            assert t in types, t
        started = next(e for e in evs if e["type"] == "input_audio_buffer.speech_started")
        stopped = next(e for e in evs if e["type"] == "input_audio_buffer.speech_stopped")
        # the padding is 1 s; speech starts after it (minus prefix padding) and ends before the end of audio
        assert 500 <= started["audio_start_ms"] <= 1100
        assert started["audio_start_ms"] < stopped["audio_end_ms"] <= len(pcm) / 24
        audio_bytes = sum(len(e["delta"]) * 3 // 4 for e in evs if e["type"] == "response.output_audio.delta")
        assert audio_bytes > 24000  # more than half a second of speech
        assert evs[-1]["response"]["usage"]["input_token_details"]["audio_tokens"] > 0


def test_function_call_round_trip(make_server: Any, validator: Any) -> None:
    from engine.server.scenario import parse_scenario
    sc = parse_scenario({"turns": [{"match": {"text": "weather"},
                                    "call": {"name": "get_weather", "arguments": {"city": "London"}},
                                    "then": "It is {output}."}]})
    server = make_server(scenario=sc)
    with _client(server).realtime.connect(model="gpt-realtime") as conn:
        collect(conn, validator, "session.created")
        conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "tools": [
            {"type": "function", "name": "get_weather", "description": "weather",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]})
        conn.conversation.item.create(item={"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "What's the weather?"}]})
        conn.response.create()
        evs = collect(conn, validator, "response.done")
        call = next(e for e in evs if e["type"] == "response.function_call_arguments.done")
        assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "London"}
        conn.conversation.item.create(item={"type": "function_call_output", "call_id": call["call_id"],
                                            "output": "foggy and 12 degrees"})
        conn.response.create()
        evs = collect(conn, validator, "response.done")
        done = next(e for e in evs if e["type"] == "response.output_text.done")
        assert done["text"] == "It is foggy and 12 degrees."


def test_cancel_and_truncate(make_server: Any, validator: Any) -> None:
    server = make_server(speed=1.0)  # real time, so the response is still running when we cancel
    with _client(server).realtime.connect(model="gpt-realtime") as conn:
        collect(conn, validator, "session.created")
        conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Please tell me a rather long story about the sea and the ships"}]})
        conn.response.create()
        evs = collect(conn, validator, "response.output_audio.delta")
        item_id = evs[-1]["item_id"]
        got_ms = len(evs[-1]["delta"]) * 3 // 4 / 48
        conn.response.cancel()
        evs = collect(conn, validator, "response.done")
        assert evs[-1]["response"]["status"] == "cancelled"
        assert evs[-1]["response"]["status_details"]["reason"] == "client_cancelled"
        received_ms = got_ms + sum(len(e["delta"]) * 3 // 4 / 48 for e in evs if e["type"] == "response.output_audio.delta")
        conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=int(received_ms) // 2)
        ev = collect(conn, validator, "conversation.item.truncated")[-1]
        assert ev["audio_end_ms"] == int(received_ms) // 2
        conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=60_000)
        err = collect(conn, validator, "error")[-1]
        assert "already shorter than 60000ms" in err["error"]["message"]
        # the session survives
        conn.response.cancel()
        err = collect(conn, validator, "error")[-1]
        assert err["error"]["code"] == "response_cancel_not_active"

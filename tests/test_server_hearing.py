"""The local server hears its own voice: user audio is decoded against the phrases the session
expects (engine/server/expect.py), and a user who names a tool gets it called, by text or by voice."""
from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from engine.codec import decode_audio, encode_audio
from engine.server.expect import expected_phrases
from engine.server.scenario import parse_scenario
from engine.server.session import ServerSession
from tests.helpers import RawClient

pytestmark = pytest.mark.timeout(120)

#: the README's tool, as engine/api/client.py registers it (its signature: collection_point(booking: str))
README_TOOL = {"type": "function", "name": "collection_point", "description": "Where a booking's car is collected.",
               "parameters": {"type": "object", "properties": {"booking": {"type": "string"}}, "required": ["booking"]}}
README_CONTEXT = "The customer's booking is Avis ZX9, collection at 10:00."
QUESTION = "Where exactly is the collection point?"


def test_expected_phrases_come_from_scenario_tools_instructions_and_typed_text() -> None:
    sc = parse_scenario({"expect": ["Where is the collection point?"],
                         "turns": [{"match": {"text": "capital"}, "reply": "Paris."},
                                   {"match": {"turn": 2}, "hear": "good bye"}]})
    phrases = expected_phrases(sc.phrases(), [README_TOOL, {"type": "mcp", "server_label": "x"}],
                               'Say "welcome aboard" first.',
                               [("system", README_CONTEXT), ("assistant", "You said: the electric or to."),
                                ("user", "When can I pick up the car?")])
    assert phrases == ("where is the collection point", "capital", "good bye", "collection point", "welcome aboard",
                       "when can i pick up the car", "the customer's booking is avis zx", "collection at")


def _session_with_readme_tool() -> ServerSession:
    s = ServerSession("gpt-realtime")
    s.receive_text(json.dumps({"type": "session.update", "session": {"type": "realtime", "tools": [README_TOOL],
                                                                     "audio": {"input": {"turn_detection": None}}}}))
    s.receive_text(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "system", "content": [{"type": "input_text", "text": README_CONTEXT}]}}))
    return s


def _ask(s: ServerSession, text: str, **response: Any) -> Any:
    s.receive_text(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    resp = s.receive_text(json.dumps({"type": "response.create", "response": response})).start[0]
    s.plan(resp)
    return resp


def test_a_user_who_names_a_tool_gets_it_called_with_arguments_from_the_conversation() -> None:
    s = _session_with_readme_tool()
    resp = _ask(s, QUESTION)
    assert resp.call is not None and resp.call[0] == "collection_point"
    assert json.loads(resp.call[1]) == {"booking": "Avis ZX9"}
    list(s.response_steps(resp, None, speed=1000.0))
    s.receive_text(json.dumps({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": resp.call[2],
        "output": json.dumps({"collection_point": "Northern Train Station, desk 4"})}}))
    after = s.receive_text(json.dumps({"type": "response.create"})).start[0]
    s.plan(after)
    assert after.text == "The tool answered: Northern Train Station, desk 4."


@pytest.mark.parametrize("question, choice, called", [
    ("Where is the connection point?", "auto", None),          # not its name
    (QUESTION, "none", None),
    ("What time is it?", "required", "collection_point"),
])
def test_tool_choice_still_rules(question: str, choice: str, called: str | None) -> None:
    resp = _ask(_session_with_readme_tool(), question, tool_choice=choice)
    assert (resp.call[0] if resp.call else None) == called


def test_a_scenario_rule_still_comes_first() -> None:
    s = ServerSession("gpt-realtime", parse_scenario({"turns": [{"match": {"text": "collection"}, "reply": "Desk 4."}]}))
    s.receive_text(json.dumps({"type": "session.update", "session": {"type": "realtime", "tools": [README_TOOL]}}))
    resp = _ask(s, QUESTION)
    assert resp.call is None and resp.text == "Desk 4."


def _speech(text: str, voice: str, fmt: str = "audio/pcm") -> np.ndarray:
    from engine.server.voice import synthesize
    return decode_audio(encode_audio(synthesize(text, voice), fmt), fmt)


@pytest.mark.parametrize("voice, fmt", [("alloy", "audio/pcm"), ("marin", "audio/pcm"), ("marin", "audio/pcmu")])
def test_the_recogniser_hears_the_tool_name_it_expects(voice: str, fmt: str) -> None:
    """Free decoding misses "collection point" in each of these; with the session's phrases it is heard."""
    from engine.server.voice import Recognizer
    s = _session_with_readme_tool()
    phrases = s.expected_phrases()
    pcm = _speech(QUESTION, voice, fmt)
    assert "collection point" not in Recognizer.transcribe(pcm)
    assert "collection point" in Recognizer.transcribe(pcm, phrases)


def test_speech_outside_the_phrases_is_decoded_freely() -> None:
    from engine.server.voice import Recognizer
    heard = Recognizer.recognize(_speech("Can you hear me?", "marin"), ("collection point", "a blue fiat"))
    assert (heard.how, heard.text) == ("free", "can you hear me")


@pytest.mark.parametrize("by", ["text", "voice"])
def test_the_readme_tool_is_called_through_the_local_server(make_server: Any, validator: Any, by: str) -> None:
    """The README's question, typed or spoken by espeak-ng, makes the offline model call collection_point."""
    server = make_server(asr=True)
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    try:
        c.until("session.created")
        c.send({"type": "session.update", "session": {"type": "realtime", "tools": [README_TOOL], "audio": {
            "input": {"turn_detection": None, "transcription": {"model": "whisper-1"}}}}})
        c.until("session.updated")
        c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "system", "content": [
            {"type": "input_text", "text": README_CONTEXT}]}})
        if by == "text":
            c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": QUESTION}]}})
        else:
            pcm = np.concatenate([np.zeros(7200, np.int16), _speech(QUESTION, "alloy"), np.zeros(7200, np.int16)])
            c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm.tobytes()).decode()})
            c.send({"type": "input_audio_buffer.commit"})
            assert "collection point" in c.until("conversation.item.input_audio_transcription.completed")["transcript"]
        c.send({"type": "response.create"})
        done = c.until("response.done", timeout=60)["response"]
        call = done["output"][0]
        assert (call["type"], call["name"], json.loads(call["arguments"])) == (
            "function_call", "collection_point", {"booking": "Avis ZX9"})
    finally:
        c.close()

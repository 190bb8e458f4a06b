"""``null`` for an optional field is "not given", as OpenAI treats it; required fields still refuse it.

The fields come from the official types (openai 3.63.0, ``openai.types.realtime``): each example
event below is checked against the SDK's models, and every field the models mark ``Optional`` is
sent as null, one at a time, to the local server's session. A walk over the types asserts the
examples reach every optional field the local server serves (the few it does not serve are listed,
with the reason). LiveKit's agent plugin sends ``"instructions": null`` after every tool result.
"""
from __future__ import annotations

import base64
import copy
import json
import types
import typing
from typing import Any, Iterator

import numpy as np
import pytest

from engine.server.session import ServerSession

AUDIO_200MS = base64.b64encode(np.full(4800, 300, dtype="<i2").tobytes()).decode()
FN_TOOL = {"type": "function", "name": "lookup", "description": "Look a thing up.",
           "parameters": {"type": "object", "properties": {}}}
SESSION_MCP_TOOL = {
    "type": "mcp", "server_label": "docs", "server_url": "https://mcp.example.test/sse", "server_description": "Docs",
    "authorization": "token", "headers": {"X-Key": "v"}, "allowed_tools": {"read_only": True, "tool_names": ["a"]},
    "require_approval": {"always": {"read_only": True, "tool_names": ["a"]}, "never": {"read_only": False,
                                                                                       "tool_names": ["b"]}},
    "allowed_callers": ["direct"], "defer_loading": False, "tunnel_id": "tun_1"}
CONNECTOR_MCP_TOOL = {"type": "mcp", "server_label": "mail", "connector_id": "connector_gmail"}
ITEMS: list[dict[str, Any]] = [
    {"type": "message", "role": "system", "id": "item_sys", "object": "realtime.item", "status": "completed",
     "content": [{"type": "input_text", "text": "Be brief."}]},
    {"type": "message", "role": "user", "id": "item_usr", "object": "realtime.item", "status": "completed",
     "content": [{"type": "input_text", "text": "Where is the collection point?"},
                 {"type": "input_audio", "audio": AUDIO_200MS, "transcript": "hello"},
                 {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "auto"}]},
    {"type": "message", "role": "assistant", "id": "item_ast", "object": "realtime.item", "status": "completed",
     "content": [{"type": "output_text", "text": "It is at desk 4."}]},
    {"type": "function_call", "id": "item_fc", "call_id": "call_1", "name": "lookup", "arguments": "{}",
     "object": "realtime.item", "status": "completed"},
    {"type": "function_call_output", "id": "item_fo", "call_id": "call_1", "output": "desk 4",
     "object": "realtime.item", "status": "completed"},
]
PROMPT = {"id": "pmpt_1", "version": "2", "variables": {
    "city": "Paris",
    "greeting": {"type": "input_text", "text": "Hi", "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}},
    "logo": {"type": "input_image", "detail": "auto", "image_url": "https://example.test/a.png", "file_id": "file_1",
             "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "12h"}},
    "terms": {"type": "input_file", "detail": "auto", "file_data": "aGk=", "file_id": "file_2",
              "file_url": "https://example.test/t.pdf", "filename": "t.pdf",
              "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}}}}
FULL_SESSION = {
    "type": "realtime", "model": "gpt-realtime", "output_modalities": ["audio"], "instructions": "Be kind.",
    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                        "noise_reduction": {"type": "near_field", "strength": 0.5},
                        "transcription": {"model": "whisper-1", "language": "en", "languages": ["en"],
                                          "keywords": ["Avis"], "prompt": "cars", "delay": "low"},
                        "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                           "silence_duration_ms": 500, "idle_timeout_ms": 6000,
                                           "create_response": True, "interrupt_response": True}},
              "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0}},
    "include": ["item.input_audio_transcription.logprobs"], "max_output_tokens": 1000, "parallel_tool_calls": True,
    "prompt": PROMPT, "reasoning": {"effort": "low"}, "tool_choice": "auto",
    "tools": [FN_TOOL, SESSION_MCP_TOOL, CONNECTOR_MCP_TOOL],
    "tracing": {"group_id": "g", "metadata": {"k": "v"}, "workflow_name": "w"},
    "truncation": {"type": "retention_ratio", "retention_ratio": 0.5, "token_limits": {"post_instructions": 100}}}
FULL_RESPONSE = {
    "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"}},
    "conversation": "none", "input": ITEMS,
    "instructions": "Answer.", "max_output_tokens": 500, "metadata": {"topic": "cars"},
    "output_modalities": ["text"], "parallel_tool_calls": False, "prompt": PROMPT, "reasoning": {"effort": "low"},
    "tool_choice": "auto", "tools": [FN_TOOL, SESSION_MCP_TOOL, CONNECTOR_MCP_TOOL]}


def _session(**changes: Any) -> dict[str, Any]:
    return {"type": "session.update", "event_id": "evt_s", "session": {"type": "realtime", **changes}}


def _audio_setup(s: ServerSession) -> None:
    s.receive_text(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"turn_detection": None}}}}))
    s.receive_text(json.dumps({"type": "input_audio_buffer.append", "audio": AUDIO_200MS}))


def _active_response(s: ServerSession) -> None:
    s.receive_text(json.dumps({"type": "response.create"}))


def _spoken_reply(s: ServerSession) -> None:
    """An assistant audio item with id 'item_reply' (truncate needs one)."""
    acts = s.receive_text(json.dumps({"type": "response.create"}))
    resp = acts.start[0]
    s.plan(resp)
    for _ in s.response_steps(resp, np.zeros(24000, dtype=np.int16), speed=1000.0):
        pass
    assert resp.item is not None
    s.by_id["item_reply"] = resp.item


def _setup_item(s: ServerSession) -> None:
    s.receive_text(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "id": "item_setup", "content": [{"type": "input_text", "text": "hi"}]}}))
    s.receive_text(json.dumps({"type": "session.update", "session": {"type": "realtime", "tools": [FN_TOOL]}}))


#: (name, setup, a valid event with every optional field it can carry)
EXAMPLES: list[tuple[str, Any, dict[str, Any]]] = [
    ("session_full", None, _session(**{k: v for k, v in FULL_SESSION.items() if k != "type"})),
    ("session_semantic_vad", None, _session(audio={"input": {"turn_detection": {
        "type": "semantic_vad", "eagerness": "low", "create_response": True, "interrupt_response": False}}})),
    ("session_pcmu", None, _session(audio={"input": {"format": {"type": "audio/pcmu"}},
                                           "output": {"format": {"type": "audio/pcma"}, "voice": {"id": "voice_1"}}})),
    ("session_tool_choice_mcp", None, _session(tools=[SESSION_MCP_TOOL], tool_choice={
        "type": "mcp", "server_label": "docs", "name": "a"})),
    ("session_tool_choice_function", _setup_item, _session(tools=[FN_TOOL], tool_choice={"type": "function",
                                                                                          "name": "lookup"})),
    ("append", None, {"type": "input_audio_buffer.append", "event_id": "evt_a", "audio": AUDIO_200MS}),
    ("commit", _audio_setup, {"type": "input_audio_buffer.commit", "event_id": "evt_c"}),
    ("clear", None, {"type": "input_audio_buffer.clear", "event_id": "evt_cl"}),
    ("output_clear", None, {"type": "output_audio_buffer.clear", "event_id": "evt_oc"}),
    *[(f"item_create_{item['id']}", _setup_item, {"type": "conversation.item.create", "event_id": "evt_i",
                                                   "previous_item_id": "item_setup", "item": item}) for item in ITEMS],
    ("item_retrieve", _setup_item, {"type": "conversation.item.retrieve", "event_id": "evt_r", "item_id": "item_setup"}),
    ("item_delete", _setup_item, {"type": "conversation.item.delete", "event_id": "evt_d", "item_id": "item_setup"}),
    ("item_truncate", _spoken_reply, {"type": "conversation.item.truncate", "event_id": "evt_t",
                                      "item_id": "item_reply", "content_index": 0, "audio_end_ms": 500}),
    ("response_full", _setup_item, {"type": "response.create", "event_id": "evt_rc", "response": FULL_RESPONSE}),
    ("response_pcmu_voice_id", None, {"type": "response.create", "response": {"audio": {"output": {
        "format": {"type": "audio/pcmu"}, "voice": {"id": "voice_1"}}}, "conversation": "auto"}}),
    ("response_tool_choice_mcp", None, {"type": "response.create", "response": {
        "tools": [SESSION_MCP_TOOL], "tool_choice": {"type": "mcp", "server_label": "docs", "name": "a"}}}),
    ("response_tool_choice_function", _setup_item, {"type": "response.create", "response": {
        "tool_choice": {"type": "function", "name": "lookup"}}}),
    ("cancel", _active_response, {"type": "response.cancel", "event_id": "evt_x", "response_id": None}),
]

#: Optional fields of the types that the examples do not reach, and why
NOT_SERVED = {
    # transcription sessions: a realtime connection refuses session.type 'transcription' (docs/local-server.md)
    "realtime_transcription_session": "transcription sessions are not served",
    # MCP items (list_tools, call, approvals) are created by the service's MCP client, not by clients here
    "realtime_mcp_": "MCP conversation items are not served",
    # an assistant message made by a client holds output_text parts only
    "realtime_conversation_item_assistant_message.Content.audio": "assistant audio parts are refused",
    "realtime_conversation_item_assistant_message.Content.transcript": "assistant audio parts are refused",
}

#: Optional in the types, but the service refuses an event without them; null is "not given" there too
REFUSED_WHEN_NOT_GIVEN = {
    "realtime_function_tool.RealtimeFunctionTool.name": "a function tool without a name cannot be called",
}


def _union_args(ann: Any) -> tuple[Any, ...]:
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return typing.get_args(ann)
    return (ann,)


def _is_optional(ann: Any) -> bool:
    return type(None) in _union_args(ann)


def _qualname(model: type) -> str:
    return f"{model.__module__.rsplit('.', 1)[-1]}.{model.__qualname__}"


def _models_in(ann: Any) -> Iterator[type]:
    import pydantic
    if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
        yield ann
        return
    for arg in typing.get_args(ann):
        if typing.get_origin(arg) is not None or isinstance(arg, type):
            yield from _models_in(arg)


def _client_event_models() -> list[type]:
    from openai.types.realtime.realtime_client_event import RealtimeClientEvent
    return [m for arg in _union_args(RealtimeClientEvent) for m in _models_in(arg)]


def optional_fields_of_the_types() -> set[str]:
    """Every ``module.Model.field`` the official client-event models mark Optional, nested ones included."""
    out: set[str] = set()
    seen: set[type] = set()
    stack = _client_event_models()
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, f in model.model_fields.items():  # type: ignore[attr-defined]
            if _is_optional(f.annotation):
                out.add(f"{_qualname(model)}.{name}")
            stack.extend(_models_in(f.annotation))
    return out


def fields_in(event: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], str, bool]]:
    """(path in the raw event, ``module.Model.field``, optional?) of each field the example sets,
    found by parsing it with the SDK's own models (so each path is typed as the SDK types it)."""
    import pydantic
    from openai.types.realtime.realtime_client_event import RealtimeClientEvent
    parsed = pydantic.TypeAdapter(RealtimeClientEvent).validate_python(event)

    def walk(obj: Any, raw: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str, bool]]:
        if isinstance(obj, pydantic.BaseModel) and isinstance(raw, dict):
            for name, f in type(obj).model_fields.items():
                if name in raw:
                    yield path + (name,), f"{_qualname(type(obj))}.{name}", _is_optional(f.annotation)
                    yield from walk(getattr(obj, name), raw[name], path + (name,))
        elif isinstance(obj, list) and isinstance(raw, list):
            for i, (o, r) in enumerate(zip(obj, raw)):
                yield from walk(o, r, path + (i,))
        elif isinstance(obj, dict) and isinstance(raw, dict):
            for k in raw:
                yield from walk(obj.get(k), raw[k], path + (k,))
    yield from walk(parsed, event, ())


def _set(event: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(event)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _send(name: str, setup: Any, event: dict[str, Any]) -> list[dict[str, Any]]:
    s = ServerSession("gpt-realtime")
    if setup is not None:
        setup(s)
    return s.receive_text(json.dumps(event)).send


def _cases(optional: bool, refused_when_not_given: bool = False) -> list[Any]:
    cases = []
    for name, setup, event in EXAMPLES:
        for path, field, is_opt in fields_in(event):
            if is_opt == optional and (field in REFUSED_WHEN_NOT_GIVEN) == refused_when_not_given:
                cases.append(pytest.param(name, setup, event, path, id=f"{name}:{'.'.join(map(str, path))}"))
    return cases


@pytest.mark.parametrize("name, setup, event", [pytest.param(*e, id=e[0]) for e in EXAMPLES])
def test_each_example_is_valid_and_accepted_as_it_is(name: str, setup: Any, event: dict[str, Any]) -> None:
    errors = [e for e in _send(name, setup, event) if e["type"] == "error"]
    assert errors == []


def test_the_examples_reach_every_optional_field_of_the_types() -> None:
    covered = {field for _, _, event in EXAMPLES for _, field, opt in fields_in(event) if opt}
    missing = {f for f in optional_fields_of_the_types() - covered
               if not any(f.startswith(prefix) for prefix in NOT_SERVED)}
    assert missing == set()
    assert len(covered) > 100   # the walk found the nested fields, not just the top level


@pytest.mark.parametrize("name, setup, event, path", _cases(optional=True))
def test_null_for_an_optional_field_is_accepted(name: str, setup: Any, event: dict[str, Any],
                                                path: tuple[Any, ...]) -> None:
    errors = [e["error"] for e in _send(name, setup, _set(event, path, None)) if e["type"] == "error"]
    assert errors == []


@pytest.mark.parametrize("name, setup, event, path", _cases(optional=False))
def test_null_for_a_required_field_is_refused(name: str, setup: Any, event: dict[str, Any],
                                              path: tuple[Any, ...]) -> None:
    errors = [e["error"] for e in _send(name, setup, _set(event, path, None)) if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["type"] == "invalid_request_error", errors


@pytest.mark.parametrize("name, setup, event, path", _cases(optional=True, refused_when_not_given=True))
def test_null_is_not_given_where_not_giving_is_refused(name: str, setup: Any, event: dict[str, Any],
                                                       path: tuple[Any, ...]) -> None:
    nulled = [e["error"] for e in _send(name, setup, _set(event, path, None)) if e["type"] == "error"]
    parent = _set(event, path, None)
    node: Any = parent
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    omitted = [e["error"] for e in _send(name, setup, parent) if e["type"] == "error"]
    assert len(nulled) == 1 and [(e["code"], e["param"]) for e in nulled] == [(e["code"], e["param"]) for e in omitted]


def test_null_leaves_a_session_field_unchanged_where_it_does_not_mean_off() -> None:
    s = ServerSession("gpt-realtime")
    s.receive_text(json.dumps(_session(instructions="Be kind.", tools=[FN_TOOL])))
    acts = s.receive_text(json.dumps(_session(instructions=None, model=None, tools=None, tool_choice=None,
                                              max_output_tokens=None, audio={"output": {"voice": None}})))
    updated = acts.send[0]["session"]
    assert acts.send[0]["type"] == "session.updated"
    assert (updated["instructions"], updated["model"], updated["max_output_tokens"]) == ("Be kind.", "gpt-realtime", "inf")
    assert [t["name"] for t in updated["tools"]] == ["lookup"] and updated["audio"]["output"]["voice"] == "marin"
    # where null means off, it still does
    acts = s.receive_text(json.dumps(_session(audio={"input": {"turn_detection": None, "transcription": None}})))
    assert acts.send[0]["session"]["audio"]["input"]["turn_detection"] is None


def test_livekit_null_instructions_after_a_tool_result_are_answered() -> None:
    """livekit-plugins-openai 1.8.9's generate_reply() after a tool result: instructions null."""
    s = ServerSession("gpt-realtime")
    s.receive_text(json.dumps(_session(instructions="You rent cars.", tools=[FN_TOOL])))
    for item in ITEMS[3:]:
        s.receive_text(json.dumps({"type": "conversation.item.create", "item": item}))
    acts = s.receive_text(json.dumps({"type": "response.create", "event_id": "response_create_1", "response": {
        "instructions": None, "metadata": {"client_event_id": "response_create_1"}, "tool_choice": "auto"}}))
    assert [e["type"] for e in acts.send] == ["response.created", "rate_limits.updated"]
    resp = acts.start[0]
    s.plan(resp)
    assert resp.text is not None and "desk 4" in resp.text

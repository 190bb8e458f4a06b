"""GA wire-protocol facts for the local server: ids, error events, client-event
validation and the session schema. Pure functions.

Null: a field the GA types mark ``Optional`` may be sent as ``null``, and it means "not given"
(the session keeps its value, a response takes the session's, an item gets the default), as
OpenAI treats it; LiveKit's agent plugin sends ``"instructions": null`` with every reply after a
tool result. Only where the API gives null its own meaning does it keep it: ``turn_detection``,
``transcription`` and ``noise_reduction`` (off), a session's ``tracing``, ``prompt`` and
``include`` (cleared). Required fields still refuse null. ``tests/test_server_nulls.py`` walks
the official types to hold this for every optional field."""
from __future__ import annotations

import math
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.codec import b64decode_strict, decode_audio

from engine.server.errors import ServerError

_ALPHABET = string.ascii_letters + string.digits

CLIENT_EVENT_FIELDS: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    # type -> field -> (accepted python types, required)
    "session.update": {"session": (dict, True)},
    "input_audio_buffer.append": {"audio": (str, True)},
    "input_audio_buffer.commit": {},
    "input_audio_buffer.clear": {},
    "conversation.item.create": {"item": (dict, True), "previous_item_id": ((str, type(None)), False)},
    "conversation.item.retrieve": {"item_id": (str, True)},
    "conversation.item.truncate": {"item_id": (str, True), "content_index": (int, True), "audio_end_ms": (int, True)},
    "conversation.item.delete": {"item_id": (str, True)},
    "response.create": {"response": ((dict, type(None)), False)},
    "response.cancel": {"response_id": ((str, type(None)), False)},
    "output_audio_buffer.clear": {},
}

#: beta-era session fields and where they live in GA (for helpful errors)
BETA_SESSION_FIELDS = {
    "modalities": "output_modalities", "voice": "audio.output.voice",
    "input_audio_format": "audio.input.format", "output_audio_format": "audio.output.format",
    "input_audio_transcription": "audio.input.transcription", "turn_detection": "audio.input.turn_detection",
    "input_audio_noise_reduction": "audio.input.noise_reduction", "speed": "audio.output.speed",
    "max_response_output_tokens": "max_output_tokens", "temperature": None,
}

SESSION_KEYS = {"type", "model", "output_modalities", "instructions", "audio", "tools", "tool_choice",
                "parallel_tool_calls", "max_output_tokens", "tracing", "truncation", "prompt", "include",
                "reasoning"}
AUDIO_INPUT_KEYS = {"format", "noise_reduction", "transcription", "turn_detection"}
#: session fields whose null is not "not given" but clears them (the others' null changes nothing)
SESSION_NULL_CLEARS = {"tracing", "prompt", "include"}
AUDIO_OUTPUT_KEYS = {"format", "voice", "speed"}
TURN_DETECTION_KEYS = {"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
                       "interrupt_response", "idle_timeout_ms", "eagerness"}
RESPONSE_KEYS = {"audio", "conversation", "input", "instructions", "max_output_tokens", "metadata",
                 "output_modalities", "parallel_tool_calls", "prompt", "reasoning", "tool_choice", "tools"}
VOICES = {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}
AUDIO_FORMATS = {"audio/pcm", "audio/pcmu", "audio/pcma"}
MAX_EVENT_BYTES = 15 * 1024 * 1024


def new_id(prefix: str) -> str:
    """An id in the service's style: ``prefix_`` and 21 base62 characters."""
    return prefix + "_" + "".join(secrets.choice(_ALPHABET) for _ in range(21))


class ProtocolError(ServerError):
    """A client event the server refuses; becomes an ``error`` event, the socket stays open."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.error_type = code, message, param, error_type


def error_event(code: str | None, message: str, param: str | None = None, client_event_id: str | None = None,
                error_type: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "event_id": new_id("event"),
            "error": {"type": error_type, "code": code, "message": message, "param": param,
                      "event_id": client_event_id}}


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _expected(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(_type_name(t()) if t is not type(None) else "null" for t in ts)


def validate_client_event(event: Any) -> str:
    """Check an event's shape; return its type or raise :class:`ProtocolError`."""
    if not isinstance(event, dict):
        raise ProtocolError("invalid_event", "The event must be a JSON object.")
    etype = event.get("type")
    if etype is None:
        raise ProtocolError("invalid_event", "The 'type' field is missing.", "type")
    if not isinstance(etype, str):
        raise ProtocolError("invalid_type", f"Invalid type for 'type': expected a string, but got {_type_name(etype)} instead.", "type")
    spec = CLIENT_EVENT_FIELDS.get(etype)
    if spec is None:
        hint = ""
        if etype == "transcription_session.update":
            hint = " transcription_session.update was part of the retired beta API; use session.update with session.type 'transcription'."
        raise ProtocolError("invalid_value", f"Invalid value: '{etype}'. Supported values are: "
                            + ", ".join(f"'{t}'" for t in CLIENT_EVENT_FIELDS) + "." + hint, "type")
    eid = event.get("event_id")
    if eid is not None and not isinstance(eid, str):
        raise ProtocolError("invalid_type", f"Invalid type for 'event_id': expected a string, but got {_type_name(eid)} instead.", "event_id")
    for key in event:
        if key not in spec and key not in ("type", "event_id"):
            raise ProtocolError("unknown_parameter", f"Unknown parameter: '{key}'.", key)
    for key, (types, required) in spec.items():
        if key not in event:
            if required:
                raise ProtocolError("missing_required_parameter", f"Missing required parameter: '{key}'.", key)
            continue
        value = event[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            raise ProtocolError("invalid_type", f"Invalid type for '{key}': expected {_expected(types)}, "
                                f"but got {_type_name(value)} instead.", key)
    return etype


def check_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise ProtocolError("unknown_parameter", f"Unknown parameter: '{where}.{key}'.", f"{where}.{key}")


def default_session(model: str, session_id: str) -> dict[str, Any]:
    """The session object a new connection starts with (shape of the real service's)."""
    return {
        "type": "realtime", "object": "realtime.session", "id": session_id, "model": model,
        "output_modalities": ["audio"],
        "instructions": "You are a helpful voice assistant running on realtalk's local server.",
        "tools": [], "tool_choice": "auto", "max_output_tokens": "inf", "tracing": None,
        "truncation": "auto", "prompt": None, "expires_at": int(time.time()) + 3600,
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": None,
                      "noise_reduction": None,
                      "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                         "silence_duration_ms": 500, "idle_timeout_ms": None,
                                         "create_response": True, "interrupt_response": True}},
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0},
        },
        "include": None,
    }


def _check_format(fmt: Any, where: str) -> dict[str, Any]:
    if not isinstance(fmt, dict):
        raise ProtocolError("invalid_type", f"Invalid type for '{where}': expected an object.", where)
    check_keys(fmt, {"type", "rate"}, where)
    if fmt.get("type") is None:  # not given: the format whose type is optional is audio/pcm
        fmt = {**fmt, "type": "audio/pcm"}
    if fmt.get("type") not in AUDIO_FORMATS:
        raise ProtocolError("invalid_value", f"Invalid value: '{fmt.get('type')}'. Supported values are: "
                            "'audio/pcm', 'audio/pcmu' and 'audio/pcma'.", f"{where}.type")
    if fmt["type"] == "audio/pcm":
        if fmt.get("rate") not in (None, 24000):
            raise ProtocolError("invalid_value", "Only a 24kHz sample rate is supported.", f"{where}.rate")
        return {"type": "audio/pcm", "rate": 24000}
    return {"type": fmt["type"]}


def _check_turn_detection(td: Any) -> dict[str, Any] | None:
    where = "session.audio.input.turn_detection"
    if td is None:
        return None
    if not isinstance(td, dict):
        raise ProtocolError("invalid_type", f"Invalid type for '{where}': expected an object or null.", where)
    check_keys(td, TURN_DETECTION_KEYS, where)
    kind = td.get("type", "server_vad")
    if kind == "server_vad":
        out = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
               "idle_timeout_ms": None, "create_response": True, "interrupt_response": True}
        if td.get("eagerness") is not None:
            raise ProtocolError("unknown_parameter", f"Unknown parameter: '{where}.eagerness'.", f"{where}.eagerness")
    elif kind == "semantic_vad":
        out = {"type": "semantic_vad", "eagerness": "auto", "create_response": True, "interrupt_response": True}
        for k in ("threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"):
            if td.get(k) is not None:
                raise ProtocolError("unknown_parameter", f"Unknown parameter: '{where}.{k}'.", f"{where}.{k}")
    else:
        raise ProtocolError("invalid_value", f"Invalid value: '{kind}'. Supported values are: 'server_vad' and "
                            "'semantic_vad'.", f"{where}.type")
    for k, v in td.items():
        if k == "type" or v is None and k != "idle_timeout_ms":  # null: the default (idle_timeout_ms: none)
            continue
        if k == "threshold" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
            raise ProtocolError("invalid_value", f"Invalid '{where}.threshold': expected a number between 0 and 1.", f"{where}.threshold")
        if k in ("prefix_padding_ms", "silence_duration_ms") and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ProtocolError("invalid_value", f"Invalid '{where}.{k}': expected a non-negative integer.", f"{where}.{k}")
        if k == "idle_timeout_ms" and v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise ProtocolError("invalid_value", f"Invalid '{where}.idle_timeout_ms': expected a positive integer or null.",
                                f"{where}.idle_timeout_ms")
        if k in ("create_response", "interrupt_response") and not isinstance(v, bool):
            raise ProtocolError("invalid_type", f"Invalid type for '{where}.{k}': expected a boolean.", f"{where}.{k}")
        out[k] = v
    return out


def merge_session_update(current: dict[str, Any], update: dict[str, Any], audio_was_output: bool) -> dict[str, Any]:
    """Validate a GA ``session.update`` payload and return the merged session."""
    for key in update:
        if key in BETA_SESSION_FIELDS and key not in SESSION_KEYS:
            ga = BETA_SESSION_FIELDS[key]
            hint = f" In the GA API this is 'session.{ga}'." if ga else " It was removed in the GA API."
            raise ProtocolError("unknown_parameter", f"Unknown parameter: 'session.{key}'.{hint}", f"session.{key}")
    check_keys(update, SESSION_KEYS, "session")
    if update.get("type") not in ("realtime",):
        if "type" not in update:
            raise ProtocolError("missing_required_parameter", "Missing required parameter: 'session.type'.", "session.type")
        raise ProtocolError("invalid_value", f"Invalid value: '{update.get('type')}'. This session is a 'realtime' "
                            "session; transcription sessions connect with ?intent=transcription.", "session.type")
    s = {**current, "audio": {"input": dict(current["audio"]["input"]), "output": dict(current["audio"]["output"])}}
    for key, value in update.items():
        if key == "type" or (value is None and key not in SESSION_NULL_CLEARS):
            continue  # null: not given, the session keeps its value
        if key == "model":
            if not isinstance(value, str):
                raise ProtocolError("invalid_type", "Invalid type for 'session.model': expected a string.", "session.model")
            s["model"] = value
        elif key == "output_modalities":
            s[key] = check_modalities(value, "session.output_modalities")
        elif key == "instructions":
            if not isinstance(value, str):
                raise ProtocolError("invalid_type", "Invalid type for 'session.instructions': expected a string.", "session.instructions")
            s[key] = value
        elif key == "tools":
            s[key] = check_tools(value, "session.tools")
        elif key == "max_output_tokens":
            s[key] = check_max_output_tokens(value, update.get("model") or current["model"], "session.max_output_tokens")
        elif key == "tool_choice":
            s[key] = value  # checked below, against the merged tools
        elif key == "audio":
            if not isinstance(value, dict):
                raise ProtocolError("invalid_type", "Invalid type for 'session.audio': expected an object.", "session.audio")
            check_keys(value, {"input", "output"}, "session.audio")
            if value.get("input") is not None:
                inp = value["input"]
                if not isinstance(inp, dict):
                    raise ProtocolError("invalid_type", "Invalid type for 'session.audio.input': expected an object.", "session.audio.input")
                check_keys(inp, AUDIO_INPUT_KEYS, "session.audio.input")
                if inp.get("format") is not None:
                    s["audio"]["input"]["format"] = _check_format(inp["format"], "session.audio.input.format")
                if "turn_detection" in inp:
                    s["audio"]["input"]["turn_detection"] = _check_turn_detection(inp["turn_detection"])
                if "transcription" in inp:
                    s["audio"]["input"]["transcription"] = check_transcription(inp["transcription"])
                if "noise_reduction" in inp:
                    s["audio"]["input"]["noise_reduction"] = check_noise_reduction(inp["noise_reduction"])
            if value.get("output") is not None:
                out = value["output"]
                if not isinstance(out, dict):
                    raise ProtocolError("invalid_type", "Invalid type for 'session.audio.output': expected an object.", "session.audio.output")
                check_keys(out, AUDIO_OUTPUT_KEYS, "session.audio.output")
                if out.get("format") is not None:
                    s["audio"]["output"]["format"] = _check_format(out["format"], "session.audio.output.format")
                if out.get("voice") is not None:
                    voice = check_voice(out["voice"], "session.audio.output.voice")
                    if audio_was_output and voice != current["audio"]["output"]["voice"]:
                        raise ProtocolError("invalid_value", "Cannot update a conversation's voice if assistant audio is present.",
                                            "session.audio.output.voice")
                    s["audio"]["output"]["voice"] = voice
                if out.get("speed") is not None:
                    sp = out["speed"]
                    if not (isinstance(sp, (int, float)) and not isinstance(sp, bool) and 0.25 <= sp <= 1.5):
                        raise ProtocolError("invalid_value", "Invalid 'session.audio.output.speed': expected a number between 0.25 and 1.5.",
                                            "session.audio.output.speed")
                    s["audio"]["output"]["speed"] = float(sp)
        else:  # tracing, truncation, prompt, include, parallel_tool_calls, reasoning: checked, stored as given
            s[key] = check_stored_field(key, value, f"session.{key}")
    if update.get("tool_choice") is not None:
        check_tool_choice(s["tool_choice"], s["tools"], "session.tool_choice")
    return s


def check_noise_reduction(nr: Any) -> dict[str, Any] | None:
    """``audio.input.noise_reduction``: null = off; an object without a type is near_field."""
    where = "session.audio.input.noise_reduction"
    if nr is None:
        return None
    if not isinstance(nr, dict):
        raise ProtocolError("invalid_type", f"Invalid type for '{where}': expected an object or null.", where)
    check_keys(nr, {"type", "strength"}, where)
    kind = nr.get("type") or "near_field"
    if kind not in ("near_field", "far_field"):
        raise ProtocolError("invalid_value", f"Invalid value: '{kind}'. Supported values are: 'near_field' and "
                            "'far_field'.", f"{where}.type")
    strength = nr.get("strength")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))):
        raise ProtocolError("invalid_type", f"Invalid type for '{where}.strength': expected a number.", f"{where}.strength")
    return {"type": kind, **({"strength": float(strength)} if strength is not None else {})}


_PROMPT_VARIABLE_FIELDS = {"input_text": ("text",), "input_image": ("detail",), "input_file": ()}


def _check_prompt_variables(variables: Any, where: str) -> None:
    """A prompt's variables: strings, or input_text / input_image / input_file objects."""
    if not isinstance(variables, dict):
        raise ProtocolError("invalid_type", f"Invalid type for '{where}': expected an object.", where)
    for name, v in variables.items():
        at = f"{where}.{name}"
        if isinstance(v, str):
            continue
        if not isinstance(v, dict):
            raise ProtocolError("invalid_type", f"Invalid type for '{at}': expected a string or an object.", at)
        kind = v.get("type")
        if kind not in _PROMPT_VARIABLE_FIELDS:
            raise ProtocolError("invalid_value", f"Invalid value: '{kind}'. Supported values are: 'input_text', "
                                "'input_image' and 'input_file'.", f"{at}.type")
        for k in _PROMPT_VARIABLE_FIELDS[kind]:
            if not isinstance(v.get(k), str):
                raise ProtocolError("missing_required_parameter", f"Missing required parameter: '{at}.{k}'.", f"{at}.{k}")
        bp = v.get("prompt_cache_breakpoint")
        if bp is not None and (not isinstance(bp, dict) or bp.get("mode") != "explicit"):
            raise ProtocolError("invalid_value", f"Invalid '{at}.prompt_cache_breakpoint': expected "
                                "{'mode': 'explicit', 'ttl': ...}.", f"{at}.prompt_cache_breakpoint.mode")


REASONING_EFFORTS = ("minimal", "low", "medium", "high", "xhigh")


def _bad(where: str, expected: str) -> ProtocolError:
    return ProtocolError("invalid_value", f"Invalid '{where}': expected {expected}.", where)


def check_stored_field(key: str, value: Any, where: str) -> Any:
    """The session fields the server keeps without acting on them, checked by their GA types
    (so session.updated never echoes what the official types would refuse)."""
    if key == "parallel_tool_calls":
        if not isinstance(value, bool):
            raise ProtocolError("invalid_type", f"Invalid type for '{where}': expected a boolean.", where)
    elif key == "truncation":
        if isinstance(value, dict):
            check_keys(value, {"type", "retention_ratio", "token_limits"}, where)
            ratio = value.get("retention_ratio")
            if value.get("type") != "retention_ratio" or isinstance(ratio, bool) \
                    or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
                raise _bad(where, "'auto', 'disabled' or {'type': 'retention_ratio', 'retention_ratio': 0.0-1.0}")
            limits = value.get("token_limits")
            if limits is not None:
                if not isinstance(limits, dict):
                    raise _bad(f"{where}.token_limits", "an object")
                check_keys(limits, {"post_instructions"}, f"{where}.token_limits")
                pi = limits.get("post_instructions")
                if pi is not None and (isinstance(pi, bool) or not isinstance(pi, int) or pi < 1):
                    raise _bad(f"{where}.token_limits.post_instructions", "a positive integer")
        elif value not in ("auto", "disabled"):
            raise _bad(where, "'auto', 'disabled' or {'type': 'retention_ratio', 'retention_ratio': 0.0-1.0}")
    elif key == "reasoning":
        if not isinstance(value, dict):
            raise _bad(where, "an object like {'effort': 'low'}")
        check_keys(value, {"effort"}, where)
        if value.get("effort") is not None and value["effort"] not in REASONING_EFFORTS:
            raise _bad(f"{where}.effort", "one of " + ", ".join(f"'{e}'" for e in REASONING_EFFORTS))
    elif key == "tracing":
        if value is not None and value != "auto":
            if not isinstance(value, dict):
                raise _bad(where, "'auto', null or {'workflow_name': ..., 'group_id': ..., 'metadata': ...}")
            check_keys(value, {"workflow_name", "group_id", "metadata"}, where)
            for k in ("workflow_name", "group_id"):
                if value.get(k) is not None and not isinstance(value[k], str):
                    raise ProtocolError("invalid_type", f"Invalid type for '{where}.{k}': expected a string.", f"{where}.{k}")
    elif key == "include":
        if value is not None and not (isinstance(value, list)
                                      and all(v == "item.input_audio_transcription.logprobs" for v in value)):
            raise _bad(where, "null or ['item.input_audio_transcription.logprobs']")
    elif key == "prompt":
        if value is not None:
            if not isinstance(value, dict) or not isinstance(value.get("id"), str):
                raise ProtocolError("missing_required_parameter", f"Missing required parameter: '{where}.id'.", f"{where}.id")
            check_keys(value, {"id", "version", "variables"}, where)
            if value.get("version") is not None and not isinstance(value["version"], str):
                raise ProtocolError("invalid_type", f"Invalid type for '{where}.version': expected a string.", f"{where}.version")
            if value.get("variables") is not None:
                _check_prompt_variables(value["variables"], f"{where}.variables")
    return value


TRANSCRIPTION_DELAYS = ("minimal", "low", "medium", "high", "xhigh")


def check_transcription(tr: Any) -> dict[str, Any] | None:
    """``audio.input.transcription`` as GA's AudioTranscription accepts it."""
    where = "session.audio.input.transcription"
    if tr is None:
        return None
    if not isinstance(tr, dict):
        raise ProtocolError("invalid_type", f"Invalid type for '{where}': expected an object or null.", where)
    check_keys(tr, {"model", "language", "languages", "keywords", "prompt", "delay"}, where)
    for k in ("model", "language", "prompt"):
        if tr.get(k) is not None and not isinstance(tr[k], str):
            raise ProtocolError("invalid_type", f"Invalid type for '{where}.{k}': expected a string.", f"{where}.{k}")
    for k in ("languages", "keywords"):
        v = tr.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise ProtocolError("invalid_type", f"Invalid type for '{where}.{k}': expected an array of strings.",
                                f"{where}.{k}")
    if tr.get("delay") is not None and tr["delay"] not in TRANSCRIPTION_DELAYS:
        raise ProtocolError("invalid_value", f"Invalid value: '{tr['delay']}'. Supported values are: "
                            + ", ".join(f"'{d}'" for d in TRANSCRIPTION_DELAYS) + ".", f"{where}.delay")
    out = {"model": tr.get("model") or "whisper-1", "language": tr.get("language"), "prompt": tr.get("prompt")}
    for k in ("languages", "keywords", "delay"):
        if tr.get(k) is not None:
            out[k] = tr[k]
    return out


def max_output_tokens_limit(model: str) -> int:
    """The model's largest max_output_tokens: 32,000 for the gpt-realtime-2 family, else 4,096."""
    return 32000 if model.startswith("gpt-realtime-2") else 4096


def check_max_output_tokens(value: Any, model: str, where: str) -> int | str:
    limit = max_output_tokens_limit(model)
    if not (value == "inf" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit)):
        raise ProtocolError("invalid_value", f"Invalid '{where}': expected an integer between 1 and {limit} "
                            f"(the limit of {model}), or 'inf'.", where)
    return value


def check_tool_choice(value: Any, tools: list[dict[str, Any]], where: str) -> Any:
    """none | auto | required | {type: function, name} (a tool of ``tools``) | {type: mcp, server_label, name?}."""
    if value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        check_keys(value, {"type", "name"}, where)
        if not any(t.get("name") == value.get("name") for t in tools):
            raise ProtocolError("invalid_value", f"Invalid '{where}': no function named '{value.get('name')}' among the "
                                "tools (" + ", ".join(repr(t.get("name")) for t in tools) + ").", where)
        return value
    if isinstance(value, dict) and value.get("type") == "mcp" and isinstance(value.get("server_label"), str):
        check_keys(value, {"type", "server_label", "name"}, where)
        return value
    raise ProtocolError("invalid_value", f"Invalid '{where}': expected 'none', 'auto', 'required', "
                        "{'type': 'function', 'name': ...} or {'type': 'mcp', 'server_label': ...}.", where)


@dataclass(frozen=True)
class ParsedItem:
    """A client item, checked: the item as the API shows it, its audio, and its words."""
    data: dict[str, Any]
    pcm: np.ndarray | None = None     #: PCM16 24 kHz of an input_audio part
    heard: str | None = None          #: its text, or the transcript the client gave


_ITEM_PARTS = {"user": ("input_text", "input_audio", "input_image"), "system": ("input_text",),
               "assistant": ("output_text",)}


def _check_str_fields(raw: dict[str, Any], keys: tuple[str, ...]) -> None:
    for k in keys:
        if not isinstance(raw.get(k), str):
            raise ProtocolError("missing_required_parameter", f"Missing required parameter: 'item.{k}'.", f"item.{k}")


def _part_type(part: dict[str, Any], allowed: tuple[str, ...]) -> Any:
    """A content part's type; one not given (optional in GA) is the role's only kind, or, for a
    user part, the kind its fields show (audio -> input_audio, image_url -> input_image, else input_text)."""
    given = part.get("type")
    if given is not None:
        return given
    if len(allowed) == 1:
        return allowed[0]
    if part.get("audio") is not None:
        return "input_audio"
    if part.get("image_url") is not None:
        return "input_image"
    return "input_text"


def parse_item(raw: dict[str, Any], input_format: str) -> ParsedItem:
    """The one check of a client item (``conversation.item.create`` and ``response.input``
    alike); raises :class:`ProtocolError` naming the bad field."""
    kind = raw.get("type", "message")
    item_id = raw.get("id") or new_id("item")
    if not isinstance(item_id, str):
        raise ProtocolError("invalid_type", "Invalid type for 'item.id': expected a string.", "item.id")
    if kind == "message":
        check_keys(raw, {"id", "type", "role", "content", "status", "object"}, "item")
        role = raw.get("role")
        if role not in _ITEM_PARTS:
            raise ProtocolError("invalid_value", f"Invalid value: '{role}'. Supported values are: 'user', "
                                "'assistant', and 'system'.", "item.role")
        content = raw.get("content")
        if not isinstance(content, list) or not content:
            raise ProtocolError("missing_required_parameter", "Missing required parameter: 'item.content'.", "item.content")
        allowed = _ITEM_PARTS[role]
        parts: list[dict[str, Any]] = []
        words: list[str] = []
        pcm = None
        for i, part in enumerate(content):
            ptype = _part_type(part, allowed) if isinstance(part, dict) else None
            if ptype not in allowed:
                raise ProtocolError("invalid_value", f"Invalid value: '{ptype}'. Value must be "
                                    + " or ".join(f"'{a}'" for a in allowed) + ".", f"item.content[{i}].type")
            if ptype in ("input_text", "output_text"):
                if part.get("text") is None:
                    part = {**part, "text": ""}   # null: not given (an empty text)
                if not isinstance(part.get("text"), str):
                    raise ProtocolError("missing_required_parameter", f"Missing required parameter: 'item.content[{i}].text'.",
                                        f"item.content[{i}].text")
                parts.append({"type": ptype, "text": part["text"]})
                words.append(part["text"])
            elif ptype == "input_audio":
                try:
                    audio_bytes = b64decode_strict(part.get("audio") or "")
                except ValueError:
                    raise ProtocolError("invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes.",
                                        f"item.content[{i}].audio") from None
                pcm = decode_audio(audio_bytes, input_format)
                parts.append({"type": "input_audio", "transcript": part.get("transcript")})
                if part.get("transcript"):
                    words.append(part["transcript"])
            else:
                parts.append({"type": ptype, "image_url": part.get("image_url"), "detail": part.get("detail", "auto")})
        data = {"id": item_id, "type": "message", "status": "completed", "role": role, "content": parts}
        return ParsedItem(data, pcm, " ".join(words) if words else None)
    if kind == "function_call_output":
        check_keys(raw, {"id", "type", "call_id", "output", "status", "object"}, "item")
        _check_str_fields(raw, ("call_id", "output"))
        return ParsedItem({"id": item_id, "type": "function_call_output", "call_id": raw["call_id"],
                           "output": raw["output"]})
    if kind == "function_call":
        check_keys(raw, {"id", "type", "call_id", "name", "arguments", "status", "object"}, "item")
        _check_str_fields(raw, ("name", "arguments"))
        call_id = raw.get("call_id") or "call_" + new_id("x")[2:18]   # optional in GA: the server makes one
        if not isinstance(call_id, str):
            raise ProtocolError("invalid_type", "Invalid type for 'item.call_id': expected a string.", "item.call_id")
        return ParsedItem({"id": item_id, "type": "function_call", "status": "completed", "name": raw["name"],
                           "call_id": call_id, "arguments": raw["arguments"]})
    raise ProtocolError("invalid_value", f"Invalid value: '{kind}'. Supported values are: 'message', "
                        "'function_call', and 'function_call_output'.", "item.type")


def copy_item_data(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of an item as the API shows it (its content parts are flat), without a JSON round trip."""
    out = dict(data)
    if "content" in out:
        out["content"] = [dict(part) for part in out["content"]]
    return out


def check_modalities(value: Any, where: str) -> list[str]:
    if value not in (["audio"], ["text"]):
        raise ProtocolError("invalid_value", f"Invalid '{where}': expected ['audio'] or ['text'].", where)
    return list(value)


def check_voice(value: Any, where: str) -> str | dict[str, Any]:
    if not ((isinstance(value, str) and value in VOICES) or (isinstance(value, dict) and isinstance(value.get("id"), str))):
        raise ProtocolError("invalid_value", f"Invalid value: '{value}'. Supported values are: "
                            + ", ".join(f"'{v}'" for v in sorted(VOICES)) + ".", where)
    return value


def response_conversation(params: dict[str, Any]) -> bool:
    """True if a ``response.create`` writes to the conversation (``conversation: "auto"``)."""
    conv = params.get("conversation", "auto")
    if conv not in ("auto", "none"):
        raise ProtocolError("invalid_value", f"Invalid value: '{conv}'. Supported values are: 'auto' and 'none'.",
                            "response.conversation")
    return conv == "auto"


@dataclass(frozen=True)
class ResponseParams:
    """A ``response.create``'s options, checked; None = the session's value."""
    modalities: list[str] | None
    metadata: dict[str, str] | None
    voice: str | dict[str, Any] | None
    format: str | None
    input: list[ParsedItem | str] | None   #: parsed items, or the ids of item references
    max_output_tokens: int | str | None = None
    tool_choice: Any = None


def check_response_params(params: dict[str, Any], input_format: str,
                          session: dict[str, Any] | None = None) -> ResponseParams:
    """The one check of a ``response.create``'s options (after :func:`response_conversation`);
    ``session`` gives the model (token limit) and the tools a tool_choice may name."""
    session = session or {"model": "gpt-realtime", "tools": []}
    mot = check_max_output_tokens(params["max_output_tokens"], session["model"], "response.max_output_tokens") \
        if "max_output_tokens" in params else None
    modalities = check_modalities(params["output_modalities"], "response.output_modalities") \
        if "output_modalities" in params else None
    metadata = params.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())):
        raise ProtocolError("invalid_type", "Invalid type for 'response.metadata': expected a map of strings.", "response.metadata")
    for key in ("parallel_tool_calls", "prompt", "reasoning"):
        if key in params:
            check_stored_field(key, params[key], f"response.{key}")
    if "instructions" in params and not isinstance(params["instructions"], str):
        raise ProtocolError("invalid_type", "Invalid type for 'response.instructions': expected a string.",
                            "response.instructions")
    tools = check_tools(params["tools"], "response.tools") if "tools" in params else session["tools"]
    tool_choice = (check_tool_choice(params["tool_choice"], tools, "response.tool_choice")
                   if "tool_choice" in params else None)
    voice = fmt = None
    audio = params.get("audio")
    if audio is not None:
        if not isinstance(audio, dict):
            raise ProtocolError("invalid_type", "Invalid type for 'response.audio': expected an object.", "response.audio")
        check_keys(audio, {"output"}, "response.audio")
        out = audio.get("output")
        if out is not None:
            if not isinstance(out, dict):
                raise ProtocolError("invalid_type", "Invalid type for 'response.audio.output': expected an object.",
                                    "response.audio.output")
            check_keys(out, {"format", "voice"}, "response.audio.output")
            if out.get("voice") is not None:
                voice = check_voice(out["voice"], "response.audio.output.voice")
            if out.get("format") is not None:
                fmt = _check_format(out["format"], "response.audio.output.format")["type"]
    inputs: list[ParsedItem | str] | None = None
    if "input" in params:
        if not isinstance(params["input"], list):
            raise ProtocolError("invalid_type", "Invalid type for 'response.input': expected an array.", "response.input")
        inputs = []
        for i, raw in enumerate(params["input"]):
            if isinstance(raw, dict) and raw.get("type") == "item_reference":
                ref = raw.get("id")
                inputs.append(ref if isinstance(ref, str) else "")
            elif isinstance(raw, dict):
                inputs.append(parse_item(raw, input_format))
            else:
                raise ProtocolError("invalid_type", f"Invalid type for 'response.input[{i}]': expected an object.",
                                    f"response.input[{i}]")
    return ResponseParams(modalities, metadata, voice, fmt, inputs, mot, tool_choice)


def check_tools(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ProtocolError("invalid_type", f"Invalid type for '{where}': expected an array.", where)
    out = []
    for i, tool in enumerate(value):
        kind = (tool.get("type") or "function") if isinstance(tool, dict) else None   # null type: a function
        if kind not in ("function", "mcp"):
            raise ProtocolError("invalid_value", f"Invalid '{where}[{i}]': expected a function tool.", f"{where}[{i}]")
        assert isinstance(tool, dict)
        if kind == "function":
            check_keys(tool, {"type", "name", "description", "parameters"}, f"{where}[{i}]")
            if not isinstance(tool.get("name"), str):
                raise ProtocolError("missing_required_parameter", f"Missing required parameter: '{where}[{i}].name'.", f"{where}[{i}].name")
            params = tool.get("parameters")
            out.append({"type": "function", "name": tool["name"], "description": tool.get("description") or "",
                        "parameters": params if params is not None else {"type": "object", "properties": {}}})
        else:
            if not isinstance(tool.get("server_label"), str):
                raise ProtocolError("missing_required_parameter", f"Missing required parameter: '{where}[{i}].server_label'.",
                                    f"{where}[{i}].server_label")
            out.append(tool)
    return out


def text_tokens(text: str) -> int:
    """The documented estimate for text: one token per 4 UTF-8 bytes, rounded up."""
    return math.ceil(len(text.encode()) / 4) if text else 0


def user_audio_tokens(ms: float) -> int:
    """User audio: about one token per 100 ms."""
    return math.ceil(ms / 100) if ms > 0 else 0


def model_audio_tokens(ms: float) -> int:
    """Model audio: about one token per 50 ms."""
    return math.ceil(ms / 50) if ms > 0 else 0

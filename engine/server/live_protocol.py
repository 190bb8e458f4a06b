"""GPT-Live wire facts for the local server: client-event validation, the session schema,
error events and the session's audio formats. Pure functions, no I/O.

Sources: the official SDK openai 3.63.0 (``openai.types.live``) and
``../shared/docs/live-protocol.md``. Where the service's exact wording or error code is not
documented, the code here is the local server's own and says so in docs/local-server.md.

Rules:
- Validation is strict, as the service is: an unknown field anywhere is ``unknown_parameter``
  naming its full path (``session.audio.voice``); a missing one is ``missing_required_parameter``;
  a wrong type is ``invalid_type``; a bad value is ``invalid_value``. Each raises
  :class:`ProtocolError` with that path as ``param`` before anything changes.
- ``delegation_id`` on the three appends is required and nullable (the SDK's TypedDicts
  enforce it; its BaseModels do not), so a missing one is refused.
- Error events carry the command's ``event_id`` as ``client_event_id``, at the top and inside
  ``error``; fields that do not apply are omitted (not null).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import soxr

from engine.codec import API_RATE_HZ, g711_decode, g711_encode
from engine.server.protocol import ProtocolError, new_id

LIVE_MODELS = ("gpt-live-1", "gpt-live-1.1")
#: the SDK's BuiltInVoice literal (23 names)
BUILT_IN_VOICES = ("alloy", "ash", "ballad", "beacon", "bossa", "cedar", "cinder", "coral", "delta", "echo", "gleam",
                   "marin", "meridian", "quartz", "ripple", "sage", "shida", "shimmer", "stone", "tempo", "verse",
                   "vesper", "willow")
#: Realtime-era voices the Live service refuses with ``forbidden``
FORBIDDEN_VOICES = ("fable", "nova", "onyx")
DEFAULT_VOICE = "marin"
DEFAULT_FORMAT = {"type": "audio/pcm", "rate": 24000}
DEFAULT_INSTRUCTIONS = "You are a helpful voice assistant running on realtalk's local server."
APPEND_MAX_TOKENS = 500
INSTRUCTIONS_MAX_TOKENS = 16_384
INPUT_MAX_MESSAGES = 128
FIXTURE_MAX_MS = 30_000
MAX_EVENT_BYTES = 15 * 1024 * 1024
DTMF_KEYS = frozenset("0123456789ABCD*#")

_NONE = type(None)
#: client event type -> field -> (accepted python types, required); ``event_id`` is checked apart
CLIENT_EVENT_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "session.start": {"session": ((dict,), True)},
    "session.update": {"session": ((dict,), True)},
    "session.input_audio.append": {"audio": ((str,), True)},
    "session.input_audio.mute": {},
    "session.input_audio.unmute": {},
    "session.output_audio.fixture.play": {"audio": ((str,), True)},
    "session.instructions.append": {"content": ((str,), True), "delegation_id": ((str, _NONE), True)},
    "session.thinking.append": {"content": ((str,), True), "delegation_id": ((str, _NONE), True)},
    "session.commentary.append": {"content": ((str,), True), "delegation_id": ((str, _NONE), True)},
    "decision.create": {},
    "decision.item.create": {"item": ((dict,), True)},
    "decision.item.delete": {"item_id": ((str,), True)},
    "response.item.create": {"item": ((dict,), True)},
    "response.create": {},
    "session.close": {},
}
#: what a sideband (``/attach``) may send: no start, no input audio; DTMF added
SIDEBAND_EVENT_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    **{t: f for t, f in CLIENT_EVENT_FIELDS.items() if t not in ("session.start", "session.input_audio.append")},
    "transport.dtmf.send": {"event": ((str,), True)},
}
APPEND_EVENTS = ("session.instructions.append", "session.thinking.append", "session.commentary.append")
#: session fields fixed at startup (a session.update naming one is ``immutable_field_update``)
IMMUTABLE_FIELDS = ("model", "audio", "instructions", "input", "store", "safety_identifier", "client")


# ---------------------------------------------------------------- errors
def error_event(code: str, message: str, param: str | None = None, client_event_id: str | None = None,
                error_type: str = "invalid_request_error") -> dict[str, Any]:
    """A Live ``error`` event; ``param`` and ``client_event_id`` only when they apply."""
    err: dict[str, Any] = {"type": error_type, "code": code, "message": message}
    if param is not None:
        err["param"] = param
    ev: dict[str, Any] = {"type": "error", "event_id": new_id("event"), "error": err}
    if client_event_id is not None:
        err["client_event_id"] = client_event_id
        ev["client_event_id"] = client_event_id
    return ev


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", _NONE: "null"}.get(type(value), type(value).__name__)


def _bad_type(path: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError("invalid_type", f"Invalid type for '{path}': expected {expected}, but got "
                         f"{_type_name(value)} instead.", path)


def _isinstance(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not an integer
    return isinstance(value, types)


def validate_client_event(event: Any, sideband: bool = False) -> str:
    """Check an event's envelope and top-level fields; return its type or raise ProtocolError."""
    if not isinstance(event, dict):
        raise ProtocolError("invalid_event", "The event must be a JSON object.")
    etype = event.get("type")
    if etype is None:
        raise ProtocolError("missing_required_parameter", "Missing required parameter: 'type'.", "type")
    if not isinstance(etype, str):
        raise _bad_type("type", "a string", etype)
    table = SIDEBAND_EVENT_FIELDS if sideband else CLIENT_EVENT_FIELDS
    spec = table.get(etype)
    if spec is None:
        hint = ""
        if sideband and etype in CLIENT_EVENT_FIELDS:
            hint = (" A sideband attaches to a running session: it never sends session.start, and the input audio "
                    "comes from the primary connection.")
        elif etype.startswith(("input_audio_buffer.", "conversation.", "response.cancel")):
            hint = " GPT-Live has no input buffer, conversation items or cancel: the model takes turns by itself."
        raise ProtocolError("invalid_value", f"Invalid value: '{etype}'. Supported values are: "
                            + ", ".join(f"'{t}'" for t in table) + "." + hint, "type")
    eid = event.get("event_id")
    if etype == "decision.create" and not isinstance(eid, str):
        if "event_id" not in event:
            raise ProtocolError("missing_required_parameter", "Missing required parameter: 'event_id'.", "event_id")
        raise _bad_type("event_id", "a string", eid)
    if eid is not None and not isinstance(eid, str):
        raise _bad_type("event_id", "a string", eid)
    for key in event:
        if key not in spec and key not in ("type", "event_id"):
            raise ProtocolError("unknown_parameter", f"Unknown parameter: '{key}'.", key)
    for key, (types, required) in spec.items():
        if key not in event:
            if required:
                nullable = " (it may be null)" if _NONE in types else ""
                raise ProtocolError("missing_required_parameter",
                                    f"Missing required parameter: '{key}'{nullable}.", key)
            continue
        if not _isinstance(event[key], types):
            expected = " or ".join("null" if t is _NONE else _type_name(t()) for t in types)
            raise _bad_type(key, expected, event[key])
    return etype


# ---------------------------------------------------------------- a small schema for nested objects
Check = Callable[[Any, str], Any]   #: (value, path) -> the value as kept; raises ProtocolError


def _obj(fields: dict[str, tuple[Check, bool]]) -> Check:
    def check(value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _bad_type(path, "an object", value)
        for key in value:
            if key not in fields:
                raise ProtocolError("unknown_parameter", f"Unknown parameter: '{path}.{key}'.", f"{path}.{key}")
        out = {}
        for key, (sub, required) in fields.items():
            if key in value:
                out[key] = sub(value[key], f"{path}.{key}")
            elif required:
                raise ProtocolError("missing_required_parameter", f"Missing required parameter: '{path}.{key}'.",
                                    f"{path}.{key}")
        return out
    return check


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _bad_type(path, "a string", value)
    return value


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _bad_type(path, "a boolean", value)
    return value


def _non_negative_int(value: Any, path: str) -> int:
    if not _isinstance(value, (int,)):
        raise _bad_type(path, "an integer", value)
    if value < 0:
        raise ProtocolError("invalid_value", f"Invalid '{path}': expected a non-negative integer, got {value}.", path)
    return int(value)


def _literal(*values: Any) -> Check:
    def check(value: Any, path: str) -> Any:
        if value not in values or isinstance(value, bool) != isinstance(values[0], bool):
            raise ProtocolError("invalid_value", f"Invalid value for '{path}': {value!r}. Supported values are: "
                                + ", ".join(repr(v) for v in values) + ".", path)
        return value
    return check


def _nullable(sub: Check) -> Check:
    def check(value: Any, path: str) -> Any:
        return None if value is None else sub(value, path)
    return check


def _tagged(tag: str, variants: dict[str, Check]) -> Check:
    """An object whose ``tag`` field picks its shape."""
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _bad_type(path, "an object", value)
        if tag not in value:
            raise ProtocolError("missing_required_parameter", f"Missing required parameter: '{path}.{tag}'.",
                                f"{path}.{tag}")
        sub = variants.get(value[tag]) if isinstance(value[tag], str) else None
        if sub is None:
            raise ProtocolError("invalid_value", f"Invalid value for '{path}.{tag}': {value[tag]!r}. Supported values "
                                "are: " + ", ".join(f"'{v}'" for v in variants) + ".", f"{path}.{tag}")
        return sub(value, path)
    return check


def _list(sub: Check, max_len: int | None = None) -> Check:
    def check(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise _bad_type(path, "an array", value)
        if max_len is not None and len(value) > max_len:
            raise ProtocolError("invalid_value", f"Invalid '{path}': at most {max_len} items, got {len(value)}.", path)
        return [sub(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return check


def text_tokens(text: str) -> int:
    """The estimate the local server uses for the token limits: one token per 4 UTF-8 bytes."""
    return math.ceil(len(text.encode()) / 4) if text else 0


def _model(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _bad_type(path, "a string", value)
    if value not in LIVE_MODELS:
        hint = (" Realtime models are served at /v1/realtime." if value.startswith(("gpt-realtime", "gpt-4o"))
                else "")
        raise ProtocolError("model_not_found", f"The model '{value}' is not a GPT-Live model. Use one of: "
                            + ", ".join(LIVE_MODELS) + "." + hint, path)
    return value


def _voice(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        return _obj({"id": (_string, True)})(value, path)
    if not isinstance(value, str):
        raise _bad_type(path, "a string or an object", value)
    if value in FORBIDDEN_VOICES:
        raise ProtocolError("forbidden", f"The voice '{value}' is not available for GPT-Live. Built-in voices: "
                            + ", ".join(BUILT_IN_VOICES) + ".", path)
    return value   # the service also accepts further language voices by name


def _format(rates: tuple[int, ...], what: str) -> Check:
    def rate(value: Any, path: str) -> int:
        if not _isinstance(value, (int,)):
            raise _bad_type(path, "an integer", value)
        if value not in rates:
            raise ProtocolError("invalid_value", f"Invalid value for '{path}': {value}. {what} supports "
                                + " or ".join(str(r) for r in rates) + " Hz.", path)
        return int(value)
    return _obj({"type": (_string, True), "rate": (rate, True)})


_AUDIO_FORMAT = _tagged("type", {
    "audio/pcm": _format((16000, 24000), "audio/pcm"),
    "audio/pcmu": _format((8000,), "audio/pcmu"),
    "audio/pcma": _format((8000,), "audio/pcma"),
})


def _unsupported_delegation(value: Any, path: str) -> Any:
    raise ProtocolError("unsupported_delegation",
                        f"The local server delegates only to the client: '{path}.type' {value['type']!r} would need "
                        "the hosted Responses or Decisions API. Use {\"type\": \"client\"} (or omit delegation) and "
                        "answer session.delegation.created with session.commentary.append.", f"{path}.type")


_CLIENT_DELEGATION = _obj({"type": (_string, True), "acknowledgement_delay_ms": (_non_negative_int, False)})
_DELEGATION = _nullable(_tagged("type", {"client": _CLIENT_DELEGATION, "responses": _unsupported_delegation,
                                         "decisions": _unsupported_delegation}))


def _one_text_part(types: tuple[str, ...]) -> Check:
    part = _obj({"type": (_literal(*types), False), "text": (_string, True)})

    def check(value: Any, path: str) -> list[Any]:
        parts = _list(part)(value, path)
        if len(parts) != 1:
            raise ProtocolError("invalid_value", f"Invalid '{path}': a history message has exactly one text part, "
                                f"got {len(parts)}.", path)
        return parts
    return check


def _item(role: str, part_types: tuple[str, ...]) -> Check:
    return _obj({"role": (_string, True), "content": (_one_text_part(part_types), True), "id": (_string, False),
                 "status": (_literal("incomplete", "completed"), False), "type": (_literal("message"), False)})


_INITIAL_ITEM = _tagged("role", {"developer": _item("developer", ("input_text",)),
                                 "user": _item("user", ("input_text",)),
                                 "assistant": _item("assistant", ("text", "output_text"))})


def _instructions(value: Any, path: str) -> str:
    text = _string(value, path)
    if text_tokens(text) > INSTRUCTIONS_MAX_TOKENS:
        raise ProtocolError("invalid_value", f"Instructions must not exceed {INSTRUCTIONS_MAX_TOKENS} tokens.", path)
    return text


def _no_triggers(value: Any, path: str) -> list[Any]:
    items = _list(lambda v, p: v)(value, path)
    if items:
        raise ProtocolError("unsupported_trigger", "The local server does not run Decisions triggers; send "
                            "'triggers': [] or omit it.", path)
    return items


_DATA_CHANNEL = _obj({"allowed_client_events": (lambda v, p: v if v == "all" else _list(_string)(v, p), False),
                      "allowed_server_events": (lambda v, p: v if v == "all" else _list(_obj(
                          {"type": (_string, True), "response_event": (_string, False)}))(v, p), False)})

SESSION_CONFIG = _obj({
    "model": (_model, True),
    "audio": (_obj({"format": (_AUDIO_FORMAT, False),
                    "output": (_obj({"voice": (_voice, False)}), False)}), False),
    "client": (_obj({"data_channel": (_DATA_CHANNEL, False)}), False),
    "delegation": (_DELEGATION, False),
    "input": (_list(_INITIAL_ITEM, INPUT_MAX_MESSAGES), False),
    "instructions": (_instructions, False),
    "safety_identifier": (_string, False),
    "store": (_boolean, False),
    "triggers": (_no_triggers, False),
})


def resolve_session(raw: dict[str, Any], session_id: str, expires_at: int) -> dict[str, Any]:
    """Check ``session.start``'s ``session`` and fill in the server's defaults: the resolved
    SessionResource (as the service shows it in ``session.started``)."""
    cfg = SESSION_CONFIG(raw, "session")
    audio = cfg.get("audio") or {}
    output = dict(audio.get("output") or {})
    output.setdefault("voice", DEFAULT_VOICE)
    delegation = cfg.get("delegation") or {"type": "client"}
    instructions = cfg.get("instructions")
    out: dict[str, Any] = {
        "id": session_id, "expires_at": expires_at, "model": cfg["model"],
        "instructions": instructions if instructions and instructions.strip() else DEFAULT_INSTRUCTIONS,
        "audio": {"output": output, "format": dict(audio.get("format") or DEFAULT_FORMAT)},
        "delegation": delegation, "status": "active", "input": cfg.get("input", []),
    }
    for key in ("client", "store", "safety_identifier", "triggers"):
        if key in cfg:
            out[key] = cfg[key]
    return out


def apply_session_update(current: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """Check a ``session.update`` (only delegation settings and triggers may change) and
    return the updated SessionResource; ``current`` is not changed."""
    for key in raw:
        if key in IMMUTABLE_FIELDS:
            raise ProtocolError("immutable_field_update", f"'session.{key}' cannot change after startup; only "
                                "'delegation' settings and 'triggers' can be updated.", f"session.{key}")
    upd = _obj({"delegation": (_DELEGATION, False), "triggers": (_no_triggers, False)})(raw, "session")
    out = dict(current)
    if "delegation" in upd:
        new = upd["delegation"] or {"type": "client"}
        if new["type"] != current["delegation"]["type"]:
            raise ProtocolError("immutable_field_update", "The delegation type cannot change during a session.",
                                "session.delegation.type")
        out["delegation"] = {**current["delegation"], **new}
    if "triggers" in upd:
        out["triggers"] = upd["triggers"]
    return out


# ---------------------------------------------------------------- audio formats
@dataclass(frozen=True)
class AudioFormat:
    """The session's one audio format (both directions)."""
    type: str = "audio/pcm"
    rate: int = 24000

    @classmethod
    def of(cls, session: dict[str, Any]) -> "AudioFormat":
        fmt = session["audio"]["format"]
        return cls(fmt["type"], int(fmt["rate"]))

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.type == "audio/pcm" else 1


class InputDecoder:
    """Wire audio in the session's format -> PCM16 24 kHz, with one streaming resampler per
    session (no edges between appends). A PCM16 append must hold whole samples."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self._stream = None if fmt.rate == API_RATE_HZ else soxr.ResampleStream(fmt.rate, API_RATE_HZ, 1,
                                                                                 dtype="int16", quality="HQ")

    def samples(self, data: bytes) -> int:
        """How many samples (at the format's rate) ``data`` holds."""
        return len(data) // self.fmt.bytes_per_sample

    def decode(self, data: bytes) -> np.ndarray:
        if self.fmt.type == "audio/pcm":
            if len(data) % 2:
                raise ProtocolError("invalid_value", "Invalid 'audio': audio/pcm is 16-bit, so an append must hold "
                                    f"an even number of bytes (got {len(data)}).", "audio")
            pcm = np.frombuffer(data, dtype="<i2")
        else:
            pcm = g711_decode(data, self.fmt.type)
        if self._stream is None:
            return pcm
        return self._stream.resample_chunk(pcm)


class OutputEncoder:
    """PCM16 24 kHz -> wire audio in the session's format, streaming. Every call returns
    exactly the duration it was given: the resampler is primed with PRIME_MS of silence, so
    its output always covers what is asked (the track starts with silence anyway)."""

    PRIME_MS = 100

    def __init__(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self._stream = None
        self._fifo = np.zeros(0, dtype=np.int16)
        self._owed = 0   #: input samples not yet converted to whole output samples (times fmt.rate)
        if fmt.rate != API_RATE_HZ:
            self._stream = soxr.ResampleStream(API_RATE_HZ, fmt.rate, 1, dtype="int16", quality="HQ")
            self._fifo = self._stream.resample_chunk(np.zeros(API_RATE_HZ * self.PRIME_MS // 1000, dtype=np.int16))

    def encode(self, pcm24k: np.ndarray) -> bytes:
        if self._stream is None:
            return pcm24k.astype("<i2", copy=False).tobytes()
        self._fifo = np.concatenate([self._fifo, self._stream.resample_chunk(pcm24k)])
        self._owed += len(pcm24k) * self.fmt.rate
        n = self._owed // API_RATE_HZ
        self._owed -= n * API_RATE_HZ
        out = self._fifo[:n]
        if len(out) < n:
            out = np.concatenate([out, np.zeros(n - len(out), dtype=np.int16)])
        self._fifo = self._fifo[n:]
        if self.fmt.type == "audio/pcm":
            return out.astype("<i2", copy=False).tobytes()
        return g711_encode(out, self.fmt.type)

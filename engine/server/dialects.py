"""``engine serve --dialect``: the local server speaking a provider's dialect of the Realtime
protocol, so the engine's client-side adapters (:mod:`engine.realtime.dialects`) are tested end to
end. Pure: a client message in (to GA for :class:`engine.server.session.ServerSession`), a GA
server event out (to the dialect's shape).

- ``openai``: GA, as the server always spoke.
- ``azure``: GA events; the socket is at ``/openai/v1/realtime?model=DEPLOYMENT`` (and
  ``/openai/v1/live/sessions``) and takes the key in an ``api-key`` header or as a bearer token.
  The session names the deployment as its model, as Azure's does.
- ``xai``: the first event is ``conversation.created``; ``session.update`` must be flat (``type``,
  ``model``, ``audio.output.voice`` or ``audio.input.turn_detection`` are refused, naming xAI's
  shape) and ``session.updated`` is flat; ``response.create`` takes ``response.modalities``;
  ``conversation.item.truncate`` / ``retrieve`` / ``delete`` and ``output_audio_buffer.clear`` do
  not exist; speech events carry ``item_id`` only; ``response.done`` has its usage at the top level
  (``response.usage`` is ``{}``); ``ping`` comes every PING_EVERY_S; no ``rate_limits.updated``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from engine.server.protocol import error_event, new_id

DIALECTS = ("openai", "azure", "xai")
PING_EVERY_S = 2.0
AZURE_PREFIX = "/openai"
XAI_MISSING = frozenset({"conversation.item.truncate", "conversation.item.retrieve", "conversation.item.delete",
                         "output_audio_buffer.clear"})
_USAGE_KEYS = ("total_tokens", "input_tokens", "output_tokens", "input_token_details", "output_token_details")


@dataclass
class ServerDialect:
    """GA both ways (``openai`` and ``azure``: Azure differs in its URL and sign-in only)."""
    name: str = "openai"
    ping_every_s: float | None = None

    def inbound(self, raw: str | bytes) -> tuple[str | bytes, dict[str, Any] | None]:
        """The client message for the GA session, or an ``error`` event to answer instead."""
        return raw, None

    def outbound(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        return [event]

    def ping(self) -> dict[str, Any] | None:
        return None


class XaiServerDialect(ServerDialect):
    def __init__(self) -> None:
        super().__init__("xai", PING_EVERY_S)

    def inbound(self, raw: str | bytes) -> tuple[str | bytes, dict[str, Any] | None]:
        try:
            ev = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return raw, None                     # the session says what is wrong with it
        if not isinstance(ev, dict):
            return raw, None
        etype = ev.get("type")
        eid = ev.get("event_id") if isinstance(ev.get("event_id"), str) else None
        if etype in XAI_MISSING:
            return raw, error_event("invalid_event", f"Unknown event type '{etype}': xAI's Voice Agent API has no "
                                    "such client event.", "type", eid)
        if etype == "response.create" and isinstance(ev.get("response"), dict):
            resp = dict(ev["response"])
            if "output_modalities" in resp:
                return raw, error_event("unknown_parameter", "Unknown parameter 'response.output_modalities': xAI "
                                        "takes 'response.modalities'.", "response.output_modalities", eid)
            if "modalities" in resp:
                resp["output_modalities"] = resp.pop("modalities")
            return json.dumps({**ev, "response": resp}), None
        if etype == "session.update" and isinstance(ev.get("session"), dict):
            flat = ev["session"]
            audio = flat.get("audio") if isinstance(flat.get("audio"), dict) else {}
            nested = [f"session.{k}" for k in ("type", "model") if k in flat]
            nested += [f"session.audio.output.{k}" for k in ("voice",) if k in (audio.get("output") or {})]
            nested += [f"session.audio.input.{k}" for k in ("turn_detection",) if k in (audio.get("input") or {})]
            nested += [f"session.{k}" for k in ("output_modalities", "tool_choice", "max_output_tokens", "truncation",
                                                "tracing", "prompt", "include") if k in flat]
            if nested:
                return raw, error_event("unknown_parameter", f"Unknown parameter '{nested[0]}': xAI's session is flat "
                                        "(voice, instructions and turn_detection at the top level; no type or "
                                        "model).", nested[0], eid)
            return json.dumps({**ev, "session": self.ga_session(flat)}), None
        return raw, None

    @staticmethod
    def ga_session(flat: dict[str, Any]) -> dict[str, Any]:
        audio = flat.get("audio") or {}
        inp = {k: v for k, v in (audio.get("input") or {}).items() if k == "format"}
        outp = {k: v for k, v in (audio.get("output") or {}).items() if k in ("format", "speed")}
        if "voice" in flat:
            outp["voice"] = flat["voice"] if flat["voice"] in GA_VOICES else "marin"
        if "turn_detection" in flat:
            td = flat["turn_detection"]
            inp["turn_detection"] = {**td, "create_response": True, "interrupt_response": True} \
                if isinstance(td, dict) and td.get("type") else None
        inp["transcription"] = {"model": "whisper-1"}      # xAI always transcribes the user
        ga: dict[str, Any] = {"type": "realtime", "audio": {"input": inp, "output": outp}}
        for key in ("instructions", "tools"):
            if key in flat:
                ga[key] = flat[key]
        return ga

    def outbound(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        etype = event["type"]
        if etype == "session.created":
            return [{"type": "conversation.created", "event_id": event["event_id"],
                     "conversation": {"id": new_id("conv"), "object": "realtime.conversation"}}]
        if etype == "session.updated":
            return [{**event, "session": self.flat_session(event["session"])}]
        if etype == "rate_limits.updated":
            return []
        if etype in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"):
            return [{k: v for k, v in event.items() if k not in ("audio_start_ms", "audio_end_ms")}]
        if etype == "response.done":
            resp = dict(event["response"])
            usage = resp.get("usage") or {}
            resp["usage"] = {}
            return [{**event, "response": resp, **{k: usage[k] for k in _USAGE_KEYS if k in usage}}]
        return [event]

    @staticmethod
    def flat_session(ga: dict[str, Any]) -> dict[str, Any]:
        audio = ga.get("audio") or {}
        inp, outp = audio.get("input") or {}, audio.get("output") or {}
        return {"id": ga.get("id"), "object": "realtime.session", "instructions": ga.get("instructions"),
                "voice": outp.get("voice"), "turn_detection": inp.get("turn_detection"), "tools": ga.get("tools", []),
                "audio": {"input": {"format": inp.get("format")}, "output": {"format": outp.get("format")}}}

    def ping(self) -> dict[str, Any] | None:
        return {"type": "ping", "timestamp": int(time.time() * 1000)}


GA_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"})


def server_dialect(name: str) -> ServerDialect:
    if name == "xai":
        return XaiServerDialect()
    if name in DIALECTS:
        return ServerDialect(name)
    raise ValueError(f"dialect {name!r}: use one of {', '.join(DIALECTS)}")


def azure_path(path: str) -> str | None:
    """An Azure-shaped request path as the server's own (``/openai/v1/…`` -> ``/v1/…``), or None."""
    if path.startswith(AZURE_PREFIX + "/v1/"):
        return path[len(AZURE_PREFIX):]
    return None

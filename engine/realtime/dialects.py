"""Dialects of the Realtime protocol: what a provider's wire says, translated to and from the GA
events the realtime core speaks. Pure: events in, events out; the socket's owner applies it at
the wire (every client event on its way out, every server event on its way in), so the core and
the rest of the engine only ever see GA events.

``openai`` (and Azure OpenAI, whose events are OpenAI's) is the identity. ``xai`` is xAI's Grok
Voice Agent API (``providers-and-sip.md`` section 7):

- ``session.update`` is flat: no ``type`` or ``model``; ``voice``, ``instructions`` and
  ``turn_detection`` at the top level; ``audio.input.format`` / ``audio.output.format`` nested;
  transcription takes ``language_hint``; no semantic VAD (it becomes server VAD); reasoning is
  ``none`` or ``high``. Fields xAI has no place for are left out (listed in ``dropped``).
- ``response.create`` names its modalities ``response.modalities``.
- No ``conversation.item.truncate``, ``retrieve`` or ``delete``: they are not sent (counted).
- The first server event is ``session.created`` or ``conversation.created``: either becomes a
  GA ``session.created``; ``session.created`` / ``session.updated`` are put back in GA shape.
- ``ping`` is answered by nothing and dropped (counted).
- ``response.done`` carries its usage at the top level (``response.usage`` is ``{}``): it is moved
  into the response, with ``billed_seconds``, the connection time since the last one, because xAI
  bills per minute of session (:func:`engine.cost.response_cost_usd` prices it per minute).
- An event the engine cannot place (an unknown type) raises :class:`DialectError` naming the
  provider and what to do.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

from engine.errors import EngineError

#: GA server event types (the core's tables name what it handles; unknown ones are its business)
XAI_ONLY_DROPPED = frozenset({"ping"})
XAI_UNSUPPORTED_CLIENT = frozenset({"conversation.item.truncate", "conversation.item.retrieve",
                                    "conversation.item.delete", "output_audio_buffer.clear"})
XAI_SERVER_EVENTS = frozenset({
    "session.created", "session.updated", "conversation.created", "conversation.item.added", "conversation.item.done",
    "conversation.item.input_audio_transcription.completed", "conversation.item.input_audio_transcription.updated",
    "conversation.item.input_audio_transcription.delta", "conversation.item.input_audio_transcription.failed",
    "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
    "input_audio_buffer.cleared", "response.created", "response.done", "response.output_item.added",
    "response.output_item.done", "response.content_part.added", "response.content_part.done",
    "response.output_audio.delta", "response.output_audio.done", "response.output_audio_transcript.delta",
    "response.output_audio_transcript.done", "response.output_text.delta", "response.output_text.done",
    "response.function_call_arguments.delta", "response.function_call_arguments.done", "error", "ping",
    "rate_limits.updated"})


class DialectError(EngineError):
    """A server event of a provider's dialect that the engine cannot place."""


@dataclass
class Dialect:
    """The identity (OpenAI, Azure OpenAI): GA events both ways."""
    name: str = "openai"
    provider: str = "openai"
    counts: dict[str, int] = field(default_factory=dict)

    def outgoing(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        """The client event as this provider takes it; None: the provider has no such event.
        (The identity hands the event back as it is: no copy on the audio path.)"""
        return event if isinstance(event, dict) else dict(event)

    def incoming(self, event: Mapping[str, Any], now_s: float) -> list[dict[str, Any]]:
        """The GA events a server event stands for (none for a keep-alive)."""
        return [event if isinstance(event, dict) else dict(event)]

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


@dataclass
class XaiDialect(Dialect):
    """xAI's Grok Voice Agent API (module docstring)."""
    name: str = "xai"
    provider: str = "xai"
    model: str = ""
    connected_s: float | None = None       #: when billing started (the first server event)
    billed_until_s: float | None = None    #: connection time already put on a response.done

    # ------------------------------------------------------------------ out
    def outgoing(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        etype = event.get("type")
        if etype in XAI_UNSUPPORTED_CLIENT:
            self.count(f"not_sent.{etype}")
            return None
        if etype == "session.update":
            return {**{k: v for k, v in event.items() if k != "session"},
                    "session": self.flat_session(event.get("session") or {})}
        if etype == "response.create" and isinstance(event.get("response"), dict):
            resp = dict(event["response"])
            if "output_modalities" in resp:
                resp["modalities"] = resp.pop("output_modalities")
            return {**event, "response": resp}
        return dict(event)

    def flat_session(self, ga: Mapping[str, Any]) -> dict[str, Any]:
        """A GA session (``session.update``'s) in xAI's flat shape."""
        out: dict[str, Any] = {}
        dropped = []
        audio = ga.get("audio") or {}
        inp, outp = audio.get("input") or {}, audio.get("output") or {}
        for key, value in ga.items():
            if key in ("type", "model"):
                continue
            if key in ("instructions", "tools"):
                out[key] = copy.deepcopy(value)
            elif key == "reasoning" and isinstance(value, dict):
                effort = value.get("effort")
                out["reasoning"] = {"effort": "none" if effort in ("none", "minimal", None) else "high"}
            elif key != "audio":
                dropped.append(key)
        if "voice" in outp:
            out["voice"] = outp["voice"]
        if "turn_detection" in inp:
            td = inp["turn_detection"]
            if isinstance(td, dict):
                flat = {k: v for k, v in td.items() if k in ("type", "threshold", "prefix_padding_ms",
                                                             "silence_duration_ms", "idle_timeout_ms")}
                if flat.get("type") != "server_vad":
                    flat = {"type": "server_vad"}      # no semantic VAD at xAI
                    dropped.append("audio.input.turn_detection.semantic_vad")
                out["turn_detection"] = flat
            else:
                out["turn_detection"] = None
        xa: dict[str, Any] = {}
        if "format" in inp:
            xa.setdefault("input", {})["format"] = copy.deepcopy(inp["format"])
        if isinstance(inp.get("transcription"), dict) and inp["transcription"].get("language"):
            xa.setdefault("input", {})["transcription"] = {"language_hint": inp["transcription"]["language"]}
        if "format" in outp:
            xa.setdefault("output", {})["format"] = copy.deepcopy(outp["format"])
        if outp.get("speed") is not None:
            xa.setdefault("output", {})["speed"] = min(1.5, max(0.7, float(outp["speed"])))
        if xa:
            out["audio"] = xa
        for key in ("noise_reduction",):
            if key in inp:
                dropped.append(f"audio.input.{key}")
        if dropped:
            self.count("session_fields_dropped")
        return out

    # ------------------------------------------------------------------ in
    def incoming(self, event: Mapping[str, Any], now_s: float) -> list[dict[str, Any]]:
        etype = event.get("type")
        if self.connected_s is None:
            self.connected_s = self.billed_until_s = now_s
        if etype in XAI_ONLY_DROPPED:
            self.count(etype)
            return []
        if etype not in XAI_SERVER_EVENTS:
            raise DialectError(f"xAI sent an event the engine cannot place: {etype!r}. The provider is 'xai' "
                               "(config.yaml provider): if xAI added it, teach engine/realtime/dialects.py "
                               "XaiDialect; if the server is not xAI, set provider to the one it is.")
        if etype == "conversation.created":
            conv = event.get("conversation") or {}
            return [{"type": "session.created", "event_id": event.get("event_id", ""),
                     "session": self.ga_session({"id": conv.get("id")})}]
        if etype in ("session.created", "session.updated"):
            return [{**event, "session": self.ga_session(event.get("session") or {})}]
        if etype == "response.done":
            return [self._usage_inside(event, now_s)]
        return [dict(event)]

    def ga_session(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """xAI's flat session as a GA session object (what the core reads: id, model, the rest kept)."""
        audio = flat.get("audio") or {}
        inp = dict(audio.get("input") or {})
        outp = dict(audio.get("output") or {})
        if "voice" in flat:
            outp["voice"] = flat["voice"]
        if "turn_detection" in flat:
            inp["turn_detection"] = flat["turn_detection"]
        session: dict[str, Any] = {"type": "realtime", "object": "realtime.session", "id": flat.get("id"),
                                   "model": self.model, "audio": {"input": inp, "output": outp}}
        for key in ("instructions", "tools"):
            if key in flat:
                session[key] = flat[key]
        return session

    def _usage_inside(self, event: Mapping[str, Any], now_s: float) -> dict[str, Any]:
        resp = dict(event.get("response") or {})
        usage = dict(resp.get("usage") or {})
        for key in ("total_tokens", "input_tokens", "output_tokens", "input_token_details", "output_token_details"):
            if key in event and key not in usage:
                usage[key] = event[key]
        since = self.billed_until_s if self.billed_until_s is not None else now_s
        usage["billed_seconds"] = round(max(0.0, now_s - since), 3)
        self.billed_until_s = now_s
        resp["usage"] = usage
        out = {k: v for k, v in event.items() if k not in ("total_tokens", "input_tokens", "output_tokens",
                                                           "input_token_details", "output_token_details")}
        out["response"] = resp
        return out


@dataclass
class AzureDialect(Dialect):
    """Azure OpenAI: OpenAI's events, but the session names the deployment where the model was; it
    is named back to the configured model (which the price table knows)."""
    name: str = "azure"
    provider: str = "azure"
    model: str = ""
    deployment: str = ""

    def incoming(self, event: Mapping[str, Any], now_s: float) -> list[dict[str, Any]]:
        ev = dict(event)
        session = ev.get("session")
        if ev.get("type") in ("session.created", "session.updated") and isinstance(session, dict) \
                and session.get("model") in (self.deployment, None) and self.model:
            ev["session"] = {**session, "model": self.model}
        return [ev]


def dialect_for(provider: str, model: str, deployment: str | None = None) -> Dialect:
    """The dialect a provider speaks."""
    if provider == "xai":
        return XaiDialect(model=model)
    if provider == "azure":
        return AzureDialect(model=model, deployment=deployment or model)
    return Dialect(provider=provider)

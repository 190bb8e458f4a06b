"""One realtime session of the local server: conversation state, input buffer, VAD,
responses. Sans-I/O: ``receive(event)`` returns the server events to send at once and
the actions the I/O layer must carry out (start a response, transcribe an item, wake a
response task). A response is streamed by iterating ``response_steps``, which yields
``(delay_s, event)`` pairs and changes state only as each event is taken, so the state
always matches what the client has been sent.

Rules:
- Every client event is checked by :mod:`engine.server.protocol` (items by ``parse_item``,
  response options by ``check_response_params``, sessions by ``merge_session_update``)
  before a handler changes anything, so a refused event (``ProtocolError``) changes
  nothing and sends only its ``error``.
- A bug in a handler is reported as a ``server_error`` and the session goes on.
- Dispatch is the ``HANDLERS`` table at the bottom, one handler per client event type.
- Audio is kept as chunks (``Item.append_audio``), never re-joined per delta; only the
  newest AUDIO_RETAIN_BYTES of PCM is kept, and the input buffer holds at most
  VAD_IDLE_KEEP_MS outside speech under VAD, MANUAL_BUFFER_KEEP_MS without it (memory stays flat).
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from engine.codec import API_RATE_HZ, b64decode_strict, b64encode, decode_audio, encode_audio
from engine.server.expect import expected_phrases, phrase, tool_phrase
from engine.server.faults import Faults
from engine.server.protocol import (CLIENT_EVENT_FIELDS, MAX_EVENT_BYTES, RESPONSE_KEYS, ParsedItem, ProtocolError,
                                    check_keys, check_response_params, copy_item_data, default_session,
                                    error_event, merge_session_update, model_audio_tokens, new_id, parse_item,
                                    response_conversation, text_tokens, user_audio_tokens, validate_client_event)
from engine.server.scenario import Rule, Scenario, fill, speakable
from engine.server.vad import ServerVad

log = logging.getLogger("realtalk.server")

DELTA_MS = 100                 #: audio per output delta
MIN_COMMIT_MS = 100
AUDIO_RETAIN_BYTES = 4 << 20   #: PCM kept for the newest items (about 90 s); older items retrieve without audio
VAD_IDLE_KEEP_MS = 10_000      #: input buffer kept outside speech under VAD
MANUAL_BUFFER_KEEP_MS = 120_000  #: input buffer kept without turn detection (a commit takes the newest this much)
BUFFER_TRIM_STEP_MS = 10_000   #: the manual buffer is trimmed once it is this much over its keep (no copy per append)
IDLE_REPLY = "Are you still there?"
NO_USER_REPLY = "Hello! I am realtalk's local server. Say something and I will answer."


@dataclass
class Item:
    """A conversation item. Its audio (PCM16 24 kHz) is a list of chunks, appended as it
    arrives; ``audio_samples`` keeps its length even after the samples are forgotten
    (``forget_audio``: the server keeps the PCM of its newest items only, AUDIO_RETAIN_BYTES)."""
    data: dict[str, Any]                         #: the item as the API shows it (no audio bytes)
    heard: str | None = None                     #: user's words (text, or transcript of audio)
    transcript_pending: bool = False
    idle: bool = False                           #: the empty user turn an idle timeout committed
    has_audio: bool = False                      #: an audio item (user input or model output)
    audio_samples: int = 0                       #: its audio's length, kept when the samples go
    chunks: list[np.ndarray] = field(default_factory=list)
    audio_forgotten: bool = False
    expect: tuple[str, ...] = ()                 #: phrases its recogniser listens for (engine/server/expect.py)

    @classmethod
    def with_audio(cls, data: dict[str, Any], pcm: np.ndarray | None, heard: str | None = None) -> "Item":
        item = cls(data, heard=heard)
        if pcm is not None:
            item.has_audio = True
            item.append_audio(pcm)
        return item

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def audio_ms(self) -> float:
        return self.audio_samples * 1000.0 / API_RATE_HZ

    @property
    def audio_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    @property
    def audio(self) -> np.ndarray | None:
        """The samples (joined once, then kept as one chunk); None if none or forgotten."""
        if not self.has_audio or self.audio_forgotten:
            return None
        if len(self.chunks) != 1:
            self.chunks = [np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.int16)]
        return self.chunks[0]

    def append_audio(self, pcm: np.ndarray) -> None:
        self.has_audio = True
        if len(pcm):
            self.chunks.append(pcm)
            self.audio_samples += len(pcm)

    def truncate_audio(self, samples: int) -> None:
        """Keep the first ``samples`` (the forgotten samples' count shrinks the same way)."""
        pcm = self.audio
        if pcm is not None:
            self.chunks = [pcm[:samples].copy()] if samples else []
        self.audio_samples = min(self.audio_samples, samples)

    def forget_audio(self) -> None:
        self.chunks = []
        self.audio_forgotten = True


@dataclass
class Response:
    id: str
    params: dict[str, Any]
    in_conversation: bool
    modalities: list[str]
    voice: str
    audio_format: str
    metadata: dict[str, str] | None
    input_items: list[Item] | None = None        #: out-of-band input, else the conversation
    cancel_reason: str | None = None
    max_output_tokens: int | None = None         #: None = no limit ('inf')
    tool_choice: Any = "auto"
    incomplete_reason: str | None = None         #: "max_output_tokens" once the limit stopped it
    done: bool = False
    text: str | None = None                      #: what it says (planned)
    call: tuple[str, str, str] | None = None     #: (name, arguments, call_id)
    output: list[dict[str, Any]] = field(default_factory=list)
    item: Item | None = None
    audio_sent_ms: float = 0.0
    text_sent: str = ""
    deltas_sent: int = 0
    usage_in: dict[str, int] = field(default_factory=dict)

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    @property
    def stopped(self) -> bool:
        """Cancelled, or cut by its token limit: it sends no more content."""
        return self.cancel_reason is not None or self.incomplete_reason is not None

    def out_of_tokens(self, text: str = "", audio_ms: float = 0.0) -> bool:
        """True (and marks it incomplete) if sending ``text``/``audio_ms`` more would pass its limit."""
        if self.max_output_tokens is None:
            return False
        if text_tokens(self.text_sent + text) + model_audio_tokens(self.audio_sent_ms + audio_ms) > self.max_output_tokens:
            self.incomplete_reason = "max_output_tokens"
            return True
        return False


@dataclass
class Actions:
    """What the I/O layer must do after ``receive``."""
    send: list[dict[str, Any]] = field(default_factory=list)
    start: list[Response] = field(default_factory=list)          #: new responses to stream
    wake: list[Response] = field(default_factory=list)           #: responses cancelled/cleared
    transcribe: list[Item] = field(default_factory=list)         #: user audio items needing words


class ServerSession:
    def __init__(self, model: str, scenario: Scenario | None = None, faults: Faults | None = None,
                 transcribe_turns: bool = True) -> None:
        self.session = default_session(model, new_id("sess"))
        self.conversation_id = new_id("conv")
        self.scenario = scenario or Scenario()
        self.faults = faults or Faults()
        self.rng = random.Random(self.faults.seed)
        self.items: list[Item] = []
        self.by_id: dict[str, Item] = {}
        self.buffer: list[np.ndarray] = []
        self.buffer_samples = 0
        self.buffer_start_sample = 0           #: session clock at the start of the buffer
        self.total_samples = 0                 #: all audio appended this session
        self.vad = ServerVad()
        self.speech_item_id: str | None = None
        self.active: Response | None = None
        self.responses: dict[str, Response] = {}
        self.user_turns = 0
        self.audio_was_output = False
        self.prev_input_tokens = 0             #: billed input of the last response (cache prefix)
        self.pending_then: dict[str, Rule] = {}
        self.transcribe_turns = transcribe_turns
        self.idle_epoch = 0                    #: bumped by everything that ends an idle stretch
        self._configure_vad()

    # ------------------------------------------------------------------ helpers
    @property
    def turn_detection(self) -> dict[str, Any] | None:
        return self.session["audio"]["input"]["turn_detection"]

    @property
    def input_format(self) -> str:
        return self.session["audio"]["input"]["format"]["type"]

    def _configure_vad(self) -> None:
        td = self.turn_detection
        if td and td["type"] == "server_vad":
            self.vad.configure(td["threshold"], td["prefix_padding_ms"], td["silence_duration_ms"])
        elif td:  # semantic_vad: eagerness sets how long a pause ends the turn
            silence = {"low": 1200, "medium": 700, "high": 300, "auto": 700}.get(td.get("eagerness", "auto"), 700)
            self.vad.configure(0.5, 300, silence)

    def created_event(self) -> dict[str, Any]:
        return {"type": "session.created", "event_id": new_id("event"), "session": self.session}

    def _ev(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "event_id": new_id("event"), **fields}

    def _prev_id(self, item: Item) -> str | None:
        idx = self.items.index(item)
        return self.items[idx - 1].id if idx > 0 else None

    def _insert(self, item: Item, previous_item_id: str | None = None, append: bool = True) -> None:
        if append:
            self.items.append(item)
        elif previous_item_id == "root":
            self.items.insert(0, item)
        else:
            assert previous_item_id is not None
            prev = self.by_id[previous_item_id]  # caller checked it exists
            self.items.insert(self.items.index(prev) + 1, item)
        self.by_id[item.id] = item

    def _retain_audio(self) -> None:
        """Keep the PCM of the newest items only, AUDIO_RETAIN_BYTES in all; older items keep
        their audio's length (usage, truncation) but retrieve without audio. Memory stays flat."""
        kept = 0
        for item in reversed(self.items):
            if item.audio_forgotten or not item.chunks:
                continue
            kept += item.audio_bytes
            if kept > AUDIO_RETAIN_BYTES:
                item.forget_audio()

    def _trim_idle_buffer(self) -> None:
        """Under VAD, outside speech, drop buffered audio no turn can still reach: a turn
        starts at most prefix_padding_ms before its speech, so VAD_IDLE_KEEP_MS is plenty
        (a manual commit in VAD mode then commits the newest VAD_IDLE_KEEP_MS)."""
        td = self.turn_detection
        keep = max(VAD_IDLE_KEEP_MS, int(td.get("prefix_padding_ms", 300)) + 1000) * API_RATE_HZ // 1000 if td else 0
        if not keep or self.vad.in_speech or self.buffer_samples <= 2 * keep:
            return  # trimmed in steps of ``keep``, so appends do not copy the buffer each time
        self._keep_newest(keep)

    def _trim_manual_buffer(self) -> None:
        """Without turn detection, keep the newest MANUAL_BUFFER_KEEP_MS: a client that streams its
        mic between push-to-talk turns would otherwise fill the buffer for the whole session."""
        keep = MANUAL_BUFFER_KEEP_MS * API_RATE_HZ // 1000
        if self.buffer_samples > keep + BUFFER_TRIM_STEP_MS * API_RATE_HZ // 1000:
            self._keep_newest(keep)

    def _keep_newest(self, keep: int) -> None:
        """Drop the buffer's audio but its newest ``keep`` samples: whole chunks from its head, and
        the head of the first chunk kept (copied), so no copy of the buffer is ever made."""
        drop = self.buffer_samples - keep
        if drop <= 0:
            return
        whole = n = 0   # the first n chunks, ``whole`` samples, go entirely
        for chunk in self.buffer:
            if whole + len(chunk) > drop:
                break
            whole += len(chunk)
            n += 1
        del self.buffer[:n]
        rest = drop - whole
        if rest and self.buffer:
            self.buffer[0] = self.buffer[0][rest:].copy()
        self.buffer_samples = keep
        self.buffer_start_sample += drop

    # ------------------------------------------------------------------ input
    def receive_text(self, raw: str | bytes) -> Actions:
        """Handle one websocket message; bad input becomes an ``error`` event."""
        acts = Actions()
        if len(raw) > MAX_EVENT_BYTES:
            acts.send.append(error_event("invalid_value", f"The event is {len(raw)} bytes; the maximum is "
                                         f"{MAX_EVENT_BYTES} bytes (15 MiB). Split audio into smaller appends.", None))
            return acts
        try:
            event = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            acts.send.append(error_event("invalid_json", f"We could not parse the JSON body of your request. ({exc})"))
            return acts
        client_event_id = event.get("event_id") if isinstance(event, dict) and isinstance(event.get("event_id"), str) else None
        try:
            etype = validate_client_event(event)
            HANDLERS[etype](self, event, acts)
        except ProtocolError as exc:
            acts = Actions(send=[error_event(exc.code, exc.message, exc.param, client_event_id, exc.error_type)])
        except Exception as exc:  # noqa: BLE001 - a bug must not end the client's conversation
            log.exception("local server: handling %s failed", event.get("type"))
            acts = Actions(send=[error_event("server_error", f"The server had an error while processing your "
                                             f"request ({type(exc).__name__}: {exc}).", None, client_event_id,
                                             "server_error")])
        return acts

    def _on_session_update(self, ev: dict[str, Any], acts: Actions) -> None:
        old_td = self.turn_detection
        self.session = merge_session_update(self.session, ev["session"], self.audio_was_output)
        if self.turn_detection != old_td:
            self._configure_vad()
            if self.turn_detection is None:
                self.vad.reset_speech()
        self.idle_epoch += 1
        acts.send.append(self._ev("session.updated", session=self.session))

    def _on_input_audio_buffer_append(self, ev: dict[str, Any], acts: Actions) -> None:
        try:
            data = b64decode_strict(ev["audio"])
        except ValueError:
            raise ProtocolError("invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes.", "audio") from None
        pcm = decode_audio(data, self.input_format)
        if len(pcm) == 0:
            return
        if self.buffer_samples == 0:
            self.buffer_start_sample = self.total_samples
        self.buffer.append(pcm)
        self.buffer_samples += len(pcm)
        self.total_samples += len(pcm)
        if self.turn_detection is None:
            self.vad.skip(len(pcm))
            self._trim_manual_buffer()
            return
        for vev in self.vad.feed(pcm):
            if vev.kind == "started":
                self.idle_epoch += 1
                self.speech_item_id = new_id("item")
                acts.send.append(self._ev("input_audio_buffer.speech_started", audio_start_ms=vev.ms,
                                          item_id=self.speech_item_id))
                if self.active is not None and self.turn_detection.get("interrupt_response", True):
                    self._cancel(self.active, "turn_detected", acts)
            else:
                item_id = self.speech_item_id or new_id("item")
                acts.send.append(self._ev("input_audio_buffer.speech_stopped", audio_end_ms=vev.ms, item_id=item_id))
                start = self.vad.speech_start_ms * API_RATE_HZ // 1000
                end = vev.ms * API_RATE_HZ // 1000
                self._commit(acts, item_id, start_sample=start, end_sample=end)
                self.speech_item_id = None
                if self.turn_detection.get("create_response", True) and self.active is None:
                    self._start_response({}, acts)
        self._trim_idle_buffer()

    def _buffer_pcm(self) -> np.ndarray:
        if not self.buffer:
            return np.zeros(0, dtype=np.int16)
        pcm = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        self.buffer = [pcm]
        return pcm

    def _commit(self, acts: Actions, item_id: str, start_sample: int | None = None,
                end_sample: int | None = None) -> None:
        self.idle_epoch += 1
        pcm = self._buffer_pcm()
        if start_sample is not None and end_sample is not None:
            lo = max(0, start_sample - self.buffer_start_sample)
            hi = max(lo, min(len(pcm), end_sample - self.buffer_start_sample))
            audio, rest = pcm[lo:hi], pcm[hi:]
        else:
            audio, rest = pcm, pcm[:0]
        self.buffer_start_sample += len(pcm) - len(rest)
        self.buffer = [rest] if len(rest) else []
        self.buffer_samples = len(rest)
        prev = self.items[-1].id if self.items else None
        item = Item.with_audio({"id": item_id, "type": "message", "status": "completed", "role": "user",
                                "content": [{"type": "input_audio", "transcript": None}]}, audio.copy())
        self._insert(item)
        self._retain_audio()
        self.user_turns += 1
        acts.send.append(self._ev("input_audio_buffer.committed", previous_item_id=prev, item_id=item_id))
        acts.send.append(self._ev("conversation.item.added", previous_item_id=prev, item=item.data))
        acts.send.append(self._ev("conversation.item.done", previous_item_id=prev, item=item.data))
        item.heard = self.scenario.heard_for_turn(self.user_turns)
        if item.heard is None:
            item.transcript_pending = True
            item.expect = self.expected_phrases()
        acts.transcribe.append(item)

    def _on_input_audio_buffer_commit(self, ev: dict[str, Any], acts: Actions) -> None:
        ms = self.buffer_samples * 1000 / API_RATE_HZ
        if ms < MIN_COMMIT_MS:
            raise ProtocolError("input_audio_buffer_commit_empty",
                                f"Error committing input audio buffer: buffer too small. Expected at least "
                                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {ms:.2f}ms of audio.")
        self.vad.reset_speech()
        self._commit(acts, self.speech_item_id or new_id("item"))
        self.speech_item_id = None

    def _on_input_audio_buffer_clear(self, ev: dict[str, Any], acts: Actions) -> None:
        self.buffer, self.buffer_samples = [], 0
        self.buffer_start_sample = self.total_samples
        self.vad.reset_speech()
        self.speech_item_id = None
        acts.send.append(self._ev("input_audio_buffer.cleared"))

    def _on_conversation_item_create(self, ev: dict[str, Any], acts: Actions) -> None:
        raw = ev["item"]
        prev_id = ev.get("previous_item_id")
        if prev_id is not None and prev_id != "root" and prev_id not in self.by_id:
            raise ProtocolError("invalid_value", f"Item with item_id '{prev_id}' not found in the conversation.",
                                "previous_item_id")
        item = self._make_item(raw)
        if item.id in self.by_id:
            raise ProtocolError("invalid_value", f"Item with id '{item.id}' already exists.", "item.id")
        self._insert(item, prev_id, append=prev_id is None)
        self._retain_audio()
        if item.data.get("role") == "user" and item.data["type"] == "message":
            self.user_turns += 1
        prev = self._prev_id(item)
        acts.send.append(self._ev("conversation.item.added", previous_item_id=prev, item=item.data))
        acts.send.append(self._ev("conversation.item.done", previous_item_id=prev, item=item.data))

    def _make_item(self, raw: dict[str, Any]) -> Item:
        return self._item_from(parse_item(raw, self.input_format))

    @staticmethod
    def _item_from(parsed: ParsedItem) -> Item:
        return Item.with_audio(parsed.data, parsed.pcm, heard=parsed.heard)

    def _item_or_error(self, item_id: str, param: str = "item_id") -> Item:
        item = self.by_id.get(item_id)
        if item is None:
            raise ProtocolError("invalid_value", f"Item with item_id '{item_id}' not found in the conversation.", param)
        return item

    def _on_conversation_item_retrieve(self, ev: dict[str, Any], acts: Actions) -> None:
        item = self._item_or_error(ev["item_id"])
        data = copy_item_data(item.data)
        if item.audio is not None and data.get("content"):
            fmt = self.input_format if data.get("role") == "user" else self.session["audio"]["output"]["format"]["type"]
            for part in data["content"]:
                if part["type"] in ("input_audio", "output_audio"):
                    part["audio"] = b64encode(encode_audio(item.audio, fmt))
        acts.send.append(self._ev("conversation.item.retrieved", item=data))

    def _on_conversation_item_truncate(self, ev: dict[str, Any], acts: Actions) -> None:
        item = self._item_or_error(ev["item_id"])
        if ev["content_index"] != 0:
            raise ProtocolError("invalid_value", "Invalid 'content_index': expected 0.", "content_index")
        is_audio = (item.data.get("role") == "assistant"
                    and any(p["type"] == "output_audio" for p in item.data.get("content", [])))
        if not is_audio:
            raise ProtocolError("invalid_value", "Only model output audio messages can be truncated.", "item_id")
        end_ms = ev["audio_end_ms"]
        if end_ms < 0:
            raise ProtocolError("invalid_value", "Invalid 'audio_end_ms': expected a non-negative integer.", "audio_end_ms")
        have_ms = int(item.audio_ms)
        if end_ms > have_ms:
            raise ProtocolError("invalid_value", f"Audio content of {have_ms}ms is already shorter than {end_ms}ms",
                                "audio_end_ms")
        item.truncate_audio(end_ms * API_RATE_HZ // 1000)
        for part in item.data["content"]:
            if part["type"] == "output_audio":
                part["transcript"] = ""  # the server forgets words the user did not hear
        acts.send.append(self._ev("conversation.item.truncated", item_id=item.id, content_index=0, audio_end_ms=end_ms))

    def _on_conversation_item_delete(self, ev: dict[str, Any], acts: Actions) -> None:
        item = self._item_or_error(ev["item_id"])
        self.items.remove(item)
        del self.by_id[item.id]
        acts.send.append(self._ev("conversation.item.deleted", item_id=item.id))

    def _on_response_create(self, ev: dict[str, Any], acts: Actions) -> None:
        # null: not given (the session's value); LiveKit sends "instructions": null after each tool result
        params = {k: v for k, v in (ev.get("response") or {}).items() if v is not None}
        check_keys(params, RESPONSE_KEYS, "response")
        self._start_response(params, acts)

    def _on_response_cancel(self, ev: dict[str, Any], acts: Actions) -> None:
        rid = ev.get("response_id")
        target = self.responses.get(rid) if rid else self.active
        if target is None or target.done or target.cancelled:
            raise ProtocolError("response_cancel_not_active", "Cancellation failed: no active response found")
        self._cancel(target, "client_cancelled", acts)

    def _on_output_audio_buffer_clear(self, ev: dict[str, Any], acts: Actions) -> None:
        rid = self.active.id if self.active else None
        if self.active is not None:
            self._cancel(self.active, "client_cancelled", acts)
        acts.send.append(self._ev("output_audio_buffer.cleared", response_id=rid))

    # ------------------------------------------------------------------ responses
    def _cancel(self, resp: Response, reason: str, acts: Actions) -> None:
        if resp.cancel_reason is None and not resp.done:
            resp.cancel_reason = reason
            acts.wake.append(resp)

    def _start_response(self, params: dict[str, Any], acts: Actions) -> None:
        in_conv = response_conversation(params)
        if in_conv and self.active is not None:
            raise ProtocolError("conversation_already_has_active_response",
                                f"Conversation already has an active response in progress: {self.active.id}. "
                                "Wait until the response is finished before creating a new one.")
        checked = check_response_params(params, self.input_format, self.session)
        input_items = None
        if checked.input is not None:
            input_items = [self._item_or_error(ref, f"response.input[{i}].id") if isinstance(ref, str)
                           else self._item_from(ref) for i, ref in enumerate(checked.input)]
        out_cfg = self.session["audio"]["output"]
        modalities = checked.modalities or self.session["output_modalities"]
        voice = checked.voice if checked.voice is not None else out_cfg["voice"]
        fmt = checked.format or out_cfg["format"]["type"]
        metadata = checked.metadata
        mot = checked.max_output_tokens if checked.max_output_tokens is not None else self.session["max_output_tokens"]
        tool_choice = checked.tool_choice if checked.tool_choice is not None else self.session["tool_choice"]
        resp = Response(new_id("resp"), params, in_conv, list(modalities), voice if isinstance(voice, str) else "marin",
                        fmt, metadata, input_items, max_output_tokens=None if mot == "inf" else int(mot),
                        tool_choice=tool_choice)
        self.responses[resp.id] = resp
        if in_conv:
            self.active = resp
            self.idle_epoch += 1
        acts.send.append(self._ev("response.created", response=self._response_obj(resp, "in_progress")))
        acts.send.append(self._ev("rate_limits.updated", rate_limits=[
            {"name": "requests", "limit": 10000, "remaining": 9999, "reset_seconds": 0.006},
            {"name": "tokens", "limit": 15000000, "remaining": 14990000, "reset_seconds": 0.04}]))
        acts.start.append(resp)

    def _response_obj(self, r: Response, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        details = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": r.cancel_reason}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": r.incomplete_reason}
        return {"object": "realtime.response", "id": r.id, "status": status, "status_details": details,
                "output": r.output, "conversation_id": self.conversation_id if r.in_conversation else None,
                "output_modalities": r.modalities,
                "max_output_tokens": "inf" if r.max_output_tokens is None else r.max_output_tokens,
                "audio": {"output": {"format": ({"type": "audio/pcm", "rate": 24000} if r.audio_format == "audio/pcm"
                                                else {"type": r.audio_format}), "voice": r.voice}},
                "usage": usage, "metadata": r.metadata}

    def _texts(self) -> list[tuple[str, str]]:
        """(role, text) of the conversation's text messages, oldest first."""
        out = []
        for it in self.items:
            if it.data.get("type") == "message":
                text = " ".join(p.get("text") or "" for p in it.data.get("content", [])
                                if p.get("type") in ("input_text", "output_text"))
                if text:
                    out.append((it.data["role"], text))
        return out

    def expected_phrases(self) -> tuple[str, ...]:
        """What the recogniser listens for now (engine/server/expect.py)."""
        return expected_phrases(self.scenario.phrases(), self.session["tools"], self.session["instructions"],
                                self._texts())

    def pending_transcript(self, resp: Response) -> Item | None:
        """The user item whose words this response waits for, if they are not known yet."""
        src = resp.input_items if resp.input_items is not None else self.items
        for item in reversed(src):
            if item.data.get("type") == "message" and item.data.get("role") == "user":
                return item if item.transcript_pending else None
        return None

    def plan(self, resp: Response) -> None:
        """Decide what ``resp`` says: a reply text, or a function call (pure)."""
        src = resp.input_items if resp.input_items is not None else self.items
        last = src[-1] if src else None
        if last is not None and last.data["type"] == "function_call_output":
            rule = self.pending_then.pop(last.data["call_id"], None)
            out = last.data["output"]
            resp.text = fill(rule.then, {"output": speakable(out)}) if rule and rule.then else \
                f"The tool answered: {speakable(out)}."
            return
        user = next((it for it in reversed(src) if it.data.get("type") == "message" and it.data.get("role") == "user"), None)
        if user is None:
            resp.text = NO_USER_REPLY
            return
        if user.idle:
            resp.text = IDLE_REPLY
            return
        heard = (user.heard or "").strip()
        rule = self.scenario.rule_for(self.user_turns, heard)
        if rule is not None and rule.delegate and not rule.call_name and rule.reply is None:
            rule = None   # a GPT-Live delegation: Realtime has none, so the rule is passed over
        tools = resp.params.get("tools", self.session["tools"])
        functions = [t for t in tools if (t.get("type") or "function") == "function"]
        names = [t.get("name") for t in functions]
        wanted = rule.call_name if rule is not None and rule.call_name else None
        mentioned = mentioned_tool(heard, functions)
        choice = resp.tool_choice
        # tool_choice: a named function or "required" forces a call; "none" forbids one
        forced = None
        if isinstance(choice, dict) and choice.get("type") == "function":
            forced = choice.get("name")
        elif choice == "required" and names:
            forced = wanted if wanted in names else mentioned["name"] if mentioned else names[0]
        if forced is None and rule is None and mentioned is not None and choice == "auto":
            forced = mentioned["name"]   # no scenario rule decides: the user named the tool
        if forced is not None:
            tool: dict[str, Any] = next((t for t in functions if t.get("name") == forced), {})
            args = rule.call_arguments if rule is not None and wanted == forced else \
                tool_arguments(tool, [text for _, text in self._texts()])
            resp.call = (forced, args, "call_" + new_id("x")[2:18])
            if rule is not None and wanted == forced:
                self.pending_then[resp.call[2]] = rule
            return
        if wanted is not None and choice != "none":
            if wanted in names:
                resp.call = (wanted, rule.call_arguments, "call_" + new_id("x")[2:18])  # type: ignore[union-attr]
                self.pending_then[resp.call[2]] = rule  # type: ignore[assignment]
                return
            resp.text = f"I wanted to call the tool {wanted}, but the session has no such tool."
            return
        if rule is not None and rule.reply is not None:
            resp.text = rule.reply.format(user=heard)
        else:
            resp.text = self.scenario.default_reply.format(user=heard.rstrip(".!? ") or "something I could not make out")

    def response_steps(self, resp: Response, speech: np.ndarray | None,
                       speed: float = 1.0) -> Iterator[tuple[float, dict[str, Any]]]:
        """Yield ``(delay_s, event)`` to stream ``resp``; ``speech`` is its PCM16 24 kHz audio."""
        ev = self._ev
        first_delay = self.faults.first_delta_delay_ms / 1000.0
        if not resp.cancelled:
            if resp.call is not None:
                yield from self._stream_call(resp, first_delay)
            else:
                yield from self._stream_message(resp, speech, speed, first_delay)
        # close: response.done with usage
        resp.done = True
        if self.active is resp:
            self.active = None
            self.idle_epoch += 1  # the idle timer starts when the reply has been played
        self.responses.pop(resp.id, None)   # a finished response cannot be cancelled; nothing else needs it
        self._retain_audio()
        status = "cancelled" if resp.cancelled else "incomplete" if resp.incomplete_reason else "completed"
        yield 0.0, ev("response.done", response=self._response_obj(resp, status, self._usage(resp)))

    def jitter_s(self) -> float:
        """A random extra delay for one delta (fault ``delta_jitter_ms``: its standard deviation)."""
        j = self.faults.delta_jitter_ms
        return max(0.0, self.rng.gauss(0.0, j) / 1000.0) if j > 0 else 0.0

    def _add_output_item(self, resp: Response, data: dict[str, Any]) -> Item:
        item = Item(data)
        if resp.in_conversation:
            self._insert(item)
        resp.item = item
        resp.output.append(item.data)
        return item

    def _stream_call(self, resp: Response, first_delay: float) -> Iterator[tuple[float, dict[str, Any]]]:
        name, args, call_id = resp.call  # type: ignore[misc]
        item = self._add_output_item(resp, {"id": new_id("item"), "type": "function_call", "status": "in_progress",
                                            "name": name, "call_id": call_id, "arguments": ""})
        base = dict(response_id=resp.id, item_id=item.id, output_index=0)
        yield 0.0, self._ev("response.output_item.added", response_id=resp.id, output_index=0, item=item.data)
        if resp.in_conversation:
            yield 0.0, self._ev("conversation.item.added", previous_item_id=self._prev_id(item), item=item.data)
        step = max(1, math.ceil(len(args) / 8))
        for i in range(0, len(args), step):
            if resp.cancelled:
                break
            yield (first_delay if i == 0 else 0.01), self._ev(
                "response.function_call_arguments.delta", **base, call_id=call_id, delta=args[i:i + step])
            item.data["arguments"] += args[i:i + step]
        item.data["status"] = "incomplete" if resp.cancelled else "completed"
        if not resp.cancelled:
            yield 0.0, self._ev("response.function_call_arguments.done", **base, call_id=call_id, name=name,
                                arguments=item.data["arguments"])
        if resp.in_conversation:
            yield 0.0, self._ev("conversation.item.done", previous_item_id=self._prev_id(item), item=item.data)
        yield 0.0, self._ev("response.output_item.done", response_id=resp.id, output_index=0, item=item.data)

    def _stream_message(self, resp: Response, speech: np.ndarray | None, speed: float,
                        first_delay: float) -> Iterator[tuple[float, dict[str, Any]]]:
        audio = "audio" in resp.modalities
        text = resp.text or ""
        part_type, content_type = ("audio", "output_audio") if audio else ("text", "output_text")
        item = self._add_output_item(resp, {"id": new_id("item"), "type": "message", "status": "in_progress",
                                            "role": "assistant", "content": []})
        base = dict(response_id=resp.id, item_id=item.id, output_index=0, content_index=0)
        yield 0.0, self._ev("response.output_item.added", response_id=resp.id, output_index=0, item=item.data)
        if resp.in_conversation:
            yield 0.0, self._ev("conversation.item.added", previous_item_id=self._prev_id(item), item=item.data)
        empty_part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        yield 0.0, self._ev("response.content_part.added", **base, part=empty_part)
        content = {"type": content_type, ("transcript" if audio else "text"): ""}
        item.data["content"] = [content]
        words = [w + " " for w in text.split(" ")]
        words[-1] = words[-1][:-1]
        if audio:
            item.has_audio = True
            pcm = speech if speech is not None else np.zeros(0, dtype=np.int16)
            chunk = DELTA_MS * API_RATE_HZ // 1000
            n_chunks = max(1, math.ceil(len(pcm) / chunk))
            wi = 0
            delay = first_delay
            for c in range(n_chunks):
                # transcript words due by the end of this chunk
                due = math.ceil((c + 1) * len(words) / n_chunks)
                while wi < due and not resp.stopped and not resp.out_of_tokens(text=words[wi]):
                    yield delay, self._ev("response.output_audio_transcript.delta", **base, delta=words[wi])
                    delay = 0.0
                    content["transcript"] += words[wi]
                    resp.text_sent += words[wi]
                    wi += 1
                piece = pcm[c * chunk:(c + 1) * chunk]
                if resp.stopped or resp.out_of_tokens(audio_ms=len(piece) * 1000 / API_RATE_HZ):
                    break
                yield delay, self._ev("response.output_audio.delta", **base,
                                      delta=b64encode(encode_audio(piece, resp.audio_format)))
                item.append_audio(piece.copy())  # a copy: the item must not pin the whole reply's speech
                resp.audio_sent_ms += len(piece) * 1000 / API_RATE_HZ
                resp.deltas_sent += 1
                self.audio_was_output = True
                delay = len(piece) / API_RATE_HZ / speed
            if not resp.stopped:
                # wait out the last chunk's playing time before saying it is done
                yield delay, self._ev("response.output_audio.done", **base)
            else:
                yield 0.0, self._ev("response.output_audio.done", **base)
            yield 0.0, self._ev("response.output_audio_transcript.done", **base, transcript=content["transcript"])
        else:
            delay = first_delay
            for w in words:
                if resp.stopped or resp.out_of_tokens(text=w):
                    break
                yield delay, self._ev("response.output_text.delta", **base, delta=w)
                content["text"] += w
                resp.text_sent += w
                resp.deltas_sent += 1
                delay = 0.02 / speed
            yield 0.0, self._ev("response.output_text.done", **base, text=content["text"])
        yield 0.0, self._ev("response.content_part.done", **base, part=(
            {"type": "audio", "transcript": content["transcript"]} if audio else {"type": "text", "text": content["text"]}))
        item.data["status"] = "incomplete" if resp.stopped else "completed"
        if resp.in_conversation:
            yield 0.0, self._ev("conversation.item.done", previous_item_id=self._prev_id(item), item=item.data)
        yield 0.0, self._ev("response.output_item.done", response_id=resp.id, output_index=0, item=item.data)

    def _usage(self, resp: Response) -> dict[str, Any]:
        """Usage counted as OpenAI documents it; the conversation is re-billed as input each time."""
        src = resp.input_items if resp.input_items is not None else [it for it in self.items if it is not resp.item]
        text_in = text_tokens(self.session["instructions"])
        if self.session["tools"]:
            text_in += text_tokens(json.dumps(self.session["tools"]))
        audio_in = 0
        for it in src:
            d = it.data
            if d["type"] == "message":
                for p in d.get("content", []):
                    if p["type"] in ("input_text", "output_text"):
                        text_in += text_tokens(p.get("text", "")) + 4
                    elif p["type"] == "input_audio":
                        audio_in += user_audio_tokens(it.audio_ms)
                    elif p["type"] == "output_audio":
                        audio_in += model_audio_tokens(it.audio_ms)
            else:
                text_in += text_tokens(d.get("arguments", "") + d.get("output", "") + d.get("name", "")) + 4
        total_in = text_in + audio_in
        cached = min(self.prev_input_tokens, total_in) // 64 * 64 if resp.in_conversation else 0
        cached_text = min(cached, text_in)
        cached_audio = min(cached - cached_text, audio_in)
        out_text = text_tokens(resp.text_sent) if resp.call is None else text_tokens(resp.call[1])
        out_audio = model_audio_tokens(resp.audio_sent_ms)
        if resp.in_conversation:
            self.prev_input_tokens = total_in
        return {"total_tokens": total_in + out_text + out_audio, "input_tokens": total_in,
                "output_tokens": out_text + out_audio,
                "input_token_details": {"text_tokens": text_in, "audio_tokens": audio_in, "image_tokens": 0,
                                        "cached_tokens": cached_text + cached_audio,
                                        "cached_tokens_details": {"text_tokens": cached_text, "audio_tokens": cached_audio,
                                                                  "image_tokens": 0}},
                "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio}}

    # ------------------------------------------------------------------ idle timeout
    def idle_timeout_s(self) -> float | None:
        """How long the user may stay silent before ``idle_timeout_fired`` (server_vad's
        ``idle_timeout_ms``), if that timer should run now: no response in progress, no
        speech. The I/O layer re-arms it whenever ``idle_epoch`` changes."""
        td = self.turn_detection
        if not td or td["type"] != "server_vad" or not td.get("idle_timeout_ms"):
            return None
        if self.active is not None or self.vad.in_speech:
            return None
        return float(td["idle_timeout_ms"]) / 1000.0

    def idle_timeout_fired(self, epoch: int) -> Actions:
        """The timer armed at ``epoch`` ran out: ``input_audio_buffer.timeout_triggered``, an
        empty user audio item committed, and a response (as the API does). Nothing if the
        silence was broken since (a stale timer)."""
        acts = Actions()
        if epoch != self.idle_epoch or self.idle_timeout_s() is None:
            return acts
        item_id = new_id("item")
        start_ms = self.buffer_start_sample * 1000 // API_RATE_HZ
        end_ms = self.total_samples * 1000 // API_RATE_HZ
        acts.send.append(self._ev("input_audio_buffer.timeout_triggered", audio_start_ms=start_ms,
                                  audio_end_ms=end_ms, item_id=item_id))
        self.vad.reset_speech()
        self._commit(acts, item_id, start_sample=self.total_samples, end_sample=self.total_samples)
        self.user_turns -= 1  # not a turn of the user's: scenario turns count on as before
        item = self.by_id[item_id]
        item.idle, item.heard, item.transcript_pending = True, "", False
        acts.transcribe = [t for t in acts.transcribe if t is not item]
        self._start_response({}, acts)
        return acts

    # ------------------------------------------------------------------ transcription
    def transcription_failed_events(self, item: Item, reason: str) -> list[dict[str, Any]]:
        """Recognition failed for ``item``: it has no words (the reply goes on without
        them); the ``failed`` event to send if input transcription is on."""
        item.heard = ""
        item.transcript_pending = False
        if self.session["audio"]["input"]["transcription"] is None:
            return []
        return [self._ev("conversation.item.input_audio_transcription.failed", item_id=item.id, content_index=0,
                         error={"type": "server_error", "code": "transcription_failed",
                                "message": f"Input transcription failed for item '{item.id}'. {reason}",
                                "param": None})]

    def transcription_events(self, item: Item, words: str) -> list[dict[str, Any]]:
        """Set the user item's words; events to send if input transcription is on."""
        item.heard = words
        item.transcript_pending = False
        cfg = self.session["audio"]["input"]["transcription"]
        if cfg is None:
            return []
        item.data["content"][0]["transcript"] = words
        out = []
        pieces = [w + " " for w in words.split(" ")] if words else []
        if pieces:
            pieces[-1] = pieces[-1][:-1]
        for p in pieces:
            out.append(self._ev("conversation.item.input_audio_transcription.delta", item_id=item.id,
                                content_index=0, delta=p))
        seconds = item.audio_ms / 1000
        model = cfg.get("model") or "whisper-1"
        if model.startswith("gpt-4o"):
            audio_toks, text_toks = user_audio_tokens(item.audio_ms), text_tokens(words)
            usage: dict[str, Any] = {"type": "tokens", "input_tokens": audio_toks, "output_tokens": text_toks,
                                     "total_tokens": audio_toks + text_toks,
                                     "input_token_details": {"audio_tokens": audio_toks, "text_tokens": 0}}
        else:
            usage = {"type": "duration", "seconds": round(seconds, 3)}
        out.append(self._ev("conversation.item.input_audio_transcription.completed", item_id=item.id,
                            content_index=0, transcript=words, usage=usage))
        return out


def mentioned_tool(heard: str, functions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The function tool whose name's words the user said, in order (``collection_point``: "...
    the collection point?"); of several, the one with the longest name. None if none."""
    said = f" {phrase(heard)} "
    named = [t for t in functions if isinstance(t.get("name"), str) and tool_phrase(t["name"])
             and f" {tool_phrase(t['name'])} " in said]
    return max(named, key=lambda t: len(tool_phrase(t["name"]).split()), default=None)


_EMPTY = {"string": "", "integer": 0, "number": 0, "boolean": False, "array": [], "object": {}}


def tool_arguments(tool: dict[str, Any], texts: list[str]) -> str:
    """Arguments for a call the user asked for: each required parameter takes its schema's
    ``default``, else its first ``enum`` value, else (a string) what the newest text message says it
    is ("The customer's booking is Avis ZX9, ..." gives ``booking`` "Avis ZX9"), else an empty
    value of its type. Parameters that are not required are left out."""
    params = tool.get("parameters") or {}
    props = params.get("properties") or {}
    args: dict[str, Any] = {}
    for name in params.get("required") or []:
        schema = props.get(name) or {}
        if "default" in schema:
            args[name] = schema["default"]
        elif schema.get("enum"):
            args[name] = schema["enum"][0]
        else:
            kind = schema.get("type", "string")
            said = _said_value(name, texts) if kind == "string" else None
            args[name] = said if said is not None else _EMPTY.get(kind if isinstance(kind, str) else "string", "")
    return json.dumps(args)


def _said_value(name: str, texts: list[str]) -> str | None:
    words = r"\W+".join(map(re.escape, tool_phrase(name).split()))
    if not words:
        return None
    pattern = re.compile(rf"\b{words}\b(?:'s)?\s*(?:is|was|=|:)\s*([^,.;:!?\n]+)", re.IGNORECASE)
    for text in reversed(texts):
        m = pattern.search(text)
        if m:
            return m.group(1).strip()
    return None


#: client event type -> its handler (every type validate_client_event accepts has one)
HANDLERS: dict[str, Callable[[ServerSession, dict[str, Any], Actions], None]] = {
    "session.update": ServerSession._on_session_update,
    "input_audio_buffer.append": ServerSession._on_input_audio_buffer_append,
    "input_audio_buffer.commit": ServerSession._on_input_audio_buffer_commit,
    "input_audio_buffer.clear": ServerSession._on_input_audio_buffer_clear,
    "conversation.item.create": ServerSession._on_conversation_item_create,
    "conversation.item.retrieve": ServerSession._on_conversation_item_retrieve,
    "conversation.item.truncate": ServerSession._on_conversation_item_truncate,
    "conversation.item.delete": ServerSession._on_conversation_item_delete,
    "response.create": ServerSession._on_response_create,
    "response.cancel": ServerSession._on_response_cancel,
    "output_audio_buffer.clear": ServerSession._on_output_audio_buffer_clear,
}
assert set(HANDLERS) == set(CLIENT_EVENT_FIELDS)

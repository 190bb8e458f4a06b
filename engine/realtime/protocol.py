"""The realtime process's logic, without I/O: server events and bus commands in,
actions out (client events to send, bus messages to publish, audio to play, a
playback flush). The I/O layer (:mod:`engine.realtime.process`) applies the actions.

Played position: the protocol counts the frames it hands to the playback ring
(``frames_written``, in the ring's index space) and remembers where each assistant
item's audio starts and ends there. ``heard_index()`` (injected) tells how far the
listener has heard; the difference is what truncation reports, clamped to what was
received, so the server never sees an ``audio_end_ms`` longer than the item.
"""
from __future__ import annotations

import base64
import json
import secrets
import string
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from engine.cost import response_cost_usd, transcription_cost_usd

API_RATE_HZ = 24000
FRAMES_PER_MS = API_RATE_HZ // 1000

#: server event types of the retired beta protocol; seeing one means the peer is not GA
BETA_ONLY_EVENTS = {
    "response.audio.delta", "response.audio.done", "response.audio_transcript.delta",
    "response.audio_transcript.done", "response.text.delta", "response.text.done",
    "conversation.item.created", "transcription_session.created", "transcription_session.updated",
}
#: errors that are benign races; reported, never fatal
BENIGN_ERRORS = {"response_cancel_not_active"}
#: how long the model's words wait for the transcript of the user turn they answer
USER_TRANSCRIPT_WAIT_S = 3.0
#: how long a barge-in's truncation waits for playback to report what was really played
TRUNCATE_WAIT_S = 0.25
#: topics held back until the user turn they answer has its transcript
MODEL_WORD_TOPICS = ("model.text.", "model.transcript.")


def new_id(prefix: str) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "_" + "".join(secrets.choice(alphabet) for _ in range(21))


# ------------------------------------------------------------------ actions
@dataclass
class Send:
    """Send a client event on the socket."""
    event: dict[str, Any]


@dataclass
class Publish:
    """Publish a bus message."""
    topic: str
    payload: dict[str, Any]


@dataclass
class Play:
    """Write PCM16 24 kHz frames to the playback ring; ``starts_item``: the first frames of an item
    (the ring stamps when they arrived, and playback counts its prebuffer from then)."""
    pcm: bytes
    starts_item: bool = False


@dataclass
class Flush:
    """Drop everything written to the playback ring (barge-in)."""


@dataclass
class EndOfAudio:
    """The audio written so far completes a response (not an underrun when it runs out)."""


Action = Send | Publish | Play | Flush | EndOfAudio


@dataclass
class PlayedItem:
    item_id: str
    response_id: str
    start_index: int          #: ring index of the item's first frame
    frames: int = 0           #: frames received (and written)
    flushed: bool = False
    interrupted_at: float = 0.0  #: clock seconds when the barge-in (speech_started, cmd.cancel) was taken


@dataclass
class TurnTiming:
    """When one response's milestones happened, in this process's monotonic seconds."""
    response_id: str
    speech_end_at: float | None     #: the user's speech ended (server's audio_end_ms mapped to local time)
    requested_at: float | None      #: we sent the response.create (text turns)
    first_delta_at: float | None = None
    last_delta_at: float | None = None
    deltas: int = 0
    interval_sum_s: float = 0.0
    interval_sq_sum_s: float = 0.0
    interval_max_s: float = 0.0
    device_at: float | None = None  #: first sample handed to the device (playback's callback)
    output_latency_ms: float = 0.0
    audio: bool = False
    done: bool = False
    published: bool = False

    def delta_arrived(self, now: float) -> None:
        if self.last_delta_at is not None:
            gap = now - self.last_delta_at
            self.interval_sum_s += gap
            self.interval_sq_sum_s += gap * gap
            self.interval_max_s = max(self.interval_max_s, gap)
        else:
            self.first_delta_at = now
        self.last_delta_at = now
        self.deltas += 1

    def report(self, item_id: str | None) -> dict[str, Any]:
        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000, 2)
        n = self.deltas - 1
        mean = self.interval_sum_s / n if n > 0 else 0.0
        var = max(0.0, self.interval_sq_sum_s / n - mean * mean) if n > 0 else 0.0
        start = self.speech_end_at if self.speech_end_at is not None else self.requested_at
        to_device = ms(start, self.device_at)
        return {"response_id": self.response_id, "item_id": item_id,
                "trigger": "speech" if self.speech_end_at is not None else "request",
                "to_first_delta_ms": ms(start, self.first_delta_at),
                "first_delta_to_device_ms": ms(self.first_delta_at, self.device_at),
                "to_device_ms": to_device,
                "output_latency_ms": self.output_latency_ms if self.audio else None,
                "to_speaker_ms": None if to_device is None else round(to_device + self.output_latency_ms, 2),
                "deltas": self.deltas, "delta_interval_ms_mean": round(mean * 1000, 2),
                "delta_interval_ms_std": round(var ** 0.5 * 1000, 2),
                "delta_interval_ms_max": round(self.interval_max_s * 1000, 2)}


@dataclass
class SayRequest:
    id: str
    text: str
    role: str
    respond: bool
    source: str


@dataclass
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    owner: str
    timeout_s: float


class RealtimeProtocol:
    """State of one engine session as seen from the API socket."""

    def __init__(self, model: str, session_config: dict[str, Any], *, heard_index: Callable[[], int] = lambda: 0,
                 start_index: int = 0, barge_in: bool = True, min_speech_ms: int = 0,
                 budget_usd: float | None = None, clock: Callable[[], float] = time.monotonic,
                 input_time: Callable[[int], float | None] = lambda audio_ms: None) -> None:
        self.model = model
        self.input_time = input_time  #: input-buffer ms (as the server counts them) -> local monotonic s
        self.session_config = session_config
        self.heard_index = heard_index
        self.frames_written = start_index
        self.barge_in = barge_in
        self.min_speech_ms = min_speech_ms
        self.budget_usd = budget_usd
        self.clock = clock
        self.session_id: str | None = None
        self.session: dict[str, Any] | None = None
        self.active_response: str | None = None
        self.response_item: dict[str, str] = {}            #: response id -> its audio item id
        self.dropped_responses: set[str] = set()           #: responses whose audio we no longer play
        self.truncated_items: set[str] = set()             #: items cut at what was heard (transcript published)
        self.items: dict[str, PlayedItem] = {}
        self.current_item: PlayedItem | None = None
        self.pending: deque[SayRequest] = deque()
        self.awaiting: dict[str, SayRequest] = {}          #: client event_id -> request sent
        self.item_requests: dict[str, SayRequest] = {}     #: item id we created -> request
        self.seen_cmd_ids: deque[str] = deque(maxlen=1024)
        self.response_requested = False                    #: we sent response.create, no response.created yet
        self.cost_session_usd = 0.0
        self.cost_transcription_usd = 0.0
        self.budget_warned = False
        self.malformed_commands = 0
        self.errors = 0
        self.model_transcripts: dict[str, str] = {}
        self.history: list[tuple[str, str]] = []           #: (role, text) for re-seeding after a reconnect
        self.tools: dict[str, ToolSpec] = {}
        self.tool_calls: dict[str, tuple[str, float]] = {} #: call_id -> (tool name, deadline)
        self.speech_started_at: float | None = None
        self.pending_barge_in = False
        self.protocol_refused = False
        self._carry = b""                                  #: half a sample left over from the last delta
        self.requested_for: str | None = None              #: request id of the response.create in flight
        self.response_requests: dict[str, str] = {}        #: response id -> the request that asked for it
        # per-turn order: user transcripts come asynchronously, often after the reply has started
        self.user_transcripts_due: dict[str, float] = {}   #: user audio item id -> give-up time
        self.response_waits_for: dict[str, set[str]] = {}  #: response id -> user items whose transcript is due
        self.held: dict[str, list[Action]] = {}            #: response id -> model words held back
        self.transcripts_late = 0                          #: user transcripts given up on (words released)
        # latency per turn
        self.speech_end_at: float | None = None            #: the user's latest speech end, not yet answered
        self.requested_at: float | None = None             #: our latest response.create, not yet answered
        self.timings: dict[str, TurnTiming] = {}           #: response id -> its milestones (recent ones)
        #: interrupted items waiting for playback.flushed: item id -> (item, estimate ms, deadline, reason)
        self.pending_truncates: dict[str, tuple[PlayedItem, int, float, str]] = {}

    # ------------------------------------------------------------ connection
    def on_connected(self, reconnect: bool = False) -> list[Action]:
        """Client events to send right after the socket opens."""
        acts: list[Action] = [Send({"type": "session.update", "session": self._session_with_tools()})]
        if reconnect:
            self.active_response = None
            self.response_requested = False
            for role, text in self.history[-50:]:
                content_type = "output_text" if role == "assistant" else "input_text"
                acts.append(Send({"type": "conversation.item.create", "item": {
                    "type": "message", "role": role, "content": [{"type": content_type, "text": text}]}}))
            acts.append(Publish("engine.status", {"state": "reconnected", "history_items": len(self.history[-50:])}))
        return acts + self._drain()

    def _session_with_tools(self) -> dict[str, Any]:
        s = dict(self.session_config)
        tools = list(s.get("tools", []))
        names = {t.get("name") for t in tools}
        for spec in self.tools.values():
            if spec.name not in names:
                tools.append({"type": "function", "name": spec.name, "description": spec.description,
                              "parameters": spec.parameters})
        s["tools"] = tools
        return s

    # ------------------------------------------------------------ server events
    def on_server_event(self, ev: dict[str, Any]) -> list[Action]:
        etype = ev.get("type")
        if not isinstance(etype, str):
            return [Publish("engine.error", {"code": "unknown_server_event", "message": "server event without a type; ignored"})]
        if etype in BETA_ONLY_EVENTS:
            self.protocol_refused = True
            return [Publish("engine.error", {"code": "beta_protocol", "fatal": True, "message":
                    f"the server sent {etype!r}, an event of the retired beta Realtime protocol "
                    "(OpenAI-Beta: realtime=v1, shut down in May 2026); realtalk speaks only the GA protocol. "
                    "Point the engine at a GA endpoint (/v1/realtime with a GA model)."})]
        acts: list[Action] = [Publish("server." + etype, _strip_audio(ev))]
        handler = getattr(self, "_on_" + etype.replace(".", "_"), None)
        if handler is not None:
            acts.extend(handler(ev))
        return self._in_turn_order(acts)

    # ------------------------------------------------------------ per-turn transcript order
    def _in_turn_order(self, acts: list[Action]) -> list[Action]:
        """Hold the model's words of a response until the user turn it answers has its transcript.

        The API sends ``conversation.item.input_audio_transcription.completed`` whenever the
        transcription finishes, often after the reply has begun; subscribers reading the bus as a
        conversation want "user said X" before "model said Y".
        """
        if not self.response_waits_for:
            return acts
        out: list[Action] = []
        for act in acts:
            if isinstance(act, Publish) and act.topic.startswith(MODEL_WORD_TOPICS):
                rid = act.payload.get("response_id")
                if rid in self.response_waits_for:
                    self.held.setdefault(rid, []).append(act)
                    continue
            out.append(act)
        return out

    def _user_transcript_arrived(self, item_id: str) -> list[Action]:
        """Forget ``item_id``'s due transcript; release the responses no longer waiting."""
        self.user_transcripts_due.pop(item_id, None)
        released: list[Action] = []
        for rid, items in list(self.response_waits_for.items()):
            items.discard(item_id)
            if not items:
                del self.response_waits_for[rid]
                released.extend(self.held.pop(rid, []))
        return released

    def _on_input_audio_buffer_committed(self, ev: dict[str, Any]) -> list[Action]:
        input_cfg = ((self.session or {}).get("audio") or {}).get("input") or {}
        if input_cfg.get("transcription") and ev.get("item_id"):
            self.user_transcripts_due[ev["item_id"]] = self.clock() + USER_TRANSCRIPT_WAIT_S
        return []

    def _on_session_created(self, ev: dict[str, Any]) -> list[Action]:
        self.session_id = ev["session"].get("id")
        self.session = ev["session"]
        return [Publish("engine.status", {"state": "connected", "session_id": self.session_id, "model": self.model})]

    def _on_session_updated(self, ev: dict[str, Any]) -> list[Action]:
        self.session = ev["session"]
        return [Publish("session.config", {"session": ev["session"]})]

    def _on_error(self, ev: dict[str, Any]) -> list[Action]:
        err = ev.get("error") or {}
        code = err.get("code")
        acts: list[Action] = []
        benign = code in BENIGN_ERRORS or "already shorter than" in (err.get("message") or "")
        if not benign:
            self.errors += 1
        acts.append(Publish("engine.error", {"source": "api", "code": code, "message": err.get("message"),
                                             "param": err.get("param"), "benign": benign,
                                             "fatal": code == "beta_api_shape_disabled"}))
        req = self.awaiting.pop(err.get("event_id") or "", None)
        if req is not None:
            if code == "conversation_already_has_active_response":
                self.response_requested = False
                self.pending.appendleft(SayRequest(req.id, "", req.role, True, req.source))  # retry the response only
            else:
                acts.append(Publish("cmd.ack", {"id": req.id, "ok": False, "error": err.get("message"), "code": code}))
        return acts

    def _on_response_created(self, ev: dict[str, Any]) -> list[Action]:
        resp = ev["response"]
        if resp.get("conversation_id") is not None or not resp.get("metadata"):
            self.active_response = resp["id"]
        if self.response_requested and self.requested_for is not None:
            self.response_requests[resp["id"]] = self.requested_for
            self.requested_for = None
        self.response_requested = False
        self.timings[resp["id"]] = TurnTiming(resp["id"], self.speech_end_at, self.requested_at)
        self.speech_end_at = self.requested_at = None
        while len(self.timings) > 32:
            del self.timings[next(iter(self.timings))]
        if self.user_transcripts_due:
            self.response_waits_for[resp["id"]] = set(self.user_transcripts_due)
        return []

    def _on_response_output_item_added(self, ev: dict[str, Any]) -> list[Action]:
        item = ev["item"]
        if item.get("type") == "message" and item.get("role") == "assistant":
            self.response_item[ev["response_id"]] = item["id"]
        return []

    def _on_response_output_audio_delta(self, ev: dict[str, Any]) -> list[Action]:
        rid, item_id = ev["response_id"], ev["item_id"]
        if rid in self.dropped_responses:
            return []
        try:
            pcm = base64.b64decode(ev["delta"])
        except (ValueError, TypeError):
            return [Publish("engine.error", {"source": "engine", "code": "bad_audio_delta",
                                             "message": f"undecodable audio delta in {item_id}; skipped"})]
        if self._carry:  # a delta that ended mid-sample: finish the sample with this one
            pcm = self._carry + pcm
            self._carry = b""
        if len(pcm) % 2:
            self._carry, pcm = pcm[-1:], pcm[:-1]
        acts: list[Action] = []
        timing = self.timings.get(rid)
        if timing is not None:
            timing.delta_arrived(self.clock())
            timing.audio = True
        played = self.items.get(item_id)
        starts_item = played is None
        if played is None:
            played = self.items[item_id] = PlayedItem(item_id, rid, self.frames_written)
            self.current_item = played
            acts.append(Publish("playback.item", {"item_id": item_id, "response_id": rid,
                                                  "start_index": self.frames_written}))
        played.frames += len(pcm) // 2
        self.frames_written += len(pcm) // 2
        acts.append(Play(pcm, starts_item))
        return acts

    def _on_response_output_audio_done(self, ev: dict[str, Any]) -> list[Action]:
        return [EndOfAudio()]

    def _on_response_output_text_delta(self, ev: dict[str, Any]) -> list[Action]:
        timing = self.timings.get(ev["response_id"])
        if timing is not None:
            timing.delta_arrived(self.clock())
        return [Publish("model.text.delta", {"text": ev["delta"], "item_id": ev["item_id"], "response_id": ev["response_id"]})]

    def _on_response_output_text_done(self, ev: dict[str, Any]) -> list[Action]:
        self.history.append(("assistant", ev["text"]))
        return [Publish("model.text.done", {"text": ev["text"], "item_id": ev["item_id"], "response_id": ev["response_id"]})]

    def _on_response_output_audio_transcript_delta(self, ev: dict[str, Any]) -> list[Action]:
        if ev["item_id"] in self.truncated_items:
            return []
        self.model_transcripts[ev["item_id"]] = self.model_transcripts.get(ev["item_id"], "") + ev["delta"]
        return [Publish("model.transcript.delta", {"text": ev["delta"], "item_id": ev["item_id"],
                                                   "response_id": ev["response_id"]})]

    def _on_response_output_audio_transcript_done(self, ev: dict[str, Any]) -> list[Action]:
        if ev["item_id"] in self.truncated_items:
            return []  # the heard part was published when playback was interrupted
        self.history.append(("assistant", ev["transcript"]))
        return [Publish("model.transcript.done", {"text": ev["transcript"], "item_id": ev["item_id"],
                                                  "response_id": ev["response_id"]})]

    def _on_response_function_call_arguments_done(self, ev: dict[str, Any]) -> list[Action]:
        name = ev.get("name", "")
        spec = self.tools.get(name)
        acts: list[Action] = [Publish("tool.call", {"call_id": ev["call_id"], "name": name,
                                                    "arguments": ev.get("arguments", ""), "item_id": ev.get("item_id"),
                                                    "registered": spec is not None})]
        timeout = spec.timeout_s if spec else 10.0
        self.tool_calls[ev["call_id"]] = (name, self.clock() + timeout)
        return acts

    def _on_response_done(self, ev: dict[str, Any]) -> list[Action]:
        resp = ev["response"]
        rid = resp["id"]
        if self.active_response == rid:
            self.active_response = None
        usage = resp.get("usage")
        usd = response_cost_usd(self.session.get("model", self.model) if self.session else self.model, usage)
        self.cost_session_usd += usd
        text = ""
        calls = sum(1 for out in resp.get("output") or [] if out.get("type") == "function_call")
        for out in resp.get("output") or []:
            for part in out.get("content") or []:
                text += part.get("text") or part.get("transcript") or ""
        acts: list[Action] = [
            Publish("response.done", {"response_id": rid, "request_id": self.response_requests.pop(rid, None),
                                      "status": resp.get("status"), "function_calls": calls,
                                      "reason": (resp.get("status_details") or {}).get("reason"),
                                      "text": text, "usage": usage, "usd": usd, "metadata": resp.get("metadata"),
                                      "session_usd": self.total_usd()}),
            Publish("cost.response", {"response_id": rid, "usd": usd, "usage": usage}),
            Publish("cost.session", {"usd": self.total_usd(), "responses_usd": self.cost_session_usd,
                                     "transcription_usd": self.cost_transcription_usd}),
        ]
        timing = self.timings.get(rid)
        if timing is not None:
            timing.done = True
            acts.extend(self._turn_latency(timing))
        acts.extend(self._check_budget())
        acts.extend(self._drain())
        return acts

    def _turn_latency(self, timing: TurnTiming) -> list[Action]:
        """``latency.turn`` once the response is done and its first sample reached the device."""
        if timing.published or not timing.done or (timing.audio and timing.device_at is None):
            return []
        if timing.response_id in self.dropped_responses and timing.device_at is None:
            return []  # interrupted before it was heard
        timing.published = True
        item_id = self.response_item.get(timing.response_id)
        return [Publish("latency.turn", timing.report(item_id))]

    def _playback_started(self, body: dict[str, Any]) -> list[Action]:
        """The playback process handed a stream's first sample to the device (it names the item)."""
        item = self.items.get(body.get("item_id") or "")
        timing = self.timings.get(item.response_id) if item is not None else None
        if timing is None or timing.device_at is not None:
            return []
        ns = body.get("first_sample_mono_ns")
        timing.device_at = ns / 1e9 if isinstance(ns, int) and ns > 0 else self.clock()
        timing.output_latency_ms = float(body.get("output_latency_ms") or 0.0)
        return self._turn_latency(timing)

    def total_usd(self) -> float:
        return self.cost_session_usd + self.cost_transcription_usd

    def _check_budget(self) -> list[Action]:
        if self.budget_usd is None:
            return []
        spent = self.total_usd()
        if spent >= self.budget_usd:
            return [Publish("engine.budget", {"usd": spent, "budget_usd": self.budget_usd, "exceeded": True,
                                              "message": f"budget of ${self.budget_usd:.4f} reached; no new responses"})]
        if spent >= 0.8 * self.budget_usd and not self.budget_warned:
            self.budget_warned = True
            return [Publish("engine.budget", {"usd": spent, "budget_usd": self.budget_usd, "exceeded": False,
                                              "message": f"80% of the ${self.budget_usd:.4f} budget is spent"})]
        return []

    def over_budget(self) -> bool:
        return self.budget_usd is not None and self.total_usd() >= self.budget_usd

    def _on_conversation_item_added(self, ev: dict[str, Any]) -> list[Action]:
        item = ev["item"]
        req = self.item_requests.pop(item.get("id", ""), None)
        acts: list[Action] = []
        if req is not None:
            for eid, r in list(self.awaiting.items()):
                if r is req:
                    del self.awaiting[eid]
            self.history.append((req.role, req.text))
            acts.append(Publish("cmd.ack", {"id": req.id, "ok": True, "item_id": item["id"]}))
        elif item.get("role") == "user" and item.get("type") == "message":
            for part in item.get("content") or []:
                if part.get("type") == "input_text":
                    acts.append(Publish("user.text", {"text": part["text"], "item_id": item["id"]}))
        return acts

    def _on_conversation_item_input_audio_transcription_delta(self, ev: dict[str, Any]) -> list[Action]:
        return [Publish("user.transcript.delta", {"text": ev.get("delta", ""), "item_id": ev["item_id"]})]

    def _on_conversation_item_input_audio_transcription_completed(self, ev: dict[str, Any]) -> list[Action]:
        text = ev.get("transcript", "")
        self.history.append(("user", text))
        tr = ((self.session or {}).get("audio") or {}).get("input", {}).get("transcription") or {}
        usd = transcription_cost_usd(tr.get("model", ""), ev.get("usage"))
        self.cost_transcription_usd += usd
        return [Publish("user.transcript.done", {"text": text, "item_id": ev["item_id"], "usd": usd}),
                *self._user_transcript_arrived(ev["item_id"]),
                Publish("cost.session", {"usd": self.total_usd(), "responses_usd": self.cost_session_usd,
                                         "transcription_usd": self.cost_transcription_usd})]

    def _on_conversation_item_input_audio_transcription_failed(self, ev: dict[str, Any]) -> list[Action]:
        err = ev.get("error") or {}
        return [Publish("engine.error", {"source": "api", "code": err.get("code"), "benign": True,
                                         "message": f"transcription of {ev.get('item_id')} failed: {err.get('message')}"}),
                *self._user_transcript_arrived(ev.get("item_id") or "")]

    def _on_input_audio_buffer_speech_started(self, ev: dict[str, Any]) -> list[Action]:
        self.speech_started_at = self.clock()
        acts: list[Action] = [Publish("user.speech.started", {"item_id": ev.get("item_id"),
                                                             "audio_start_ms": ev.get("audio_start_ms")})]
        if self.barge_in:
            if self.min_speech_ms <= 0:
                acts.extend(self.interrupt(server_cancels=self._server_interrupts(), reason="speech"))
            else:
                self.pending_barge_in = True
        return acts

    def _on_input_audio_buffer_speech_stopped(self, ev: dict[str, Any]) -> list[Action]:
        self.pending_barge_in = False
        end_ms = ev.get("audio_end_ms")
        if isinstance(end_ms, int):
            self.speech_end_at = self.input_time(end_ms)
        return [Publish("user.speech.stopped", {"item_id": ev.get("item_id"), "audio_end_ms": ev.get("audio_end_ms")})]

    def _on_conversation_item_truncated(self, ev: dict[str, Any]) -> list[Action]:
        item_id = ev["item_id"]
        text = self.model_transcripts.get(item_id, "")
        return [Publish("model.transcript.truncated", {"item_id": item_id, "audio_end_ms": ev["audio_end_ms"],
                                                       "text_received": text})]

    def _server_interrupts(self) -> bool:
        td = ((self.session or {}).get("audio") or {}).get("input", {}).get("turn_detection")
        return bool(td and td.get("interrupt_response", True))

    # ------------------------------------------------------------ barge-in
    def audible_item(self) -> PlayedItem | None:
        """The item whose audio is still playing (written but not yet all heard)."""
        item = self.current_item
        if item is None or item.flushed:
            return None
        end = item.start_index + item.frames
        return item if self.heard_index() < end else None

    def played_ms(self, item: PlayedItem, heard_index: int | None = None) -> int:
        """Milliseconds of ``item`` the listener heard (by ``heard_index``, default: the ring's
        current estimate), clamped to what was received."""
        heard = (self.heard_index() if heard_index is None else heard_index) - item.start_index
        return int(max(0, min(heard, item.frames)) // FRAMES_PER_MS)

    def interrupt(self, server_cancels: bool, reason: str) -> list[Action]:
        """Stop the model's voice: flush playback and cancel if needed.

        The truncation waits for ``playback.flushed``: the playback process reports the ring
        index the listener had really heard when the fade ended, so ``audio_end_ms`` is what
        was played, not an estimate made a device period earlier. Without that report within
        ``TRUNCATE_WAIT_S`` the estimate from ``heard_index`` is used.
        """
        acts: list[Action] = []
        item = self.audible_item()
        rid = self.active_response
        if rid is not None and not server_cancels:
            acts.append(Send({"type": "response.cancel"}))
        if item is None:
            if rid is not None:
                self.dropped_responses.add(rid)
            return acts
        item.flushed = True
        item.interrupted_at = self.clock()
        self.dropped_responses.add(item.response_id)
        self.truncated_items.add(item.item_id)
        self.pending_truncates[item.item_id] = (item, self.played_ms(item), self.clock() + TRUNCATE_WAIT_S, reason)
        acts.append(Flush())
        return acts

    def _playback_flushed(self, body: dict[str, Any]) -> list[Action]:
        index = body.get("index")
        if not isinstance(index, int):
            return []
        acts: list[Action] = []
        for item, _, _, reason in list(self.pending_truncates.values()):
            acts.extend(self._finish_interrupt(item, self.played_ms(item, index), reason, measured=True))
        return acts

    def _finish_interrupt(self, item: PlayedItem, played: int, reason: str, measured: bool) -> list[Action]:
        """Truncate the item at ``played`` ms, publish what was heard."""
        self.pending_truncates.pop(item.item_id, None)
        acts: list[Action] = []
        if played > 0:
            acts.append(Send({"type": "conversation.item.truncate", "item_id": item.item_id, "content_index": 0,
                              "audio_end_ms": played}))
        heard_text = _cut_transcript(self.model_transcripts.get(item.item_id, ""), played, item.frames // FRAMES_PER_MS)
        acts.append(Publish("playback.interrupted", {"item_id": item.item_id, "played_ms": played,
                                                     "received_ms": item.frames // FRAMES_PER_MS, "reason": reason,
                                                     "measured": measured,
                                                     "interrupt_mono_ns": int(item.interrupted_at * 1e9)}))
        acts.append(Publish("model.transcript.done", {"text": heard_text, "item_id": item.item_id,
                                                      "response_id": item.response_id, "truncated": True}))
        self.history.append(("assistant", heard_text))
        return acts

    # ------------------------------------------------------------ commands from the bus
    def on_command(self, topic: str, body: dict[str, Any]) -> list[Action]:
        """Apply one bus command (``cmd.*``, ``engine.presence.gone``)."""
        return self._in_turn_order(self._command(topic, body))

    def _command(self, topic: str, body: dict[str, Any]) -> list[Action]:
        cmd_id = body.get("id")
        if isinstance(cmd_id, str) and cmd_id:
            if cmd_id in self.seen_cmd_ids:
                return []  # at-least-once delivery from clients that retry: already handled
            self.seen_cmd_ids.append(cmd_id)
        try:
            if topic == "cmd.say":
                return self._cmd_say(body)
            if topic == "cmd.cancel":
                acts = self.interrupt(server_cancels=False, reason="cmd.cancel")
                return acts + [Publish("cmd.ack", {"id": cmd_id, "ok": True})] if cmd_id else acts
            if topic == "cmd.session.update":
                session = body.get("session")
                if not isinstance(session, dict):
                    raise ValueError("cmd.session.update needs 'session': a map of session fields")
                self.session_config = {**self.session_config, **session, "type": "realtime"}
                acts = [Send({"type": "session.update", "session": {**session, "type": "realtime"}})]
                return acts + ([Publish("cmd.ack", {"id": cmd_id, "ok": True})] if cmd_id else [])
            if topic == "cmd.tool.register":
                return self._cmd_tool_register(body)
            if topic == "cmd.tool.unregister":
                return self._cmd_tool_unregister(body)
            if topic == "cmd.tool.result":
                return self._cmd_tool_result(body)
            if topic == "engine.presence.gone":
                return self._cmd_tool_unregister({"owner": body.get("owner")})
            if topic == "playback.started":
                return self._playback_started(body)
            if topic == "playback.flushed":
                return self._playback_flushed(body)
            if topic in ("cmd.ack",):
                return []
            raise ValueError(f"unknown command topic {topic!r} (known: cmd.say, cmd.cancel, cmd.session.update, "
                             "cmd.tool.register, cmd.tool.unregister, cmd.tool.result)")
        except (ValueError, TypeError, KeyError) as exc:
            self.malformed_commands += 1
            acts = [Publish("engine.error", {"source": "bus", "code": "bad_command", "topic": topic, "message": str(exc)})]
            if cmd_id:
                acts.append(Publish("cmd.ack", {"id": cmd_id, "ok": False, "error": str(exc)}))
            return acts

    def _cmd_say(self, body: dict[str, Any]) -> list[Action]:
        text, role = body.get("text"), body.get("role", "user")
        if not isinstance(text, str) or not text:
            raise ValueError("cmd.say needs 'text': a non-empty string")
        if role not in ("user", "system"):
            raise ValueError(f"cmd.say 'role' must be 'user' or 'system', not {role!r}")
        respond = body.get("respond", role == "user")
        if not isinstance(respond, bool):
            raise ValueError("cmd.say 'respond' must be true or false")
        self.pending.append(SayRequest(str(body.get("id") or new_id("say")), text, role, respond, str(body.get("pub", ""))))
        return self._drain()

    def _drain(self) -> list[Action]:
        """Send queued requests while no response is active (never meets 'active response')."""
        acts: list[Action] = []
        while self.pending and self.active_response is None and not self.response_requested:
            req = self.pending.popleft()
            if req.text:
                item_id = new_id("item")
                event_id = new_id("event")
                self.awaiting[event_id] = req
                self.item_requests[item_id] = req
                acts.append(Send({"type": "conversation.item.create", "event_id": event_id, "item": {
                    "id": item_id, "type": "message", "role": req.role,
                    "content": [{"type": "input_text", "text": req.text}]}}))
            if req.respond:
                if self.over_budget():
                    acts.append(Publish("engine.error", {"source": "engine", "code": "budget_exceeded",
                                                         "message": "budget_usd reached: no new responses"}))
                    continue
                event_id = new_id("event")
                self.awaiting[event_id] = req
                self.response_requested = True
                self.requested_for = req.id
                self.requested_at = self.clock()
                acts.append(Send({"type": "response.create", "event_id": event_id}))
        return acts

    def _cmd_tool_register(self, body: dict[str, Any]) -> list[Action]:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("cmd.tool.register needs 'name'")
        params = body.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ValueError("cmd.tool.register 'parameters' must be a JSON schema map")
        self.tools[name] = ToolSpec(name, str(body.get("description", "")), params,
                                    str(body.get("owner") or body.get("pub", "")), float(body.get("timeout_s", 10.0)))
        acts: list[Action] = [Send({"type": "session.update", "session": {"type": "realtime", "tools": self._session_with_tools()["tools"]}}),
                              Publish("engine.tools", {"tools": sorted(self.tools)})]
        if body.get("id"):
            acts.append(Publish("cmd.ack", {"id": body["id"], "ok": True}))
        return acts

    def _cmd_tool_unregister(self, body: dict[str, Any]) -> list[Action]:
        name = body.get("name")
        owner = body.get("owner")
        names = [n for n, t in self.tools.items() if n == name or (owner and t.owner == owner)]
        for n in names:
            del self.tools[n]
        if not names:
            return []
        return [Send({"type": "session.update", "session": {"type": "realtime", "tools": self._session_with_tools()["tools"]}}),
                Publish("engine.tools", {"tools": sorted(self.tools)})]

    def _cmd_tool_result(self, body: dict[str, Any]) -> list[Action]:
        call_id, output = body.get("call_id"), body.get("output")
        if not isinstance(call_id, str):
            raise ValueError("cmd.tool.result needs 'call_id'")
        if call_id not in self.tool_calls:
            return []  # first result wins; late or duplicate results are ignored
        if not isinstance(output, str):
            output = json.dumps(output)
        del self.tool_calls[call_id]
        return self._tool_output(call_id, output)

    def _tool_output(self, call_id: str, output: str) -> list[Action]:
        acts: list[Action] = [Send({"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": call_id, "output": output}})]
        self.pending.append(SayRequest(new_id("tool"), "", "user", True, "tool"))
        acts.extend(self._drain())
        return acts

    def next_deadline(self) -> float | None:
        """When :meth:`on_tick` next has work (clock seconds), or None when no timer runs."""
        due = [d for _, _, d, _ in self.pending_truncates.values()]
        due.extend(self.user_transcripts_due.values())
        due.extend(d for _, d in self.tool_calls.values())
        if self.pending_barge_in and self.speech_started_at is not None:
            due.append(self.speech_started_at + self.min_speech_ms / 1000)
        return min(due) if due else None

    def on_tick(self) -> list[Action]:
        """Timers: tool-call timeouts, delayed barge-in (min_speech_ms), late user transcripts."""
        acts: list[Action] = []
        now = self.clock()
        for item, estimate_ms, deadline, reason in list(self.pending_truncates.values()):
            if now >= deadline:
                acts.extend(self._finish_interrupt(item, estimate_ms, reason, measured=False))
        for item_id, deadline in list(self.user_transcripts_due.items()):
            if now >= deadline:
                self.transcripts_late += 1
                acts.extend(self._user_transcript_arrived(item_id))
        for call_id, (name, deadline) in list(self.tool_calls.items()):
            if now >= deadline:
                del self.tool_calls[call_id]
                acts.append(Publish("engine.error", {"source": "tool", "code": "tool_timeout", "message":
                                                     f"tool {name!r} did not answer call {call_id} in time"}))
                acts.extend(self._tool_output(call_id, '{"error": "the tool did not answer in time"}'))
        if self.pending_barge_in and self.speech_started_at is not None and \
                (now - self.speech_started_at) * 1000 >= self.min_speech_ms:
            self.pending_barge_in = False
            acts.extend(self.interrupt(server_cancels=self._server_interrupts(), reason="speech"))
        return self._in_turn_order(acts)


def _strip_audio(ev: dict[str, Any]) -> dict[str, Any]:
    """The event for the bus: base64 audio replaced by its byte count."""
    if ev.get("type") == "response.output_audio.delta":
        out = dict(ev)
        delta = out.pop("delta", "") or ""
        out["delta_bytes"] = len(delta) * 3 // 4 - delta[-2:].count("=")
        return out
    if ev.get("type") == "conversation.item.retrieved":
        out = dict(ev)
        item = dict(out.get("item") or {})
        parts = []
        for part in item.get("content") or []:
            part = dict(part)
            if isinstance(part.get("audio"), str):
                a = part.pop("audio")
                part["audio_bytes"] = len(a) * 3 // 4
            parts.append(part)
        item["content"] = parts
        out["item"] = item
        return out
    return ev


def _cut_transcript(text: str, played_ms: int, received_ms: int) -> str:
    """The part of ``text`` the listener heard, assuming words spread evenly over the audio."""
    if received_ms <= 0 or played_ms >= received_ms:
        return text
    words = text.split()
    keep = int(len(words) * played_ms / received_ms)
    return " ".join(words[:keep])

"""The realtime core: one engine session as seen from the API socket, without I/O.

Records in (:mod:`engine.realtime.records`), actions out. The dispatcher is a table from
input kind / server event type / bus topic to a handler; the state lives in small machines,
each with its rules at its top:

- :mod:`~engine.realtime.playout`: audio items in the speaker ring, barge-in, truncation;
- :mod:`~engine.realtime.requests`: the say queue and the one in-band response slot;
- :mod:`~engine.realtime.turns`: transcript order, the input clock, latency per turn;
- :mod:`~engine.realtime.tools`: registered tools and the model's calls;
- :mod:`~engine.realtime.budget`: dollars and the budget.

Rules of the dispatcher:
- Every server event goes on the bus as ``server.<type>`` (audio replaced by its size).
- A handler computes first and changes state last. If it raises anyway, the error is
  published with its cause (``engine.error`` ``handler_failed``), the invariants are restored
  (:meth:`RealtimeCore._restore`: the queue drains when it can), and the conversation goes on.
- The connection is DISCONNECTED, CONNECTED or REFUSED (the peer speaks the retired beta
  protocol: nothing is sent any more). Requests are sent only while CONNECTED. When the socket
  closes, what was in flight is settled at once: unacknowledged requests are queued again,
  responses that were asked for are reported failed (``response.done`` with status
  ``failed``), the audio that arrived plays out, held words are released. When a socket opens
  the session config, the tools and the conversation so far are replayed.
- The state a successor needs is published on ``conversation.history`` (a last-value topic the
  broker keeps) at every change: the conversation (:mod:`~engine.realtime.history`), the
  requests held, the tools registered, the session config, the session updates not yet
  confirmed, the mic gate, the cost so far (and whether the budget warned), and the keys of the
  latest commands taken. A restarted realtime process starts from it (:meth:`RealtimeCore.restore_history`).
- An item the server adds that the conversation holds already (the replay into a new session,
  echoed) is no news: it is not published again as ``user.text``.
- Commands: each is taken once (by ``id``, else publisher and ``seq``: the broker hands a
  restarted process what it held, which may have come live too). Taking one tells the broker
  it may let it go: with the state, when the command changed it (so it is safe first), else
  with the short ``intake.taken``. Its outcome is published on ``cmd.done`` (the broker acked
  it on ``cmd.ack`` when it came).
"""
from __future__ import annotations

import base64
import enum
import secrets
import string
from collections import OrderedDict
from typing import Any, Callable, Mapping

from bus.wire import COMMAND_TOPICS, DONE_TOPIC, STATE_TOPIC
from engine.realtime import budget as budget_mod
from engine.realtime.history import REPLAYED, History
from engine.realtime.playout import Playout, Truncation
from engine.errors import ConfigError
from engine.realtime.taken import TakesCommandsOnce, check_json, json_problem, json_text
from engine.realtime.records import (API_RATE_HZ, AUDIO_FORMATS, Action, Command, Connected, Disconnected, EndOfAudio,
                                     Flush, Input, MicAudio, Play, PlaybackReport, Publish, Send, SendAudio, ServerEvent,
                                     Tick, Ending)
from engine.realtime.requests import Request, Requests, check_response_options
from engine.realtime.tools import ToolSpec, Tools, check_session_tools, parse_registration
from engine.realtime.turns import Turns

#: server event types of the retired beta protocol; seeing one means the peer is not GA
#: (``conversation.item.created`` is still in the GA union, so it is not one of them)
BETA_ONLY_EVENTS = frozenset({
    "response.audio.delta", "response.audio.done", "response.audio_transcript.delta",
    "response.audio_transcript.done", "response.text.delta", "response.text.done",
    "transcription_session.created", "transcription_session.updated",
})
#: errors that are benign races; reported, never fatal
BENIGN_ERRORS = frozenset({"response_cancel_not_active"})
#: conversation items replayed into a new API session
HISTORY_ITEMS = REPLAYED
#: keys of the latest commands taken, in the published state (the broker lets them go)
TAKEN_PUBLISHED = 64
#: GPT-Live's context commands, and what does their job on Realtime
LIVE_ONLY = {
    "cmd.instructions": "add instructions with cmd.session.update {session: {instructions}} or context with "
                        "cmd.say role system",
    "cmd.commentary": "have the model say something with cmd.say role system and respond: true",
}
#: the metadata key that tags an out-of-band response with the request that asked for it
REQUEST_TAG = "realtalk_request_id"


def new_id(prefix: str) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "_" + "".join(secrets.choice(alphabet) for _ in range(21))


class Link(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTED = "connected"
    REFUSED = "refused"


class RealtimeCore(TakesCommandsOnce):
    """State of one engine session. ``handle(record, now_s, heard_index)`` -> actions."""

    def __init__(self, model: str, session_config: Mapping[str, Any], *, start_index: int = 0,
                 barge_in: bool = True, min_speech_ms: int = 0, budget_usd: float | None = None,
                 new_id: Callable[[str], str] = new_id, audio_format: str = "audio/pcm",
                 keeps_session: bool = False) -> None:
        if audio_format not in AUDIO_FORMATS:
            raise ConfigError(f"audio_format {audio_format!r} is not one of {', '.join(AUDIO_FORMATS)}")
        #: what Play / MicAudio / ring indices count: PCM16 24 kHz frames, or G.711 8 kHz bytes (phone calls)
        self.audio_format = AUDIO_FORMATS[audio_format]
        self.model = model
        self.budget = budget_mod.Budget(model, budget_usd)   # ConfigError for an unpriced model
        self.session_config: dict[str, Any] = {**session_config}
        check_session_tools(self.session_config.get("tools", []))
        self.barge_in = barge_in
        self.min_speech_ms = min_speech_ms
        self.new_id = new_id
        self.link = Link.DISCONNECTED
        self.session_id: str | None = None
        self.session: dict[str, Any] = {}
        self.playout = Playout(start_index, self.audio_format)
        self.requests = Requests()
        self.turns = Turns()
        self.tools = Tools()
        self.conversation = History()                    #: what the API holds, to replay into a new session
        self.taken: OrderedDict[str, str | None] = OrderedDict()  #: keys of the commands taken (de-duplication)
        self.outcomes: OrderedDict[str, Mapping[str, Any]] = OrderedDict()   #: command id -> its cmd.done
        self.core_id = new_id("core")                    #: names this core's state messages (their order: state_seq)
        self.restored = False                            #: started from a predecessor's state (restore_history)
        self.state_seq = 0
        self.model_transcripts: dict[str, str] = {}      #: assistant item id -> transcript so far
        self.speech_started_at: float | None = None
        self.pending_barge_in = False
        self.mic_open = True                             #: cmd.mic: a closed gate sends no mic audio
        #: session.update sent, not yet confirmed: (event id, command id or None, the config keys it sets)
        self.pending_updates: list[tuple[str, str | None, dict[str, Any]]] = []
        #: the config the server last confirmed (at first the configured one): a refused update
        #: falls back to it, with the updates still in flight over it
        self.confirmed_config: dict[str, Any] = dict(self.session_config)
        #: updates acked ``applied: on reconnect``: in the config the next socket's first update
        #: replays; reported lost if the server refuses that replay
        self.deferred_updates: list[str] = []
        self.replay_event_id: str | None = None   #: the current socket's first session.update
        self.silent_responses: set[str] = set()          #: out-of-band responses whose audio is not played
        self.errors = 0
        self.malformed_commands = 0
        self.handler_failures = 0
        #: the server keeps the session across sockets (a SIP call's socket): a reconnect replays nothing
        self.keeps_session = keeps_session
        self._server_handlers: dict[str, Callable[[Mapping[str, Any], float, int], list[Action]]] = {
            "session.created": self._on_session_created,
            "session.updated": self._on_session_updated,
            "error": self._on_error,
            "input_audio_buffer.committed": self._on_committed,
            "input_audio_buffer.speech_started": self._on_speech_started,
            "input_audio_buffer.speech_stopped": self._on_speech_stopped,
            "conversation.item.added": self._on_item_added,
            "conversation.item.done": self._on_item_done,
            "conversation.item.deleted": self._on_item_deleted,
            "conversation.item.truncated": self._on_item_truncated,
            "conversation.item.input_audio_transcription.delta": self._on_user_transcript_delta,
            "conversation.item.input_audio_transcription.completed": self._on_user_transcript_done,
            "conversation.item.input_audio_transcription.failed": self._on_user_transcript_failed,
            "response.created": self._on_response_created,
            "response.output_audio.delta": self._on_audio_delta,
            "response.output_audio.done": self._on_audio_done,
            "response.output_text.delta": self._on_text_delta,
            "response.output_text.done": self._on_text_done,
            "response.output_audio_transcript.delta": self._on_transcript_delta,
            "response.output_audio_transcript.done": self._on_transcript_done,
            "response.function_call_arguments.done": self._on_function_call,
            "response.done": self._on_response_done,
            "input_audio_buffer.dtmf_event_received": self._on_dtmf,
        }
        self._commands: dict[str, Callable[[Mapping[str, Any], float, int], list[Action]]] = {
            "cmd.say": self._cmd_say,
            "cmd.respond": self._cmd_respond,
            "cmd.input.commit": self._cmd_input_commit,
            "cmd.input.clear": self._cmd_input_clear,
            "cmd.mic": self._cmd_mic,
            "cmd.cancel": self._cmd_cancel,
            "cmd.session.update": self._cmd_session_update,
            "cmd.tool.register": self._cmd_tool_register,
            "cmd.tool.unregister": self._cmd_tool_unregister,
            "cmd.tool.result": self._cmd_tool_result,
            "cmd.dtmf": self._cmd_dtmf,
            "engine.presence.gone": self._presence_gone,
        }
        self._reports: dict[str, Callable[[PlaybackReport, float], list[Action]]] = {
            "started": self._report_started, "stopped": self._report_stopped, "underrun": self._report_underrun,
            "flushed": self._report_flushed, "position": self._report_position,
        }

    # ================================================================ dispatch
    def handle(self, rec: Input, now_s: float, heard_index: int) -> list[Action]:
        """Apply one input record. Never raises: a failing handler is reported and repaired."""
        try:
            if isinstance(rec, MicAudio):       # the most frequent input first: 50 a second
                acts = self._mic(rec)
            elif isinstance(rec, ServerEvent):
                acts = self._server_event(rec.event, now_s, heard_index)
            elif isinstance(rec, Command):
                acts = self._command(rec.topic, rec.body, now_s, heard_index, rec.offered)
            elif isinstance(rec, PlaybackReport):
                acts = self._report(rec, now_s)
            elif isinstance(rec, Ending):
                acts = []   # a Realtime session is finalized by the socket's close
            elif isinstance(rec, Tick):
                acts = self._tick(now_s, heard_index)
            elif isinstance(rec, Connected):
                acts = self._connected(rec, now_s)
            elif isinstance(rec, Disconnected):
                acts = self._disconnected(rec)
            else:
                raise TypeError(f"not an input record: {rec!r}")
        except Exception as exc:  # one odd event never loses the conversation
            self.handler_failures += 1
            what = rec.event.get("type") if isinstance(rec, ServerEvent) else getattr(rec, "topic", type(rec).__name__)
            message = f"handling {what} failed: {type(exc).__name__}: {exc}; the conversation goes on"
            acts = [Publish("engine.error", {"source": "engine", "code": "handler_failed", "input": str(what),
                                             "message": message})]
            if isinstance(rec, Command):   # taken already: answered, so no sender waits for it
                acts.extend(self._command_failed(rec.topic, rec.body, message))
            acts.extend(self._restore(now_s))
        if not isinstance(rec, MicAudio):
            acts = self._note_outcomes(acts)
        return self.turns.in_order(acts)

    def _restore(self, now_s: float) -> list[Action]:
        """Invariants after a failed handler: queued requests are sent when they can be."""
        try:
            return self._drain(now_s)
        except Exception:  # noqa: BLE001 - the error above is already reported
            return []

    # ================================================================ connection
    def _connected(self, rec: Connected, now_s: float) -> list[Action]:
        self.link = Link.CONNECTED
        self.turns.clock.reset()
        replay_update = self._session_update(self._session_with_tools(), None, dict(self.session_config))
        self.replay_event_id = replay_update.event["event_id"]
        acts: list[Action] = [replay_update]
        replay = self.conversation.replayable() if rec.reconnect and not self.keeps_session else []
        for item in replay:
            acts.append(self._send({"type": "conversation.item.create", "item": item}))
        if rec.reconnect:
            reason = "restart" if self.restored and rec.reason == "start" else rec.reason
            acts.append(Publish("engine.status", {"state": "reconnected", "reason": reason,
                                                  "history_items": len(replay)}))
        return acts + self._drain(now_s)

    def _disconnected(self, rec: Disconnected) -> list[Action]:
        if self.link is Link.REFUSED:
            return []
        self.link = Link.DISCONNECTED
        acts: list[Action] = [Publish("engine.status", {"state": "disconnected", "close_code": rec.code,
                                                        "reason": rec.reason})]
        for _, cmd_id, _ in self.pending_updates:  # what they changed is in the config the next socket gets
            if cmd_id:
                acts.append(Publish(DONE_TOPIC, {"id": cmd_id, "ok": True, "applied": "on reconnect"}))
                self.deferred_updates.append(cmd_id)
        self.pending_updates.clear()
        for req in list(self.requests.pending_commits):
            acts.append(Publish(DONE_TOPIC, {"id": req.id, "ok": False, "error":
                                            "the API socket closed before the input buffer was committed; "
                                            "its audio is gone with that session: speak again"}))
        lost = self.requests.socket_closed()
        if self.playout.socket_lost():
            acts.append(EndOfAudio())
        for item in self.playout.items.values():  # what was said of an unfinished answer stays in the context
            text = self.model_transcripts.pop(item.item_id, None)
            if text and self.conversation.text(item.item_id, text, final=False):
                acts.append(self.history_message())
        acts.extend(self.turns.release_all())
        for response_id, request_id in lost:
            acts.append(self._failed(response_id, request_id, "disconnected",
                                     f"the API socket closed ({rec.code}) before the answer was done"))
        return acts

    @property
    def history(self) -> list[dict[str, Any]]:
        """The conversation as it would be replayed now (client items with their ids)."""
        return self.conversation.replayable()

    def restore_history(self, body: Mapping[str, Any]) -> list[Action]:
        """A restarted realtime process starts from the state its predecessor published (call it
        before the first socket opens): the conversation, the requests it held (sent again; a
        push-to-talk commit is refused, its audio went with that session), the tools, the session
        config, the mic gate, the cost so far and the commands it took. The answers it left in flight
        are reported failed, unless their request is held (it is answered anew); the session updates
        it had sent and not seen confirmed are done (``applied: on reconnect``: the config the new
        socket gets holds them), unless their outcome is known. A tool or session JSON cannot carry,
        or a bad tool timeout, is left out and reported."""
        items = body.get("items")
        if isinstance(items, list):
            self.conversation.restore(items)
        self.restored = True
        acts: list[Action] = []
        pending = [r for r in (Request.from_wire(w) for w in body.get("pending") or []) if r is not None]
        for req in pending:
            self._mark_taken(req.id)
            self.requests.seen[req.id] = None
            if req.kind == "commit":
                acts.append(Publish(DONE_TOPIC, {"id": req.id, "ok": False, "error":
                                                 "the realtime process restarted before the input buffer was "
                                                 "committed; its audio is gone with that session: speak again"}))
            else:
                self.requests.queue.append(req)
        held = {r.id for r in pending}
        for req_id in body.get("in_flight") or []:
            if str(req_id) not in held:
                acts.append(self._failed(None, str(req_id), "realtime_restarted",
                                         "the realtime process restarted before the answer was done"))
        acts.extend(restore_tools(self.tools, body.get("tools")))
        session = body.get("session")
        if isinstance(session, dict):
            problem = json_problem(session)
            if problem is None:
                self.session_config = dict(session)
                confirmed = body.get("session_confirmed")
                self.confirmed_config = dict(confirmed) if isinstance(confirmed, dict) and json_problem(confirmed) \
                    is None else dict(session)
            else:
                acts.append(Publish("engine.error", {"source": "engine", "code": "bad_state", "message":
                                    f"the predecessor's session config holds {problem}; the configured one is used"}))
        done, answered = self._done_in_flight(body.get("updates_in_flight"), "cmd.session.update", "on reconnect")
        acts.extend(done)
        self.deferred_updates.extend(answered)
        self.deferred_updates.extend(i for i in body.get("updates_deferred") or [] if isinstance(i, str) and i)
        if self.budget.restore(body.get("cost")):
            acts.append(self.budget.session_message())
        if isinstance(body.get("mic_open"), bool):
            self.mic_open = body["mic_open"]
        for key in body.get("taken") or []:
            if isinstance(key, str):
                self._mark_taken(key)
        if self.tools.registered:
            acts.append(Publish("engine.tools", {"tools": sorted(self.tools.registered)}))
        return self._note_outcomes(acts)   # a refused commit's outcome is remembered like any other

    def _failed(self, response_id: str | None, request_id: str | None, reason: str, message: str) -> Publish:
        """``response.done`` for an answer that will never finish (waiters see it and stop waiting)."""
        return Publish("response.done", {"response_id": response_id, "request_id": request_id, "status": "failed",
                                         "reason": reason, "message": message, "text": "", "usage": None,
                                         "usd": 0.0, "function_calls": 0, "metadata": None,
                                         "session_usd": self.budget.total_usd()})

    def _session_with_tools(self) -> dict[str, Any]:
        s = dict(self.session_config)
        s["tools"] = self.tools.session_tools(list(s.get("tools", [])))
        return s

    def state_messages(self) -> list[Action]:
        """The core's last-value topics, to publish again (a restarted broker's cache is empty)."""
        acts: list[Action] = [self.history_message(), Publish("engine.tools", {"tools": sorted(self.tools.registered)})]
        if self.session:
            acts.append(Publish("session.config", {"session": self.session}))
        return acts

    def history_message(self) -> Publish:
        """The state a successor starts from (``conversation.history``; the module docstring)."""
        in_flight = [r for r in (self.requests.requested_for, *self.requests.response_requests.values(),
                                 *self.requests.out_of_band) if r]
        self.state_seq += 1
        return Publish(STATE_TOPIC, {
            "items": self.conversation.replayable(), "in_flight": list(dict.fromkeys(in_flight)),
            "pending": [r.to_wire() for r in self.requests.pending()],
            "tools": [registration(t) for t in self.tools.registered.values()],
            "session": self.session_config, "session_confirmed": self.confirmed_config, "mic_open": self.mic_open,
            "updates_in_flight": [cmd_id for _, cmd_id, _ in self.pending_updates if cmd_id],
            "updates_deferred": list(self.deferred_updates),
            "cost": self.budget.state(),
            "taken": list(self.taken)[-TAKEN_PUBLISHED:], "core": self.core_id, "state_seq": self.state_seq})

    # ================================================================ server events
    def _server_event(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        etype = ev.get("type")
        if not isinstance(etype, str):
            return [Publish("engine.error", {"source": "api", "code": "unknown_server_event",
                                             "message": "a server event without a 'type'; ignored"})]
        if etype in BETA_ONLY_EVENTS:
            self.link = Link.REFUSED
            return [Publish("engine.error", {"source": "api", "code": "beta_protocol", "fatal": True, "message":
                    f"the server sent {etype!r}, an event of the retired beta Realtime protocol "
                    "(OpenAI-Beta: realtime=v1, shut down in May 2026); realtalk speaks only the GA protocol. "
                    "Point the engine at a GA endpoint (/v1/realtime with a GA model)."})]
        acts: list[Action] = [Publish("server." + etype, _strip_audio(ev))]
        handler = self._server_handlers.get(etype)
        if handler is not None:
            acts.extend(handler(ev, now_s, heard))
        return acts

    @property
    def protocol_refused(self) -> bool:
        return self.link is Link.REFUSED

    @property
    def ending(self) -> bool:
        return False   # a Realtime session is finalized by the socket's close (``Ending`` does nothing)

    def _on_dtmf(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        """A SIP caller pressed a key (the call socket's ``input_audio_buffer.dtmf_event_received``)."""
        return [Publish("sip.dtmf", {"key": ev.get("event"), "from": "caller", "received_at": ev.get("received_at")})]

    def _cmd_dtmf(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        why = ("Realtime has no client event that sends DTMF (openai 3.63.0 has none): a route with api: live "
               "sends keys (transport.dtmf.send)")
        cmd_id = body.get("id")
        return [Publish(DONE_TOPIC, {"id": cmd_id, "ok": False, "error": why})] if isinstance(cmd_id, str) else \
            [Publish("engine.error", {"source": "engine", "code": "bad_command", "message": why})]

    def _on_session_created(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        session = ev["session"]
        self.session_id, self.session = session.get("id"), dict(session)
        acts: list[Action] = [Publish("engine.status", {"state": "connected", "session_id": self.session_id,
                                                        "model": self.model})]
        return acts + self._model_named(session)

    def _on_session_updated(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        self.session = dict(ev["session"])
        acts: list[Action] = [Publish("session.config", {"session": ev["session"]}), *self._model_named(ev["session"])]
        if self.pending_updates:  # the server answers updates in order
            event_id, cmd_id, sets = self.pending_updates.pop(0)
            self.confirmed_config = {**self.confirmed_config, **sets}
            if event_id == self.replay_event_id:
                self.deferred_updates.clear()   # the replay holds them: applied
            if cmd_id:
                acts.append(Publish(DONE_TOPIC, {"id": cmd_id, "ok": True}))
        return acts

    def _session_update(self, session: dict[str, Any], cmd_id: str | None, sets: dict[str, Any]) -> Send:
        """A ``session.update`` of ``session`` for the wire; ``sets``: the keys of ``session_config``
        it changes (what a refusal takes back)."""
        event_id = self.new_id("event")
        self.pending_updates.append((event_id, cmd_id, sets))
        return Send({"type": "session.update", "event_id": event_id, "session": session})

    def _model_named(self, session: Mapping[str, Any]) -> list[Action]:
        model = session.get("model")
        if isinstance(model, str) and model and model != self.budget.model and not self.budget.set_model(model):
            return [Publish("engine.error", {"source": "engine", "code": "unpriced_model", "message":
                             f"the server runs model {model!r}, which has no price in engine/pricing.json; "
                             f"costs are counted at {self.budget.model!r} prices"})]
        return []

    def _on_error(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        err = ev.get("error") or {}
        code, message = err.get("code"), err.get("message") or ""
        benign = code in BENIGN_ERRORS or "already shorter than" in message
        event_id = err.get("event_id") or ""
        req = self.requests.refused(event_id)
        update = next((u for u in self.pending_updates if u[0] == event_id), None)
        cause = req.id if req else (update[1] if update else None)
        acts: list[Action] = [Publish("engine.error", {"source": "api", "code": code, "message": message,
                                                       "param": err.get("param"), "benign": benign,
                                                       "event_id": err.get("event_id"),
                                                       "request_id": cause,
                                                       "fatal": code == "beta_api_shape_disabled"})]
        if update is not None:  # refused: the last confirmed config, with the updates still in flight over it
            self.pending_updates.remove(update)
            config = dict(self.confirmed_config)
            for _, _, sets in self.pending_updates:
                config.update(sets)
            self.session_config = config
            if event_id == self.replay_event_id:   # the socket's first update: the session runs on defaults
                self.replay_event_id = None
                lost, self.deferred_updates = self.deferred_updates, []
                if lost:
                    acts.append(Publish("engine.error", {
                        "source": "engine", "code": "session_config_refused", "updates": lost, "message":
                        f"the server refused the session config sent on reconnect ({message}); the config it "
                        f"last confirmed is sent again, so updates {', '.join(lost)} (acked 'on reconnect') are "
                        "not applied: send them again, without the value the server refused"}))
                if update[2] != self.confirmed_config and self.link is Link.CONNECTED:
                    # sent at once (not at the next reconnect); once: its own refusal is a plain update's
                    acts.append(self._session_update(self._session_with_tools(), None, dict(self.session_config)))
            if update[1]:
                acts.append(Publish(DONE_TOPIC, {"id": update[1], "ok": False, "error": message, "code": code}))
        if not benign:
            self.errors += 1
        if req is not None:
            if code == "conversation_already_has_active_response":
                self.requests.add_front(Request(req.id, "", req.role, True, req.source))  # retry the response only
            else:
                acts.append(Publish(DONE_TOPIC, {"id": req.id, "ok": False, "error": message, "code": code}))
        return acts + self._drain(now_s)

    def _on_committed(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        input_cfg = (self.session.get("audio") or {}).get("input") or {}
        if input_cfg.get("transcription") and ev.get("item_id"):
            self.turns.transcript_due(ev["item_id"], now_s)
        req = self.requests.committed()
        if req is None:
            return []
        return [Publish(DONE_TOPIC, {"id": req.id, "ok": True, "item_id": ev.get("item_id")}), self.history_message()]

    def _on_speech_started(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        self.speech_started_at = now_s
        acts: list[Action] = [Publish("user.speech.started", {"item_id": ev.get("item_id"),
                                                             "audio_start_ms": ev.get("audio_start_ms")})]
        if self.barge_in:
            if self.min_speech_ms <= 0:
                acts.extend(self.interrupt(self._server_interrupts(), "speech", now_s, heard))
            else:
                self.pending_barge_in = True
        return acts

    def _on_speech_stopped(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        self.pending_barge_in = False
        self.turns.speech_stopped(ev.get("audio_end_ms"))
        return [Publish("user.speech.stopped", {"item_id": ev.get("item_id"), "audio_end_ms": ev.get("audio_end_ms")})]

    def _on_item_added(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        item = ev["item"]
        known = item.get("id") in self.conversation.by_id   # replayed into this session: said before
        req = self.requests.item_added(item.get("id", ""))
        changed = self.conversation.added(item, ev.get("previous_item_id"))
        if req is not None and req.text:   # ours: what we sent, whatever the echo shows of it
            changed = self.conversation.text(item["id"], req.text, final=False) or changed
        acts: list[Action] = [self.history_message()] if changed or req is not None else []
        if req is not None:
            acts.append(Publish(DONE_TOPIC, {"id": req.id, "ok": True, "item_id": item["id"]}))
            acts.append(Publish("user.text" if req.role == "user" else "system.text",
                                {"text": req.text, "item_id": item["id"], "request_id": req.id, "source": req.source}))
        elif item.get("role") == "user" and item.get("type") == "message" and not known:
            for part in item.get("content") or []:
                if part.get("type") == "input_text":
                    acts.append(Publish("user.text", {"text": part["text"], "item_id": item["id"]}))
        return acts

    def _on_item_done(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        item = ev.get("item")
        if not isinstance(item, Mapping) or self._cut(str(item.get("id"))):
            return []   # a cut answer's text is the part heard (set at its truncation)
        return [self.history_message()] if self.conversation.done(item) else []

    def _on_item_deleted(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        return [self.history_message()] if self.conversation.deleted(str(ev.get("item_id"))) else []

    def _on_item_truncated(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        item_id = ev["item_id"]
        return [Publish("model.transcript.truncated", {"item_id": item_id, "audio_end_ms": ev["audio_end_ms"],
                                                       "text_received": self.model_transcripts.get(item_id, "")})]

    def _on_user_transcript_delta(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        return [Publish("user.transcript.delta", {"text": ev.get("delta", ""), "item_id": ev["item_id"]})]

    def _on_user_transcript_done(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        text = ev.get("transcript", "")
        tr = ((self.session.get("audio") or {}).get("input") or {}).get("transcription") or {}
        usd = self.budget.add_transcription(tr.get("model", ""), ev.get("usage"))
        acts: list[Action] = [Publish("user.transcript.done", {"text": text, "item_id": ev["item_id"], "usd": usd})]
        if self.conversation.text(ev["item_id"], text) or usd:   # the text, or the cost, a successor starts from
            acts.append(self.history_message())
        return acts + self.turns.transcript_arrived(ev["item_id"]) + [self.budget.session_message()]

    def _on_user_transcript_failed(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        err = ev.get("error") or {}
        return [Publish("engine.error", {"source": "api", "code": err.get("code"), "benign": True,
                                         "message": f"transcription of {ev.get('item_id')} failed: {err.get('message')}"}),
                *self.turns.transcript_arrived(ev.get("item_id") or "")]

    def _on_response_created(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        resp = ev["response"]
        tag = (resp.get("metadata") or {}).get(REQUEST_TAG)
        oob = self.requests.out_of_band.get(tag) if isinstance(tag, str) else None
        if oob is not None:
            self.requests.response_requests[resp["id"]] = oob.id
            if not oob.options.get("speak"):
                self.silent_responses.add(resp["id"])
        else:
            in_band = resp.get("conversation_id") is not None or not resp.get("metadata")
            self.requests.created(resp["id"], in_band)
        self.turns.response_created(resp["id"])
        return [self.history_message()]

    def _request_of(self, response_id: str) -> str | None:
        return self.requests.response_requests.get(response_id)

    def _on_audio_delta(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        rid, item_id = ev["response_id"], ev["item_id"]
        if rid in self.silent_responses:
            return []  # an out-of-band reply nobody asked to hear
        try:
            pcm = base64.b64decode(ev["delta"])
        except (ValueError, TypeError):
            return [Publish("engine.error", {"source": "api", "code": "bad_audio_delta",
                                             "message": f"undecodable audio delta in {item_id}; skipped"})]
        taken = self.playout.take_delta(rid, item_id, pcm)
        if taken is None:
            return []
        self.turns.delta(rid, now_s, audio=True, item_id=item_id)
        return [Play(taken[0], taken[1], rid)]

    def _on_audio_done(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        return [EndOfAudio()] if self.playout.audio_done(ev.get("item_id", "")) else []

    def _on_text_delta(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        self.turns.delta(ev["response_id"], now_s, audio=False)
        return [Publish("model.text.delta", {"text": ev["delta"], "item_id": ev["item_id"],
                                             "response_id": ev["response_id"],
                                             "request_id": self._request_of(ev["response_id"])})]

    def _on_text_done(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        acts: list[Action] = [Publish("model.text.done", {"text": ev["text"], "item_id": ev["item_id"],
                                                          "response_id": ev["response_id"],
                                                          "request_id": self._request_of(ev["response_id"])})]
        if ev["response_id"] in self.silent_responses or self._out_of_band(ev["response_id"]):
            return acts  # out of band: not part of the conversation
        if self.conversation.text(ev["item_id"], ev["text"]):
            acts.append(self.history_message())
        return acts

    def _on_transcript_delta(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        if self._cut(ev["item_id"]):
            return []
        self.model_transcripts[ev["item_id"]] = self.model_transcripts.get(ev["item_id"], "") + ev["delta"]
        return [Publish("model.transcript.delta", {"text": ev["delta"], "item_id": ev["item_id"],
                                                   "response_id": ev["response_id"],
                                                   "request_id": self._request_of(ev["response_id"])})]

    def _on_transcript_done(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        self.model_transcripts.pop(ev["item_id"], None)
        if self._cut(ev["item_id"]):
            return []  # the heard part was published when playback was interrupted
        acts: list[Action] = [Publish("model.transcript.done", {"text": ev["transcript"], "item_id": ev["item_id"],
                                                                "response_id": ev["response_id"],
                                                                "request_id": self._request_of(ev["response_id"])})]
        if self._out_of_band(ev["response_id"]):
            return acts
        if self.conversation.text(ev["item_id"], ev["transcript"]):
            acts.append(self.history_message())
        return acts

    def _out_of_band(self, response_id: str) -> bool:
        req_id = self.requests.response_requests.get(response_id)
        return req_id is not None and req_id in self.requests.out_of_band

    def _cut(self, item_id: str) -> bool:
        item = self.playout.items.get(item_id)
        return item is not None and item.state.value in ("interrupting", "truncated")

    def _on_function_call(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        name = ev.get("name", "")
        registered = self.tools.called(ev["call_id"], name, now_s)
        acts: list[Action] = [Publish("tool.call", {"call_id": ev["call_id"], "name": name,
                                                    "arguments": ev.get("arguments", ""), "item_id": ev.get("item_id"),
                                                    "response_id": ev.get("response_id"), "registered": registered})]
        if isinstance(ev.get("item_id"), str) and self.conversation.done(
                {"id": ev["item_id"], "type": "function_call", "call_id": ev["call_id"], "name": name,
                 "arguments": ev.get("arguments", ""), "status": "completed"}):
            acts.append(self.history_message())
        return acts

    def _on_response_done(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        resp = ev["response"]
        rid = resp["id"]
        usage = resp.get("usage")
        usd = self.budget.response_usd(usage)              # computed before anything changes
        output = resp.get("output") or []
        text = "".join(part.get("text") or part.get("transcript") or ""
                       for out in output for part in out.get("content") or [])
        calls = sum(1 for out in output if out.get("type") == "function_call")
        # commit
        request_id = self.requests.done(rid)
        if request_id is not None:
            self.requests.out_of_band.pop(request_id, None)
        self.silent_responses.discard(rid)
        self.budget.add_response(usd)
        acts: list[Action] = [
            Publish("response.done", {"response_id": rid, "request_id": request_id,
                                      "status": resp.get("status"), "function_calls": calls,
                                      "reason": (resp.get("status_details") or {}).get("reason"),
                                      "text": text, "usage": usage, "usd": usd, "metadata": resp.get("metadata"),
                                      "session_usd": self.budget.total_usd()}),
            Publish("cost.response", {"response_id": rid, "usd": usd, "usage": usage}),
            self.budget.session_message(),
        ]
        acts.extend(self.turns.response_done(rid))
        acts.extend(self.budget.check())
        acts.append(self.history_message())
        return acts + self._drain(now_s)

    def _server_interrupts(self) -> bool:
        td = ((self.session.get("audio") or {}).get("input") or {}).get("turn_detection")
        return bool(td and td.get("interrupt_response", True))

    # ================================================================ barge-in
    def interrupt(self, server_cancels: bool, reason: str, now_s: float, heard: int) -> list[Action]:
        """Stop the model's voice: flush playback (truncation follows playback's report) and
        cancel the response unless the server does."""
        acts: list[Action] = []
        rid = self.requests.active_response
        if rid is not None and not server_cancels:
            acts.append(self._send({"type": "response.cancel"}))
        if self.playout.interrupt(rid, heard, now_s, reason):
            acts.append(Flush())
        return acts

    def _truncated(self, t: Truncation) -> list[Action]:
        item = t.item
        received_ms = item.frames // self.audio_format.frames_per_ms
        acts: list[Action] = [self._send({"type": "conversation.item.truncate", "item_id": item.item_id,
                                          "content_index": 0, "audio_end_ms": t.played_ms})]
        heard_text = _cut_transcript(self.model_transcripts.get(item.item_id, ""), t.played_ms, received_ms)
        acts.append(Publish("playout.interrupted", {"item_id": item.item_id, "response_id": item.response_id,
                                                    "played_ms": t.played_ms, "received_ms": received_ms,
                                                    "reason": item.reason, "measured": t.measured,
                                                    "interrupt_mono_ns": int(item.interrupted_at_s * 1e9)}))
        acts.append(Publish("model.transcript.done", {"text": heard_text, "item_id": item.item_id,
                                                      "response_id": item.response_id, "truncated": True}))
        if self.conversation.text(item.item_id, heard_text):
            acts.append(self.history_message())
        return acts

    # ================================================================ playback reports
    def _report(self, rec: PlaybackReport, now_s: float) -> list[Action]:
        handler = self._reports.get(rec.kind)
        if handler is None:
            return []  # playback.cadence, .device: for observers
        if rec.index is None or (rec.kind != "position" and rec.start_index is None):
            return [Publish("engine.error", {"source": "engine", "code": "bad_playback_report", "topic": f"playback.{rec.kind}",
                                             "message": f"playback.{rec.kind} without integer 'index' and 'start_index' "
                                                        "(ring frame indices); ignored"})]
        return handler(rec, now_s)

    def _item_payload(self, rec: PlaybackReport, item: Any) -> dict[str, Any]:
        out = {k: v for k, v in rec.body.items() if k not in ("v", "ts", "pub", "seq")}
        out.update(item_id=item.item_id if item else None, response_id=item.response_id if item else None)
        if item is not None and rec.index is not None:
            out["played_ms"] = item.heard_ms(rec.index)
        return out

    def _report_started(self, rec: PlaybackReport, now_s: float) -> list[Action]:
        item = self.playout.item_starting_at(rec.start_index) if rec.start_index is not None else None
        acts: list[Action] = [Publish("playout.started", self._item_payload(rec, item))]
        if item is not None:
            ns = rec.body.get("first_sample_mono_ns")
            at = ns / 1e9 if isinstance(ns, int) and ns > 0 else now_s
            acts.extend(self.turns.device_started(item.response_id, at,
                                                  float(rec.body.get("output_latency_ms") or 0.0)))
        return acts

    def _report_stopped(self, rec: PlaybackReport, now_s: float) -> list[Action]:
        if rec.index is None:
            return []
        item = self.playout.item_starting_at(rec.start_index) if rec.start_index is not None else None
        item = item or self.playout.item_at(max(0, rec.index - 1))
        self.playout.stream_stopped(rec.index)
        return [Publish("playout.stopped", self._item_payload(rec, item))]

    def _report_underrun(self, rec: PlaybackReport, now_s: float) -> list[Action]:
        item = self.playout.item_at(rec.index) if rec.index is not None else None
        return [Publish("playout.underrun", self._item_payload(rec, item))]

    def _report_position(self, rec: PlaybackReport, now_s: float) -> list[Action]:
        item = self.playout.item_at(rec.index) if rec.index is not None else None
        if item is None:
            return []
        return [Publish("playout.position", {"item_id": item.item_id, "response_id": item.response_id,
                                             "played_ms": item.heard_ms(rec.index or 0), "index": rec.index})]

    def _report_flushed(self, rec: PlaybackReport, now_s: float) -> list[Action]:
        if rec.index is None:
            return []
        return [a for t in self.playout.flushed(rec.index) for a in self._truncated(t)]

    # ================================================================ mic
    def _mic(self, rec: MicAudio) -> list[Action]:
        if self.link is not Link.CONNECTED or not self.mic_open:
            return []  # a closed socket's input buffer is gone (the new session starts clean); a closed gate
        fmt = self.audio_format  # the input clock counts API-rate (24 kHz) frames: a unit of time
        self.turns.clock.appended(len(rec.pcm) // fmt.bytes_per_frame * API_RATE_HZ // fmt.rate_hz, rec.captured_at_s)
        return [SendAudio(rec.pcm)]

    # ================================================================ commands
    def _durable_mark(self) -> tuple[Any, ...]:
        """Changes when the state a successor starts from changes (cheap: versions and identities)."""
        return (self.conversation.version, tuple((r.id, r.item_id) for r in self.requests.pending()),
                tuple(id(t) for t in self.tools.registered.values()), id(self.session_config), self.mic_open,
                tuple(self.requests.out_of_band), self.requests.requested_for)

    def _no_handler(self, topic: str) -> str:
        if topic in LIVE_ONLY:
            return f"{topic} is a GPT-Live command (docs/live.md); on Realtime {LIVE_ONLY[topic]}"
        return f"unknown command topic {topic!r} (known: {', '.join(COMMAND_TOPICS)})"

    def _cmd_say(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        text, role = body.get("text"), body.get("role", "user")
        if not isinstance(text, str) or not text:
            raise ValueError("cmd.say needs 'text': a non-empty string")
        if role not in ("user", "system"):
            raise ValueError(f"cmd.say 'role' must be 'user' or 'system', not {role!r}")
        respond = body.get("respond", role == "user")
        if not isinstance(respond, bool):
            raise ValueError("cmd.say 'respond' must be true or false")
        return self._queue(Request(self._req_id(body, "say"), text, role, respond, str(body.get("pub", "")),
                                   options=response_options(body, "cmd.say")), now_s)

    def _cmd_respond(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        """A response on demand (``response``: per-response options; ``conversation: none`` for out of band)."""
        return self._queue(Request(self._req_id(body, "respond"), "", "user", True, str(body.get("pub", "")),
                                   options=response_options(body, "cmd.respond"), kind="respond"), now_s)

    def _cmd_input_commit(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        """Push-to-talk: commit the input buffer, then (unless ``respond: false``) ask for a response."""
        respond = body.get("respond", True)
        if not isinstance(respond, bool):
            raise ValueError("cmd.input.commit 'respond' must be true or false")
        return self._queue(Request(self._req_id(body, "commit"), "", "user", respond, str(body.get("pub", "")),
                                   options=response_options(body, "cmd.input.commit"), kind="commit"), now_s)

    def _cmd_input_clear(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        acts = [self._send({"type": "input_audio_buffer.clear"})] if self.link is Link.CONNECTED else []
        return acts + self._ack(body)

    def _cmd_mic(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        """Open or close the mic gate (push-to-talk): a closed gate sends nothing to the API."""
        is_open = body.get("open")
        if not isinstance(is_open, bool):
            raise ValueError("cmd.mic needs 'open': true or false")
        self.mic_open = is_open
        return [Publish("input.mic", {"open": is_open})] + self._ack(body, open=is_open)

    def _req_id(self, body: Mapping[str, Any], prefix: str) -> str:
        return str(body.get("id") or self.new_id(prefix))

    def _queue(self, req: Request, now_s: float) -> list[Action]:
        if not self.requests.add(req):
            return []  # a client re-sending until it sees the ack: already queued or answered
        return self._drain(now_s)

    def _send(self, event: dict[str, Any]) -> Send:
        """A client event with an ``event_id``, so an error that names it can be traced to its cause."""
        return Send({**event, "event_id": event.get("event_id") or self.new_id("event")})

    def _drain(self, now_s: float) -> list[Action]:
        """Send what is queued while the socket is up: out-of-band requests at once, the others
        one response at a time."""
        acts: list[Action] = []
        if self.link is not Link.CONNECTED:
            return acts
        for req in [r for r in self.requests.queue if r.out_of_band]:
            self.requests.queue.remove(req)
            acts.extend(self._send_request(req, now_s))
        while self.requests.can_send(True):
            acts.extend(self._send_request(self.requests.pop(), now_s))
        return acts

    def _send_request(self, req: Request, now_s: float) -> list[Action]:
        acts: list[Action] = []
        if req.kind == "say" and req.text:
            req.item_id = req.item_id or self.new_id("item")
            event_id = self.new_id("event")
            self.requests.awaiting_item[req.item_id] = req
            self.requests.awaiting_event[event_id] = req
            acts.append(Send({"type": "conversation.item.create", "event_id": event_id, "item": {
                "id": req.item_id, "type": "message", "role": req.role,
                "content": [{"type": "input_text", "text": req.text}]}}))
        elif req.kind == "commit":
            event_id = self.new_id("event")
            self.requests.pending_commits.append(req)
            self.requests.awaiting_event[event_id] = req
            acts.append(Send({"type": "input_audio_buffer.commit", "event_id": event_id}))
        if not req.respond:
            return acts
        if self.budget.exceeded():
            acts.append(Publish("engine.error", {"source": "engine", "code": "budget_exceeded", "request_id": req.id,
                                                 "message": "budget_usd reached: no new responses"}))
            if req.kind == "respond":
                acts.append(Publish(DONE_TOPIC, {"id": req.id, "ok": False, "error": "budget_usd reached"}))
            return acts
        event_id = self.new_id("event")
        options = {k: v for k, v in req.options.items() if k != "speak"}
        if req.out_of_band:
            tags: dict[str, Any] = dict(options.get("metadata") or {})  # type: ignore[call-overload]
            options["metadata"] = {**tags, REQUEST_TAG: req.id}
            options.setdefault("output_modalities", ["audio"] if req.options.get("speak") else ["text"])
            self.requests.out_of_band[req.id] = req
            self.requests.awaiting_event[event_id] = req
        else:
            self.requests.requested(req, event_id)
            self.turns.requested_at = now_s
        event: dict[str, Any] = {"type": "response.create", "event_id": event_id}
        if options:
            event["response"] = options
        acts.append(Send(event))
        if req.kind == "respond":
            acts.append(Publish(DONE_TOPIC, {"id": req.id, "ok": True}))
        return acts

    def _cmd_cancel(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        return self.interrupt(False, "cmd.cancel", now_s, heard) + self._ack(body)

    def _cmd_session_update(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        """Change the session; acknowledged when the server confirms it (``session.updated``), or
        refused with the server's error."""
        session = body.get("session")
        if not isinstance(session, dict):
            raise ValueError("cmd.session.update needs 'session': a map of session fields")
        check_json(session, "cmd.session.update 'session'")   # it goes into session.update, and the state
        if "tools" in session:
            check_session_tools(session["tools"])
        self.session_config = {**self.session_config, **session, "type": "realtime"}
        if self.link is not Link.CONNECTED:
            if body.get("id"):
                self.deferred_updates.append(str(body["id"]))
            return self._ack(body, applied="on reconnect")  # the next socket gets the whole config
        update = {**session, "type": "realtime"}
        if "tools" in session:
            update["tools"] = self._session_with_tools()["tools"]
        cmd_id = body.get("id")
        return [self._session_update(update, str(cmd_id) if cmd_id else None, {**session, "type": "realtime"})]

    def _tools_changed(self) -> list[Action]:
        acts: list[Action] = [Publish("engine.tools", {"tools": sorted(self.tools.registered)})]
        if self.link is Link.CONNECTED:
            acts.insert(0, self._session_update({"type": "realtime", "tools": self._session_with_tools()["tools"]},
                                                None, {}))
        return acts

    def _cmd_tool_register(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        self.tools.register(parse_registration(body))
        return self._tools_changed() + self._ack(body)

    def _cmd_tool_unregister(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("cmd.tool.unregister needs 'name': the tool's name")
        gone = self.tools.unregister(name=name)
        return (self._tools_changed() if gone else []) + self._ack(body, removed=gone)

    def _presence_gone(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        owner = body.get("owner")
        if not isinstance(owner, str) or not owner:
            return []
        return self._tools_changed() if self.tools.unregister(owner=owner) else []

    def _cmd_tool_result(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        call_id = body.get("call_id")
        if not isinstance(call_id, str):
            raise ValueError("cmd.tool.result needs 'call_id': the call's id from tool.call")
        output = self.tools.result(call_id, body.get("output"))
        if output is None and self.conversation.unanswered_call(call_id):   # a call made before a restart
            output = json_text(body.get("output"), "cmd.tool.result 'output'")
        if output is None:
            return self._ack(body, late=True)  # first result wins; late or duplicate results are ignored
        return self._tool_output(call_id, output, now_s) + self._ack(body)

    def _tool_output(self, call_id: str, output: str, now_s: float) -> list[Action]:
        item = {"id": self.new_id("item"), "type": "function_call_output", "call_id": call_id, "output": output}
        acts: list[Action] = [self._send({"type": "conversation.item.create", "item": item})]
        self.conversation.added(item)   # kept now: a socket that closes first has it replayed
        self.requests.add(Request(self.new_id("tool"), "", "user", True, "tool"))
        return acts + self._drain(now_s) + [self.history_message()]

    # ================================================================ timers
    def next_deadline(self) -> float | None:
        """When :class:`Tick` next has work (monotonic seconds), or None when no timer runs."""
        due = [d for d in (self.playout.next_deadline(), self.turns.next_deadline(), self.tools.next_deadline())
               if d is not None]
        if self.pending_barge_in and self.speech_started_at is not None:
            due.append(self.speech_started_at + self.min_speech_ms / 1000)
        return min(due) if due else None

    def _tick(self, now_s: float, heard: int) -> list[Action]:
        acts: list[Action] = []
        for t in self.playout.overdue(now_s):
            acts.extend(self._truncated(t))
        acts.extend(self.turns.overdue(now_s))
        for call_id, name in self.tools.overdue(now_s):
            acts.append(Publish("engine.error", {"source": "tool", "code": "tool_timeout", "message":
                                                 f"tool {name!r} did not answer call {call_id} in time"}))
            acts.extend(self._tool_output(call_id, '{"error": "the tool did not answer in time"}', now_s))
        if self.pending_barge_in and self.speech_started_at is not None and \
                (now_s - self.speech_started_at) * 1000 >= self.min_speech_ms:
            self.pending_barge_in = False
            acts.extend(self.interrupt(self._server_interrupts(), "speech", now_s, heard))
        return acts

    # ================================================================ views
    def total_usd(self) -> float:
        return self.budget.total_usd()

    def at_turn_boundary(self) -> bool:
        """Nothing in progress: no response, no queued request, nothing audible or interrupted."""
        return (self.requests.active_response is None and self.requests.requested_for is None
                and not self.requests.queue and not self.pending_barge_in
                and all(i.state.value in ("played", "truncated", "received") for i in self.playout.items.values())
                and not self.tools.calls)


def _strip_audio(ev: Mapping[str, Any]) -> dict[str, Any]:
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
    return dict(ev)


def _cut_transcript(text: str, played_ms: int, received_ms: int) -> str:
    """The part of ``text`` the listener heard, assuming words spread evenly over the audio."""
    if received_ms <= 0 or played_ms >= received_ms:
        return text
    words = text.split()
    return " ".join(words[:int(len(words) * played_ms / received_ms)])


def response_options(body: Mapping[str, Any], topic: str) -> dict[str, object]:
    """A command's ``response`` options, checked by name and as JSON (they go into ``response.create``);
    ValueError naming what is wrong."""
    options = check_response_options(body.get("response"))
    check_json(options, f"{topic} 'response'")
    return options


def restore_tools(tools: Tools, raws: Any) -> list[Action]:
    """A predecessor's registrations (``cmd.tool.register`` bodies) registered again; one that is
    refused now (a bad timeout, parameters JSON cannot carry) is left out and reported."""
    acts: list[Action] = []
    for raw in raws if isinstance(raws, list) else []:
        try:
            tools.register(parse_registration(raw))
        except (ValueError, TypeError, AttributeError) as exc:
            name = raw.get("name") if isinstance(raw, Mapping) else None
            acts.append(Publish("engine.error", {"source": "engine", "code": "bad_state", "message":
                                f"the predecessor's tool {name!r} is left out: {exc}"}))
    return acts


def registration(spec: ToolSpec) -> dict[str, Any]:
    """A registered tool as its ``cmd.tool.register`` body (the published state carries it)."""
    return {"name": spec.name, "description": spec.description, "parameters": spec.parameters,
            "owner": spec.owner, "timeout_s": spec.timeout_s}

"""The GPT-Live core: one engine session on OpenAI's full-duplex voice API, without I/O.

GPT-Live (``/v1/live/sessions``, models ``gpt-live-1`` and ``gpt-live-1.1``) is a second protocol
beside Realtime, not a dialect of it (live-protocol.md). This core takes the same input records
and returns the same actions as :class:`~engine.realtime.core.RealtimeCore`, so the same I/O
shell drives either: ``handle(record, now_s, heard_index)`` -> actions.

Rules:
- The session is DISCONNECTED, STARTING (the socket is open and ``session.start`` sent), ACTIVE
  (``session.started`` came), CLOSING (we sent ``session.close``: the budget is spent), RENEWING
  (we sent ``session.close`` to renew the session before it expires: its ``session.closed``
  reconnects, as an expiry does), ENDING
  (we sent ``session.close`` because the host is ending: a call hung up; its ``session.closed``
  brings the last usage), ENDED (after it, or after the server closed the session for good:
  CLOSED_FOR_GOOD_REASONS, ``content`` or ``close_requested`` by another client; like SPENT, no
  session starts again; any other reason reconnects), SPENT
  (the budget's session has closed: no session starts again, a socket that opens anyway is sent
  nothing, and the host ends) or REFUSED (an ``error`` before ``session.started``: the session
  could not start, so nothing is sent any more and the process stops). REFUSED, SPENT and a
  session the server closed for good publish one ``engine.error`` with ``fatal``: the engine
  stops on it, a phone call ends (only that call).
  The transitions are :data:`TRANSITIONS`; any other is a :class:`LiveStateError`.
- A socket that opens starts a new session: ``session.start`` carries the model, the
  instructions, the voice, the audio format and the conversation so far as its text ``input``
  (the newest messages: at most :data:`INPUT_MESSAGES`, and :data:`INPUT_TOKENS` by estimate).
  A Live session cannot be resumed, so a reconnect is a new session told what was said. Context
  the old session never placed waits for the new one, after the history; a delegation ends with
  its session, so its result goes to the next as plain commentary.
- A session is renewed before it expires. From RENEW_BEFORE_S before its ``expires_at`` (placed
  on the monotonic clock with ``wall_clock`` at ``session.started``), and never before the
  session is RENEW_MIN_AGE_S old, the first quiet moment closes it with ``session.close``, and a
  new session starts with the conversation. Quiet: neither the mic (RMS over MIC_SPEECH_RMS, or
  MIC_OVER_FLOOR_DB over its least RMS of MIC_FLOOR_WINDOW_S, whichever is louder) nor the model
  audible for RENEW_QUIET_S, no open turn, no reply awaited (up to RENEW_REPLY_WAIT_S), no
  delegation, no context waiting. The mic goes to the closing session until its
  ``session.closed`` (silence, if muted meanwhile). With no quiet moment (a mic whose level
  never falls to its floor: a television talking) the session expires as before and is renewed
  then. A budget the renewal's last usage reaches ends it as SPENT; the host's end during a
  renewal waits for its close (RENEWING -> ENDING).
- Nothing but ``session.start`` is sent before ``session.started``. Commands that need the
  session (context appends, mute) wait in order and go out after it: after the history, always.
- The mic streams continuously: the session clock advances only with input audio, and text sent
  while no audio flows is never placed. With no mic (text only, or a file that ended) the core
  sends silence in its place after ``keepalive_s`` without audio (:data:`KEEPALIVE_S`; a host whose
  mic comes over a network, a phone call, sets it longer: :data:`NETWORK_KEEPALIVE_S`), then every
  KEEPALIVE_S until mic audio comes again, so the session's clock keeps real time.
- Output audio is one continuous track, silence included: every delta is played, the first of
  a session starts a stream, and the stream ends only when the session does. There is nothing to
  truncate and no barge-in to make: the model yields by itself.
- Context: ``cmd.say`` with role ``system`` is silent context (``session.thinking.append``);
  ``cmd.instructions`` and ``cmd.commentary`` append instructions and something the model says in
  its own words. Each is done (``cmd.done``) when the server places it on the timeline
  (``*.appended``), or refused with the server's error.
- Commands are taken once, as the Realtime core takes them (by ``id``, else publisher and
  ``seq``; the broker acked them on ``cmd.ack`` and holds them until taken): a command that changed
  the state a successor starts from is let go with that state (``conversation.history``: the
  conversation, the context not yet placed, the tools, the mic gate, the keys taken), any other
  with ``intake.taken``. A restarted realtime process starts from that state. A ``cmd.*`` Live cannot do (a user text
  message, a response on demand, cancel, commit) is refused at once, naming the Live alternative.
- Delegation: the model hands a task to the application (``session.delegation.created``, no task
  text). The core routes it to a tool registered on the bus (:func:`pick_tool`) as a ``tool.call``
  whose arguments carry the user's words since the previous delegation; the tool's
  ``cmd.tool.result`` goes back as ``session.commentary.append`` with that delegation id, and the
  model says it. With no tool, or none in time, the model is told so (it holds the conversation
  until a delegation says something).
- Transcripts are grouped into turns (:mod:`~engine.realtime.live_turns`) and published as
  ``user.transcript.*`` and ``model.transcript.*``; each raw fragment also goes out on
  ``live.transcript.fragment``.
- ``latency.turn`` runs from the end of the user's speech to the reply's first audible sample
  heard. The server answers as soon as its turn ends, often before the engine's grouper closes
  the user's turn, so the track's recent onsets (a first audible sample after a silent delta)
  are kept with when they came (:data:`ONSET_MEMORY_S`): the reply's is the first that came
  after the speech ended, whether before or after the turn closed.
- Cost is the cumulative seconds of ``session.usage.updated`` at the model's per-minute price
  (across sessions of one engine: each new session's seconds add to the earlier ones'; a
  restarted realtime process takes its predecessor's as earlier ones). At the budget the session
  is closed.
- A sideband's session outlives its socket (a SIP call's ``/attach``): a socket drop ends neither
  the session's cumulative usage, nor the context it was sent, nor its delegations; the next
  socket attaches to the same session.
- ``cmd.dtmf`` sends one ``transport.dtmf.send`` a key; it is done when every key reached the
  trunk, and fails (once) at the first key the server refuses.
- A handler computes first and changes state last; one that raises is reported
  (``engine.error`` ``handler_failed``) and the conversation goes on.
"""
from __future__ import annotations

import base64
import enum
import json
import math
import re
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np

from engine.codec import g711_table
from engine.cost import live_cost_usd, live_prices
from engine.errors import ConfigError, EngineError
from bus.wire import COMMAND_TOPICS, DONE_TOPIC, STATE_TOPIC
from engine.realtime.core import TAKEN_PUBLISHED, new_id as default_new_id, registration, restore_tools
from engine.realtime.live_turns import Speaker, TurnEvent, TurnGrouper
from engine.realtime.taken import TakesCommandsOnce, check_json, json_problem
from engine.realtime.records import (API_RATE_HZ, AUDIO_FORMATS, Action, Command, Connected, Disconnected, EndOfAudio,
                                     Input, MicAudio, PlaybackReport, Play, Publish, Reconnect, Send, SendAudio,
                                     ServerEvent, Tick, Ending)
from engine.realtime.tools import Tools, parse_registration
from engine.realtime.turns import InputClock

LIVE_MODELS = ("gpt-live-1", "gpt-live-1.1")
#: at most this many messages of history in ``session.start``'s ``input`` (the API's limit)
INPUT_MESSAGES = 128
#: the API also limits ``input`` to 8,192 rendered tokens; the core sends at most this many by its
#: estimate (4 characters a token, INPUT_MESSAGE_TOKENS more a message), so the rendering's own
#: tokens and the estimate's error fit in the rest. A start over the limit is refused, and the
#: conversation would be lost with the session
INPUT_TOKENS = 6144
INPUT_MESSAGE_TOKENS = 8
#: the session settings GPT-Live lets a running session change (``session.update``)
UPDATABLE = ("delegation", "triggers")
#: a context append is at most 500 tokens; refused locally past this estimate (4 characters a token)
APPEND_MAX_TOKENS = 500
#: with no mic audio for this long, silence is sent in its place (the session clock needs audio)
KEEPALIVE_S = 0.1
#: a session is renewed at the first quiet moment this long before its ``expires_at``: at the
#: expiry itself the model is cut mid-sentence, and what the user says meanwhile is lost
RENEW_BEFORE_S = 120.0
#: a renewal due at a moment that is not quiet is looked at again this often
RENEW_CHECK_S = 0.5
#: never renewed younger than this (a short session, or a local clock ahead of the server's,
#: would otherwise be renewed again and again as soon as each started)
RENEW_MIN_AGE_S = 60.0
#: a quiet moment: neither the mic nor the model audible for this long
RENEW_QUIET_S = 1.0
#: the mic is audible above this RMS (int16; -40 dBFS, the local server's VAD's threshold): a
#: room's noise stays under it, speech does not (the model's output is judged by SILENCE_PEAK,
#: since its silence is digital)
MIC_SPEECH_RMS = 328.0
#: ...or over the mic's own noise floor by this much, whichever is louder: a fan or a street over
#: -40 dBFS is steady, a talker over it is not (a speech detector's usual margin over the floor)
MIC_OVER_FLOOR_DB = 6.0
#: the mic's noise floor is the least chunk RMS over this long: a talker's pauses between syllables
#: fall to the room's level well within it
MIC_FLOOR_WINDOW_S = 3.0
#: a reply the model has not begun this long after the user's turn is not waited for (it may
#: choose not to answer)
RENEW_REPLY_WAIT_S = 5.0
#: the reasons a server's ``session.closed`` ends the conversation for good (a new session would
#: meet the same, or go against another client that closed it); any other reason reconnects
CLOSED_FOR_GOOD_REASONS = frozenset({"content", "close_requested"})
#: the same for a mic that comes over a network (a phone's media stream, which never stops while
#: the call is up): its frames can be late by more than KEEPALIVE_S, and silence sent in their
#: place would split the caller's words and move the session's timeline ahead of the call
NETWORK_KEEPALIVE_S = 1.0
#: a keepalive due now is sent even when ``now - last`` rounds a little under KEEPALIVE_S
KEEPALIVE_SLACK_S = 0.001
#: a host that is ending (a call hung up, the engine stopping) waits this long for its session's
#: close to bring the last usage. The server drains delegations and output first (up to ~10 s), but
#: the wait, then the socket's close (up to 2 s), must end inside the supervisor's 3 s stop grace
SESSION_CLOSE_WAIT_S = 1.0
#: at most this much silence is sent at once (a long stall is not made up)
KEEPALIVE_MAX_S = 0.5
#: the track's onsets are kept this long: a user's turn closes well within it after its reply began
ONSET_MEMORY_S = 5.0
#: output samples whose peak is below this are silence (the track carries digital silence between turns)
SILENCE_PEAK = 64
#: Live voices (openai.types.live BuiltInVoice); any other string is passed through as a custom voice
LIVE_VOICES = ("alloy", "ash", "ballad", "beacon", "bossa", "cedar", "cinder", "coral", "delta", "echo", "gleam",
               "marin", "meridian", "quartz", "ripple", "sage", "shida", "shimmer", "stone", "tempo", "verse",
               "vesper", "willow")
#: session.closed reasons after which a new session is opened (the conversation goes on)
RENEW_REASONS = frozenset({"expired", "connection_lost"})
#: what Live offers in place of each Realtime command it cannot do
NOT_ON_LIVE = {
    "cmd.respond": "GPT-Live decides by itself when to speak; to make it say something send cmd.commentary "
                   "(it says it in its own words)",
    "cmd.cancel": "GPT-Live yields by itself when the user talks over it; there is nothing to cancel "
                  "(cmd.mic with open: false mutes the user instead)",
    "cmd.input.commit": "GPT-Live has no input buffer: the mic streams continuously and the model decides "
                        "when the user's turn ends",
    "cmd.input.clear": "GPT-Live has no input buffer to clear",
}
USER_TEXT_REFUSED = ("GPT-Live takes no user text message: speak to it, or send context with cmd.say role "
                     "system (silent context), cmd.instructions or cmd.commentary (the model says it in its "
                     "own words)")
LIVE_COMMAND_TOPICS = COMMAND_TOPICS


class LiveState(enum.Enum):
    DISCONNECTED = "disconnected"
    STARTING = "starting"
    ACTIVE = "active"
    CLOSING = "closing"
    RENEWING = "renewing"
    ENDING = "ending"
    ENDED = "ended"
    SPENT = "spent"
    REFUSED = "refused"


S = LiveState
#: (state, what happened) -> next state
TRANSITIONS: dict[tuple[LiveState, str], LiveState] = {
    (S.DISCONNECTED, "connected"): S.STARTING,
    (S.DISCONNECTED, "attached"): S.ACTIVE,              # a sideband: the session already runs
    (S.ACTIVE, "session.started"): S.ACTIVE,             # a sideband's replay of it
    (S.STARTING, "session.started"): S.ACTIVE,
    (S.STARTING, "error"): S.REFUSED,
    (S.STARTING, "disconnected"): S.DISCONNECTED,
    (S.ACTIVE, "close"): S.CLOSING,
    (S.ACTIVE, "session.closed"): S.DISCONNECTED,
    (S.ACTIVE, "disconnected"): S.DISCONNECTED,
    (S.ACTIVE, "renew"): S.RENEWING,
    (S.RENEWING, "session.closed"): S.DISCONNECTED,
    (S.RENEWING, "disconnected"): S.DISCONNECTED,
    (S.RENEWING, "end"): S.ENDING,
    (S.RENEWING, "budget spent"): S.SPENT,
    (S.ACTIVE, "end"): S.ENDING,
    (S.ACTIVE, "closed for good"): S.ENDED,
    (S.ENDING, "session.closed"): S.ENDED,
    (S.ENDING, "disconnected"): S.ENDED,
    (S.ENDED, "disconnected"): S.ENDED,
    (S.ENDED, "connected"): S.ENDED,                     # a socket opened before the host's stop: nothing is sent
    (S.CLOSING, "session.closed"): S.SPENT,
    (S.CLOSING, "disconnected"): S.SPENT,
    (S.SPENT, "disconnected"): S.SPENT,
    (S.SPENT, "connected"): S.SPENT,                     # a socket the link opened anyway: nothing is sent
    (S.DISCONNECTED, "disconnected"): S.DISCONNECTED,
    (S.REFUSED, "disconnected"): S.REFUSED,
}


class LiveStateError(EngineError):
    """An illegal session transition (a bug: the table above is the contract)."""


def check_live_model(model: str) -> None:
    """Raise :class:`ConfigError` unless ``model`` is a priced GPT-Live model."""
    try:
        live_prices(model)
    except KeyError:
        raise ConfigError(f"model {model!r} is not a GPT-Live model with a price in engine/pricing.json; "
                          f"GPT-Live models: {', '.join(LIVE_MODELS)}") from None


@dataclass
class Append:
    """A context append sent or waiting: which command asked for it, and what it said."""
    kind: str                 #: instructions, thinking, commentary
    content: str
    cmd_id: str | None
    delegation_id: str | None = None
    event_id: str = ""


@dataclass
class Delegation:
    delegation_id: str
    tool: str | None
    request: str
    deadline_s: float


def pick_tool(tools: Tools, request: str) -> str | None:
    """The registered tool a delegation goes to: the only one, else the one whose name and
    description share the most words with the request (ties: the first registered)."""
    specs = list(tools.registered.values())
    if len(specs) <= 1:
        return specs[0].name if specs else None
    words = set(_words(request))

    def score(spec: Any) -> int:
        return len(words & set(_words(spec.name.replace("_", " ") + " " + spec.description)))
    best = max(specs, key=score)
    return best.name


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2]


def tool_arguments(spec_parameters: Mapping[str, Any], request: str) -> dict[str, Any]:
    """A delegation's arguments: ``request`` (the user's words since the previous delegation), and
    the same text as each required string parameter the tool declares (a delegation names no
    arguments of its own)."""
    args: dict[str, Any] = {"request": request}
    props = spec_parameters.get("properties") or {}
    for name in spec_parameters.get("required") or []:
        if (props.get(name) or {}).get("type", "string") == "string":
            args[name] = request
    props_known = set(props)
    if props_known and "request" not in props_known and spec_parameters.get("additionalProperties") is False:
        del args["request"]
    return args


class LiveCore(TakesCommandsOnce):
    """State of one engine session on GPT-Live. ``handle(record, now_s, heard_index)`` -> actions."""

    def __init__(self, model: str, session_config: Mapping[str, Any], *, start_index: int = 0,
                 budget_usd: float | None = None, new_id: Callable[[str], str] = default_new_id,
                 audio_format: str = "audio/pcm", barge_in: bool = True, min_speech_ms: int = 0,
                 sideband: bool = False, wall_clock: Callable[[], float] = time.time) -> None:
        """``barge_in`` and ``min_speech_ms`` are the Realtime core's; GPT-Live yields by itself, so
        they are taken (one constructor for both backends) and have no effect. ``sideband``: attached
        to a running session (a SIP call's ``/attach``). ``wall_clock``: epoch seconds, read once a
        session, to place its ``expires_at`` on the monotonic clock the records carry."""
        check_live_model(model)
        if audio_format not in AUDIO_FORMATS:
            raise ConfigError(f"audio_format {audio_format!r} is not one of {', '.join(AUDIO_FORMATS)}")
        self.audio_format = AUDIO_FORMATS[audio_format]
        self.model = model
        self.session_config: dict[str, Any] = dict(session_config)
        #: the UPDATABLE settings the server last took (at a session's start, or a session.updated):
        #: a refused session.update falls back to them, with the updates still in flight over them
        self.confirmed_updatable: dict[str, Any] = {k: v for k, v in session_config.items() if k in UPDATABLE}
        self.update_sets: dict[str, dict[str, Any]] = {}   #: session.update event id -> the settings it sets
        #: attached to a running session (a SIP call's ``/attach``): no session.start, no audio either
        #: way (the audio is on the SIP leg), DTMF both ways
        self.sideband = sideband
        self.keepalive_s = KEEPALIVE_S   #: silence goes in after this long without mic audio (rules)
        self.keepalive_on = False        #: silence is going in (every KEEPALIVE_S, until mic audio comes)
        self.wall_clock = wall_clock
        #: the session's renewal before its expiry: from when a quiet moment renews it (monotonic)
        self.renew_from_s: float | None = None
        self.last_loud_s: float | None = None   #: when the mic or the model was last audible (near a renewal)
        #: the mic's chunk RMS near a renewal, (captured at, RMS), a monotonic queue: its front is the floor
        self.mic_floor: deque[tuple[float, float]] = deque()
        self.per_minute_usd = live_prices(model)["per_minute"]
        self.budget_usd = budget_usd
        self.new_id = new_id
        self.state = LiveState.DISCONNECTED
        self.session_id: str | None = None
        self.session: dict[str, Any] = {}
        self.sessions = 0
        self.earlier_seconds = 0          #: billed seconds of this engine's earlier sessions
        self.earlier_usd = 0.0            #: and their dollars
        self.session_usage: dict[str, Any] = {}   #: the current session's cumulative usage
        self.budget_warned = False
        self.budget_told = False         #: engine.budget exceeded went out for a renewal that reached it
        self.history: list[dict[str, Any]] = []          #: Live input messages to give a new session
        self.waiting: list[Append] = []                  #: appends not yet sent (no active session)
        self.sent: dict[str, Append] = {}                #: event id -> append sent, not yet placed
        self.mute_acks: list[tuple[str, str | None]] = []  #: (event id, command id) mute/unmute sent
        self.sent_updates: dict[str, str] = {}           #: session.update event id -> command id
        self.session_updates = 0                         #: cmd.session.updates taken (the state's mark)
        self.mic_open = True
        self.tools = Tools()
        self.delegations: dict[str, Delegation] = {}
        #: appends the closing session said it will not place (``context_injection_incomplete``):
        #: the next session's if the close renews, failed if not (decided at ``session.closed``)
        self.unplaced: dict[str, Append] = {}
        self.said_since_delegation: list[str] = []       #: the user's words since the previous delegation
        self.grouper = TurnGrouper(new_id)
        self.clock = InputClock()
        self.last_audio_s: float | None = None           #: when audio last went to the socket
        self.start_index = start_index
        self.written_frames = start_index               #: speaker-ring index after the track so far
        self.stream_open = False
        self.stream_start_index = start_index
        #: user turns ended, waiting for the model's first audible sample: (turn id, speech end s)
        self.awaiting_reply: tuple[str, float | None] | None = None
        self.reply_at_index: tuple[str, float | None, int] | None = None
        #: the track's recent onsets: (when the delta came, s; ring index of its first audible sample)
        self.onsets: list[tuple[float, int]] = []
        self.last_delta_silent = True
        self.errors = 0
        self.malformed_commands = 0
        self.handler_failures = 0
        self.taken: OrderedDict[str, str | None] = OrderedDict()   #: keys of the commands taken (de-duplication)
        self.outcomes: OrderedDict[str, Mapping[str, Any]] = OrderedDict()   #: command id -> its cmd.done
        self.core_id = new_id("core")                        #: names this core's state messages
        self.state_seq = 0
        #: transport.dtmf.send event id -> the cmd.dtmf it is a key of (every key's: the command is done
        #: when the last of them reached the trunk, failed at the first error)
        self.sent_dtmf: dict[str, str] = {}
        self._server_handlers: dict[str, Callable[[Mapping[str, Any], float, int], list[Action]]] = {
            "session.started": self._on_started,
            "session.updated": self._on_updated,
            "session.closed": self._on_closed,
            "error": self._on_error,
            "session.output_audio.delta": self._on_audio_delta,
            "session.input_transcript.delta": self._on_input_transcript,
            "session.output_transcript.delta": self._on_output_transcript,
            "session.instructions.appended": self._on_appended,
            "session.thinking.appended": self._on_appended,
            "session.commentary.appended": self._on_appended,
            "session.input_audio.muted": self._on_muted,
            "session.input_audio.unmuted": self._on_muted,
            "session.delegation.created": self._on_delegation,
            "session.usage.updated": self._on_usage,
            "transport.dtmf.received": self._on_dtmf,
            "transport.dtmf.sent": self._on_dtmf,
        }
        self._commands: dict[str, Callable[[Mapping[str, Any], float, int], list[Action]]] = {
            "cmd.say": self._cmd_say,
            "cmd.instructions": self._cmd_instructions,
            "cmd.commentary": self._cmd_commentary,
            "cmd.mic": self._cmd_mic,
            "cmd.session.update": self._cmd_session_update,
            "cmd.tool.register": self._cmd_tool_register,
            "cmd.tool.unregister": self._cmd_tool_unregister,
            "cmd.tool.result": self._cmd_tool_result,
            "cmd.dtmf": self._cmd_dtmf,
            "engine.presence.gone": self._presence_gone,
        }

    # ================================================================ dispatch
    def handle(self, rec: Input, now_s: float, heard_index: int) -> list[Action]:
        """Apply one input record. Never raises: a failing handler is reported."""
        try:
            if isinstance(rec, MicAudio):
                self.keepalive_on = False
                acts = self._mic(rec)
            elif isinstance(rec, ServerEvent):
                acts = self._server_event(rec.event, now_s, heard_index)
            elif isinstance(rec, Command):
                acts = self._command(rec.topic, rec.body, now_s, heard_index, rec.offered)
            elif isinstance(rec, PlaybackReport):
                acts = self._report(rec)
            elif isinstance(rec, Ending):
                acts = self._ending()
            elif isinstance(rec, Tick):
                acts = self._tick(now_s)
            elif isinstance(rec, Connected):
                acts = self._connected(rec, now_s)
            elif isinstance(rec, Disconnected):
                acts = self._disconnected(rec, now_s)
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
        acts = acts + self._heard(now_s, heard_index)
        if not isinstance(rec, MicAudio):
            acts = self._note_outcomes(acts)
        return acts

    def _move(self, what: str) -> None:
        nxt = TRANSITIONS.get((self.state, what))
        if nxt is None:
            raise LiveStateError(f"GPT-Live session: {what!r} is not allowed in state {self.state.value}")
        self.state = nxt

    @property
    def protocol_refused(self) -> bool:
        return self.state is LiveState.REFUSED

    # ================================================================ connection
    def start_event(self) -> dict[str, Any]:
        """``session.start`` for a new session: config plus the conversation so far."""
        cfg = self.session_config
        output = (cfg.get("audio") or {}).get("output") or {}
        voice = output.get("voice") or cfg.get("voice")
        fmt = self.audio_format
        audio: dict[str, Any] = {"format": {"type": fmt.name, "rate": fmt.rate_hz}}
        if voice:
            audio["output"] = {"voice": voice}
        session: dict[str, Any] = {"model": self.model, "audio": audio}
        if cfg.get("instructions"):
            session["instructions"] = cfg["instructions"]
        history = newest_within_limits(self.history)
        if history:
            session["input"] = [dict(m) for m in history]
        for key in ("delegation", "triggers", "store", "safety_identifier"):
            if cfg.get(key) is not None:
                session[key] = cfg[key]
        return {"type": "session.start", "event_id": self.new_id("event"), "session": session}

    def _connected(self, rec: Connected, now_s: float) -> list[Action]:
        if self.state in (LiveState.SPENT, LiveState.ENDED):
            self._move("connected")
            return []
        if self.sideband:   # the session runs already: never session.start on /attach
            self._move("attached")
            self.sessions += 1
            return [Publish("engine.status", {"state": "connected", "session_id": self.session_id,
                                              "model": self.model, "api": "live", "sideband": True}),
                    *self._activated()]
        event = self.start_event()
        self._move("connected")
        self.clock.reset()
        self.last_audio_s = None
        self.sessions += 1
        acts: list[Action] = [Send(event)]
        if self.sessions > 1 or rec.reconnect:
            acts.append(Publish("engine.status", {"state": "reconnected", "reason": rec.reason,
                                                  "history_items": len(event["session"].get("input", []))}))
        return acts

    def _disconnected(self, rec: Disconnected, now_s: float) -> list[Action]:
        if self.state in (LiveState.REFUSED, LiveState.SPENT, LiveState.ENDED):
            if self.state is not LiveState.REFUSED:
                self._move("disconnected")
            return []
        # the budget's close cut short by the socket, or a renewal's whose usage reached the budget
        spent = self.state is LiveState.CLOSING or self._renewal_spent()
        acts: list[Action] = [Publish("engine.status", {"state": "disconnected", "close_code": rec.code,
                                                        "reason": rec.reason})]
        # a sideband's session outlives its socket (the call goes on): the next socket attaches to it
        acts.extend(self._session_over("disconnected", ended=not self.sideband))
        if spent:
            acts.append(self._spent())
        self._move("budget spent" if spent and self.state is LiveState.RENEWING else "disconnected")
        return acts

    def _renewal_spent(self) -> bool:
        """A renewal under way whose usage has reached the budget: nothing reopens."""
        return self.state is LiveState.RENEWING and self.budget_usd is not None \
            and self.total_usd() >= self.budget_usd

    def _ending(self) -> list[Action]:
        """The host is ending: close an active session of our own for its final usage."""
        if self.state is LiveState.RENEWING:   # its session.close is out: wait for it, and reopen nothing
            self._move("end")
            return []
        if self.state is not LiveState.ACTIVE or self.sideband:   # a sideband's session is the call's
            return []
        self._move("end")
        return [Send({"type": "session.close", "event_id": self.new_id("event")})]

    @property
    def ending(self) -> bool:
        """A ``session.close`` for the host's end is out and its ``session.closed`` not yet in."""
        return self.state is LiveState.ENDING

    def _spent(self) -> Publish:
        """The one fatal error of a spent budget: the host ends (the engine, a phone call)."""
        return Publish("engine.error", {"source": "engine", "code": "budget_exceeded", "fatal": True,
                                        "message": f"budget_usd reached (${self.total_usd():.4f} of "
                                                   f"${self.budget_usd or 0.0:.4f}): the GPT-Live session is closed "
                                                   "and no new one starts; raise budget_usd to go on"})

    def _session_over(self, reason: str, ended: bool = True) -> list[Action]:
        """What a session's end settles: turns close, the track ends, unplaced appends wait for the
        next session, delegations die with it (a result still to come, or one waiting, goes to the
        next session as plain commentary: the new session knows no delegation id of the old), its
        usage becomes an earlier session's. ``ended`` False: only the socket ended (a sideband's: the
        session goes on and the next socket attaches to it), so only turns, the track and the mute
        acks are settled; what was sent, the delegations and the session's cumulative usage stay."""
        acts: list[Action] = []
        for ev in self.grouper.close_all(reason):
            acts.extend(self._turn_event(ev, None))
        if self.stream_open:
            self.stream_open = False
            acts.append(EndOfAudio())
        if not ended:
            return acts + self._mute_acks_on_reconnect()
        self.waiting[:0] = [*self.unplaced.values(), *self.sent.values()]
        self.sent.clear()
        self.unplaced.clear()
        for app in self.waiting:
            app.delegation_id = None
        self.delegations.clear()
        acts.extend(self._mute_acks_on_reconnect())
        # session updates the old session never confirmed: the next session.start carries them
        acts.extend(Publish(DONE_TOPIC, {"id": cmd_id, "ok": True, "applied": "on start"})
                    for cmd_id in self.sent_updates.values())
        self.sent_updates.clear()
        self.update_sets.clear()       # in session_config: the next session.start carries them
        self.earlier_seconds += self.session_seconds
        self.earlier_usd += live_cost_usd(self.model, self.session_usage)
        self.session_usage = {}
        self.awaiting_reply = None
        self.reply_at_index = None
        return acts

    def _mute_acks_on_reconnect(self) -> list[Action]:
        """Mutes sent and not confirmed: done, the next session (or socket) gets the gate as it is."""
        acts: list[Action] = [Publish(DONE_TOPIC, {"id": cmd_id, "ok": True, "applied": "on reconnect"})
                              for _, cmd_id in self.mute_acks if cmd_id]
        self.mute_acks.clear()
        return acts

    # ================================================================ server events
    def _server_event(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        etype = ev.get("type")
        if not isinstance(etype, str):
            return [Publish("engine.error", {"source": "api", "code": "unknown_server_event",
                                             "message": "a server event without a 'type'; ignored"})]
        acts: list[Action] = []
        if etype not in ("session.output_audio.delta", "session.input_audio.append"):   # audio: not the bus's
            acts.append(Publish("server." + etype, dict(ev)))
        handler = self._server_handlers.get(etype)
        if handler is not None:
            acts.extend(handler(ev, now_s, heard))
        return acts

    def _on_started(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        session = dict(ev.get("session") or {})
        replay = self.state is LiveState.ACTIVE     # a sideband's replay: nothing to start
        self._move("session.started")
        self.session_id, self.session = session.get("id"), session
        if replay:
            return [Publish("session.config", {"session": session})]
        # session.start carried every setting: the server took them
        self.confirmed_updatable = {k: v for k, v in self.session_config.items() if k in UPDATABLE}
        expires_at = session.get("expires_at")
        self.renew_from_s = None
        self.mic_floor.clear()
        if isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool) and not self.sideband:
            left_s = float(expires_at) - self.wall_clock()
            self.renew_from_s = now_s + max(RENEW_MIN_AGE_S, left_s - RENEW_BEFORE_S)
        acts: list[Action] = [Publish("engine.status", {"state": "connected", "session_id": self.session_id,
                                                        "model": self.model, "api": "live"}),
                              Publish("session.config", {"session": session})]
        return acts + self._activated()

    def _activated(self) -> list[Action]:
        """The session takes commands: what waited goes out, in order."""
        acts: list[Action] = []
        waiting, self.waiting = self.waiting, []
        for app in waiting:
            acts.extend(self._send_append(app))
        if not self.mic_open:
            acts.append(self._send_mute(False, None))
        # a sideband's socket dropped with updates unconfirmed (the session went on): sent again
        for old_id, sets in list(self.update_sets.items()):
            event_id = self.new_id("event")
            self.update_sets[event_id] = self.update_sets.pop(old_id)
            if old_id in self.sent_updates:
                self.sent_updates[event_id] = self.sent_updates.pop(old_id)
            acts.append(Send({"type": "session.update", "event_id": event_id, "session": dict(sets)}))
        return acts

    def _on_updated(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        self.session = dict(ev.get("session") or {})
        acts: list[Action] = [Publish("session.config", {"session": self.session})]
        cmd_id = ev.get("client_event_id")
        owner = self.sent_updates.pop(cmd_id, None) if isinstance(cmd_id, str) else None
        sets = self.update_sets.pop(cmd_id, None) if isinstance(cmd_id, str) else None
        if sets is not None:
            self.confirmed_updatable.update(sets)
        if owner:
            acts.append(Publish(DONE_TOPIC, {"id": owner, "ok": True}))
        if sets is not None or owner:
            acts.append(self.history_message())   # no longer in flight
        return acts

    def _on_closed(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        reason = str(ev.get("reason") or "")
        acts = self._usage(ev.get("usage"))
        acts.append(Publish("engine.status", {"state": "session_closed", "reason": reason,
                                              "session_id": self.session_id}))
        spent_renewing = self._renewal_spent()   # the renewal's last usage reached the budget
        renewing = ((reason in RENEW_REASONS and self.state is LiveState.ACTIVE) or self.state is LiveState.RENEWING) \
            and not spent_renewing
        unplaced = {**self.unplaced, **self.sent}          # in the order they were sent
        self.unplaced.clear()
        if renewing:   # what was sent waits for the next session (_session_over)
            self.sent = unplaced
        else:          # never placed on the timeline, and no session comes to place it
            for app in unplaced.values():
                if app.cmd_id:
                    acts.append(Publish(DONE_TOPIC, {"id": app.cmd_id, "ok": False,
                                                    "code": "context_injection_incomplete",
                                                    "error": "the session closed before this context was placed"}))
            self.sent.clear()
        acts.extend(self._session_over("session_closed"))
        if self.state is LiveState.CLOSING:   # the budget's close: the last usage is in, nothing reopens
            acts.append(self._spent())
        elif spent_renewing:
            acts.append(self._spent())
            self._move("budget spent")
            return acts
        elif renewing:
            acts.append(Reconnect("session renewed before it expired" if self.state is LiveState.RENEWING
                                  else f"session {reason}"))
        elif self.state is LiveState.ACTIVE and not self.sideband and reason in CLOSED_FOR_GOOD_REASONS:
            # closed by the server for good (content) or by another client (close_requested): a new
            # session would meet the same, or go against the closer; the host ends
            self._move("closed for good")
            acts.append(Publish("engine.error", {
                "source": "api", "code": "session_closed", "fatal": True, "reason": reason,
                "message": f"GPT-Live closed the session ({reason or 'no reason given'}); a new one is not opened"}))
            return acts
        self._move("session.closed")
        return acts

    def _on_error(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        err = dict(ev.get("error") or {})
        code, message = err.get("code"), str(err.get("message") or "")
        ref = err.get("client_event_id") or ev.get("client_event_id")
        acts: list[Action] = []
        if self.state is LiveState.STARTING:   # an error before session.started: the session did not start
            self._move("error")
            return [Publish("engine.error", {"source": "api", "code": code, "fatal": True, "param": err.get("param"),
                                             "message": f"GPT-Live refused to start the session: {message}"})]
        if code == "context_injection_incomplete" and isinstance(ref, str) and ref in self.sent:
            # the closing session will not place it; whether the next does is known at session.closed
            self.unplaced[ref] = self.sent.pop(ref)
            return []
        self.errors += 1
        app = self.sent.pop(ref, None) if isinstance(ref, str) else None
        owner = app.cmd_id if app else (self.sent_updates.pop(ref, None) if isinstance(ref, str) else None)
        if isinstance(ref, str) and self.update_sets.pop(ref, None) is not None:   # refused: take it back
            config = dict(self.confirmed_updatable)
            for sets in self.update_sets.values():
                config.update(sets)
            for key in UPDATABLE:
                if key in config:
                    self.session_config[key] = config[key]
                else:
                    self.session_config.pop(key, None)
            self.session_updates += 1
            acts.append(self.history_message())   # a successor must not start with the refused setting
        if app is None and owner is None and isinstance(ref, str):
            owner = self._dtmf_failed(ref)
        acts.append(Publish("engine.error", {"source": "api", "code": code, "message": message,
                                             "param": err.get("param"), "event_id": ref, "request_id": owner}))
        if owner:
            acts.append(Publish(DONE_TOPIC, {"id": owner, "ok": False, "error": message, "code": code}))
        return acts

    def _on_audio_delta(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        if self.sideband:
            return []        # the caller hears it on the SIP leg
        try:
            pcm = base64.b64decode(ev["delta"])
        except (ValueError, TypeError, KeyError):
            return [Publish("engine.error", {"source": "api", "code": "bad_audio_delta",
                                             "message": "an undecodable session.output_audio.delta; skipped"})]
        fmt = self.audio_format
        frames = len(pcm) // fmt.bytes_per_frame
        if frames == 0:
            return []
        starts = not self.stream_open
        if starts:
            self.stream_open = True
            self.stream_start_index = self.written_frames
        first = _first_sound(pcm, fmt.name)
        if first is not None:
            self.last_loud_s = now_s
        if first is not None and self.last_delta_silent:
            self.onsets = [o for o in self.onsets if o[0] >= now_s - ONSET_MEMORY_S] + [(now_s, self.written_frames + first)]
        if self.awaiting_reply is not None and self.reply_at_index is None and first is not None:
            turn_id, speech_end_s = self.awaiting_reply
            self.reply_at_index = (turn_id, speech_end_s, self.written_frames + first)
            self.awaiting_reply = None
        self.last_delta_silent = first is None
        self.written_frames += frames
        return [Play(pcm, starts_item=starts, response_id=self.session_id or "", continuous=True)]

    def _on_input_transcript(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        return self._fragment(Speaker.USER, ev, now_s)

    def _on_output_transcript(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        return self._fragment(Speaker.MODEL, ev, now_s)

    def _fragment(self, speaker: Speaker, ev: Mapping[str, Any], now_s: float) -> list[Action]:
        text = ev.get("delta")
        start_ms, end_ms = ev.get("start_ms"), ev.get("end_ms")
        if not isinstance(text, str) or not isinstance(start_ms, int) or not isinstance(end_ms, int):
            return [Publish("engine.error", {"source": "api", "code": "bad_transcript_fragment",
                                             "message": f"{ev.get('type')} without a string 'delta' and integer "
                                                        "'start_ms'/'end_ms'; skipped"})]
        acts: list[Action] = [Publish("live.transcript.fragment", {"speaker": speaker.value, "text": text,
                                                                   "start_ms": start_ms, "end_ms": end_ms})]
        for tev in self.grouper.fragment(speaker, text, start_ms, end_ms, now_s):
            acts.extend(self._turn_event(tev, now_s))
        return acts

    def _turn_event(self, tev: TurnEvent, now_s: float | None) -> list[Action]:
        turn = tev.turn
        who = turn.speaker.value
        base = {"turn_id": turn.turn_id, "item_id": turn.turn_id, "start_ms": turn.start_ms, "end_ms": turn.end_ms}
        if tev.kind == "opened":
            if turn.speaker is Speaker.USER:   # the fragments come late: when the speech began, on the capture clock
                return [Publish("user.speech.started", {"turn_id": turn.turn_id, "item_id": turn.turn_id,
                                                        "audio_start_ms": turn.start_ms,
                                                        "audio_start_mono_ns": _mono_ns(self.clock.time_of(turn.start_ms))})]
            return []
        if tev.kind == "fragment":
            if turn.speaker is Speaker.USER:
                self.said_since_delegation.append(tev.fragment)
            return [Publish(f"{who}.transcript.delta", {**base, "text": tev.fragment})]
        # closed
        text = turn.text
        acts: list[Action] = [Publish(f"{who}.transcript.done", {**base, "text": text, "reason": tev.reason})]
        if turn.speaker is Speaker.USER:
            speech_end_s = self.clock.time_of(turn.end_ms)
            acts.append(Publish("user.speech.stopped", {"turn_id": turn.turn_id, "item_id": turn.turn_id,
                                                        "audio_end_ms": turn.end_ms,
                                                        "audio_end_mono_ns": _mono_ns(speech_end_s)}))
            onset = next((i for t, i in self.onsets if speech_end_s is not None and t >= speech_end_s), None)
            if onset is None:   # the reply has not begun yet: its first audible sample will tell
                self.awaiting_reply, self.reply_at_index = (turn.turn_id, speech_end_s), None
            else:               # it began before the turn closed
                self.awaiting_reply, self.reply_at_index = None, (turn.turn_id, speech_end_s, onset)
        if text:
            role, part = ("user", "input_text") if turn.speaker is Speaker.USER else ("assistant", "output_text")
            acts.append(self._remember({"type": "message", "role": role, "content": [{"type": part, "text": text}]}))
        return acts

    def _on_appended(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        ref = ev.get("client_event_id")
        app = self.sent.pop(ref, None) if isinstance(ref, str) else None
        if app is None:
            return []
        placed = {"start_ms": ev.get("start_ms"), "end_ms": ev.get("end_ms")}
        acts: list[Action] = []
        if app.cmd_id:
            acts.append(Publish(DONE_TOPIC, {"id": app.cmd_id, "ok": True, **placed}))
        acts.append(Publish("live.context", {"kind": app.kind, "text": app.content, "request_id": app.cmd_id,
                                             "delegation_id": app.delegation_id, **placed}))
        if app.kind in ("thinking", "instructions"):
            acts.append(Publish("system.text", {"text": app.content, "request_id": app.cmd_id, "kind": app.kind}))
            acts.append(self._remember({"type": "message", "role": "developer",
                                        "content": [{"type": "input_text", "text": app.content}]}))
        return acts

    def _on_muted(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        ref = ev.get("client_event_id")
        muted = ev.get("type") == "session.input_audio.muted"
        acts: list[Action] = [Publish("input.mic", {"open": not muted})]
        for i, (event_id, cmd_id) in enumerate(self.mute_acks):
            if event_id == ref:
                del self.mute_acks[i]
                if cmd_id:
                    acts.append(Publish(DONE_TOPIC, {"id": cmd_id, "ok": True, "open": not muted}))
                    acts.append(self.history_message())   # no longer in flight
                break
        return acts

    def _on_delegation(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        d = ev.get("delegation") or {}
        did = d.get("id")
        if not isinstance(did, str) or not did:
            return [Publish("engine.error", {"source": "api", "code": "bad_delegation",
                                             "message": "session.delegation.created without a delegation id; ignored"})]
        if d.get("target", "client") != "client":
            return []   # the server runs it (responses, decisions): its events are published as they come
        request = "".join(self.said_since_delegation).strip()
        self.said_since_delegation.clear()
        tool = pick_tool(self.tools, request)
        if tool is None:
            return [Publish("tool.call", {"call_id": did, "name": None, "arguments": json.dumps({"request": request}),
                                          "delegation": True, "registered": False}),
                    *self._send_append(Append("commentary", "No tool is available for that request right now.",
                                              None, did))]
        spec = self.tools.registered[tool]
        self.tools.called(did, tool, now_s)
        self.delegations[did] = Delegation(did, tool, request, now_s + spec.timeout_s)
        return [Publish("tool.call", {"call_id": did, "name": tool,
                                      "arguments": json.dumps(tool_arguments(spec.parameters, request)),
                                      "delegation": True, "request": request, "registered": True,
                                      "offset_ms": ev.get("offset_ms")})]

    def _cost_message(self) -> Publish:
        return Publish("cost.session", {"usd": self.total_usd(), "seconds": self.earlier_seconds + self.session_seconds,
                                        "per_minute_usd": self.per_minute_usd, "context_window": None})

    def _on_usage(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        return self._usage(ev.get("usage"))

    def _usage(self, usage: Any) -> list[Action]:
        if not isinstance(usage, Mapping) or not isinstance(usage.get("seconds"), (int, float)):
            return []
        seconds_before = self.session_seconds
        self.session_usage = dict(usage)
        usd = self.total_usd()
        acts: list[Action] = [self._cost_message()]
        if self.session_seconds != seconds_before:   # the cost a successor starts from (every ~15 s)
            acts.append(self.history_message())
        if self.budget_usd is None:
            return acts
        if usd >= self.budget_usd and self.state is LiveState.RENEWING and not self.budget_told:
            self.budget_told = True   # the renewal's close then ends it as SPENT
            acts.append(Publish("engine.budget", {"usd": usd, "budget_usd": self.budget_usd, "exceeded": True,
                                                  "message": f"budget of ${self.budget_usd:.4f} reached; "
                                                             "the GPT-Live session is closed"}))
        elif usd >= self.budget_usd and self.state is LiveState.ACTIVE:
            self._move("close")
            acts.append(Publish("engine.budget", {"usd": usd, "budget_usd": self.budget_usd, "exceeded": True,
                                                  "message": f"budget of ${self.budget_usd:.4f} reached; "
                                                             "the GPT-Live session is closed"}))
            acts.append(Send({"type": "session.close", "event_id": self.new_id("event")}))
        elif 0.8 * self.budget_usd <= usd < self.budget_usd and not self.budget_warned:
            self.budget_warned = True
            acts.append(Publish("engine.budget", {"usd": usd, "budget_usd": self.budget_usd, "exceeded": False,
                                                  "message": f"80% of the ${self.budget_usd:.4f} budget is spent"}))
        return acts

    # ================================================================ playback reports
    def _report(self, rec: PlaybackReport) -> list[Action]:
        if rec.kind in ("started", "stopped", "underrun"):
            body = {k: v for k, v in rec.body.items() if k not in ("v", "ts", "pub", "seq")}
            return [Publish(f"playout.{rec.kind}", {**body, "item_id": None, "response_id": self.session_id})]
        return []

    def _heard(self, now_s: float, heard_index: int) -> list[Action]:
        """``latency.turn`` once the reply's first audible sample reaches the listener."""
        pending = self.reply_at_index
        if pending is None or heard_index < pending[2]:
            return []
        turn_id, speech_end_s, index = pending
        self.reply_at_index = None
        heard_at_s = now_s - (heard_index - index) / self.audio_format.rate_hz
        payload: dict[str, Any] = {"api": "live", "turn_id": turn_id, "heard_mono_ns": int(heard_at_s * 1e9)}
        if speech_end_s is not None:
            payload["speech_end_mono_ns"] = int(speech_end_s * 1e9)
            payload["speech_end_to_heard_ms"] = round((heard_at_s - speech_end_s) * 1000, 1)
        return [Publish("latency.turn", payload)]

    # ================================================================ mic
    def _mic(self, rec: MicAudio) -> list[Action]:
        if self.state not in (LiveState.ACTIVE, LiveState.CLOSING, LiveState.RENEWING):
            return []   # nothing but session.start before session.started
        fmt = self.audio_format
        renew_from_s = self.renew_from_s
        at_s = rec.captured_at_s
        if renew_from_s is not None and at_s >= renew_from_s - RENEW_QUIET_S - MIC_FLOOR_WINDOW_S \
                and not self.keepalive_on:         # looked at only near a renewal: the mic path stays cheap
            rms, floor = _rms(rec.pcm, fmt.name), self.mic_floor
            while floor and at_s - floor[0][0] > MIC_FLOOR_WINDOW_S:
                floor.popleft()
            while floor and floor[-1][1] >= rms:
                floor.pop()
            floor.append((at_s, rms))
            if at_s >= renew_from_s - RENEW_QUIET_S \
                    and rms > max(MIC_SPEECH_RMS, floor[0][1] * 10 ** (MIC_OVER_FLOOR_DB / 20)):
                self.last_loud_s = at_s
        pcm = rec.pcm
        if self.state is LiveState.RENEWING and not self.mic_open:   # muted since the close: its mute is not sent
            pcm = _silence(fmt.name, len(pcm))
        self.clock.appended(len(pcm) // fmt.bytes_per_frame * API_RATE_HZ // fmt.rate_hz, rec.captured_at_s)
        self.last_audio_s = rec.captured_at_s
        return [SendAudio(pcm)]

    # ================================================================ commands
    def _durable_mark(self) -> tuple[Any, ...]:
        """Changes when the state a successor starts from changes (cheap: lengths and identities)."""
        return (len(self.history), tuple(id(a) for a in self.waiting), tuple(self.sent),
                tuple(id(t) for t in self.tools.registered.values()), self.mic_open, self.session_updates,
                tuple(self.sent_updates), len(self.mute_acks))

    def _no_handler(self, topic: str) -> str:
        if topic in NOT_ON_LIVE:
            return f"{topic} is not available on GPT-Live: {NOT_ON_LIVE[topic]}"
        return f"unknown command topic {topic!r} (known: {', '.join(LIVE_COMMAND_TOPICS)})"

    def _cmd_say(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        role = body.get("role", "user")
        if role != "system":
            raise ValueError(USER_TEXT_REFUSED)
        return self._append("thinking", body)

    def _cmd_instructions(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        return self._append("instructions", body)

    def _cmd_commentary(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        return self._append("commentary", body)

    def _append(self, kind: str, body: Mapping[str, Any]) -> list[Action]:
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{_topic_of(kind)} needs 'text': a non-empty string")
        if len(text) > APPEND_MAX_TOKENS * 4:
            raise ValueError(f"{_topic_of(kind)} 'text' is {len(text)} characters; GPT-Live takes at most "
                             f"{APPEND_MAX_TOKENS} tokens (about {APPEND_MAX_TOKENS * 4} characters) an append: "
                             "split it")
        cmd_id = str(body["id"]) if body.get("id") else None
        if cmd_id and (any(a.cmd_id == cmd_id for a in self.waiting)
                       or any(a.cmd_id == cmd_id for a in self.sent.values())):
            return []   # a client re-sending until it sees the ack
        return self._send_append(Append(kind, text, cmd_id))

    def _send_append(self, app: Append) -> list[Action]:
        if self.state is not LiveState.ACTIVE:
            self.waiting.append(app)
            return []
        app.event_id = self.new_id("event")
        self.sent[app.event_id] = app
        return [Send({"type": f"session.{app.kind}.append", "event_id": app.event_id, "content": app.content,
                      "delegation_id": app.delegation_id})]

    def _cmd_mic(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        """Mute or unmute the user: GPT-Live's own mute (the model hears silence; the clock goes on)."""
        is_open = body.get("open")
        if not isinstance(is_open, bool):
            raise ValueError("cmd.mic needs 'open': true or false")
        self.mic_open = is_open
        cmd_id = str(body["id"]) if body.get("id") else None
        if self.state is not LiveState.ACTIVE:
            return [Publish("input.mic", {"open": is_open})] + self._ack(body, open=is_open, applied="on start")
        return [self._send_mute(is_open, cmd_id)]

    def _send_mute(self, is_open: bool, cmd_id: str | None) -> Send:
        event_id = self.new_id("event")
        self.mute_acks.append((event_id, cmd_id))
        kind = "unmute" if is_open else "mute"
        return Send({"type": f"session.input_audio.{kind}", "event_id": event_id})

    def _cmd_session_update(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        session = body.get("session")
        if not isinstance(session, dict):
            raise ValueError("cmd.session.update needs 'session': a map of session fields")
        check_json(session, "cmd.session.update 'session'")   # it goes into session.update
        fixed = sorted(set(session) - set(UPDATABLE))
        if fixed:
            raise ValueError(f"GPT-Live fixes {', '.join(fixed)} for the session's life; only 'delegation' "
                             "settings and 'triggers' can change (instructions: use cmd.instructions)")
        self.session_config.update(session)
        self.session_updates += 1
        if self.state is not LiveState.ACTIVE:
            return self._ack(body, applied="on start")
        event_id = self.new_id("event")
        self.update_sets[event_id] = dict(session)
        if body.get("id"):
            self.sent_updates[event_id] = str(body["id"])
        return [Send({"type": "session.update", "event_id": event_id, "session": dict(session)})]

    def _cmd_tool_register(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        self.tools.register(parse_registration(body))
        return [Publish("engine.tools", {"tools": sorted(self.tools.registered)})] + self._ack(body)

    def _cmd_tool_unregister(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("cmd.tool.unregister needs 'name': the tool's name")
        gone = self.tools.unregister(name=name)
        acts: list[Action] = [Publish("engine.tools", {"tools": sorted(self.tools.registered)})] if gone else []
        return acts + self._ack(body, removed=gone)

    def _presence_gone(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        owner = body.get("owner")
        if not isinstance(owner, str) or not owner:
            return []
        gone = self.tools.unregister(owner=owner)
        return [Publish("engine.tools", {"tools": sorted(self.tools.registered)})] if gone else []

    def _cmd_tool_result(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        call_id = body.get("call_id")
        if not isinstance(call_id, str):
            raise ValueError("cmd.tool.result needs 'call_id': the call's id from tool.call")
        output = self.tools.result(call_id, body.get("output"))
        if output is None:
            return self._ack(body, late=True)   # first result wins
        live = self.delegations.pop(call_id, None) is not None   # of this session: answered by its id
        return self._send_append(Append("commentary", output[:APPEND_MAX_TOKENS * 4], None,
                                        call_id if live else None)) + self._ack(body)

    # ================================================================ timers
    def next_deadline(self) -> float | None:
        due = [d for d in (self.grouper.next_deadline(), self.tools.next_deadline()) if d is not None]
        if self.state in (LiveState.ACTIVE, LiveState.RENEWING) and not self.sideband:
            due.append((self.last_audio_s or 0.0) + (KEEPALIVE_S if self.keepalive_on else self.keepalive_s))
        if self.state is LiveState.ACTIVE and not self.sideband and self.renew_from_s is not None:
            due.append(self.renew_from_s)
        return min(due) if due else None

    def _tick(self, now_s: float) -> list[Action]:
        acts: list[Action] = []
        for tev in self.grouper.overdue(now_s):
            acts.extend(self._turn_event(tev, now_s))
        for call_id, name in self.tools.overdue(now_s):
            live = self.delegations.pop(call_id, None) is not None
            acts.append(Publish("engine.error", {"source": "tool", "code": "tool_timeout", "message":
                                                 f"tool {name!r} did not answer delegation {call_id} in time"}))
            if live:   # an old session's delegation: its session, which waited for it, is gone
                acts.extend(self._send_append(Append("commentary", "The lookup did not answer in time.", None,
                                                     call_id)))
        if self.state in (LiveState.ACTIVE, LiveState.RENEWING) and not self.sideband:
            acts.extend(self._keepalive(now_s))   # the old session hears the mic until it has closed
        if self.state is LiveState.ACTIVE and not self.sideband:
            acts.extend(self._renew_if_due(now_s))
        return acts

    def _renew_if_due(self, now_s: float) -> list[Action]:
        """Close the session to renew it, when its expiry is near and the moment is quiet."""
        if self.renew_from_s is None or now_s < self.renew_from_s:
            return []
        loud, awaited = self.last_loud_s, self.awaiting_reply
        quiet = loud is None or now_s - loud >= RENEW_QUIET_S
        reply_due = awaited is not None and awaited[1] is not None and now_s - awaited[1] < RENEW_REPLY_WAIT_S
        if not (quiet and self.at_turn_boundary() and not reply_due and self.last_delta_silent):
            self.renew_from_s = now_s + RENEW_CHECK_S
            return []
        self.renew_from_s = None
        self._move("renew")
        return [Publish("engine.status", {"state": "renewing", "session_id": self.session_id,
                                          "reason": "the session expires soon"}),
                Send({"type": "session.close", "event_id": self.new_id("event")})]

    # ================================================================ DTMF (a SIP call's sideband)
    def _on_dtmf(self, ev: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        key = ev.get("event")
        if ev.get("type") == "transport.dtmf.received":
            return [Publish("sip.dtmf", {"key": key, "from": "caller"})]
        acts: list[Action] = [Publish("sip.dtmf", {"key": key, "from": "application"})]
        ref = ev.get("client_event_id")
        owner = self.sent_dtmf.pop(ref, None) if isinstance(ref, str) else None
        if owner and owner not in self.sent_dtmf.values():   # its last key out
            acts.append(Publish(DONE_TOPIC, {"id": owner, "ok": True, "key": key}))
        return acts

    def _dtmf_failed(self, event_id: str) -> str | None:
        """The cmd.dtmf whose key ``event_id`` the server refused, its other keys forgotten (it fails
        once); None when ``event_id`` is no key of a command."""
        owner = self.sent_dtmf.pop(event_id, None)
        if owner is not None:
            self.sent_dtmf = {e: c for e, c in self.sent_dtmf.items() if c != owner}
        return owner

    def _cmd_dtmf(self, body: Mapping[str, Any], now_s: float, heard: int) -> list[Action]:
        keys = body.get("keys")
        cmd_id = body.get("id") if isinstance(body.get("id"), str) else None
        why = None
        if not self.sideband:
            why = "cmd.dtmf needs a SIP call (engine sip): this session has no phone line"
        elif not isinstance(keys, str) or not keys or set(keys) - set("0123456789ABCD*#"):
            why = "cmd.dtmf needs 'keys': one or more of 0-9, A-D, * and #"
        elif self.state is not LiveState.ACTIVE:
            why = "the call's sideband is not attached"
        if why is not None:
            return [Publish("cmd.done", {"id": cmd_id, "ok": False, "error": why})] if cmd_id else \
                [Publish("engine.error", {"source": "engine", "code": "bad_command", "message": why})]
        acts: list[Action] = []
        assert isinstance(keys, str)
        for key in keys:
            event_id = self.new_id("event")
            if cmd_id:
                self.sent_dtmf[event_id] = cmd_id     # done when every key reached the trunk
            acts.append(Send({"type": "transport.dtmf.send", "event_id": event_id, "event": key}))
        return acts

    def _keepalive(self, now_s: float) -> list[Action]:
        """Silence in place of a mic that is not streaming: the session clock moves only with audio."""
        last, keepalive_s = self.last_audio_s, KEEPALIVE_S if self.keepalive_on else self.keepalive_s
        gap_s = keepalive_s if last is None else now_s - last
        if gap_s < keepalive_s - KEEPALIVE_SLACK_S:   # a timer is due at last + keepalive_s: it sends then,
            return []                                   # whatever the float rounding of a large clock says
        gap_s = max(gap_s, keepalive_s)
        send_s = min(gap_s, KEEPALIVE_MAX_S)
        fmt = self.audio_format
        frames = round(send_s * fmt.rate_hz)
        self.keepalive_on = True
        return self._mic(MicAudio(_silence(fmt.name, frames * fmt.bytes_per_frame), now_s))

    # ================================================================ views
    @property
    def session_seconds(self) -> int:
        return int(self.session_usage.get("seconds") or 0)

    def total_usd(self) -> float:
        return self.earlier_usd + live_cost_usd(self.model, self.session_usage)

    def at_turn_boundary(self) -> bool:
        """Nothing in progress: no open turn, no delegation, no context waiting to be placed."""
        return not self.grouper.open and not self.delegations and not self.sent and not self.waiting

    def _remember(self, item: dict[str, Any]) -> Publish:
        self.history.append(item)
        del self.history[:-INPUT_MESSAGES]
        return self.history_message()

    def history_message(self) -> Publish:
        """The state a successor starts from (``conversation.history``): the conversation, the
        context not yet placed, the tools, the mic gate, the keys of the latest commands taken."""
        self.state_seq += 1
        pending = [asdict(a) for a in (*self.unplaced.values(), *self.sent.values(), *self.waiting)]
        return Publish(STATE_TOPIC, {
            "items": list(self.history), "in_flight": [], "live_pending": pending,
            "tools": [registration(t) for t in self.tools.registered.values()], "mic_open": self.mic_open,
            "session": {k: self.session_config[k] for k in UPDATABLE if k in self.session_config},
            "updates_in_flight": list(self.sent_updates.values()),
            "mutes_in_flight": [c for _, c in self.mute_acks if c],
            "cost": {"usd": self.total_usd(), "seconds": self.earlier_seconds + self.session_seconds,
                     "budget_warned": self.budget_warned},
            "taken": list(self.taken)[-TAKEN_PUBLISHED:], "core": self.core_id, "state_seq": self.state_seq})

    def state_messages(self) -> list[Action]:
        acts: list[Action] = [self.history_message(), Publish("engine.tools", {"tools": sorted(self.tools.registered)})]
        if self.session:
            acts.append(Publish("session.config", {"session": self.session}))
        return acts

    def restore_history(self, body: Mapping[str, Any]) -> list[Action]:
        """A restarted realtime process starts from the state its predecessor published: the
        conversation (as Live input messages), the context it had not placed yet (sent again in
        the new session), the tools, the mic gate, the cost so far (the predecessor's sessions are
        earlier sessions now) and the commands it took. A tool refused now (a bad timeout) is left
        out and reported."""
        items = body.get("items")
        if isinstance(items, list):
            self.history = [m for m in (_as_live_message(i) for i in items) if m is not None][-INPUT_MESSAGES:]
        for raw in body.get("live_pending") or []:
            if isinstance(raw, dict) and raw.get("kind") in ("instructions", "thinking", "commentary") \
                    and isinstance(raw.get("content"), str):
                # a predecessor's delegation ended with its session: the next knows no id of the old
                self.waiting.append(Append(raw["kind"], raw["content"], raw.get("cmd_id"), None))
        acts = restore_tools(self.tools, body.get("tools"))
        session = body.get("session")
        if isinstance(session, dict) and set(session) <= set(UPDATABLE) and json_problem(session) is None:
            self.session_config.update(session)     # what cmd.session.update changed: the next start carries it
        for key, topic in (("updates_in_flight", "cmd.session.update"), ("mutes_in_flight", "cmd.mic")):
            acts.extend(self._done_in_flight(body.get(key), topic, "on start")[0])   # the next start carries them
        if isinstance(body.get("mic_open"), bool):
            self.mic_open = body["mic_open"]
        for key in body.get("taken") or []:
            if isinstance(key, str):
                self._mark_taken(key)
        if self._restore_cost(body.get("cost")):
            acts.append(self._cost_message())
        if self.tools.registered:
            acts.append(Publish("engine.tools", {"tools": sorted(self.tools.registered)}))
        return acts

    def _restore_cost(self, cost: Any) -> bool:
        """A predecessor's ``cost`` (its sessions' dollars and seconds, the warning) as earlier
        sessions; an odd figure is left out. True when dollars were restored."""
        if not isinstance(cost, Mapping):
            return False
        usd, seconds = cost.get("usd"), cost.get("seconds")
        if isinstance(usd, (int, float)) and not isinstance(usd, bool) and math.isfinite(usd) and usd >= 0:
            self.earlier_usd = float(usd)
        else:
            usd = None
        if isinstance(seconds, int) and not isinstance(seconds, bool) and seconds >= 0:
            self.earlier_seconds = seconds
        if isinstance(cost.get("budget_warned"), bool):
            self.budget_warned = cost["budget_warned"]
        return bool(usd)


def _topic_of(kind: str) -> str:
    return {"thinking": "cmd.say (role system)", "instructions": "cmd.instructions",
            "commentary": "cmd.commentary"}[kind]


def newest_within_limits(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest messages of ``history`` that ``session.start``'s ``input`` takes: at most
    INPUT_MESSAGES, and INPUT_TOKENS by estimate (4 ASCII characters a token, any other character
    a token; a message too long alone is left out)."""
    kept: list[dict[str, Any]] = []
    tokens = 0
    for message in reversed(history[-INPUT_MESSAGES:]):
        text = "".join(str(part.get("text") or "") for part in message.get("content") or [] if isinstance(part, dict))
        ascii_chars = len(text.encode("ascii", "ignore"))
        cost = -(-ascii_chars // 4) + (len(text) - ascii_chars) + INPUT_MESSAGE_TOKENS
        if cost > INPUT_TOKENS:
            continue   # too long alone: left out, the older ones still go
        if tokens + cost > INPUT_TOKENS:
            break
        kept.append(message)
        tokens += cost
    kept.reverse()
    return kept


def _as_live_message(item: Any) -> dict[str, Any] | None:
    """A conversation item as a Live ``input`` message (text only; ``system`` becomes ``developer``)."""
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        return None
    role = {"system": "developer"}.get(item.get("role", ""), item.get("role"))
    if role not in ("user", "assistant", "developer"):
        return None
    text = "".join(str(p.get("text") or p.get("transcript") or "") for p in item.get("content") or []
                   if isinstance(p, dict))
    if not text:
        return None
    part = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": part, "text": text}]}


def _mono_ns(at_s: float | None) -> int | None:
    return None if at_s is None else int(at_s * 1e9)


def _silence(fmt: str, n_bytes: int) -> bytes:
    """``n_bytes`` of the format's silence (G.711's zero codes)."""
    return (b"\xff" if fmt == "audio/pcmu" else b"\xd5" if fmt == "audio/pcma" else b"\x00") * n_bytes


def _rms(pcm: bytes, fmt: str) -> float:
    """Root mean square of ``pcm`` (the format's samples as int16 levels)."""
    if fmt == "audio/pcm":
        samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")
    else:   # G.711: one byte a frame
        samples = g711_table(fmt)[np.frombuffer(pcm, dtype=np.uint8)]
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0


def _first_sound(pcm: bytes, fmt: str) -> int | None:
    """Index (in the format's frames) of the first frame of ``pcm`` louder than silence, or None."""
    if fmt == "audio/pcm":
        samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")
    else:   # G.711: one byte a frame; decode without resampling
        samples = g711_table(fmt)[np.frombuffer(pcm, dtype=np.uint8)]
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > SILENCE_PEAK)
    return int(loud[0]) if loud.size else None

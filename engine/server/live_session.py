"""One GPT-Live session of the local server, without I/O.

Inputs, each returning :class:`LiveActions` (events with their audience, user turns to
recognise, utterances to synthesise, whether to close the sockets):

- ``receive_text(raw, sender)``: a client message from the primary socket or a sideband;
- ``tick()``: one OUTPUT_CHUNK_MS step of the output track (the I/O layer paces the calls at
  real time, times its speed factor);
- ``heard(turn_id, words)``: the recogniser's words for a user turn;
- ``spoken(utterance_id, pcm)``: espeak-ng's speech for an utterance (None: it failed);
- ``expire()``, ``disconnected()``, ``attach(sender)`` / ``detach(sender)``.

Two machines, each with its table below (:data:`PHASES`, :data:`VOICES`):

- the session's phase: NEW --start--> ACTIVE --close--> CLOSING --drained--> CLOSED, and
  ACTIVE/CLOSING --expire/disconnect--> CLOSED (NEW --disconnect--> CLOSED);
- the voice, what the output track carries: SILENT, SPEAKING (an utterance), FIXTURE.

Rules:

1. Nothing is sent before ``session.start``; a refused start sends only its error and the
   session stays NEW. Client events each phase accepts are in :data:`ACCEPTS`.
2. The session timeline is the input audio received, in ms at the session's rate: it moves
   only while input audio streams. Transcripts, appends, delegations and usage are on it.
3. The output track advances one OUTPUT_CHUNK_MS step per tick, silence included. Each step
   follows the previous one on the timeline, and jumps forward to the timeline when the input
   has run more than OUTPUT_RESYNC_MS ahead (a gap, as dropped frames leave on the service's
   sideband).
4. Turns: VAD (:mod:`engine.server.vad`) on the input as the model hears it (silence while
   muted or while a fixture plays). A turn is at least MIN_TURN_MS of speech followed by
   END_OF_TURN_MS of silence. Its words come from the scenario's ``hear`` or the recogniser
   (``heard``); then its input transcript fragments are sent and its reply planned, in turn order.
5. The model never starts an utterance while the user speaks. Once the user has spoken
   YIELD_AFTER_MS (over the model, or before a queued reply started), the model yields: the
   rest of the utterance is dropped with the queued replies and acknowledgements (results and
   commentary stay queued); the next step of the track is silence.
6. An append is placed on the first GRID_MS frame that starts at least PLACE_AFTER_MS of
   timeline after it arrived; its ack (``start_ms``/``end_ms``: that frame) and its effect come
   when the timeline passes ``end_ms``. Appends never placed are reported at close, one
   ``context_injection_incomplete`` error each.
7. Effects: thinking and instructions join the context replies use; commentary (null
   ``delegation_id``) is said; commentary for a pending delegation is said through its rule's
   ``then``; any thinking or commentary cancels pending automatic acknowledgements.
8. A handler checks everything first and changes state last: a refused event sends only its
   error (to its sender) and changes nothing. A bug in a handler becomes a ``server_error`` and
   the session goes on.
9. Acks and errors go to the connection that sent the command; what the model does (its
   output, transcripts, delegations, usage, ``session.closed``) goes to every connection. The
   primary gets output audio in its format without times; sidebands get it reflected as PCM16
   24 kHz with ``start_ms``/``end_ms``, and the input reflected before muting.
"""
from __future__ import annotations

import enum
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from engine.codec import API_RATE_HZ, b64decode_strict, b64encode
from engine.server.faults import Faults
from engine.server.live_protocol import (APPEND_MAX_TOKENS, FIXTURE_MAX_MS, MAX_EVENT_BYTES, AudioFormat, InputDecoder,
                                         OutputEncoder, apply_session_update, error_event, resolve_session, text_tokens,
                                         validate_client_event)
from engine.server.protocol import ProtocolError, new_id
from engine.server.scenario import Rule, Scenario, fill, speakable
from engine.server.vad import ServerVad

log = logging.getLogger("realtalk.server")

OUTPUT_CHUNK_MS = 100          #: one output delta, as the service sends them
OUTPUT_CHUNK_SAMPLES = API_RATE_HZ * OUTPUT_CHUNK_MS // 1000
OUTPUT_RESYNC_MS = 300         #: input this far ahead of the output track moves the track up to it
GRID_MS = 200                  #: transcript fragments and append placements land on this grid
PLACE_AFTER_MS = 400           #: an append is placed on the first frame at least this far after it arrives
END_OF_TURN_MS = 500           #: silence that ends the user's turn
MIN_TURN_MS = 200              #: shorter speech is a backchannel or noise, not a turn
YIELD_AFTER_MS = 200           #: user speech over the model that makes it yield
USAGE_EVERY_MS = 15_000        #: session.usage.updated cadence on the timeline
DRAIN_MAX_MS = 10_000          #: at most this much output track after session.close
LIVE_MAX_SESSION_S = 7200      #: expires_at; the service's limit is unverified (two hours, third-party)
PREROLL_MS = 300               #: input audio kept before speech, for the recogniser
MAX_TURN_AUDIO_MS = 60_000     #: the newest this much of a long turn is recognised
NO_WORDS = "something I could not make out"
DTMF_KEYS = frozenset("0123456789ABCD*#")

PRIMARY = "primary"            #: the sender / audience id of the primary socket
ALL = "*"                      #: audience: the primary and every sideband
SIDEBANDS = "sidebands"        #: audience: every sideband


class Phase(str, enum.Enum):
    NEW = "new"            # socket open, waiting for session.start: nothing is sent
    ACTIVE = "active"
    CLOSING = "closing"    # session.close received: the output drains
    CLOSED = "closed"      # session.closed sent (or the socket went away): final


class Voice(str, enum.Enum):
    SILENT = "silent"
    SPEAKING = "speaking"  # an utterance plays
    FIXTURE = "fixture"    # canned audio plays; the input is muted and appends refused


P, V = Phase, Voice
#: (phase, event) -> the phases it may go to
PHASES: dict[tuple[Phase, str], frozenset[Phase]] = {
    (P.NEW, "start"): frozenset({P.ACTIVE}),                 # a refused start changes nothing
    (P.NEW, "disconnect"): frozenset({P.CLOSED}),
    (P.ACTIVE, "close"): frozenset({P.CLOSING}),
    (P.ACTIVE, "expire"): frozenset({P.CLOSED}),
    (P.ACTIVE, "disconnect"): frozenset({P.CLOSED}),
    (P.CLOSING, "drained"): frozenset({P.CLOSED}),
    (P.CLOSING, "expire"): frozenset({P.CLOSED}),
    (P.CLOSING, "disconnect"): frozenset({P.CLOSED}),
}
#: (voice, event) -> the voices it may go to
VOICES: dict[tuple[Voice, str], frozenset[Voice]] = {
    (V.SILENT, "start_utterance"): frozenset({V.SPEAKING}),
    (V.SPEAKING, "utterance_done"): frozenset({V.SILENT}),
    (V.SPEAKING, "yield"): frozenset({V.SILENT}),
    (V.SILENT, "fixture"): frozenset({V.FIXTURE}),
    (V.SPEAKING, "fixture"): frozenset({V.FIXTURE}),
    (V.FIXTURE, "fixture_done"): frozenset({V.SILENT}),
}
#: client event type -> the phases that accept it (others get an error that says why)
ACCEPTS: dict[str, frozenset[Phase]] = {
    "session.start": frozenset({P.NEW}),
    "session.input_audio.append": frozenset({P.ACTIVE, P.CLOSING}),   # the timeline still moves while draining
    **{t: frozenset({P.ACTIVE}) for t in (
        "session.update", "session.input_audio.mute", "session.input_audio.unmute",
        "session.output_audio.fixture.play", "session.instructions.append", "session.thinking.append",
        "session.commentary.append", "decision.create", "decision.item.create", "decision.item.delete",
        "response.item.create", "response.create", "session.close", "transport.dtmf.send")},
}


class LiveStateError(RuntimeError):
    """A transition its table does not allow (a bug in this module)."""


@dataclass
class LiveActions:
    """What the I/O layer must do: send each event to its audience (PRIMARY, ALL, SIDEBANDS or a
    sideband's id), recognise ``hear``, synthesise ``speak``, then close every socket if ``close``."""
    out: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    hear: list["UserTurn"] = field(default_factory=list)
    speak: list["Utterance"] = field(default_factory=list)
    close: bool = False

    def to(self, audience: str, event: dict[str, Any]) -> None:
        self.out.append((audience, event))

    def events(self, audience: str = PRIMARY) -> list[dict[str, Any]]:
        """The events ``audience`` gets (tests)."""
        return [ev for aud, ev in self.out if aud in (audience, ALL) or (aud == SIDEBANDS and audience != PRIMARY)]


@dataclass
class UserTurn:
    """A user turn waiting for its words; ``heard`` is set when the scenario scripts them."""
    id: str
    number: int
    start_ms: int
    end_ms: int
    pcm: np.ndarray
    heard: str | None = None
    words: str | None = None


@dataclass
class Utterance:
    """Something the model will say; ``pcm`` arrives from ``spoken``. ``words`` are
    (sample offset, fragment) pairs, the fragments with their leading spaces."""
    id: str
    text: str
    kind: str                         #: "reply" | "ack" | "commentary" | "result"
    delegation_id: str | None = None
    pcm: np.ndarray | None = None
    pos: int = 0
    words: list[tuple[int, str]] = field(default_factory=list)
    next_word: int = 0


@dataclass
class Append:
    kind: str                         #: "instructions" | "thinking" | "commentary"
    content: str
    delegation_id: str | None
    event_id: str | None
    sender: str
    start_ms: int
    end_ms: int


@dataclass
class Delegation:
    id: str
    rule: Rule
    user_words: str
    created_ms: int
    ack_text: str
    ack_due_ms: int | None = None     #: the automatic acknowledgement is still to be asked for then
    resolved: bool = False


@dataclass
class Fixture:
    pcm: np.ndarray
    event_id: str | None
    sender: str
    pos: int = 0


def spread_words(text: str, span: int) -> list[tuple[int, str]]:
    """``text``'s words with their leading spaces, each at its start within ``span`` (by characters)."""
    words = text.split()
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    total = sum(len(p) for p in pieces) or 1
    out, chars = [], 0
    for p in pieces:
        out.append((chars * span // total, p))
        chars += len(p)
    return out


class LiveSession:
    """The state of one Live session; see the module's rules."""

    def __init__(self, scenario: Scenario | None = None, faults: Faults | None = None,
                 wall_clock: Callable[[], float] = time.time, max_session_s: float = LIVE_MAX_SESSION_S) -> None:
        self.scenario = scenario or Scenario()
        self.faults = faults or Faults()
        self.wall_clock = wall_clock
        self.max_session_s = max_session_s
        self.phase = Phase.NEW
        self.voice = Voice.SILENT
        self.session: dict[str, Any] = {}
        self.started_event: dict[str, Any] | None = None
        self.fmt = AudioFormat()
        self.decoder: InputDecoder | None = None
        self.encoder: OutputEncoder | None = None
        self.sidebands: set[str] = set()
        # the timeline (rule 2) and the output track (rule 3)
        self.in_samples = 0                      #: input samples received, at the format's rate
        self.out_ms = 0                          #: where the next output step starts on the timeline
        self.next_usage_ms = USAGE_EVERY_MS
        # hearing (rule 4)
        self.vad = ServerVad(threshold=0.5, prefix_padding_ms=0, silence_duration_ms=END_OF_TURN_MS)
        self.heard_chunks: list[np.ndarray] = []  #: recent input as the model heard it (24 kHz)
        self.heard_start = 0                     #: VAD-clock sample index of heard_chunks[0][0]
        self.heard_samples = 0                   #: samples in heard_chunks
        self.muted = False
        self.yielded_this_speech = False
        self.user_turns = 0
        self.turns: list[UserTurn] = []          #: waiting for their words, in order
        # speaking (rules 5, 7)
        self.queue: list[Utterance] = []         #: said in order; queue[0] plays while SPEAKING
        self.out_fragment: list[Any] | None = None   #: [window start ms, text] not yet sent
        self.fixture: Fixture | None = None
        # context and delegation (rules 6, 7)
        self.appends: list[Append] = []          #: not yet placed, in placement order
        self.context: list[str] = []             #: placed thinking and instructions
        self.fresh_context: list[str] = []       #: placed general thinking not yet used in a reply
        self.delegations: dict[str, Delegation] = {}
        # closing
        self.close_event_id: str | None = None
        self.drain_until_ms = 0
        self.counts: dict[str, int] = {"yields": 0, "turns": 0, "backchannels": 0, "synthesis_failures": 0}
        #: a SIP call (engine.server.sip): DTMF both ways; the primary is the caller's line
        self.sip = False
        self.preset_id: str | None = None        #: the session's id when it is given (a SIP call's live_…)

    # ------------------------------------------------------------------ machines
    def _go_phase(self, event: str, new: Phase) -> None:
        if new not in PHASES.get((self.phase, event), frozenset()):
            raise LiveStateError(f"phase: {event!r} is not allowed in {self.phase.value} (to {new.value})")
        self.phase = new

    def _go_voice(self, event: str, new: Voice) -> None:
        if new not in VOICES.get((self.voice, event), frozenset()):
            raise LiveStateError(f"voice: {event!r} is not allowed in {self.voice.value} (to {new.value})")
        self.voice = new

    # ------------------------------------------------------------------ helpers
    @property
    def timeline_ms(self) -> int:
        return self.in_samples * 1000 // self.fmt.rate

    @property
    def vad_ms(self) -> int:
        """The VAD's clock (24 kHz samples heard), for turn spans."""
        return self.vad.frames_seen * 10

    def _ev(self, type_: str, client_event_id: str | None = None, **fields: Any) -> dict[str, Any]:
        ev = {"type": type_, "event_id": new_id("event"), **fields}
        if client_event_id is not None:
            ev["client_event_id"] = client_event_id
        return ev

    def _usage(self) -> dict[str, Any]:
        return {"seconds": math.ceil(self.timeline_ms / 1000)}

    @property
    def user_speaking(self) -> bool:
        return self.vad.in_speech

    def context_text(self) -> str:
        return " ".join(self.context)

    # ------------------------------------------------------------------ client messages
    def receive_text(self, raw: str | bytes, sender: str = PRIMARY) -> LiveActions:
        """Handle one websocket message from ``sender`` (PRIMARY or a sideband's id)."""
        acts = LiveActions()
        if self.phase is Phase.CLOSED:
            return acts
        if len(raw) > MAX_EVENT_BYTES:
            acts.to(sender, error_event("invalid_value", f"The event is {len(raw)} bytes; the maximum is "
                                        f"{MAX_EVENT_BYTES} bytes (15 MiB). Split audio into smaller appends."))
            return acts
        try:
            event = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            acts.to(sender, error_event("invalid_json", f"We could not parse the JSON body of your request. ({exc})"))
            return acts
        eid = event.get("event_id") if isinstance(event, dict) and isinstance(event.get("event_id"), str) else None
        try:
            etype = validate_client_event(event, sideband=sender != PRIMARY)
            self._check_phase(etype)
            HANDLERS[etype](self, event, acts, sender)
        except ProtocolError as exc:
            acts = LiveActions(out=[(sender, error_event(exc.code, exc.message, exc.param, eid, exc.error_type))])
        except Exception as exc:  # noqa: BLE001 - a bug must not end the client's conversation
            log.exception("local live server: handling %s failed", event.get("type"))
            acts = LiveActions(out=[(sender, error_event(
                "server_error", f"The server had an error while processing your request ({type(exc).__name__}: "
                f"{exc}).", None, eid, "server_error"))])
        return acts

    def _check_phase(self, etype: str) -> None:
        if self.phase in ACCEPTS[etype]:
            return
        if self.phase is Phase.NEW:
            raise ProtocolError("session_not_started", f"Send session.start, and wait for session.started, "
                                f"before '{etype}'.", "type")
        if etype == "session.start":
            raise ProtocolError("session_already_started", "The session has already started; session.start "
                                "is sent once, first.", "type")
        raise ProtocolError("session_closing", f"The session is closing; '{etype}' is not accepted any more.", "type")

    def _on_start(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        now = self.wall_clock()
        session = resolve_session(ev["session"], self.preset_id or new_id("live"), int(now + self.max_session_s))
        fmt = AudioFormat.of(session)
        # checked: change state last
        self.session, self.fmt = session, fmt
        self.decoder, self.encoder = InputDecoder(fmt), OutputEncoder(fmt)
        self.user_turns = sum(1 for m in session["input"] if m["role"] == "user")
        self.context = [m["content"][0]["text"] for m in session["input"] if m["role"] == "developer"]
        self._go_phase("start", Phase.ACTIVE)
        self.started_event = self._ev("session.started", ev.get("event_id"), session=session)
        acts.to(sender, self.started_event)

    def _on_update(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        self.session = apply_session_update(self.session, ev["session"])
        acts.to(sender, self._ev("session.updated", ev.get("event_id"), session=self.session))

    def _on_input_audio(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        assert self.decoder is not None
        try:
            data = b64decode_strict(ev["audio"])
        except ValueError:
            raise ProtocolError("invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes.",
                                "audio") from None
        pcm = self.decoder.decode(data)   # refuses odd-length PCM16 before anything changes
        if self.sidebands and len(pcm):
            acts.to(SIDEBANDS, {"type": "session.input_audio.append", "audio": b64encode(pcm.astype("<i2").tobytes())})
        self.in_samples += self.decoder.samples(data)
        deaf = self.muted or self.voice is Voice.FIXTURE
        self._hear(np.zeros(len(pcm), dtype=np.int16) if deaf else pcm, acts)
        self._timeline_moved(acts)

    def _on_mute(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        self.muted = True
        acts.to(sender, self._ev("session.input_audio.muted", ev.get("event_id")))

    def _on_unmute(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        self.muted = False   # a playing fixture still keeps the input muted until it ends
        acts.to(sender, self._ev("session.input_audio.unmuted", ev.get("event_id")))

    def _on_fixture(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        try:
            data = b64decode_strict(ev["audio"])
        except ValueError:
            raise ProtocolError("invalid_value", "Invalid 'audio'. Expected base64-encoded PCM16 24 kHz audio.",
                                "audio") from None
        if len(data) % 2:
            raise ProtocolError("invalid_value", f"Invalid 'audio': a fixture is PCM16 (2 bytes a sample), got "
                                f"{len(data)} bytes.", "audio")
        ms = len(data) // 2 * 1000 // API_RATE_HZ
        if ms > FIXTURE_MAX_MS:
            raise ProtocolError("invalid_value", f"Invalid 'audio': a fixture is at most {FIXTURE_MAX_MS // 1000} s "
                                f"of PCM16 24 kHz mono, got {ms / 1000:.1f} s.", "audio")
        if not data:
            raise ProtocolError("invalid_value", "Invalid 'audio': the fixture is empty.", "audio")
        if self.voice is Voice.FIXTURE:
            raise ProtocolError("fixture_active", "An audio fixture is already playing; wait for "
                                "session.output_audio.fixture.played before playing another.", "type")
        if self.voice is Voice.SPEAKING:
            self._cut_utterance(acts)   # model speech is interrupted
        self.fixture = Fixture(np.frombuffer(data, dtype="<i2"), ev.get("event_id"), sender)
        self.vad.reset_speech()
        self._go_voice("fixture", Voice.FIXTURE)
        acts.to(sender, self._ev("session.output_audio.fixture.playing", ev.get("event_id")))

    def _on_append(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        kind = ev["type"].split(".")[1]
        content, did = ev["content"], ev["delegation_id"]
        if text_tokens(content) > APPEND_MAX_TOKENS:
            raise ProtocolError("invalid_value", f"Context append text must not exceed {APPEND_MAX_TOKENS} tokens.",
                                "content")
        if did is not None and did not in self.delegations:
            raise ProtocolError("invalid_value", f"Unknown delegation_id '{did}': use the id of a "
                                "session.delegation.created event of this session, or null.", "delegation_id")
        if self.voice is Voice.FIXTURE:
            raise ProtocolError("fixture_active", "Context appends are rejected while an audio fixture plays; "
                                "send it after session.output_audio.fixture.played.", "type")
        start = (self.timeline_ms + PLACE_AFTER_MS + GRID_MS - 1) // GRID_MS * GRID_MS
        self.appends.append(Append(kind, content, did, ev.get("event_id"), sender, start, start + GRID_MS))

    def _on_decision(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        raise ProtocolError("unsupported_decisions", f"The local server does not run the Decisions API, so "
                            f"'{ev['type']}' is not available; it needs a decisions delegation or triggers.", "type")

    def _on_response(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        raise ProtocolError("delegation_mismatch", f"{ev['type']} requires Responses delegation.", "type")

    def _on_dtmf(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        if not self.sip:
            raise ProtocolError("not_a_sip_call", "transport.dtmf.send is for SIP calls; this session is not a SIP "
                                "call.", "type")
        key = ev["event"]
        if not isinstance(key, str) or len(key) != 1 or key not in DTMF_KEYS:
            raise ProtocolError("invalid_value", f"Invalid 'event': {key!r}. Send one key per event: 0-9, A-D, * "
                                "or #.", "event")
        acts.to(PRIMARY, {"type": "transport.dtmf.sent", "event": key})   # the caller's line plays it
        acts.to(sender, self._ev("transport.dtmf.sent", ev.get("event_id"), event=key))

    def dtmf_received(self, key: str) -> LiveActions:
        """The SIP caller pressed ``key``: the sidebands are told (``transport.dtmf.received``)."""
        acts = LiveActions()
        if self.phase is Phase.ACTIVE:
            acts.to(SIDEBANDS, self._ev("transport.dtmf.received", event=key))
        return acts

    def _on_close(self, ev: dict[str, Any], acts: LiveActions, sender: str) -> None:
        self.close_event_id = ev.get("event_id")
        self.drain_until_ms = self.out_ms + DRAIN_MAX_MS
        for d in self.delegations.values():
            d.ack_due_ms = None
        self._go_phase("close", Phase.CLOSING)

    # ------------------------------------------------------------------ hearing (rule 4)
    def _hear(self, pcm: np.ndarray, acts: LiveActions) -> None:
        """Feed the VAD in OUTPUT_CHUNK_MS slices, so an append of any size yields at the same
        point (speech that starts and ends inside one long append still makes the model yield)."""
        if not len(pcm):
            return
        self.heard_chunks.append(pcm)
        self.heard_samples += len(pcm)
        for i in range(0, len(pcm), OUTPUT_CHUNK_SAMPLES):
            for vev in self.vad.feed(pcm[i:i + OUTPUT_CHUNK_SAMPLES]):
                if vev.kind == "started":
                    self.yielded_this_speech = False
                    continue
                start_ms, end_ms = self.vad.speech_start_ms, vev.ms - END_OF_TURN_MS
                if not self.yielded_this_speech and end_ms - start_ms >= YIELD_AFTER_MS:
                    self.yielded_this_speech = True
                    self._yield(acts)
                self._speech_ended(start_ms, end_ms, acts)
            if self.vad.in_speech and not self.yielded_this_speech and self.vad.speech_ms >= YIELD_AFTER_MS:
                self.yielded_this_speech = True
                self._yield(acts)
        self._trim_heard()

    def _trim_heard(self) -> None:
        """Keep PREROLL_MS outside speech, and in speech the speech so far (its newest
        MAX_TURN_AUDIO_MS) with PREROLL_MS before it; trimmed in steps, so appends do not copy
        the buffer each time."""
        speech_ms = min(MAX_TURN_AUDIO_MS, self.vad_ms - self.vad.speech_start_ms) if self.vad.in_speech else 0
        keep = (speech_ms + PREROLL_MS) * API_RATE_HZ // 1000
        if self.heard_samples <= 2 * keep + API_RATE_HZ:
            return
        pcm = np.concatenate(self.heard_chunks)[-keep:]
        self.heard_start += self.heard_samples - len(pcm)
        self.heard_chunks, self.heard_samples = [pcm], len(pcm)

    def _heard_pcm(self, start_ms: int, end_ms: int) -> np.ndarray:
        if not self.heard_chunks:
            return np.zeros(0, dtype=np.int16)
        pcm = np.concatenate(self.heard_chunks)
        self.heard_chunks = [pcm]
        lo = max(0, start_ms * API_RATE_HZ // 1000 - self.heard_start)
        hi = max(lo, end_ms * API_RATE_HZ // 1000 - self.heard_start)
        return pcm[lo:hi].copy()

    def _speech_ended(self, start_ms: int, end_ms: int, acts: LiveActions) -> None:
        if end_ms - start_ms < MIN_TURN_MS:
            self.counts["backchannels"] += 1
            return
        self.user_turns += 1
        self.counts["turns"] += 1
        pcm = self._heard_pcm(start_ms - 100, end_ms + 100)
        turn = UserTurn(new_id("turn"), self.user_turns, start_ms, end_ms, pcm,
                        heard=self.scenario.heard_for_turn(self.user_turns))
        self.turns.append(turn)
        acts.hear.append(turn)

    def heard(self, turn_id: str, words: str) -> LiveActions:
        """The words of user turn ``turn_id``; turns are answered in their order."""
        acts = LiveActions()
        turn = next((t for t in self.turns if t.id == turn_id), None)
        if turn is None or self.phase not in (Phase.ACTIVE, Phase.CLOSING):
            return acts
        turn.words = words
        while self.turns and self.turns[0].words is not None:
            done = self.turns.pop(0)
            self._input_transcript(done, acts)
            if self.phase is Phase.ACTIVE:
                self._plan(done, acts)
        return acts

    def _input_transcript(self, turn: UserTurn, acts: LiveActions) -> None:
        fragments: list[list[Any]] = []
        for offset, piece in spread_words(turn.words or "", turn.end_ms - turn.start_ms):
            window = (turn.start_ms + offset) // GRID_MS * GRID_MS
            if fragments and fragments[-1][0] == window:
                fragments[-1][1] += piece
            else:
                fragments.append([window, piece])
        for window, text in fragments:
            acts.to(ALL, self._ev("session.input_transcript.delta", delta=text, start_ms=window,
                                  end_ms=window + GRID_MS))

    # ------------------------------------------------------------------ the model's choices
    def _plan(self, turn: UserTurn, acts: LiveActions) -> None:
        words = (turn.words or "").strip()
        rule = self.scenario.rule_for(turn.number, words, self.context_text())
        values = {"user": words.rstrip(".!? ") or NO_WORDS, "context": self.context[-1] if self.context else ""}
        if rule is not None and (rule.delegate or rule.call_name):
            self._delegate(rule, words, acts)
            return
        template = rule.reply if rule is not None and rule.reply is not None else self.scenario.default_reply
        text = fill(template, values)
        if self.fresh_context and "{context}" not in template:
            text += " " + " ".join(self.fresh_context)   # the stand-in shows it used the silent context
        self.fresh_context = []
        self._say(text, "reply", None, acts)

    def _delegate(self, rule: Rule, words: str, acts: LiveActions) -> None:
        did = new_id("item")
        now = self.timeline_ms
        ack = rule.delegate_ack
        delay = int(self.session["delegation"].get("acknowledgement_delay_ms") or 0)
        d = Delegation(did, rule, words, now, ack, ack_due_ms=now + delay if ack and delay > 0 else None)
        self.delegations[did] = d
        acts.to(ALL, self._ev("session.delegation.created", delegation={"id": did, "type": "delegation",
                                                                        "target": "client"}, offset_ms=now))
        if ack and delay <= 0:
            self._say(ack, "ack", did, acts)

    def _say(self, text: str, kind: str, delegation_id: str | None, acts: LiveActions) -> None:
        if not text.strip():
            return
        utt = Utterance(new_id("utt"), text, kind, delegation_id)
        self.queue.append(utt)
        acts.speak.append(utt)

    def spoken(self, utterance_id: str, pcm: np.ndarray | None, error: str | None = None) -> LiveActions:
        """The speech of ``utterance_id`` (PCM16 24 kHz), or None when synthesis failed."""
        acts = LiveActions()
        utt = next((u for u in self.queue if u.id == utterance_id), None)
        if utt is None or self.phase is Phase.CLOSED:
            return acts   # dropped meanwhile (the model yielded)
        if pcm is None or not len(pcm):
            self.counts["synthesis_failures"] += 1
            self.queue.remove(utt)
            acts.to(ALL, error_event("speech_synthesis_failed", f"The local server could not speak "
                                     f"{utt.text[:60]!r}: {error or 'no audio'}.", error_type="server_error"))
            return acts
        utt.words = spread_words(utt.text, len(pcm))
        utt.pcm = pcm
        return acts

    def _yield(self, acts: LiveActions) -> None:
        """The user talks over the model (rule 5)."""
        dropped = [u for u in self.queue[1 if self.voice is Voice.SPEAKING else 0:] if u.kind in ("reply", "ack")]
        if self.voice is not Voice.SPEAKING and not dropped:
            return
        self.counts["yields"] += 1
        self.queue = [u for u in self.queue if u not in dropped]
        if self.voice is Voice.SPEAKING:
            self._cut_utterance(acts)
            self._go_voice("yield", Voice.SILENT)

    def _cut_utterance(self, acts: LiveActions) -> None:
        """Stop the utterance playing now: what was said stays in the transcript, the rest goes."""
        self._flush_fragment(acts)
        if self.queue:
            self.queue.pop(0)

    # ------------------------------------------------------------------ the timeline (rules 2, 6, 7)
    def _timeline_moved(self, acts: LiveActions) -> None:
        now = self.timeline_ms
        while self.appends and self.appends[0].end_ms <= now:
            self._place(self.appends.pop(0), acts)
        for d in self.delegations.values():
            if d.ack_due_ms is not None and now >= d.ack_due_ms:
                d.ack_due_ms = None
                self._say(d.ack_text, "ack", d.id, acts)
        if now >= self.next_usage_ms:
            acts.to(ALL, self._ev("session.usage.updated", usage=self._usage()))
            self.next_usage_ms = (now // USAGE_EVERY_MS + 1) * USAGE_EVERY_MS

    def _place(self, a: Append, acts: LiveActions) -> None:
        acts.to(a.sender, self._ev(f"session.{a.kind}.appended", a.event_id, start_ms=a.start_ms, end_ms=a.end_ms))
        if a.kind in ("thinking", "commentary"):
            for pending in self.delegations.values():
                pending.ack_due_ms = None   # any thinking or commentary cancels pending acknowledgements
            self.queue = [u for i, u in enumerate(self.queue)
                          if u.kind != "ack" or (i == 0 and self.voice is Voice.SPEAKING)]
        if a.kind in ("thinking", "instructions"):
            self.context.append(a.content)
            if a.kind == "thinking" and a.delegation_id is None:
                self.fresh_context.append(a.content)
            return
        d = self.delegations.get(a.delegation_id) if a.delegation_id else None
        if d is not None and not d.resolved:
            d.resolved = True
            template = d.rule.then if d.rule.then is not None else "{output}"
            said = speakable(a.content)   # a tool's JSON is said as its values, as a model would
            values = {"output": said, "result": said, "user": d.user_words.rstrip(".!? ") or NO_WORDS,
                      "context": self.context[-1] if self.context else ""}
            self._say(fill(template, values), "result", d.id, acts)
        else:
            self._say(a.content, "commentary", a.delegation_id, acts)

    # ------------------------------------------------------------------ the output track (rules 3, 5)
    def tick(self) -> LiveActions:
        """One OUTPUT_CHUNK_MS step of the output track."""
        acts = LiveActions()
        if self.phase not in (Phase.ACTIVE, Phase.CLOSING):
            return acts
        assert self.encoder is not None
        start = self.out_ms if self.timeline_ms - self.out_ms <= OUTPUT_RESYNC_MS else self.timeline_ms
        end = start + OUTPUT_CHUNK_MS
        pcm = np.zeros(OUTPUT_CHUNK_SAMPLES, dtype=np.int16)
        fixture_done = False
        if self.voice is Voice.FIXTURE:
            fx = self.fixture
            assert fx is not None
            piece = fx.pcm[fx.pos:fx.pos + OUTPUT_CHUNK_SAMPLES]
            pcm[:len(piece)] = piece
            fx.pos += OUTPUT_CHUNK_SAMPLES
            fixture_done = fx.pos >= len(fx.pcm)
        else:
            if self.voice is Voice.SILENT:
                self._start_next()
            if self.voice is Voice.SPEAKING:
                self._play(start, pcm, acts)
        self.out_ms = end
        acts.to(PRIMARY, {"type": "session.output_audio.delta", "delta": b64encode(self.encoder.encode(pcm))})
        if self.sidebands:
            acts.to(SIDEBANDS, {"type": "session.output_audio.delta", "delta": b64encode(pcm.astype("<i2").tobytes()),
                                "start_ms": start, "end_ms": end})
        if self.out_fragment is not None and (self.out_fragment[0] + GRID_MS <= end or self.voice is not Voice.SPEAKING):
            self._flush_fragment(acts)   # its window is over, or the utterance is
        if fixture_done and self.fixture is not None:
            fx, self.fixture = self.fixture, None
            self.vad.reset_speech()
            self._go_voice("fixture_done", Voice.SILENT)
            acts.to(fx.sender, self._ev("session.output_audio.fixture.played", fx.event_id))
        if self.phase is Phase.CLOSING and (self._drained() or self.out_ms >= self.drain_until_ms):
            self._finish("close_requested", "drained", acts)
        return acts

    def _start_next(self) -> None:
        if self.queue and self.queue[0].pcm is not None and not self.user_speaking:
            self._go_voice("start_utterance", Voice.SPEAKING)

    def _play(self, start_ms: int, pcm: np.ndarray, acts: LiveActions) -> None:
        utt = self.queue[0]
        assert utt.pcm is not None
        piece = utt.pcm[utt.pos:utt.pos + OUTPUT_CHUNK_SAMPLES]
        pcm[:len(piece)] = piece
        while utt.next_word < len(utt.words) and utt.words[utt.next_word][0] < utt.pos + OUTPUT_CHUNK_SAMPLES:
            offset, text = utt.words[utt.next_word]
            t_ms = start_ms + max(0, offset - utt.pos) * 1000 // API_RATE_HZ
            self._out_word(t_ms, text, acts)
            utt.next_word += 1
        utt.pos += OUTPUT_CHUNK_SAMPLES
        if utt.pos >= len(utt.pcm):
            self.queue.pop(0)
            self._go_voice("utterance_done", Voice.SILENT)   # tick sends its last fragment after the audio

    def _out_word(self, t_ms: int, text: str, acts: LiveActions) -> None:
        window = t_ms // GRID_MS * GRID_MS
        if self.out_fragment is not None and self.out_fragment[0] != window:
            self._flush_fragment(acts)
        if self.out_fragment is None:
            self.out_fragment = [window, ""]
        self.out_fragment[1] += text

    def _flush_fragment(self, acts: LiveActions) -> None:
        if self.out_fragment is None:
            return
        window, text = self.out_fragment
        self.out_fragment = None
        acts.to(ALL, self._ev("session.output_transcript.delta", delta=text, start_ms=window, end_ms=window + GRID_MS))

    def _drained(self) -> bool:
        return self.voice is Voice.SILENT and not self.queue

    # ------------------------------------------------------------------ the end
    def _finish(self, reason: str, event: str, acts: LiveActions) -> None:
        for a in self.appends:
            acts.to(a.sender, error_event(
                "context_injection_incomplete", f"The session closed before this {a.kind} append was placed on "
                f"the session timeline (it was due at {a.end_ms} ms; the timeline reached {self.timeline_ms} ms and "
                "moves only while input audio streams).", None, a.event_id, "invalid_request_error"))
        self.appends = []
        cid = self.close_event_id if reason == "close_requested" else None
        acts.to(ALL, self._ev("session.closed", cid, reason=reason, session=self.session, usage=self._usage()))
        acts.close = True
        self._go_phase(event, Phase.CLOSED)

    def expire(self) -> LiveActions:
        """The session reached ``expires_at``."""
        acts = LiveActions()
        if self.phase in (Phase.ACTIVE, Phase.CLOSING):
            self._finish("expired", "expire", acts)
        return acts

    def disconnected(self, reason: str = "connection_lost") -> LiveActions:
        """The primary socket went away (a SIP call: ``remote_hangup`` when the caller hung up):
        sidebands learn the session ended."""
        acts = LiveActions()
        if self.phase in (Phase.ACTIVE, Phase.CLOSING):
            self._finish(reason, "disconnect", acts)
        elif self.phase is Phase.NEW:
            self._go_phase("disconnect", Phase.CLOSED)
        return acts

    def attach(self, sender: str) -> LiveActions:
        """A sideband attached: it gets a short replay (the session.started event)."""
        acts = LiveActions()
        self.sidebands.add(sender)
        if self.started_event is not None:
            acts.to(sender, self.started_event)
        return acts

    def detach(self, sender: str) -> None:
        self.sidebands.discard(sender)


_Handler = Callable[[LiveSession, dict[str, Any], LiveActions, str], None]
#: client event type -> its handler (every type the validator accepts has one)
HANDLERS: dict[str, _Handler] = {
    "session.start": LiveSession._on_start,
    "session.update": LiveSession._on_update,
    "session.input_audio.append": LiveSession._on_input_audio,
    "session.input_audio.mute": LiveSession._on_mute,
    "session.input_audio.unmute": LiveSession._on_unmute,
    "session.output_audio.fixture.play": LiveSession._on_fixture,
    "session.instructions.append": LiveSession._on_append,
    "session.thinking.append": LiveSession._on_append,
    "session.commentary.append": LiveSession._on_append,
    "decision.create": LiveSession._on_decision,
    "decision.item.create": LiveSession._on_decision,
    "decision.item.delete": LiveSession._on_decision,
    "response.item.create": LiveSession._on_response,
    "response.create": LiveSession._on_response,
    "session.close": LiveSession._on_close,
    "transport.dtmf.send": LiveSession._on_dtmf,
}
assert set(HANDLERS) == set(ACCEPTS)

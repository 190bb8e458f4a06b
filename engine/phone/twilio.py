"""The Twilio Media Streams protocol (bidirectional, ``<Connect><Stream>``), as one pure state
machine per WebSocket: text frames in, parsed events out; the messages we send, built. No I/O.

Written from Twilio's documentation ("Media Streams - WebSocket Messages"); tested against the
fake phone in :mod:`engine.phone.simulator`, not against Twilio (there is no network here).

Rules:
- Every frame is a JSON object with an ``event``. From the phone side: ``connected`` (first,
  ``protocol`` "Call", ``version``), ``start`` (once: ``streamSid``, ``accountSid``, ``callSid``,
  ``tracks``, ``customParameters``, ``mediaFormat`` {``encoding`` "audio/x-mulaw", ``sampleRate``
  8000, ``channels`` 1}), ``media`` (``media.payload``: base64 µ-law, 20 ms a frame; ``track``,
  ``chunk``, ``timestamp``), ``dtmf`` (``dtmf.digit``, ``dtmf.track``), ``mark`` (``mark.name``: a
  mark we sent, echoed once the audio before it has played, or at once when ``clear`` dropped
  it), ``stop`` (last). Every message but ``connected`` carries ``sequenceNumber`` (a string).
- To the phone side: ``media`` {``streamSid``, ``media.payload``}, ``mark`` {``streamSid``,
  ``mark.name``}, ``clear`` {``streamSid``}. Nothing is sent before ``start`` gave the streamSid.
- A frame that is not JSON, not an object, has an unknown ``event``, lacks a field, has bad
  base64, a media format other than µ-law 8 kHz mono, or comes in a state where it has no place
  raises :class:`PhoneProtocolError` (with a ``code``); the machine's state is unchanged, so the
  caller reports it for this call and reads on. Only a bad ``start`` ends the call (``fatal``).
  Its message names the field and shows the bad value (:func:`show`: cut to 40 characters),
  e.g. ``start.mediaFormat.sampleRate: 'abc' is not an integer``; never a bare exception's text.
- ``connected`` is optional (some providers that speak this protocol skip it).

States and transitions (anything else is refused):

    OPEN      --connected--> CONNECTED
    OPEN/CONNECTED --start--> STREAMING
    STREAMING --media/dtmf/mark--> STREAMING
    STREAMING --stop--> STOPPED
    any       --socket closed--> STOPPED      (closed(): a hang-up without a stop)
"""
from __future__ import annotations

import base64
import binascii
import enum
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from engine.errors import EngineError

#: the only format Twilio streams: G.711 µ-law, 8 kHz, mono
MEDIA_ENCODING = "audio/x-mulaw"
MEDIA_RATE_HZ = 8000
FRAME_MS = 20
FRAME_BYTES = MEDIA_RATE_HZ * FRAME_MS // 1000     # 160 bytes of µ-law a 20 ms frame
DTMF_DIGITS = frozenset("0123456789*#ABCD")


class PhoneProtocolError(EngineError):
    """A phone-side message this machine refuses; ``code`` names why, ``fatal`` ends the call."""

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal


class StreamState(enum.Enum):
    OPEN = "open"
    CONNECTED = "connected"
    STREAMING = "streaming"
    STOPPED = "stopped"


#: (state, event) -> next state
TRANSITIONS: dict[tuple[StreamState, str], StreamState] = {
    (StreamState.OPEN, "connected"): StreamState.CONNECTED,
    (StreamState.OPEN, "start"): StreamState.STREAMING,
    (StreamState.CONNECTED, "start"): StreamState.STREAMING,
    (StreamState.STREAMING, "media"): StreamState.STREAMING,
    (StreamState.STREAMING, "dtmf"): StreamState.STREAMING,
    (StreamState.STREAMING, "mark"): StreamState.STREAMING,
    (StreamState.STREAMING, "stop"): StreamState.STOPPED,
}
EVENTS = frozenset(e for _, e in TRANSITIONS)


@dataclass(frozen=True)
class ConnectedMsg:
    protocol: str
    version: str


@dataclass(frozen=True)
class StartMsg:
    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MediaMsg:
    ulaw: bytes                 #: µ-law 8 kHz bytes (one byte a frame)
    track: str
    timestamp_ms: int | None    #: since the stream started, by the phone side's clock


@dataclass(frozen=True)
class DtmfMsg:
    digit: str
    track: str


@dataclass(frozen=True)
class MarkMsg:
    name: str


@dataclass(frozen=True)
class StopMsg:
    call_sid: str


PhoneEvent = ConnectedMsg | StartMsg | MediaMsg | DtmfMsg | MarkMsg | StopMsg


def show(value: object, limit: int = 40) -> str:
    """``value`` for an error message: its repr, cut to ``limit`` characters (it may be anything
    the peer sent, of any size)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true/false", type(None): "null"}.get(type(value), type(value).__name__)


def _obj(msg: Mapping[str, Any], key: str, event: str) -> Mapping[str, Any]:
    value = msg.get(key)
    if not isinstance(value, dict):
        got = "missing" if key not in msg else f"{_kind(value)}, not an object"
        raise PhoneProtocolError("missing_field", f"{key}: {got}; a {event!r} message needs {key!r} as an object",
                                 fatal=event == "start")
    return value


def _str(obj: Mapping[str, Any], key: str, event: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if isinstance(value, str) and value:
        return value
    if required:
        got = "missing" if key not in obj else f"{show(value)} is not a non-empty string"
        raise PhoneProtocolError("missing_field", f"{event}.{key}: {got}", fatal=event == "start")
    return ""


def _media_format(fmt: object) -> None:
    """``start.mediaFormat``: absent keys take Twilio's values; anything else but µ-law 8 kHz mono
    is refused, naming the field and its value."""
    def bad(key: str, why: str) -> PhoneProtocolError:
        return PhoneProtocolError("media_format", f"start.mediaFormat.{key}: {why} (only {MEDIA_ENCODING} at "
                                  f"{MEDIA_RATE_HZ} Hz mono is spoken)", fatal=True)
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise PhoneProtocolError("media_format", f"start.mediaFormat: {_kind(fmt)}, not an object", fatal=True)
    encoding = fmt.get("encoding", MEDIA_ENCODING)
    if encoding != MEDIA_ENCODING:
        raise bad("encoding", f"{show(encoding)} is not {MEDIA_ENCODING!r}")
    for key, want in (("sampleRate", MEDIA_RATE_HZ), ("channels", 1)):
        value = fmt.get(key, want)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(key, f"{show(value)} is not an integer")
        if value != want:
            raise bad(key, f"{value} is not {want}")


class TwilioStream:
    """One Media Streams WebSocket: ``receive(text)`` -> event; ``media``/``mark``/``clear`` -> text."""

    def __init__(self) -> None:
        self.state = StreamState.OPEN
        self.stream_sid: str | None = None
        self.start: StartMsg | None = None
        self.received = 0
        self.refused = 0

    # ------------------------------------------------------------ from the phone side
    def receive(self, text: str | bytes) -> PhoneEvent:
        """Parse one frame and move the state; :class:`PhoneProtocolError` leaves the state as it was."""
        try:
            msg = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:   # (JSON nested past the parser's depth)
            where = f" (at character {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
            raise self._refuse("not_json", f"a frame that is not JSON{where}: {show(text)}") from None
        if not isinstance(msg, dict):
            raise self._refuse("not_an_object", f"a Media Streams message is a JSON object, not {_kind(msg)}: "
                                                f"{show(msg)}")
        event = msg.get("event")
        if event not in EVENTS:
            got = "missing" if "event" not in msg else f"{show(event)} is not one of {', '.join(sorted(EVENTS))}"
            raise self._refuse("unknown_event", f"event: {got}")
        to = TRANSITIONS.get((self.state, event))
        if to is None:
            before = self.state in (StreamState.OPEN, StreamState.CONNECTED)
            raise self._refuse("out_of_order", f"event: {event!r} cannot come while the stream is {self.state.value}"
                                               + (" (before its 'start')" if before else ""))
        try:
            parsed = getattr(self, "_parse_" + event)(msg)
        except PhoneProtocolError:
            self.refused += 1
            raise
        if isinstance(parsed, StartMsg):
            self.start, self.stream_sid = parsed, parsed.stream_sid
        self.state = to
        self.received += 1
        return parsed

    def closed(self) -> None:
        """The socket closed (with or without a ``stop``)."""
        self.state = StreamState.STOPPED

    def _refuse(self, code: str, message: str) -> PhoneProtocolError:
        self.refused += 1
        return PhoneProtocolError(code, message)

    def _parse_connected(self, msg: Mapping[str, Any]) -> ConnectedMsg:
        return ConnectedMsg(str(msg.get("protocol") or ""), str(msg.get("version") or ""))

    def _parse_start(self, msg: Mapping[str, Any]) -> StartMsg:
        start = _obj(msg, "start", "start")
        _media_format(start.get("mediaFormat"))
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):   # (its value is not shown: it may hold a token)
            raise PhoneProtocolError("missing_field", f"start.customParameters: {_kind(params)}, not an object",
                                     fatal=True)
        tracks = start.get("tracks") or ["inbound"]
        return StartMsg(stream_sid=_str(start, "streamSid", "start"), call_sid=_str(start, "callSid", "start"),
                        account_sid=_str(start, "accountSid", "start", required=False),
                        tracks=tuple(str(t) for t in tracks) if isinstance(tracks, list) else ("inbound",),
                        custom_parameters={str(k): str(v) for k, v in params.items()})

    def _parse_media(self, msg: Mapping[str, Any]) -> MediaMsg:
        media = _obj(msg, "media", "media")
        payload = media.get("payload")
        if not isinstance(payload, str):
            got = "missing" if "payload" not in media else f"{_kind(payload)}, not base64 text"
            raise PhoneProtocolError("missing_field", f"media.payload: {got}")
        try:
            ulaw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise PhoneProtocolError("bad_payload", f"media.payload: {show(payload)} is not base64") from None
        ts = media.get("timestamp")
        try:
            timestamp_ms = int(ts) if ts is not None else None
        except (TypeError, ValueError):
            timestamp_ms = None
        return MediaMsg(ulaw, str(media.get("track") or "inbound"), timestamp_ms)

    def _parse_dtmf(self, msg: Mapping[str, Any]) -> DtmfMsg:
        dtmf = _obj(msg, "dtmf", "dtmf")
        digit = _str(dtmf, "digit", "dtmf")
        if digit not in DTMF_DIGITS:
            raise PhoneProtocolError("bad_digit", f"dtmf.digit: {show(digit)} is not one of 0-9 * # A-D")
        return DtmfMsg(digit, str(dtmf.get("track") or "inbound_track"))

    def _parse_mark(self, msg: Mapping[str, Any]) -> MarkMsg:
        return MarkMsg(_str(_obj(msg, "mark", "mark"), "name", "mark"))

    def _parse_stop(self, msg: Mapping[str, Any]) -> StopMsg:
        raw = msg.get("stop")
        stop: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        return StopMsg(str(stop.get("callSid") or (self.start.call_sid if self.start else "")))

    # ------------------------------------------------------------ to the phone side
    def _sid(self) -> str:
        if self.stream_sid is None:
            raise PhoneProtocolError("not_started", "nothing can be sent before the stream's 'start'")
        return self.stream_sid

    def media(self, ulaw: bytes) -> str:
        return json.dumps({"event": "media", "streamSid": self._sid(),
                           "media": {"payload": base64.b64encode(ulaw).decode("ascii")}})

    def mark(self, name: str) -> str:
        return json.dumps({"event": "mark", "streamSid": self._sid(), "mark": {"name": name}})

    def clear(self) -> str:
        return json.dumps({"event": "clear", "streamSid": self._sid()})

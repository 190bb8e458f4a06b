"""The local server's stand-in for OpenAI's SIP side: incoming calls, their signed webhooks, the
call endpoints of both voice APIs, and a scripted caller on the line.

What OpenAI does, as documented (``providers-and-sip.md``), and here:

- An incoming call raises two webhooks, ``realtime.call.incoming`` (``rtc_…``) and
  ``live.transport.incoming`` (``live_…``), posted signed (Standard Webhooks, the secret in
  ``$OPENAI_WEBHOOK_SECRET``) to the application's URL. The first successful accept, on either
  API, picks the call's API; the other id is then dead.
- ``POST /v1/realtime/calls/{call_id}/accept|reject|refer|hangup`` and
  ``POST /v1/live/sessions/{session_id}/accept|reject|refer|hangup``, with their documented bodies
  and errors: a Realtime accept takes a flat session (``type: realtime``), a Live accept
  ``{"session": {"type": "live", …}}`` with no audio format; a Live reject needs ``status_code``
  (300-699), a Realtime one defaults to 603; refer takes a ``tel:`` or ``sip:`` ``target_uri``. A
  call not accepted within its ring time is gone (404 ``call_id_not_found``, as a slow accept gets).
- Control: the Realtime call socket ``/v1/realtime?call_id=…`` (the GA protocol on the running
  call: no audio deltas, ``output_audio_buffer.started/stopped``, the caller's keys as
  ``input_audio_buffer.dtmf_event_received``), and the Live sideband ``…/{session_id}/attach``
  (:mod:`engine.server.live_app`; ``transport.dtmf.received`` / ``transport.dtmf.send``).
- The caller (:mod:`engine.server.sip_caller`) speaks with espeak-ng, presses keys and hangs up
  as its script says; it hears the model's audio.

The stand-in's own endpoints (not OpenAI's; under ``/v1/x/sip``): ``POST /v1/x/sip/calls`` places
an incoming call, ``GET /v1/x/sip/calls/{id}[?wait=ended]`` reports it (``wait`` holds the answer
up to WAIT_REPORT_S for the call to end), ``GET /v1/x/sip/calls`` lists them.

A stand-in call's phases (``PHASES``: (phase, event) -> next)::

    RINGING --accept--> ANSWERED --end--> ENDED      (caller hung up, hangup, refer, session closed)
    RINGING --reject--> REJECTED
    RINGING --ring_timeout--> MISSED
"""
from __future__ import annotations

import asyncio
import base64
import enum
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from engine.server.dialects import azure_path
from engine.httpio import HttpClientError, HttpRequest, HttpResponse, request
from engine.server.live_app import Outbox, LiveConnection
from engine.server.live_protocol import SESSION_CONFIG
from engine.server.protocol import ProtocolError, default_session, merge_session_update, new_id
from engine.server.session import Actions, Item
from engine.server.sip_caller import Caller, ScriptError, parse_script
from engine.webhooks import SECRET_ENV, signed_headers

if TYPE_CHECKING:
    from engine.server.app import ServerConfig

log = logging.getLogger("realtalk.server")

RING_TIMEOUT_S = 10.0          #: a call not accepted by then is gone (404 on a later accept)
WAIT_REPORT_S = 8.0            #: ?wait=ended holds a report this long at most (under the socket's open timeout)
WEBHOOK_RETRIES = 2            #: a delivery answered 5xx or not at all is sent again this many times
WEBHOOK_RETRY_S = 0.2
CALLS_KEPT = 2000              #: ended calls kept for their reports
_CALL_PATH = re.compile(r"^/v1/(realtime/calls|live/sessions)/([^/]+)/(accept|reject|refer|hangup)/?$")
_REPORT_PATH = re.compile(r"^/v1/x/sip/calls(?:/([^/]+))?/?$")
_URI = re.compile(r"^(tel:\+?[0-9*#A-D().\- ]+|sips?:[^\s@]+(@[^\s]+)?)$")


class Phase(str, enum.Enum):
    RINGING = "ringing"
    ANSWERED = "answered"
    ENDED = "ended"
    REJECTED = "rejected"
    MISSED = "missed"


PHASES: dict[tuple[Phase, str], Phase] = {
    (Phase.RINGING, "accept"): Phase.ANSWERED,
    (Phase.RINGING, "reject"): Phase.REJECTED,
    (Phase.RINGING, "ring_timeout"): Phase.MISSED,
    (Phase.ANSWERED, "end"): Phase.ENDED,
}


def api_error(status: int, code: str, message: str, param: str | None = None,
              etype: str = "invalid_request_error") -> HttpResponse:
    """An error answer in the API's shape."""
    return HttpResponse.json(status, {"error": {"message": message, "type": etype, "param": param, "code": code}})


@dataclass
class Delivery:
    event_type: str
    attempt: int
    status: int | None
    error: str | None = None
    ms: float = 0.0


@dataclass
class StandInCall:
    """One incoming call on the stand-in."""
    rtc_id: str
    live_id: str
    sip_call_id: str
    headers: list[dict[str, str]]
    caller: Caller
    media_security: str | None
    ring_timeout_s: float
    phase: Phase = Phase.RINGING
    api: str | None = None
    accepted_with: dict[str, Any] | None = None
    reject_status: int | None = None
    refer_to: str | None = None
    ended_by: str | None = None            #: caller | hangup | refer | session_closed | server_stopped
    leg: Any = None
    deliveries: list[Delivery] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    placed_s: float = field(default_factory=time.monotonic)
    answered_s: float | None = None
    ended_s: float | None = None
    first_webhook_s: float | None = None   #: when the first delivery of it went out (monotonic)
    accept_asked_s: float | None = None    #: when an accept for it came in
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def go(self, event: str) -> None:
        new = PHASES.get((self.phase, event))
        if new is None:
            raise ProtocolError("call_not_active", f"The call is {self.phase.value}; it cannot {event}.")
        self.phase = new
        if new is not Phase.ANSWERED:
            self.ended_s = time.monotonic()
            self.done.set()

    def report(self) -> dict[str, Any]:
        end = self.ended_s or time.monotonic()
        return {"call_id": self.rtc_id, "session_id": self.live_id, "sip_call_id": self.sip_call_id,
                "phase": self.phase.value, "api": self.api, "accepted_with": self.accepted_with,
                "reject_status": self.reject_status, "refer_to": self.refer_to, "ended_by": self.ended_by,
                "duration_s": round(end - self.answered_s, 3) if self.answered_s else 0.0,
                "webhook_to_accept_ms": round((self.accept_asked_s - self.first_webhook_s) * 1000, 2)
                if self.accept_asked_s is not None and self.first_webhook_s is not None else None,
                "first_webhook_mono_s": self.first_webhook_s, "accept_asked_mono_s": self.accept_asked_s,
                "sip_headers": self.headers, "caller": self.caller.report(), "warnings": list(self.warnings),
                "webhooks": [d.__dict__ for d in self.deliveries],
                "monitors": self.leg.monitor_count() if self.leg is not None else 0}


class Registry:
    """Every stand-in call, by both ids."""

    def __init__(self) -> None:
        self.calls: dict[str, StandInCall] = {}
        self.order: list[StandInCall] = []

    def add(self, call: StandInCall) -> None:
        self.calls[call.rtc_id] = self.calls[call.live_id] = call
        self.order.append(call)
        while len(self.order) > CALLS_KEPT and self.order[0].phase is not Phase.RINGING \
                and self.order[0].phase is not Phase.ANSWERED:
            old = self.order.pop(0)
            self.calls.pop(old.rtc_id, None)
            self.calls.pop(old.live_id, None)


CALLS = Registry()


# ---------------------------------------------------------------------------------- the two legs
class RealtimeLeg:
    """A call answered on Realtime: a GA session the caller's line feeds, watched and steered by
    call sockets (``?call_id=``). The session is :class:`engine.server.app.Connection`'s own; its
    events go to every call socket, the audio to the caller only."""

    def __init__(self, call: StandInCall, cfg: "ServerConfig", body: dict[str, Any]) -> None:
        from engine.server.app import Connection   # the GA session's I/O; imported here (app imports this module)

        leg = self

        class _Conn(Connection):
            async def send(self, event: dict[str, Any]) -> None:   # every session event passes here
                await leg.on_event(event)

            async def apply(self, acts: Actions) -> None:
                for item in acts.transcribe:
                    leg.exact_words(item)
                await super().apply(acts)

        self.call = call
        self.conn = _Conn(None, cfg, body.get("model", "gpt-realtime"),  # type: ignore[arg-type]
                          cfg.speed)
        self.body = body
        self.monitors: dict[str, Outbox] = {}
        self.playing: set[str] = set()      #: responses whose audio reached the caller
        self.ended = False

    def monitor_count(self) -> int:
        return len(self.monitors)

    def exact_words(self, item: Item) -> None:
        """The stand-in knows what its caller said: a turn's words are the script's, not a guess."""
        if item.heard is None:
            said = self.call.caller.pop_said()
            if said is not None:
                item.heard = said

    async def start(self) -> None:
        conn = self.conn   # the accept's session, as a session.update (checked already by accept())
        await conn.apply(conn.session.receive_text(json.dumps({"type": "session.update", "session": self.body})))
        self.call.caller.start(self)

    async def on_event(self, event: dict[str, Any]) -> None:
        etype = event["type"]
        if etype == "response.output_audio.delta":
            rid = event["response_id"]
            if rid not in self.playing:
                self.playing.add(rid)
                self.broadcast({"type": "output_audio_buffer.started", "event_id": new_id("event"),
                                "response_id": rid})
            self.call.caller.hear(base64.b64decode(event["delta"]))
            return
        if etype == "response.output_audio_transcript.done":
            self.call.caller.heard_words(event.get("transcript", ""))
        self.broadcast(event)
        if etype == "response.done":
            rid = event["response"]["id"]
            if rid in self.playing:
                self.playing.discard(rid)
                cancelled = event["response"]["status"] == "cancelled"
                self.broadcast({"type": "output_audio_buffer.cleared" if cancelled else "output_audio_buffer.stopped",
                                "event_id": new_id("event"), "response_id": rid})

    def broadcast(self, event: dict[str, Any]) -> None:
        for box in list(self.monitors.values()):
            box.put(event)

    # the caller's line
    async def caller_audio(self, pcm: bytes) -> None:
        if not self.ended:
            msg = '{"type":"input_audio_buffer.append","audio":"' + base64.b64encode(pcm).decode("ascii") + '"}'
            await self.conn.apply(self.conn.session.receive_text(msg))

    async def caller_dtmf(self, key: str) -> None:
        self.broadcast({"type": "input_audio_buffer.dtmf_event_received", "event": key,
                        "received_at": int(time.time())})

    async def caller_hangup(self) -> None:
        end_call(self.call, "caller")

    # call sockets
    async def attach(self, ws: ServerConnection) -> None:
        sid = new_id("mon")
        box = Outbox(ws, f"call socket {sid}", 4000)
        self.monitors[sid] = box
        box.put(self.conn.session.created_event())
        try:
            async for message in ws:
                acts = self.conn.session.receive_text(message)
                errors = [e for e in acts.send if e["type"] == "error"]
                acts.send = [e for e in acts.send if e["type"] != "error"]
                for e in errors:
                    box.put(e)      # a refused event's error goes to the socket that sent it
                await self.conn.apply(acts)
        except ConnectionClosed:
            pass
        finally:
            self.monitors.pop(sid, None)
            box.close(1000, "")
            try:
                await asyncio.wait_for(asyncio.shield(box.task), 1.0)
            except (asyncio.TimeoutError, ConnectionClosed):
                pass

    def end(self, reason: str) -> None:
        self.ended = True
        self.call.caller.stop()
        self.conn.closed = True
        for task in list(self.conn.tasks):
            task.cancel()
        for box in list(self.monitors.values()):
            box.close(1000, reason)


class _CallerSocket:
    """The primary of a Live SIP session: the caller's line, in place of a client's WebSocket.
    It yields ``session.start`` (the accept's session) and then the line's audio; what the session
    sends it, the caller hears."""

    def __init__(self, leg: "LiveLeg", start: dict[str, Any]) -> None:
        self.leg = leg
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.queue.put_nowait(json.dumps({"type": "session.start", "session": start}))
        self.transport = self            # abort() stands in for the transport's

    def __aiter__(self) -> "_CallerSocket":
        return self

    async def __anext__(self) -> str:
        msg = await self.queue.get()
        if msg is None:
            raise StopAsyncIteration
        return msg

    async def send(self, text: str) -> None:
        event = json.loads(text)
        etype = event.get("type")
        caller = self.leg.call.caller
        if etype == "session.output_audio.delta":
            caller.hear(self.leg.decode_output(event["delta"]))
        elif etype == "session.output_transcript.delta":
            caller.heard_words(event.get("delta", ""))
        elif etype == "transport.dtmf.sent":
            caller.dtmf_from_app(event["event"])
        elif etype == "session.closed" and not self.leg.ended:
            end_call(self.leg.call, "session_closed")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.queue.put_nowait(None)

    def abort(self) -> None:
        self.queue.put_nowait(None)


class LiveLeg:
    """A call answered on GPT-Live: a Live session whose primary is the caller's line; sidebands
    attach through :mod:`engine.server.live_app` as to any Live session."""

    def __init__(self, call: StandInCall, cfg: "ServerConfig", session: dict[str, Any]) -> None:
        leg = self
        start = {k: v for k, v in session.items() if k != "type"}
        start["audio"] = {**(start.get("audio") or {}), "format": {"type": "audio/pcm", "rate": 24000}}
        self.socket = _CallerSocket(self, start)

        class _Conn(LiveConnection):
            async def recognise(self, turn: Any) -> None:
                if turn.heard is None:
                    turn.heard = leg.call.caller.pop_said()
                await super().recognise(turn)

        faults = cfg.faults.merged(cfg.scenario.faults)
        self.conn = _Conn(self.socket, cfg.scenario, faults,  # type: ignore[arg-type]
                          cfg.asr, cfg.speed)
        self.conn.session.sip = True
        self.conn.session.preset_id = call.live_id
        self.call = call
        self.ended = False
        self.task: asyncio.Task[None] | None = None

    def monitor_count(self) -> int:
        return len(self.conn.sidebands)

    @staticmethod
    def decode_output(delta: str) -> bytes:
        return base64.b64decode(delta)

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.conn.run(), name=f"live call {self.call.live_id}")
        self.call.caller.start(self)

    async def caller_audio(self, pcm: bytes) -> None:
        if not self.ended:
            self.socket.queue.put_nowait('{"type":"session.input_audio.append","audio":"'
                                         + base64.b64encode(pcm).decode("ascii") + '"}')

    async def caller_dtmf(self, key: str) -> None:
        self.conn.apply(self.conn.session.dtmf_received(key))

    async def caller_hangup(self) -> None:
        end_call(self.call, "caller")

    def end(self, reason: str) -> None:
        self.ended = True
        self.call.caller.stop()
        self.conn.end_reason = "close_requested" if reason == "hangup" else "remote_hangup"
        self.socket.queue.put_nowait(None)


def end_call(call: StandInCall, by: str) -> None:
    """End an answered call once (whoever ends it first says how)."""
    if call.phase is not Phase.ANSWERED:
        return
    call.ended_by = by
    call.go("end")
    if call.leg is not None:
        call.leg.end(by)
    log.info("local SIP: call %s ended by %s after %.1f s", call.sip_call_id, by,
             (call.ended_s or 0) - (call.answered_s or 0))


# ---------------------------------------------------------------------------------- HTTP endpoints
def _check_auth(req: HttpRequest, cfg: "ServerConfig") -> HttpResponse | None:
    key = cfg.api_key
    if key is not None and not key_matches(req.headers.get("authorization", ""), key) \
            and not (cfg.dialect == "azure" and key_matches(req.headers.get("api-key", ""), key, bearer=False)):
        return api_error(401, "invalid_api_key", "Incorrect API key provided.")
    return None


def key_matches(given: str, key: str, bearer: bool = True) -> bool:
    """Whether a request's ``Authorization`` (``bearer``) or ``api-key`` header carries ``key``,
    compared in constant time (a loopback port is every local user's)."""
    want = f"Bearer {key}" if bearer else key
    return hmac.compare_digest(given.encode(), want.encode())


async def handle_http(req: HttpRequest, cfg: "ServerConfig") -> HttpResponse:
    """Every plain HTTP request to the local server: the SIP call endpoints and the stand-in's own."""
    denied = _check_auth(req, cfg)
    if denied is not None:
        return denied
    if cfg.dialect == "azure":   # Azure OpenAI's paths: /openai/v1/…
        own = azure_path(req.path)
        if own is None:
            return api_error(404, "not_found", f"Not found: {req.path}. Azure OpenAI's paths start /openai/v1/.")
        req.target = own + req.target[len(req.path):]
    m = _CALL_PATH.match(req.path)
    if m is not None:
        if req.method != "POST":
            return api_error(405, "method_not_allowed", f"{req.method} is not allowed here; use POST.")
        api = "realtime" if m.group(1) == "realtime/calls" else "live"
        return await call_endpoint(api, m.group(2), m.group(3), req, cfg)
    m = _REPORT_PATH.match(req.path)
    if m is not None:
        if req.method == "POST" and m.group(1) is None:
            return await place_call(req, cfg)
        if req.method == "GET":
            return await report(m.group(1), req)
        return api_error(405, "method_not_allowed", f"{req.method} is not allowed on {req.path}.")
    return api_error(404, "not_found", f"Not found: {req.method} {req.path}. The local server's REST endpoints are "
                     "/v1/realtime/calls/{call_id}/(accept|reject|refer|hangup), /v1/live/sessions/{session_id}/"
                     "(accept|reject|refer|hangup) and the stand-in's /v1/x/sip/calls.")


def _body(req: HttpRequest, required: bool = True) -> dict[str, Any]:
    if not req.body:
        if required:
            raise ProtocolError("invalid_request_error", "The request needs a JSON body.")
        return {}
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("invalid_json", "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise ProtocolError("invalid_type", "The request body must be a JSON object.")
    return body


async def call_endpoint(api: str, call_id: str, action: str, req: HttpRequest,
                        cfg: "ServerConfig") -> HttpResponse:
    call = CALLS.calls.get(call_id)
    wanted_prefix = "rtc_" if api == "realtime" else "live_"
    if call is None or not call_id.startswith(wanted_prefix):
        what = "call_id" if api == "realtime" else "session_id"
        return api_error(404, f"{'call_id' if api == 'realtime' else 'session'}_not_found",
                         f"No pending or active SIP call with {what} '{call_id}'.", what)
    try:
        body = _body(req, required=action in ("accept", "refer") or (action == "reject" and api == "live"))
        if action == "accept":
            return await accept(call, api, body, cfg)
        if action == "reject":
            return reject(call, api, body)
        if call.phase is not Phase.ANSWERED or call.api != api:
            return api_error(400, "call_not_active", f"The call is {call.phase.value}"
                             + (f" on {call.api}" if call.api and call.api != api else "") + f"; cannot {action} it.")
        if action == "refer":
            target = body.get("target_uri")
            if not isinstance(target, str) or not target.strip():
                return api_error(400, "missing_required_parameter", "Missing required parameter: 'target_uri'.",
                                 "target_uri")
            if not _URI.match(target.strip()):
                return api_error(400, "invalid_value", f"Invalid 'target_uri': {target!r}. Use a tel: or sip: URI, "
                                 "for example tel:+14155550123 or sip:agent@example.com.", "target_uri")
            call.refer_to = target.strip()
            end_call(call, "refer")
            return HttpResponse(200)
        end_call(call, "hangup")
        return HttpResponse(200)
    except ProtocolError as exc:
        return api_error(400, exc.code, exc.message, exc.param)


async def accept(call: StandInCall, api: str, body: dict[str, Any], cfg: "ServerConfig") -> HttpResponse:
    if call.accept_asked_s is None:
        call.accept_asked_s = time.monotonic()
    if call.phase is Phase.MISSED or (call.phase is Phase.RINGING
                                      and time.monotonic() - call.placed_s > call.ring_timeout_s):
        if call.phase is Phase.RINGING:
            call.go("ring_timeout")
        return api_error(404, "call_id_not_found", "The call is no longer pending: it was not accepted in time.",
                         "call_id" if api == "realtime" else "session_id")
    if call.phase is not Phase.RINGING:
        return api_error(409, "call_already_accepted" if call.phase is Phase.ANSWERED else "call_not_pending",
                         f"The call is already {call.phase.value}" + (f" on {call.api}" if call.api else "") + ".")
    if api == "realtime":
        if body.get("type") != "realtime":
            raise ProtocolError("missing_required_parameter" if "type" not in body else "invalid_value",
                                "Missing required parameter: 'type' (always 'realtime')." if "type" not in body
                                else f"Invalid 'type': {body.get('type')!r}; expected 'realtime'.", "type")
        merge_session_update(default_session(body.get("model", "gpt-realtime"), "sess_check"), body, False)
        fmt_pinned = any(isinstance((body.get("audio") or {}).get(d), dict) and "format" in body["audio"][d]
                         for d in ("input", "output"))
        if fmt_pinned:
            call.warnings.append("the accept pins an audio format: on a real trunk G.711 is negotiated and a pinned "
                                 "format can break the caller's audio")
        leg: RealtimeLeg | LiveLeg = RealtimeLeg(call, cfg, body)
    else:
        session = body.get("session")
        if set(body) - {"session"}:
            raise ProtocolError("unknown_parameter", f"Unknown parameter: '{sorted(set(body) - {'session'})[0]}'.",
                                sorted(set(body) - {"session"})[0])
        if not isinstance(session, dict):
            raise ProtocolError("missing_required_parameter", "Missing required parameter: 'session'.", "session")
        if session.get("type") != "live":
            raise ProtocolError("invalid_value", "Invalid 'session.type': expected 'live'.", "session.type")
        if isinstance(session.get("audio"), dict) and "format" in session["audio"]:
            raise ProtocolError("unknown_parameter", "Unknown parameter: 'session.audio.format'. A SIP call's audio "
                                "format is negotiated on the SIP side.", "session.audio.format")
        for key in ("client", "wake_policy", "idle_timeout_s"):
            if key in session:
                raise ProtocolError("unknown_parameter", f"Unknown parameter: 'session.{key}'.", f"session.{key}")
        SESSION_CONFIG({k: v for k, v in session.items() if k != "type"}, "session")   # ProtocolError if bad
        leg = LiveLeg(call, cfg, session)
    call.go("accept")
    call.api, call.accepted_with, call.leg = api, body, leg
    call.answered_s = time.monotonic()
    await leg.start()
    log.info("local SIP: call %s accepted on %s", call.sip_call_id, api)
    return HttpResponse(200)


def reject(call: StandInCall, api: str, body: dict[str, Any]) -> HttpResponse:
    status = body.get("status_code")
    if status is None:
        if api == "live":
            return api_error(400, "missing_required_parameter", "Missing required parameter: 'status_code'.",
                             "status_code")
        status = 603
    if not isinstance(status, int) or isinstance(status, bool) or not 300 <= status <= 699:
        return api_error(400, "invalid_value", f"Invalid 'status_code': {status!r}; a SIP final status from 300 "
                         "to 699 (486 busy, 603 decline).", "status_code")
    if call.phase is not Phase.RINGING:
        return api_error(409, "call_not_pending", f"The call is {call.phase.value}; only a ringing call is rejected.")
    call.reject_status = status
    call.api = api
    call.go("reject")
    return HttpResponse(200)


# ---------------------------------------------------------------------------------- placing calls
_PLACE_KEYS = {"webhook_url", "from", "to", "sip_headers", "script", "webhooks", "deliveries", "sign",
               "media_security", "ring_timeout_s"}


async def place_call(req: HttpRequest, cfg: "ServerConfig") -> HttpResponse:
    """``POST /v1/x/sip/calls``: ring the application (both webhooks, signed) and answer 201 at once
    with the call's ids; the webhooks go out in the background."""
    try:
        body = _body(req)
        unknown = set(body) - _PLACE_KEYS
        if unknown:
            raise ProtocolError("unknown_parameter", f"Unknown parameter(s) {sorted(unknown)}; known: "
                                f"{sorted(_PLACE_KEYS)}.")
        url = body.get("webhook_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ProtocolError("missing_required_parameter", "'webhook_url': the application's webhook URL "
                                "(http://HOST:PORT/PATH).", "webhook_url")
        steps = parse_script(body.get("script"))
        kinds = body.get("webhooks", ["realtime", "live"])
        if not isinstance(kinds, list) or not kinds or set(kinds) - {"realtime", "live"}:
            raise ProtocolError("invalid_value", "'webhooks': a list of 'realtime' and/or 'live'.", "webhooks")
        sign = body.get("sign", "valid")
        if sign not in ("valid", "forged", "stale", "unsigned"):
            raise ProtocolError("invalid_value", "'sign': valid, forged, stale or unsigned.", "sign")
        secret = os.environ.get(SECRET_ENV, "")
        if not secret and sign != "unsigned":
            raise ProtocolError("no_webhook_secret", f"Set ${SECRET_ENV} for `engine serve` (the same secret the "
                                "application checks with) to place signed calls.")
    except (ProtocolError, ScriptError) as exc:
        code = exc.code if isinstance(exc, ProtocolError) else "invalid_value"
        return api_error(400, code, exc.message if isinstance(exc, ProtocolError) else str(exc),
                         exc.param if isinstance(exc, ProtocolError) else "script")
    sip_call_id = f"{secrets.token_hex(8)}@sip.local"
    frm = str(body.get("from", "+15550001111"))
    to = str(body.get("to", "+15550100"))
    headers = body.get("sip_headers") or [
        {"name": "From", "value": f"<sip:{frm}@sip.local>;tag={secrets.token_hex(4)}"},
        {"name": "To", "value": f"<sip:{to}@sip.api.openai.com>"},
        {"name": "Call-ID", "value": sip_call_id},
        {"name": "User-Agent", "value": "realtalk-local-sip"}]
    if not any(h.get("name", "").lower() == "call-id" for h in headers):
        headers = [*headers, {"name": "Call-ID", "value": sip_call_id}]
    sip_call_id = next(h["value"] for h in headers if h.get("name", "").lower() == "call-id")
    call = StandInCall(new_id("rtc"), new_id("live"), sip_call_id, headers, Caller(steps, cfg.speed),
                       body.get("media_security", "srtp"), float(body.get("ring_timeout_s", RING_TIMEOUT_S)))
    CALLS.add(call)
    deliveries = int(body.get("deliveries", 1))
    loop = asyncio.get_running_loop()
    for kind in kinds:
        loop.create_task(_deliver(call, kind, url, secret, sign, deliveries))
    loop.call_later(call.ring_timeout_s, _ring_timeout, call)
    return HttpResponse.json(201, {"call_id": call.rtc_id, "session_id": call.live_id, "sip_call_id": sip_call_id})


def _ring_timeout(call: StandInCall) -> None:
    if call.phase is Phase.RINGING:
        call.go("ring_timeout")


def webhook_body(call: StandInCall, kind: str) -> bytes:
    data: dict[str, Any]
    if kind == "realtime":
        etype, data = "realtime.call.incoming", {"call_id": call.rtc_id}
    else:
        etype, data = "live.transport.incoming", {"session_id": call.live_id, "type": "sip"}
    data["sip_headers"] = call.headers
    if call.media_security:
        data["sip_media_security"] = call.media_security
    return json.dumps({"object": "event", "id": new_id("evt"), "type": etype, "created_at": int(time.time()),
                       "data": data}, separators=(",", ":")).encode()


async def _deliver(call: StandInCall, kind: str, url: str, secret: str, sign: str, deliveries: int) -> None:
    """Post one webhook (``deliveries`` times, the same id: a duplicate), retrying a 5xx or no answer."""
    body = webhook_body(call, kind)
    webhook_id = "msg_" + secrets.token_hex(12)
    etype = json.loads(body)["type"]
    for attempt in range(deliveries):
        for _retry in range(WEBHOOK_RETRIES + 1):
            ts = int(time.time()) - (400 if sign == "stale" else 0)
            headers = {"content-type": "application/json", "user-agent": "OpenAI/1.0 (+local stand-in)"}
            if sign != "unsigned":
                key = secret if sign != "forged" else "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
                headers.update(signed_headers(key, webhook_id, ts, body))
            t0 = time.monotonic()
            if call.first_webhook_s is None:
                call.first_webhook_s = t0
            try:
                resp = await request("POST", url, headers=headers, body=body, timeout_s=10.0)
                call.deliveries.append(Delivery(etype, attempt + 1, resp.status, ms=(time.monotonic() - t0) * 1000))
                if resp.status < 500:
                    break
            except HttpClientError as exc:
                call.deliveries.append(Delivery(etype, attempt + 1, None, str(exc), (time.monotonic() - t0) * 1000))
            await asyncio.sleep(WEBHOOK_RETRY_S)


async def report(call_id: str | None, req: HttpRequest) -> HttpResponse:
    if call_id is None:
        return HttpResponse.json(200, {"calls": [c.report() for c in CALLS.order]})
    call = CALLS.calls.get(call_id)
    if call is None:
        return api_error(404, "call_id_not_found", f"No stand-in call '{call_id}'.")
    if "wait=ended" in req.target and call.phase in (Phase.RINGING, Phase.ANSWERED):
        try:
            await asyncio.wait_for(call.done.wait(), WAIT_REPORT_S)
        except asyncio.TimeoutError:
            pass
    return HttpResponse.json(200, call.report())


# ---------------------------------------------------------------------------------- call sockets
def realtime_call_socket_refusal(call_id: str) -> tuple[int, dict[str, Any]] | None:
    """Why ``/v1/realtime?call_id=…`` cannot attach (status, error body), or None."""
    call = CALLS.calls.get(call_id)
    if call is None or not call_id.startswith("rtc_"):
        return 404, {"error": {"type": "invalid_request_error", "code": "call_id_not_found",
                               "message": f"No SIP call '{call_id}'.", "param": "call_id"}}
    if call.phase is not Phase.ANSWERED or call.api != "realtime":
        return 400, {"error": {"type": "invalid_request_error", "code": "call_not_active",
                               "message": f"The call is {call.phase.value}"
                               + (f" on {call.api}" if call.api else "") + "; accept it on Realtime first.",
                               "param": "call_id"}}
    return None


async def attach_realtime(ws: ServerConnection, call_id: str) -> None:
    call = CALLS.calls.get(call_id)
    if call is None or not isinstance(call.leg, RealtimeLeg):
        await ws.close(1008, "call_not_active")
        return
    await call.leg.attach(ws)


def end_all() -> None:
    """The server stops: every answered call ends."""
    for call in list(CALLS.order):
        if call.phase is Phase.ANSWERED:
            end_call(call, "server_stopped")


"""A SIP call's control socket: the Realtime call socket (``/v1/realtime?call_id=…``) or the
GPT-Live sideband (``/v1/live/sessions/{id}/attach``), on the engine's one API link
(:mod:`engine.link`: the same policy, shell and protocol cores as every other session).

The call's audio is between the caller and the API: the core's audio actions (``Play``,
``Flush``, ``EndOfAudio``) have nothing to do here and its heard index is 0. Its publications go
on the bus with the call's ``sip_call_id``; its ``engine.status`` as ``sip.call.status``.

The call's session exists before its socket (the accept made it), so the link's first socket is
retried as any later one (``LinkRules.resumed``): an API not ready for the call right after the
accept (a 5xx, a 429, a 404) is tried again with backoff, RECONNECT_TRIES in all.

How a call ends, as this socket sees it:
- we asked (``cmd.sip.hangup``, ``cmd.sip.refer``): the service stops the link;
- GPT-Live: ``session.closed`` (the core publishes ``engine.status`` ``session_closed``);
- Realtime: the call socket closes and opening it again is answered 404, 400 or 410 (the call is
  gone): ``remote_ended``;
- the engine gives up on it (the service hangs it up): the link gave up or was refused
  (``error``, its ``engine.error`` published with ``call_fatal``), the core failed (``error``),
  the call spent ``budget_usd`` (``budget``: a GPT-Live core closes its session; a Realtime core
  only stops asking for responses, while server VAD goes on making them, so the call is ended).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping

from engine.link.backends import backend_for
from engine.link.policy import BACKOFF_S, Fatal, LinkRules
from engine.link.shell import ApiLink
from engine.realtime.core import RealtimeCore
from engine.realtime.dialects import dialect_for
from engine.realtime.live_core import LiveCore
from engine.realtime.records import Command, EndOfAudio, Flush, Input, Play, Publish

if TYPE_CHECKING:
    from engine.sip.service import CallRun, SipService

#: topics whose name is the engine's single session: a call's go out under sip.call.*
TOPIC_RENAMES = {"engine.status": "sip.call.status", "conversation.history": "sip.call.history"}
#: the command intake's hand-over topic: the broker holds nothing for engine sip (its intake acks only)
DROPPED_TOPICS = frozenset({"intake.taken"})
#: tries in a row to open a call's control socket (the first one, or after a drop) before the engine
#: gives up on the call (about 8 s with CONTROL_BACKOFF_S: 0.2, 0.5, 1, 2, 4 s between them)
RECONNECT_TRIES = 6
CONTROL_BACKOFF_S = BACKOFF_S
#: a reconnect answered with one of these: the call is over (the API no longer knows it as active)
CALL_GONE = ("HTTP 404", "HTTP 400", "HTTP 410")


class CallControl:
    """What the service holds of a call's control socket."""

    def __init__(self, svc: "SipService", run: "CallRun") -> None:
        self.svc = svc
        self.run = run
        route = run.call.route
        model = (route.model if route else "") or ("gpt-live-1" if run.api == "live" else "gpt-realtime")
        budget = svc.cfg.get("budget_usd")
        if run.api == "realtime":
            session: dict[str, Any] = {"type": "realtime"}        # the accept set the rest; no audio format
            if route and route.tools:
                session["tools"] = [dict(t) for t in route.tools]
            self.core: Any = RealtimeCore(model, session, barge_in=False, budget_usd=budget, keeps_session=True)
            url = f"{svc.ws_base}/realtime?call_id={run.sip_call_id}"
            backend = backend_for(model)
        else:
            self.core = LiveCore(model, {"delegation": route.delegation} if route and route.delegation else {},
                                 budget_usd=budget, sideband=True)
            url = f"{svc.ws_base}/live/sessions/{run.sip_call_id}/attach"
            backend = backend_for(model)      # no audio is ever sent on /attach
        self.link = ApiLink(backend, self.core, self, url, svc.api_headers,
                            LinkRules(url.split("?")[0], key_env=svc.key_env, max_tries=RECONNECT_TRIES,
                                      resumed=True, backoff_s=CONTROL_BACKOFF_S),
                            name=f"sip {run.sip_call_id}", on_error=self.failed,
                            dialect=dialect_for(svc.provider, model))
        self.how: str | None = None
        self.greeting = route.greeting if route else None

    # ------------------------------------------------------------ LinkHost
    def heard_index(self, now_s: float) -> int:
        return 0

    def received(self, event: Mapping[str, Any], in_s: float) -> None:
        pass

    def perform(self, act: Play | Flush | EndOfAudio | Publish, now_s: float) -> Input | None:
        if not isinstance(act, Publish):
            return None                         # the audio is on the SIP leg
        if act.topic in DROPPED_TOPICS:
            return None
        body = dict(act.payload)
        topic = TOPIC_RENAMES.get(act.topic, act.topic)
        if act.topic == "cost.session" and isinstance(body.get("usd"), (int, float)):
            self.run.usd = float(body["usd"])
        if act.topic == "engine.status" and body.get("state") == "session_closed":
            self.how = self.how or "remote_ended"   # GPT-Live: the session (the call) closed
            self.link.stop()
        if act.topic == "engine.error" and body.get("code") == "connect_failed" and self.run.api_connected \
                and any(s in str(body.get("message", "")) for s in CALL_GONE):
            self.how = self.how or "remote_ended"   # Realtime: the call socket closed and the call is gone
            self.link.stop()
            return None
        if act.topic == "engine.status" and body.get("state") == "connected":
            self.run.api_connected = True
        if act.topic == "engine.status" and body.get("state") == "reconnected" and body.get("reason") == "restart":
            return None                             # the call's first socket (the link's resumed start)
        if act.topic == "engine.budget" and body.get("exceeded") and self.run.api == "realtime" \
                and self.how is None:
            # a Realtime core only refuses the responses the engine asks for; server VAD makes its
            # own: the call is ended (the service hangs it up), as a GPT-Live core ends its session
            self.svc.publish(self.run, topic, body)
            self.how = "budget"
            self.svc.publish(self.run, "engine.error", {
                "source": "engine", "code": "budget_exceeded", "call_fatal": True,
                "message": f"budget_usd reached (${float(body.get('usd') or 0.0):.4f} of "
                           f"${float(body.get('budget_usd') or 0.0):.4f}): hanging up the call"})
            self.link.stop()
            return None
        if act.topic == "engine.error" and body.pop("fatal", False):
            # the call's core cannot go on (a GPT-Live budget spent: its session, the call, was
            # closed): the call's error, never the engine's (a fatal one stops the engine and every call)
            body["call_fatal"] = True
            self.how = "budget" if body.get("code") == "budget_exceeded" else "error"
            self.link.stop()
        self.svc.publish(self.run, topic, body)
        return None

    # ------------------------------------------------------------ the service's side
    def command(self, topic: str, body: dict[str, Any]) -> None:
        self.link.step(Command(topic, body))

    def stop(self) -> None:
        self.link.stop()

    def failed(self, exc: BaseException) -> None:
        self.svc.error(self.run.sip_call_id, "call_failed", f"{type(exc).__name__}: {exc}", fatal=True)
        self.how = "error"
        self.link.stop()

    async def run_link(self) -> str:
        for topic, body in self.svc.global_commands:       # tools registered for every call
            self.core.handle(Command(topic, {k: v for k, v in body.items() if k != "id"}), time.monotonic(), 0)
        for topic, body in self.run.pending:              # commands that came before the socket
            self.link.step(Command(topic, body))
        self.run.pending.clear()
        if self.greeting and self.run.api == "realtime":
            self.link.step(Command("cmd.respond", {"response": {"instructions": self.greeting}}))
        elif self.greeting:
            self.link.step(Command("cmd.commentary", {"text": self.greeting}))
        fatal = await self.link.run()
        if self.how is not None:
            return self.how
        if fatal is not None:
            self.gave_up(fatal)
            return "error"
        return "ended"

    def gave_up(self, fatal: Fatal) -> None:
        """The link gave up (the socket could not be opened, or reopened; the key refused): the
        engine cannot steer the call, so it ends it (the service hangs it up)."""
        what = "was lost" if self.run.api_connected else "could not be opened"
        self.svc.error(self.run.sip_call_id, fatal.code,
                       f"the call's control socket {what}: {fatal.message}; hanging up the call", fatal=True)


async def attach(svc: "SipService", run: "CallRun") -> str:
    """Hold the call's control socket for its life; how it ended."""
    control = CallControl(svc, run)
    run.link, run.core = control, control.core
    svc.publish(run, "sip.call.started", {"api": run.api, "url": control.link.url.split("?")[0]})
    return await control.run_link()


"""``engine sip``'s I/O: the webhook endpoint, the REST calls that answer calls, the control
socket of each call, the bus. The decisions are :mod:`engine.webhooks` (is a delivery
genuine and new), :mod:`engine.sip.calls` (accept, reject, with what) and the protocol cores
(what to say on a call's control socket).

Rules:
- A delivery is answered at once: 400 when its signature, timestamp or headers are wrong (nothing
  is acted on; refusals are counted, and logged and published at most once a second per code,
  with the count and one example, never the body), 200 otherwise (a duplicate ``webhook-id`` is
  answered 200 and ignored). The accept or reject it decides goes out right after, in its own
  task: the webhook's answer never waits for OpenAI.
- A call the engine accepted and then gives up on (its control socket cannot be opened or fails,
  its budget is spent, the engine stops) is hung up (retried a few times), with the error that
  caused it: never left running at OpenAI with nothing steering it. A call never accepted is
  rejected (:mod:`engine.sip.calls` rule 6).
- Every bus message of a call carries ``sip_call_id`` (the id it was accepted or rejected
  under: ``rtc_…`` or ``live_…``). Commands name their call the same way; a command for a call
  this process does not hold is another worker's when ``sip.solo`` (several workers on one bus)
  and an error otherwise.
- Whatever goes wrong in one call is reported with its ``sip_call_id`` and ends at most that call.
- The webhook secret and the API key come from the environment and go nowhere else.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from bus import Publisher
from engine.httpio import HttpClientError, HttpRequest, HttpResponse, request, serve_http
from engine.once import AnsweredOnce
from engine.realtime.tools import registration_problem
from engine.sampling import ErrorSampler, Report
from engine.sip.calls import Accept, CallTable, Ignore, Missed, Reject, SipCall, called_number, parse_routes
from engine.webhooks import Dedup, Incoming, WebhookError, parse_incoming, secret_from_env, verify
from engine.specs import SipSpec
from engine.tasks import TaskSet

log = logging.getLogger("realtalk.sip")
#: what the service reads on the bus: commands, and the presence of the clients that sent them
BUS_TOPICS = ("cmd.", "engine.presence.gone")

STATUS_EVERY_S = 1.0
REST_TIMEOUT_S = 10.0
CALLS_LISTED = 200            #: calls engine status lists at most (the newest)
#: how a call ends when the engine gave up on it: it is hung up (the module's rules)
ABANDONED = frozenset({"error", "budget", "engine_stopped"})
HANGUP_TRIES = 3              #: a hang-up answered 429, 5xx or nothing is tried this many times in all
HANGUP_BACKOFF_S = (0.5, 1.0)  #: the wait before the 2nd, 3rd try
HANGUP_WAIT_S = 15.0          #: a hang-up's tries, all told
#: the engine stopping: every call's hang-up at once, within the supervisor's stop grace (3 s)
STOP_HANGUP_S = 2.0
#: what the stop waits beyond the hang-ups for the calls' ends to be published: the whole stop must
#: end inside the supervisor's 3 s grace (engine.supervisor.process GRACE_S), then it kills
STOP_MARGIN_S = 0.5


@dataclass
class CallRun:
    """What this process holds of one accepted call while it runs."""
    call: SipCall
    sip_call_id: str
    api: str
    accepted_s: float
    started_wall: float
    accept_ms: float = 0.0
    link: Any = None                       #: the control socket (engine.link), once attached
    core: Any = None
    task: asyncio.Task[Any] | None = None
    usd: float = 0.0
    ending: str | None = None              #: how we are ending it (hangup, refer), before the socket closes
    transcripts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: bus commands for the call that came before its control socket existed, in order
    pending: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    api_connected: bool = False            #: its control socket has been open once

    def summary(self) -> dict[str, Any]:
        inc = self.call.first
        return {"sip_call_id": self.sip_call_id, "api": self.api, "state": self.call.state.value,
                "from": inc.header("From"), "to": called_number(inc), "started_ts": round(self.started_wall, 3),
                "duration_s": round(time.monotonic() - self.accepted_s, 1), "usd": round(self.usd, 6),
                "accept_ms": round(self.accept_ms, 1)}


class SipService:
    """The webhook endpoint and every call of this process (module rules)."""

    def __init__(self, spec: SipSpec, publisher: Any = None,
                 environ: Mapping[str, str] = os.environ) -> None:
        cfg: Mapping[str, Any] = spec.config
        sip: dict[str, Any] = dict(spec.sip)
        self.cfg = cfg
        self.host: str = sip.get("host", "127.0.0.1")
        self.port: int = int(sip.get("port", 0))
        self.path: str = "/" + str(sip.get("path", "/openai/webhook")).lstrip("/")
        self.solo = spec.solo
        session = cfg.get("session") or {}
        defaults = {"model": cfg.get("model"), "instructions": session.get("instructions"),
                    "voice": session.get("voice")}
        if not sip.get("routes"):   # no routes: every call is answered with the engine's model, on its API
            sip = {**sip, "routes": [{"api": "live" if str(cfg.get("model", "")).startswith("gpt-live-")
                                      else "realtime"}]}
        self.table = CallTable(parse_routes(sip, defaults), int(sip.get("max_calls", 100)),
                               int(sip.get("no_route_status", 404)))
        self.secret = secret_from_env(environ)          # WebhookError (no_secret) ends the start
        self.rest_base: str = spec.rest_base.rstrip("/")
        self.ws_base: str = spec.ws_base.rstrip("/")
        self.api_headers: dict[str, str] = spec.api.header_map(environ)
        self.provider: str = spec.api.provider
        self.key_env: str = spec.api.key_name(spec.config["api_key_env"])
        self.sub_endpoint: str = spec.bus.subscribe
        self.pub = publisher if publisher is not None else Publisher(spec.bus.publish, f"sip:{os.getpid()}")
        self.dedup = Dedup()
        self.runs: dict[str, CallRun] = {}              #: call key -> the running call
        self.by_sip_id: dict[str, str] = {}             #: sip_call_id -> call key
        self.counts = {"webhooks": 0, "refused": 0, "duplicates": 0, "accepted": 0, "rejected": 0,
                       "accept_failed": 0, "ended": 0, "ignored": 0}
        self.server: asyncio.Server | None = None
        self.url = ""
        self.stop = asyncio.Event()
        self._tick_handle: asyncio.TimerHandle | None = None
        #: attaches a call's control socket (set by the process: engine.sip.control); None: accept only
        self.attacher: Callable[[CallRun], Any] | None = None
        self.tasks = TaskSet(log, "a SIP task failed", self._task_failed)
        self.spawn = self.tasks.spawn
        #: tool registrations for every call, replayed to each new call's core
        self.global_commands: list[tuple[str, dict[str, Any]]] = []
        #: the commands this service answers itself, each once by id
        self.once = AnsweredOnce(self.pub.publish)
        #: refused deliveries by code, reported at most once a second each; the peer of each's example
        self.refusals: dict[str, ErrorSampler] = {}
        self.refusal_peers: dict[str, str] = {}
        self.closing = False                            #: close() began: no call is attached any more
        self.stop_deadline_s = float("inf")             #: when close() stops waiting for the hang-ups

    # ------------------------------------------------------------ bus out
    def publish(self, run: CallRun | None, topic: str, payload: Mapping[str, Any], sip_call_id: str | None = None) -> None:
        body = dict(payload)
        if run is not None:
            body["sip_call_id"] = run.sip_call_id
        elif sip_call_id is not None:
            body["sip_call_id"] = sip_call_id
        self.pub.publish(topic, body)

    def error(self, sip_call_id: str | None, code: str, message: str, fatal: bool = False) -> None:
        body = {"source": "sip", "code": code, "message": message, "call_fatal": fatal}
        if sip_call_id:
            body["sip_call_id"] = sip_call_id
        self.pub.publish("engine.error", body)

    def status(self) -> dict[str, Any]:
        runs = list(self.runs.values())[-CALLS_LISTED:]
        return {"url": self.url, "calls": [r.summary() for r in runs], "active": self.table.active,
                "max_calls": self.table.max_calls, **self.counts}

    def status_changed(self) -> None:
        self.pub.publish("sip.status", self.status())

    # ------------------------------------------------------------ webhooks in
    async def handle(self, req: HttpRequest) -> HttpResponse:
        if req.path != self.path:
            return HttpResponse(404, f"SIP webhooks are taken at {self.path}\n".encode())
        if req.method != "POST":
            return HttpResponse(405, b"POST only\n")
        self.counts["webhooks"] += 1
        now = time.time()
        try:
            webhook_id = verify(self.secret, req.headers, req.body, now)
        except WebhookError as exc:
            return self._refused(exc, req.peer)
        if self.dedup.seen(webhook_id, now):
            self.counts["duplicates"] += 1
            self.pub.publish("sip.webhook.duplicate", {"webhook_id": webhook_id})
            return HttpResponse(200, b"duplicate\n")
        try:
            inc = parse_incoming(req.body)
        except WebhookError as exc:
            return self._refused(exc, req.peer)
        if isinstance(inc, str):
            return HttpResponse(200, b"not a call\n")
        received_s = time.monotonic()
        decision = self.table.offer(inc, received_s)
        self.publish(None, "sip.call.incoming", {
            "api": inc.api, "id": inc.id, "event_id": inc.event_id, "call_key": inc.call_key,
            "from": inc.header("From"), "to": called_number(inc),
            "sip_headers": [{"name": k, "value": v} for k, v in inc.sip_headers],
            "media_security": inc.media_security, "decision": type(decision).__name__.lower(),
            **({"why": decision.why} if isinstance(decision, (Ignore, Reject)) else {})}, sip_call_id=inc.id)
        if isinstance(decision, Accept):
            self.spawn(self._accept(decision, inc, received_s))
        elif isinstance(decision, Reject):
            self.spawn(self._reject(decision))
        else:
            self.counts["ignored"] += 1
        self._arm_tick()
        return HttpResponse(200, b"ok\n")

    def _refused(self, exc: WebhookError, peer: str) -> HttpResponse:
        """A refused delivery: counted; reported now, or summed into its code's next report."""
        self.counts["refused"] += 1
        sampler = self.refusals.setdefault(exc.code, ErrorSampler())
        if sampler.example is None:        # this one is the example of the next report
            self.refusal_peers[exc.code] = peer
        self._report_refusals(exc.code, sampler.note(exc.code, str(exc), time.monotonic()))
        return HttpResponse(400, f"{exc.code}\n".encode())

    def flush_refusals(self, now_s: float | None = None) -> None:
        """The refusals that waited for their code's second (called every STATUS_EVERY_S)."""
        now = time.monotonic() if now_s is None else now_s
        for code, sampler in self.refusals.items():
            self._report_refusals(code, sampler.flush(now))

    def _report_refusals(self, code: str, report: Report | None) -> None:
        if report is None:
            return
        peer = self.refusal_peers.get(code, "")
        log.warning("refused %d webhook(s) (%s), e.g. from %s: %s", report.count, code, peer,
                    report.message)   # never the body
        self.pub.publish("sip.webhook.refused", {"code": code, "peer": peer, "message": report.message,
                                                 "count": report.count})

    def _task_failed(self, exc: BaseException) -> None:
        self.error(None, "task_failed", f"{type(exc).__name__}: {exc}")

    def _arm_tick(self) -> None:
        due = self.table.next_deadline()
        if due is None or self._tick_handle is not None:
            return
        self._tick_handle = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        for missed in self.table.tick(time.monotonic()):
            self._missed(missed)
        self._arm_tick()

    def _missed(self, m: Missed) -> None:
        call = self.table.get(m.key)
        sid = m.reject.id if m.reject else next(iter(call.ids.values())) if call else None
        self.error(sid, "call_missed", m.why)
        self.publish(None, "sip.call.ended", {"how": "missed", "why": m.why}, sip_call_id=sid)
        if m.reject is not None:           # it rings at the caller until rejected
            self.spawn(self._reject(m.reject, failed=True))

    # ------------------------------------------------------------ REST out
    def _rest_url(self, api: str, call_id: str, action: str) -> str:
        kind = "realtime/calls" if api == "realtime" else "live/sessions"
        return f"{self.rest_base}/{kind}/{call_id}/{action}"

    async def rest(self, api: str, call_id: str, action: str, body: Any = None) -> HttpResponse:
        return await request("POST", self._rest_url(api, call_id, action), headers=self.api_headers,
                             json_body=body, timeout_s=REST_TIMEOUT_S)

    async def _accept(self, d: Accept, inc: Incoming, received_s: float) -> None:
        try:
            resp = await self.rest(d.api, d.id, "accept", d.body)
            ok, why = resp.status == 200, _why(resp)
        except HttpClientError as exc:
            ok, why, resp = False, str(exc), HttpResponse(0)
        accept_ms = (time.monotonic() - received_s) * 1000
        if not ok:
            self.counts["accept_failed"] += 1
            reject = self.table.accept_failed(d.key, resp.status or None, why).reject
            self.error(d.id, "accept_failed", f"accepting {d.id} on {d.api} failed: HTTP {resp.status} {why}"
                       + ("; rejecting it" if reject else ""))
            self.publish(None, "sip.call.ended", {"how": "accept_failed", "status": resp.status, "why": why,
                                                  "duration_s": 0.0, "usd": 0.0}, sip_call_id=d.id)
            self.status_changed()
            if reject is not None:         # it rings at the caller until rejected
                await self._reject(reject, failed=True)
            return
        call = self.table.accepted(d.key)
        self.counts["accepted"] += 1
        run = CallRun(call, d.id, d.api, time.monotonic(), time.time(), accept_ms)
        self.runs[d.key] = run
        self.by_sip_id[d.id] = d.key
        route = call.route
        self.publish(run, "sip.call.accepted", {"api": d.api, "model": d.body.get("model") or
                                                d.body.get("session", {}).get("model"),
                                                "route": route.name if route else None,
                                                "accept_ms": round(accept_ms, 1),
                                                "sip_headers": [{"name": k, "value": v} for k, v in inc.sip_headers]})
        self.status_changed()
        if self.attacher is not None or self.closing:
            run.task = self.spawn(self._control(run))

    async def _control(self, run: CallRun) -> None:
        """The call's control socket, for the call's life; then its end: hung up first when the
        engine gave up on it (ABANDONED)."""
        how = "error"
        try:
            if self.closing:               # accepted as the engine stops: nothing will steer it
                run.ending = run.ending or "engine_stopped"
            else:
                assert self.attacher is not None
                how = await self.attacher(run) or "ended"
        except Exception as exc:  # noqa: BLE001 - one call's failure ends that call only
            self.error(run.sip_call_id, "call_failed", f"{type(exc).__name__}: {exc}", fatal=True)
            how = "error"
        how = run.ending or how
        try:
            if how in ABANDONED:
                ok, why = await self._hang_up_abandoned(run)
                run.extra["hung_up"] = ok
                if not ok:
                    self.error(run.sip_call_id, "hangup_failed", f"the engine gave up on the call ({how}) but "
                               f"could not hang it up: {why}; it may run on at OpenAI until the caller hangs up")
        finally:
            self.call_ended(run, how)

    async def _hang_up_abandoned(self, run: CallRun) -> tuple[bool, str]:
        """Hang up a call the engine gave up on: tried again on 429, 5xx or no answer, within
        HANGUP_WAIT_S (STOP_HANGUP_S of the engine's stop). A call the API no longer knows is over."""
        deadline = min(time.monotonic() + HANGUP_WAIT_S, self.stop_deadline_s)
        why = "no time left"
        for attempt in range(HANGUP_TRIES):
            if attempt:
                wait = HANGUP_BACKOFF_S[min(attempt - 1, len(HANGUP_BACKOFF_S) - 1)]
                if time.monotonic() + wait >= deadline:
                    break
                await asyncio.sleep(wait)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                resp = await asyncio.wait_for(self.rest(run.api, run.sip_call_id, "hangup"), min(left, REST_TIMEOUT_S))
            except (HttpClientError, asyncio.TimeoutError) as exc:
                why = str(exc) or "no answer in time"
                continue
            if resp.status == 200 or resp.status in (404, 410):   # hung up, or already over
                return True, ""
            why = f"HTTP {resp.status} {_why(resp)}".strip()
            if resp.status != 429 and resp.status < 500:
                break
        return False, why

    def call_ended(self, run: CallRun, how: str) -> None:
        if self.table.ended(run.call.key, how) is None:
            return
        self.counts["ended"] += 1
        self.runs.pop(run.call.key, None)
        self.by_sip_id.pop(run.sip_call_id, None)
        self.publish(run, "sip.call.ended", {"how": how, "api": run.api,
                                             "duration_s": round(time.monotonic() - run.accepted_s, 3),
                                             "usd": round(run.usd, 6), **run.extra})
        self.status_changed()

    async def _reject(self, d: Reject, failed: bool = False) -> None:
        """Reject a call; ``failed``: one FAILED before its accept (its state is final: the reject
        only stops its ringing, engine.sip.calls rule 6)."""
        try:
            resp = await self.rest(d.api, d.id, "reject", {"status_code": d.status})
            ok, why = resp.status == 200, _why(resp)
        except HttpClientError as exc:
            ok, why = False, str(exc)
        if not failed:
            self.table.rejected(d.key, ok, why)
        if ok:
            self.counts["rejected"] += 1
            self.publish(None, "sip.call.rejected", {"status": d.status, "why": d.why, "api": d.api},
                         sip_call_id=d.id)
        else:
            self.error(d.id, "reject_failed", f"rejecting {d.id} failed: {why}")
        self.status_changed()

    # ------------------------------------------------------------ call control
    async def refer(self, run: CallRun, target: str) -> tuple[bool, str]:
        try:
            resp = await self.rest(run.api, run.sip_call_id, "refer", {"target_uri": target})
        except HttpClientError as exc:
            return False, str(exc)
        if resp.status == 200:
            run.ending = "transferred"
            run.extra["refer_to"] = target
            return True, ""
        return False, f"HTTP {resp.status} {_why(resp)}"

    async def hangup(self, run: CallRun) -> tuple[bool, str]:
        try:
            resp = await self.rest(run.api, run.sip_call_id, "hangup")
        except HttpClientError as exc:
            return False, str(exc)
        if resp.status == 200:
            run.ending = "hangup"
            return True, ""
        return False, f"HTTP {resp.status} {_why(resp)}"

    # ------------------------------------------------------------ bus in
    def run_of(self, sip_call_id: Any) -> CallRun | None:
        key = self.by_sip_id.get(str(sip_call_id)) if sip_call_id is not None else None
        return self.runs.get(key) if key else None

    def ack(self, body: Mapping[str, Any], ok: bool, **extra: Any) -> None:
        """The command's outcome (the broker acked it on cmd.ack when it came: bus protocol 2)."""
        self.once.answer(body, ok, **extra)

    def on_bus(self, topic: str, body: dict[str, Any]) -> None:
        try:
            self._on_bus(topic, body)
        except Exception as exc:  # noqa: BLE001 - one bad command never stops the service
            self.error(None, "bad_command", f"{topic}: {type(exc).__name__}: {exc}")

    def _on_bus(self, topic: str, body: dict[str, Any]) -> None:
        if topic in ("cmd.ack", "cmd.done"):
            return
        target = body.get("sip_call_id")
        if target is None and topic == "cmd.tool.result":   # a tool result names its tool call
            target = next((r.sip_call_id for r in self.runs.values() if r.core is not None
                           and body.get("call_id") in getattr(r.core.tools, "calls", {})), None)
        if topic in ("cmd.sip.refer", "cmd.sip.hangup") and not self.once.first(body):
            return   # a copy (its call may have ended since: it gets the outcome, not "no such call")
        if target is None and topic in ("cmd.tool.register", "cmd.tool.unregister", "engine.presence.gone"):
            if topic != "engine.presence.gone" and not self.once.first(body):
                return
            problem = registration_problem(body) if topic == "cmd.tool.register" else None
            if problem is not None:   # refused here, once, not stored and refused by every call
                self.ack(body, False, error=problem, code="bad_command")
                return
            quiet = {k: v for k, v in body.items() if k != "id"}   # answered here once, not by every call
            for r in list(self.runs.values()):
                self.command(r, topic, quiet)
            self.control_all(topic, quiet)
            if topic != "engine.presence.gone":
                self.ack(body, True, calls=len(self.runs))
            return
        run = self.run_of(target)
        if run is None:
            if self.solo:
                return
            why = (f"no active SIP call {target!r}" if target is not None else
                   f"{topic} needs 'sip_call_id' (active: {', '.join(self.by_sip_id) or 'none'})")
            self.error(None, "no_such_call", why)
            self.ack(body, False, error=why)
            return
        if topic == "cmd.sip.refer":
            uri = body.get("target_uri")
            if not isinstance(uri, str) or not uri.strip():
                self.ack(body, False, error="cmd.sip.refer needs 'target_uri' (tel:+1… or sip:…)")
                return
            self.spawn(self._control_cmd(run, body, self.refer(run, uri.strip())))
        elif topic == "cmd.sip.hangup":
            self.spawn(self._control_cmd(run, body, self.hangup(run)))
        else:
            self.command(run, topic, body)

    async def _control_cmd(self, run: CallRun, body: Mapping[str, Any], op: Any) -> None:
        ok, why = await op
        self.ack(body, ok, **({"error": why} if why else {}))
        if not ok:
            self.error(run.sip_call_id, "control_failed", why)

    def command(self, run: CallRun, topic: str, body: dict[str, Any]) -> None:
        """Hand a bus command to a call's core (its control socket: engine.sip.control)."""
        if run.link is not None:
            run.link.command(topic, body)
        else:
            run.pending.append((topic, body))

    def control_all(self, topic: str, body: dict[str, Any]) -> None:
        """A command for every call, present and future (a tool registered without a call)."""
        self.global_commands.append((topic, body))

    # ------------------------------------------------------------ life
    async def listen(self, sock: Any = None) -> str:
        self.server = await serve_http(self.handle, self.host, self.port, sock=sock)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}{self.path}"
        return self.url

    async def serve_forever(self) -> None:
        while not self.stop.is_set():
            self.flush_refusals()
            if not self.solo:
                self.status_changed()
            try:
                await asyncio.wait_for(self.stop.wait(), STATUS_EVERY_S)
            except asyncio.TimeoutError:
                pass
        await self.close()

    async def close(self) -> None:
        """Stop: every call this process holds is hung up (all at once, within STOP_HANGUP_S)."""
        self.closing = True
        self.stop_deadline_s = time.monotonic() + STOP_HANGUP_S
        if self.server is not None:
            self.server.close()
        for run in list(self.runs.values()):
            run.ending = run.ending or "engine_stopped"
            if run.task is None:           # no control socket (accept only): its end is the hang-up's
                run.task = self.spawn(self._control(run))
            elif run.link is not None:
                run.link.stop()
        await self.tasks.wait(STOP_HANGUP_S + STOP_MARGIN_S)
        for task in self.tasks:   # an accept still waiting on its REST call: its call is not ours yet
            task.cancel()


def _why(resp: HttpResponse) -> str:
    """The API's error message in an answer, if any (never the whole body)."""
    try:
        body = resp.parsed()
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return f"{err.get('code') or ''}: {err.get('message') or ''}".strip(": ")
    return ""


"""GPT-Live's sockets on the local server: the primary WebSocket ``/v1/live/sessions`` and
the sideband ``/v1/live/sessions/{id}/attach``.

The protocol lives in :mod:`engine.server.live_session`; this module only paces the output
track (one step every OUTPUT_CHUNK_MS / speed, on a schedule that does not drift), runs the
recogniser and espeak-ng in worker threads, routes each event to its connection(s) in the
order the session made them (one writer per connection), keeps the registry sidebands attach
through, and injects the configured faults (``drop_after_s``, ``drop_at_event``,
``drop_code``, ``errors``, ``delta_jitter_ms``, ``first_delta_delay_ms``, ``max_session_s``,
``stall_at_s`` with ``stall_ms``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from engine.server.faults import Faults
from engine.server.live_protocol import error_event
from engine.server.live_session import (ALL, LIVE_MAX_SESSION_S, OUTPUT_CHUNK_MS, PRIMARY, SIDEBANDS, LiveActions,
                                        LiveSession, Phase, UserTurn, Utterance)
from engine.server.protocol import new_id
from engine.server.expect import expected_phrases
from engine.server.voice import Recognizer, VoiceError, synthesize
from engine.tasks import TaskSet

log = logging.getLogger("realtalk.server")

LIVE_PATH = "/v1/live/sessions"
_ATTACH = re.compile(r"^/v1/live/sessions/([^/]+)/attach/?$")
SIDEBAND_QUEUE_MAX = 4000      #: events waiting for a sideband that does not read; more closes it (1011)
BEHIND_RESET_S = 0.5           #: a ticker this far behind restarts its schedule instead of bursting

#: live session id -> its primary connection, while the session runs (sidebands attach through it)
SESSIONS: dict[str, "LiveConnection"] = {}


def live_route(path: str) -> tuple[str, str | None] | None:
    """``("primary", None)``, ``("attach", session_id)`` or None for a path that is not Live's."""
    url = urlsplit(path).path
    if url.rstrip("/") == LIVE_PATH:
        return "primary", None
    m = _ATTACH.match(url)
    return ("attach", m.group(1)) if m else None


class Outbox:
    """One connection's writer: events are sent in the order they were put, by one task, so
    the session's order holds whichever task made them. ``close`` sends what is queued first."""

    def __init__(self, ws: ServerConnection, name: str, max_queued: int | None = None) -> None:
        self.ws = ws
        self.name = name
        self.max_queued = max_queued
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._write())
        #: called with each event before it is written (faults); True: do not write it
        self.on_send: Callable[[dict[str, Any]], Awaitable[bool]] | None = None

    def put(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        if self.max_queued is not None and self.queue.qsize() >= self.max_queued:
            log.warning("local live server: %s does not read; closing it", self.name)
            self.close(1011, "The connection fell too far behind.")
            return
        self.queue.put_nowait(("event", event))

    def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(("close", (code, reason)))

    async def _write(self) -> None:
        try:
            while True:
                kind, item = await self.queue.get()
                if kind == "close":
                    code, reason = item
                    if code == 1006:
                        self.ws.transport.abort()   # no close frame: the client sees an abnormal closure
                    else:
                        await self.ws.close(code, reason)
                    return
                if self.on_send is not None and await self.on_send(item):
                    continue
                await self.ws.send(json.dumps(item))
        except ConnectionClosed:
            self.closed = True


class LiveConnection:
    """One primary connection: a LiveSession, its output ticker, its sidebands."""

    def __init__(self, ws: ServerConnection, scenario: Any, faults: Faults, asr: bool, speed: float) -> None:
        self.ws = ws
        self.faults = faults
        self.asr = asr
        self.speed = speed
        default_limit = Faults().max_session_s
        max_s = faults.max_session_s if faults.max_session_s != default_limit else LIVE_MAX_SESSION_S
        self.session = LiveSession(scenario, faults, max_session_s=max_s)
        self.outbox = Outbox(ws, "primary")
        self.outbox.on_send = self._faults_on_send
        self.sidebands: dict[str, Outbox] = {}
        self.tasks = TaskSet(log, "local live server: a session task failed")
        self.spawn = self.tasks.spawn
        self.sent_counts: dict[str, int] = {}
        self.stall_from_s: float | None = None   #: the loop time the stall fault begins (set at the start)
        self.pending_errors = list(faults.errors)
        self.rng = random.Random(faults.seed)
        self.session_id: str | None = None
        self.failures = 0
        #: session.closed's reason when the primary goes away (a SIP call sets remote_hangup)
        self.end_reason = "connection_lost"

    def step(self, what: str, fn: Callable[[], LiveActions]) -> None:
        """Run one session input and carry out its actions. A bug in the session is logged and
        reported once (a ``server_error``), and the session goes on."""
        try:
            acts = fn()
        except Exception as exc:  # noqa: BLE001 - a bug must not end the client's conversation
            self.failures += 1
            log.exception("local live server: %s failed (%d failures)", what, self.failures)
            if self.failures > 1:
                return
            acts = LiveActions(out=[(ALL, error_event("server_error", f"The server had an error ({what}: "
                                                      f"{type(exc).__name__}: {exc}).", error_type="server_error"))])
        self.apply(acts)

    # ------------------------------------------------------------------ output
    def apply(self, acts: LiveActions) -> None:
        for audience, event in acts.out:
            if audience in (PRIMARY, ALL):
                self.outbox.put(event)
            if audience in (SIDEBANDS, ALL):
                for box in self.sidebands.values():
                    box.put(event)
            elif audience in self.sidebands:
                self.sidebands[audience].put(event)
        for turn in acts.hear:
            self.spawn(self.recognise(turn))
        for utt in acts.speak:
            self.spawn(self.synthesise(utt))
        if acts.close:
            self.end(1000, "")

    def end(self, code: int, reason: str) -> None:
        """Close the primary and every sideband (after what is queued for them)."""
        self.outbox.close(code, reason)
        for box in self.sidebands.values():
            box.close(1000, "")
        if self.session_id is not None:
            SESSIONS.pop(self.session_id, None)

    async def _faults_on_send(self, event: dict[str, Any]) -> bool:
        """Injected faults on the primary; True when the event must not be sent."""
        etype = event["type"]
        n = self.sent_counts[etype] = self.sent_counts.get(etype, 0) + 1
        if self.stall_from_s is not None and asyncio.get_running_loop().time() >= self.stall_from_s:
            self.stall_from_s = None   # once: what the ticker queues meanwhile then goes at once
            await asyncio.sleep(self.faults.stall_ms / 1000)
        drop = self.faults.drop_at_event
        if drop and (drop == etype or drop == f"{etype}#{n}"):
            self.outbox.close(self.faults.drop_code, "injected fault")   # the reader then ends the session
            return True
        for err in list(self.pending_errors):
            if err.get("after_event") == etype:
                self.pending_errors.remove(err)
                await self.ws.send(json.dumps(event))
                await self.ws.send(json.dumps(error_event(err.get("code", "server_error"),
                                                          err.get("message", "Injected error."), err.get("param"),
                                                          None, err.get("type", "server_error"))))
                return True
        return False

    # ------------------------------------------------------------------ workers
    async def recognise(self, turn: UserTurn) -> None:
        words = turn.heard
        if words is None:
            words = ""
            if self.asr and len(turn.pcm):
                try:
                    s = self.session
                    phrases = expected_phrases(s.scenario.phrases(), [], str(s.session.get("instructions") or ""),
                                               [("system", c) for c in s.context])
                    words = await asyncio.to_thread(Recognizer.transcribe, turn.pcm, phrases)
                except VoiceError as exc:
                    log.warning("%s (failures so far: %d)", exc, Recognizer.failures)
        self.step("recognition", lambda: self.session.heard(turn.id, words or ""))

    async def synthesise(self, utt: Utterance) -> None:
        voice = self.session.session["audio"]["output"]["voice"]
        try:
            pcm = await asyncio.to_thread(synthesize, utt.text, voice if isinstance(voice, str) else "marin", 1.0)
        except VoiceError as exc:
            log.warning("local live server: %s", exc)
            why = str(exc)
            self.step("synthesis", lambda: self.session.spoken(utt.id, None, why))
            return
        self.step("synthesis", lambda: self.session.spoken(utt.id, pcm))

    async def ticker(self) -> None:
        """The output track: one step every OUTPUT_CHUNK_MS / speed, paced on a fixed schedule
        (a late step is caught up, not added to; jitter moves single steps around it)."""
        loop = asyncio.get_running_loop()
        period = OUTPUT_CHUNK_MS / 1000 / self.speed
        if self.faults.first_delta_delay_ms > 0:
            await asyncio.sleep(self.faults.first_delta_delay_ms / 1000)
        t_next = loop.time()
        while self.session.phase in (Phase.ACTIVE, Phase.CLOSING) and not self.outbox.closed:
            self.step("output step", self.session.tick)
            t_next += period
            now = loop.time()
            if now - t_next > BEHIND_RESET_S:
                t_next = now
            jitter = self.rng.gauss(0.0, self.faults.delta_jitter_ms) / 1000 if self.faults.delta_jitter_ms > 0 else 0
            delay = t_next + max(0.0, jitter) - now
            if delay > 0:
                await asyncio.sleep(delay)

    async def _later(self, after_s: float, what: str) -> None:
        await asyncio.sleep(after_s)
        if what == "expire":
            self.step("expiry", self.session.expire)
        else:
            self.outbox.close(self.faults.drop_code, "injected fault")

    def _started(self) -> None:
        self.session_id = self.session.session["id"]
        SESSIONS[self.session_id] = self
        if self.faults.stall_at_s is not None and self.faults.stall_ms > 0:
            self.stall_from_s = asyncio.get_running_loop().time() + self.faults.stall_at_s
        self.spawn(self.ticker())
        self.spawn(self._later(self.session.max_session_s, "expire"))
        if self.faults.drop_after_s is not None:
            self.spawn(self._later(self.faults.drop_after_s, "drop"))

    # ------------------------------------------------------------------ input
    async def run(self) -> None:
        try:
            async for message in self.ws:
                was_new = self.session.phase is Phase.NEW
                self.apply(self.session.receive_text(message))
                if was_new and self.session.phase is not Phase.NEW:
                    self._started()
        except ConnectionClosed:
            pass   # the client went away, or the server is shutting down
        finally:
            self.apply(self.session.disconnected(self.end_reason))   # sidebands learn it ended (nothing if closed)
            self.end(1000, "")
            log.info("local live server: session %s ended: %s", self.session_id,
                     ", ".join(f"{k} {v}" for k, v in self.session.counts.items()))
            self.tasks.cancel_all()
            try:
                await asyncio.wait_for(asyncio.shield(self.outbox.task), 1.0)
            except (asyncio.TimeoutError, ConnectionClosed):
                pass

    async def attach(self, ws: ServerConnection) -> None:
        """Serve a sideband on ``ws`` until it or the session ends."""
        sid = new_id("sb")
        box = Outbox(ws, f"sideband {sid}", SIDEBAND_QUEUE_MAX)
        self.sidebands[sid] = box
        self.apply(self.session.attach(sid))
        try:
            async for message in ws:
                self.apply(self.session.receive_text(message, sid))
        except ConnectionClosed:
            pass
        finally:
            self.session.detach(sid)
            self.sidebands.pop(sid, None)
            box.close(1000, "")
            try:
                await asyncio.wait_for(asyncio.shield(box.task), 1.0)
            except (asyncio.TimeoutError, ConnectionClosed):
                pass


async def handle_live(ws: ServerConnection, route: tuple[str, str | None], scenario: Any, faults: Faults,
                      asr: bool, speed: float) -> None:
    """Serve one Live connection: a primary session, or a sideband attached to one."""
    kind, session_id = route
    assert ws.request is not None
    try:   # x_speed in the query overrides the server's speed, as on /v1/realtime
        speed = max(0.01, float(parse_qs(urlsplit(ws.request.path).query).get("x_speed", [speed])[0]))
    except ValueError:
        pass
    if kind == "primary":
        await LiveConnection(ws, scenario, faults, asr, speed).run()
        return
    conn = SESSIONS.get(session_id or "")
    if conn is None:
        await ws.send(json.dumps(error_event("session_not_found", f"No running Live session '{session_id}'.",
                                             "session_id")))
        await ws.close(1008, "session_not_found")
        return
    await conn.attach(ws)

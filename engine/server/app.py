"""``engine serve``: the local realtime server's sockets, timers and faults.

Serves the GA protocol at ``ws://HOST:PORT/v1/realtime?model=MODEL``. The protocol
itself lives in :mod:`engine.server.session`; this module only moves bytes, sleeps,
runs espeak-ng and the recogniser in worker threads, runs server_vad's idle timer (the
session says when it should run and what firing it sends), and injects configured faults.
GPT-Live (``/v1/live/sessions`` and its sideband ``…/{id}/attach``) is routed to
:mod:`engine.server.live_app`. A stop (SIGTERM/SIGINT, or ``stop``) always ends it within SHUTDOWN_GRACE_S or so; a
port it cannot listen on raises :class:`ServeError` at once.

Limits on what a client sends (each breach is an ``error`` event naming the limit; the session
goes on): a message over 15 MiB (the session's ``MAX_EVENT_BYTES``), JSON nested deeper than
:data:`MAX_JSON_DEPTH` arrays and objects (checked here before it is parsed: Python's parser
recurses, and past about 1,000 levels raised ``RecursionError``, which closed the socket).
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import signal
import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response as HttpResponse

from engine.server.errors import ServeError
from engine.server.dialects import azure_path, server_dialect
from engine.server.faults import MAX_SESSION_REASON, Faults
from engine.server.live_app import SESSIONS as LIVE_SESSIONS, handle_live, live_route
from engine.server.protocol import error_event
from engine.server.rest import rest_connection
from engine.server import sip
from engine.server.scenario import Scenario
from engine.server.session import Actions, Item, Response, ServerSession
from engine.tasks import TaskSet
from engine.server.voice import Recognizer, VoiceError, synthesize

log = logging.getLogger("realtalk.server")

SHUTDOWN_GRACE_S = 1.0   #: how long a stop waits for clients to answer the close handshake
BETA_MESSAGE = "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
MAX_JSON_DEPTH = 100     #: arrays and objects nested deeper than this in one client event are refused
_JSON_NESTING = re.compile(r'"(?:[^"\\]|\\.)*+"|[\[\]{}]')   # a string (skipped whole), or a bracket


def json_depth_exceeds(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if the JSON ``text`` nests arrays and objects deeper than ``limit`` (brackets inside
    strings do not count). Linear in the text; one with at most ``limit`` opening brackets in
    all (every audio append: base64 has none) is answered without a scan."""
    if isinstance(text, bytes):
        if text.count(b"[") + text.count(b"{") <= limit:
            return False
        text = text.decode("utf-8", "replace")   # brackets, quotes and backslashes are ASCII: kept as they are
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for m in _JSON_NESTING.finditer(text):
        token = m.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    speed: float = 1.0                 #: >1 streams audio faster than real time (tests)
    api_key: str | None = None         #: required bearer key; None accepts any
    asr: bool = True                   #: rough transcripts of user audio with pocketsphinx
    scenario: Scenario = field(default_factory=Scenario)
    faults: Faults = field(default_factory=Faults)
    listen_fd: int | None = None       #: an already bound, listening socket to serve on (from a supervisor)
    dialect: str = "openai"            #: openai | azure | xai: the provider this server speaks as (dialects.py)


class Connection:
    """One client connection: a ServerSession plus the tasks that stream its responses."""

    def __init__(self, ws: ServerConnection, cfg: ServerConfig, model: str, speed: float) -> None:
        self.ws = ws
        self.cfg = cfg
        self.speed = speed
        self.faults = cfg.faults.merged(cfg.scenario.faults)
        self.session = ServerSession(model, cfg.scenario, self.faults)
        self.wakes: dict[str, asyncio.Event] = {}
        self.streams: dict[str, asyncio.Task[Any]] = {}   #: response id -> the task streaming it
        self.transcripts: dict[str, asyncio.Future[str]] = {}
        self.tasks = TaskSet(log, "local server: a response task failed")
        self.spawn = self.tasks.spawn
        self.sent_counts: dict[str, int] = {}
        self.pending_errors = list(self.faults.errors)
        self.closed = False
        self.idle_task: asyncio.Task[Any] | None = None
        self.idle_epoch: int | None = None      #: the session's idle_epoch the timer was armed at
        self.dialect = server_dialect(cfg.dialect)

    async def send(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        etype = event["type"]
        n = self.sent_counts[etype] = self.sent_counts.get(etype, 0) + 1
        drop = self.faults.drop_at_event
        if drop and (drop == etype or drop == f"{etype}#{n}"):
            await self.drop(self.faults.drop_code, "injected fault")
            return
        try:
            for wire in self.dialect.outbound(event):
                await self.ws.send(json.dumps(wire))
            for err in list(self.pending_errors):
                if err.get("after_event") == etype:
                    self.pending_errors.remove(err)
                    await self.ws.send(json.dumps(error_event(err.get("code", "server_error"),
                                                              err.get("message", "Injected error."), err.get("param"),
                                                              None, err.get("type", "server_error"))))
        except ConnectionClosed:
            # the client went away while a response streamed (an engine stopping mid-reply): not an
            # error; the reader (run) ends the session and cancels the streams
            self.closed = True

    async def drop(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if code == 1006:
            self.ws.transport.abort()  # no close frame: the client sees an abnormal closure
        else:
            await self.ws.close(code, reason)

    async def apply(self, acts: Actions) -> None:
        for ev in acts.send:
            await self.send(ev)
        woken = []
        for resp in acts.wake:
            if resp.id in self.wakes:
                self.wakes[resp.id].set()
                task = self.streams.get(resp.id)
                if task is not None and not task.done():
                    woken.append(task)
        if woken:
            # a cancelled response says its last words (… response.done) before the next input
            # event is taken, as the API orders them (trace 08: speech_started, the cancelled
            # response's done events, then speech_stopped)
            await asyncio.wait(woken, timeout=2.0)
        for item in acts.transcribe:
            self.transcripts[item.id] = asyncio.get_running_loop().create_future()
            self.spawn(self.transcribe(item))
        for resp in acts.start:
            self.wakes[resp.id] = asyncio.Event()
            self.streams[resp.id] = self.spawn(self.stream(resp))
        self.rearm_idle()

    def rearm_idle(self) -> None:
        """Run server_vad's idle timer while the session says it should, restarted whenever
        the silence was broken (the session's ``idle_epoch`` moved)."""
        timeout_s = self.session.idle_timeout_s()
        epoch = self.session.idle_epoch
        if timeout_s is not None and epoch == self.idle_epoch and self.idle_task is not None:
            return  # already running for this stretch of silence
        if self.idle_task is not None:
            self.idle_task.cancel()
            self.idle_task = None
        self.idle_epoch = epoch if timeout_s is not None else None
        if timeout_s is not None:
            self.idle_task = self.spawn(self._idle_later(timeout_s / self.speed, epoch))

    async def _idle_later(self, delay_s: float, epoch: int) -> None:
        await asyncio.sleep(delay_s)
        self.idle_task = None
        await self.apply(self.session.idle_timeout_fired(epoch))

    async def transcribe(self, item: Item) -> None:
        """Find the user item's words and send its transcription events; a response that
        waits for them is released whatever happens (the future is always resolved)."""
        words = item.heard or ""
        try:
            try:
                if item.heard is None and self.cfg.asr and item.audio is not None:
                    words = await asyncio.to_thread(Recognizer.transcribe, item.audio, item.expect)
                events = self.session.transcription_events(item, words)
            except VoiceError as exc:
                log.warning("%s (failures so far: %d)", exc, Recognizer.failures)
                words = ""
                events = self.session.transcription_failed_events(item, str(exc))
            for ev in events:
                await self.send(ev)
        finally:
            fut = self.transcripts.pop(item.id, None)
            if fut is not None and not fut.done():
                fut.set_result(words)

    async def stream(self, resp: Response) -> None:
        loop = asyncio.get_running_loop()
        waiting = self.session.pending_transcript(resp)
        fut = self.transcripts.get(waiting.id) if waiting is not None else None
        if fut is not None:
            await asyncio.shield(fut)
        self.session.plan(resp)
        speech = None
        if "audio" in resp.modalities and resp.text and not resp.cancelled:
            speech = await asyncio.to_thread(synthesize, resp.text, resp.voice,
                                             float(self.session.session["audio"]["output"]["speed"]))
        wake = self.wakes[resp.id]
        t_next = loop.time()
        try:
            for delay, event in self.session.response_steps(resp, speech, self.speed):
                if delay > 0 and not resp.cancelled:
                    t_next = max(t_next, loop.time() - 0.5) + delay
                    # jitter moves each delta around its schedule; it never accumulates into drift
                    timeout = t_next + self.session.jitter_s() - loop.time()
                    if timeout > 0:
                        try:
                            await asyncio.wait_for(wake.wait(), timeout)
                        except asyncio.TimeoutError:
                            pass
                await self.send(event)
        finally:
            self.wakes.pop(resp.id, None)
            self.streams.pop(resp.id, None)
            if not self.closed:
                self.rearm_idle()

    async def run(self) -> None:
        await self.send(self.session.created_event())
        self.rearm_idle()
        if self.faults.drop_after_s is not None:
            self.spawn(self._drop_later(self.faults.drop_after_s, self.faults.drop_code, "injected fault"))
        self.spawn(self._drop_later(self.faults.max_session_s, 1001, MAX_SESSION_REASON))
        try:
            if self.dialect.ping_every_s:
                self.spawn(self._ping())
            async for message in self.ws:
                if json_depth_exceeds(message, MAX_JSON_DEPTH):
                    await self.send(error_event("invalid_json", f"The JSON body of your request nests arrays and "
                                                f"objects more than {MAX_JSON_DEPTH} levels deep, this server's "
                                                "limit. Send a flatter event."))
                    continue
                message, refused = self.dialect.inbound(message)
                if refused is not None:
                    await self.ws.send(json.dumps(refused))
                    continue
                await self.apply(self.session.receive_text(message))
        except ConnectionClosed:
            pass  # the client went away, or the server is shutting down (1001): the session ends
        finally:
            self.closed = True
            self.tasks.cancel_all()

    async def _ping(self) -> None:
        """The dialect's keep-alive events (xAI's ``ping``), every ``ping_every_s`` / speed."""
        assert self.dialect.ping_every_s
        while not self.closed:
            await asyncio.sleep(self.dialect.ping_every_s / self.speed)
            ping = self.dialect.ping()
            if ping is not None and not self.closed:
                await self.ws.send(json.dumps(ping))

    async def _drop_later(self, after_s: float, code: int, reason: str) -> None:
        await asyncio.sleep(after_s)
        await self.drop(code, reason)


def make_process_request(cfg: ServerConfig):
    def process_request(connection: ServerConnection, request: Request) -> HttpResponse | None:
        if cfg.dialect == "azure":   # Azure's shape: /openai/v1/…, the key in api-key (or a bearer token)
            own = azure_path(request.path)
            if own is None:
                return connection.respond(404, f"Not found: {urlsplit(request.path).path}. Azure OpenAI's endpoints "
                                          "are /openai/v1/realtime?model=DEPLOYMENT and /openai/v1/live/sessions\n")
            request.path = own
            if "api-key" in request.headers and "Authorization" not in request.headers:
                request.headers["Authorization"] = f"Bearer {request.headers['api-key']}"
        url = urlsplit(request.path)
        live = live_route(request.path)
        call_id = parse_qs(url.query).get("call_id", [None])[0]
        if url.path.rstrip("/") != "/v1/realtime" and live is None:
            return connection.respond(404, f"Not found: {url.path}. The endpoints are /v1/realtime?model=MODEL "
                                      "(Realtime) and /v1/live/sessions (GPT-Live)\n")
        if cfg.api_key is not None:
            if not sip.key_matches(request.headers.get("Authorization", ""), cfg.api_key):
                body = json.dumps({"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                             "message": "Incorrect API key provided.", "param": None}})
                return connection.respond(401, body + "\n")
        if live is not None and live[0] == "attach" and live[1] not in LIVE_SESSIONS:
            body = json.dumps({"error": {"type": "invalid_request_error", "code": "session_not_found",
                                         "message": f"No running Live session '{live[1]}'.", "param": None}})
            return connection.respond(404, body + "\n")
        if call_id is not None:   # a SIP call's socket (engine.server.sip)
            refused = sip.realtime_call_socket_refusal(call_id)
            if refused is not None:
                return connection.respond(refused[0], json.dumps(refused[1]) + "\n")
        return None
    return process_request


async def handle(ws: ServerConnection, cfg: ServerConfig) -> None:
    req = ws.request
    assert req is not None
    live = live_route(req.path)
    if live is not None:   # GPT-Live: engine.server.live_app
        await handle_live(ws, live, cfg.scenario, cfg.faults.merged(cfg.scenario.faults), cfg.asr, cfg.speed)
        return
    if req.headers.get("OpenAI-Beta", "").strip().lower().startswith("realtime"):
        await ws.send(json.dumps(error_event("beta_api_shape_disabled", BETA_MESSAGE)))
        await ws.close(4000, "beta_api_shape_disabled")
        return
    query = parse_qs(urlsplit(req.path).query)
    if "call_id" in query:   # a SIP call's socket: the call's session (engine.server.sip)
        await sip.attach_realtime(ws, query["call_id"][0])
        return
    model = query.get("model", ["gpt-realtime"])[0]
    try:
        speed = float(query.get("x_speed", [cfg.speed])[0])
    except ValueError:
        speed = cfg.speed
    await Connection(ws, cfg, model, max(0.01, speed)).run()


async def serve_forever(cfg: ServerConfig, ready: asyncio.Future[str] | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None).

    ``ready`` gets the URL once listening, or the exception if listening fails (so a
    waiter on it never hangs); the exception is raised here too."""
    stop = stop or asyncio.Event()
    where: dict[str, Any] = {"host": cfg.host, "port": cfg.port}
    if cfg.listen_fd is not None:
        import socket
        where = {"sock": socket.socket(fileno=cfg.listen_fd)}
    try:
        server = await serve(lambda ws: handle(ws, cfg), max_size=32 * 1024 * 1024,
                                process_request=make_process_request(cfg), ping_interval=None, compression=None,
                                create_connection=rest_connection(lambda req: sip.handle_http(req, cfg)),  # REST
                                **where)
    except OSError as exc:
        if ready is not None and not ready.done():
            ready.set_exception(exc)
        raise
    try:
        port = next(iter(server.sockets)).getsockname()[1]
        url = f"ws://{cfg.host}:{port}/v1/realtime"
        if ready is not None and not ready.done():
            ready.set_result(url)
        await stop.wait()
    finally:
        sip.end_all()
        await _shut_down(server)


async def _shut_down(server: Server) -> None:
    """Close every connection (1001 "going away"); a client that does not answer the
    close handshake within SHUTDOWN_GRACE_S is cut, so a stop is never held up."""
    server.close(close_connections=True)
    try:
        await asyncio.wait_for(asyncio.shield(server.wait_closed()), SHUTDOWN_GRACE_S)
    except asyncio.TimeoutError:
        for conn in list(server.handlers):  # closing ones too (server.connections lists only OPEN)
            conn.transport.abort()
        await asyncio.wait_for(server.wait_closed(), SHUTDOWN_GRACE_S)


def listen_error(cfg: ServerConfig, exc: OSError) -> ServeError:
    """The message for a failed bind: which address, why, and what to do."""
    if exc.errno == errno.EADDRINUSE:
        return ServeError(f"port {cfg.port} on {cfg.host} is already in use (another `engine serve` or "
                          f"engine may be running). Stop it, or pick another port: --port 0 picks a free one.")
    return ServeError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}. "
                      f"Check --host, or pick another port (--port 0 picks a free one).")


async def _unless(stop: asyncio.Event, aw: Any) -> tuple[bool, Any]:
    """Await ``aw`` unless ``stop`` is set first: ``(True, result)`` or ``(False, None)``."""
    fut = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({fut, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if fut.done():
        return True, fut.result()
    fut.cancel()
    return False, None


def run(cfg: ServerConfig) -> int:
    """Blocking entry point for ``engine serve``: prints the URL, serves until SIGTERM/SIGINT.

    A signal stops it at any point, start-up included; an address it cannot listen on
    raises :class:`ServeError` at once (the CLI prints it and exits non-zero)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready: asyncio.Future[str] = loop.create_future()
        task = loop.create_task(serve_forever(cfg, ready, stop))
        try:
            ok, url = await _unless(stop, asyncio.shield(ready))
            if ok:
                # prewarm espeak-ng so the first reply is fast
                try:
                    await _unless(stop, asyncio.to_thread(synthesize, "ready", "marin", 1.0))
                except VoiceError as exc:
                    print(f"engine serve: warning: {exc}; spoken replies will fail until it is fixed",
                          file=sys.stderr, flush=True)
                if not stop.is_set():
                    print(f"realtalk local server listening on {url}?model=MODEL", flush=True)
                    print(f"realtalk local server: GPT-Live at {url.replace('/v1/realtime', '/v1/live/sessions')}",
                          flush=True)
                    await task  # serves until a signal sets stop
        except OSError as exc:
            raise listen_error(cfg, exc) from None
        finally:
            stop.set()
            try:
                await task
            except OSError:
                if not ready.done() or ready.exception() is None:
                    raise
                # else: already reported through ready
            finally:
                # stopping: a later signal ends the process by its default action. Left to asyncio.run,
                # the handlers outlived the fd they write to, and a signal then printed a traceback
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
                    signal.signal(sig, signal.SIG_DFL)
    asyncio.run(main())
    return 0

"""The Python async API: the JavaScript quick start, in Python, over the bus.

    from engine import create_session
    session = await create_session({"instructions": "You are a cat.", "voice": "marin"},
                                   {"model": "gpt-realtime", "api_key": None, "debug": True})
    await session.system("Speak with a Scottish accent.")     # context, no reply
    reply = await session.user("What is the capital of France?")
    await session.audio_done()
    async for event in session.events("model.text"): ...
    await session.close()

Everything goes over the same bus wire protocol any other language uses
(docs/bus-protocol.md), through the bus's asyncio client (:class:`bus.aio.BusClient`: the
connection file's endpoints and, over tcp, its CURVE keys; one ``call`` for every command);
:func:`create_session` starts an engine, :func:`connect` attaches to a running one.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import yaml

from bus.aio import BusClient, NoAck, NoOutcome
from bus.client import endpoints_from
from bus.runtime import NoEngine, engine_alive, private_dir, read_connection, runtime_dir, running_engine
from bus.wire import HEADER_KEYS, BusError
from engine.cost import is_live_model
from engine.errors import EngineError, NotRunning

USER_TEXT_ON_LIVE = ("GPT-Live takes no user text message: speak to it (the mic), or give it context with "
                     "system(text) (silent), instructions(text) or commentary(text) (said in its own words)")
#: what a session reads (``events(prefix)`` adds its prefix)
SESSION_TOPICS = ("model.", "user.", "response.done", "cost.session", "playout.started", "playout.stopped",
                  "playout.interrupted", "engine.error", "tool.call")


class ResponseFailed(EngineError):
    """The answer will never come (the socket or a process died mid-answer); ``done`` is its
    ``response.done`` (status ``failed``, ``reason``)."""

    def __init__(self, message: str, done: dict[str, Any]) -> None:
        super().__init__(message)
        self.done = done


@dataclass
class Reply:
    """The outcome of :meth:`Session.user`: what the model said, and what it cost."""
    text: str
    status: str
    usage: dict[str, Any] | None
    usd: float
    response_id: str
    item_id: str | None
    audio_path: str | None = None   #: the reply's audio as received (config ``reply_audio``)

    @property
    def audio(self) -> bytes:
        """The reply's audio, 24 kHz mono PCM16 (b"" for a text reply, or with ``reply_audio`` off)."""
        if not self.audio_path:
            return b""
        with wave.open(self.audio_path) as w:
            return w.readframes(w.getnframes())

    def save_wav(self, path: str | os.PathLike[str]) -> Path:
        """Write the reply's audio to ``path`` as a WAV file; EngineError when there is none."""
        if not self.audio_path:
            raise EngineError("this reply has no audio (a text reply, or the engine runs with reply_audio: false)")
        out = Path(path)
        shutil.copyfile(self.audio_path, out)
        return out


@dataclass
class Turn:
    """A push-to-talk turn (:meth:`Session.turn`); ``reply`` is set when the answer is done."""
    reply: Reply | None = None


@dataclass
class Event:
    topic: str
    body: dict[str, Any]

    @property
    def text(self) -> str | None:
        return self.body.get("text")


class Session:
    """A conversation with a running engine, through the bus."""

    def __init__(self, conn: dict[str, Any], process: subprocess.Popen[bytes] | None = None, debug: bool = False) -> None:
        self.conn = conn
        self.process = process
        self.debug = debug
        self.name = f"py:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._bus: BusClient | None = None
        self._streams: list[tuple[str, asyncio.Queue[Event]]] = []
        self._tools: dict[str, Callable[..., Any]] = {}
        self._pending_tools: list[dict[str, Any]] = []
        self.cost = 0.0
        self.playing = False
        self.last_audio_response: str | None = None
        self._audio_idle = asyncio.Event()
        self._audio_idle.set()
        self.fatal: EngineError | None = None
        self.runtime_dir: Path | None = None   #: the engine's runtime directory (create_session's engine)
        #: the engine talks to GPT-Live (docs/live.md): no user text, no responses on demand, context instead
        self.live = is_live_model(str(conn.get("model") or ""))

    # ------------------------------------------------------------ plumbing
    async def _start(self) -> None:
        try:
            endpoints = endpoints_from(self.conn)
            # presence: our subscription to _presence.<name> says we are here (we own our tools)
            self._bus = await BusClient.connect(endpoints, self.name, SESSION_TOPICS, presence=True)
        except BusError as exc:
            raise NotRunning(f"{exc}") from None
        self._bus.listen(self._on_message)

    @property
    def bus(self) -> BusClient:
        if self._bus is None:
            raise EngineError("the session is not connected (use create_session() or connect())")
        return self._bus

    async def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.bus.publish(topic, payload)

    def _expect(self, pred: Callable[[str, dict[str, Any]], bool]) -> asyncio.Future[tuple[str, dict[str, Any]]]:
        return self.bus.expect(pred)

    def _on_message(self, topic: str, body: dict[str, Any]) -> None:
        if self.debug and not topic.startswith(("_join.", "server.", "engine.status", "cmd.")):
            shown = body.get("text", {k: v for k, v in body.items() if k not in HEADER_KEYS})
            print(f"[realtalk] {topic}: {shown}", file=sys.stderr)
        if topic == "cost.session":
            self.cost = float(body.get("usd", self.cost))
        elif topic == "response.done" and "session_usd" in body:
            self.cost = float(body["session_usd"])  # up to date when user() returns
        elif topic == "playout.started":
            self.playing = True
            self._audio_idle.clear()
        elif topic in ("playout.stopped", "playout.interrupted"):
            self.playing = False
            self._audio_idle.set()
        elif topic == "engine.error" and body.get("fatal"):
            self._fail_waiters(EngineError(f"the engine stopped: {body.get('source', 'engine')}: "
                                           f"{body.get('message')}"))
        elif topic == "tool.call" and body.get("name") in self._tools:
            asyncio.get_running_loop().create_task(self._run_tool(body))
        for prefix, q in self._streams:
            if topic.startswith(prefix):
                q.put_nowait(Event(topic, body))

    def _fail_waiters(self, exc: EngineError) -> None:
        """A fatal engine error: every waiter fails at once with it, instead of timing out later."""
        self.fatal = exc
        self.bus.fail(exc)

    async def _wait(self, fut: asyncio.Future[tuple[str, dict[str, Any]]], timeout_s: float,
                    what: str) -> tuple[str, dict[str, Any]]:
        if self.fatal is not None:
            raise self.fatal
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise EngineError(f"no {what} within {timeout_s:g} s; "
                              "see `engine status` and `engine log --type engine.error`") from None

    async def command(self, topic: str, payload: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
        """Send a command (again only until the engine acks it, which it does at once, then every 3 s
        to ask for an outcome that may have been lost; the engine carries it out once) and return
        its outcome, ``cmd.done`` (``ok``, ``item_id`` or ``error``), or its ``cmd.ack`` if the
        engine refused it. A command the engine holds (its realtime process restarting, a say
        queued behind an answer) is waited for up to ``timeout_s``."""
        if self.fatal is not None:
            raise self.fatal
        try:
            return await self.bus.call(topic, payload, outcome=True, outcome_timeout_s=timeout_s)
        except (NoAck, NoOutcome) as exc:
            raise EngineError(str(exc)) from None

    def _not_on_live(self, what: str, instead: str) -> None:
        """A call GPT-Live cannot do raises at once, naming why and what to use (docs/live.md)."""
        if self.live:
            raise EngineError(f"{what} is not available on GPT-Live ({self.conn.get('model')}): {instead}")

    # ------------------------------------------------------------ the quick-start API
    async def system(self, text: str, respond: bool = False, **response: Any) -> dict[str, Any] | Reply:
        """Add context the model sees and nobody hears; with ``respond=True`` the model answers
        (a :class:`Reply`), else the command's outcome (``cmd.done``). On GPT-Live it is silent
        context (``session.thinking.append``), done when placed on the session's timeline."""
        if respond:
            self._not_on_live("system(respond=True)", "the model decides when to speak; use commentary(text) "
                                                      "for something it should say")
            return await self._ask("cmd.say", {"text": text, "role": "system", "respond": True}, response, 120.0)
        ack = await self.command("cmd.say", {"text": text, "role": "system", "respond": False})
        if not ack.get("ok"):
            raise EngineError(f"system message refused: {ack.get('error')}")
        return ack

    async def user(self, text: str, timeout_s: float = 120.0, **response: Any) -> Reply:
        """Say ``text`` as the user; return when the response is done (text or transcript, usage, cost).
        ``response``: per-response options (instructions, output_modalities, conversation, input,
        metadata, tool_choice, max_output_tokens, speak; docs/bus-protocol.md). Realtime only."""
        self._not_on_live("user(text)", USER_TEXT_ON_LIVE)
        return await self._ask("cmd.say", {"text": text, "role": "user", "respond": True}, response, timeout_s)

    async def response(self, timeout_s: float = 120.0, **response: Any) -> Reply:
        """A response now, with per-response options; ``conversation="none"`` for an out-of-band
        reply (e.g. a classification) that does not enter the conversation and is not spoken."""
        self._not_on_live("response()", "the model decides when to speak; use commentary(text)")
        return await self._ask("cmd.respond", {}, response, timeout_s)

    async def commentary(self, text: str) -> dict[str, Any]:
        """GPT-Live: something the model says to the user in its own words (``cmd.commentary``);
        returns when it is placed on the session's timeline (``start_ms``)."""
        return await self._context("cmd.commentary", text)

    async def instructions(self, text: str) -> dict[str, Any]:
        """GPT-Live: more instructions for the model (``cmd.instructions``; kept through compaction)."""
        return await self._context("cmd.instructions", text)

    async def _context(self, topic: str, text: str) -> dict[str, Any]:
        if not self.live:
            raise EngineError(f"{topic} is GPT-Live's; on Realtime use system(text) for context, "
                              "update(instructions=...) for instructions")
        done = await self.command(topic, {"text": text})
        if not done.get("ok"):
            raise EngineError(f"{topic} refused: {done.get('error')}")
        return done

    async def model_turn(self, timeout_s: float = 120.0) -> str:
        """The model's next whole turn, as text (``model.transcript.done``): on GPT-Live, where the
        model speaks when it decides to, this is how to wait for what it says."""
        _, body = await self._wait(self._expect(lambda t, b: t == "model.transcript.done"), timeout_s,
                                   "model turn")
        return str(body.get("text", ""))

    async def stream(self, text: str, timeout_s: float = 120.0, **response: Any) -> AsyncIterator[str]:
        """Say ``text`` and yield the reply's text (or transcript) deltas as they arrive. Realtime only."""
        self._not_on_live("stream(text)", USER_TEXT_ON_LIVE)
        req_id = uuid.uuid4().hex
        q: asyncio.Queue[Event] = asyncio.Queue()
        entry = ("", q)
        self._streams.append(entry)
        try:
            await self._send_request("cmd.say", {"text": text, "role": "user", "respond": True, "id": req_id},
                                     response)
            deadline = time.monotonic() + timeout_s
            while True:
                if self.fatal is not None:
                    raise self.fatal
                try:
                    ev = await asyncio.wait_for(q.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise EngineError(f"no end of the answer within {timeout_s:g} s") from None
                if ev.body.get("request_id") != req_id:
                    continue
                if ev.topic in ("model.text.delta", "model.transcript.delta"):
                    yield ev.body.get("text", "")
                elif ev.topic == "response.done":
                    if ev.body.get("status") == "failed":
                        raise ResponseFailed(f"the answer failed ({ev.body.get('reason')}): {ev.body.get('message')}",
                                             ev.body)
                    return
        finally:
            self._streams.remove(entry)

    async def _send_request(self, topic: str, payload: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
        if response:
            payload["response"] = dict(response)
        if self._pending_tools:
            await self.register_tools()
        ack = await self.command(topic, payload)
        if not ack.get("ok"):
            raise EngineError(f"{topic} refused: {ack.get('error')}")
        return ack

    async def _ask(self, topic: str, payload: dict[str, Any], response: dict[str, Any], timeout_s: float) -> Reply:
        req_id = uuid.uuid4().hex
        payload["id"] = req_id
        done = self._expect(lambda t, b: t == "response.done" and b.get("request_id") == req_id)
        ack = await self._send_request(topic, payload, response)
        _, body = await self._wait(done, timeout_s, "answer")
        if body.get("status") == "failed":
            raise ResponseFailed(f"the answer failed ({body.get('reason')}): {body.get('message')}", body)
        usd = float(body.get("usd", 0.0))
        while body.get("function_calls") and body.get("status") == "completed":
            # the model called tools: the answer is the response that follows their output
            nxt = self._expect(_next_response_done(body["response_id"]))
            _, body = await self._wait(nxt, timeout_s, "answer after the tool calls")
            usd += float(body.get("usd", 0.0))
        usage = body.get("usage") or {}
        if (usage.get("output_token_details") or {}).get("audio_tokens") and response.get("conversation") != "none":
            self.last_audio_response = body["response_id"]
            if not self.playing:
                self._audio_idle.clear()  # its audio has yet to finish playing
        return Reply(body.get("text", ""), body.get("status", ""), body.get("usage"), usd,
                     body["response_id"], ack.get("item_id"), body.get("audio_path"))

    async def mic(self, open: bool) -> dict[str, Any]:
        """Open or close the mic gate: while closed no mic audio reaches the model."""
        return await self.command("cmd.mic", {"open": open})

    @contextlib.asynccontextmanager
    async def turn(self, timeout_s: float = 120.0, **response: Any) -> AsyncIterator["Turn"]:
        """Push-to-talk: ``async with session.turn() as t: ...`` opens the mic (stopping the model if it
        speaks) and, on leaving, commits what was said and waits for the answer (``t.reply``).
        Meant for ``turn_detection: null``; the gate is closed again afterwards. Realtime only."""
        self._not_on_live("turn()", "there is no input buffer: the mic streams all the time and the model decides "
                                    "when the user's turn ends (mic(False) mutes the user)")
        t = Turn()
        await self.command("cmd.cancel", {})
        await self.command("cmd.input.clear", {})
        await self.mic(True)
        try:
            yield t
        except BaseException:
            await self.mic(False)
            await self.command("cmd.input.clear", {})
            raise
        await self.mic(False)
        t.reply = await self._ask("cmd.input.commit", {"respond": True}, response, timeout_s)

    async def audio_done(self, timeout_s: float = 120.0) -> None:
        """Resolve when playback of the last response has finished (at once if there was no audio)."""
        if self.last_audio_response is None:
            return
        await asyncio.wait_for(self._audio_idle.wait(), timeout_s)

    async def cancel(self) -> dict[str, Any]:
        """Stop the current response and its playback. Realtime only."""
        self._not_on_live("cancel()", "the model yields by itself when the user talks over it")
        return await self.command("cmd.cancel", {})

    async def update(self, **session: Any) -> dict[str, Any]:
        """Change the session (a partial GA session, e.g. ``instructions=...``)."""
        return await self.command("cmd.session.update", {"session": session})

    async def events(self, prefix: str = "") -> AsyncIterator[Event]:
        """Every bus event whose topic starts with ``prefix``, from now on."""
        self.bus.subscribe(prefix)
        q: asyncio.Queue[Event] = asyncio.Queue()
        entry = (prefix, q)
        self._streams.append(entry)
        try:
            while True:
                yield await q.get()
        finally:
            self._streams.remove(entry)

    def tool(self, fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
             parameters: dict[str, Any] | None = None, timeout_s: float = 10.0) -> Any:
        """Decorator: register ``fn`` as a tool the model can call; it runs here, in this process.

        Call ``await session.register_tools()`` (or use it before :meth:`user`) to send the registration.
        """
        def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
            tool_name = name or f.__name__
            self._tools[tool_name] = f
            params = parameters or _schema_from_signature(f)
            self._pending_tools.append({"name": tool_name, "description": description or (f.__doc__ or "").strip(),
                                        "parameters": params, "timeout_s": timeout_s, "owner": self.name})
            return f
        return wrap(fn) if fn is not None else wrap

    async def register_tools(self) -> None:
        for spec in self._pending_tools:
            ack = await self.command("cmd.tool.register", dict(spec))
            if not ack.get("ok"):
                raise EngineError(f"tool {spec['name']} refused: {ack.get('error')}")
        self._pending_tools = []

    async def _run_tool(self, call: dict[str, Any]) -> None:
        fn = self._tools[call["name"]]
        try:
            args = json.loads(call.get("arguments") or "{}")
            if isinstance(args, dict):
                args = _fitting(fn, args)   # a GPT-Live delegation carries `request` beside the tool's own
            result = fn(**args) if isinstance(args, dict) else fn(args)
            if inspect.isawaitable(result):
                result = await result
            output = result if isinstance(result, str) else json.dumps(result)
        except Exception as exc:  # the model hears about it instead of waiting in silence
            output = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        await self._publish("cmd.tool.result", {"call_id": call["call_id"], "output": output})

    async def close(self) -> None:
        """Detach; stop the engine if this session started it."""
        if self._bus is not None:
            await self._bus.close()
        if self.process is not None:
            self.process.send_signal(2)
            await asyncio.to_thread(self.process.wait, 20)
            if self.runtime_dir is not None:
                _claimed_dirs.discard(self.runtime_dir)

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _fitting(fn: Callable[..., Any], args: dict[str, Any]) -> dict[str, Any]:
    """The arguments ``fn`` takes (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return args
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return args
    return {k: v for k, v in args.items() if k in params}


def _next_response_done(previous: str) -> Callable[[str, dict[str, Any]], bool]:
    """A waiter's test: a response.done of a response other than ``previous``."""
    return lambda t, b: t == "response.done" and b.get("response_id") != previous


def _drain(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    for _ in proc.stdout:
        pass


def _die_with_parent() -> None:
    from engine.child import parent_death_signal
    parent_death_signal()


def _schema_from_signature(fn: Callable[..., Any]) -> dict[str, Any]:
    types = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        props[p.name] = {"type": types.get(p.annotation, "string")} if p.annotation in types else {}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    return {"type": "object", "properties": props, "required": required}


async def connect(path: str | os.PathLike[str] | None = None, debug: bool = False) -> Session:
    """Attach to the engine of this user's that is already running (its connection file, default
    the runtime directory's: the endpoints and, with ``bus.transport: tcp``, the CURVE keys): the
    file must be this user's own private file and its supervisor provably this user's running
    engine (bus/runtime.py), else NotRunning or EngineError naming the file and the fix; nothing
    is sent to the bus an untrusted file names."""
    try:
        conn = running_engine(path)
    except NoEngine as exc:
        raise NotRunning(f"{exc}; or use create_session()") from None
    except BusError as exc:
        raise EngineError(str(exc)) from None
    session = Session(conn, debug=debug)
    await session._start()
    return session


_SESSION_KEYS = {"instructions", "voice", "output_modalities", "turn_detection", "transcription", "noise_reduction", "tools"}
_OPTION_KEYS = {"model", "api_key", "debug", "text_only", "mic", "speaker", "backend", "scenario", "speed", "config",
                "runtime_dir"}
_claimed_dirs: set[Path] = set()  #: runtime directories this program's sessions use


def _claim_runtime_dir(given: str | os.PathLike[str] | None, tmp: Path) -> Path:
    """Where the new engine's sockets and connection file go. The first session of a program takes
    the default runtime directory when no engine runs there, so `engine status`, `engine say`
    and other processes find it as usual; each further one gets a private directory (several
    sessions in one program, one engine each). ``given`` overrides both. Each is this user's own
    private directory (made new with mode 0700, or refused naming it: bus/runtime.py)."""
    try:
        if given is not None:
            path = private_dir(given)
        else:
            default = runtime_dir()
            path = default if default not in _claimed_dirs and not _engine_runs_in(default) else private_dir(tmp / "run")
    except BusError as exc:
        raise EngineError(str(exc)) from None
    _claimed_dirs.add(path)
    return path


def _engine_runs_in(path: Path) -> bool:
    """An engine's connection file is there, this user's own, and names a supervisor that is this
    user's engine running now (by its identity, as `engine start` checks it: a reused pid is not an engine)."""
    try:
        return engine_alive(read_connection(path / "engine.json"))
    except (OSError, BusError):
        return False


async def create_session(session: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> Session:
    """Start an engine with this session config and return a :class:`Session` attached to it.

    ``session``: instructions, voice, output_modalities, turn_detection, transcription, tools.
    ``options``: model, api_key (None: local server unless $OPENAI_API_KEY), debug, text_only, mic,
    speaker, backend, scenario, speed, config (a config.yaml to start from).
    """
    session = dict(session or {})
    options = dict(options or {})
    unknown = set(session) - _SESSION_KEYS
    if unknown:
        raise EngineError(f"unknown session key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_SESSION_KEYS))})")
    unknown = set(options) - _OPTION_KEYS
    if unknown:
        raise EngineError(f"unknown option {sorted(unknown)[0]!r} (known: {', '.join(sorted(_OPTION_KEYS))})")
    cfg: dict[str, Any] = {}
    if options.get("config"):
        cfg = yaml.safe_load(Path(options["config"]).read_text()) or {}
    cfg.setdefault("session", {}).update(session)
    cfg.setdefault("reply_audio", True)  # Reply.audio
    if options.get("model"):
        cfg["model"] = options["model"]
    env = dict(os.environ)
    if options.get("api_key"):
        env["OPENAI_API_KEY"] = options["api_key"]
    text_only = options.get("text_only", session.get("output_modalities") == ["text"])
    tmp = Path(tempfile.mkdtemp(prefix="realtalk-session-"))  # 0700: this engine's own runtime directory
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_dir = _claim_runtime_dir(options.get("runtime_dir"), tmp)
    env["REALTALK_RUNTIME_DIR"] = str(run_dir)
    argv = [sys.executable, "-m", "engine.api.cli", "start", "--config", str(cfg_path)]
    for key in ("backend", "mic", "speaker", "scenario", "speed"):
        if options.get(key) is not None:
            argv += [f"--{key}", str(options[key])]
    if text_only:
        argv.append("--text-only")
    # the engine dies with this program, however it ends (a script that raises leaves no orphan)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=_die_with_parent)
    lines: list[str] = []

    def wait_ready() -> bool:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if options.get("debug"):
                print(line, end="", file=sys.stderr)
            if "ready in" in line:
                return True
        return False
    if not await asyncio.to_thread(wait_ready):
        proc.wait()
        raise EngineError("the engine did not start:\n" + "".join(lines))
    # keep draining its output so it never blocks on a full pipe; a daemon thread, so a program that
    # ends (or raises) without close() does not wait for it (the default executor would: a hang)
    threading.Thread(target=_drain, args=(proc,), name="realtalk-engine-output", daemon=True).start()
    try:
        conn = read_connection(run_dir / "engine.json")   # this user's own private file only
    except BusError as exc:
        proc.send_signal(2)
        raise EngineError(f"the engine started but its connection file is not usable: {exc}") from None
    s = Session(conn, process=proc, debug=bool(options.get("debug")))
    s.runtime_dir = run_dir
    await s._start()
    return s

"""``engine console``: the debug console's web server (HTTP and a WebSocket, both from the
``websockets`` library, on one port).

* ``GET /?token=T`` the page; ``/static/...`` its files (shipped in the package: no build
  step, nothing fetched at run time).
* ``GET /ws?token=T`` a WebSocket: the server sends ``{"op": "hello"}`` (text) then binary
  batches of bus messages, each message's topic and msgpack body as the bus carried them
  (:func:`engine.console.relay.encode_batch`; the backlog first); the page sends
  ``{"op": "say", "text", "role"}`` (role user, system, or on GPT-Live instructions or
  commentary), ``{"op": "cancel"}``,
  ``{"op": "mic", "open"}`` and gets ``{"op": "sent", "id", "topic"}`` or ``{"op": "error", "message"}``.
* ``GET /listen?token=T`` and ``/talk?token=T``: WebSockets of PCM, the speaker's sound to
  the page and the page's microphone to the engine (:mod:`engine.console.sound`; the PCM
  goes through shared-memory rings, never the bus).
* ``GET /api/sessions``, ``/api/session/events?key=K``, ``/api/session/levels?key=K``,
  ``/api/session/wav?key=K``: finished sessions (look back, :mod:`engine.console.lookback`).

Access: it listens on loopback unless told otherwise, and everything but the static files
needs the random token of its URL (as Jupyter does); the API key never reaches it (the
console has no spec key but the bus endpoints). While it runs, ``console.json`` (0600, written
to a new file renamed over it) in the engine's runtime directory (0700) holds its URL and
token for ``engine status``; it is believed only when it is this user's own private file and
names a console process of this user's that runs (bus/runtime.py).

Host and Origin, checked on every request before the token (403 and one log line per refused
value a minute): the ``Host`` header must name the console by an IP address, ``localhost``, this
machine's host name or a name given with ``--allow-host`` (:func:`host_allowed`: a DNS-rebinding
page reaches 127.0.0.1 under its own domain name, which its requests carry as Host); an
``Origin`` header, when there is one, must be the console's own, ``http(s)://`` + that Host
(:func:`origin_allowed`: another site's page that learnt a token cannot open the console's
WebSockets, the listen and talk sockets among them, in its visitor's browser). A request
without ``Origin`` is not a browser's cross-site request (browsers send it on every WebSocket
handshake) and goes on to the token check.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import mimetypes
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, TextIO
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bus import Endpoints
from bus import BusError
from bus.runtime import own_process, proc_exe, proc_start_ticks, read_private_json, runtime_dir, write_private_file
from engine.console import lookback
from engine.console.relay import (BACKLOG, BATCH_S, IDLE_BATCH_S, BusRelay, ConsoleError, PageQueue, encode_batch,
                                  MessageKey, message_key, page_start)
from engine.console.sound import WRITE_LIMIT_BYTES, ListenHub, Rings, TalkHub, audio_stats, send_now

STATIC = Path(__file__).resolve().parent / "static"
INFO_FILE = "console.json"
MAX_SAY_CHARS = 20_000
#: a page's ``say`` roles: a user message or system context (``cmd.say``; on GPT-Live, system is
#: silent context), and GPT-Live's instructions and commentary (``cmd.instructions``, ``cmd.commentary``)
SAY_ROLES = ("user", "system", "instructions", "commentary")
AUDIO_STATS_EVERY_S = 2.0
#: a page's start waits until this long after the relay subscribed for the session's log to hold
#: the relay's anchor (the supervisor writes the log once a round, every 0.5 s when nothing is
#: late), then goes with what the log holds
LOG_CATCH_UP_S = 2.0
LOG_POLL_S = 0.1
REFUSAL_LOG_EVERY_S = 60.0     #: a refused Host or Origin value is logged at most this often


def _host_name(host: str) -> str | None:
    """The name in a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), lower case, without
    port or brackets; None if it is not of that form."""
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return name or None
    name, sep, port = host.partition(":")
    if sep and not port.isdigit():
        return None
    return name or None


def host_allowed(host: str | None, names: Iterable[str]) -> bool:
    """The DNS-rebinding check: ``host`` (a ``Host`` header) names the console by an IP address,
    ``localhost`` or one of ``names`` (this machine's host name, ``--allow-host``). A rebinding
    page's requests carry the attacker's own domain name, never one of these."""
    name = _host_name(host or "")
    if name is None:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name == "localhost" or name in {n.strip().lower() for n in names}


def origin_allowed(origin: str | None, host: str | None) -> bool:
    """The cross-site check: no ``Origin`` (not a browser's cross-site request), or the console's
    own, ``http://`` or ``https://`` (behind a TLS proxy) + its ``Host``. ``null`` (a sandboxed
    frame, a file) is refused."""
    if origin is None:
        return True
    parts = urlsplit(origin.strip())
    return (parts.scheme in ("http", "https") and bool(parts.netloc) and host is not None
            and parts.netloc.lower() == host.strip().lower() and not parts.path.strip("/"))


def info_path() -> Path:
    """Where a running console records its URL (the engine's runtime directory)."""
    return runtime_dir() / INFO_FILE


def read_info() -> dict[str, Any] | None:
    """The running console's ``console.json`` ({url, pid, pid_start_ticks, exe, host, port}) if it
    is this user's own private file and its process is provably this user's console still
    running, else None."""
    try:
        info = read_private_json(info_path(), "console file")
    except (OSError, BusError):
        return None
    if not isinstance(info, dict) or not own_process(info.get("pid"), info.get("pid_start_ticks"), info.get("exe")):
        return None
    return info


def _response(status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8") -> Response:
    data = body.encode() if isinstance(body, str) else body
    reason = {200: "OK", 206: "Partial Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
              416: "Range Not Satisfiable", 500: "Internal Server Error"}
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(data))),
                       ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                       ("Referrer-Policy", "no-referrer")])
    return Response(status, reason.get(status, "Error"), headers, data)


def _file_range(path: Path, byte_range: str | None, content_type: str) -> Response:
    """``path``, or the part a ``Range: bytes=A-B`` header asks for (the browser seeks in a
    recording that way, and reads a long one in parts)."""
    size = path.stat().st_size
    if not byte_range or not byte_range.startswith("bytes="):
        resp = _response(200, path.read_bytes(), content_type)
        resp.headers["Accept-Ranges"] = "bytes"
        return resp
    first, _, last = byte_range[len("bytes="):].split(",")[0].strip().partition("-")
    try:
        if first:
            start, end = int(first), min(size - 1, int(last) if last else size - 1)
        else:
            start, end = max(0, size - int(last)), size - 1
    except ValueError:
        start, end = size, 0
    end = min(end, start + (8 << 20) - 1)   # at most 8 MB a request: the browser asks for the rest
    if start >= size or end < start:
        resp = _response(416, b"")
        resp.headers["Content-Range"] = f"bytes */{size}"
        return resp
    with path.open("rb") as f:
        f.seek(start)
        data = f.read(end - start + 1)
    resp = _response(206, data, content_type)
    resp.headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{size}"
    resp.headers["Accept-Ranges"] = "bytes"
    return resp


def _json(status: int, value: Any) -> Response:
    return _response(status, json.dumps(value, default=str), "application/json")


class ConsoleServer:
    """Serves the page for the engine whose bus is ``endpoints``."""

    def __init__(self, endpoints: Endpoints, *, host: str = "127.0.0.1", port: int = 0,
                 sessions_base: Path | None = None, live_session: str | None = None,
                 token: str | None = None, out: TextIO = sys.stdout, rings: dict[str, str] | None = None,
                 allowed_hosts: Iterable[str] = ()) -> None:
        """``rings``: the engine's ring names by kind (the supervisor's spec); without them the
        listen and talk rings are found in the running engine's ``engine.json``. ``allowed_hosts``:
        host names the console may be reached by besides IP addresses, ``localhost`` and this
        machine's name (a reverse proxy's, a DNS name of this machine)."""
        self.endpoints = endpoints
        self.host = host
        self.port = port
        self.sessions_base = sessions_base
        self.live_session = live_session
        self.token = token or secrets.token_urlsafe(24)
        self.out = out
        self.pages: dict[ServerConnection, PageQueue] = {}   #: the open pages' queues, by socket
        self.relay: BusRelay | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._audio_stats_at_s = 0.0
        self._audio_changes = 0
        self.url = ""
        self.rings = Rings(rings)
        self.listen = ListenHub(self.rings, self._publish)
        self.talk = TalkHub(self.rings, self._publish)
        self.host_names = (socket.gethostname(), *allowed_hosts)
        self.refused_requests = 0                      #: requests refused for their Host or Origin
        self._refusals_logged: dict[str, float] = {}   #: refused value -> when it was last logged

    # ------------------------------------------------------------ HTTP
    def _foreign(self, path: str, headers: Any) -> Response | None:
        """403 for a request whose Host or Origin is not the console's own (module docstring),
        with a log line (each refused value at most once a REFUSAL_LOG_EVERY_S); None if both are."""
        hosts, origins = headers.get_all("Host"), headers.get_all("Origin")
        host = hosts[0] if len(hosts) == 1 else ", ".join(hosts)     # two are refused: neither is trusted
        origin = origins[0] if len(origins) == 1 else (", ".join(origins) if origins else None)
        if not host_allowed(host, self.host_names):
            what = f"Host {host!r}"
            why = (f"the console refuses {what}: open it by its IP address, localhost or this machine's name "
                   f"({self.host_names[0]}); another name must be allowed with --allow-host NAME "
                   "(a page under a foreign name may be a DNS-rebinding attack)")
        elif not origin_allowed(origin, host):
            what = f"Origin {origin!r}"
            why = (f"the console refuses requests from the page at {what}: only its own pages "
                   f"(http://{host}) may use it (cross-site WebSocket hijacking)")
        else:
            return None
        self.refused_requests += 1
        now = time.monotonic()
        if now - self._refusals_logged.get(what, -1e9) >= REFUSAL_LOG_EVERY_S:
            self._refusals_logged[what] = now
            self.out.write(f"realtalk: console: refused {path} with 403: {why} "
                           f"({self.refused_requests} refused so far)\n")
            self.out.flush()
        return _response(403, why + "\n")

    def _authorized(self, query: dict[str, list[str]]) -> bool:
        given = (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Everything but the WebSocket handshake is answered here."""
        parts = urlsplit(request.path)
        path, query = parts.path, parse_qs(parts.query)
        foreign = self._foreign(path, request.headers)
        if foreign is not None:
            return foreign
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path == "/favicon.ico":
            return _response(404, "")
        if not self._authorized(query):
            return _response(403, "the console needs the token of its URL (engine status prints it)")
        if path in ("/ws", "/listen", "/talk"):
            return None  # on to the WebSocket handshake
        if path in ("/", "/index.html"):
            return self._static("index.html")
        try:
            return self._api(path, query, request.headers.get("Range"))
        except ConsoleError as exc:
            return _json(400, {"error": str(exc)})

    def _static(self, name: str) -> Response:
        target = (STATIC / name).resolve()
        if STATIC not in target.parents or not target.is_file():
            return _response(404, f"no such file: {name}")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript",):
            ctype += "; charset=utf-8"
        return _response(200, target.read_bytes(), ctype)

    def _api(self, path: str, query: dict[str, list[str]], byte_range: str | None = None) -> Response:
        base = self.sessions_base
        if path == "/api/info":
            return _json(200, {"live_session": self.live_session, "sessions_dir": str(base) if base else None,
                               "now_ns": time.monotonic_ns()})
        if base is None:
            raise ConsoleError("this console knows no sessions directory")
        if path == "/api/sessions":
            return _json(200, {"sessions": lookback.list_sessions(base), "live_session": self.live_session})
        key = (query.get("key") or [""])[0]
        if path == "/api/session/events":
            return _json(200, lookback.read_events(lookback.session_folder(base, key)))
        if path == "/api/session/levels":
            return _json(200, lookback.wav_levels(lookback.session_folder(base, key)))
        if path == "/api/session/wav":
            wav = lookback.session_folder(base, key) / "conversation.wav"
            if not wav.exists():
                raise ConsoleError(f"session {key} has no conversation.wav")
            return _file_range(wav, byte_range, "audio/wav")
        return _response(404, f"no such page: {path}")

    # ------------------------------------------------------------ WebSocket
    def _deliver(self, batch: list[bytes]) -> None:
        for page in self.pages.values():
            page.put_many(batch)

    def _send_batches(self) -> None:
        """Each page's waiting records as one batch. A page whose socket is behind is not waited
        for: its records wait in its bounded queue (:func:`engine.console.sound.send_now`)."""
        for ws, page in self.pages.items():
            if page.items and not page.held and send_now(ws, encode_batch(page.items, time.monotonic_ns(), page.dropped)):
                page.take()
                page.dropped = 0

    def _tick(self, relay: BusRelay, stop: asyncio.Event) -> None:
        """The console's one timer (a plain callback, which schedules the next): every BATCH_S
        while a page is open, listens or a command waits for its ack (IDLE_BATCH_S otherwise),
        the bus messages that came meanwhile to every page (one batch each), the listen ring's
        audio to every listener, and ``console.audio`` (:meth:`_audio_stats`). A bus failure
        stops the console (``relay.error``, then ``stop``)."""
        loop = asyncio.get_running_loop()
        try:
            now = time.monotonic()
            relay.drain(now)
            self._send_batches()
            self.listen.pump(now)
            self._audio_stats(now)
        except Exception as exc:   # zmq failing under us: serve() reports it
            relay.error = exc
            stop.set()
            return
        busy = bool(self.pages) or bool(self.listen.listeners) or relay.waiting
        self._tick_handle = loop.call_later(BATCH_S if busy else IDLE_BATCH_S, self._tick, relay, stop)

    def _audio_stats(self, now_s: float) -> None:
        """``console.audio`` every AUDIO_STATS_EVERY_S while a page listens or talks, and when one starts or stops."""
        assert self.relay is not None
        active = bool(self.listen.listeners) or self.talk.talking is not None
        was, self._audio_changes = self._audio_changes, self.listen.changes + self.talk.changes
        if (active and now_s >= self._audio_stats_at_s) or self._audio_changes != was:
            self._audio_stats_at_s = now_s + AUDIO_STATS_EVERY_S
            self.relay.publish("console.audio", audio_stats(self.listen, self.talk))

    def _command(self, msg: Any) -> dict[str, Any]:
        """A page's command → the bus command it publishes (checked; ConsoleError naming what is wrong)."""
        if not isinstance(msg, dict):
            raise ConsoleError("a command is a JSON object with an 'op'")
        op = msg.get("op")
        assert self.relay is not None
        payload: dict[str, Any]
        if op == "say":
            text, role = msg.get("text"), msg.get("role", "user")
            if not isinstance(text, str) or not text.strip():
                raise ConsoleError("say: type some text first")
            if len(text) > MAX_SAY_CHARS:
                raise ConsoleError(f"say: the text is {len(text)} characters; at most {MAX_SAY_CHARS}")
            if role not in SAY_ROLES:
                raise ConsoleError(f"say: role {role!r} is not one of {', '.join(SAY_ROLES)}")
            if role in ("instructions", "commentary"):   # GPT-Live's own context commands (docs/live.md)
                topic, payload = f"cmd.{role}", {"text": text}
            else:
                respond = bool(msg.get("respond", role == "user"))
                topic, payload = "cmd.say", {"text": text, "role": role, "respond": respond}
        elif op == "cancel":
            topic, payload = "cmd.cancel", {}
        elif op == "mic":
            if not isinstance(msg.get("open"), bool):
                raise ConsoleError("mic: 'open' must be true or false")
            topic, payload = "cmd.mic", {"open": msg["open"]}
        else:
            raise ConsoleError(f"unknown op {op!r}: the page may send say, cancel, mic")
        return {"op": "sent", "topic": topic, "id": self.relay.command(topic, payload)}

    async def _reader(self, ws: ServerConnection) -> None:
        async for raw in ws:
            try:
                reply = self._command(json.loads(raw))
            except (ValueError, ConsoleError) as exc:
                reply = {"op": "error", "message": str(exc)}
            if isinstance(raw, str):
                try:
                    reply["ref"] = json.loads(raw).get("ref")
                except (ValueError, AttributeError):
                    pass
            await ws.send(json.dumps(reply))

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        if self.relay is not None:
            self.relay.publish(topic, payload)

    async def handler(self, ws: ServerConnection) -> None:
        assert self.relay is not None
        path = urlsplit(ws.request.path).path if ws.request is not None else "/ws"
        if path == "/listen":
            return await self.listen.serve(ws)
        if path == "/talk":
            return await self.talk.serve(ws)
        page = PageQueue(held=True)
        try:
            await ws.send(json.dumps({"op": "hello", "now_ns": time.monotonic_ns(), "live_session": self.live_session}))
            self.relay.drain()   # the backlog up to now (the tick may have been idle)
            backlog, backlogged = list(self.relay.backlog), self.relay.backlogged
            self.pages[ws] = page   # collects what comes from now on, sent after its start
            start, logged = await self._page_start(backlog, backlog_whole=backlogged == len(backlog))
            self.relay.drain()   # what is in flight goes to the held page now, where ``known`` meets it
            page.put_front(start, known=logged)
            page.held = False
            await self._reader(ws)
        except ConnectionClosed:
            pass
        finally:
            self.pages.pop(ws, None)

    async def _page_start(self, backlog: list[bytes], backlog_whole: bool) -> tuple[list[bytes], set[MessageKey]]:
        """What a page starts with (:func:`~engine.console.relay.page_start`): the live session's
        log before the relay's anchor, then the relay's ``backlog``, so a console that subscribed
        late (``engine console`` run mid-conversation, or a child slower to start than the
        session) shows what came before it; and the engine's latest state where neither holds it.
        Until LOG_CATCH_UP_S after the relay subscribed, a page waits for the log to hold the
        anchor (everything before it is then written); after that, the log's part ends where
        the relay subscribed. The backlog alone (and the state) without the live session's log
        (``engine console`` for an engine that names no session folder), or once the backlog has
        dropped messages (``backlog_whole`` false: what the log adds would be older than a
        gap). Reads in a worker thread. Also the keys of the logged messages kept."""
        relay = self.relay
        assert relay is not None
        state = list(relay.last_state.values())
        if self.sessions_base is None or self.live_session is None or not backlog_whole:
            return page_start([], None, backlog, BACKLOG, state)
        folder = self.sessions_base / self.live_session
        deadline = relay.opened_mono + LOG_CATCH_UP_S
        while True:
            anchor = relay.anchor   # (the tick may set it meanwhile)
            try:
                logged = await asyncio.to_thread(lookback.tail_events, folder, BACKLOG)
            except OSError as exc:
                self.out.write(f"realtalk: console: the session's event log cannot be read ({exc}); "
                               "the page starts at the console's join\n")
                self.out.flush()
                return page_start([], None, backlog, BACKLOG, state)
            found = anchor is not None and any(message_key(t, b) == anchor for t, b in logged)
            if found or time.monotonic() >= deadline:
                return await asyncio.to_thread(page_start, logged, anchor if found else None, backlog, BACKLOG,
                                               state, relay.opened_ns)
            await asyncio.sleep(LOG_POLL_S)

    # ------------------------------------------------------------ lifecycle
    def _write_info(self) -> None:
        write_private_file(info_path(), json.dumps({
            "url": self.url, "pid": os.getpid(), "pid_start_ticks": proc_start_ticks(os.getpid()),
            "exe": proc_exe("self"), "host": self.host, "port": self.port}))

    def _remove_info(self) -> None:
        try:
            if read_private_json(info_path(), "console file").get("pid") == os.getpid():
                info_path().unlink()
        except (OSError, BusError, AttributeError):
            pass

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set."""
        self.relay = BusRelay(self.endpoints, self._deliver)
        self.relay.open()
        self._tick_handle = asyncio.get_running_loop().call_later(BATCH_S, self._tick, self.relay, stop)
        try:
            async with serve(self.handler, self.host, self.port, process_request=self.process_request,
                             max_size=1 << 20, compression=None, ping_interval=20,
                             write_limit=WRITE_LIMIT_BYTES) as server:
                sock = next(iter(server.sockets))
                self.port = sock.getsockname()[1]
                shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
                self.url = f"http://{shown}:{self.port}/?token={self.token}"
                self._write_info()
                self.out.write(f"realtalk: console {self.url}\n")
                if self.host not in ("127.0.0.1", "localhost", "::1"):
                    self.out.write(f"realtalk: console: listening on {self.host}, not only loopback: anyone "
                                   "with the URL's token can see and steer the conversation\n")
                self.out.flush()
                await stop.wait()
                if self.relay.error is not None:
                    raise ConsoleError(f"the console lost the bus: {self.relay.error}")
        except OSError as exc:
            raise ConsoleError(f"the console cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; "
                               "give another --console-port (0: any free port)") from None
        finally:
            self._remove_info()
            if self._tick_handle is not None:
                self._tick_handle.cancel()
            self.relay.close()
            self.rings.close()


def run(server: ConsoleServer) -> int:
    """Run ``server`` until SIGINT/SIGTERM; 0 on a clean stop."""
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signo in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signo, stop.set)
        await server.serve(stop)
    asyncio.run(main())
    return 0

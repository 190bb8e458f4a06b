"""``engine start``: the supervisor and its children.

Children (each its own OS process, started with ``python -m``): the bus broker, the
local server (local backend), realtime, capture and playback. The supervisor creates
the shared-memory rings and the mic ring's eventfd (passed to the children with
``pass_fds``), hands each child its spec as one JSON line on its stdin (never a file:
the realtime spec holds the API key, every spec the bus signing key), writes the
connection file, keeps the session's event log, publishes
``engine.status`` every second, restarts a child that dies (with backoff, as
supervisord's BACKOFF state), and on SIGINT/SIGTERM stops everything in reverse order
(TERM, a grace period, then KILL), unlinks the rings and removes socket and connection
files. Signal handlers only set a flag; the main loop does the work.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from bus import Endpoints, Publisher, Subscriber, generate_keys
from bus.client import connection_file, runtime_dir
from engine.config import resolve_backend, session_payload
from engine.errors import EngineError
from engine.ring import Ring

MIC_RING_FRAMES = 1 << 16        # 2.7 s at 24 kHz
SPEAKER_RING_FRAMES = 1 << 21    # 87 s: the API sends audio faster than real time
REF_RING_FRAMES = 1 << 15        # 1.4 s: what playback played, read by capture in step
GRACE_S = 3.0
MAX_RESTARTS = 5
LOOP_PERIOD_S = 0.25             # the main loop: bus messages, reaping, status


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_sessions_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "realtalk" / "sessions"


@dataclass
class Child:
    name: str
    argv: list[str]
    required: bool = True
    pass_fds: tuple[int, ...] = ()
    stdout: Any = None
    spec: dict[str, Any] | None = None   #: written to the child's stdin (engine.child.read_spec)
    proc: subprocess.Popen[bytes] | None = None
    state: str = "stopped"
    restarts: int = 0
    started_at: float = 0.0
    exit_code: int | None = None
    restart_at: float | None = None
    history: list[float] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class Supervisor:
    def __init__(self, cfg: dict[str, Any], *, text_only: bool = False, out: TextIO = sys.stdout) -> None:
        self.cfg = cfg
        self.text_only = text_only
        self.out = out
        self.backend = resolve_backend(cfg)
        self.stopping = False
        self.children: list[Child] = []
        self.rings: list[Ring] = []
        self.run_dir = runtime_dir()
        self.session_key = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        base = Path(cfg["record"] or cfg["sessions_dir"] or default_sessions_dir())
        self.session_dir = base / self.session_key
        os.umask(0o077)  # session files (events.jsonl, conversation.wav) and children's files: 0600
        self.session_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.session_dir, 0o700)
        #: signs the engine's own bus messages (spec key bus.signing_key, hex); never on disk or the bus
        self.signing_key = secrets.token_bytes(32)
        self.bus_keys = generate_keys(self.signing_key)  # and CURVE keys for tcp (bus/security.py)
        self.endpoints = self._endpoints()
        self.session_id: str | None = None
        self.cost_usd = 0.0
        self.connected = False
        self.errors: list[dict[str, Any]] = []
        self.forged = 0                  #: fatal engine.error messages from outside the engine, ignored
        self.fatal: str | None = None
        self.started_mono = time.monotonic()
        self.ready_mono: float | None = None
        self.log_file: TextIO | None = None
        self.server_url: str | None = None
        self.listener: socket.socket | None = None

    # ------------------------------------------------------------ setup
    def _endpoints(self) -> Endpoints:
        bus = self.cfg["bus"]
        if bus["transport"] == "tcp":
            host = bus["tcp_host"]
            pub = bus["tcp_publish_port"] or free_port(host)
            sub = bus["tcp_subscribe_port"] or free_port(host)
            return Endpoints(f"tcp://{host}:{pub}", f"tcp://{host}:{sub}", curve=self.bus_keys.client(),
                             signing_key=self.signing_key)
        return Endpoints(f"ipc://{self.run_dir}/bus-publish.sock", f"ipc://{self.run_dir}/bus-subscribe.sock",
                         signing_key=self.signing_key)

    def _check_not_running(self) -> None:
        path = connection_file()
        if path.exists():
            try:
                pid = json.loads(path.read_text())["pid"]
                os.kill(pid, 0)
            except (ValueError, KeyError, ProcessLookupError, PermissionError):
                path.unlink(missing_ok=True)  # stale file of an engine that died
                return
            raise EngineError(f"an engine is already running (pid {pid}); stop it with `engine stop`")

    def _spec(self, extra: dict[str, Any]) -> dict[str, Any]:
        """A child's spec; it goes to the child's stdin, never to a file (it holds secrets)."""
        return {"config": self.cfg, "bus": {"publish": self.endpoints.publish, "subscribe": self.endpoints.subscribe,
                                            "signing_key": self.signing_key.hex(),
                                            **(self.bus_keys.connection_keys() if self.endpoints.curve else {})},
                **extra}

    def _api_target(self) -> tuple[str, list[str]]:
        model = quote(self.cfg["model"])
        if self.backend == "local":
            ls = self.cfg["local_server"]
            # bind here and hand the socket over: no port race, and clients may connect at once
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.listener.bind((ls["host"], ls["port"]))
            except OSError as exc:
                raise EngineError(f"local server cannot listen on {ls['host']}:{ls['port']}: {exc.strerror}; "
                                  "set local_server.port to 0 or a free port") from None
            self.listener.listen(64)
            port = self.listener.getsockname()[1]
            fd = self.listener.fileno()
            os.set_inheritable(fd, True)
            argv = [sys.executable, "-m", "engine.cli", "serve", "--host", ls["host"], "--port", str(port),
                    "--listen-fd", str(fd), "--speed", str(ls["speed"])]
            if ls["scenario"]:
                argv += ["--scenario", ls["scenario"]]
            if not ls["asr"]:
                argv += ["--no-asr"]
            self.children.append(Child("server", argv, stdout=subprocess.DEVNULL, pass_fds=(fd,)))
            self.server_url = f"ws://{ls['host']}:{port}/v1/realtime"
            return f"{self.server_url}?model={model}", ["Authorization: Bearer local"]
        key = os.environ.get(self.cfg["api_key_env"])
        if not key:
            raise EngineError(f"backend openai needs an API key in ${self.cfg['api_key_env']} "
                              "(or use --backend local for the offline server)")
        return f"{self.cfg['openai_url']}?model={model}", [f"Authorization: Bearer {key}"]

    def start(self) -> None:
        self._check_not_running()
        py = sys.executable
        self.children.append(Child("broker", [py, "-m", "bus.broker", self.endpoints.publish, self.endpoints.subscribe]))
        url, headers = self._api_target()
        audio = self.cfg["audio"]
        mic = None if self.text_only else audio["mic"]
        speaker = "null" if self.text_only or audio["speaker"] in (None, "null") else audio["speaker"]
        speaker_ring = Ring.create(f"realtalk-{os.getpid()}-speaker", SPEAKER_RING_FRAMES, with_eventfd=False)
        self.rings.append(speaker_ring)
        realtime_extra: dict[str, Any] = {"url": url, "headers": headers, "session": session_payload(self.cfg),
                                          "speaker_ring": speaker_ring.name}
        fds: tuple[int, ...] = ()
        pb_extra: dict[str, Any] = {"speaker_ring": speaker_ring.name, "speaker_target": speaker}
        if mic is not None:
            mic_ring = Ring.create(f"realtalk-{os.getpid()}-mic", MIC_RING_FRAMES)
            self.rings.append(mic_ring)
            assert mic_ring.data_fd is not None
            os.set_inheritable(mic_ring.data_fd, True)
            fds = (mic_ring.data_fd,)
            realtime_extra.update(mic_ring=mic_ring.name, mic_fd=mic_ring.data_fd)
            # what playback hands to the device, for the echo canceller and the recording
            ref_ring = Ring.create(f"realtalk-{os.getpid()}-ref", REF_RING_FRAMES, with_eventfd=False)
            self.rings.append(ref_ring)
            pb_extra["ref_ring"] = ref_ring.name
            is_device = not (isinstance(speaker, str) and (speaker == "null" or speaker.lower().endswith(".wav")))
            cap_spec = self._spec({"mic_ring": mic_ring.name, "mic_fd": mic_ring.data_fd,
                                              "mic_source": mic, "speaker_ring": speaker_ring.name,
                                              "ref_ring": ref_ring.name, "speaker_is_device": is_device,
                                              "record_path": str(self.session_dir / "conversation.wav")
                                              if self.cfg["record"] else None})
            self.children.append(Child("capture", [py, "-m", "engine.capture"], pass_fds=fds, spec=cap_spec))
        self.children.append(Child("realtime", [py, "-m", "engine.realtime.process"], pass_fds=fds,
                                   spec=self._spec(realtime_extra)))
        self.children.append(Child("playback", [py, "-m", "engine.playback"], spec=self._spec(pb_extra)))
        # the supervisor's own bus sockets, connected before anything is published
        self.sub = Subscriber(self.endpoints, [""])  # verifies the signed control topics
        self.pub = Publisher(self.endpoints, f"supervisor:{os.getpid()}")  # signs them
        log_fd = os.open(self.session_dir / "events.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.log_file = open(log_fd, "a", buffering=1)
        broker = self.children[0]
        self._spawn(broker)
        if not self.pub.join(self.endpoints.subscribe, timeout_s=10):
            raise EngineError(f"the bus broker did not come up at {self.endpoints.publish}")
        for child in self.children[1:]:
            self._spawn(child)
        self._write_connection_file()

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop(self.cfg["api_key_env"], None)  # the realtime child gets the key in its spec, the others never
        if child.name == "broker":  # its CURVE server keys and the signing key (it has no spec)
            env.update(self.bus_keys.environment(broker=True))
        child.proc = subprocess.Popen(child.argv, pass_fds=child.pass_fds, env=env,
                                      stdin=subprocess.PIPE if child.spec is not None else subprocess.DEVNULL,
                                      stdout=child.stdout, start_new_session=False)
        if child.spec is not None and child.proc.stdin is not None:
            try:  # one line; the pipe stays open: its end of file tells the child the supervisor is gone
                child.proc.stdin.write(json.dumps(child.spec).encode() + b"\n")
                child.proc.stdin.flush()
            except BrokenPipeError:
                pass  # the child died at once: reaped as an exit
        child.state = "running"
        child.started_at = time.monotonic()
        child.exit_code = None
        child.restart_at = None

    def _write_connection_file(self) -> None:
        path = connection_file()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.status(), **(self.bus_keys.connection_keys() if self.endpoints.curve else {})},
                                  indent=1))
        os.chmod(tmp, 0o600)
        tmp.replace(path)

    # ------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        rings = {}
        for ring in self.rings:
            kind = ring.name.rsplit("-", 1)[-1]
            rings[kind] = ring.stats()
        return {
            "pid": os.getpid(), "state": "stopping" if self.stopping else ("ready" if self.connected else "starting"),
            "backend": self.backend, "model": self.cfg["model"], "server_url": self.server_url,
            "publish": self.endpoints.publish, "subscribe": self.endpoints.subscribe,
            "connection_file": str(connection_file()), "session_dir": str(self.session_dir),
            "session_id": self.session_id, "cost_usd": round(self.cost_usd, 6),
            "children": [{"name": c.name, "pid": c.pid, "state": c.state, "restarts": c.restarts,
                          "exit_code": c.exit_code} for c in self.children],
            "rings": rings,
            "ready_ms": round((self.ready_mono - self.started_mono) * 1000, 1) if self.ready_mono else None,
            "errors": len(self.errors),
        }

    # ------------------------------------------------------------ main loop
    def _on_message(self, topic: str, body: dict[str, Any]) -> None:
        """Log every bus event of the session; track what the status reports."""
        if self.log_file is not None and not topic.startswith("_join."):
            self.log_file.write(json.dumps({"topic": topic, "wall": body.get("ts"), "mono_ns": body.get("mono_ns"),
                                            "body": body}, default=str) + "\n")
        if topic.startswith("_join."):
            return
        if topic == "engine.status" and body.get("state") == "connected":
            self.session_id = body.get("session_id")
            if not self.connected and not self.stopping:  # (while stopping, the rings are gone: only log)
                self.connected = True
                # when the realtime process said so (the loop takes messages up to LOOP_PERIOD_S later)
                sent_ns = body.get("mono_ns")
                self.ready_mono = sent_ns / 1e9 if isinstance(sent_ns, int) else time.monotonic()
                self.out.write(f"realtalk: ready in {(self.ready_mono - self.started_mono) * 1000:.0f} ms "
                               f"(session {self.session_id})\n")
                self.out.flush()
                self._write_connection_file()
        elif topic == "cost.session":
            self.cost_usd = float(body.get("usd", 0.0))
        elif topic == "engine.error":
            self.errors.append(body)
            if body.get("fatal"):
                if self._from_engine(body):
                    self.fatal = f"{body.get('source', 'engine')}: {body.get('message')}"
                else:
                    self.forged += 1  # a fatal error from outside the engine does not stop it

    def _from_engine(self, body: dict[str, Any]) -> bool:
        """True if ``body`` was published by one of this engine's own child processes (state and
        fatal errors are accepted only from them): the publisher name against the children's
        live pids. (To be replaced by the bus's signature check, ``bus.signing_key``.)"""
        pub = body.get("pub")
        if not isinstance(pub, str) or ":" not in pub:
            return False
        name, _, pid = pub.rpartition(":")
        own = {str(c.pid) for c in self.children if c.proc is not None and c.proc.poll() is None}
        return pid in own and name.split("-")[0] in {c.name for c in self.children}

    def run(self) -> int:
        def _stop(_signo: int, _frame: object) -> None:
            self.stopping = True
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        next_status = 0.0
        try:
            while not self.stopping and self.fatal is None:
                # wake four times a second and take what came meanwhile: a wake-up per bus message
                # would cost more CPU than the rest of the supervisor's work
                while (msg := self.sub.recv(timeout_ms=0)) is not None:
                    self._on_message(*msg)
                self._reap()
                now = time.monotonic()
                if now >= next_status:
                    next_status = now + 1.0
                    self.pub.publish("engine.status", self.status())
                if not self.stopping:
                    time.sleep(LOOP_PERIOD_S)
        finally:
            self.shutdown()
        if self.fatal:
            self.out.write(f"realtalk: stopped: {self.fatal}\n")
            return 1
        return 0

    def _reap(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                continue
            if child.state == "backoff" and child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)
                continue
            code = child.proc.poll()
            if code is None or child.state != "running":
                continue
            child.exit_code = code
            child.history = [t for t in child.history if now - t < 60] + [now]
            if len(child.history) > MAX_RESTARTS:
                child.state = "fatal"
                self.fatal = f"child {child.name} exited {len(child.history)} times in a minute (last code {code})"
                return
            child.state = "backoff"
            child.restart_at = now + min(5.0, 0.25 * 2 ** (len(child.history) - 1))
            self.pub.publish("engine.error", {"source": "supervisor", "code": "child_exited", "child": child.name,
                                              "exit_code": code, "message": f"{child.name} exited with {code}; restarting"})

    def shutdown(self) -> None:
        self.stopping = True
        try:
            self.pub.publish("engine.status", self.status())
        except Exception:
            pass
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + GRACE_S
        for child in reversed(self.children):
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            child.state = "stopped"
            if child.proc.stdin is not None:
                child.proc.stdin.close()
        for ring in self.rings:
            ring.unlink()
            ring.close()
        for ep in (self.endpoints.publish, self.endpoints.subscribe):
            if ep.startswith("ipc://"):
                Path(ep[len("ipc://"):]).unlink(missing_ok=True)
        path = connection_file()
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (FileNotFoundError, ValueError):
            pass
        sub = getattr(self, "sub", None)
        if sub is not None:  # log what already arrived before closing the log
            while (msg := sub.recv(timeout_ms=0)) is not None:
                self._on_message(*msg)
        for closer in (sub, getattr(self, "pub", None), self.log_file):
            if closer is not None:
                closer.close()
        self.out.write(f"realtalk: stopped. Session cost ${self.cost_usd:.4f}; event log {self.session_dir / 'events.jsonl'}\n")
        self.out.flush()

"""``engine start``: the supervisor and its children.

Children (each its own OS process, started with ``python -m``): the bus broker, the
local server (local backend), realtime, capture and playback. The supervisor creates
the shared-memory rings and the mic ring's eventfd (passed to the children with
``pass_fds``), hands each child its spec as one JSON line on its stdin (never a file:
the realtime spec holds the API key, every spec the bus signing key), writes the
connection file, keeps the session's event log, publishes ``engine.status`` every
second, and on SIGINT/SIGTERM stops everything in reverse order (TERM, a grace period,
then KILL; the local server after the other children, so a GPT-Live session is closed there, and
the broker last), unlinks the rings and removes socket and connection files.

This module is the supervisor's loop: it makes the specs and rings, reads the bus, decides
readiness and the status, and acts on what each child's machine asks. Its parts, one job each:
:mod:`~engine.supervisor.children` (a child's life: the machine), :mod:`~engine.supervisor.table`
(the process table: a child's start, which child sent a message), :mod:`~engine.supervisor.rundir`
(the session folder, the connection file, a dead engine's leftovers),
:mod:`~engine.supervisor.logfile` (the event log), :mod:`~engine.supervisor.outbox` (our own
events, held while the broker is down), :mod:`~engine.supervisor.watch` (mic drops),
:mod:`~engine.supervisor.heartbeat` (liveness) and :mod:`~engine.supervisor.terminal`.

Rules:

* Each child's life is an explicit state machine (:mod:`engine.supervisor.children`: STARTING,
  RUNNING after ``startsecs``, BACKOFF, STOPPING, EXITED, FATAL); this module does the I/O
  the machine asks for (spawn, SIGTERM, SIGKILL) and nothing else decides a restart. A
  FATAL child stops the engine with its reason; exit code 3 (device) is FATAL at once.
* Liveness: every child runs under :mod:`engine.supervisor.heartbeat` and beats on a pipe of its
  own; the main loop reads the pipes each round (they never wake it), and a beat or CPU time the
  child used since the last round is its proof of life; the child's machine finds one without
  for ``supervisor.heartbeat_timeout_s`` UNRESPONSIVE: ``engine.error`` ``child_unresponsive``
  naming it, SIGKILL, and the restart any exit gets.
* Dropped mic audio: the mic ring's overruns (its reader, the realtime process, stalled or
  restarting) are published as ``engine.error`` ``mic_dropped``, once per stall
  (:class:`engine.supervisor.watch.DropWatch`), and counted in ``engine.status`` (``rings.mic.overrun_frames``).
* Signal handlers only set a flag; the main loop does the work.
* ``start()`` either returns with everything up or undoes everything it made (children,
  rings, sockets, connection file) before it raises.
* The children die with the supervisor: PR_SET_PDEATHSIG is set in each between fork and
  exec, and the engine children also watch their stdin pipe (:mod:`engine.child`).
* Another local user gets nothing (bus/runtime.py): the runtime directory is this user's own,
  mode 0700, or the start is refused naming it; the rings have random names and are made new,
  0600; the connection file is written 0600 through a new file renamed over it, and believed
  only when it is this user's own private file.
* The connection file records the supervisor's and the children's identities (pid and
  /proc start time), the interpreter they all run (``exe``) and the rings by kind
  (``ring_names``): a file whose supervisor is not provably this user's running engine is
  stale; the next ``engine start`` (or ``engine stop``) cleans it, and kills only processes
  that are provably this user's engine children (start time, executable and uid), never a pid
  that now belongs to someone else; it unlinks only rings and sockets of this user's.
* The bus loop takes every queued message each round (a malformed one does not end the
  round); at stop, what the children sent on their way out is logged before the log closes.
* The supervisor's own events (``child_exited``, ``engine.status``) go straight into the
  event log, and onto the bus once the broker is up (held while it restarts).
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO, cast
from urllib.parse import quote

from bus import BusError, Endpoints, Publisher, Subscriber, generate_keys
from bus.runtime import proc_exe, runtime_dir, write_private_file
# process identity lives in bus/runtime.py (a client checks a connection file with it too); importable from here
from bus.runtime import proc_start_ticks as proc_start_ticks
from bus.runtime import same_process as same_process
from bus.wire import HEADER_KEYS
from engine.audio.preflight import check_audio
from engine.audio.ring import Ring, new_ring_name
from engine.child import error_text
from engine.config import live_url, resolve_backend, session_payload
from engine.config_types import Config, PhoneConfig, SipConfig
from engine.cost import is_live_model
from engine.errors import EngineError
from engine.providers import Target, api_target
from engine.specs import (
    RINGS,
    ApiAccess,
    BusSpec,
    CaptureSpec,
    ConsoleSpec,
    PhoneSpec,
    PlaybackSpec,
    Process,
    RealtimeSpec,
    SERVER_KEY_ENV,
    SipSpec,
    ring_kinds,
)
from engine.supervisor.children import GaveUp, Kill, Restarting, Spawn, Terminate, Unresponsive
from engine.supervisor.logfile import SessionLog, log_line
from engine.supervisor.outbox import Outbox
from engine.supervisor.rundir import check_not_running, default_sessions_dir, free_port, make_session_dir, remove_own_files
from engine.supervisor.table import Child, child_of, from_engine, launch, status_rows
from engine.supervisor.terminal import SafeOut, Terminal
from engine.supervisor.watch import DropWatch, mic_dropped
from engine.view import TerminalView
from engine.webhooks import SECRET_ENV

#: a variable whose name says it holds a secret: the local server's child never gets one it does not need
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)


#: the signals that stop the engine in order (the children run in sessions of their own: a
#: terminal's Ctrl-C or hang-up reaches the supervisor alone, which stops them one after another)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def server_environment(env: dict[str, str], keep: set[str]) -> dict[str, str]:
    """``env`` for the local server's child: without every variable whose name says it holds a
    secret (the API's key, a Twilio token, anyone's password), but those in ``keep``."""
    return {k: v for k, v in env.items() if k in keep or not SECRET_NAME.search(k)}

GRACE_S = 3.0
LOOP_PERIOD_S = 0.25             # the main loop until the engine is ready: bus messages, reaping, status
#: the main loop once it is ready: a round costs about a millisecond of CPU on this machine (the bus
#: drained, five children polled: their exit, their heartbeat pipe, /proc), most of it paid once a round
RUNNING_LOOP_PERIOD_S = 0.5
DRAIN_BUDGET_S = 0.2             # a round of bus messages takes at most this long; the rest next round at once
STOP_QUIET_S = 0.15              # at stop: the children are gone once the bus has been quiet this long
STOP_DRAIN_MAX_S = 1.0
TERMINAL_REPEAT_S = 10.0         #: the same error is printed on the terminal at most this often


class Supervisor:
    def __init__(self, cfg: Config, *, text_only: bool = False, out: TextIO = sys.stdout,
                 console: dict[str, Any] | None = None, phone: dict[str, Any] | None = None,
                 sip: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.text_only = text_only
        #: ``engine phone`` / ``engine start --phone``: {host, port, path}: phone calls instead of the devices
        self.phone = phone
        self.phone_status: dict[str, Any] | None = None   #: the phone process's latest phone.status
        #: ``engine sip``: {host, port, path}: OpenAI SIP webhooks instead of the devices (docs/sip.md)
        self.sip = sip
        self.sip_status: dict[str, Any] | None = None     #: the sip process's latest sip.status
        #: ``engine start --console``: {host, port} of the debug console, started as a child
        self.console = console
        self.out: TextIO = cast(TextIO, SafeOut(out))   # a closed terminal (SIGHUP) never stops the stop
        self.backend = resolve_backend(cfg)
        self.target: Target | None = None    #: the remote API (None: the local server)
        self._check_audio_paths()   # before anything is made (the session folder included)
        self.stopping = False
        #: the signal handlers start() found, put back by shutdown()
        self._saved_handlers: dict[int, Any] | None = None
        self.children: list[Child] = []
        self.rings: list[Ring] = []
        self.rings_by_kind: dict[str, Ring] = {}   #: kind (mic, speaker, ref, listen, browser) -> the ring
        try:
            self.run_dir = runtime_dir()
        except BusError as exc:   # another user's, or too open: refused, naming it and the fix
            raise EngineError(str(exc)) from None
        self.connection_path = self.run_dir / "engine.json"
        self.session_key = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        base = Path(cfg["record"] or cfg["sessions_dir"] or default_sessions_dir())
        self.session_dir = base / self.session_key
        os.umask(0o077)  # session files (events.jsonl, conversation.wav) and children's files: 0600
        make_session_dir(self.session_dir)
        #: signs the engine's own bus messages (spec key bus.signing_key, hex); never on disk or the bus
        self.signing_key = secrets.token_bytes(32)
        self.bus_keys = generate_keys(self.signing_key)  # and CURVE keys for tcp (bus/security.py)
        self.endpoints = self._endpoints()
        self.session_id: str | None = None
        self.connected = False
        #: device messages still to come before "ready": a device that fails to open fails the start,
        #: instead of the engine saying ready and the first answer failing (issue 15 point 18)
        self.devices_pending: set[str] = set()
        self._connected_at_ns: int | None = None
        self.next_status_at = 0.0   #: the next engine.status; 0 = at once (the state changed)
        self._last_device_ns = 0
        self.errors: list[dict[str, Any]] = []
        self.forged = 0                  #: fatal engine.error messages from outside the engine, ignored
        self.fatal: str | None = None
        self.started_mono = time.monotonic()
        self.ready_mono: float | None = None
        self.log_file: SessionLog | None = None
        self.server_url: str | None = None
        #: the local server's bearer key: it takes only this engine's children and clients (in the
        #: 0600 connection file, never on the bus); every local user can reach a loopback port
        self.server_key = "rtl-" + secrets.token_urlsafe(32)
        self.listener: socket.socket | None = None
        self.sub: Subscriber | None = None
        self.pub: Publisher | None = None
        self.my_ticks = proc_start_ticks(os.getpid())
        #: the interpreter the supervisor and every child run: a process named in engine.json is ours only with it
        self.my_exe = proc_exe("self")
        self.outbox: Outbox | None = None   #: our own events, held while the broker is down (outbox.py)
        self._printed: dict[str, float] = {}
        #: the terminal: error lines as they happen, and a live line on a TTY (engine/view.py)
        self.view = TerminalView()
        self.term = Terminal(self.out)
        self._malformed_seen = 0
        self.malformed = 0               #: malformed bus messages the supervisor skipped
        self.unhandled = 0               #: well-formed bus messages whose handling failed (skipped, printed)
        self.shut_down = False
        #: liveness: a child silent this long is reported and restarted (None: not checked)
        self.heartbeat_timeout_s: float | None = cfg.get("supervisor", {}).get("heartbeat_timeout_s")
        self.mic_drops = DropWatch()

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

    def _check_audio_paths(self) -> None:
        """The mic and speaker files and devices, before anything starts (:mod:`engine.audio.preflight`:
        a corrupt mic WAV, a missing device fail the start at once, with one error)."""
        if self.phone is None and self.sip is None:   # calls use no audio device
            check_audio(self.cfg["audio"], text_only=self.text_only)

    def _bus_spec(self, *, signing: bool = True) -> BusSpec:
        """The bus section of a child's spec: the endpoints, the signing key (``signing``) and the
        CURVE keys over tcp. The spec goes to the child's stdin, never to a file (it holds secrets)."""
        curve = self.bus_keys.connection_keys() if self.endpoints.curve else {}
        return BusSpec(publish=self.endpoints.publish, subscribe=self.endpoints.subscribe,
                       signing_key=self.signing_key.hex() if signing else None,
                       curve_server_key=curve.get("curve_server_key"), curve_public_key=curve.get("curve_public_key"),
                       curve_secret_key=curve.get("curve_secret_key"))

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
            argv = [sys.executable, "-m", "engine.api.cli", "serve", "--host", ls["host"], "--port", str(port),
                    "--listen-fd", str(fd), "--speed", str(ls["speed"])]
            if ls["scenario"]:
                argv += ["--scenario", ls["scenario"]]
            if not ls["asr"]:
                argv += ["--no-asr"]
            self.children.append(Child("server", argv, stdout=subprocess.DEVNULL, pass_fds=(fd,)))
            self.server_url = f"ws://{ls['host']}:{port}/v1/realtime"
            return self._api_url(self.server_url, model), [f"Authorization: Bearer {self.server_key}"]
        # a remote provider (engine/providers.py): openai, azure, xai, or any Realtime-compatible server
        self.target = api_target(self.cfg, os.environ)
        return self.target.url, list(self.target.headers)

    def _rest_bases(self, url: str) -> tuple[str, str]:
        """Where a SIP call's REST calls and control sockets go: the API's base URLs (REST, socket)."""
        if self.target is not None:
            return self.target.rest_base, (self.target.url.split("?", 1)[0]
                                           .removesuffix("/realtime").removesuffix("/live/sessions"))
        base = (self.server_url or url).split("?", 1)[0].removesuffix("/realtime")
        return "http://" + base.removeprefix("ws://"), base

    def _api_access(self, headers: list[str]) -> ApiAccess:
        """How a child signs in, and which provider's dialect the socket speaks (engine/realtime/dialects.py)."""
        t = self.target
        return ApiAccess(headers=tuple(headers), provider=t.provider if t else "local",
                         deployment=t.deployment if t else None, key_env=t.key_env if t else None)

    def _api_url(self, realtime_url: str, quoted_model: str) -> str:
        """The socket's URL: Realtime names the model in the query; GPT-Live has its own path
        (``/v1/live/sessions``, no query: the model goes in ``session.start``)."""
        if is_live_model(self.cfg["model"]):
            return live_url(realtime_url)
        return f"{realtime_url}?model={quoted_model}"

    def start(self) -> None:
        """Make the rings, start the broker, then the children. On any failure everything made so
        far is undone (children stopped, rings unlinked, sockets and files removed) and it raises.
        (The mic and speaker were checked when the supervisor was made.)"""
        check_not_running(self.connection_path, self.out)

        def _stopped(signo: int, _frame: object) -> None:
            raise EngineError(f"stopped by {signal.Signals(signo).name} while starting; what was made is undone")
        # while starting a signal undoes the start; from then on it asks for an ordered stop (run()
        # looks at ``stopping``); shutdown() puts back the handlers it found
        self._saved_handlers = self._saved_handlers or {signo: signal.getsignal(signo) for signo in STOP_SIGNALS}
        for signo in STOP_SIGNALS:
            signal.signal(signo, _stopped)
        try:
            self._start()
        except BaseException:
            self._stop_on_signals()   # a second Ctrl-C must not break off the undoing
            self.shutdown(quiet=True)
            raise
        self._stop_on_signals()

    def _stop_on_signals(self) -> None:
        """STOP_SIGNALS ask for an ordered stop (``stopping``); they never raise."""
        def _stop(_signo: int, _frame: object) -> None:
            self.stopping = True
        for signo in STOP_SIGNALS:
            signal.signal(signo, _stop)

    def _start(self) -> None:
        py = sys.executable
        # the broker's intake acks each command at once; for the realtime process it also holds them
        # across that process's restarts (bus/intake.py); the phone bridge takes them itself
        intake = "ack" if self.phone is not None or self.sip is not None else "hold"   # calls take their own
        self.children.append(Child("broker", [py, "-m", "bus.broker", self.endpoints.publish, self.endpoints.subscribe,
                                              "--intake", intake], death_signal=signal.SIGKILL))
        url, headers = self._api_target()
        api = self._api_access(headers)
        if self.sip is not None:  # SIP calls (engine/sip): the audio is OpenAI's; no rings or devices
            rest_base, ws_base = self._rest_bases(url)
            self.children.append(Child("sip", [py, "-m", "engine.sip.process"], spec=SipSpec(
                config=self.cfg, bus=self._bus_spec(), api=api, rest_base=rest_base, ws_base=ws_base,
                sip=cast(SipConfig, {**self.cfg["sip"], **self.sip}))))
            self._start_children()
            return
        if self.phone is not None:  # phone calls (engine/phone): no rings, no capture, realtime or playback
            self.children.append(Child("phone", [py, "-m", "engine.phone.process"], spec=PhoneSpec(
                config=self.cfg, bus=self._bus_spec(), url=url, api=api, session=session_payload(self.cfg),
                phone=cast(PhoneConfig, {**self.cfg["phone"], **self.phone}))))
            self._start_children()
            return
        audio = self.cfg["audio"]
        mic = None if self.text_only else audio["mic"]
        speaker = "null" if self.text_only or audio["speaker"] in (None, "null") else audio["speaker"]
        speaker_is_device = not (isinstance(speaker, str) and (speaker == "null" or speaker.lower().endswith(".wav")))
        # the rings (engine/specs.py RINGS): each whose producer and consumer run; the console's
        # listen and talk rings (engine/audio/listen_talk.py) whether it runs now or attaches later
        processes: list[Process] = ["realtime", "playback", "console"]
        if mic is not None:
            processes.append("capture")
        for kind in ring_kinds(processes):
            self._ring(kind)
        names = self.ring_names
        mic_fd = self.rings_by_kind["mic"].data_fd if mic is not None else None
        fds = (mic_fd,) if mic_fd is not None else ()
        for fd in fds:
            os.set_inheritable(fd, True)
        if mic is not None:
            self.children.append(Child("capture", [py, "-m", "engine.capture.process"], pass_fds=fds, spec=CaptureSpec(
                config=self.cfg, bus=self._bus_spec(), mic_ring=names["mic"], mic_fd=mic_fd, mic_source=mic,
                speaker_ring=names["speaker"], ref_ring=names["ref"], speaker_is_device=speaker_is_device,
                browser_ring=names["browser"],
                record_path=str(self.session_dir / "conversation.wav") if self.cfg["record"] else None)))
            self.devices_pending.add("capture.device")
        self.children.append(Child("realtime", [py, "-m", "engine.realtime.process"], pass_fds=fds, spec=RealtimeSpec(
            config=self.cfg, bus=self._bus_spec(), url=url, api=api, session=session_payload(self.cfg),
            speaker_ring=names["speaker"], mic_ring=names.get("mic"), mic_fd=mic_fd,
            replies_dir=str(self.session_dir / "replies") if self.cfg["reply_audio"] else None)))
        self.children.append(Child("playback", [py, "-m", "engine.playback.process"], spec=PlaybackSpec(
            config=self.cfg, bus=self._bus_spec(), speaker_ring=names["speaker"], speaker_target=speaker,
            listen_ring=names["listen"], ref_ring=names.get("ref"))))
        if speaker_is_device:
            self.devices_pending.add("playback.device")  # a real speaker: ready once it is open
        if self.console is not None:
            c = self.console   # it publishes cmd.* only: no signing key a page could ever reach
            self.children.append(Child("console", [py, "-m", "engine.console.process"], spec=ConsoleSpec(
                config=self.cfg, bus=self._bus_spec(signing=False), host=c.get("host") or "127.0.0.1",
                port=int(c.get("port") or 0), allowed_hosts=tuple(c.get("allowed_hosts") or ()),
                session_dir=str(self.session_dir), rings=names)))
        self._start_children()

    @property
    def ring_names(self) -> dict[str, str]:
        """The rings' names by kind (engine.json, engine.status, the console's spec)."""
        return {kind: ring.name for kind, ring in self.rings_by_kind.items()}

    def _ring(self, kind: str) -> Ring:
        """A new ring of ``kind`` (its size and eventfd from engine/specs.py RINGS) under a random
        name (made exclusively, 0600: engine/audio/ring.py), kept for the stop and listed by kind
        in ``ring_names``."""
        layout = RINGS[kind]
        ring = Ring.create(new_ring_name(), layout.frames, with_eventfd=layout.eventfd)
        self.rings.append(ring)
        self.rings_by_kind[kind] = ring
        return ring

    def _start_children(self) -> None:
        for child in self.children:   # liveness for every child (children.py)
            child.policy = replace(child.policy, heartbeat_timeout_s=self.heartbeat_timeout_s)
            child.machine.policy = child.policy
        # the supervisor's own bus sockets, connected before anything is published
        self.sub = Subscriber(self.endpoints, [""])  # verifies the signed control topics
        self.pub = Publisher(self.endpoints, f"supervisor:{os.getpid()}")  # signs them
        self.outbox = Outbox(self.pub, self._log)
        self.log_file = SessionLog(self.session_dir / "events.jsonl")  # new (O_EXCL), flushed every bus round
        broker = self.children[0]
        self._spawn(broker)
        if not self.pub.join(self.endpoints.subscribe, timeout_s=10):
            raise EngineError(f"the bus broker did not come up at {self.endpoints.publish}")
        self.outbox.up = True
        for child in self.children[1:]:
            self._spawn(child)
        self._write_connection_file()

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop(self.cfg["api_key_env"], None)  # the realtime child gets the key in its spec, the others never
        if self.target is not None:
            env.pop(self.target.key_env, None)
        if child.name == "server":  # a stand-in for the API: no secret of the user's but the webhook secret
            env = server_environment(env, keep={SECRET_ENV} if self.sip is not None else set())
            env[SERVER_KEY_ENV] = self.server_key
        if child.name == "broker":  # its CURVE server keys and the signing key (it has no spec)
            env.update(self.bus_keys.environment(broker=True))
        launch(child, env, self.heartbeat_timeout_s)
        if child.name == "broker" and self.outbox is not None:
            self.outbox.broker_down()  # until our probe comes back through it

    def _write_connection_file(self) -> None:
        """engine.json: written 0600 to a new file beside it, renamed over it (bus/runtime.py)."""
        write_private_file(self.connection_path,
                           json.dumps({**self.status(), **(self.bus_keys.connection_keys() if self.endpoints.curve else {}),
                                       **({"server_key": self.server_key} if self.server_url else {})}, indent=1))

    # ------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        rings = {kind: ring.stats() for kind, ring in self.rings_by_kind.items()}
        now = time.monotonic()
        return {
            "pid": os.getpid(), "pid_start_ticks": self.my_ticks, "exe": self.my_exe,
            "state": "stopping" if self.stopping else ("ready" if self.connected else "starting"),
            "backend": self.backend, "model": self.cfg["model"], "server_url": self.server_url,
            "publish": self.endpoints.publish, "subscribe": self.endpoints.subscribe,
            "connection_file": str(self.connection_path), "session_dir": str(self.session_dir),
            "session_id": self.session_id, "cost_usd": round(self.view.cost_usd, 6),
            "children": status_rows(self.children, now),
            "rings": rings, "ring_names": self.ring_names,
            "ready_ms": round((self.ready_mono - self.started_mono) * 1000, 1) if self.ready_mono else None,
            "errors": len(self.errors), "forged_errors": self.forged, "malformed_messages": self.malformed,
            "phone": self.phone_status if self.phone is not None else None,
            "sip": self.sip_status if self.sip is not None else None,
        }

    # ------------------------------------------------------------ the event log and own events
    def _log(self, topic: str, body: dict[str, Any]) -> None:
        """One event-log line. A body JSON cannot hold as it is (a msgpack map with bytes or tuple
        keys, from any bus client) is logged with its keys and odd values as text: never raises."""
        if self.log_file is not None:
            self.log_file.write(log_line(topic, body))   # never raises: a failed write shows at the flush (drain)

    def _emit(self, topic: str, payload: dict[str, Any], *, hold: bool = True) -> None:
        """Publish one of the supervisor's own events (:class:`Outbox`'s rules); a non-fatal error
        of ours goes on the terminal too."""
        assert self.outbox is not None
        if topic == "engine.error" and not payload.get("fatal"):
            for line in self.view.feed(topic, payload):   # our own errors (a child exited) on the terminal too
                self._print(line)
        self.outbox.emit(topic, payload, hold=hold)

    @property
    def bus_up(self) -> bool:
        """The broker forwards our messages (our probe came back through it)."""
        return self.outbox is not None and self.outbox.up

    def _print(self, line: str) -> None:
        """A line on the engine's terminal; the same line at most every TERMINAL_REPEAT_S."""
        now = time.monotonic()
        if now - self._printed.get(line, -1e9) < TERMINAL_REPEAT_S:
            return
        self._printed[line] = now
        self.term.line(line)

    # ------------------------------------------------------------ main loop
    def _on_message(self, topic: str, body: dict[str, Any]) -> None:
        """Log every bus event of the session; track what the status reports."""
        if topic.startswith("_join."):
            if self.outbox is not None:
                self.outbox.joined(topic)
            return
        if self.pub is not None and body.get("pub") == self.pub.name:
            return  # our own: logged when it was emitted
        self._log(topic, body)
        if topic != "engine.error":
            self.view.feed(topic, body)   # the live line's state
        if topic == "engine.status" and body.get("state") == "connected":
            if self.stopping or not self._from_engine(body):  # (while stopping, the rings are gone: only log)
                return
            self.session_id = body.get("session_id")
            if self._connected_at_ns is None:
                self._connected_at_ns = body.get("mono_ns") if isinstance(body.get("mono_ns"), int) else time.monotonic_ns()
            self._maybe_ready()
        elif topic in ("capture.device", "playback.device") and topic in self.devices_pending:
            if self._from_engine(body):
                self.devices_pending.discard(topic)
                sent_ns = body.get("mono_ns")
                self._last_device_ns = max(self._last_device_ns, sent_ns if isinstance(sent_ns, int) else time.monotonic_ns())
                self._maybe_ready()
        elif (topic == "sip.status" and self.sip is not None) or (topic == "phone.status" and self.phone is not None):
            if self.stopping or not self._from_engine(body):
                return
            status = {k: v for k, v in body.items() if k not in HEADER_KEYS}
            if topic == "sip.status":
                self.sip_status, what = status, "SIP webhooks"
            else:
                self.phone_status, what = status, "phone calls"
            self.next_status_at = 0.0  # the broker's last-value copy of engine.status is current at once
            if not self.connected:   # the calls' process listens: ready
                self.connected = True
                self.ready_mono = time.monotonic()
                self.out.write(f"realtalk: ready in {(self.ready_mono - self.started_mono) * 1000:.0f} ms; "
                               f"{what} at {body.get('url')}\n")
                self.out.flush()
                self._write_connection_file()
        elif topic == "engine.error":
            self.errors.append(body)
            trusted = self._from_engine(body)
            if not trusted:
                if body.get("fatal"):
                    self.forged += 1  # a fatal error from outside the engine does not stop it
                return
            child = self._child_of(body)
            if child is not None and isinstance(body.get("message"), str):
                child.last_error = body["message"]
            source, message = body.get("source", "engine"), body.get("message")
            if body.get("fatal"):
                self.fatal = f"{source}: {message}"   # printed as the cause of the stop
            elif self.fatal is None:   # once stopping for a cause, what the children say as they stop is only logged
                for line in self.view.feed(topic, body):   # each error, with its message
                    self._print(line)

    def _maybe_ready(self) -> None:
        """Ready: the API session is up and every device is open."""
        if self.connected or self._connected_at_ns is None or self.devices_pending or self.stopping:
            return
        self.connected = True
        self.next_status_at = 0.0
        # when the last of them said so (the loop takes messages up to LOOP_PERIOD_S later)
        self.ready_mono = max(self._connected_at_ns, self._last_device_ns) / 1e9
        self.out.write(f"realtalk: ready in {(self.ready_mono - self.started_mono) * 1000:.0f} ms "
                       f"(session {self.session_id})\n")
        self.out.flush()
        self._write_connection_file()

    def _child_of(self, body: dict[str, Any]) -> Child | None:
        return child_of(self.children, body)

    def _from_engine(self, body: dict[str, Any]) -> bool:
        """True if ``body`` came from one of this engine's own children (:func:`table.from_engine`)."""
        return from_engine(self.children, body)

    def drain(self, budget_s: float = DRAIN_BUDGET_S) -> bool:
        """Take every queued bus message (a malformed one does not end the round) for at most
        ``budget_s``; flush the log. True if the queue is empty."""
        sub = self.sub
        if sub is None:
            self._flush_log()
            return True
        deadline = time.monotonic() + budget_s
        empty = False
        n = 0
        while True:
            msg = sub.recv(timeout_ms=0)
            if msg is not None:
                try:
                    self._on_message(*msg)
                except Exception as exc:  # noqa: BLE001 - no bus message from any client stops the engine
                    self.unhandled += 1
                    self._print(f"realtalk: a {msg[0]} message could not be taken ({type(exc).__name__}: {exc}); "
                                "skipped, the session goes on")
            elif sub.malformed == self._malformed_seen:
                empty = True
                break
            self.malformed += sub.malformed - self._malformed_seen
            self._malformed_seen = sub.malformed
            n += 1
            if n % 256 == 0 and time.monotonic() >= deadline:
                break
        self._flush_log()
        return empty

    def _flush_log(self) -> None:
        """Write the queued event-log lines; a failed write (a full disk) stops the session."""
        if self.log_file is not None:
            failed = self.log_file.flush()
            if failed is not None:
                self._log_failed(failed)

    def _log_failed(self, exc: OSError) -> None:
        """The event log cannot be written (a full disk): the session stops with the cause; what
        was written is kept (:class:`SessionLog` cut it back to whole lines)."""
        if self.fatal is None:
            full = " (the disk is full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            self.fatal = (f"cannot write the event log {self.session_dir / 'events.jsonl'}: {error_text(exc)}{full}; "
                          "the session is stopped, what was written is kept")

    def run(self) -> int:
        self._stop_on_signals()
        # a child that exits wakes the loop at once (it slept up to 250 ms before reaping it)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.next_status_at = 0.0
        try:
            while not self.stopping and self.fatal is None:
                # wake four times a second (twice once ready) and take what came meanwhile: a wake-up
                # per bus message would cost more CPU than the rest of the supervisor's work
                empty = self.drain()
                if self.bus_up and self.pub is not None and self.sub is not None:
                    self.sub.publish_reports(self.pub, "supervisor")  # bus.dropped, malformed: once a second
                self._manage(time.monotonic())
                now = time.monotonic()
                if self.outbox is not None:
                    self.outbox.round(now)   # probe a broker that is down, or send what was held
                if now >= self.next_status_at:
                    self.next_status_at = now + 1.0
                    self._emit("engine.status", self.status(), hold=False)
                if self.connected and not self.stopping and self.phone is None and self.sip is None:   # (calls' own)
                    self.term.draw(self.view.live_line(), now)   # a TTY only
                if not self.stopping and empty:
                    self._sleep(wake_r, now)
        finally:
            if self.fatal and self.pub is not None and self.bus_up:
                # clients fail their waiters with the cause at once (an answer in flight would only
                # see the socket close as the children stop)
                self.pub.publish("engine.error", {"source": "supervisor", "code": "engine_stopped", "fatal": True,
                                                  "message": self.fatal})
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(wake_r)
            os.close(wake_w)
            self.shutdown()
        if self.fatal:
            self.out.write(f"realtalk: stopped: {self.fatal}\n")
            return 1
        return 0

    def _sleep(self, wake_fd: int, now: float) -> None:
        """Until the next round: LOOP_PERIOD_S (RUNNING_LOOP_PERIOD_S once ready, at most a
        quarter of the heartbeat timeout), less when a child's restart falls due sooner; a signal
        (a child's exit, SIGTERM) ends it at once."""
        due = [c.machine.restart_at for c in self.children if c.machine.restart_at is not None]
        period = LOOP_PERIOD_S
        if self.connected:
            period = min(RUNNING_LOOP_PERIOD_S, max(LOOP_PERIOD_S, (self.heartbeat_timeout_s or 60.0) / 4))
        timeout = max(0.0, min([period, *(d - now for d in due)]))
        try:
            ready, _, _ = select.select([wake_fd], [], [], timeout)
        except InterruptedError:
            ready = []
        if ready:
            try:
                while os.read(wake_fd, 512):
                    pass
            except BlockingIOError:
                pass

    def _manage(self, now: float) -> None:
        """Reap exits and advance every child's state machine; do the I/O it asks for."""
        for child in self.children:
            m = child.machine
            if child.proc is not None and m.alive_states:
                code = child.proc.poll()
                if code is not None:
                    self.drain(0.05)  # what it said before it exited (its last error) goes with the exit
                    self._act(child, m.exited(code, now, child.last_error))
                elif child.heartbeat is not None and child.heartbeat.alive(child.proc.pid):
                    m.beat(now)   # a heartbeat, or CPU it used (busy holding the interpreter lock)
            self._act(child, m.tick(now))
        self._watch_mic(now)

    def _watch_mic(self, now: float) -> None:
        """Publish the mic audio dropped since the last report (the mic ring's overruns: its reader
        stalled or restarting), once per stall (:class:`DropWatch`), from the engine's ready on
        (before it, the realtime process has not begun to read the ring)."""
        mic = self.rings_by_kind.get("mic")
        if mic is None or self.pub is None:
            return
        total = mic.overrun_frames
        if not self.connected:   # before ready nobody reads the mic yet: only drops after it count
            self.mic_drops = DropWatch(reported=total, seen=total)
            return
        frames = self.mic_drops.update(total, now)
        if frames is None:
            return
        self._emit("engine.error", mic_dropped(frames, total))

    def _act(self, child: Child, action: Any) -> None:
        if action is None:
            return
        if isinstance(action, Spawn):
            self._spawn(child)
        elif isinstance(action, Restarting):
            m = child.machine
            why = f"{child.name} exited with {m.exit_code}" + (f" ({child.last_error})" if child.last_error else "")
            if child.name == "broker" and self.outbox is not None:
                self.outbox.broker_down()
            self._emit("engine.error", {"source": "supervisor", "code": "child_exited", "child": child.name,
                                        "exit_code": m.exit_code, "during_start": action.during_start,
                                        "message": f"{why}; restarting"})
        elif isinstance(action, Unresponsive):
            child.unresponsive += 1
            if child.proc is not None:
                child.proc.kill()   # stopped or hung: SIGTERM would wait for it to run again
            if child.name == "broker" and self.outbox is not None:
                self.outbox.broker_down()   # the report waits for the new broker
            what = "since its start" if action.during_start else f"for {action.silent_s:.1f} s"
            message = (f"{child.name} did not answer {what} (no heartbeat; supervisor.heartbeat_timeout_s "
                       f"{self.heartbeat_timeout_s:g}): killed, to be restarted")
            child.last_error = message
            self._emit("engine.error", {"source": "supervisor", "code": "child_unresponsive", "child": child.name,
                                        "pid": child.pid, "silent_ms": round(action.silent_s * 1000),
                                        "during_start": action.during_start, "message": message})
        elif isinstance(action, GaveUp):
            if self.fatal is None:
                self.fatal = action.reason
        elif isinstance(action, Terminate) and child.proc is not None:
            child.proc.terminate()
        elif isinstance(action, Kill) and child.proc is not None:
            child.proc.kill()

    def _stop_children(self, children: list[Child], grace_s: float = GRACE_S) -> None:
        """SIGTERM each, wait for them all, SIGKILL what is left after ``grace_s``."""
        now = time.monotonic()
        for child in children:
            self._act(child, child.machine.stop(now))
        deadline = now + grace_s
        for child in children:
            if child.proc is None or not child.machine.alive_states:
                continue
            try:
                code = child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                code = child.proc.wait()
            child.machine.exited(code, time.monotonic())
        for child in children:
            if child.proc is not None and child.proc.stdin is not None:
                child.proc.stdin.close()

    def shutdown(self, quiet: bool = False) -> None:
        """Stop the children (the local server after the others, the broker last, once what they
        sent on their way out is logged), unlink the rings, remove sockets and the connection file,
        close the log. Idempotent."""
        if self.shut_down:
            return
        self.shut_down = True
        self.stopping = True
        self.term.clear()
        try:
            if self.pub is not None and self.bus_up:
                self._emit("engine.status", self.status(), hold=False)
        except Exception as exc:  # a broken bus must not keep the children alive
            self.out.write(f"realtalk: could not publish the final status: {error_text(exc)}\n")
        # the local server after the rest: the realtime process closes its session there on its
        # way out (GPT-Live's session.close, for the last usage)
        self._stop_children([c for c in reversed(self.children) if c.name not in ("broker", "server")])
        self._stop_children([c for c in self.children if c.name == "server"])
        self._drain_quiet()
        self._stop_children([c for c in self.children if c.name == "broker"])
        for child in self.children:
            if child.heartbeat is not None:
                child.heartbeat.close()
                child.heartbeat = None
        for ring in self.rings:
            ring.unlink()
            ring.close()
        if self.listener is not None:
            self.listener.close()
        remove_own_files(self.connection_path, (self.endpoints.publish, self.endpoints.subscribe))
        self.drain(budget_s=STOP_DRAIN_MAX_S)
        for closer in (self.sub, self.pub, self.log_file):
            if closer is not None:
                closer.close()
        for signo, handler in (self._saved_handlers or {}).items():   # an in-process caller's, as they were
            signal.signal(signo, handler)
        self._saved_handlers = None
        if not quiet:
            lost = self.log_file.lost_lines if self.log_file is not None else 0
            self.out.write(f"realtalk: stopped. Session cost ${self.view.cost_usd:.4f}; "
                           f"event log {self.session_dir / 'events.jsonl'}"
                           + (f" (the last {lost} events could not be written)" if lost else "") + "\n")
            self.out.flush()

    def _drain_quiet(self) -> None:
        """Log what the stopped children sent on their way out: until the bus is quiet."""
        if self.sub is None:
            return
        deadline = time.monotonic() + STOP_DRAIN_MAX_S
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if self.drain(budget_s=0.05) and self.sub.socket.poll(int(STOP_QUIET_S * 1000)) == 0:
                if time.monotonic() - quiet_since >= STOP_QUIET_S:
                    break
            else:
                quiet_since = time.monotonic()

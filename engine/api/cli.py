"""The ``engine`` command: start, stop, status, devices, serve, say, tail, log, demo, console, phone, sip."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from bus.wire import HEADER_KEYS, BusError
from engine.config_types import Config
from engine.errors import EngineError
from engine.specs import SERVER_KEY_ENV


def _load_cfg(args: argparse.Namespace) -> Config:
    from engine.config import load_config
    from engine.cost import is_live_model
    overrides: dict[str, Any] = {}
    if getattr(args, "backend", None):
        overrides["backend"] = args.backend
    if getattr(args, "model", None):
        overrides["model"] = args.model
    if getattr(args, "mic", None) is not None:
        overrides["audio.mic"] = None if args.mic == "null" else args.mic
    if getattr(args, "speaker", None) is not None:
        overrides["audio.speaker"] = args.speaker
    if getattr(args, "scenario", None):
        overrides["local_server.scenario"] = os.path.abspath(args.scenario)
    if getattr(args, "speed", None):
        overrides["local_server.speed"] = args.speed
    if getattr(args, "instructions", None) is not None:
        overrides["session.instructions"] = args.instructions
    if getattr(args, "voice", None) is not None:
        overrides["session.voice"] = args.voice
    cfg = load_config(args.config, overrides)
    if getattr(args, "text_only", False) and not is_live_model(cfg["model"]):
        # Realtime answers in text; GPT-Live always speaks (its track is not played without devices)
        cfg = load_config(args.config, {**overrides, "session.output_modalities": ["text"]})
    return cfg


def cmd_start(args: argparse.Namespace) -> int:
    from engine.config import resolve_backend
    from engine.supervisor.process import Supervisor
    cfg = _load_cfg(args)
    backend = resolve_backend(cfg)
    why = {"local": "offline local server" + ("" if cfg["backend"] == "local" else f" (no ${cfg['api_key_env']} set)"),
           "openai": "OpenAI Realtime API" + ("" if cfg["backend"] == "openai" else f" (${cfg['api_key_env']} is set)")}[backend]
    console = ({"host": args.console_host, "port": args.console_port, "allowed_hosts": args.console_allow_host or []}
               if args.console else None)
    sup = Supervisor(cfg, text_only=args.text_only, console=console)
    print(f"realtalk: starting with backend {backend}: {why}, model {cfg['model']}")
    sup.start()
    st = sup.status()
    out = sup.out   # a terminal closed now must not skip run()'s ordered stop
    out.write(f"realtalk: bus publish {st['publish']}  subscribe {st['subscribe']}\n")
    out.write(f"realtalk: connection file {st['connection_file']}; session folder {st['session_dir']}\n")
    out.write("realtalk: Ctrl-C or `engine stop` to end\n")
    out.flush()
    return sup.run()


def cmd_phone(args: argparse.Namespace) -> int:
    """Phone calls over Twilio Media Streams (docs/phone.md): an engine whose only child is the bridge."""
    from engine.config import resolve_backend
    from engine.supervisor.process import Supervisor
    cfg = _load_cfg(args)
    ph = cfg["phone"]
    phone = {"host": args.host or ph["host"], "port": ph["port"] if args.port is None else args.port,
             "path": args.path or ph["path"]}
    sup = Supervisor(cfg, phone=phone)
    print(f"realtalk: phone bridge with backend {resolve_backend(cfg)}, model {cfg['model']}")
    sup.start()
    sup.out.write(f"realtalk: connection file {sup.status()['connection_file']}; Ctrl-C or `engine stop` to end\n")
    sup.out.flush()
    return sup.run()


def cmd_sip(args: argparse.Namespace) -> int:
    """OpenAI SIP calls (docs/sip.md): an engine whose only child answers the calls' webhooks."""
    from engine.config import resolve_backend
    from engine.supervisor.process import Supervisor
    cfg = _load_cfg(args)
    sc = cfg["sip"]
    sip = {"host": args.host or sc["host"], "port": sc["port"] if args.port is None else args.port,
           "path": args.path or sc["path"]}
    sup = Supervisor(cfg, sip=sip)
    print(f"realtalk: SIP calls with backend {resolve_backend(cfg)}")
    sup.start()
    sup.out.write(f"realtalk: connection file {sup.status()['connection_file']}; Ctrl-C or `engine stop` to end\n")
    sup.out.flush()
    return sup.run()


def _connection(running: bool = True) -> dict[str, Any]:
    """The connection file of this user's engine (bus/runtime.py): believed only when it is this
    user's own private file in this user's own private runtime directory, and (``running``) when
    its supervisor is provably this user's engine that runs now. EngineError naming what is wrong."""
    from bus import BusError
    from bus.runtime import read_connection, running_engine
    try:
        return running_engine() if running else read_connection()
    except BusError as exc:
        raise EngineError(str(exc)) from None


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for its parent counts as stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cmd_stop(args: argparse.Namespace) -> int:
    from bus.client import connection_file
    from bus.runtime import GONE, UNPROVEN, engine_state, unproven_error
    from engine.supervisor.rundir import clean_stale
    conn = _connection(running=False)
    pid = conn.get("pid")
    state = engine_state(conn)
    if state == UNPROVEN:   # a live process that is not provably this user's engine: never signal it
        raise EngineError(str(unproven_error(conn, connection_file())))
    if not isinstance(pid, int) or state == GONE:
        # the supervisor is gone (its pid may belong to another process now: never signal it)
        done = clean_stale(conn, connection_file())
        print(f"engine: the engine (pid {pid}) is not running; cleaned its stale runtime directory"
              + (f": {'; '.join(done)}" if done else ""))
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        clean_stale(conn, connection_file())
        print(f"engine: pid {pid} was not running; removed its stale connection file")
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            print(f"engine: stopped (pid {pid})")
            return 0
        time.sleep(0.05)
    print(f"engine: pid {pid} did not stop within {args.timeout}s", file=sys.stderr)
    return 1


def public_status(status: dict[str, Any]) -> dict[str, Any]:
    """What ``engine status`` shows of a status message, or of the connection file when no
    status message came: without the bus header, and never the CURVE keys the connection file
    holds for clients (the secret one lets anyone who reads it onto a TCP bus)."""
    return {k: v for k, v in status.items()
            if k not in HEADER_KEYS and k not in ("signing_key", "server_key") and not k.startswith("curve_")}


def cmd_status(args: argparse.Namespace) -> int:
    from bus import Subscriber
    conn = _connection()
    sub = Subscriber(conn["subscribe"], ["engine.status"])
    status = None
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        msg = sub.recv(timeout_ms=200)
        if msg and msg[1].get("pub", "").startswith("supervisor"):
            status = msg[1]
            break
    sub.close()
    status = public_status(conn if status is None else status)
    from engine.console.server import read_info
    console = read_info()  # from the console's own file: its token stays off the bus
    status["console"] = {"url": console["url"], "pid": console["pid"]} if console else None
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"state {status['state']}  backend {status['backend']}  model {status['model']}  session {status.get('session_id')}")
    print(f"console {console['url']}" if console else "console: not running (engine console)")
    if status.get("sip"):
        sp_ = status["sip"]
        print(f"sip {sp_.get('url')}  calls {len(sp_.get('calls') or [])}  accepted {sp_.get('accepted', 0)}  "
              f"rejected {sp_.get('rejected', 0)}  refused webhooks {sp_.get('refused', 0)}")
        for c in sp_.get("calls") or []:
            print(f"  call {c['sip_call_id']}  {c['api']}  {c['duration_s']:.0f} s  ${c['usd']:.4f}  from {c.get('from')}")
    if status.get("phone"):
        ph = status["phone"]
        print(f"phone {ph.get('url')}  calls {len(ph.get('calls') or [])}")
        for c in ph.get("calls") or []:
            print(f"  call {c['phone_call_id']}  {c['duration_s']:.0f} s  ${c['usd']:.4f}  {c.get('custom_parameters')}")
    print(f"cost ${status.get('cost_usd', 0):.4f}   publish {status['publish']}   subscribe {status['subscribe']}")
    for c in status["children"]:
        up = f"up {c['uptime_s']:.0f} s" if c.get("uptime_s") is not None else f"exit code {c.get('exit_code')}"
        print(f"  {c['name']:<9} pid {c['pid']!s:<8} {c['state']:<9} restarts {c['restarts']}  {up}")
    for name, r in status.get("rings", {}).items():
        print(f"  ring {name:<8} fill {r['fill_frames']}/{r['capacity_frames']} frames  "
              f"overruns {r['overrun_frames']}  underruns {r['underrun_frames']}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from engine.audio.devices import list_devices
    devices = list_devices()
    if args.json:
        print(json.dumps(devices, indent=1))
        return 0
    for d in devices:
        kinds = "/".join(k for k, n in (("in", d["inputs"]), ("out", d["outputs"])) if n)
        print(f"[{d['index']:>2}] {d['name']:<40} {kinds:<7} {d['default_rate_hz']} Hz")
    if not devices:
        print("no audio devices (headless? start virtual ones with: bash tools/vaudio.sh start)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.server.app import ServerConfig, run
    from engine.server.faults import Faults
    from engine.server.scenario import load_scenario
    faults = Faults(first_delta_delay_ms=args.first_delta_delay_ms, delta_jitter_ms=args.jitter_ms,
                    drop_after_s=args.drop_after_s, drop_code=args.drop_code,
                    max_session_s=args.max_session_s)
    key = args.require_key or os.environ.get(SERVER_KEY_ENV) or None
    cfg = ServerConfig(host=args.host, port=args.port, speed=args.speed, api_key=key,
                       asr=not args.no_asr, scenario=load_scenario(args.scenario), faults=faults,
                       listen_fd=args.listen_fd, dialect=args.dialect)
    return run(cfg)


def _call(topic: str, payload: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
    """Send a command (bus.aio's call: acked at once, re-sent only until then) and return its outcome
    (``cmd.done``), or its ``cmd.ack`` if the engine refused it; EngineError if no engine acks it,
    NoOutcome (a BusError) if it is acked but not carried out within ``timeout_s``."""
    from bus.aio import NoAck, call_sync
    from bus.client import endpoints_from
    try:
        return call_sync(endpoints_from(_connection()), topic, payload, name=f"cli:{os.getpid()}", outcome=True,
                         outcome_timeout_s=timeout_s)
    except NoAck as exc:
        raise EngineError(str(exc)) from None


def cmd_say(args: argparse.Namespace) -> int:
    from bus.aio import NoOutcome
    role = "system" if args.system else "user"
    respond = args.respond or (role == "user" and not args.no_respond)
    topic = "cmd.say"
    payload: dict[str, Any] = {"text": args.text, "role": role, "respond": respond}
    if args.instructions or args.commentary:   # GPT-Live's own context (docs/live.md)
        topic = "cmd.instructions" if args.instructions else "cmd.commentary"
        payload = {"text": args.text}
    if args.call:
        payload["phone_call_id"] = args.call   # one call of `engine phone` (docs/phone.md, "The bus")
    try:
        done = _call(topic, payload, timeout_s=args.timeout)
    except NoOutcome as exc:
        print(f"engine say: {exc}; the engine holds it and adds it when it can", file=sys.stderr)
        return 0
    if not done.get("ok"):
        error = str(done.get("error"))
        hint = "; name one with --call ID" if not args.call and "phone_call_id" in error else ""
        print(f"engine say: refused: {error}{hint}", file=sys.stderr)
        return 1
    if done.get("item_id"):
        print(f"engine say: added as {done.get('item_id')}")
    else:   # GPT-Live places context on its timeline
        print(f"engine say: placed at {done.get('start_ms')} ms of the session")
    return 0


def cmd_ptt(args: argparse.Namespace) -> int:
    """Push to talk in a terminal: Enter opens the mic, Enter again sends the turn and prints the answer."""
    from bus import Subscriber
    conn = _connection()
    sub = Subscriber(conn["subscribe"], ["model.text.delta", "model.transcript.delta", "response.done"])
    lines = iter(sys.stdin.readline, "")
    try:
        _call("cmd.mic", {"open": False})
        for _ in range(args.turns or 1 << 30):
            print("engine ptt: press Enter to talk (Ctrl-D to quit)", flush=True)
            if next(lines, None) is None:
                break
            for topic, payload in (("cmd.cancel", {}), ("cmd.input.clear", {}), ("cmd.mic", {"open": True})):
                _call(topic, payload)
            print("engine ptt: listening; press Enter to send", flush=True)
            ended = next(lines, None) is None
            _call("cmd.mic", {"open": False})
            ack = _call("cmd.input.commit", {"respond": True}, timeout_s=args.timeout)
            if not ack.get("ok"):
                print(f"engine ptt: not sent: {ack.get('error')}", file=sys.stderr)
                continue
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                msg = sub.recv(timeout_ms=200)
                if msg is None:
                    continue
                topic, body = msg
                if body.get("request_id") != ack["id"]:
                    continue
                if topic == "response.done":
                    print(flush=True)
                    break
                print(body.get("text", ""), end="", flush=True)
            if ended:
                break
    finally:
        sub.close()
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    """The conversation as readable lines (engine/view.py); topics the view leaves out are
    printed one message a line only when a prefix asks for them (``engine tail cost.``).
    ``--all`` (or ``--json``): every message of the given prefixes, one line each. ``--call ID``:
    only the messages of that phone call (their ``phone_call_id``)."""
    from bus import Subscriber
    from engine.view import ConversationView
    conn = _connection()
    sub = Subscriber(conn["subscribe"], args.prefixes or [""])
    deadline = time.monotonic() + args.seconds if args.seconds else None
    view = None if args.all or args.json else ConversationView()
    try:
        while deadline is None or time.monotonic() < deadline:
            msg = sub.recv(timeout_ms=200)
            if msg is None:
                continue
            topic, body = msg
            if args.call and body.get("phone_call_id") != args.call:
                continue   # another call's, or the engine's own
            if view is not None and (view.shows(topic) or not args.prefixes):
                for line in view.feed(topic, body):
                    print(line, flush=True)
            elif args.json:
                print(json.dumps({"topic": topic, **body}, default=str), flush=True)
            else:
                payload = {k: v for k, v in body.items() if k not in HEADER_KEYS}
                text = payload.get("text")
                shown = repr(text) if isinstance(text, str) and len(payload) <= 4 else json.dumps(payload, default=str)[:200]
                print(f"{time.strftime('%H:%M:%S')} {topic:<32} {shown}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
        if view is not None:
            for line in view.flush():   # model words still streaming when the view ended
                print(line, flush=True)
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from engine.api.eventlog import EventLog, find_session_log
    log = EventLog(find_session_log(args.session))
    events = log.filter(args.type)
    if args.csv:
        import csv
        w = csv.writer(sys.stdout)
        w.writerow(["wall", "mono_ns", "topic", "publisher", "text"])
        for e in events:
            w.writerow([e.wall, e.mono_ns, e.topic, e.body.get("pub"), e.body.get("text", "")])
    elif args.json:
        for e in events:
            print(json.dumps({"topic": e.topic, "wall": e.wall, "mono_ns": e.mono_ns, "body": e.body}, default=str))
    else:
        for e in events:
            t = time.strftime("%H:%M:%S", time.localtime(e.wall or 0))
            text = e.body.get("text")
            print(f"{t} {e.topic:<34} {text if isinstance(text, str) else ''}")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """Serve the debug console for the running engine until Ctrl-C (or print the URL of the one
    already running)."""
    from pathlib import Path
    from bus import load_endpoints
    from engine.console.server import ConsoleServer, read_info, run
    conn = _connection()
    running = read_info()
    if running is not None:
        print(f"realtalk: console already running (pid {running['pid']}): {running['url']}")
        return 0
    session_dir = Path(conn["session_dir"]) if conn.get("session_dir") else None
    server = ConsoleServer(load_endpoints(), host=args.host, port=args.port,
                           sessions_base=session_dir.parent if session_dir else None,
                           live_session=session_dir.name if session_dir else None,
                           allowed_hosts=args.allow_host or ())
    print("realtalk: Ctrl-C to stop the console (the engine goes on)", flush=True)
    return run(server)


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.api.demo import run_demo
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine", description="realtalk: realtime voice conversations over a ZeroMQ bus")
    sp = p.add_subparsers(dest="command", required=True)

    s = sp.add_parser("start", help="start the engine (supervisor and its processes)")
    s.add_argument("--config", help="config file (default: the built-in defaults, which the repository's config.yaml lists)")
    s.add_argument("--backend", choices=["local", "openai"], help="default: openai if $OPENAI_API_KEY is set, else local")
    s.add_argument("--model")
    s.add_argument("--mic", help="device name or index, a .wav file, or null")
    s.add_argument("--speaker", help="device name or index, a .wav file, or null")
    s.add_argument("--text-only", action="store_true", help="no audio: text in, text out")
    s.add_argument("--instructions", help="the model's instructions (session.instructions)")
    s.add_argument("--voice", help="the model's voice (session.voice), e.g. marin, cedar, alloy")
    s.add_argument("--scenario", help="local server scenario file")
    s.add_argument("--speed", type=float, help="local server speech speed-up (tests)")
    s.add_argument("--console", action="store_true", help="also serve the debug console (prints its URL)")
    s.add_argument("--console-host", default="127.0.0.1", help="the console's address (default loopback)")
    s.add_argument("--console-port", type=int, default=0, help="the console's port (default 0: a free port)")
    s.add_argument("--console-allow-host", action="append", metavar="NAME",
                   help="a host name the console may be opened by (besides IP addresses, localhost and this "
                        "machine's name); repeatable")
    s.set_defaults(func=cmd_start)

    s = sp.add_parser("phone", help="take phone calls over Twilio Media Streams (prints the ws:// URL)")
    s.add_argument("--config")
    s.add_argument("--backend", choices=["local", "openai"])
    s.add_argument("--model")
    s.add_argument("--host", help="address to listen on (phone.host)")
    s.add_argument("--port", type=int, help="port (phone.port; 0: a free port)")
    s.add_argument("--path", help="the URL's path (phone.path, default /twilio)")
    s.add_argument("--instructions")
    s.add_argument("--voice")
    s.add_argument("--scenario", help="local server scenario file")
    s.add_argument("--speed", type=float, help="local server speech speed-up (tests)")
    s.set_defaults(func=cmd_phone)

    s = sp.add_parser("sip", help="answer OpenAI SIP calls through signed webhooks (prints the http:// URL)")
    s.add_argument("--config")
    s.add_argument("--backend", choices=["local", "openai"])
    s.add_argument("--model")
    s.add_argument("--host", help="address to listen on (sip.host)")
    s.add_argument("--port", type=int, help="port (sip.port; 0: a free port)")
    s.add_argument("--path", help="the webhook URL's path (sip.path, default /openai/webhook)")
    s.add_argument("--instructions")
    s.add_argument("--voice")
    s.add_argument("--scenario", help="local server scenario file")
    s.add_argument("--speed", type=float, help="local server speech speed-up (tests)")
    s.set_defaults(func=cmd_sip)

    s = sp.add_parser("stop", help="stop the running engine")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_stop)

    s = sp.add_parser("status", help="children, rings, bus endpoints, session, cost")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sp.add_parser("devices", help="list PyAudio devices")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_devices)

    s = sp.add_parser("serve", help="run the local realtime server (offline stand-in for the OpenAI Realtime API)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--scenario", help="scenario file (docs/local-server.md)")
    s.add_argument("--speed", type=float, default=1.0, help="stream audio this many times faster than real time")
    s.add_argument("--require-key", help=f"accept only this bearer key (other users see it in ps: prefer ${SERVER_KEY_ENV})")
    s.add_argument("--no-asr", action="store_true", help="do not transcribe user audio with pocketsphinx")
    s.add_argument("--first-delta-delay-ms", type=float, default=0.0)
    s.add_argument("--jitter-ms", type=float, default=0.0, help="std deviation of delay between deltas")
    s.add_argument("--drop-after-s", type=float, default=None, help="drop each connection after this long")
    s.add_argument("--drop-code", type=int, default=1006, choices=[1001, 1006, 1011])
    s.add_argument("--max-session-s", type=float, default=3600.0)
    s.add_argument("--dialect", default="openai", choices=["openai", "azure", "xai"],
                   help="speak as this provider (docs/providers.md): Azure's URLs and api-key, or xAI's dialect")
    s.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    s = sp.add_parser("say", help="add a message to the conversation (and get a reply)")
    s.add_argument("text")
    s.add_argument("--system", action="store_true", help="context the model sees but nobody hears")
    s.add_argument("--no-respond", action="store_true")
    s.add_argument("--respond", action="store_true", help="ask for a response even for --system")
    live = s.add_mutually_exclusive_group()
    live.add_argument("--instructions", action="store_true",
                      help="GPT-Live: add it to the model's instructions (session.instructions.append)")
    live.add_argument("--commentary", action="store_true",
                      help="GPT-Live: the model says it in its own words (session.commentary.append)")
    s.add_argument("--call", metavar="ID", help="the phone call to say it in (engine phone: its phone_call_id, "
                                                "as engine status lists them)")
    s.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the engine to add it (it is acked at once, and held until then)")
    s.set_defaults(func=cmd_say)

    s = sp.add_parser("ptt", help="push to talk: Enter to talk, Enter to send (for turn_detection: null)")
    s.add_argument("--turns", type=int, default=None, help="stop after this many turns")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer")
    s.set_defaults(func=cmd_ptt)
    s = sp.add_parser("tail", help="watch the conversation (--all: every bus message)")
    s.add_argument("prefixes", nargs="*", metavar="TOPIC_PREFIX", help="only topics starting with these")
    s.add_argument("--all", action="store_true", help="every message, one line each (levels, positions, deltas…)")
    s.add_argument("--json", action="store_true", help="every message as one JSON line (implies --all)")
    s.add_argument("--seconds", type=float, default=None, help="stop after this long")
    s.add_argument("--call", metavar="ID", help="only this phone call's messages (engine phone: its phone_call_id)")
    s.set_defaults(func=cmd_tail)

    s = sp.add_parser("log", help="read a session's event log")
    s.add_argument("session", nargs="?", help="session folder or key (default: the latest)")
    s.add_argument("--type", help="topic prefix")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--csv", action="store_true")
    s.set_defaults(func=cmd_log)

    s = sp.add_parser("console", help="serve the debug console for the running engine (prints its URL)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    s.add_argument("--port", type=int, default=0, help="port (default 0: a free port)")
    s.add_argument("--allow-host", action="append", metavar="NAME",
                   help="a host name the console may be opened by (besides IP addresses, localhost and this "
                        "machine's name); repeatable")
    s.set_defaults(func=cmd_console)

    s = sp.add_parser("demo", help="headless spoken conversation on virtual devices with the local server")
    s.add_argument("--question", default="What is the capital of France?")
    s.add_argument("--speed", type=float, default=1.0)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (EngineError, BusError) as exc:  # the server's, the ring's and the core's errors are EngineErrors too
        print(f"engine {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

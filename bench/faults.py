"""Fault benchmark (issue 15): the engine on virtual devices against its local server, under
faults. Every wait has a timeout; what does not recover is reported as a figure
(``recovered: false``, ``hanging`` > 0), never a hang. Definitions: bench/README.md.

    python bench/run.py faults [--json] [--soak-minutes N] [--fuzz N]
"""
from __future__ import annotations

import base64
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import msgpack

REPO = Path(__file__).resolve().parent.parent
REPLY = "The sea is wide and the ships are many, and the sailors know the way."   # about 4 s
CHILD_MARKERS = {"capture": "engine.capture.process", "realtime": "engine.realtime.process",
                 "playback": "engine.playback.process",
                 "broker": "bus.broker", "server": "engine.api.cli serve"}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_of(parent: int) -> dict[str, int]:
    """The engine's children by name, from /proc (the supervisor is their parent)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _ppid(int(d.name)) == parent:
            cmd = _cmdline(int(d.name))
            for name, marker in CHILD_MARKERS.items():
                if marker in cmd:
                    out[name] = int(d.name)
    return out


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class TimedLog:
    """An engine's every bus message with its arrival time (``log``: monotonic s, topic, body), read
    by a thread from :meth:`start_log` on; ``_stop`` ends it."""

    log: list[tuple[float, str, dict[str, Any]]]

    def start_log(self, conn: dict[str, Any]) -> None:
        from bus import Subscriber
        self.log = []
        self._stop = threading.Event()
        self.sub = Subscriber(conn["subscribe"], [""])
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            msg = self.sub.recv(timeout_ms=100)
            if msg is not None:
                self.log.append((time.monotonic(), msg[0], msg[1]))

    def stop_log(self) -> None:
        """End the reading (if it began) and close the subscriber."""
        if hasattr(self, "sub"):
            self._stop.set()
            self.reader.join(timeout=2)
            self.sub.close()


class FaultEngine(TimedLog):
    """``engine start`` on the virtual devices (no echo path), a reader thread logging every bus
    message with its arrival time, and a publisher for the bench's commands."""

    def __init__(self, tmp: Path, *, faults: str = "", speed: float = 1.0, reply: str = REPLY,
                 extra_cfg: str = "") -> None:
        from bench.common import start_engine
        tmp.mkdir(parents=True, exist_ok=True)
        scen = tmp / "scenario.yaml"
        scen.write_text(f'default_reply: "{reply}"\n' + (f"faults: {{{faults}}}\n" if faults else ""))
        cfg = tmp / "engine.yaml"
        cfg.write_text("audio: {mic: vmic, speaker: vspk, echo: off}\n"
                       f"local_server: {{asr: false, speed: {speed}, scenario: {scen}}}\n"
                       "session: {turn_detection: null, transcription: null}\n" + extra_cfg)
        self.env = dict(os.environ, REALTALK_RUNTIME_DIR=str(tmp / "run"), XDG_DATA_HOME=str(tmp / "data"))
        self.env.pop("OPENAI_API_KEY", None)
        self.proc, self.ready_ms, _ = start_engine(["--config", str(cfg)], self.env)
        self.conn = json.loads((tmp / "run" / "engine.json").read_text())
        from bus import Publisher
        self.start_log(self.conn)
        self.pub = Publisher(self.conn["publish"], "bench-faults")
        self.pub.join(self.conn["subscribe"])

    def find(self, pred: Callable[[float, str, dict[str, Any]], bool],
             since: float = 0.0) -> tuple[float, str, dict[str, Any]] | None:
        for entry in list(self.log):
            if entry[0] >= since and pred(*entry):
                return entry
        return None

    def wait(self, pred: Callable[[float, str, dict[str, Any]], bool], timeout: float, since: float = 0.0
             ) -> tuple[float, str, dict[str, Any]] | None:
        end = time.monotonic() + timeout
        while True:
            got = self.find(pred, since)
            if got is not None or time.monotonic() >= end:
                return got
            time.sleep(0.01)

    def send_until_acked(self, topic: str, body: dict[str, Any], timeout: float = 15.0) -> float | None:
        """Send a command as ``engine say`` does (bus.aio's call: re-sent only while no ``cmd.ack``
        came); when its ack came (monotonic seconds), or None."""
        from bus.aio import NoAck, call_sync
        from bus.client import endpoints_from
        try:
            call_sync(endpoints_from(self.conn), topic, body, name="bench-faults-call", ack_timeout_s=timeout)
        except NoAck:
            return None
        return time.monotonic()

    def say(self, text: str) -> tuple[str, float | None]:
        rid = f"say-{time.monotonic_ns()}-{random.randrange(1 << 30)}"
        return rid, self.send_until_acked("cmd.say", {"text": text, "id": rid})

    def done_for(self, rid: str) -> dict[str, Any] | None:
        got = self.find(lambda t, tp, b: tp == "response.done" and b.get("request_id") == rid)
        return got[2] if got else None

    def status(self) -> dict[str, Any] | None:
        """``engine status --json``."""
        try:
            out = subprocess.run([sys.executable, "-m", "engine.api.cli", "status", "--json"], env=self.env, cwd=str(REPO),
                                 capture_output=True, text=True, timeout=15)
            return json.loads(out.stdout)
        except (subprocess.TimeoutExpired, ValueError):
            return None

    def stop(self) -> None:
        from bench.common import stop_engine
        stop_engine(self.proc)
        self.stop_log()
        self.pub.close()


def _requests_outcome(eng: FaultEngine, ids: list[str], acked: list[float | None], timeout: float) -> dict[str, Any]:
    """Wait up to ``timeout`` for a response.done of each id; what became of them."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not all(eng.done_for(i) for i in ids):
        time.sleep(0.05)
    done = [eng.done_for(i) for i in ids]
    return {"says_sent": len(ids), "says_acked": sum(1 for a in acked if a is not None),
            "says_answered": sum(1 for d in done if d and d.get("status") == "completed"),
            "says_reported_failed": sum(1 for d in done if d and d.get("status") == "failed"),
            "says_other_status": sorted({str(d.get("status")) for d in done
                                         if d and d.get("status") not in ("completed", "failed")}),
            # lost: never acked, or acked and never answered nor reported failed
            "messages_lost": sum(1 for a, d in zip(acked, done) if a is None or d is None),
            "waiters_hanging": sum(1 for d in done if d is None)}


# ------------------------------------------------------------------ kill each child mid-answer
def kill_child(tmp: Path, name: str) -> dict[str, Any]:
    eng = FaultEngine(tmp)
    try:
        a_id, a_ack = eng.say("My name is Ada.")
        eng.wait(lambda t, tp, b: tp == "response.done" and b.get("request_id") == a_id, 20)
        eng.wait(lambda t, tp, b: tp == "playout.stopped", 20, a_ack or 0)
        b_id, b_ack = eng.say("Tell me about the sea.")
        playing = eng.wait(lambda t, tp, b: tp == "playout.started", 20, b_ack or time.monotonic())
        time.sleep(0.5)   # mid-answer
        status = eng.status() or eng.conn
        pid = next((c["pid"] for c in status.get("children", []) if c.get("name") == name), None)
        sup = eng.proc.pid
        if pid is None:
            return {"error": f"no {name} in engine status"}
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        new_pid, respawn_ms = None, None
        while time.monotonic() - t_kill < 10:
            p = children_of(sup).get(name)
            if p is not None and p != pid:
                new_pid, respawn_ms = p, (time.monotonic() - t_kill) * 1000
                break
            time.sleep(0.005)
        ids, acks = [b_id], [b_ack]
        for n in range(2):   # client messages right after the kill
            i, ack = eng.say(f"What is my name? ({n})")
            ids.append(i)
            acks.append(ack)

        def ready(t: float, tp: str, b: dict[str, Any]) -> bool:
            pub = str(b.get("pub", ""))
            if name in ("realtime", "server"):
                return tp == "engine.status" and pub.startswith("realtime") and b.get("state") in ("connected", "reconnected")
            if name == "broker":
                return pub.split(":")[0] in ("realtime", "capture", "playback", "supervisor", "realtime-reader")
            return new_pid is not None and pub.endswith(f":{new_pid}")
        back = eng.wait(ready, 10, t_kill + 0.001)
        outcome = _requests_outcome(eng, ids, acks, 40)
        recon = eng.find(lambda t, tp, b: tp == "engine.status" and b.get("state") == "reconnected", t_kill)
        if name in ("realtime", "server"):
            context = {"context_replayed": bool(recon and recon[2].get("history_items", 0) >= 2),
                       "history_items": recon[2].get("history_items") if recon else None}
        else:
            context = {"context_replayed": None, "context_kept": recon is None}  # the API session was not touched
        restarts = {c["name"]: c.get("restarts") for c in (eng.status() or {}).get("children", [])}
        return {"answer_playing_at_kill": playing is not None, "respawn_ms": round(respawn_ms, 1) if respawn_ms else None,
                "recovery_ms": round((back[0] - t_kill) * 1000, 1) if back else None, "recovered": back is not None,
                **context, **outcome, "restarts": restarts.get(name)}
    finally:
        eng.stop()


# ------------------------------------------------------------------ commands sent once across a realtime crash
def commands_across_realtime_crash(tmp: Path, says: int = 50, interval_s: float = 0.010) -> dict[str, Any]:
    """Issue 23 point 4: ``says`` cmd.say sent once each, from a plain pyzmq PUB (a client in any
    language), one every ``interval_s`` from the SIGKILL of the realtime child on, so that they span
    its restart. What became of each: acked (when), answered (in order), or lost."""
    import msgpack
    import zmq
    eng = FaultEngine(tmp, speed=8.0, reply="Noted.")
    raw: Any = zmq.Context.instance().socket(zmq.PUB)
    try:
        raw.connect(eng.conn["publish"])
        seq = 0

        def send(topic: str, payload: dict[str, Any]) -> float:
            nonlocal seq
            seq += 1
            t = time.monotonic()
            raw.send_multipart([topic.encode(), msgpack.packb({"v": 2, "ts": time.time(), "mono_ns": time.monotonic_ns(),
                                                               "pub": "bench-raw", "seq": seq, **payload})])
            return t
        joined = None
        while joined is None and seq < 500:   # the slow joiner: until a probe of ours comes back
            since = send("bench.join", {})
            joined = eng.wait(lambda t, tp, b: tp == "bench.join", 0.02, since)
        first = f"before-{time.monotonic_ns()}"
        send("cmd.say", {"text": "My name is Ada.", "id": first})
        if eng.wait(lambda t, tp, b: tp == "response.done" and b.get("request_id") == first, 20) is None:
            return {"error": "the say before the kill was not answered"}
        status = eng.status() or eng.conn
        pid = next((c["pid"] for c in status.get("children", []) if c.get("name") == "realtime"), None)
        if pid is None:
            return {"error": "no realtime child in engine status"}
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        sent: list[tuple[str, float]] = []
        for n in range(says):
            rid = f"once-{n}-{time.monotonic_ns()}"
            sent.append((rid, send("cmd.say", {"text": f"Say number {n}.", "id": rid})))
            time.sleep(max(0.0, t_kill + (n + 1) * interval_s - time.monotonic()))
        back = eng.wait(lambda t, tp, b: tp == "engine.status" and b.get("state") == "reconnected", 15, t_kill)
        ids = {rid for rid, _ in sent}
        end = time.monotonic() + 60
        while time.monotonic() < end and len({b.get("request_id") for _, tp, b in list(eng.log)
                                                if tp == "response.done" and b.get("request_id") in ids}) < says:
            time.sleep(0.05)
        acks = {b["id"]: t for t, tp, b in list(eng.log) if tp == "cmd.ack" and b.get("id") in ids}
        dones = [(t, b) for t, tp, b in list(eng.log) if tp == "response.done" and b.get("request_id") in ids]
        answered = {b["request_id"] for _, b in dones if b.get("status") == "completed"}
        ack_ms = sorted((acks[rid] - t) * 1000 for rid, t in sent if rid in acks)
        order = [b["request_id"] for _, b in dones if b.get("status") == "completed"]

        def pct(q: float) -> float | None:
            return round(ack_ms[min(len(ack_ms) - 1, int(q * len(ack_ms)))], 2) if ack_ms else None
        first_after = min((t for t, b in dones), default=None)
        return {"says_sent_once": says, "send_interval_ms": interval_s * 1000,
                "sent_before_reconnect": sum(1 for _, t in sent if back is None or t < back[0]),
                "commands_never_acked": sum(1 for rid, _ in sent if rid not in acks),
                "commands_never_answered": sum(1 for rid, _ in sent if rid not in answered),
                "commands_lost": sum(1 for rid, _ in sent if rid not in acks or rid not in answered),
                "answered_more_than_once": sum(1 for rid in ids if sum(1 for _, b in dones if b["request_id"] == rid) > 1),
                "answered_in_send_order": order == [rid for rid, _ in sent if rid in answered],
                "ack_ms_p50": pct(0.50), "ack_ms_p99": pct(0.99), "ack_ms_max": round(ack_ms[-1], 2) if ack_ms else None,
                "reconnect_after_kill_ms": round((back[0] - t_kill) * 1000, 1) if back else None,
                "history_items_replayed": back[2].get("history_items") if back else None,
                "first_answer_after_reconnect_ms": round((first_after - back[0]) * 1000, 1)
                if back and first_after is not None else None}
    finally:
        raw.close(0)
        eng.stop()


# ------------------------------------------------------------------ socket drops
def socket_drop(tmp: Path, code: int, drop_after_s: float = 6.0) -> dict[str, Any]:
    eng = FaultEngine(tmp, faults=f"drop_after_s: {drop_after_s}, drop_code: {code}")
    try:
        def connected_at() -> float:
            got = [e for e in eng.log if e[1] == "engine.status" and str(e[2].get("pub", "")).startswith("realtime")
                   and e[2].get("state") in ("connected", "reconnected")]
            return got[-1][0] if got else time.monotonic()
        a_id, a_ack = eng.say("My name is Ada.")
        eng.wait(lambda t, tp, b: tp == "response.done" and b.get("request_id") == a_id, 20)
        # the next say lands so that its answer is playing when the server drops the socket
        t_send = connected_at() + drop_after_s - 1.2
        time.sleep(max(0.0, t_send - time.monotonic()))
        b_id, b_ack = eng.say("Tell me about the sea.")
        down = eng.wait(lambda t, tp, b: tp == "engine.status" and b.get("state") == "disconnected", 10, b_ack or 0)
        ids, acks = [b_id], [b_ack]
        i, ack = eng.say("What is my name?")   # sent while the socket is down or just back
        ids.append(i)
        acks.append(ack)
        up = eng.wait(lambda t, tp, b: tp == "engine.status" and b.get("state") == "reconnected", 10, down[0]) if down else None
        outcome = _requests_outcome(eng, ids, acks, 30)
        return {"dropped": down is not None, "close_code_reported": down[2].get("close_code") if down else None,
                "reconnect_ms": round((up[2]["mono_ns"] - down[2]["mono_ns"]) / 1e6, 1) if up and down else None,
                "reconnected": up is not None, "history_items": up[2].get("history_items") if up else None, **outcome}
    finally:
        eng.stop()


# ------------------------------------------------------------------ fuzz
def _fuzz_message(rng: random.Random) -> list[bytes]:
    topics = ["cmd.say", "cmd.cancel", "cmd.session.update", "cmd.tool.register", "cmd.tool.unregister",
              "cmd.tool.result", "cmd.bogus", "engine.error", "engine.status", "playback.flushed", "playback.started",
              "capture.echo", "session.config", "engine.presence.gone", "engine.tools", "conversation.history",
              "user.text", "fuzz.x", "", "\u00e9\u00e8"]
    topic = rng.choice(topics).encode()
    values = [None, 1, -1, 2 ** 63 - 1, 1.5, "x", "", "x" * 5000, [], [1, 2], {}, {"a": 1}, b"\xff\x00", True]
    kind = rng.randrange(8)
    if kind == 0:
        return [topic]                                            # one frame
    if kind == 1:
        return [topic, os.urandom(rng.randrange(1, 64))]          # not msgpack
    if kind == 2:
        return [topic, msgpack.packb(rng.choice([1, "str", [1, 2], None]))]   # msgpack, not a map
    if kind == 3:
        return [topic, msgpack.packb({}), os.urandom(64), b"x"]   # four frames
    body: dict[Any, Any] = {"v": rng.choice([1, 2, "1", None]), "ts": rng.choice([time.time(), "now"]),
                            "mono_ns": rng.choice([time.monotonic_ns(), -5, "x"]),
                            "pub": rng.choice(["fuzz", "realtime:1", "supervisor:1", 7]), "seq": rng.randrange(-3, 1 << 20)}
    for key in rng.sample(["text", "role", "respond", "id", "name", "parameters", "session", "call_id", "output",
                           "fatal", "state", "index", "start_index", "item_id", "timeout_s"], rng.randrange(1, 6)):
        body[key] = rng.choice(values)
    if topic == b"cmd.say":   # never a valid question: fuzzing must not start answers
        body["text"] = rng.choice([None, 5, [], {}])
    if kind == 4:
        body[rng.choice([1, b"k"])] = "non-string key"
    if kind == 5:
        body["fatal"] = True   # a forged fatal error
    frames = [topic, msgpack.packb(body, use_bin_type=True)]
    if kind == 6:
        frames.append(b"0" * 64)   # a bad signature
    return frames


SIGNED_PREFIXES = ("engine.status", "engine.error", "playback.", "capture.", "session.config", "engine.tools",
                   "conversation.history", "engine.presence.gone")


def _capture_signed(eng: FaultEngine, seconds: float) -> list[list[bytes]]:
    """Signed messages of the engine's own processes, as any local client can read them off the bus."""
    import zmq
    spy: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    for prefix in SIGNED_PREFIXES:
        spy.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    spy.connect(eng.conn["subscribe"])
    out: list[list[bytes]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if spy.poll(50):
            frames = spy.recv_multipart()
            if len(frames) == 3:
                out.append(frames)
    spy.close(0)
    return out


def _taken_twice(session_dir: Path) -> int:
    """Signed messages the supervisor logged more than once (the same topic, publisher and seq)."""
    seen: dict[tuple[str, str, int], int] = {}
    try:
        lines = (session_dir / "events.jsonl").read_text().splitlines()
    except OSError:
        return -1
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        body = ev.get("body") or {}
        if str(ev.get("topic", "")).startswith(SIGNED_PREFIXES) and isinstance(body.get("seq"), int):
            key = (ev["topic"], str(body.get("pub")), body["seq"])
            seen[key] = seen.get(key, 0) + 1
    return sum(n - 1 for n in seen.values() if n > 1)


def fuzz(tmp: Path, count: int, rate_hz: float = 2000.0) -> dict[str, Any]:
    import zmq
    eng = FaultEngine(tmp)
    try:
        before = {c["name"]: c.get("restarts", 0) for c in (eng.status() or {}).get("children", [])}
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        sock.connect(eng.conn["publish"])
        captured = _capture_signed(eng, 2.5)   # real signed messages (engine.status every second), to replay
        rng = random.Random(5)
        t0 = time.monotonic()
        probes: list[tuple[str, float]] = []
        replays = 0
        for n in range(count):
            sock.send_multipart(_fuzz_message(rng))
            if n % 50 == 25 and captured:   # a captured, validly signed message sent again
                sock.send_multipart(captured[(n // 50) % len(captured)])
                replays += 1
            if n % 100 == 0:   # a probe the realtime loop carries out: its cmd.done latency is that loop's stall
                pid = f"probe-{n}"
                probes.append((pid, time.monotonic()))
                eng.pub.publish("cmd.cancel", {"id": pid})
            wait = t0 + (n + 1) / rate_hz - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        t1 = time.monotonic()
        time.sleep(3.0)
        sock.close(linger=0)
        lat = []
        unanswered = 0
        for pid, sent in probes:
            def is_ack(t: float, tp: str, b: dict[str, Any], pid: str = pid) -> bool:
                return tp == "cmd.done" and b.get("id") == pid
            got = eng.find(is_ack)
            if got is None:
                unanswered += 1
            else:
                lat.append((got[0] - sent) * 1000)

        def gaps(prefix: str) -> float | None:
            beats = [t for t, tp, b in eng.log if tp == "engine.status" and str(b.get("pub", "")).startswith(prefix)
                     and t0 - 2 <= t <= t1 + 3]
            return round(max((b - a for a, b in zip(beats, beats[1:])), default=0) * 1000, 1) if len(beats) > 1 else None
        status = eng.status()
        own = {str(eng.proc.pid)} | {str(c.get("pid")) for c in (status or eng.conn).get("children", [])}
        # the engine's own reports (the fuzz's forged engine.error messages reach this unverifying subscriber too)
        reports = [b for t, tp, b in eng.log if tp == "engine.error" and t >= t0
                   and str(b.get("pub", "")).rpartition(":")[2] in own]
        after = {c["name"]: c.get("restarts", 0) for c in (status or {}).get("children", [])}
        alive = eng.proc.poll() is None
        exit_code = eng.proc.returncode
        session_dir = Path((status or eng.conn).get("session_dir", tmp))
        out = {"fuzzed_messages": count, "fuzz_s": round(t1 - t0, 1), "engine_alive": alive,
                "crashes": sum(after.get(k, 0) - before.get(k, 0) for k in after) if status else None,
                "reports": len(reports),
                "reported_malformed_total": sum(int(b.get("count", 1) or 1) for b in reports
                                                if b.get("code") in ("malformed_bus_message", "malformed_message")),
                "reported_bad_commands": sum(1 for b in reports if b.get("code") == "bad_command"),
                "report_codes": sorted({str(b.get("code")) for b in reports}),
                "engine_exit_code": exit_code,
                "probe_ack_ms_p50": round(statistics.median(lat), 1) if lat else None,
                "probe_ack_ms_max": round(max(lat), 1) if lat else None, "probes_unanswered": unanswered,
                "supervisor_heartbeat_gap_ms_max": gaps("supervisor"),
                "supervisor_malformed_counted": (status or {}).get("malformed_messages"),
                "replays_sent": replays, "replay_kinds": sorted({f[0].decode() for f in captured})}
    finally:
        eng.stop()
    out["replays_taken_by_supervisor"] = _taken_twice(session_dir)   # its event log is complete once it stopped
    return out


# ------------------------------------------------------------------ slow subscriber
def slow_subscriber(tmp: Path, seconds: float = 10.0) -> dict[str, Any]:
    import zmq
    eng = FaultEngine(tmp, reply=" ".join([REPLY] * 3))
    stop = threading.Event()
    try:
        broker = next(c["pid"] for c in eng.conn["children"] if c["name"] == "broker")
        base_rss = rss_mb(broker)
        seen: dict[str, int] = {}
        lost = [0, 0]   # messages the slow subscriber missed (seq gaps), messages it read

        def take(frames: list[bytes]) -> None:
            """Count one message read, and the gap in its publisher's ``seq`` before it."""
            try:
                body = msgpack.unpackb(frames[1])
                pub, seq = body.get("pub"), body.get("seq")
                if isinstance(seq, int) and pub in seen and seq > seen[pub] + 1:
                    lost[0] += seq - seen[pub] - 1
                if isinstance(seq, int):
                    seen[pub] = max(seq, seen.get(pub, 0))
            except Exception:  # noqa: BLE001 - a message we cannot read is not what is measured
                pass
            lost[1] += 1

        def slow() -> None:
            s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(eng.conn["subscribe"])
            while not stop.is_set():
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(0.1)
                    continue
                take(frames)
                time.sleep(0.01)   # 100 messages a second at most: slow
            # then read what is still queued, fast: the gaps after the queue filled are the drops
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(0.01)
                    continue
                take(frames)
            s.close(linger=0)

        def flood() -> None:   # traffic the slow subscriber cannot keep up with: 1 KB messages, 5,000/s
            from bus import Publisher
            p = Publisher(eng.conn["publish"], "bench-flood")
            t = time.monotonic()
            n = 0
            while not stop.is_set():
                p.publish("bench.flood", {"x": "x" * 1000})
                n += 1
                if n % 50 == 0:
                    t += 0.01
                    time.sleep(max(0.0, t - time.monotonic()))
            p.close()
        threads = [threading.Thread(target=slow, daemon=True), threading.Thread(target=flood, daemon=True)]
        for th in threads:
            th.start()
        time.sleep(0.5)
        rid, ack = eng.say("Tell me a long story.")
        t0 = time.monotonic()
        peak = base_rss or 0.0
        while time.monotonic() - t0 < seconds:
            peak = max(peak, rss_mb(broker) or 0.0)
            time.sleep(0.2)
        stop.set()
        for th in threads:
            th.join(timeout=8)
        done = eng.wait(lambda t, tp, b: tp == "response.done" and b.get("request_id") == rid, 20)
        eng.wait(lambda t, tp, b: tp == "playout.stopped", 20, t0)
        time.sleep(6.0)   # the broker's keeper gives memory back every 5 s
        dropped_reports = [b for t, tp, b in eng.log if tp == "bus.dropped" and t >= t0]
        return {"broker_rss_mb_before": round(base_rss or 0, 1), "broker_rss_mb_peak": round(peak, 1),
                "broker_rss_mb_after": round(rss_mb(broker) or 0, 1),
                "slow_subscriber_read": lost[1], "slow_subscriber_missed_by_seq": lost[0],
                "bus_dropped_messages": len(dropped_reports),
                "bus_dropped_counted": sum(int(b.get("count", 0) or 0) for b in dropped_reports),
                "underruns_reported": sum(1 for t, tp, _ in eng.log if tp == "playout.underrun" and t >= t0),
                "reply_completed": bool(done and done[2].get("status") == "completed")}
    finally:
        stop.set()
        eng.stop()


# ------------------------------------------------------------------ a foreign slow subscriber
NODE_SLOW_READER = r"""
const { Bus } = require(process.argv[1]);
(async () => {
  const bus = new Bus({ file: process.argv[2], name: `node-slow:${process.pid}` });
  let read = 0, fast = false;
  process.stdin.on("data", () => { fast = true; });   // a line on stdin: read at full speed from now on
  console.log("ready");
  for await (const { topic, body } of bus.messages()) {
    if (topic === "bench.flood") read += 1;
    if (topic === "bench.flood.end") break;
    if (!fast) await new Promise((r) => setTimeout(r, 10));   // 100 messages a second at most
  }
  await new Promise((r) => setTimeout(r, 1200));   // its last bus.dropped report is due
  console.log(JSON.stringify({ read, dropped: bus.dropped }));
  bus.close();
})();
"""


def foreign_subscriber(tmp: Path, seconds: float = 5.0) -> dict[str, Any]:
    """The Node client as a slow subscriber of every topic during a flood: what it lost by its own
    count against what the flood sent and it read, and whether its bus.dropped reports reached the bus."""
    import shutil
    node = shutil.which("node")
    if node is None:
        return {"error": "node is not installed (bash tools/setup-system.sh)"}
    eng = FaultEngine(tmp)
    try:
        reader = subprocess.Popen([node, "-e", NODE_SLOW_READER, str(REPO / "clients" / "node" / "realtalk.js"),
                                   str(tmp / "run" / "engine.json")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, cwd=str(tmp))
        assert reader.stdout is not None and reader.stdin is not None
        if reader.stdout.readline().strip() != "ready":
            return {"error": "the node reader did not start"}
        time.sleep(0.5)   # its subscription reaches the broker
        from bus import Publisher
        p = Publisher(eng.conn["publish"], "bench-flood")
        p.join(eng.conn["subscribe"])   # no message is lost to the slow joiner before the count starts
        t0 = time.monotonic()
        t = t0
        while time.monotonic() - t0 < seconds:   # 1 KB messages at 5,000/s
            p.publish("bench.flood", {"x": "x" * 1000})
            if p.seq % 50 == 0:
                t += 0.01
                time.sleep(max(0.0, t - time.monotonic()))
        sent = p.seq
        reader.stdin.write("fast\n")
        reader.stdin.flush()
        time.sleep(3.0)   # it drains its queue at full speed
        p.publish("bench.flood.end")   # after the pause: a loss at the flood's very end shows as a gap too
        out, _ = reader.communicate(timeout=20)
        got = json.loads(out.strip().splitlines()[-1])
        time.sleep(0.3)
        p.close()
        counted = int(got["dropped"].get("bench-flood", 0))
        reports = [b for _, tp, b in eng.log if tp == "bus.dropped" and str(b.get("subscriber", "")).startswith("node-slow")]
        return {"flood_sent": sent, "node_read": got["read"], "node_counted_lost": counted,
                "unaccounted": sent - got["read"] - counted,
                "bus_dropped_reports_from_node": len(reports),
                "bus_dropped_reported_total": sum(int(b.get("count", 0) or 0) for b in reports
                                                  if b.get("publisher") == "bench-flood")}
    finally:
        eng.stop()


# ------------------------------------------------------------------ soak
def soak(tmp: Path, minutes: float, speed: float = 4.0) -> dict[str, Any]:
    eng = FaultEngine(tmp, speed=speed, reply="The sea is wide and the ships are many.",
                      extra_cfg="session_recycle_s: 60\n")
    try:
        sup = eng.proc.pid
        end = time.monotonic() + minutes * 60
        samples: list[tuple[float, dict[str, tuple[int, float | None, int | None]]]] = []

        def sample() -> None:
            procs = {"supervisor": sup, **children_of(sup)}
            samples.append((time.monotonic(), {n: (p, rss_mb(p), fd_count(p)) for n, p in procs.items()}))
        turns = failed = 0
        next_sample = 0.0
        warm = time.monotonic() + min(30.0, minutes * 60 / 4)
        while time.monotonic() < end:
            rid, ack = eng.say(f"Turn {turns}")
            def is_done(t: float, tp: str, b: dict[str, Any], rid: str = rid) -> bool:
                return tp == "response.done" and b.get("request_id") == rid
            got = eng.wait(is_done, 30)
            played = eng.wait(lambda t, tp, b: tp == "playout.stopped", 30, ack or time.monotonic())
            if got and got[2].get("status") == "completed" and played:
                turns += 1
            else:
                failed += 1
            now = time.monotonic()
            if now >= warm and now >= next_sample:
                next_sample = now + 10
                sample()
            if len(eng.log) > 200_000:
                eng.log[:] = eng.log[-20_000:]   # the bench's own memory
        sample()
        first, last = samples[0][1], samples[-1][1]
        per = {}
        for name in first:
            series = [s[1][name] for s in samples if name in s[1]]
            rss = [r for _, r, _ in series if r is not None]
            fds = [f for _, _, f in series if f is not None]
            per[name] = {"rss_mb_start": round(rss[0], 1) if rss else None, "rss_mb_end": round(rss[-1], 1) if rss else None,
                         "rss_growth_mb": round(rss[-1] - rss[0], 1) if rss else None,
                         "fds_start": fds[0] if fds else None, "fds_end": fds[-1] if fds else None,
                         "fds_max": max(fds) if fds else None,
                         "restarted": len({p for p, _, _ in series}) > 1 or name not in last}
        recycles = sum(1 for t, tp, b in eng.log if tp == "engine.status" and b.get("state") == "reconnected"
                       and b.get("reason") == "recycle")
        return {"soak_minutes": minutes, "server_speed": speed, "turns_answered": turns, "turns_failed": failed,
                "measured_over_s": round(samples[-1][0] - samples[0][0], 1), "session_recycles": recycles,
                "max_rss_growth_mb": max((v["rss_growth_mb"] or 0) for v in per.values()),
                "fds_flat": all(v["fds_end"] == v["fds_start"] for v in per.values()), "by_process": per}
    finally:
        eng.stop()


def playback_stalls(tmp: Path, replies: int = 10) -> dict[str, Any]:
    """The playback process stopped (SIGSTOP) 60, 120, 250 and 500 ms mid-reply with the echo path
    on: the conversation suite's stall test (``bench.conversation.bench_playback_stalls``, the
    same engine and definitions); false barge-ins by stall length. Goal 0 at every length."""
    from bench.conversation import STALLS_MS, bench_playback_stalls
    tmp.mkdir(parents=True, exist_ok=True)
    got = bench_playback_stalls(tmp, replies)
    got["false_bargeins_by_stall_ms"] = {str(ms): got[f"stall_{ms}ms_false_bargeins"] for ms in STALLS_MS}
    return got


# ------------------------------------------------------------------ the phone port (issue 23)
class PhoneEngine(TimedLog):
    """``engine phone --backend local`` with ``phone.*`` keys from ``phone_cfg``, its secrets in the
    environment only; its console output to a file (counted as log bytes), its bus read on a
    thread with arrival times."""

    def __init__(self, tmp: Path, phone_cfg: str, env_extra: dict[str, str]) -> None:
        import re
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "run").mkdir(mode=0o700, exist_ok=True)
        cfg = tmp / "engine.yaml"
        cfg.write_text("local_server: {asr: false, speed: 4.0}\nsession: {transcription: null}\n"
                       f"phone: {{{phone_cfg}}}\n")
        self.env = dict(os.environ, REALTALK_RUNTIME_DIR=str(tmp / "run"), XDG_DATA_HOME=str(tmp / "data"),
                        **env_extra)
        self.env.pop("OPENAI_API_KEY", None)
        self.out_path = tmp / "console.txt"
        self.out = self.out_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "phone", "--config", str(cfg),
                                      "--backend", "local", "--port", "0"], stdout=self.out,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=str(REPO))
        deadline = time.monotonic() + 60
        self.url = ""
        while not self.url and time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"phone calls at (ws://\S+)", self.out_path.read_text())
            self.url = m.group(1) if m else ""
            time.sleep(0.05)
        if not self.url:
            self.stop()
            raise RuntimeError("engine phone did not print its URL: " + self.out_path.read_text()[-2000:])
        self.conn = json.loads((tmp / "run" / "engine.json").read_text())
        self.start_log(self.conn)
        out = subprocess.run([sys.executable, "-m", "engine.api.cli", "status", "--json"], env=self.env,
                             cwd=str(REPO), capture_output=True, text=True, timeout=15)
        self.event_log = Path(json.loads(out.stdout)["session_dir"]) / "events.jsonl"

    def log_bytes(self) -> int:
        """The event log's size plus what the engine printed."""
        return self.event_log_offset() + self.out_path.stat().st_size

    def event_log_offset(self) -> int:
        time.sleep(0.6)   # the supervisor writes the event log every few hundred ms
        return self.event_log.stat().st_size if self.event_log.exists() else 0

    def event_log_bytes(self, start: int, pred: Callable[[str, dict[str, Any]], bool], until: int | None = None) -> int:
        """Bytes of the event log's lines from offset ``start`` (to ``until``) whose topic and body match."""
        with self.event_log.open("rb") as f:
            f.seek(start)
            data = f.read() if until is None else f.read(until - start)
        total = 0
        for line in data.splitlines(keepends=True):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if pred(str(entry.get("topic")), entry.get("body") or {}):
                total += len(line)
        return total

    def since(self, t: float, topic: str) -> list[dict[str, Any]]:
        return [b for at, tp, b in list(self.log) if at >= t and tp == topic]

    def stop(self) -> None:
        from bench.common import stop_engine
        stop_engine(self.proc)
        self.out.close()
        self.stop_log()


def _start_frame(call_sid: str, params: dict[str, str] | None = None) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ" + call_sid,
                       "start": {"streamSid": "MZ" + call_sid, "accountSid": "AC" + "0" * 32, "callSid": call_sid,
                                 "tracks": ["inbound"], "customParameters": params or {},
                                 "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})


MEDIA_FRAME = json.dumps({"event": "media", "media": {"track": "inbound",
                                                       "payload": base64.b64encode(b"\xff" * 160).decode("ascii")}})


async def _caller(url: str, call_sid: str, headers: dict[str, str], params: dict[str, str] | None,
                  hold_s: float) -> str:
    """One connection that sends ``start`` then 20 ms media frames for ``hold_s``: how it ended
    (``http_403``, ``http_503``, ``closed_1013``, ``held``, ...)."""
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    try:
        ws = await connect(url, additional_headers=headers, compression=None, ping_interval=None, open_timeout=30)
    except InvalidStatus as exc:
        return f"http_{exc.response.status_code}"
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__
    try:
        await ws.send(_start_frame(call_sid, params))
        end = time.monotonic() + hold_s
        while time.monotonic() < end:
            await ws.send(MEDIA_FRAME)
            await asyncio.sleep(0.02)
        await ws.close()
        return "held"
    except ConnectionClosed as exc:
        return f"closed_{exc.rcvd.code if exc.rcvd else 1006}"


def _calls_peak(log: list[tuple[float, str, dict[str, Any]]], t0: float) -> int:
    """The most calls at once, from phone.call.started / ended and every phone.status after ``t0``."""
    now = peak = 0
    for at, topic, body in log:
        if at < t0:
            continue
        if topic == "phone.call.started":
            now += 1
        elif topic == "phone.call.ended":
            now -= 1
        elif topic == "phone.status":
            peak = max(peak, len(body.get("calls") or []))
        peak = max(peak, now)
    return peak


def phone_port(tmp: Path, connections: int = 200, max_calls: int = 5, junk_frames: int = 1000,
               junk_rate_hz: float = 150.0, flood_frames: int = 5000) -> dict[str, Any]:
    """The phone port probe (issue 23; bench/README.md, "faults", ``phone_port``): ``connections``
    sockets that each send ``start``, unauthenticated (no signature, a wrong one, and in token mode
    no or a wrong token) and then with Twilio's signature against ``phone.max_calls``; junk frames
    on one call (log bytes per 1,000), a flood past the message rate, a socket that never starts."""
    import asyncio
    import secrets

    from engine.phone.guard import SIGNATURE_HEADER, twilio_signature
    token = secrets.token_hex(16)
    out: dict[str, Any] = {"connections": connections, "max_calls": max_calls}
    eng = PhoneEngine(tmp / "twilio", f"max_calls: {max_calls}, auth: twilio", {"TWILIO_AUTH_TOKEN": token})
    try:
        signed = {SIGNATURE_HEADER: twilio_signature(token, eng.url)}
        wrong = {SIGNATURE_HEADER: twilio_signature("not-" + token, eng.url)}

        async def many(headers: Any, prefix: str, hold_s: float) -> list[str]:
            return await asyncio.gather(*(_caller(eng.url, f"{prefix}{i}", headers(i), None, hold_s)
                                          for i in range(connections)))
        t0 = time.monotonic()
        ends = asyncio.run(many(lambda i: {} if i % 2 else wrong, "CAstranger", 1.0))
        time.sleep(1.0)
        out["twilio_unauthenticated"] = {
            "sessions_opened": len({b.get("phone_call_id") for b in eng.since(t0, "phone.call.started")}
                                   | {b.get("phone_call_id") for b in eng.since(t0, "session.config")}),
            "outcomes": dict(sorted(Counter(ends).items()))}
        t1 = time.monotonic()
        ends = asyncio.run(many(lambda i: signed, "CAcaller", 2.0))
        time.sleep(1.5)
        status = (eng.since(t1, "phone.status") or [{}])[-1]
        out["twilio_signed"] = {"calls_peak": _calls_peak(list(eng.log), t1), "outcomes": dict(sorted(Counter(ends).items())),
                                "refused": status.get("refused"), "calls_started": len(eng.since(t1, "phone.call.started"))}

        async def junk_call() -> dict[str, Any]:
            from websockets.asyncio.client import connect
            from websockets.exceptions import ConnectionClosed
            ws = await connect(eng.url, additional_headers=signed, compression=None, ping_interval=None)
            await ws.send(_start_frame("CAjunk"))
            window_s = junk_frames / junk_rate_hz

            async def media(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    await ws.send(MEDIA_FRAME)
                    await asyncio.sleep(0.02)
            await media(2.0)                         # the call's start is logged before the windows
            b0, o0 = eng.log_bytes(), eng.event_log_offset()
            await media(window_s + 1.2)              # the baseline: the same call, as long, no junk
            b1, o1, p1 = eng.log_bytes(), eng.event_log_offset(), eng.out_path.stat().st_size
            tj = time.monotonic()
            for i in range(junk_frames):            # under the message rate: every frame is read
                await ws.send("{junk" if i % 2 else json.dumps({"event": "wobble", "n": i}))
                await asyncio.sleep(1 / junk_rate_hz)
            await asyncio.sleep(1.2)                # the last second's count goes out
            b2 = eng.log_bytes()
            junk_s = time.monotonic() - tj
            reports = [b for b in eng.since(tj, "engine.error") if b.get("phone_call_id") == "CAjunk"]
            await ws.close()
            errors_logged = eng.event_log_bytes(o1, lambda topic, body: topic == "engine.error"
                                                and body.get("phone_call_id") == "CAjunk")
            printed = eng.out_path.stat().st_size
            # a flood as the probe sent it (5,000 at once): the message rate closes it
            tf = time.monotonic()
            flood = await connect(eng.url, additional_headers=signed, compression=None, ping_interval=None)
            await flood.send(_start_frame("CAflood"))
            sent = 0

            async def drain() -> None:
                async for _ in flood:
                    pass
            try:
                for _ in range(flood_frames):
                    await flood.send("{junk")
                    sent += 1
                await asyncio.wait_for(drain(), 10)
            except (ConnectionClosed, TimeoutError):
                pass
            await flood.close()
            await asyncio.sleep(1.0)
            ended = [b for b in eng.since(tf, "phone.call.ended") if b.get("phone_call_id") == "CAflood"]
            return {"junk_frames": junk_frames, "junk_rate_hz": junk_rate_hz, "junk_s": round(junk_s, 1),
                    # the junk's engine.error lines in the event log, and all the engine printed meanwhile
                    "junk_log_bytes_per_1000_frames": round((errors_logged + printed - p1) * 1000 / junk_frames),
                    "junk_window_log_bytes": b2 - b1, "baseline_window_log_bytes": b1 - b0,
                    "baseline_engine_errors_logged_bytes": eng.event_log_bytes(o0, lambda t, b: t == "engine.error",
                                                                               until=o1),
                    "junk_error_reports": len(reports), "junk_errors_counted": sum(r.get("count", 1) for r in reports),
                    "junk_report_example": reports[0].get("message") if reports else None,
                    "flood_frames_sent": sent, "flood_close_code": flood.close_code,
                    "flood_close_reason": flood.close_reason,
                    "flood_end_reason": ended[0].get("reason") if ended else None,
                    "flood_frames_read_before_close": ended[0].get("phone_errors") if ended else None}
        out["junk"] = asyncio.run(junk_call())

        async def silent() -> dict[str, Any]:
            from websockets.asyncio.client import connect
            from websockets.exceptions import ConnectionClosed
            ws = await connect(eng.url, additional_headers=signed, compression=None, ping_interval=None)
            t = time.monotonic()

            async def drain() -> None:
                async for _ in ws:
                    pass
            try:
                await asyncio.wait_for(drain(), 30)
            except ConnectionClosed:
                pass
            except TimeoutError:                     # still open after 30 s: never closed
                await ws.close()
                return {"closed_after_s": None, "close_code": None, "close_reason": "still open after 30 s"}
            return {"closed_after_s": round(time.monotonic() - t, 2), "close_code": ws.close_code,
                    "close_reason": ws.close_reason}
        out["socket_without_start"] = asyncio.run(silent())
        out["engine_tracebacks"] = eng.out_path.read_text().count("Traceback")
    finally:
        eng.stop()
    tok = PhoneEngine(tmp / "token", f"max_calls: {max_calls}, auth: token", {"REALTALK_PHONE_TOKEN": token})
    try:
        t0 = time.monotonic()

        async def strangers() -> list[str]:
            return await asyncio.gather(*(_caller(tok.url, f"CAstranger{i}", {}, {} if i % 2 else {"token": "x"}, 1.0)
                                          for i in range(connections)))
        ends = asyncio.run(strangers())
        time.sleep(1.0)
        out["token_unauthenticated"] = {
            "sessions_opened": len({b.get("phone_call_id") for b in tok.since(t0, "phone.call.started")}
                                   | {b.get("phone_call_id") for b in tok.since(t0, "session.config")}),
            "outcomes": dict(sorted(Counter(ends).items()))}
    finally:
        tok.stop()
    out["summary"] = {
        "sessions_opened_unauthenticated": out["twilio_unauthenticated"]["sessions_opened"]
        + out["token_unauthenticated"]["sessions_opened"],
        "calls_peak_signed": out["twilio_signed"]["calls_peak"], "max_calls": max_calls,
        "junk_log_bytes_per_1000_frames": out["junk"]["junk_log_bytes_per_1000_frames"]}
    return out


def _plain(value: Any) -> Any:
    """JSON-safe: string keys, bytes as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one scenario; an exception becomes a figure, and the rest of the run goes on."""
    t0 = time.monotonic()
    try:
        out = fn(*args)
    except Exception as exc:  # noqa: BLE001 - the bench reports what failed and finishes
        out = {"error": f"{type(exc).__name__}: {exc}"}
    out["scenario_s"] = round(time.monotonic() - t0, 1)
    out = _plain(out)
    print(f"faults: {fn.__name__}{args[1:]}: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def run(soak_minutes: float = 30.0, fuzz_count: int = 10_000) -> dict[str, Any]:
    from bench.common import vaudio, vaudio_env
    vaudio_env()
    vaudio("echo-off")
    tmp = Path(tempfile.mkdtemp(prefix="rtfaults"))
    result: dict[str, Any] = {}
    result["kill"] = {name: _guarded(kill_child, tmp / f"kill-{name}", name)
                      for name in ("capture", "realtime", "playback", "broker", "server")}
    result["commands_across_realtime_crash"] = _guarded(commands_across_realtime_crash, tmp / "commands")
    result["socket_drop"] = {str(code): _guarded(socket_drop, tmp / f"drop-{code}", code) for code in (1006, 1011, 1001)}
    result["fuzz"] = _guarded(fuzz, tmp / "fuzz", fuzz_count)
    result["slow_subscriber"] = _guarded(slow_subscriber, tmp / "slow")
    result["foreign_subscriber"] = _guarded(foreign_subscriber, tmp / "foreign")
    result["soak"] = _guarded(soak, tmp / "soak", soak_minutes)
    result["playback_stalls"] = _guarded(playback_stalls, tmp / "stalls")
    result["phone_port"] = _guarded(phone_port, tmp / "phone-port")
    kills = result["kill"].values()
    result["summary"] = {
        "kills_recovered": sum(1 for k in kills if k.get("recovered")),
        "kill_recovery_ms_max": max((k.get("recovery_ms") or 0 for k in kills), default=None),
        "kill_messages_lost": sum(k.get("messages_lost", 0) for k in kills),
        "kill_waiters_hanging": sum(k.get("waiters_hanging", 0) for k in kills),
        "commands_lost_across_realtime_crash": result["commands_across_realtime_crash"].get("commands_lost"),
        "drop_reconnect_ms_max": max((d.get("reconnect_ms") or 0 for d in result["socket_drop"].values()), default=None),
        "drop_messages_lost": sum(d.get("messages_lost", 0) for d in result["socket_drop"].values()),
        "fuzz_replays_taken": result["fuzz"].get("replays_taken_by_supervisor"),
        "foreign_subscriber_unaccounted": result["foreign_subscriber"].get("unaccounted"),
        "soak_max_rss_growth_mb": result["soak"].get("max_rss_growth_mb"),
        "soak_fds_flat": result["soak"].get("fds_flat"),
        "stall_false_bargeins_by_ms": result["playback_stalls"].get("false_bargeins_by_stall_ms"),
        **{f"phone_port_{k}": v for k, v in (result["phone_port"].get("summary") or {}).items()},
    }
    return result

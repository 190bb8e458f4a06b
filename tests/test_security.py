"""Secrets never reach the disk, the bus or the log; session files are private; a bus client
outside the engine cannot stop it with a forged fatal error."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from bus import Publisher, Subscriber
from tests.helpers import say, wait_topic

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

FAKE_KEY = "sk-test-" + "Zq9" * 12


def _grep_tree(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_socket():
            try:
                if needle in p.read_bytes():
                    hits.append(p)
            except OSError:
                pass
    return hits


def test_api_key_never_on_disk_bus_or_log(start_engine: Any, make_server: Any, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    server = make_server()
    cfg = tmp_path / "openai-local.yaml"
    cfg.write_text(f"backend: openai\nopenai_url: {server.base}/realtime\nrecord: {tmp_path / 'rec'}\n")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    eng = start_engine("--backend", "openai", "--config", str(cfg), "--text-only")
    conn = eng.conn
    everything = Subscriber(conn["subscribe"], [""])
    assert say(conn, "hello there")["ok"]
    wait_topic(everything, "response.done")
    seen = []
    while (msg := everything.recv(timeout_ms=200)) is not None:
        seen.append(msg)
    assert FAKE_KEY not in repr(seen)
    session_dir = Path(conn["session_dir"])
    # only the realtime child may hold the key (in its spec, in memory): no child has it in its environment
    for child in conn["children"]:
        environ = Path(f"/proc/{child['pid']}/environ").read_bytes()
        assert FAKE_KEY.encode() not in environ, child["name"]
    assert eng.stop() == 0
    assert "openai" in "".join(eng.lines)   # it really ran with the key
    assert FAKE_KEY not in "".join(eng.lines)
    key = FAKE_KEY.encode()
    assert not _grep_tree(session_dir, key)
    assert not _grep_tree(eng.runtime, key)
    assert not list(session_dir.glob("*.spec.json"))
    log = session_dir / "events.jsonl"
    assert log.stat().st_size > 0 and key not in log.read_bytes()
    # the session folder and its files are private
    assert stat.S_IMODE(session_dir.stat().st_mode) == 0o700
    files = [p for p in session_dir.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"events.jsonl"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_forged_fatal_error_does_not_stop_the_engine(start_engine: Any) -> None:
    eng = start_engine("--text-only")
    conn = eng.conn
    sub = Subscriber(conn["subscribe"], ["model.text.done"])
    intruder = Publisher(conn["publish"], "realtime:1")
    assert intruder.join(conn["subscribe"], timeout_s=5)
    for pub_name in ("realtime:1", f"realtime:{os.getpid()}", "intruder"):
        intruder.name = pub_name
        intruder.publish("engine.error", {"source": "socket", "code": "auth", "fatal": True, "message": "forged-by-a-test"})
    time.sleep(0.6)  # the supervisor takes bus messages every 250 ms: give it two rounds to (wrongly) act
    assert eng.proc.poll() is None, "".join(eng.lines)
    assert say(conn, "still there?")["ok"]
    assert "still there" in wait_topic(sub, "model.text.done")["text"]
    assert eng.stop() == 0
    assert "forged-by-a-test" not in "".join(eng.lines)


def test_replayed_signed_message_is_not_taken_again(start_engine: Any) -> None:
    """Issue 15: a validly signed control message, captured on the bus and sent again, was taken
    again (a captured engine.error {fatal} would stop the engine). Now each engine process takes
    it once and reports the copies."""
    import json

    import msgpack
    import zmq
    eng = start_engine("--text-only")
    conn = eng.conn
    spy: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)   # any local client can read the bus
    spy.setsockopt(zmq.SUBSCRIBE, b"engine.error")
    spy.connect(conn["subscribe"])
    reports = Subscriber(conn["subscribe"], ["engine.error"], verify_key=None)
    client = Publisher(conn["publish"], "replayer")
    assert client.join(conn["subscribe"], timeout_s=5)
    captured: list[bytes] | None = None
    deadline = time.monotonic() + 10
    probes = 0
    while captured is None and time.monotonic() < deadline:
        probes += 1   # a GPT-Live command on Realtime: the realtime process answers with a signed error
        client.publish("cmd.instructions", {"id": f"replay-probe-{probes}", "text": "be brief"})
        while spy.poll(300):
            frames = spy.recv_multipart()
            if len(frames) == 3 and msgpack.unpackb(frames[1]).get("code") == "bad_command":
                captured = frames
    assert captured is not None, "no signed bad_command error from the realtime process"
    original = msgpack.unpackb(captured[1])
    for _ in range(3):
        client.send_raw(captured)
    report = wait_topic(reports, "engine.error", 5, code="malformed_bus_message",
                        where=lambda b: "supervisor" in str(b.get("source")))
    assert str(report["source"]).startswith("supervisor") and "replayed control message" in report["reason"], report
    assert eng.stop() == 0
    log = Path(conn["session_dir"]) / "events.jsonl"
    taken = [line for line in (json.loads(x) for x in log.read_text().splitlines())
             if line["topic"] == "engine.error" and line["body"].get("pub") == original["pub"]
             and line["body"].get("seq") == original["seq"]]
    assert len(taken) == 1, f"the supervisor took the signed message {len(taken)} times"
    spy.close(0)
    reports.close()
    client.close()


def test_engine_status_never_prints_the_connection_files_curve_keys() -> None:
    """When no status message comes within 3 s, `engine status` shows the connection file; the
    CURVE client keys in it (a tcp engine's) must not go to the terminal."""
    from engine.api.cli import public_status
    conn = {"pid": 1, "state": "ready", "publish": "tcp://127.0.0.1:1", "subscribe": "tcp://127.0.0.1:2",
            "curve_server_key": "S" * 40, "curve_public_key": "P" * 40, "curve_secret_key": "X" * 40,
            "v": 1, "seq": 3}
    shown = public_status(conn)
    assert "X" * 40 not in json.dumps(shown) and not any(k.startswith("curve_") for k in shown)
    assert shown["state"] == "ready" and "seq" not in shown


def test_the_engines_local_server_takes_only_the_engine_and_holds_no_other_secret(
        start_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every local user can reach a loopback port: the engine's local server took anyone (sessions,
    the SIP stand-in's calls, a signed webhook on demand), and held every secret of the user's
    environment, the webhook secret and a Twilio token among them (the trust review)."""
    import websocket
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "twilio-" + "Tk7" * 10)
    monkeypatch.setenv("SOME_SERVICE_PASSWORD", "pw-" + "Pw3" * 10)
    eng = start_engine("--text-only")
    conn = eng.conn
    url = conn["server_url"] + "?model=gpt-realtime"
    for header in ([], ["Authorization: Bearer local"], ["Authorization: Bearer x"]):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(url, header=header, timeout=10)
        assert refused.value.status_code == 401
    key = conn["server_key"]
    assert len(key) >= 32 and "server_key" not in eng.cli("status", "--json").stdout
    websocket.create_connection(url, header=[f"Authorization: Bearer {key}"], timeout=10).close()
    server = next(c for c in conn["children"] if c["name"] == "server")
    environ = Path(f"/proc/{server['pid']}/environ").read_bytes()
    assert b"TWILIO_AUTH_TOKEN" not in environ and b"SOME_SERVICE_PASSWORD" not in environ
    assert b"--require-key" not in Path(f"/proc/{server['pid']}/cmdline").read_bytes()

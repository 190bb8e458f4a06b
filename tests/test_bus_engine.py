"""The bus's access control in a running engine: signed control topics, CURVE on tcp."""
from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from bus import Publisher, Subscriber, encode
from tests.helpers import say, wait_topic

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def _child_pid(conn: dict[str, Any], name: str) -> int:
    return next(c["pid"] for c in conn["children"] if c["name"] == name)


def test_forged_fatal_error_in_a_childs_name_does_not_stop_the_engine(start_engine: Any) -> None:
    """Issue 15 point 2: a client naming the real realtime child (pid and all) could stop the engine."""
    eng = start_engine("--text-only")
    conn = eng.conn
    sub = Subscriber(conn["subscribe"], ["model.text.done"])
    intruder = Publisher(conn["publish"], f"realtime:{_child_pid(conn, 'realtime')}", signing_key=None)
    assert intruder.join(conn["subscribe"], timeout_s=5)
    for seq in range(1, 4):  # a made-up signature frame does not help either
        frames = encode("engine.error", {"source": "realtime", "code": "auth", "fatal": True,
                                         "message": "forged-by-a-test"}, intruder.name, 10_000 + seq)
        intruder.send_raw(frames + [b"0" * 64])
        intruder.publish("engine.error", {"source": "realtime", "fatal": True, "message": "forged-by-a-test"})
    assert say(conn, "still there?")["ok"]  # the supervisor's loop has run since
    assert "still there" in wait_topic(sub, "model.text.done")["text"]
    assert eng.proc.poll() is None, "".join(eng.lines)
    assert eng.stop() == 0
    assert "forged-by-a-test" not in "".join(eng.lines)


def test_tcp_bus_needs_the_connection_files_keys(start_engine: Any, tmp_path: Path) -> None:
    config = tmp_path / "tcp.yaml"
    config.write_text("bus:\n  transport: tcp\n")
    eng = start_engine("--text-only", "--config", str(config))
    conn = eng.conn
    assert conn["publish"].startswith("tcp://") and conn["curve_server_key"] and conn["curve_secret_key"]
    assert stat.S_IMODE((eng.runtime / "engine.json").stat().st_mode) == 0o600
    # plain ZeroMQ without the keys: nothing comes (engine.status is published every second) ...
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    plain_sub = ctx.socket(zmq.SUB)
    plain_sub.setsockopt(zmq.SUBSCRIBE, b"")
    plain_sub.connect(conn["subscribe"])
    # ... and nothing goes: a cmd.say from a plain PUB is never acked
    plain_pub = ctx.socket(zmq.PUB)
    plain_pub.connect(conn["publish"])
    acks = Subscriber(conn["subscribe"], ["cmd.ack", "model.text.done"])  # keys from the connection file
    for _ in range(10):
        plain_pub.send_multipart([b"cmd.say", msgpack.packb({"v": 1, "ts": 0.0, "mono_ns": 0, "pub": "plain",
                                                              "seq": 1, "text": "plain", "id": "plain-1"})])
        time.sleep(0.1)   # a second of tries: nothing must come of them, and no event says so
    assert plain_sub.poll(1500) == 0
    assert all(m is None or m[1].get("id") != "plain-1" for m in (acks.recv(timeout_ms=100) for _ in range(5)))
    # the engine's own CLI and the Python client go through with the keys
    assert say(conn, "over curve?")["ok"]
    assert "over curve" in wait_topic(acks, "model.text.done")["text"]
    out = eng.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    for s in (plain_sub, plain_pub):
        s.close(0)
    assert eng.stop() == 0


def test_supervisor_publishes_the_drops_it_sees(start_engine: Any) -> None:
    """Gaps in a publisher's seq at the supervisor (which takes every topic) come out as bus.dropped."""
    eng = start_engine("--text-only")
    conn = eng.conn
    sub = Subscriber(conn["subscribe"], ["bus.dropped"])
    gappy = Publisher(conn["publish"], "gappy-tool", signing_key=None)
    assert gappy.join(conn["subscribe"], timeout_s=5)
    gappy.publish("tool.note", {"n": 1})       # seq 1
    gappy.seq += 3                               # as if 2, 3 and 4 were lost on the way
    gappy.publish("tool.note", {"n": 5})       # seq 5
    body = wait_topic(sub, "bus.dropped")
    assert body["publisher"] == "gappy-tool" and body["count"] == 3 and body["subscriber"].startswith("supervisor:")
    assert eng.stop() == 0


def test_one_malformed_message_is_reported_once(start_engine: Any) -> None:
    """Issue 23 point 7: a malformed cmd.* message was reported twice, by the supervisor (which takes
    every topic) and by the realtime process (which takes cmd.*)."""
    eng = start_engine("--text-only")
    conn = eng.conn
    own = {str(c["pid"]) for c in conn["children"]} | {str(eng.proc.pid)}
    sub = Subscriber(conn["subscribe"], ["engine.error"])
    bad = Publisher(conn["publish"], "fuzz", signing_key=None)
    assert bad.join(conn["subscribe"], timeout_s=5)   # the broker forwards our messages from here on
    bad.send_raw([b"cmd.say", b"\xc1 not msgpack"])
    reports = []
    deadline = time.monotonic() + 3.0                  # reports go out at most once a second
    while time.monotonic() < deadline:
        msg = sub.recv(timeout_ms=100)
        if msg and msg[1].get("code") == "malformed_bus_message" and msg[1]["pub"].rpartition(":")[2] in own:
            reports.append(msg[1])
    assert [(r["count"], r["total"]) for r in reports] == [(1, 1)], reports
    assert "not msgpack" in reports[0]["message"]
    assert eng.stop() == 0

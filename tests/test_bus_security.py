"""Bus access control: signed control topics, CURVE on tcp, keys in the connection file."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest
import zmq

from bus import Endpoints, Publisher, Subscriber, decode, encode
from bus.broker import run_broker
from bus.client import endpoints_from, load_endpoints
from bus.security import (ENV_KEYS, FORGED_REASON, REPLAY_WINDOW_NS, REPLAYED_REASON, BusKeys, ReplayGuard, Verdict,
                          generate_keys, sign, verify)
from engine.supervisor.rundir import free_port
from tests.helpers import Broker, subscribed, wait_topic

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def keys() -> BusKeys:
    return generate_keys()


@pytest.fixture
def ipc_broker(tmp_path: Path, keys: BusKeys) -> Iterator[Broker]:
    b = Broker(f"ipc://{tmp_path}/p.sock", f"ipc://{tmp_path}/s.sock", signing_key=keys.signing_key)
    yield b
    b.stop()


@pytest.fixture
def tcp_broker(keys: BusKeys) -> Iterator[Broker]:
    b = Broker(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}",
               curve_server=(keys.server_public, keys.server_secret), curve_clients=[keys.client_public],
               signing_key=keys.signing_key)
    yield b
    b.stop()


# ------------------------------------------------------------------ signatures (pure)
def test_signature_covers_topic_and_body(keys: BusKeys) -> None:
    topic, body = encode("engine.error", {"fatal": True}, "x", 1)
    sig = sign(keys.signing_key, topic, body)
    assert len(sig) == 64 and verify(keys.signing_key, topic, body, sig)
    assert not verify(keys.signing_key, b"engine.errors", body, sig)
    assert not verify(keys.signing_key, topic, body + b"\x00", sig)
    assert not verify(generate_keys().signing_key, topic, body, sig)
    assert not verify(keys.signing_key, topic, body, None)
    # bytes cannot move between topic and body under one signature
    assert not verify(keys.signing_key, topic + body[:1], body[1:], sig)


def test_decode_accepts_a_signature_frame_and_rejects_four_frames(keys: BusKeys) -> None:
    frames = encode("engine.status", {"state": "ready"}, "x", 1)
    assert decode(frames + [sign(keys.signing_key, *frames)])[1]["state"] == "ready"
    with pytest.raises(Exception, match="3 with a signature"):
        decode(frames + [b"a", b"b"])


# ------------------------------------------------------------------ forged control messages
def test_forged_fatal_error_is_dropped_and_reported(ipc_broker: Broker, keys: BusKeys) -> None:
    """Issue 15 point 2: any bus client could stop the engine with a forged engine.error."""
    sub = Subscriber(ipc_broker.sub_ep, ["engine.", "model."], verify_key=keys.signing_key)
    forger = Publisher(ipc_broker.pub_ep, "supervisor:1", signing_key=None)  # a client without the key
    engine = Publisher(ipc_broker.pub_ep, "realtime:2", signing_key=keys.signing_key)
    assert forger.join(ipc_broker.sub_ep) and engine.join(ipc_broker.sub_ep)
    forger.publish("engine.error", {"source": "realtime", "fatal": True, "message": "forged"})
    forger.publish("model.text.delta", {"text": "anyone may publish this"})
    engine.publish("engine.error", {"source": "realtime", "fatal": True, "message": "real"})
    got = [msg for msg in (sub.recv(timeout_ms=2000) for _ in range(2)) if msg is not None]
    assert sorted((t, b.get("message", b.get("text"))) for t, b in got) == [  # two publishers: any order
        ("engine.error", "real"), ("model.text.delta", "anyone may publish this")]
    assert sub.malformed == 1 and FORGED_REASON in str(sub.last_error)
    # a badly signed copy (signed with another key) is dropped too
    frames = encode("engine.error", {"fatal": True}, "realtime:2", 99)
    forger.send_raw(frames + [sign(generate_keys().signing_key, *frames)])
    engine.publish("engine.status", {"state": "ok"})
    assert wait_topic(sub, "engine.status", 3)["state"] == "ok"
    deadline = time.monotonic() + 3   # two publishers: the forged copy may come after the status (CI once)
    while sub.malformed < 2 and time.monotonic() < deadline:
        sub.recv(timeout_ms=50)
    assert sub.malformed == 2
    for s in (sub, forger, engine):
        s.close()


def test_readers_without_the_key_still_read_signed_messages(ipc_broker: Broker, keys: BusKeys) -> None:
    sub = Subscriber(ipc_broker.sub_ep, ["engine."], verify_key=None)
    raw: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    raw.setsockopt(zmq.SUBSCRIBE, b"engine.")
    raw.connect(ipc_broker.sub_ep)
    engine = Publisher(ipc_broker.pub_ep, "supervisor:1", signing_key=keys.signing_key)
    assert engine.join(ipc_broker.sub_ep)
    engine.publish("engine.status", {"state": "ready"})
    assert wait_topic(sub, "engine.status", 3)["state"] == "ready"
    assert raw.poll(2000)
    frames = raw.recv_multipart()
    assert len(frames) == 3 and msgpack.unpackb(frames[1])["state"] == "ready"  # frames 0 and 1 as before
    raw.close(0)
    sub.close()
    engine.close()


def test_late_verifying_subscriber_gets_the_signed_state(ipc_broker: Broker, keys: BusKeys) -> None:
    """The last-value cache replays the message with its signature."""
    engine = Publisher(ipc_broker.pub_ep, "supervisor:1", signing_key=keys.signing_key)
    early = Subscriber(ipc_broker.sub_ep, ["engine.status"], verify_key=keys.signing_key)
    assert wait_topic(early, "engine.status", 3, send=lambda: engine.publish("engine.status", {"state": "ready"}))
    late = Subscriber(ipc_broker.sub_ep, ["engine.status"], verify_key=keys.signing_key)
    assert wait_topic(late, "engine.status", 3)["state"] == "ready" and late.malformed == 0
    for s in (early, late, engine):
        s.close()


def test_broker_signs_presence_gone(ipc_broker: Broker, keys: BusKeys) -> None:
    watcher = Subscriber(ipc_broker.sub_ep, ["engine.presence.gone"], verify_key=keys.signing_key)
    probe = Publisher(ipc_broker.pub_ep, "probe", signing_key=None)
    assert probe.join(ipc_broker.sub_ep)
    client = Subscriber(ipc_broker.sub_ep, ["_presence.tool-7"])
    subscribed(client, probe)   # the broker holds the presence subscription: now it can go
    client.close()
    body = wait_topic(watcher, "engine.presence.gone", 3)
    assert body is not None and body["owner"] == "tool-7" and watcher.malformed == 0
    watcher.close()
    probe.close()


def test_publisher_and_subscriber_take_keys_from_the_environment(ipc_broker: Broker, keys: BusKeys,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_KEYS, keys.environment()[ENV_KEYS])
    engine = Publisher(ipc_broker.pub_ep, "playback:3")
    sub = Subscriber(ipc_broker.sub_ep, ["playback."])
    assert engine.signs
    outsider = Publisher(ipc_broker.pub_ep, "tool", signing_key=None)
    assert engine.join(ipc_broker.sub_ep) and outsider.join(ipc_broker.sub_ep)
    outsider.publish("playback.started", {"item_id": "forged"})
    engine.publish("playback.started", {"item_id": "real"})
    assert wait_topic(sub, "playback.started", 3)["item_id"] == "real" and sub.malformed == 1
    for s in (sub, engine, outsider):
        s.close()


# ------------------------------------------------------------------ CURVE on tcp
def test_tcp_needs_the_engine_keys(tcp_broker: Broker, keys: BusKeys) -> None:
    eps = Endpoints(tcp_broker.pub_ep, tcp_broker.sub_ep, curve=keys.client(), signing_key=keys.signing_key)
    sub = Subscriber(eps, ["x."])
    pub = Publisher(eps, "engine")
    assert pub.join(timeout_s=5)
    # plain ZeroMQ, no keys: the handshake fails, so nothing comes and nothing goes
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    plain_sub = ctx.socket(zmq.SUB)
    plain_sub.setsockopt(zmq.SUBSCRIBE, b"")
    plain_sub.connect(tcp_broker.sub_ep)
    plain_pub = ctx.socket(zmq.PUB)
    plain_pub.connect(tcp_broker.pub_ep)
    # CURVE with a key pair the broker does not know
    stranger = generate_keys()
    wrong = Subscriber(Endpoints(tcp_broker.pub_ep, tcp_broker.sub_ep,
                                 curve=stranger.client().__class__(keys.server_public, stranger.client_public,
                                                                   stranger.client_secret)), [""])
    for i in range(30):
        plain_pub.send_multipart([b"x.plain", msgpack.packb({"i": i})])
        pub.publish("x.engine", {"i": i})
        time.sleep(0.02)   # 0.6 s of tries: the plain ones must never come, and no event says so
    got = []
    while (msg := sub.recv(timeout_ms=200)) is not None:
        got.append(msg[0])
    assert "x.engine" in got and "x.plain" not in got
    assert plain_sub.poll(300) == 0
    assert wrong.recv(timeout_ms=300) is None
    for raw_sock in (plain_sub, plain_pub):
        raw_sock.close(0)
    for client in (sub, pub, wrong):
        client.close()


def test_broker_refuses_curve_without_client_keys(keys: BusKeys) -> None:
    with pytest.raises(ValueError, match="curve_clients"):
        run_broker("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", curve_server=(keys.server_public, keys.server_secret),
                   context=zmq.Context())


# ------------------------------------------------------------------ keys and files
def test_connection_keys_and_environment_hold_no_more_than_each_needs(keys: BusKeys, tmp_path: Path) -> None:
    conn = keys.connection_keys()
    assert set(conn) == {"curve_server_key", "curve_public_key", "curve_secret_key"}
    assert keys.signing_key.hex() not in json.dumps(conn) and keys.server_secret.decode() not in json.dumps(conn)
    child = json.loads(keys.environment()[ENV_KEYS])
    assert child["signing_key"] == keys.signing_key.hex() and "curve_server_secret" not in child
    assert json.loads(keys.environment(broker=True)[ENV_KEYS])["curve_server_secret"] == keys.server_secret.decode()
    file = tmp_path / "engine.json"
    file.write_text(json.dumps({"publish": "tcp://127.0.0.1:1", "subscribe": "tcp://127.0.0.1:2", **conn}))
    file.chmod(0o600)   # a connection file is believed only when it is the user's own and private
    eps = load_endpoints(file)
    assert eps.curve == keys.client() and eps.signing_key is None
    spec = endpoints_from({"publish": "ipc:///a", "subscribe": "ipc:///b", "signing_key": keys.signing_key.hex()})
    assert spec.signing_key == keys.signing_key and spec.curve is None
    with pytest.raises(Exception, match="curve_secret_key"):
        endpoints_from({"publish": "a", "subscribe": "b", "curve_server_key": "x", "curve_public_key": "y"})
    with pytest.raises(Exception, match="not hex"):
        endpoints_from({"publish": "a", "subscribe": "b", "signing_key": "zz"})


def test_use_keys_makes_a_child_spec_the_default(ipc_broker: Broker, keys: BusKeys) -> None:
    from bus import use_keys
    use_keys({"publish": ipc_broker.pub_ep, "subscribe": ipc_broker.sub_ep, "signing_key": keys.signing_key.hex()})
    try:
        pub = Publisher(ipc_broker.pub_ep, "capture:9")
        sub = Subscriber(ipc_broker.sub_ep, ["capture."])
    finally:
        use_keys(None)
    assert pub.signs and not Publisher(ipc_broker.pub_ep, "other").signs
    assert pub.join(ipc_broker.sub_ep)
    pub.publish("capture.echo", {"mode": "off"})
    assert wait_topic(sub, "capture.echo", 3)["mode"] == "off" and sub.malformed == 0
    sub.close()
    pub.close()


@pytest.mark.e2e
def test_node_client_reads_signed_messages_over_curve(tcp_broker: Broker, keys: BusKeys, tmp_path: Path,
                                                      node: str) -> None:
    """clients/node/realtalk.js takes the CURVE keys from the connection file and reads 3-frame messages."""
    import subprocess
    from tests.helpers import REPO
    conn = tmp_path / "engine.json"
    conn.write_text(json.dumps({"publish": tcp_broker.pub_ep, "subscribe": tcp_broker.sub_ep,
                                **keys.connection_keys()}))
    conn.chmod(0o600)   # the user's own private file: the client believes it
    script = """
const { Bus } = require(process.argv[1]);
const bus = new Bus({ name: "node-test", prefixes: ["engine.status", "x."], file: process.argv[2] });
const timer = setInterval(() => bus.publish("x.from-node", { n: 1 }), 50);
(async () => {
  for await (const { topic, body } of bus.messages()) {
    if (topic === "engine.status") { console.log(JSON.stringify({ topic, state: body.state, malformed: bus.malformed })); break; }
  }
  clearInterval(timer); bus.close();
})();
"""
    sub = Subscriber(Endpoints(tcp_broker.pub_ep, tcp_broker.sub_ep, curve=keys.client()), ["x.from-node"])
    proc = subprocess.Popen([node, "-e", script, str(REPO / "clients" / "node" / "realtalk.js"), str(conn)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sub.recv(timeout_ms=10_000) is not None  # Node's publisher got through CURVE
        engine = Publisher(Endpoints(tcp_broker.pub_ep, tcp_broker.sub_ep, curve=keys.client(),
                                     signing_key=keys.signing_key), "supervisor:1")
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            engine.publish("engine.status", {"state": "ready"})  # signed: three frames
            time.sleep(0.05)   # between tries, until the Node client prints it and exits
        out, _ = proc.communicate(timeout=5)
        assert json.loads(out.strip().splitlines()[-1]) == {"topic": "engine.status", "state": "ready", "malformed": 0}
        engine.close()
    finally:
        proc.kill()
        sub.close()


def test_plain_tcp_endpoint_strings_take_the_keys_of_the_connection_file(tcp_broker: Broker, keys: BusKeys,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``Subscriber(conn["subscribe"])``, as the CLI and the SDK write it, works over a CURVE tcp bus."""
    monkeypatch.setenv("REALTALK_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "engine.json").write_text(json.dumps({"publish": tcp_broker.pub_ep, "subscribe": tcp_broker.sub_ep,
                                                      **keys.connection_keys()}))
    (tmp_path / "engine.json").chmod(0o600)   # the user's own private file: believed
    sub = Subscriber(tcp_broker.sub_ep, ["x."])
    pub = Publisher(tcp_broker.pub_ep, "cli:1")
    assert pub.join(tcp_broker.sub_ep)
    pub.publish("x.hello", {})
    assert wait_topic(sub, "x.hello", 3) is not None
    sub.close()
    pub.close()


# ------------------------------------------------------------------ replay protection (issue 15)
def _until_malformed(sub: Subscriber, count: int, timeout_s: float = 3.0) -> list[tuple[str, dict[str, Any]]]:
    """Read ``sub`` until it has counted ``count`` malformed messages; what it returned meanwhile."""
    got = []
    deadline = time.monotonic() + timeout_s
    while sub.malformed < count and time.monotonic() < deadline:
        msg = sub.recv(timeout_ms=50)
        if msg is not None:
            got.append(msg)
    assert sub.malformed == count, f"counted {sub.malformed} malformed, expected {count}"
    return got


def test_replayed_signed_fatal_is_rejected_and_reported(ipc_broker: Broker, keys: BusKeys) -> None:
    """A captured, validly signed engine.error {fatal} sent again is dropped and reported; a fresh
    one from the same publisher is still taken."""
    sub = Subscriber(ipc_broker.sub_ep, ["engine.error"], verify_key=keys.signing_key)
    spy: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)   # any client can read the frames
    spy.setsockopt(zmq.SUBSCRIBE, b"engine.error")
    spy.connect(ipc_broker.sub_ep)
    engine = Publisher(ipc_broker.pub_ep, "realtime:2", signing_key=keys.signing_key)
    attacker = Publisher(ipc_broker.pub_ep, "attacker", signing_key=None)
    report = Publisher(ipc_broker.pub_ep, "supervisor:9", signing_key=keys.signing_key)
    assert engine.join(ipc_broker.sub_ep) and attacker.join(ipc_broker.sub_ep)
    engine.publish("engine.error", {"source": "socket", "fatal": True, "message": "first"})
    assert wait_topic(sub, "engine.error", 3)["message"] == "first"
    assert spy.poll(2000)
    captured = spy.recv_multipart()
    assert len(captured) == 3   # the signature frame came along
    for _ in range(3):
        attacker.send_raw(captured)
    assert _until_malformed(sub, 3) == []   # none of the copies is returned
    assert REPLAYED_REASON in str(sub.last_error) and "realtime:2" in str(sub.last_error)
    engine.publish("engine.error", {"source": "socket", "fatal": True, "message": "fresh"})
    assert wait_topic(sub, "engine.error", 3)["message"] == "fresh"
    # counted with the reason; a prefix subscriber leaves the report to the engine's subscriber of
    # every topic (the supervisor), which takes the same copies (test_bus_malformed.py)
    assert sub.publish_reports(report, "supervisor") == 0
    reported = sub.take_malformed_report()
    assert reported is not None and reported["count"] == 3
    assert REPLAYED_REASON in reported["reason"]
    spy.close(0)
    for s in (sub, engine, attacker, report):
        s.close()


def test_a_restarted_broker_state_replay_and_a_new_process_are_not_replays(ipc_broker: Broker, keys: BusKeys) -> None:
    """The broker's last-value replay to a late subscriber reaches an early one again: skipped,
    not reported. A publisher that restarts (a new pid: a new name) is taken from its first message."""
    engine = Publisher(ipc_broker.pub_ep, "supervisor:1", signing_key=keys.signing_key)
    early = Subscriber(ipc_broker.sub_ep, ["engine.status"], verify_key=keys.signing_key)
    assert wait_topic(early, "engine.status", 3, send=lambda: engine.publish("engine.status", {"state": "ready"}))
    while early.recv(timeout_ms=100) is not None:   # the probes' extra copies
        pass
    late = Subscriber(ipc_broker.sub_ep, ["engine.status"], verify_key=keys.signing_key)
    assert wait_topic(late, "engine.status", 3)["state"] == "ready"
    assert early.recv(timeout_ms=300) is None   # the copy the broker sent for `late`
    assert early.duplicates >= 1 and early.malformed == 0 and late.malformed == 0
    again = Publisher(ipc_broker.pub_ep, "supervisor:2", signing_key=keys.signing_key)  # the restarted process
    assert wait_topic(early, "engine.status", 3, send=lambda: again.publish("engine.status", {"state": "restarted"}))
    assert early.malformed == 0
    for s in (engine, again, early, late):
        s.close()


def test_replay_guard_rules() -> None:
    """The pure rules: later (mono_ns, seq) from the same publisher only; state topics per topic,
    their last copy again quietly; a first message from a publisher fresh unless it is state."""
    now = 100 * 10**9
    g = ReplayGuard()

    def body(pub: str, seq: int, mono_ns: int) -> dict[str, Any]:
        return {"pub": pub, "seq": seq, "mono_ns": mono_ns}
    assert g.check("engine.error", body("realtime:2", 5, now - 10**9), now) is Verdict.ACCEPT
    assert g.check("engine.error", body("realtime:2", 5, now - 10**9), now) is Verdict.REPLAYED
    assert g.check("playback.flushed", body("realtime:2", 4, now - 2 * 10**9), now) is Verdict.REPLAYED
    assert g.check("playback.flushed", body("realtime:2", 6, now - 10**8), now) is Verdict.ACCEPT
    # pid reused by a new process of the same name: its seq starts again, its clock does not
    assert g.check("engine.error", body("realtime:2", 1, now), now) is Verdict.ACCEPT
    assert g.check("engine.error", body("realtime:2", 7, now - 10**8), now) is Verdict.REPLAYED
    # a first message from a publisher: fresh, or a state topic (the broker's last value, any age)
    assert g.check("engine.error", body("capture:3", 9, now - REPLAY_WINDOW_NS - 1), now) is Verdict.STALE
    assert g.check("conversation.history", body("realtime:1", 40, now - 60 * 10**9), now) is Verdict.ACCEPT
    assert g.check("conversation.history", body("realtime:1", 40, now - 60 * 10**9), now) is Verdict.DUPLICATE
    assert g.check("conversation.history", body("realtime:1", 30, now - 70 * 10**9), now) is Verdict.REPLAYED
    # state topics are ordered per topic: the broker's replay of an older state after a newer other topic
    assert g.check("engine.status", body("realtime:1", 35, now - 65 * 10**9), now) is Verdict.ACCEPT
    assert g.check("engine.error", {"pub": "x", "seq": "1", "mono_ns": now}, now) is Verdict.NO_HEADER
    small = ReplayGuard(max_senders=2)
    for n in range(3):
        assert small.check("engine.error", body(f"p:{n}", 1, now), now) is Verdict.ACCEPT
    assert len(small._last) == 2   # bounded: the first seen is forgotten

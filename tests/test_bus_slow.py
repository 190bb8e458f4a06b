"""A slow subscriber: the broker's memory stays bounded and the drops are counted (seq gaps)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from bus import Publisher, Subscriber, encode
from bus.broker import TRIM_PERIOD_S
from tests.helpers import REPO, subscribed, wait_topic

pytestmark = pytest.mark.timeout(120)

FLOOD = 200_000
PAYLOAD = {"text": "x" * 950}     # the bench's message: about 1 kB
BROKER_GROWTH_BOUND_MB = 40       # the broker's peak RSS over its idle RSS, with one subscriber that never reads
GIVEN_BACK_MB = 10                # its RSS over idle once that subscriber has caught up


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def broker_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    pub_ep, sub_ep = f"ipc://{tmp_path}/p.sock", f"ipc://{tmp_path}/s.sock"
    env = {k: v for k, v in os.environ.items() if k != "REALTALK_BUS_KEYS"}
    proc = subprocess.Popen([sys.executable, "-m", "bus.broker", pub_ep, sub_ep], cwd=REPO, env=env)
    yield proc, pub_ep, sub_ep
    proc.terminate()
    proc.wait(10)


@pytest.mark.e2e
def test_slow_subscriber_bounds_broker_memory_and_counts_drops(
        broker_process: tuple[subprocess.Popen[bytes], str, str]) -> None:
    """Issue 15 point 16: broker memory grew to ~120 MB and the drops were counted nowhere."""
    proc, pub_ep, sub_ep = broker_process
    slow = Subscriber(sub_ep, [""], verify_key=None)
    pub = Publisher(pub_ep, "flood", signing_key=None)
    assert pub.join(sub_ep, timeout_s=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the slow subscriber itself is connected (its own slow joiner)
        pub.publish("x.ready", {})
        if (msg := slow.recv(timeout_ms=20)) is not None and msg[0] == "x.ready":
            break
    while slow.recv(timeout_ms=100) is not None:  # the other x.ready and join probes
        pass
    watcher = Subscriber(sub_ep, ["x.end"], verify_key=None)
    subscribed(watcher, pub)
    first_seq = pub.seq + 1
    idle_mb = _rss_mb(proc.pid)
    for _ in range(FLOOD):
        pub.publish("x.flood", PAYLOAD)
    # one publisher's messages keep their order: once its end mark is through, the broker has forwarded
    # (or dropped) the whole flood before it; seq 0 counts no drop. Sent until it comes: PUB drops at its HWM
    wait_topic(watcher, "x.end", 30, send=lambda: pub.send_raw(encode("x.end", {}, pub.name, 0)))
    watcher.close()
    peak_mb = _rss_mb(proc.pid, "VmHWM")
    assert peak_mb - idle_mb < BROKER_GROWTH_BOUND_MB, (idle_mb, peak_mb)
    # now read it all, then one more message closes the count
    received = 0
    while (msg := slow.recv(timeout_ms=500)) is not None:
        received += msg[0] == "x.flood"
    pub.publish("x.flood", PAYLOAD)
    last = slow.recv(timeout_ms=5000)
    assert last is not None and last[1]["seq"] == pub.seq
    received += 1
    assert received < FLOOD, "nothing was dropped: the subscriber was not slow enough for this test"
    lost = pub.seq - first_seq + 1 - received
    assert slow.dropped == {"flood": lost}
    assert slow.take_drop_report() == [{"publisher": "flood", "count": lost}]
    assert slow.take_drop_report() is None
    # and the broker gives the drained queue's memory back (glibc keeps it unless trimmed)
    deadline = time.monotonic() + 3 * TRIM_PERIOD_S
    while _rss_mb(proc.pid) - idle_mb > GIVEN_BACK_MB and time.monotonic() < deadline:
        time.sleep(0.25)  # polling /proc: no event says memory went back
    assert _rss_mb(proc.pid) - idle_mb <= GIVEN_BACK_MB, (idle_mb, peak_mb, _rss_mb(proc.pid))
    slow.close()
    pub.close()


def _body(pub: str, seq: int, mono_ns: int) -> dict:
    return {"pub": pub, "seq": seq, "mono_ns": mono_ns}


def test_gap_count_ignores_replays_and_follows_restarts() -> None:
    sub = Subscriber("inproc://nothing-here", [""], verify_key=None)
    t = sub._created_ns
    sub._count_gap(_body("supervisor:1", 50, t - 10))   # a last-value replay: sent before we subscribed
    sub._count_gap(_body("supervisor:1", 80, t + 1))    # the first live message starts the count
    sub._count_gap(_body("supervisor:1", 81, t + 2))
    sub._count_gap(_body("supervisor:1", 80, t + 1))    # the replay again (another subscriber joined)
    sub._count_gap(_body("supervisor:1", 85, t + 3))    # 82..84 lost
    sub._count_gap(_body("broker", 7, t + 4))
    sub._count_gap(_body("broker", 1, t + 5))           # the broker restarted: counts from 1 again
    sub._count_gap(_body("broker", 3, t + 6))           # 2 lost
    sub._count_gap(_body("x", 0, t + 7))                # join probes carry seq 0
    sub._count_gap({"pub": "y", "seq": "nonsense"})
    assert sub.dropped == {"supervisor:1": 3, "broker": 1}
    assert sub.take_drop_report(now=10.0) == [{"publisher": "supervisor:1", "count": 3},
                                             {"publisher": "broker", "count": 1}]
    sub._count_gap(_body("broker", 5, t + 8))
    assert sub.take_drop_report(now=10.5) is None       # once a second
    assert sub.take_drop_report(now=11.0) == [{"publisher": "broker", "count": 1}]
    sub.close()


def test_a_prefix_subscriber_counts_no_drops() -> None:
    """Its filter leaves out messages of the same publisher: a gap there is not a loss."""
    sub = Subscriber("inproc://nothing-here", ["model."], verify_key=None)
    assert not sub._count_gaps
    sub.close()


NODE_GAP_READER = r"""
const { Bus } = require(process.argv[1]);
(async () => {
  const bus = new Bus({ file: process.argv[2], name: "node-reader:1" });
  for await (const { topic } of bus.messages()) {
    if (topic === "t.warm") { console.log("warm"); }
    if (topic === "t.end") { console.log(JSON.stringify(bus.dropped)); break; }
  }
  await new Promise((r) => setTimeout(r, 1500));   // the second report is due a second after the first
  bus.close();
})();
"""


@pytest.mark.e2e
def test_node_client_counts_seq_gaps_and_publishes_them(broker_process: tuple[subprocess.Popen[bytes], str, str],
                                                        node: str, tmp_path: Path) -> None:
    """A foreign subscriber's losses are visible: the Node client counts the gaps in each
    publisher's seq and publishes them on bus.dropped, as the engine's own subscribers do."""
    import json

    _, pub_ep, sub_ep = broker_process
    conn = tmp_path / "engine.json"
    conn.write_text(json.dumps({"publish": pub_ep, "subscribe": sub_ep}))
    conn.chmod(0o600)   # the user's own private file: the client believes it
    watcher = Subscriber(sub_ep, ["bus.dropped"], verify_key=None)
    pub = Publisher(pub_ep, "py-test", signing_key=None)
    assert pub.join(sub_ep)
    subscribed(watcher, pub)
    reader = subprocess.Popen([node, "-e", NODE_GAP_READER, str(REPO / "clients" / "node" / "realtalk.js"), str(conn)],
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert reader.stdout is not None
        os.set_blocking(reader.stdout.fileno(), False)
        deadline = time.monotonic() + 20
        while "warm" not in (reader.stdout.readline() or "") and time.monotonic() < deadline:
            pub.send_raw(encode("t.warm", {}, "py-test", 0))   # seq 0: counts nothing (a probe)
            time.sleep(0.05)   # between probes (the event is the reader's "warm" line)
        os.set_blocking(reader.stdout.fileno(), True)
        for seq in (1, 2, 5, 6, 10):   # 2 + 3 lost on the way
            pub.send_raw(encode("t.data", {}, "py-test", seq))
        pub.send_raw(encode("t.end", {}, "py-test", 11))
        assert json.loads(reader.stdout.readline()) == {"py-test": 5}
        reports: list[dict[str, Any]] = []
        while sum(r["count"] for r in reports) < 5:
            msg = watcher.recv(timeout_ms=3000)
            assert msg is not None, f"bus.dropped reports so far: {reports}"
            reports.append(msg[1])
        assert {(r["subscriber"], r["publisher"]) for r in reports} == {("node-reader:1", "py-test")}
        assert reports[-1]["total"] == 5
        assert reader.wait(10) == 0
    finally:
        reader.kill()
        reader.wait()
        watcher.close()
        pub.close()

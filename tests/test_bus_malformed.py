"""Malformed bus input never stalls a loop and is reported once a second with its reason."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import msgpack
import pytest

from bus import Publisher, Subscriber
from bus.client import MAX_SKIPPED_PER_RECV
from tests.helpers import Broker, subscribed, wait_topic

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(f"ipc://{tmp_path}/p.sock", f"ipc://{tmp_path}/s.sock")
    yield b
    b.stop()


def _joined(b: Broker, name: str) -> Publisher:
    pub = Publisher(b.pub_ep, name, signing_key=None)
    assert pub.join(b.sub_ep)
    return pub


def _wait_readable(sub: Subscriber, timeout_ms: int = 2000) -> None:
    assert sub.socket.poll(timeout_ms), "nothing arrived"


def test_a_malformed_message_does_not_hide_the_good_ones_behind_it(broker: Broker) -> None:
    """Issue 15 point 7: a drain loop (recv(timeout_ms=0) until None) stopped at a malformed
    message: the supervisor then slept its 250 ms with good messages waiting."""
    sub = Subscriber(broker.sub_ep, ["x."], verify_key=None)
    pub = _joined(broker, "fuzz")
    subscribed(sub, pub)
    for _ in range(100):
        pub.send_raw([b"x.bad", b"\xc1"])
        pub.send_raw([b"x.bad"])
    pub.publish("x.good", {"n": 1})
    _wait_readable(sub)
    # no event says all 201 are in the subscriber's queue (only reading would tell): what a loop finds after its sleep
    time.sleep(0.2)
    t0 = time.monotonic()
    got = sub.recv(timeout_ms=0)
    assert got is not None and got[0] == "x.good"
    assert time.monotonic() - t0 < 0.1 and sub.malformed == 200
    sub.close()
    pub.close()


def test_a_flood_of_malformed_messages_returns_control(broker: Broker) -> None:
    """recv(timeout_ms=0) on an endless stream of bad input still returns (bounded work per call)."""
    sub = Subscriber(broker.sub_ep, ["x."], verify_key=None)
    pub = _joined(broker, "fuzz")
    subscribed(sub, pub)
    for _ in range(5000):
        pub.send_raw([b"x.bad", b"\xc1"])
    t0 = time.monotonic()
    assert sub.recv(timeout_ms=10_000) is None   # gives up at the bound, long before its timeout
    assert time.monotonic() - t0 < 2 and sub.malformed == MAX_SKIPPED_PER_RECV, sub.malformed
    t0 = time.monotonic()
    assert sub.recv(timeout_ms=0) is None         # a drain loop's call: the bound again, at most
    assert time.monotonic() - t0 < 0.5 and MAX_SKIPPED_PER_RECV < sub.malformed <= 2 * MAX_SKIPPED_PER_RECV, sub.malformed
    sub.close()
    pub.close()


def test_malformed_report_once_a_second_with_count_and_reason() -> None:
    sub = Subscriber("inproc://nothing-here", [""], verify_key=None)
    assert sub.take_malformed_report(now=100.0) is None
    sub._note_malformed("body of 'x' is not msgpack (ExtraData)")
    sub._note_malformed("expected 2 frames [topic, msgpack body] (3 with a signature), got 1")
    first = sub.take_malformed_report(now=100.0)
    assert first == {"count": 2, "total": 2,
                     "reason": "expected 2 frames [topic, msgpack body] (3 with a signature), got 1"}
    sub._note_malformed("topic is not valid UTF-8")
    assert sub.take_malformed_report(now=100.5) is None  # at most one report a second
    assert sub.take_malformed_report(now=101.0) == {"count": 1, "total": 3, "reason": "topic is not valid UTF-8"}
    assert sub.take_malformed_report(now=105.0) is None  # nothing new
    sub.close()


def test_publish_reports_puts_the_report_on_engine_error(broker: Broker) -> None:
    """Only a subscriber of every topic reports (issue 23 point 7): the same malformed message
    reaches it and every prefix subscriber of its topic, and was reported by each."""
    every = Subscriber(broker.sub_ep, [""], verify_key=None)
    sub = Subscriber(broker.sub_ep, ["x."], verify_key=None)
    watcher = Subscriber(broker.sub_ep, ["engine.error"], verify_key=None)
    pub = _joined(broker, "fuzz")
    reporter = _joined(broker, "supervisor:1")
    pub.send_raw([b"x.bad", msgpack.packb([1, 2])])
    pub.publish("x.good", {})
    for s in (sub, every):
        wait_topic(s, "x.good", 2)
        assert s.malformed == 1
    assert sub.publish_reports(reporter, "realtime") == 0  # counted, not reported: `every` reports it
    assert every.publish_reports(reporter, "supervisor") == 1
    assert every.publish_reports(reporter, "supervisor") == 0  # rate-limited
    report = watcher.recv(timeout_ms=2000)
    assert report is not None
    topic, body = report
    assert topic == "engine.error" and body["code"] == "malformed_bus_message" and body["count"] == 1
    assert "expected a map" in body["message"] and body["benign"] is True and body["source"] == "supervisor"
    assert watcher.recv(timeout_ms=300) is None   # once
    for closing in (every, sub, watcher, pub, reporter):
        closing.close()


def _nested(depth: int) -> dict[str, object]:
    """A map holding ``depth`` + 1 arrays inside each other: ``depth`` + 2 levels."""
    body: object = []
    for _ in range(depth):
        body = [body]
    return {"o": body}


def test_a_deeply_nested_body_is_malformed_and_the_event_log_never_raises() -> None:
    """msgpack decodes bodies about 1,000 levels deep, where json.dumps raises RecursionError: one
    such message on any topic stopped the engine in the supervisor's event log (the review)."""
    from bus.wire import MAX_DEPTH, MalformedMessage, decode
    from engine.supervisor.logfile import log_line
    deep = msgpack.packb(_nested(995))
    with pytest.raises(MalformedMessage, match="nested"):
        decode([b"app.note", deep])
    topic, body = decode([b"app.note", msgpack.packb(_nested(MAX_DEPTH - 2))])
    assert topic == "app.note"
    line = log_line("app.note", _nested(1000))      # whatever reaches it, a line, never an exception
    assert line.endswith("\n") and "app.note" in line

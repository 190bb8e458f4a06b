"""Bus wire format, broker forwarding and last-value cache."""
from __future__ import annotations

import time
from typing import Any
from pathlib import Path

import msgpack
import pytest
import zmq

from bus import MalformedMessage, Publisher, Subscriber, decode, encode
from tests.helpers import thread_broker, wait_topic

pytestmark = pytest.mark.timeout(30)


def test_roundtrip_carries_header() -> None:
    topic, body = decode(encode("model.text.delta", {"text": "hé"}, "me:1", 7))
    assert topic == "model.text.delta"
    assert body["text"] == "hé" and body["v"] == 2 and body["pub"] == "me:1" and body["seq"] == 7
    assert isinstance(body["ts"], float) and isinstance(body["mono_ns"], int)


@pytest.mark.parametrize("frames, words", [
    ([b"only-topic"], "2 frames"),
    ([b"a", b"b", b"c", b"d"], "2 frames"),
    ([b"\xff\xfe", msgpack.packb({})], "UTF-8"),
    ([b"t", b"\xc1"], "not msgpack"),
    ([b"t", msgpack.packb([1, 2])], "expected a map"),
])
def test_malformed_messages_name_the_problem(frames: list[bytes], words: str) -> None:
    with pytest.raises(MalformedMessage, match=words):
        decode(frames)


@pytest.fixture
def broker(tmp_path: Path):
    with thread_broker(tmp_path) as endpoints:
        yield endpoints


def test_broker_forwards_and_subscriber_counts_malformed(broker: tuple[str, str]) -> None:
    pub_ep, sub_ep = broker
    sub = Subscriber(sub_ep, ["x."])
    pub = Publisher(pub_ep, "test")
    raw: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    raw.connect(pub_ep)
    got = None
    for _ in range(50):  # slow joiner: publish until the subscription has propagated
        raw.send_multipart([b"x.bad", b"\xc1"])
        pub.publish("x.hello", {"n": 1})
        got = sub.recv(timeout_ms=100)
        if got:
            break
    assert got is not None and got[0] == "x.hello"
    deadline = time.monotonic() + 2
    while sub.malformed == 0 and time.monotonic() < deadline:
        raw.send_multipart([b"x.bad", b"\xc1"])
        sub.recv(timeout_ms=50)
    assert sub.malformed >= 1 and "not msgpack" in str(sub.last_error)
    raw.close()


def test_late_subscriber_gets_last_status(broker: tuple[str, str]) -> None:
    pub_ep, sub_ep = broker
    early = Subscriber(sub_ep, ["engine.status"])
    pub = Publisher(pub_ep, "supervisor")
    wait_topic(early, "engine.status", 3, send=lambda: pub.publish("engine.status", {"state": "ready", "n": 0}))
    pub.publish("engine.status", {"state": "ready", "n": "last"})
    wait_topic(early, "engine.status", 3, n="last")
    # nothing is published after this point; a late subscriber still gets the state at once
    late = Subscriber(sub_ep, ["engine."])
    assert wait_topic(late, "engine.status", 2)["n"] == "last"


class _Queue:
    """A socket stand-in: what was sent, and what waits to be read (zmq.Again when nothing does)."""

    def __init__(self) -> None:
        self.waiting: list[Any] = []
        self.sent: list[list[bytes]] = []

    def recv_multipart(self, flags: int = 0) -> Any:
        if not self.waiting:
            raise zmq.Again()
        return self.waiting.pop(0)

    def send_multipart(self, frames: list[bytes]) -> None:
        self.sent.append(frames)


def test_a_replay_is_of_the_state_waiting_behind_the_subscription_in_the_same_poll() -> None:
    """The keeper replayed its cached state before it read the newer one waiting in the same poll:
    a late subscriber got ``n: 0`` after an early one had already read ``n: "last"`` (CI, 95c114b)."""
    from bus.broker import _Keeper
    pub, sub = _Queue(), _Queue()
    keeper = _Keeper(pub, sub, None, None)   # type: ignore[arg-type]
    sub.waiting.append(encode("engine.status", {"state": "ready", "n": 0}, "supervisor", 1))
    keeper.serve([])
    sub.waiting.append(encode("engine.status", {"state": "ready", "n": "last"}, "supervisor", 2))
    keeper.serve([b"\x01engine."])
    assert [decode(f)[1]["n"] for f in pub.sent] == ["last"]


def test_a_re_send_in_the_poll_that_sees_the_realtime_process_go_is_answered_by_the_broker() -> None:
    """The other order's promise (95c114b): the intake's unsubscription is applied before the
    command waiting in the same poll, so the broker answers the re-send the dead process cannot."""
    from bus.broker import _INTAKE_UNSUBSCRIBE, _Keeper
    from bus.intake import Intake, Mode
    pub, sub = _Queue(), _Queue()
    intake = Intake(Mode.HOLD)
    intake.state({"taken": ["a1"], "outcomes": {"a1": {"topic": "cmd.say", "done": {"id": "a1", "ok": True}}}})
    keeper = _Keeper(pub, sub, None, intake)   # type: ignore[arg-type]
    keeper.intake_subscribed = True
    sub.waiting.append(encode("cmd.say", {"text": "hi", "id": "a1"}, "client", 1))
    keeper.serve([_INTAKE_UNSUBSCRIBE])
    dones = [decode(f)[1] for f in pub.sent if decode(f)[0] == "cmd.done"]
    assert [(d["id"], d["ok"], d["repeated"]) for d in dones] == [("a1", True, True)]

"""The supervisor's own events (engine.supervisor.outbox): pure, a recording publisher."""
from __future__ import annotations

import time
from typing import Any

import pytest

from engine.supervisor.outbox import HELD_DELAY_S, Outbox

pytestmark = pytest.mark.timeout(10)


class Pub:
    name = "supervisor:1"

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any] | None]] = []
        self.seq = 0

    def publish(self, topic: str, payload: dict[str, Any] | None = None) -> None:
        self.seq += 1
        self.sent.append((topic, payload))


def outbox() -> tuple[Outbox, Pub, list[tuple[str, dict[str, Any]]]]:
    pub, logged = Pub(), []
    box = Outbox(pub, lambda topic, body: logged.append((topic, body)))  # type: ignore[arg-type]
    return box, pub, logged


def test_while_the_broker_is_down_events_are_logged_held_and_sent_in_order_after_it_is_back() -> None:
    box, pub, logged = outbox()
    box.emit("engine.error", {"code": "child_exited", "n": 1})
    box.emit("engine.status", {"state": "starting"}, hold=False)   # superseded by the next: dropped
    box.emit("engine.error", {"code": "mic_dropped", "n": 2})
    assert [t for t, _ in logged] == ["engine.error", "engine.status", "engine.error"]
    assert all(body["seq"] is None for _, body in logged)
    box.round(0.0)
    assert pub.sent == [(box.probe_topic, None)]      # probing the broker
    assert not box.joined("_join.someone.else") and not box.up
    assert box.joined(box.probe_topic) and box.up
    pub.sent.clear()
    box.round(0.0)
    assert pub.sent == []                              # not yet: the subscribers reconnect too
    box.round(1e12)
    assert pub.sent == [("engine.error", {"code": "child_exited", "n": 1, "held": True}),
                        ("engine.error", {"code": "mic_dropped", "n": 2, "held": True})]


def test_an_event_after_held_ones_waits_behind_them() -> None:
    box, pub, _ = outbox()
    box.emit("engine.error", {"n": 1})
    box.joined(box.probe_topic)
    box.emit("engine.error", {"n": 2})                 # up, but something is held before it
    assert pub.sent == []
    box.round(1e12)
    assert [p["n"] for _, p in pub.sent if p] == [1, 2]


def test_with_the_broker_up_an_event_goes_out_at_once_with_its_sequence_number_logged() -> None:
    box, pub, logged = outbox()
    box.up = True
    box.emit("engine.status", {"state": "ready"}, hold=False)
    assert pub.sent == [("engine.status", {"state": "ready"})]
    assert logged[0][1]["seq"] == pub.seq == 1 and logged[0][1]["pub"] == "supervisor:1"
    box.broker_down()
    box.emit("engine.status", {"state": "ready"}, hold=False)   # a state message: dropped, not held
    box.round(0.0)
    assert box.joined(box.probe_topic)
    box.round(1e12)
    assert pub.sent[1:] == [(box.probe_topic, None)]


def test_held_events_wait_the_reconnect_delay() -> None:
    box, pub, _ = outbox()
    box.emit("engine.error", {"n": 1})
    box.joined(box.probe_topic)
    now = time.monotonic()
    box.round(now + HELD_DELAY_S / 2)
    assert pub.sent == []
    box.round(now + HELD_DELAY_S + 0.01)
    assert len(pub.sent) == 1

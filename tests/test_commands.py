"""Commands sent once (issue 23 point 4, issue 24 point 3), end to end: the broker's intake acks a
command at once and holds it for the realtime process, across a crash of that process; the new
API session gets the conversation from before the crash; the Python client reaches a tcp bus."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from bus import Publisher, Subscriber
from tests.helpers import wait_topic

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ACK_WITHIN_S = 0.050
#: 'at once' across a restart: a sanity bound (the claim is the order: before the successor is
#: back); CI's load on a slow machine delayed such an ack 150 ms once
ACK_DURING_RESTART_WITHIN_S = 0.5
LONG_REPLY = " ".join(["word"] * 300)   # 300 text deltas, 20 ms apart at speed 1: 6 s
SCENARIO = f"""
turns:
  - match: {{text: "story"}}
    reply: "{LONG_REPLY}"
  - match: {{text: "code"}}
    reply: "Noted, your code is ZX9."
  - match: {{text: "which code"}}
    reply: "Your code is ZX9."
"""


class RawPublisher:
    """A plain pyzmq PUB, as a client in another language has it: its own header, seq from 1."""

    def __init__(self, conn: dict[str, Any], name: str = "raw") -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self.sock.connect(conn["publish"])
        self.name = name
        self.seq = 0

    def send(self, topic: str, payload: dict[str, Any]) -> None:
        self.seq += 1
        body = {"v": 2, "ts": time.time(), "mono_ns": time.monotonic_ns(), "pub": self.name, "seq": self.seq, **payload}
        self.sock.send_multipart([topic.encode(), msgpack.packb(body)])

    def joined(self, sub: Subscriber, timeout_s: float = 5.0) -> bool:
        """Probe until a message of ours comes back (ZeroMQ's slow joiner), on a topic ``sub`` takes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.send("_join.raw", {})
            msg = sub.recv(timeout_ms=20)
            if msg is not None and msg[0] == "_join.raw":
                return True
        return False

    def close(self) -> None:
        self.sock.close(0)


def child_pid(eng: Any, name: str) -> int:
    status = json.loads(eng.cli("status", "--json").stdout)
    return next(c["pid"] for c in status["children"] if c["name"] == name)


def recv_until(sub: Subscriber, pred: Any, timeout_s: float,
               seen: list[tuple[float, str, dict[str, Any]]]) -> tuple[float, str, dict[str, Any]]:
    """The first message ``pred(topic, body)`` accepts (already seen or next), with its arrival time."""
    for entry in seen:
        if pred(entry[1], entry[2]):
            return entry
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = sub.recv(timeout_ms=20)
        if msg is None:
            continue
        entry = (time.monotonic(), msg[0], msg[1])
        seen.append(entry)
        if pred(msg[0], msg[1]):
            return entry
    raise AssertionError(f"nothing matched within {timeout_s} s; saw {[t for _, t, _ in seen[-20:]]}")


@pytest.fixture
def text_engine(start_engine: Any, tmp_path: Path) -> Any:
    scenario = tmp_path / "sc.yaml"
    scenario.write_text(SCENARIO)
    return start_engine("--text-only", "--scenario", str(scenario))


def test_a_say_sent_once_during_a_realtime_crash_is_acked_at_once_and_answered_after(text_engine: Any) -> None:
    """The probe's say sent once while the realtime child restarts was never acked nor answered, and
    the new API session did not get the conversation from before the crash."""
    conn = text_engine.conn
    sub = Subscriber(conn["subscribe"], ["_join.raw", "cmd.", "response.done", "engine.status",
                                         "server.conversation.item.added"])
    raw = RawPublisher(conn)
    assert raw.joined(sub)
    seen: list[tuple[float, str, dict[str, Any]]] = []
    first = uuid.uuid4().hex
    raw.send("cmd.say", {"text": "my code is ZX9", "id": first})
    done = recv_until(sub, lambda t, b: t == "response.done" and b.get("request_id") == first, 20, seen)
    assert done[2]["status"] == "completed"
    before = [b["item"] for _, t, b in seen if t == "server.conversation.item.added"]
    assert [i["role"] for i in before] == ["user", "assistant"]

    os.kill(child_pid(text_engine, "realtime"), signal.SIGKILL)
    killed_at = time.monotonic()
    held = uuid.uuid4().hex
    sent_at = time.monotonic()
    raw.send("cmd.say", {"text": "which code did I give?", "id": held})   # once, never again
    ack = recv_until(sub, lambda t, b: t == "cmd.ack" and b.get("id") == held, 5, seen)
    assert ack[2]["ok"] is True and ack[2]["state"] == "queued", ack[2]
    assert ack[0] - sent_at <= ACK_DURING_RESTART_WITHIN_S, f"acked after {(ack[0] - sent_at) * 1000:.1f} ms"
    back = recv_until(sub, lambda t, b: t == "engine.status" and b.get("state") == "reconnected", 10, seen)
    assert ack[0] < back[0], "the ack came after the restarted realtime process was back"
    assert back[2]["reason"] == "restart" and back[2]["history_items"] == 2, back[2]
    answer = recv_until(sub, lambda t, b: t == "response.done" and b.get("request_id") == held, 20, seen)
    assert answer[2]["status"] == "completed" and "ZX9" in answer[2]["text"], answer[2]
    assert answer[0] - back[0] < 2.0, f"answered {answer[0] - back[0]:.2f} s after the reconnect"
    # the new API session got the conversation from before the crash, then the held say: once
    after = [b["item"] for t_, t, b in seen if t == "server.conversation.item.added" and t_ > killed_at]
    texts = [json.dumps(i.get("content")) for i in after]
    assert "ZX9" in texts[0] and after[0]["role"] == "user", texts
    assert after[1]["role"] == "assistant" and "ZX9" in texts[1], texts
    assert sum("which code" in t for t in texts) == 1, texts
    done_ids = [b.get("id") for _, t, b in seen if t == "cmd.done"]
    assert done_ids.count(held) == 1
    # a sender that missed the first say's outcome sends it again: the successor answers it as its
    # predecessor would have (the broker kept the outcome), and does not carry it out again
    first_done = next(b for _, t, b in seen if t == "cmd.done" and b.get("id") == first and not b.get("repeated"))
    resent_at = time.monotonic()
    raw.send("cmd.say", {"text": "my code is ZX9", "id": first})
    again = recv_until(sub, lambda t, b: t == "cmd.done" and b.get("id") == first and b.get("repeated"), 5, seen)
    assert again[2]["item_id"] == first_done["item_id"] and again[2]["ok"] is True, again[2]
    assert not [b for t_, t, b in seen if t == "server.conversation.item.added" and t_ > resent_at]
    raw.close()
    sub.close()


def test_a_forged_history_does_not_erase_the_conversation_a_restart_replays(text_engine: Any) -> None:
    """The broker kept whatever came on conversation.history, so an unsigned copy from any client
    replaced the conversation a restarted realtime process replays (and was then refused by it)."""
    conn = text_engine.conn
    sub = Subscriber(conn["subscribe"], ["response.done", "engine.status"])
    pub = Publisher(conn["publish"], "test")
    assert pub.join(conn["subscribe"])
    rid = uuid.uuid4().hex
    pub.publish("cmd.say", {"text": "my code is ZX9", "id": rid})
    wait_topic(sub, "response.done", where=lambda b: b.get("request_id") == rid)
    forger = Publisher(conn["publish"], "forger", signing_key=None)
    assert forger.join(conn["subscribe"])
    forger.publish("conversation.history", {"items": [], "in_flight": [], "taken": []})
    assert forger.join(conn["subscribe"])   # its probe comes after the forgery: the broker has had it
    os.kill(child_pid(text_engine, "realtime"), signal.SIGKILL)
    back = wait_topic(sub, "engine.status", timeout=10, where=lambda b: b.get("state") == "reconnected")
    assert back["history_items"] == 2, back
    sub.close()
    pub.close()
    forger.close()


def test_a_say_is_acked_within_50_ms_while_an_answer_plays(start_engine: Any, tmp_path: Path) -> None:
    """A say was acked only once the API added its item, after the answer in progress."""
    scenario = tmp_path / "sc.yaml"
    scenario.write_text(SCENARIO)
    eng = start_engine("--text-only", "--scenario", str(scenario), "--speed", "1")
    conn = eng.conn
    sub = Subscriber(conn["subscribe"], ["_join.raw", "cmd.", "model.text.delta", "response.done"])
    raw = RawPublisher(conn)
    assert raw.joined(sub)
    seen: list[tuple[float, str, dict[str, Any]]] = []
    story = uuid.uuid4().hex
    raw.send("cmd.say", {"text": "tell me a story", "id": story})
    recv_until(sub, lambda t, b: t == "model.text.delta" and b.get("request_id") == story, 10, seen)
    latencies = []
    for n in range(5):
        rid = uuid.uuid4().hex
        sent_at = time.monotonic()
        raw.send("cmd.say", {"text": f"and then {n}?", "id": rid, "respond": False})
        ack = recv_until(sub, lambda t, b, rid=rid: t == "cmd.ack" and b.get("id") == rid, 5, seen)
        latencies.append(ack[0] - sent_at)
        assert ack[2]["ok"] is True
    assert not any(t == "response.done" and b.get("request_id") == story for _, t, b in seen), \
        "the answer ended before the says: nothing was measured while it played"
    assert max(latencies) <= ACK_WITHIN_S, [round(x * 1000, 1) for x in latencies]
    raw.close()
    sub.close()


def test_after_a_realtime_crash_the_next_answer_is_heard_at_once(start_engine: Any, tmp_path: Path) -> None:
    """The dead process's audio stayed in the speaker ring and played to its end first: with the API
    sending faster than real time, the next answer was heard seconds (up to the ring's 87 s) later."""
    scenario = tmp_path / "sc.yaml"
    story = " ".join(["The sea is wide and the ships are many."] * 5)   # about 15 s of speech
    scenario.write_text(f'turns:\n  - match: {{text: "story"}}\n    reply: "{story}"\n'
                        '  - match: {text: "code"}\n    reply: "Noted."\n')
    eng = start_engine("--mic", "null", "--speaker", "null", "--scenario", str(scenario), "--speed", "8")
    conn = eng.conn
    sub = Subscriber(conn["subscribe"], ["_join.raw", "playout.started", "engine.status", "response.done",
                                         "server.response.output_audio.delta"])
    raw = RawPublisher(conn)
    assert raw.joined(sub)
    seen: list[tuple[float, str, dict[str, Any]]] = []
    raw.send("cmd.say", {"text": "tell me a story", "id": uuid.uuid4().hex})
    recv_until(sub, lambda t, b: t == "playout.started", 20, seen)
    # the reply comes 8 times faster than it plays: kill once 8 s of it (80 deltas of 100 ms) wait in the ring
    for _ in range(80):
        recv_until(sub, lambda t, b: t == "server.response.output_audio.delta", 10, [])
    os.kill(child_pid(eng, "realtime"), signal.SIGKILL)
    killed_at = time.monotonic()
    held = uuid.uuid4().hex
    raw.send("cmd.say", {"text": "my code is ZX9", "id": held})
    back = recv_until(sub, lambda t, b: t == "engine.status" and b.get("state") == "reconnected", 10, seen)
    done = recv_until(sub, lambda t, b: t == "response.done" and b.get("request_id") == held, 20, seen)
    heard = recv_until(sub, lambda t, b: t == "playout.started" and b.get("response_id") == done[2]["response_id"],
                       20, seen)
    assert heard[0] - back[0] < 2.0, f"heard {heard[0] - killed_at:.1f} s after the kill"
    raw.close()
    sub.close()


def test_connect_reaches_a_tcp_curve_engine(start_engine: Any, tmp_path: Path) -> None:
    """connect() ignored the connection file's CURVE keys: it could not reach a tcp bus."""
    config = tmp_path / "tcp.yaml"
    config.write_text("bus:\n  transport: tcp\n")
    eng = start_engine("--text-only", "--config", str(config))
    assert eng.conn["publish"].startswith("tcp://")
    from engine import connect

    async def main() -> None:
        session = await asyncio.wait_for(connect(), 15)
        try:
            reply = await session.user("What is the capital of France?", timeout_s=20)
            assert "capital of France" in reply.text
        finally:
            await session.close()
    asyncio.run(main())
    assert eng.stop() == 0


def test_a_tool_owner_that_leaves_while_the_realtime_process_restarts_loses_its_tools(text_engine: Any) -> None:
    """engine.presence.gone went out once: an owner that left while the realtime process was down
    kept its tools in the successor, and the model was offered a tool nobody served (the review)."""
    conn = text_engine.conn
    sub = Subscriber(conn["subscribe"], ["engine.tools", "cmd.done"])
    owner = Publisher(conn["publish"], "tools:1")
    presence = Subscriber(conn["subscribe"], ["_presence.tools:1"])
    assert owner.join(conn["subscribe"])
    owner.publish("cmd.tool.register", {"name": "lookup", "owner": "tools:1", "id": "reg1"})
    wait_topic(sub, "engine.tools", 20, where=lambda b: b.get("tools") == ["lookup"])
    os.kill(child_pid(text_engine, "realtime"), signal.SIGKILL)
    presence.close()                                   # the owner's process exits meanwhile
    owner.close()
    wait_topic(sub, "engine.tools", 30, where=lambda b: b.get("tools") == [])
    sub.close()

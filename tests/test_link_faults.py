"""The API link end to end (engine/link): what goes out after a socket drop, and what a backend that
cannot be reached at the first start does. The engine against the local server with its fault
injection (engine/server/faults.py)."""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from bus import Publisher, Subscriber
from tests.helpers import failed_start, wait_topic

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

HISTORY_NOTES = 45        #: conversation items before the drop (the core replays the latest 50)
OUTAGE_SAYS = 40          #: says published from the moment the drop is seen, 1 ms apart


def test_the_replayed_history_reaches_the_server_before_anything_sent_during_the_outage(start_engine: Any,
                                                                                       tmp_path: Path) -> None:
    """Issue 23 part 5: after a socket drop, a say sent during the outage reached the server before
    the replayed history (2 runs of 3): the realtime process decided under its lock and sent
    outside it, so a say decided just after the reconnect went out between the history's items."""
    scenario = tmp_path / "sc.yaml"
    # the second session.updated (the test's cmd.session.update below) drops the socket, no close frame
    scenario.write_text('faults: {drop_at_event: "session.updated#2", drop_code: 1006}\n')
    eng = start_engine("--text-only", "--scenario", str(scenario))
    conn = eng.conn
    sub = Subscriber(conn["subscribe"], ["engine.status", "server.session.created", "server.conversation.item.added",
                                         "cmd.done", "conversation.history"])
    pub = Publisher(conn["publish"], "test")
    pub.join(conn["subscribe"])
    seen: list[tuple[str, dict[str, Any]]] = []
    for i in range(HISTORY_NOTES):
        pub.publish("cmd.say", {"text": f"note {i}", "role": "system", "respond": False, "id": f"note-{i}"})
    wait_topic(sub, "conversation.history", timeout=20, seen=seen,
               where=lambda b: len(b.get("items") or []) >= HISTORY_NOTES)
    pub.publish("cmd.session.update", {"session": {"instructions": "Be brief."}, "id": "drop-now"})
    wait_topic(sub, "engine.status", timeout=10, seen=seen, where=lambda b: b.get("state") == "disconnected")
    for i in range(OUTAGE_SAYS):
        pub.publish("cmd.say", {"text": f"outage {i}", "role": "system", "respond": False, "id": f"outage-{i}"})
        time.sleep(0.001)
    back = wait_topic(sub, "engine.status", timeout=10, seen=seen, where=lambda b: b.get("state") == "reconnected")
    assert back["history_items"] >= HISTORY_NOTES
    added = {f"outage-{i}" for i in range(OUTAGE_SAYS)}   # each say's item added (cmd.done; its ack came at once)
    added -= {b.get("id") for t, b in seen if t == "cmd.done"}
    while added:
        added.discard(wait_topic(sub, "cmd.done", timeout=10, seen=seen, where=lambda b: b.get("id") in added)["id"])
    # the new session's items, in the order the server took them
    sessions = [i for i, (t, _) in enumerate(seen) if t == "server.session.created"]
    assert sessions, "the new session's session.created was not seen"
    texts = [b["item"]["content"][0]["text"] for t, b in seen[sessions[-1]:] if t == "server.conversation.item.added"]
    first_outage = next(i for i, text in enumerate(texts) if text.startswith("outage"))
    history = [text for text in texts if text.startswith("note")]
    assert len(history) == HISTORY_NOTES, texts
    assert all(text.startswith("note") for text in texts[:HISTORY_NOTES]), \
        f"a say sent during the outage reached the server before the history: {texts[:first_outage + 3]}"
    assert [t for t in texts if t.startswith("outage")] == [f"outage {i}" for i in range(OUTAGE_SAYS)]
    sub.close()
    pub.close()


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, never listened, closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.mark.parametrize("url, cause", [
    ("ws://127.0.0.1:{closed_port}/v1/realtime", "refused"),   # the port is closed when the test runs
    ("ws://no-such-host.invalid/v1/realtime", "cannot resolve"),
])
def test_a_backend_that_cannot_be_reached_at_the_first_start_ends_engine_start_naming_it(
        runtime_dir: Path, tmp_path: Path, url: str, cause: str) -> None:
    """Issue 23 part 7: a closed port or a bad URL at the first start was retried for more than 40 s
    without becoming ready or exiting; reconnect retries are for drops after a session existed."""
    url = url.format(closed_port=closed_port())
    text, elapsed = failed_start(url, "sk-some-key-123", tmp_path)
    assert url in text and cause in text, text
    assert "sk-some-key-123" not in text
    # the defect retried for more than 40 s; the start and stop of the engine's processes alone take
    # 1-3 s here, and CI's run of aaab8e6 read 5.3 s beside the other lane's tests
    assert elapsed < 15.0, (elapsed, text)
    assert text.count("cannot reach") == 1, text   # one error, not one per retry

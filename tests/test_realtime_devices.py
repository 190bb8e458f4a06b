"""Barge-in on the virtual devices: real PyAudio capture and playback through PulseAudio null sinks."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bus import Subscriber
from tests.helpers import subscribed, wait_topic

pytestmark = [pytest.mark.e2e, pytest.mark.audio, pytest.mark.timeout(120)]


def test_a_finished_reply_is_never_cut_by_the_next_utterance(vaudio: dict[str, str], start_engine: Any,
                                                             speech_wav: Any, tmp_path: Path) -> None:
    """Issue 12: playback.stopped (played 1565 ms), then speech 3.5 s later, then playback.interrupted
    (1561 ms) and a conversation.item.truncate of the finished reply: observers printed a second,
    cut copy of it. The heard index the speaker leaves in shared memory lags the end by the output
    latency, so the reply still looked audible."""
    scenario = tmp_path / "sc.yaml"
    scenario.write_text('turns:\n  - match: {turn: 1}\n    reply: "The capital of France is Paris."\n'
                        '  - match: {turn: 2}\n    reply: "Yes."\n')
    eng = start_engine("--mic", "vmic", "--speaker", "vspk", "--scenario", str(scenario))
    sub = Subscriber(eng.conn["subscribe"], ["playout.", "user.speech.", "client.conversation.item.truncate",
                                             "model.transcript.done", "response.done"])
    subscribed(sub, eng.conn["publish"])   # the broker holds the subscriptions before anything is said
    seen: list[tuple[str, dict[str, Any]]] = []
    subprocess.run(["paplay", "--device=micsink", str(speech_wav("What is the capital of France?", pad_s=0.3))],
                   check=True, timeout=20, env=os.environ.copy())
    stopped = wait_topic(sub, "playout.stopped", timeout=30, seen=seen)
    subprocess.run(["paplay", "--device=micsink", str(speech_wav("Are you sure?", pad_s=0.3))],
                   check=True, timeout=20, env=os.environ.copy())
    wait_topic(sub, "user.speech.started", timeout=10, seen=seen)
    wait_topic(sub, "playout.stopped", timeout=30, seen=seen, where=lambda b: b["item_id"] != stopped["item_id"])
    topics = [t for t, _ in seen]
    assert "playout.interrupted" not in topics and "client.conversation.item.truncate" not in topics, topics
    done = [b["text"] for t, b in seen if t == "model.transcript.done"]
    assert done == ["The capital of France is Paris.", "Yes."], done  # no second, cut copy

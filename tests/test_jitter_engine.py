"""The adaptive jitter buffer end to end: the realtime process times the deltas, playback starts
each reply when the measured jitter says it is safe (audio.jitter_buffer: adaptive)."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import BusRecorder

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

#: 2.3 s of speech: 24 deltas of 100 ms, more than the 20 the estimator needs before it trusts itself
REPLY = "The sea is wide and the ships are many."


def replies_started_after_first_delta_ms(start_engine: Any, tmp_path: Path, jitter_ms: float,
                                         replies: int = 2) -> tuple[list[float], list[dict[str, Any]]]:
    """``replies`` replies, one after another, from a local server at real time with ``jitter_ms``
    of delta jitter (seeded): each reply's first delta -> its first sample handed to the device
    (latency.turn), and the underruns playback reported."""
    scenario = tmp_path / "sc.yaml"
    scenario.write_text(f'default_reply: "{REPLY}"\nfaults: {{delta_jitter_ms: {jitter_ms}, seed: 7}}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("audio: {prebuffer_ms: 80, jitter_buffer: adaptive, playback_period_ms: 10}\n"
                   "session: {turn_detection: null, transcription: null}\n")
    eng = start_engine("--config", str(cfg), "--mic", "null", "--speaker", "null", "--scenario", str(scenario),
                       "--speed", "1")
    bus = BusRecorder(eng.conn)

    async def talk() -> None:
        for n in range(replies):
            bus.pub.publish("cmd.say", {"text": f"Turn {n}", "id": f"turn-{n}"})
            await bus.wait_many("playout.stopped", n + 1, timeout_s=20)
            await bus.wait_many("latency.turn", n + 1, timeout_s=5)
    try:
        asyncio.run(talk())
    finally:
        bus.close()
    return [t["first_delta_to_device_ms"] for t in bus.all("latency.turn")], bus.all("playback.underrun")


def test_a_reply_on_a_clean_link_starts_soon_after_its_first_delta(start_engine: Any, tmp_path: Path) -> None:
    waits, underruns = replies_started_after_first_delta_ms(start_engine, tmp_path, jitter_ms=0)
    assert 75 <= waits[0] <= 100, waits        # no history yet: the configured 80 ms
    assert waits[1] < 40, waits          # measured clean: well under the constant
    assert underruns == []


def test_a_reply_on_a_jittery_link_waits_what_the_jitter_needs_and_plays_without_underruns(
        start_engine: Any, tmp_path: Path) -> None:
    waits, underruns = replies_started_after_first_delta_ms(start_engine, tmp_path, jitter_ms=30, replies=3)
    # 30 ms of jitter measured: later than on a clean link (under 40 ms there), more so as the
    # estimate fills in (after one reply, 24 deltas, its tail is still thin), never much more than
    # the goal (p99 <= 90 ms)
    assert min(waits[1:]) >= 40 and waits[2] >= 50, waits
    assert max(waits[1:]) <= 110, waits
    assert underruns == []

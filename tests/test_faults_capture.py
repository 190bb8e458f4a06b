"""A capture restart with a WAV mic continues the file where it was: the user's words are not
sent to the API twice."""
from __future__ import annotations

import os
import signal
import time
import wave
from pathlib import Path
from typing import Any

import pytest

from bus import Subscriber
from tests.helpers import wait_topic

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_a_restarted_capture_continues_the_mic_wav(start_engine: Any, speech_wav: Any, tmp_path: Path) -> None:
    mic = speech_wav("one two three four five six seven eight nine ten", pad_s=1.0)
    with wave.open(str(mic)) as w:
        speech_end_ms = w.getnframes() * 1000 // w.getframerate() - 1000
    eng = start_engine("--mic", str(mic), "--speaker", str(tmp_path / "out.wav"))
    conn = eng.conn
    sub = Subscriber(conn["subscribe"], ["user.speech.", "engine.error"])
    wait_topic(sub, "user.speech.started", timeout=20)
    time.sleep(0.5)   # mid-speech
    capture = next(c for c in conn["children"] if c["name"] == "capture")
    os.kill(capture["pid"], signal.SIGKILL)
    seen: list[tuple[str, dict[str, Any]]] = []
    wait_topic(sub, "user.speech.stopped", timeout=30, seen=seen)
    # then every turn until the mic has been quiet for 3 s (a replay would be a turn of its own)
    quiet_until = time.monotonic() + 3.0
    while time.monotonic() < quiet_until:
        msg = sub.recv(timeout_ms=100)
        if msg is not None:
            seen.append(msg)
            if msg[0] == "user.speech.started":
                quiet_until = time.monotonic() + 3.0
    ends = [b["audio_end_ms"] for t, b in seen if t == "user.speech.stopped"]
    # the server's input clock counts the frames it got: a replay from the start adds the
    # speech already sent (silence_duration_ms is 500)
    assert ends and ends[-1] < speech_end_ms + 500 + 500, (ends, speech_end_ms)
    restarted = [b for t, b in seen if t == "engine.error" and b.get("code") == "child_exited"]
    assert restarted and restarted[0]["child"] == "capture"

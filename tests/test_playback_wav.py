"""The speaker WAV survives a playback restart (issue 15 point 11): the restarted process
continues the file instead of wiping it."""
from __future__ import annotations

import os
import signal
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.audio.record import PcmWav, WavAppendError
from engine.audio.ring import Ring

pytestmark = pytest.mark.timeout(90)


def frames_of(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def test_pcm_wav_continues_a_file_and_is_readable_after_every_write(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    first = np.arange(480, dtype=np.int16)
    with PcmWav(path) as wav:
        wav.writeframes(first.tobytes())
        assert frames_of(path).tolist() == first.tolist()   # the header is patched as it goes
    with PcmWav(path, append=True) as wav:
        assert wav.appended_frames == 480
        wav.writeframes((first + 1000).tobytes())
    assert frames_of(path).tolist() == first.tolist() + (first + 1000).tolist()
    with PcmWav(path) as wav:                                # no append: a new file
        wav.writeframes(first[:10].tobytes())
    assert len(frames_of(path)) == 10


def test_pcm_wav_continues_a_killed_writers_file_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    with PcmWav(path) as wav:
        wav.writeframes(np.ones(100, dtype=np.int16).tobytes())
    with open(path, "ab") as f:                              # written, header not yet patched, half a frame
        f.write(np.full(20, 2, dtype=np.int16).tobytes() + b"\x01")
    with PcmWav(path, append=True) as wav:
        assert wav.appended_frames == 120
        wav.writeframes(np.full(5, 3, dtype=np.int16).tobytes())
    assert frames_of(path).tolist() == [1] * 100 + [2] * 20 + [3] * 5


def test_pcm_wav_will_not_continue_another_format(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(bytes(400))
    with pytest.raises(WavAppendError, match="another format"):
        PcmWav(path, append=True)
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(WavAppendError, match="not a WAV file"):
        PcmWav(tmp_path / "text.wav", append=True)
    assert path.stat().st_size == 444                        # untouched


def test_only_a_restart_on_the_same_ring_continues(tmp_path: Path) -> None:
    name = f"realtalk-test-pbw-{os.getpid()}"
    ring = Ring.create(name, 1024, with_eventfd=False)
    try:
        assert Ring.attach(name).control.count_consumer_start() == 0   # the first playback: a new file
        assert Ring.attach(name).control.count_consumer_start() == 1   # its restart: continue
    finally:
        ring.unlink()


def _child_pid(eng: Any, name: str) -> int:
    return next(c["pid"] for c in eng.conn["children"] if c["name"] == name)  # as started


@pytest.mark.e2e
def test_a_playback_restart_keeps_what_the_speaker_wav_holds(start_engine: Any, tmp_path: Path) -> None:
    from bus import Subscriber
    from tests.helpers import say, wait_topic
    out = tmp_path / "out.wav"
    mic = tmp_path / "silence.wav"
    with wave.open(str(mic), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(bytes(48000))
    eng = start_engine("--mic", str(mic), "--speaker", str(out))
    sub = Subscriber(eng.conn["subscribe"], ["playback.stopped"])
    assert say(eng.conn, "Say something.")["ok"]
    wait_topic(sub, "playback.stopped", timeout=30)
    before = frames_of(out)
    assert np.abs(before).max() > 1000                       # the reply is in the file
    old_pid = _child_pid(eng, "playback")
    os.kill(old_pid, signal.SIGKILL)
    status_sub = Subscriber(eng.conn["subscribe"], ["engine.status"])
    # the supervisor publishes its children every second
    wait_topic(status_sub, "engine.status", 20, where=lambda b: any(
        c["name"] == "playback" and c["pid"] != old_pid for c in b.get("children") or []))
    t0 = time.monotonic()
    while len(frames_of(out)) <= len(before) and time.monotonic() - t0 < 10:  # the new process writes
        time.sleep(0.05)
    after = frames_of(out)
    assert len(after) > len(before)
    assert np.array_equal(after[:len(before)], before)      # the first reply is still there
    assert eng.stop() == 0

"""The local server's memory stays flat over a long conversation (issue 15 point 17).

A websocket client holds a fast conversation (audio turns under server VAD, text turns,
the mic streaming silence between them, distinct replies) and tracemalloc measures what
the process keeps between the warm-up and the end. The client keeps nothing."""
from __future__ import annotations

import base64
import gc
import json
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest
import websocket

pytestmark = pytest.mark.timeout(180)

SILENCE = np.zeros(24000, dtype=np.int16)


class ForgetfulClient:
    """Reads events and keeps none of them (so only the server's memory can grow)."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, timeout=30)

    def send(self, event: dict[str, Any]) -> None:
        self.ws.send(json.dumps(event))

    def until(self, etype: str, timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ev = json.loads(self.ws.recv())
            if ev["type"] == etype:
                return ev
            assert ev["type"] != "error", ev
        raise AssertionError(f"no {etype} within {timeout_s}s")

    def append(self, pcm: np.ndarray, chunk_ms: int = 100) -> None:
        step = 24 * chunk_ms
        for i in range(0, len(pcm), step):
            self.send({"type": "input_audio_buffer.append",
                       "audio": base64.b64encode(pcm[i:i + step].tobytes()).decode()})


def _turn(c: ForgetfulClient, n: int, speech: np.ndarray) -> None:
    if n % 2 == 0:
        c.append(np.concatenate([SILENCE[:12000], speech, SILENCE]))
    else:
        c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": f"turn number {n} of a long conversation"}]}})
        c.send({"type": "response.create"})
    c.until("response.done")
    c.append(np.concatenate([SILENCE] * 4))  # nobody speaks, the mic streams on


def test_memory_stays_flat_over_a_long_conversation(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.server import session as session_mod
    from engine.server import voice
    from engine.server.voice import synthesize
    # a small audio retention and speech cache, so that a short test runs past them (the defaults keep minutes)
    monkeypatch.setattr(session_mod, "AUDIO_RETAIN_BYTES", 1 << 20)
    monkeypatch.setattr(voice._speech_cache, "max_bytes", 1 << 20)
    server = make_server(speed=500.0)
    speech = synthesize("What is the capital of France, and how far is it from here by train?", "alloy", 1.0)
    c = ForgetfulClient(server.url + "?model=gpt-realtime")
    c.until("session.created")
    c.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "transcription": {"model": "whisper-1"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
    c.until("session.updated")
    tracemalloc.start(1)
    try:
        for n in range(12):
            _turn(c, n, speech)
        gc.collect()
        warm_bytes = tracemalloc.get_traced_memory()[0]
        for n in range(12, 40):
            _turn(c, n, speech)
        gc.collect()
        end_bytes = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        c.ws.close()
    growth_mb = (end_bytes - warm_bytes) / 1e6
    # before the fix: about 0.5 MB a turn here (every item's audio, every reply's speech cached)
    assert growth_mb < 1.5, f"the server kept {growth_mb:.1f} MB over 28 turns"


def test_long_silence_does_not_grow_the_input_buffer() -> None:
    """Under server VAD, hours of silence keep only the audio a turn could still need."""
    from engine.server.session import ServerSession
    s = ServerSession("gpt-realtime")
    chunk = base64.b64encode(np.zeros(2400, dtype=np.int16).tobytes()).decode()
    event = json.dumps({"type": "input_audio_buffer.append", "audio": chunk})
    for _ in range(10 * 60 * 10):  # ten minutes of 100 ms appends
        s.receive_text(event)
    assert s.buffer_samples <= 24000 * 21  # VAD_IDLE_KEEP_MS, trimmed in steps of it


def test_old_items_keep_their_length_and_retrieve_without_audio(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.server import session as session_mod
    from engine.server.session import ServerSession
    monkeypatch.setattr(session_mod, "AUDIO_RETAIN_BYTES", 48000 * 2)  # two seconds of PCM
    s = ServerSession("gpt-realtime")
    one_s = base64.b64encode(np.full(24000, 1000, dtype=np.int16).tobytes()).decode()
    ids = []
    for _ in range(4):
        acts = s.receive_text(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": one_s}]}}))
        ids.append(acts.send[0]["item"]["id"])
    old = s.receive_text(json.dumps({"type": "conversation.item.retrieve", "item_id": ids[0]})).send[0]
    new = s.receive_text(json.dumps({"type": "conversation.item.retrieve", "item_id": ids[-1]})).send[0]
    assert "audio" not in old["item"]["content"][0]
    assert len(base64.b64decode(new["item"]["content"][0]["audio"])) == 48000
    assert [s.by_id[i].audio_ms for i in ids] == [1000.0] * 4  # usage still bills every second


def test_manual_turns_with_an_open_mic_do_not_grow_the_input_buffer() -> None:
    """Without turn detection (push to talk) a client that streams its mic between turns filled
    the buffer for the whole session (3.3 MB a minute here, about 200 MB in an hour-long session).
    The server keeps the newest MANUAL_BUFFER_KEEP_MS; a commit takes that."""
    from engine.server import session as session_mod
    from engine.server.session import ServerSession
    s = ServerSession("gpt-realtime")
    s.receive_text(json.dumps({"type": "session.update", "session": {
        "type": "realtime", "audio": {"input": {"turn_detection": None}}}}))
    chunk = base64.b64encode(np.ones(480, dtype=np.int16).tobytes()).decode()   # 20 ms
    event = json.dumps({"type": "input_audio_buffer.append", "audio": chunk})
    tracemalloc.start(1)
    try:
        for _ in range(50 * 60 * 10):   # ten minutes of 20 ms appends
            s.receive_text(event)
        kept_bytes, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    keep = session_mod.MANUAL_BUFFER_KEEP_MS * 24
    most = keep + session_mod.BUFFER_TRIM_STEP_MS * 24
    assert s.buffer_samples <= most
    # the trim drops whole chunks from the head: no copy of the buffer (joining it first took 3x at each trim,
    # and the allocator kept that peak: +22 MB of RSS in an hour-long push-to-talk session)
    assert peak_bytes < 1.6 * most * 2, f"peak {peak_bytes / 1e6:.1f} MB for at most {most * 2 / 1e6:.1f} MB of audio"
    acts = s.receive_text(json.dumps({"type": "input_audio_buffer.commit"}))
    item_id = next(ev["item_id"] for ev in acts.send if ev["type"] == "input_audio_buffer.committed")
    assert keep <= s.by_id[item_id].audio_samples <= keep + session_mod.BUFFER_TRIM_STEP_MS * 24
    assert s.buffer_samples == 0

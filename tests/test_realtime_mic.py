"""The realtime process's mic reader (RealtimeProcess._on_mic) against a real ring, no socket:
what each chunk handed to the link is dated with (its capture time, and when the engine had it).
Pure: no process is started."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest

from engine.audio.ring import Ring
from engine.realtime.process import MIC_CHUNK_MAX_FRAMES, RealtimeProcess
from engine.realtime.records import MicAudio
from tests.helpers import made_ring

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def mic() -> Iterator[Ring]:
    with made_ring(eventfd=True) as r:
        yield r


def reader(mic: Ring) -> tuple[Any, list[MicAudio]]:
    steps: list[MicAudio] = []
    p = RealtimeProcess.__new__(RealtimeProcess)
    p.mic = mic
    p.link = SimpleNamespace(connected=True, step=steps.append)   # type: ignore[assignment]
    p._mic_buf = np.empty(MIC_CHUNK_MAX_FRAMES, dtype=np.int16)
    p._playing = False                                          # no item playing: no position due
    return p, steps


def test_chunks_the_device_handed_over_in_one_burst_are_dated_by_their_write_not_paced_back(mic: Ring) -> None:
    """PulseAudio hands captures over in bursts: three 20 ms chunks written at once are read in one
    wake; the mic latency counts each from that write, not 20 or 40 ms before it (that charged the
    device's bunching to the engine's mic latency: up to 19 ms at p99)."""
    p, steps = reader(mic)
    for _ in range(3):
        mic.write(np.ones(480, dtype=np.int16))
    _, written_ns = mic.write_stamp
    p._on_mic()
    assert sum(len(s.pcm) for s in steps) == 3 * 480 * 2
    assert len(steps) == 2                                  # 40 ms, then the rest
    assert all(s.received_at_s == written_ns / 1e9 for s in steps)      # the mic latency counts from here
    # the capture time the session clock uses stays paced back: the first chunk's last frame came 20 ms
    # before the last write's
    assert [round((written_ns / 1e9 - s.captured_at_s) * 1000, 3) for s in steps] == [20.0, 0.0]


def test_a_chunk_is_read_once_and_the_reader_sleeps_again(mic: Ring) -> None:
    p, steps = reader(mic)
    mic.write(np.ones(480, dtype=np.int16))
    p._on_mic()
    p._on_mic()
    assert len(steps) == 1 and mic.read_available == 0

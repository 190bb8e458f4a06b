"""The ring's region API (in-place reads and writes), its header check on attach, the sample
width field, and the playback control view."""
from __future__ import annotations

from typing import Iterator

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from engine.errors import EngineError
from engine.audio.ring import _HEADER_BYTES, PlaybackControl, Ring, RingError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ring_name(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"realtalk-test-rg-{os.getpid()}-{request.node.name[:30]}"
    yield name
    Path("/dev/shm", name).unlink(missing_ok=True)


def test_regions_read_in_place_and_wrap(ring_name: str) -> None:
    ring = Ring.create(ring_name, 16, with_eventfd=False)
    ring.write(np.arange(12, dtype=np.int16))
    first, rest = ring.read_regions()
    assert first.tolist() == list(range(12)) and len(rest) == 0
    assert np.shares_memory(first, ring._data)            # a view, not a copy
    assert ring.read_available == 12                      # nothing consumed yet
    assert ring.commit_read(10) == 10 and ring.read_index == 10
    ring.write(np.arange(100, 110, dtype=np.int16))       # 12 readable, wrapping the end
    first, rest = ring.read_regions(11)
    assert first.tolist() == [10, 11, 100, 101, 102, 103] and rest.tolist() == [104, 105, 106, 107, 108]
    assert ring.commit_read(99) == 12                     # no further than what was written
    a, b = ring.write_regions(5)
    a[:] = 7
    b[:] = 8                                              # (empty unless the free space wraps)
    ring.commit_write(len(a) + len(b))
    assert ring.read(16).tolist() == [7] * 5
    a, b = ring.write_regions()                           # all the free space, in two parts
    assert len(a) + len(b) == 16 and len(b) == 16 - len(a) and len(a) == 16 - (ring.write_index & 15)
    ring.close()
    ring.unlink()


def test_commit_write_wakes_a_waiting_reader(ring_name: str) -> None:
    import threading
    ring = Ring.create(ring_name, 64)
    def produce() -> None:
        a, _ = ring.write_regions(4)
        a[:] = 3
        ring.commit_write(4)
    threading.Timer(0.05, produce).start()
    assert ring.wait_readable(5.0) and ring.read(4).tolist() == [3] * 4
    ring.unlink()


def test_ring_error_is_an_engine_error() -> None:
    assert issubclass(RingError, EngineError)


def _corrupt(name: str, slot: int, value: int) -> None:
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        mm = mmap.mmap(fd, _HEADER_BYTES)
    finally:
        os.close(fd)
    hdr = memoryview(mm).cast("q")
    hdr[slot] = value
    hdr.release()
    mm.close()


def test_attach_checks_the_header(ring_name: str) -> None:
    ring = Ring.create(ring_name, 1024, sample_rate=24000)
    with pytest.raises(RingError, match="sample_rate 24000, the caller expects 48000"):
        Ring.attach(ring_name, sample_rate=48000)
    with pytest.raises(RingError, match="sample_width_bytes 2, the caller expects 4"):
        Ring.attach(ring_name, sample_width_bytes=4)
    with pytest.raises(RingError, match="capacity_frames 1024, the caller expects 2048"):
        Ring.attach(ring_name, capacity_frames=2048)
    Ring.attach(ring_name, sample_rate=None, capacity_frames=1024).close()  # None: not checked
    _corrupt(ring_name, 1, 1)
    with pytest.raises(RingError, match="layout version 1, this engine uses 2"):
        Ring.attach(ring_name)
    _corrupt(ring_name, 1, 2)
    _corrupt(ring_name, 3, 3)
    with pytest.raises(RingError, match="bytes_per_frame 3 does not match"):
        Ring.attach(ring_name)
    _corrupt(ring_name, 3, 2)
    _corrupt(ring_name, 2, 1 << 20)
    with pytest.raises(RingError, match="too small"):
        Ring.attach(ring_name)
    _corrupt(ring_name, 0, 0x1234)
    with pytest.raises(RingError, match="bad magic"):
        Ring.attach(ring_name)
    ring.close()


def test_sample_width_is_a_field_not_two_bytes(ring_name: str) -> None:
    ring = Ring.create(ring_name, 8, with_eventfd=False, sample_width_bytes=4, channels=2)
    other = Ring.attach(ring_name, sample_width_bytes=4, channels=2)
    assert other.bytes_per_frame == 8 and other.dtype == np.dtype("<i4")
    frames = np.array([[1, -1], [70000, -70000], [3, 4]], dtype=np.int32)
    assert ring.write(frames) == 3
    assert ring.write(frames.tobytes()) == 3              # bytes: 8 a frame
    assert other.read_available == 6
    assert other.read(6).tolist() == frames.tolist() * 2
    with pytest.raises(RingError, match="sample_width_bytes 4, the caller expects 2"):
        Ring.attach(ring_name)
    other.close()
    ring.close()
    ring.unlink()


def test_playback_control_is_its_own_view(ring_name: str) -> None:
    producer = Ring.create(ring_name, 1024, with_eventfd=False)
    consumer = Ring.attach(ring_name)
    ctl: PlaybackControl = consumer.control
    producer.mark_start()
    producer.write(np.ones(100, dtype=np.int16))
    assert ctl.stream_start_ns(0) is not None and ctl.stream_start_ns(100) is None
    producer.mark_end()
    assert ctl.end_index == 100
    assert not ctl.flush_pending and ctl.take_flush() is None
    assert producer.request_flush() == 100
    assert ctl.flush_pending and ctl.flush_index == 100
    assert consumer.take_flush() and consumer.read_index == 100 and not ctl.flush_pending
    ctl.set_heard(90, 12)
    assert producer.heard_index == 90 and producer.device_latency_frames == 12
    assert producer.stats()["heard_index"] == 90
    consumer.close()
    producer.close()
    producer.unlink()

"""The shared-memory SPSC ring: a model-based test against a deque, flush, eventfd
wake-up, and a two-process stress test."""
from __future__ import annotations

from typing import Iterator

import multiprocessing as mp
import os
import random
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from engine.audio.ring import Ring, RingError, SampleFifo

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ring_name(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"realtalk-test-{os.getpid()}-{request.node.name[:30].replace('[', '-').replace(']', '')}"
    yield name
    Path("/dev/shm", name).unlink(missing_ok=True)


def test_model_based_against_a_deque(ring_name: str) -> None:
    rng = random.Random(7)
    ring = Ring.create(ring_name, 64)
    model: deque[int] = deque()
    overruns = 0
    counter = 0
    out = np.zeros(100, dtype=np.int16)
    for _ in range(5000):
        if rng.random() < 0.5:
            n = rng.randint(0, 80)
            data = np.arange(counter, counter + n, dtype=np.int64).astype(np.int16)
            counter += n
            fits = min(n, 64 - len(model))
            model.extend(int(x) for x in data[:fits])
            overruns += n - fits
            assert ring.write(data) == fits
        else:
            n = rng.randint(0, 80)
            got = ring.read_into(out[:n])
            want = [model.popleft() for _ in range(min(n, len(model)))]
            assert got == len(want)
            assert out[:got].tolist() == want
        assert ring.read_available == len(model)
        assert ring.write_available == 64 - len(model)
        assert ring.overrun_frames == overruns
    ring.unlink()


def test_power_of_two_and_attach_errors(ring_name: str) -> None:
    with pytest.raises(RingError, match="power of two"):
        Ring.create(ring_name, 1000)
    with pytest.raises(RingError, match="does not exist"):
        Ring.attach("realtalk-no-such-ring")


def test_flush_drops_what_was_written(ring_name: str) -> None:
    ring = Ring.create(ring_name, 1024)
    other = Ring.attach(ring_name)
    ring.write(np.ones(500, dtype=np.int16))
    assert not other.take_flush()
    ring.request_flush()
    ring.write(np.full(10, 7, dtype=np.int16))  # written after the request: kept
    assert other.flush_pending and other.take_flush()
    assert other.read_available == 10 and other.read(10).tolist() == [7] * 10
    assert not other.take_flush()
    other.count_underrun(3)
    assert ring.underrun_frames == 3
    other.close()
    ring.unlink()


def _producer(name: str, fd: int, frames: int, chunk: int) -> None:
    ring = Ring.attach(name, fd)
    sent = 0
    while sent < frames:
        n = min(chunk, frames - sent)
        data = (np.arange(sent, sent + n) % 32768).astype(np.int16)
        while ring.write_available < n:
            time.sleep(0.0001)   # the ring wakes its reader only: the writer polls for room
        assert ring.write(data) == n
        sent += n


@pytest.mark.e2e
def test_two_process_stress(ring_name: str) -> None:
    """A producer process writes a counting sequence; we read it all back in order, woken by eventfd."""
    ring = Ring.create(ring_name, 4096)
    frames, chunk = 2_000_000, 480
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_producer, args=(ring_name, ring.data_fd, frames, chunk))
    p.start()
    out = np.zeros(4096, dtype=np.int16)
    got = 0
    deadline = time.monotonic() + 50
    while got < frames and time.monotonic() < deadline:
        if not ring.wait_readable(1.0):
            continue
        n = ring.read_into(out)
        want = (np.arange(got, got + n) % 32768).astype(np.int16)
        assert np.array_equal(out[:n], want), f"corrupt data at frame {got}"
        got += n
    p.join(10)
    assert p.exitcode == 0
    assert got == frames
    assert ring.overrun_frames == 0
    ring.close()
    ring.unlink()


def test_wait_wakes_on_write(ring_name: str) -> None:
    import threading
    ring = Ring.create(ring_name, 1024)
    t0 = time.monotonic()
    threading.Timer(0.05, lambda: ring.write(np.ones(10, dtype=np.int16))).start()
    assert ring.wait_readable(5.0)
    assert time.monotonic() - t0 < 2.0
    ring.unlink()


def test_stale_wakeup_does_not_end_the_wait(ring_name: str) -> None:
    import threading
    ring = Ring.create(ring_name, 1024)
    ring.write(np.ones(10, dtype=np.int16))
    ring.read(10)  # the eventfd still holds the wake-up of that write
    threading.Timer(0.1, lambda: ring.write(np.ones(5, dtype=np.int16))).start()
    assert ring.wait_readable(5.0) and ring.read_available == 5
    ring.unlink()


def test_sample_fifo_keeps_order_and_counts_what_does_not_fit() -> None:
    fifo = SampleFifo(8)
    assert fifo.push(np.arange(5, dtype=np.int16)) == 0
    assert fifo.push(np.arange(5, 10, dtype=np.int16)) == 2  # 8 fit, 2 dropped
    assert fifo.head(3).tolist() == [0, 1, 2]
    fifo.drop(3)
    assert fifo.length == 5 and fifo.head(5).tolist() == [3, 4, 5, 6, 7]
    fifo.drop(99)
    assert fifo.length == 0


def test_write_takes_bytes_views_and_other_dtypes(ring_name: str) -> None:
    ring = Ring.create(ring_name, 16, with_eventfd=False)
    try:
        src = np.arange(12, dtype=np.int16)
        assert ring.write(src[::2]) == 6                      # not contiguous
        assert ring.write(np.array([7, 8], dtype=np.int32)) == 2   # converted, not reinterpreted
        assert ring.write(np.arange(100, 110, dtype=np.int16).tobytes()) == 8  # bytes; 2 over capacity
        assert ring.overrun_frames == 2
        assert ring.read(16).tolist() == [0, 2, 4, 6, 8, 10, 7, 8] + list(range(100, 108))
        assert ring.write(bytearray(np.arange(20, 30, dtype=np.int16).tobytes())) == 10  # wraps around
        assert ring.read(16).tolist() == list(range(20, 30))
    finally:
        ring.unlink()

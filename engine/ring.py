"""Single-producer/single-consumer PCM ring in POSIX shared memory.

Layout of the shared block (all counters int64, little-endian, each on its own
64-byte line; each counter has exactly one writer)::

    line 0  magic, capacity_frames, bytes_per_frame, sample_rate          (creator)
    line 1  write_index, overrun_frames, flush_seq, flush_until_index,
            writes, end_index, write_mono_ns                              (producer)
    line 2  read_index, underrun_frames, flush_ack_seq, heard_index,
            device_latency_frames, reads, reader_waiting                  (consumer)
    line 3  stream_start_index, stream_start_mono_ns                      (producer)
    data    capacity_frames * bytes_per_frame bytes, at offset 256

Indices only grow; ``index & (capacity - 1)`` is the position (capacity is a power of
two). The producer copies the frames, then publishes ``write_index``; the consumer
reads ``write_index`` and copies, then publishes ``read_index`` (x86-64 keeps stores in
order and aligned int64 stores are atomic; see JACK's ringbuffer.c for the same idea).
A full ring drops the frames that do not fit and counts them in ``overrun_frames``; an
empty ring is a count too (``count_underrun``). Nothing here raises on the audio path.

Wake-up: ``wait_readable`` blocks on an eventfd (poll), which wakes within tens of
microseconds. The consumer raises ``reader_waiting`` before it sleeps and the producer
writes the eventfd only when that flag is up, so a producer that streams faster than
the consumer sleeps pays no system call (and no wake-up) per write. The flag is the
Dekker pattern (store mine, then load yours on both sides): it needs a full memory
barrier between the store and the load, which on x86-64 any locked instruction gives
(``_full_barrier``: an uncontended lock). The eventfd is created by the ring's creator
and must be inherited by the other process (``pass_fds``).

``request_flush`` lets the producer tell the consumer to drop everything written so far
(barge-in): the consumer applies it at its next read via ``take_flush``.
"""
from __future__ import annotations

import mmap
import os
import select
import threading
import time
from pathlib import Path

import numpy as np

_MAGIC = 0x52_54_52_49_4E_47_30_31  # "RTRING01"
_HEADER_BYTES = 256
# int64 slots
_CAPACITY, _BPF, _RATE = 1, 2, 3
_W_INDEX, _OVERRUN, _FLUSH_SEQ, _FLUSH_UNTIL, _WRITES, _END, _W_NS = 8, 9, 10, 11, 12, 13, 14
_R_INDEX, _UNDERRUN, _FLUSH_ACK, _HEARD, _DEV_LATENCY, _READS, _R_WAITING = 16, 17, 18, 19, 20, 21, 22
_START_INDEX, _START_NS = 24, 25
_INT16 = np.dtype("<i2")
#: how long ``wait_readable`` polls before it sleeps: a burst then costs the producer no system
#: call per write, a stream at 50 writes/s costs the consumer 50 x this of CPU per second
_SPIN_NS = 20_000
_barrier_lock = threading.Lock()


def _full_barrier() -> None:
    """A StoreLoad barrier: acquiring a lock is a locked read-modify-write (x86-64: a full fence)."""
    with _barrier_lock:
        pass

SHM_DIR = Path("/dev/shm")


class RingError(Exception):
    """Base of the ring's errors (only raised when creating or attaching)."""


def _shm_path(name: str) -> Path:
    if "/" in name:
        raise RingError(f"ring name {name!r} must not contain '/'")
    return SHM_DIR / name


class Ring:
    """A PCM ring of int16 frames (mono: one sample per frame) in shared memory."""

    def __init__(self, name: str, mm: mmap.mmap, data_fd: int | None, owner: bool) -> None:
        self.name = name
        self._mm = mm
        self._hdr = memoryview(mm)[:_HEADER_BYTES].cast("q")  # Python ints: cheaper than numpy scalars
        if self._hdr[0] != _MAGIC:
            raise RingError(f"/dev/shm/{name} is not a realtalk ring (bad magic)")
        self.capacity_frames = (self._hdr[_CAPACITY])
        self.sample_rate = (self._hdr[_RATE])
        self._mask = self.capacity_frames - 1
        self._data = np.frombuffer(mm, dtype="<i2", offset=_HEADER_BYTES, count=self.capacity_frames)
        self._data_bytes = memoryview(mm)[_HEADER_BYTES:_HEADER_BYTES + 2 * self.capacity_frames]
        self.data_fd = data_fd
        self._owner = owner

    # -- creation -------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, capacity_frames: int, sample_rate: int = 24000,
               with_eventfd: bool = True) -> "Ring":
        """Create (or replace) the shared block; the creator unlinks it with ``unlink``."""
        if capacity_frames <= 0 or capacity_frames & (capacity_frames - 1):
            raise RingError(f"capacity_frames must be a power of two, got {capacity_frames}")
        size = _HEADER_BYTES + capacity_frames * 2
        path = _shm_path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        hdr = np.frombuffer(mm, dtype="<i8", count=_HEADER_BYTES // 8)
        hdr[:] = 0
        hdr[_CAPACITY], hdr[_BPF], hdr[_RATE] = capacity_frames, 2, sample_rate
        hdr[0] = _MAGIC
        del hdr
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if with_eventfd else None
        return cls(name, mm, efd, owner=True)

    @classmethod
    def attach(cls, name: str, data_fd: int | None = None) -> "Ring":
        """Attach to an existing ring; ``data_fd`` is the inherited eventfd, if any."""
        path = _shm_path(name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise RingError(f"ring {name!r} does not exist in /dev/shm (is the engine running?)") from None
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER_BYTES:
                raise RingError(f"/dev/shm/{name} is too small to be a ring")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, mm, data_fd, owner=False)

    def close(self) -> None:
        """Drop this process's mapping (and the eventfd, if this process created it)."""
        self._hdr.release()
        self._data_bytes.release()
        self._hdr = self._data = self._data_bytes = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:
            pass  # an exported view is still alive; the mapping goes with the process
        if self._owner and self.data_fd is not None:
            os.close(self.data_fd)
            self.data_fd = None

    def unlink(self) -> None:
        """Remove the shared block's name (creator only)."""
        try:
            _shm_path(self.name).unlink()
        except FileNotFoundError:
            pass

    # -- counters ----------------------------------------------------------------
    @property
    def write_index(self) -> int:
        return (self._hdr[_W_INDEX])

    @property
    def read_index(self) -> int:
        return (self._hdr[_R_INDEX])

    @property
    def read_available(self) -> int:
        return (self._hdr[_W_INDEX] - self._hdr[_R_INDEX])

    @property
    def write_available(self) -> int:
        return self.capacity_frames - self.read_available

    @property
    def overrun_frames(self) -> int:
        return (self._hdr[_OVERRUN])

    @property
    def underrun_frames(self) -> int:
        return (self._hdr[_UNDERRUN])

    @property
    def heard_index(self) -> int:
        """Index of the next frame to reach the listener (consumer's estimate)."""
        return (self._hdr[_HEARD])

    @property
    def device_latency_frames(self) -> int:
        return (self._hdr[_DEV_LATENCY])

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters, for status reports."""
        return {
            "capacity_frames": self.capacity_frames, "fill_frames": self.read_available,
            "write_index": self.write_index, "read_index": self.read_index,
            "overrun_frames": self.overrun_frames, "underrun_frames": self.underrun_frames,
            "heard_index": self.heard_index,
        }

    # -- producer side -------------------------------------------------------------
    def write(self, frames: np.ndarray | bytes | bytearray | memoryview) -> int:
        """Copy as many frames as fit; return how many. The rest count as overrun."""
        if isinstance(frames, np.ndarray) and frames.dtype != _INT16:
            frames = frames.astype(_INT16)  # a caller's float or int32 samples: converted, not reinterpreted
        try:
            src = memoryview(frames).cast("B")  # bytes: a plain memcpy, cheaper than numpy slicing
        except TypeError:  # not C-contiguous
            src = memoryview(np.ascontiguousarray(frames, dtype="<i2")).cast("B")
        hdr = self._hdr
        w = hdr[_W_INDEX]
        cap = self.capacity_frames
        free = cap - (w - hdr[_R_INDEX])
        n = len(src) >> 1
        if n > free:
            hdr[_OVERRUN] += n - free
            n = free
        if n:
            pos = w & self._mask
            data = self._data_bytes
            if pos + n <= cap:
                data[2 * pos:2 * (pos + n)] = src[:2 * n]
            else:
                first = cap - pos
                data[2 * pos:] = src[:2 * first]
                data[:2 * (n - first)] = src[2 * first:2 * n]
            hdr[_W_NS] = time.monotonic_ns()
            hdr[_W_INDEX] = w + n
            hdr[_WRITES] += 1
            if self.data_fd is not None:
                _full_barrier()  # the write_index store above is seen before reader_waiting is read
                if hdr[_R_WAITING]:
                    try:
                        os.eventfd_write(self.data_fd, 1)
                    except BlockingIOError:
                        pass  # counter saturated: the reader is already due to wake
        return n

    @property
    def write_stamp(self) -> tuple[int, int]:
        """(write_index, CLOCK_MONOTONIC ns) of the producer's latest write.

        For latency measurement: the two are separate stores, so in the rare sub-microsecond
        window between them the pair mixes two neighbouring writes.
        """
        ns = self._hdr[_W_NS]
        return self._hdr[_W_INDEX], ns

    def mark_start(self) -> None:
        """Say that the next write starts a stream, and when it arrived (for the consumer's prebuffer)."""
        self._hdr[_START_NS] = time.monotonic_ns()
        self._hdr[_START_INDEX] = self._hdr[_W_INDEX]  # stored last: a reader that sees it sees the time too

    def stream_start_ns(self, index: int) -> int | None:
        """When the stream starting at ``index`` began to arrive, if the producer marked it."""
        ns = self._hdr[_START_NS]
        return ns if self._hdr[_START_INDEX] == index and ns > 0 else None

    def mark_end(self) -> None:
        """Say that the frames written so far end a stream (a response's audio is complete)."""
        self._hdr[_END] = self._hdr[_W_INDEX]

    @property
    def end_index(self) -> int:
        return (self._hdr[_END])

    def request_flush(self) -> int:
        """Ask the consumer to drop all frames written so far; returns the flush index."""
        w = (self._hdr[_W_INDEX])
        self._hdr[_FLUSH_UNTIL] = w
        self._hdr[_FLUSH_SEQ] += 1
        return w

    # -- consumer side -------------------------------------------------------------
    def read_into(self, out: np.ndarray) -> int:
        """Copy up to ``len(out)`` frames into ``out``; return how many (no counting)."""
        n = self.peek_into(out)
        if n > 0:
            hdr = self._hdr
            hdr[_R_INDEX] += n
            hdr[_READS] += 1
        return n

    def peek_into(self, out: np.ndarray) -> int:
        """Copy up to ``len(out)`` frames into ``out`` without consuming them; return how many."""
        hdr = self._hdr
        r = (hdr[_R_INDEX])
        n = min(len(out), (hdr[_W_INDEX]) - r)
        if n > 0:
            pos = r & self._mask
            first = min(n, self.capacity_frames - pos)
            out[:first] = self._data[pos:pos + first]
            if n > first:
                out[first:n] = self._data[:n - first]
        return n

    def read(self, max_frames: int) -> np.ndarray:
        """Return up to ``max_frames`` frames as a new array (allocates; not for callbacks)."""
        out = np.empty(min(max_frames, self.read_available), dtype=np.int16)
        n = self.read_into(out)
        return out[:n]

    def skip(self, frames: int) -> int:
        """Drop up to ``frames`` frames without copying; return how many."""
        r = (self._hdr[_R_INDEX])
        n = max(0, min(frames, (self._hdr[_W_INDEX]) - r))
        self._hdr[_R_INDEX] = r + n
        return n

    def take_flush(self) -> bool:
        """If the producer asked for a flush, drop the frames it covers and return True."""
        hdr = self._hdr
        seq = (hdr[_FLUSH_SEQ])
        if seq == (hdr[_FLUSH_ACK]):
            return False
        until = (hdr[_FLUSH_UNTIL])
        if until > (hdr[_R_INDEX]):
            hdr[_R_INDEX] = until
        hdr[_FLUSH_ACK] = seq
        return True

    @property
    def flush_index(self) -> int:
        """The write index at the latest flush request: frames before it are to be dropped."""
        return self._hdr[_FLUSH_UNTIL]

    @property
    def flush_pending(self) -> bool:
        return (self._hdr[_FLUSH_SEQ]) != (self._hdr[_FLUSH_ACK])

    def count_underrun(self, frames: int) -> None:
        self._hdr[_UNDERRUN] += frames

    def set_heard(self, heard_index: int, device_latency_frames: int) -> None:
        self._hdr[_HEARD] = heard_index
        self._hdr[_DEV_LATENCY] = device_latency_frames

    def wait_readable(self, timeout_s: float) -> bool:
        """Block until frames are available or ``timeout_s`` passes; True if readable.

        A wake-up left over from frames already read is absorbed and the wait goes on.
        """
        if self.read_available > 0:
            return True  # the fast path leaves the flag (and the producer's cache line) alone
        if self.data_fd is None:
            raise RingError("this ring has no eventfd to wait on; pass data_fd to attach()")
        hdr = self._hdr
        spin_until = time.perf_counter_ns() + _SPIN_NS
        while time.perf_counter_ns() < spin_until:  # a producer mid-burst writes again within microseconds
            if hdr[_W_INDEX] != hdr[_R_INDEX]:
                return True
        deadline = time.monotonic() + timeout_s
        hdr[_R_WAITING] = 1
        try:
            _full_barrier()  # reader_waiting is seen before write_index is read (see the module docstring)
            while True:
                if self.read_available > 0:
                    return True
                r, _, _ = select.select([self.data_fd], [], [], max(0.0, deadline - time.monotonic()))
                if r:
                    try:
                        os.eventfd_read(self.data_fd)
                    except BlockingIOError:
                        pass
                if self.read_available > 0:
                    return True
                if time.monotonic() >= deadline:
                    return False
        finally:
            hdr[_R_WAITING] = 0


class SampleFifo:
    """An in-process int16 FIFO on a preallocated buffer, for one thread (device callbacks).

    ``push`` appends what fits and returns how many samples it dropped; ``head`` shows the
    oldest samples and ``drop`` forgets them. Nothing here allocates except the views it hands out.
    """

    def __init__(self, capacity: int) -> None:
        self._buf = np.zeros(capacity, dtype=np.int16)
        self.length = 0

    def push(self, pcm: np.ndarray) -> int:
        m = min(len(pcm), len(self._buf) - self.length)
        self._buf[self.length:self.length + m] = pcm[:m]
        self.length += m
        return len(pcm) - m

    def head(self, n: int) -> np.ndarray:
        """A view of the ``n`` oldest samples (valid until the next push or drop)."""
        return self._buf[:n]

    def drop(self, n: int) -> None:
        """Forget the ``n`` oldest samples."""
        n = min(n, self.length)
        self._buf[:self.length - n] = self._buf[n:self.length]
        self.length -= n

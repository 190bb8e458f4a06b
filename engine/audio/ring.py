"""Single-producer/single-consumer PCM ring in POSIX shared memory.

The ring is indices and data. :class:`Ring` moves frames (copying ``write`` /
``read_into``, or in place: ``write_regions`` / ``read_regions``, then ``commit_write`` /
``commit_read``); :class:`PlaybackControl` is a separate view of the few fields the speaker
ring's two ends use to talk about streams (flush request and acknowledgement, end mark,
stream start stamp, jitter-buffer target, heard index). Each method says whether it is *real-time safe* (no
system call but the eventfd wake-up, no allocation beyond a view, never blocks, never
raises) or *set-up only*.

Layout of the shared block (int64 little-endian slots, each group on its own 64-byte
line; each counter has exactly one writer)::

    line 0  magic, version, capacity_frames, bytes_per_frame, sample_rate_hz,
            sample_width_bytes, channels                                 (creator)
    line 1  write_index, overrun_frames, writes, write_mono_ns,
            due_seq, due_index, due_mono_ns, due_run_index              (producer)
    line 2  read_index, underrun_frames, reads, reader_waiting           (consumer)
    line 3  flush_seq, flush_index, end_index, stream_start_index,
            stream_start_mono_ns, target_frames, continuous              (producer: control)
    line 4  flush_ack_seq, heard_index, device_latency_frames,
            consumer_starts                                              (consumer: control)
    data    capacity_frames * bytes_per_frame bytes, at offset 320

Rules:

- Indices only grow; ``index & (capacity - 1)`` is the position (capacity is a power of
  two). The producer copies the frames, then publishes ``write_index``; the consumer reads
  ``write_index`` and copies, then publishes ``read_index`` (x86-64 keeps stores in order
  and aligned int64 stores are atomic; see JACK's ringbuffer.c for the same idea).
- A full ring drops the frames that do not fit and counts them in ``overrun_frames``; an
  empty ring is a count too (``count_underrun``). Nothing on the audio path raises.
- Wake-up: ``wait_readable`` blocks on an eventfd (poll), which wakes within tens of
  microseconds. The consumer raises ``reader_waiting`` before it sleeps and the producer
  writes the eventfd only when that flag is up, so a producer that streams faster than the
  consumer sleeps pays no system call (and no wake-up) per write. The flag is the Dekker
  pattern (store mine, then load yours on both sides): it needs a full memory barrier
  between the store and the load, which on x86-64 any locked instruction gives
  (``_full_barrier``: an uncontended lock). The eventfd is created by the ring's creator
  and must be inherited by the other process (``pass_fds``). ``reader_waiting`` stays in
  the ring proper: it is the data path's wake-up, used on the mic ring, not playback control.
- Due stamp (the reference ring): the producer says when a frame is due at its far end
  (``stamp_due``: the frame at ``due_index`` reaches the DAC at CLOCK_MONOTONIC
  ``due_mono_ns``, and the frames from ``due_run_index`` up to it follow one another without a
  gap), so the consumer can line frames up by time rather than by count. ``due_seq`` is a
  sequence lock (odd while the three are written), so a reader never mixes two stamps.
- Flush (barge-in): the producer's ``request_flush`` asks the consumer to drop everything
  written so far; the consumer applies it at its next read (``Ring.take_flush``).
- Jitter-buffer target (slot 29, ``target_frames``; the whole contract a renderer, Python or
  C, must honour). One int64, written only by the producer (a plain aligned store, no ordering
  beyond the x86-64/ARM64 acquire on ``stream_start_index`` below), read by the consumer:
  * 0 (a new ring, ``audio.jitter_buffer: fixed``, an adaptive producer that has not measured
    the link yet, or an older producer): no target; the consumer uses its own configured
    prebuffer, exactly as before the field existed.
  * N > 0: the adaptive jitter buffer's target, in ring frames (at the ring's sample rate).
    The consumer uses N in place of its configured prebuffer, in both places it uses it:
    a stream's start delay (its first frame is due N frames after ``stream_start_mono_ns``),
    and the time-stretcher's level while the stream plays (expand below (N - block)/2 left
    after the block, block = the consumer's device period; accelerate back to N - block).
    Its own growth after an underrun (+20 ms, half given back per clean stream, capped at its
    maximum) adds to N as it added to the prebuffer. N includes one device period of margin
    (engine/realtime/jitter.py): the block a callback reads ahead; the consumer adds, to N only,
    the spread of its own device's read-ahead beyond that (callbacks that bunch), which it
    measures, and leaves that out of the stretcher's headroom.
  * The consumer reads it at every callback (it may change at any delta: a GPT-Live track is
    one endless stream). The producer stores the target that covers a stream *before* that
    stream's ``mark_start``, so a consumer that sees the new ``stream_start_index`` sees it.
  Adding it did not change the layout's version: the slot was zero and unused in version 2, and
  zero means "as before" on both sides.
- Continuous stream (slot 30, ``continuous``; written by the producer before a stream's
  ``mark_start``, read by the consumer at every callback, as ``target_frames``). 0 (as before):
  a stream's audio may come ahead of real time (a Realtime reply: its server sends faster), so
  what the ring holds beyond the target is not latency, and the consumer's time-stretcher gives
  back only what it added itself. 1: the stream comes in real time and may last the session (a
  GPT-Live track): whatever the ring holds beyond the target for a second is latency a stall
  added, and the consumer accelerates it away (engine/playback/renderer.py,
  ``CONTINUOUS_SLACK_FRAMES``). Slot 30 was zero and unused too.
- ``attach`` checks the header (magic, version, size, rate, sample width, channels,
  capacity) and raises :class:`RingError` naming the mismatch.
- Another local user gets nothing: the engine's ring names are random (:func:`new_ring_name`,
  128 bits, nothing to guess from a pid); ``create`` makes the block new (``O_CREAT|O_EXCL``,
  never a file that exists, never through a symbolic link), mode 0600; ``attach`` opens it with
  ``O_NOFOLLOW`` and maps it only if ``fstat`` shows a regular file of this user's with no
  group or other bits, else :class:`RingError` naming the ring and whose it is.
"""
from __future__ import annotations

import mmap
from typing import Any
import os
import secrets
import select
import stat
import threading
import time
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from engine.pcm import CHANNELS, RATE_HZ, SAMPLE_WIDTH_BYTES

_MAGIC = 0x52_54_52_49_4E_47_30_31  # "RTRING01"
VERSION = 2                          #: of the shared layout; 1 had the control fields mixed in
_HEADER_BYTES = 320
# int64 slots
_VERSION, _CAPACITY, _BPF, _RATE, _WIDTH, _CHANNELS = 1, 2, 3, 4, 5, 6
_W_INDEX, _OVERRUN, _WRITES, _W_NS = 8, 9, 10, 11
_DUE_SEQ, _DUE_INDEX, _DUE_NS, _DUE_RUN = 12, 13, 14, 15
_R_INDEX, _UNDERRUN, _READS, _R_WAITING = 16, 17, 18, 19
_FLUSH_SEQ, _FLUSH_INDEX, _END, _START_INDEX, _START_NS, _TARGET, _CONTINUOUS = 24, 25, 26, 27, 28, 29, 30
_FLUSH_ACK, _HEARD, _DEV_LATENCY, _CONSUMER_STARTS = 32, 33, 34, 35
_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4")}
#: how long ``wait_readable`` polls before it sleeps: a burst then costs the producer no system
#: call per write, a stream at 50 writes/s costs the consumer 50 x this of CPU per second
_SPIN_NS = 20_000
_barrier_lock = threading.Lock()


def _full_barrier() -> None:
    """A StoreLoad barrier: acquiring a lock is a locked read-modify-write (x86-64: a full fence)."""
    with _barrier_lock:
        pass

SHM_DIR = Path("/dev/shm")


class RingError(EngineError):
    """A ring cannot be created or attached (only raised when setting up, never on the audio path)."""


def _shm_path(name: str) -> Path:
    if "/" in name:
        raise RingError(f"ring name {name!r} must not contain '/'")
    return SHM_DIR / name


def new_ring_name(prefix: str = "realtalk") -> str:
    """A fresh ring name nobody can guess: ``PREFIX-`` and 128 random bits in hex."""
    return f"{prefix}-{secrets.token_hex(16)}"


def _check_private(name: str, fd: int) -> None:
    """RingError unless the open block ``fd`` is a regular file of this user's, mode 0600 or
    stricter (set-up only)."""
    st = os.fstat(fd)
    where = f"/dev/shm/{name}"
    if not stat.S_ISREG(st.st_mode):
        raise RingError(f"ring {where} is not a regular file: refused")
    if st.st_uid != os.geteuid():
        raise RingError(f"ring {where} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): refused "
                        "(another user made it; the engine's rings are made new and private under random names)")
    if st.st_mode & 0o077:
        raise RingError(f"ring {where} has mode {stat.S_IMODE(st.st_mode):04o}: others may read or write it, "
                        "refused (a ring is 0600; remove it and start the engine again)")


class PlaybackControl:
    """The speaker ring's control fields, a view of the same shared block as its :class:`Ring`.

    Producer (the realtime process): ``mark_start``, ``mark_end``, ``request_flush``, ``set_target``.
    Consumer (the playback callback): ``take_flush`` (through :meth:`Ring.take_flush`, which
    also drops the frames), ``set_heard``. Both may read every field. All methods are
    real-time safe.
    """

    def __init__(self, mm: mmap.mmap) -> None:
        self._hdr = memoryview(mm)[:_HEADER_BYTES].cast("q")  # Python ints: cheaper than numpy scalars

    def close(self) -> None:
        """Drop the view (set-up only)."""
        self._hdr.release()

    # -- producer -----------------------------------------------------------------
    def mark_start(self, write_index: int) -> None:
        """Say that the frame at ``write_index`` starts a stream, and that it arrives now (for the
        consumer's prebuffer). Real-time safe."""
        self._hdr[_START_NS] = time.monotonic_ns()
        self._hdr[_START_INDEX] = write_index  # stored last: a reader that sees it sees the time too

    def set_target(self, frames: int) -> None:
        """Publish the jitter buffer's target in frames (0: none, the consumer's own prebuffer).
        Before ``mark_start`` for the stream it covers. Real-time safe."""
        self._hdr[_TARGET] = max(0, frames)

    def set_continuous(self, continuous: bool) -> None:
        """Say whether the next stream comes in real time and lasts (a GPT-Live track): before its
        ``mark_start``. Real-time safe."""
        self._hdr[_CONTINUOUS] = 1 if continuous else 0

    def mark_end(self, write_index: int) -> None:
        """Say that the frames before ``write_index`` end a stream. Real-time safe."""
        self._hdr[_END] = write_index

    def request_flush(self, write_index: int) -> int:
        """Ask the consumer to drop every frame before ``write_index``; returns it. Real-time safe."""
        self._hdr[_FLUSH_INDEX] = write_index
        self._hdr[_FLUSH_SEQ] += 1
        return write_index

    # -- consumer -----------------------------------------------------------------
    def take_flush(self) -> int | None:
        """Acknowledge a pending flush and return the index to drop up to (None: no flush).
        Real-time safe."""
        hdr = self._hdr
        seq = hdr[_FLUSH_SEQ]
        if seq == hdr[_FLUSH_ACK]:
            return None
        until = hdr[_FLUSH_INDEX]
        hdr[_FLUSH_ACK] = seq
        return until

    def count_consumer_start(self) -> int:
        """Count a consumer process starting on this ring; return how many started before it (more
        than 0: a restart within the same engine run, whose files are to be continued). Set-up only."""
        earlier = self._hdr[_CONSUMER_STARTS]
        self._hdr[_CONSUMER_STARTS] = earlier + 1
        return earlier

    def set_heard(self, heard_index: int, device_latency_frames: int) -> None:
        """Publish the index of the next frame to reach the listener. Real-time safe."""
        self._hdr[_HEARD] = heard_index
        self._hdr[_DEV_LATENCY] = device_latency_frames

    # -- either side ----------------------------------------------------------------
    @property
    def flush_pending(self) -> bool:
        """A flush was requested and not yet taken. Real-time safe."""
        return self._hdr[_FLUSH_SEQ] != self._hdr[_FLUSH_ACK]

    @property
    def flush_index(self) -> int:
        """The write index at the latest flush request: frames before it are to be dropped. Real-time safe."""
        return self._hdr[_FLUSH_INDEX]

    @property
    def end_index(self) -> int:
        """Where the latest marked stream ends. Real-time safe."""
        return self._hdr[_END]

    def stream_start_ns(self, index: int) -> int | None:
        """When the stream starting at ``index`` began to arrive, if the producer marked it. Real-time safe."""
        ns = self._hdr[_START_NS]
        return ns if self._hdr[_START_INDEX] == index and ns > 0 else None

    @property
    def target_frames(self) -> int:
        """The producer's jitter-buffer target in frames; 0: none (use the configured prebuffer).
        Real-time safe."""
        return self._hdr[_TARGET]

    @property
    def continuous(self) -> bool:
        """The stream comes in real time and lasts (the producer's ``set_continuous``). Real-time safe."""
        return self._hdr[_CONTINUOUS] != 0

    @property
    def heard_index(self) -> int:
        """Index of the next frame to reach the listener (the consumer's figure). Real-time safe."""
        return self._hdr[_HEARD]

    @property
    def device_latency_frames(self) -> int:
        """The output latency the consumer took off with its latest ``set_heard``. Real-time safe."""
        return self._hdr[_DEV_LATENCY]


class Ring:
    """A PCM ring of fixed-size frames (int16 mono by default) in shared memory.

    ``control`` is the :class:`PlaybackControl` view of the same block. The control methods
    on the ring itself (``mark_start``, ``request_flush``, ``heard_index``, ...) are kept for
    their callers and pass the ring's own write index on.
    """

    def __init__(self, name: str, mm: mmap.mmap, data_fd: int | None, owner: bool) -> None:
        """Wrap a mapped, already checked block (set-up only; use :meth:`create` or :meth:`attach`)."""
        self.name = name
        self._mm = mm
        self._hdr = memoryview(mm)[:_HEADER_BYTES].cast("q")
        self.capacity_frames: int = self._hdr[_CAPACITY]
        self.sample_rate: int = self._hdr[_RATE]
        self.sample_width_bytes: int = self._hdr[_WIDTH]
        self.channels: int = self._hdr[_CHANNELS]
        self.bytes_per_frame: int = self._hdr[_BPF]
        self.dtype = _DTYPES[self.sample_width_bytes]
        self._mask = self.capacity_frames - 1
        data = np.frombuffer(mm, dtype=self.dtype, offset=_HEADER_BYTES, count=self.capacity_frames * self.channels)
        self._data = data if self.channels == 1 else data.reshape(self.capacity_frames, self.channels)
        self._data_bytes = memoryview(mm)[_HEADER_BYTES:_HEADER_BYTES + self.bytes_per_frame * self.capacity_frames]
        self.control = PlaybackControl(mm)
        self.data_fd = data_fd
        self._owner = owner

    # -- creation -------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, capacity_frames: int, sample_rate: int = RATE_HZ,
               with_eventfd: bool = True, sample_width_bytes: int = SAMPLE_WIDTH_BYTES, channels: int = CHANNELS) -> "Ring":
        """Create the shared block ``name`` new (exclusively, mode 0600: a name that exists is
        refused, never reused; give it :func:`new_ring_name`); the creator unlinks it with
        ``unlink``. Set-up only."""
        if capacity_frames <= 0 or capacity_frames & (capacity_frames - 1):
            raise RingError(f"capacity_frames must be a power of two, got {capacity_frames}")
        if sample_width_bytes not in _DTYPES:
            raise RingError(f"sample_width_bytes must be one of {sorted(_DTYPES)}, got {sample_width_bytes}")
        if channels < 1:
            raise RingError(f"channels must be at least 1, got {channels}")
        bpf = sample_width_bytes * channels
        size = _HEADER_BYTES + capacity_frames * bpf
        path = _shm_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise RingError(f"ring /dev/shm/{name} already exists: a ring is only ever made new, refused (another "
                            "process, maybe another user's, made it; use a fresh name: new_ring_name())") from None
        except OSError as exc:
            raise RingError(f"cannot make the ring /dev/shm/{name}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)   # exactly 0600 whatever the umask
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except OSError as exc:   # /dev/shm full: the name made just now goes again
            path.unlink(missing_ok=True)
            raise RingError(f"cannot make the ring /dev/shm/{name} ({size} bytes): {exc.strerror}") from None
        finally:
            os.close(fd)
        hdr = np.frombuffer(mm, dtype="<i8", count=_HEADER_BYTES // 8)
        hdr[:] = 0
        hdr[_VERSION], hdr[_CAPACITY], hdr[_BPF], hdr[_RATE] = VERSION, capacity_frames, bpf, sample_rate
        hdr[_WIDTH], hdr[_CHANNELS] = sample_width_bytes, channels
        hdr[0] = _MAGIC  # stored last: a block with the magic is complete
        del hdr
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if with_eventfd else None
        return cls(name, mm, efd, owner=True)

    @classmethod
    def attach(cls, name: str, data_fd: int | None = None, *, sample_rate: int | None = RATE_HZ,
               sample_width_bytes: int | None = SAMPLE_WIDTH_BYTES, channels: int | None = CHANNELS,
               capacity_frames: int | None = None) -> "Ring":
        """Attach to an existing ring of this user's (its owner and mode are checked before it is
        mapped); ``data_fd`` is the inherited eventfd, if any. Set-up only.

        The header must match what this caller will read and write: each expectation that is
        not None is checked, and a mismatch (or a block that is not a ring of this version)
        raises :class:`RingError` naming the field, both values and what to do.
        """
        path = _shm_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RingError(f"ring {name!r} does not exist in /dev/shm (is the engine running?)") from None
        except OSError as exc:   # a symbolic link (ELOOP), or another user's block (EACCES)
            raise RingError(f"cannot open the ring /dev/shm/{name}: {exc.strerror}; refused") from None
        try:
            _check_private(name, fd)
            size = os.fstat(fd).st_size
            if size < _HEADER_BYTES:
                raise RingError(f"/dev/shm/{name} is too small to be a ring ({size} bytes)")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        try:
            _check_header(name, mm, size, {"sample_rate": (_RATE, sample_rate),
                                           "sample_width_bytes": (_WIDTH, sample_width_bytes),
                                           "channels": (_CHANNELS, channels),
                                           "capacity_frames": (_CAPACITY, capacity_frames)})
        except RingError:
            mm.close()
            raise
        return cls(name, mm, data_fd, owner=False)

    def close(self) -> None:
        """Drop this process's mapping (and the eventfd, if this process created it). Set-up only."""
        self._hdr.release()
        self._data_bytes.release()
        self.control.close()
        self._hdr = self._data = self._data_bytes = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:
            pass  # a view handed out (regions) is still alive; the mapping goes with the process
        if self._owner and self.data_fd is not None:
            os.close(self.data_fd)
            self.data_fd = None

    def unlink(self) -> None:
        """Remove the shared block's name (creator only). Set-up only."""
        try:
            _shm_path(self.name).unlink()
        except FileNotFoundError:
            pass

    @property
    def mapping(self) -> mmap.mmap:
        """The shared block itself, for the native backend (engine/audio/native.py), which reads
        and writes it through its own view of this layout. Set-up only."""
        return self._mm

    # -- counters (real-time safe) ----------------------------------------------------
    @property
    def write_index(self) -> int:
        """Frames written since creation. Real-time safe."""
        return self._hdr[_W_INDEX]

    @property
    def read_index(self) -> int:
        """Frames read (or skipped) since creation. Real-time safe."""
        return self._hdr[_R_INDEX]

    @property
    def read_available(self) -> int:
        """Frames written and not yet read. Real-time safe."""
        return self._hdr[_W_INDEX] - self._hdr[_R_INDEX]

    @property
    def write_available(self) -> int:
        """Frames that fit. Real-time safe."""
        return self.capacity_frames - self.read_available

    @property
    def overrun_frames(self) -> int:
        """Frames dropped because the ring was full. Real-time safe."""
        return self._hdr[_OVERRUN]

    @property
    def underrun_frames(self) -> int:
        """Frames the consumer counted as missing (``count_underrun``). Real-time safe."""
        return self._hdr[_UNDERRUN]

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters, for status reports. Set-up only (allocates a dict)."""
        return {
            "capacity_frames": self.capacity_frames, "fill_frames": self.read_available,
            "write_index": self.write_index, "read_index": self.read_index,
            "overrun_frames": self.overrun_frames, "underrun_frames": self.underrun_frames,
            "heard_index": self.control.heard_index,
        }

    # -- producer side -------------------------------------------------------------
    def write(self, frames: np.ndarray | bytes | bytearray | memoryview) -> int:
        """Copy as many frames as fit; return how many. The rest count as overrun. Real-time safe
        for C-contiguous input of the ring's dtype (other input is converted first: allocates)."""
        if isinstance(frames, np.ndarray) and frames.dtype != self.dtype:
            frames = frames.astype(self.dtype)  # a caller's float or int32 samples: converted, not reinterpreted
        try:
            src = memoryview(frames).cast("B")  # type: ignore[arg-type]  # bytes: a plain memcpy, cheaper than slicing
        except TypeError:  # not C-contiguous
            src = memoryview(np.ascontiguousarray(frames, dtype=self.dtype)).cast("B")  # type: ignore[arg-type]
        hdr = self._hdr
        w = hdr[_W_INDEX]
        cap = self.capacity_frames
        bpf = self.bytes_per_frame
        free = cap - (w - hdr[_R_INDEX])
        n = len(src) // bpf
        if n > free:
            hdr[_OVERRUN] += n - free
            n = free
        if n:
            pos = w & self._mask
            data = self._data_bytes
            if pos + n <= cap:
                data[bpf * pos:bpf * (pos + n)] = src[:bpf * n]
            else:
                first = cap - pos
                data[bpf * pos:] = src[:bpf * first]
                data[:bpf * (n - first)] = src[bpf * first:bpf * n]
            # inline, not _published(): this is the hot path (one call less per write)
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

    def write_regions(self, max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The free space as two views of the ring's data (the second is empty unless the space
        wraps): fill a prefix of them, then ``commit_write`` how many frames. Real-time safe
        (the views are small objects; no copy). Frames that do not fit are the caller's to count
        (``count_overrun``)."""
        w = self._hdr[_W_INDEX]
        n = self.capacity_frames - (w - self._hdr[_R_INDEX])
        if max_frames is not None:
            n = max(0, min(n, max_frames))
        return self._regions(w, n)

    def commit_write(self, frames: int) -> None:
        """Publish ``frames`` frames filled in through ``write_regions`` (and wake a waiting reader).
        Real-time safe. ``frames`` must not exceed what ``write_regions`` handed out."""
        if frames > 0:
            self._published(self._hdr[_W_INDEX] + frames)

    def count_overrun(self, frames: int) -> None:
        """Count frames the producer dropped (a full ring). Real-time safe."""
        self._hdr[_OVERRUN] += frames

    def _published(self, new_write_index: int) -> None:
        hdr = self._hdr
        hdr[_W_NS] = time.monotonic_ns()
        hdr[_W_INDEX] = new_write_index
        hdr[_WRITES] += 1
        if self.data_fd is not None:
            _full_barrier()  # the write_index store above is seen before reader_waiting is read
            if hdr[_R_WAITING]:
                try:
                    os.eventfd_write(self.data_fd, 1)
                except BlockingIOError:
                    pass  # counter saturated: the reader is already due to wake

    def stamp_due(self, index: int, due_ns: int, run_index: int) -> None:
        """Producer: the frame at ``index`` is due at its far end (the reference ring: reaches the
        DAC) at CLOCK_MONOTONIC ``due_ns``, and the frames from ``run_index`` to it are due one
        after another, without a gap. Real-time safe."""
        hdr = self._hdr
        seq = hdr[_DUE_SEQ]
        hdr[_DUE_SEQ] = seq + 1       # odd: a reader now retries
        hdr[_DUE_INDEX] = index
        hdr[_DUE_NS] = due_ns
        hdr[_DUE_RUN] = run_index
        hdr[_DUE_SEQ] = seq + 2

    def due_stamp(self) -> tuple[int, int, int] | None:
        """The producer's latest ``stamp_due`` as (index, due_ns, run_index); None if it never
        stamped (or was writing a stamp at each of three tries). Real-time safe."""
        hdr = self._hdr
        for _ in range(3):
            seq = hdr[_DUE_SEQ]
            if seq == 0:
                return None
            if seq & 1:
                continue
            stamp = (hdr[_DUE_INDEX], hdr[_DUE_NS], hdr[_DUE_RUN])
            if hdr[_DUE_SEQ] == seq:
                return stamp
        return None

    @property
    def write_stamp(self) -> tuple[int, int]:
        """(write_index, CLOCK_MONOTONIC ns) of the producer's latest write. Real-time safe.

        For latency measurement: the two are separate stores, so in the rare sub-microsecond
        window between them the pair mixes two neighbouring writes.
        """
        ns = self._hdr[_W_NS]
        return self._hdr[_W_INDEX], ns

    # -- consumer side -------------------------------------------------------------
    def _regions(self, index: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        pos = index & self._mask
        first = min(n, self.capacity_frames - pos)
        return self._data[pos:pos + first], self._data[:n - first]

    def read_regions(self, max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The readable frames as two views of the ring's data, oldest first (the second is empty
        unless they wrap); nothing is consumed until ``commit_read``. Real-time safe (no copy).
        A view is valid until the frames are committed (the producer may then overwrite them)."""
        r = self._hdr[_R_INDEX]
        n = self._hdr[_W_INDEX] - r
        if max_frames is not None:
            n = max(0, min(n, max_frames))
        return self._regions(r, n)

    def commit_read(self, frames: int) -> int:
        """Consume up to ``frames`` frames (seen through ``read_regions``, or skipped); return how
        many. Real-time safe."""
        hdr = self._hdr
        r = hdr[_R_INDEX]
        n = max(0, min(frames, hdr[_W_INDEX] - r))
        if n:
            hdr[_R_INDEX] = r + n
            hdr[_READS] += 1
        return n

    def read_into(self, out: np.ndarray) -> int:
        """Copy up to ``len(out)`` frames into ``out`` and consume them; return how many (no
        underrun counting). Real-time safe."""
        n = self.peek_into(out)
        if n > 0:
            hdr = self._hdr
            hdr[_R_INDEX] += n
            hdr[_READS] += 1
        return n

    def peek_into(self, out: np.ndarray) -> int:
        """Copy up to ``len(out)`` frames into ``out`` without consuming them; return how many.
        Real-time safe."""
        hdr = self._hdr
        r = hdr[_R_INDEX]
        n = min(len(out), hdr[_W_INDEX] - r)
        if n > 0:
            pos = r & self._mask
            first = min(n, self.capacity_frames - pos)
            out[:first] = self._data[pos:pos + first]
            if n > first:
                out[first:n] = self._data[:n - first]
        return n

    def read(self, max_frames: int) -> np.ndarray:
        """Return up to ``max_frames`` frames as a new array. Set-up only (allocates; not for callbacks)."""
        shape = (min(max_frames, self.read_available),) + ((self.channels,) if self.channels > 1 else ())
        out = np.empty(shape, dtype=self.dtype)
        n = self.read_into(out)
        return out[:n]

    def skip(self, frames: int) -> int:
        """Drop up to ``frames`` frames without copying; return how many. Real-time safe."""
        r = self._hdr[_R_INDEX]
        n = max(0, min(frames, self._hdr[_W_INDEX] - r))
        self._hdr[_R_INDEX] = r + n
        return n

    def take_flush(self) -> bool:
        """If the producer asked for a flush, drop the frames it covers and return True. Real-time safe."""
        until = self.control.take_flush()
        if until is None:
            return False
        r = self._hdr[_R_INDEX]
        if until > r:
            self.skip(until - r)
        return True

    def count_underrun(self, frames: int) -> None:
        """Count frames the consumer found missing. Real-time safe."""
        self._hdr[_UNDERRUN] += frames

    def arm_wake(self) -> bool:
        """For a consumer on an event loop (watching ``data_fd`` for readability) in place of
        :meth:`wait_readable`: raise ``reader_waiting``, so the producer's next write signals the
        eventfd. True if the ring is still empty (wait for the fd); False if frames came in
        meanwhile (the flag is lowered again: read them). Real-time safe."""
        hdr = self._hdr
        hdr[_R_WAITING] = 1
        _full_barrier()  # reader_waiting is seen before write_index is read (see the module docstring)
        if hdr[_W_INDEX] != hdr[_R_INDEX]:
            hdr[_R_WAITING] = 0
            return False
        return True

    def take_wake(self) -> None:
        """The eventfd signalled (see :meth:`arm_wake`): absorb it and lower ``reader_waiting``.
        Real-time safe."""
        if self.data_fd is not None:
            try:
                os.eventfd_read(self.data_fd)
            except BlockingIOError:
                pass  # already absorbed
        self._hdr[_R_WAITING] = 0

    def wait_readable(self, timeout_s: float) -> bool:
        """Block until frames are available or ``timeout_s`` passes; True if readable. Blocks: for
        a consumer thread, never a device callback. Raises RingError without an eventfd.

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

    # -- the playback control fields, kept here for their callers (see ``control``) ----
    def mark_start(self) -> None:
        """Say that the next write starts a stream (``control.mark_start``). Real-time safe."""
        self.control.mark_start(self._hdr[_W_INDEX])

    def mark_end(self) -> None:
        """Say that the frames written so far end a stream (``control.mark_end``). Real-time safe."""
        self.control.mark_end(self._hdr[_W_INDEX])

    def request_flush(self) -> int:
        """Ask the consumer to drop all frames written so far; returns the flush index. Real-time safe."""
        return self.control.request_flush(self._hdr[_W_INDEX])

    def stream_start_ns(self, index: int) -> int | None:
        """``control.stream_start_ns``. Real-time safe."""
        return self.control.stream_start_ns(index)

    def set_heard(self, heard_index: int, device_latency_frames: int) -> None:
        """``control.set_heard``. Real-time safe."""
        self.control.set_heard(heard_index, device_latency_frames)

    @property
    def end_index(self) -> int:
        return self.control.end_index

    @property
    def flush_pending(self) -> bool:
        return self.control.flush_pending

    @property
    def flush_index(self) -> int:
        return self.control.flush_index

    @property
    def heard_index(self) -> int:
        """Index of the next frame to reach the listener (consumer's estimate). Real-time safe."""
        return self.control.heard_index

    @property
    def device_latency_frames(self) -> int:
        return self.control.device_latency_frames


def _check_header(name: str, mm: mmap.mmap, size: int, expect: dict[str, tuple[int, int | None]]) -> None:
    """Raise RingError unless ``mm`` holds a ring of this version whose fields match ``expect``
    (field name -> (slot, expected value or None)). Set-up only."""
    hdr = memoryview(mm)[:_HEADER_BYTES].cast("q")
    try:
        where = f"/dev/shm/{name}"
        if hdr[0] != _MAGIC:
            raise RingError(f"{where} is not a realtalk ring (bad magic {hdr[0]:#x}); remove it or "
                            "pick another name")
        if hdr[_VERSION] != VERSION:
            raise RingError(f"{where} has ring layout version {hdr[_VERSION]}, this engine uses {VERSION}: "
                            "stop the engine that made it (engine stop) and start again")
        cap, width, channels = hdr[_CAPACITY], hdr[_WIDTH], hdr[_CHANNELS]
        if cap <= 0 or cap & (cap - 1):
            raise RingError(f"{where}: capacity_frames {cap} is not a power of two (a corrupt header)")
        if width not in _DTYPES or channels < 1 or hdr[_BPF] != width * channels:
            raise RingError(f"{where}: bytes_per_frame {hdr[_BPF]} does not match sample_width_bytes {width} "
                            f"x channels {channels} (a corrupt header)")
        if size < _HEADER_BYTES + cap * hdr[_BPF]:
            raise RingError(f"{where} is {size} bytes, too small for {cap} frames of {hdr[_BPF]} bytes")
        for field, (slot, want) in expect.items():
            if want is not None and hdr[slot] != want:
                raise RingError(f"{where} has {field} {hdr[slot]}, the caller expects {want}: the ring was "
                                "made for another format (check the engine's ring set-up)")
    finally:
        hdr.release()


class SampleFifo:
    """An in-process int16 FIFO on a preallocated buffer, for one thread (device callbacks).

    ``push`` appends what fits and returns how many samples it dropped; ``head`` shows the
    oldest samples and ``drop`` forgets them. Nothing here allocates except the views it
    hands out. All methods are real-time safe.
    """

    def __init__(self, capacity: int) -> None:
        """Set-up only."""
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

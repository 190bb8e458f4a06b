"""Session recording: one stereo WAV per session, left the mic as captured, right the
model as the speaker actually played it (silence, underrun gaps and truncation included),
both 24 kHz PCM16, frame-aligned as the capture process sees them.

:class:`Recorder` has an audio side (``push``: a copy into a preallocated in-process
ring, dropped frames counted, never blocks) and a writer side (``drain``: the capture
process's main thread appends to the WAV file).
"""
from __future__ import annotations

import os
import struct
import wave
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from engine.pcm import RATE_HZ, SAMPLE_WIDTH_BYTES


class Recorder:
    def __init__(self, path: str | Path, capacity_frames: int = RATE_HZ * 8) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wav = wave.open(str(self.path), "wb")
        self._wav.setnchannels(2)
        self._wav.setsampwidth(SAMPLE_WIDTH_BYTES)
        self._wav.setframerate(RATE_HZ)
        self._buf = np.zeros((capacity_frames, 2), dtype=np.int16)
        self._cap = capacity_frames
        self._w = 0              # frames pushed (audio side only)
        self._r = 0              # frames written to the file (writer side only)
        self.dropped_frames = 0
        self.frames_written = 0

    def push(self, mic: np.ndarray, played: np.ndarray) -> None:
        """Audio side: queue ``len(mic)`` stereo frames (``played`` is as long or longer)."""
        n = len(mic)
        if self._w + n - self._r > self._cap:
            self.dropped_frames += n
            return
        pos = self._w % self._cap
        first = min(n, self._cap - pos)
        self._buf[pos:pos + first, 0] = mic[:first]
        self._buf[pos:pos + first, 1] = played[:first]
        if n > first:
            self._buf[:n - first, 0] = mic[first:n]
            self._buf[:n - first, 1] = played[first:n]
        self._w += n

    def drain(self) -> None:
        """Writer side: append what was pushed to the file."""
        w = self._w
        while self._r < w:
            pos = self._r % self._cap
            n = min(w - self._r, self._cap - pos)
            self._wav.writeframes(self._buf[pos:pos + n].tobytes())
            self._r += n
            self.frames_written += n

    def close(self) -> None:
        """Write what is left and close; the file is closed even when a write fails (a full disk:
        the header already counts what was written before)."""
        try:
            self.drain()
        finally:
            self._wav.close()


class WavAppendError(EngineError):
    """An existing file cannot be continued as the WAV asked for (names what differs)."""


class PcmWav:
    """A PCM WAV file written as it goes, that a later process can continue instead of wiping.

    ``PcmWav(path, append=True)`` continues an existing file of the same format (channels,
    sample width, rate): its data length is taken from the file's size, not its header, so a
    file whose writer was killed mid-write is continued whole (a partial last frame is cut).
    Without ``append``, or when there is no file yet, it starts a new one. The header's sizes
    are patched after every write (as the ``wave`` module does), so a killed writer leaves a
    readable file. Raises :class:`WavAppendError` if the file exists but is not such a WAV.
    Writes are plain ``write``/``pwrite`` calls: for a writer thread, not a device callback.
    """

    _HEADER_BYTES = 44

    def __init__(self, path: str | Path, channels: int = 1, sample_width_bytes: int = 2,
                 rate_hz: int = RATE_HZ, append: bool = False) -> None:
        self.path = Path(path)
        self.bytes_per_frame = channels * sample_width_bytes
        self.appended_frames = 0   # frames the file held when this writer continued it
        fmt = struct.pack("<HHIIHH", 1, channels, rate_hz, rate_hz * self.bytes_per_frame,
                          self.bytes_per_frame, 8 * sample_width_bytes)
        if append and self.path.exists() and self.path.stat().st_size > 0:
            self._fd = os.open(self.path, os.O_RDWR)
            try:
                self._data_offset, data_bytes = self._find_data(fmt)
            except BaseException:
                os.close(self._fd)
                raise
            data_bytes -= data_bytes % self.bytes_per_frame
            os.ftruncate(self._fd, self._data_offset + data_bytes)
            self.appended_frames = data_bytes // self.bytes_per_frame
        else:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(self._fd, b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", 0))
            self._data_offset, data_bytes = self._HEADER_BYTES, 0
        self._data_bytes = data_bytes
        os.lseek(self._fd, self._data_offset + data_bytes, os.SEEK_SET)
        self._patch()

    def _find_data(self, fmt: bytes) -> tuple[int, int]:
        """(offset of the data chunk's payload, its length by the file's size); checks the format."""
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 12, 0)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise WavAppendError(f"{self.path} is not a WAV file; move it away or name another speaker file")
        pos, seen_fmt = 12, None
        while pos + 8 <= size:
            cid, clen = struct.unpack("<4sI", os.pread(self._fd, 8, pos))
            if cid == b"fmt ":
                seen_fmt = os.pread(self._fd, 16, pos + 8)
            elif cid == b"data":
                if seen_fmt != fmt:
                    raise WavAppendError(f"{self.path} holds audio of another format than this writer's "
                                         f"(channels, width, rate); move it away or name another file")
                return pos + 8, size - (pos + 8)
            pos += 8 + clen + (clen & 1)
        raise WavAppendError(f"{self.path} has no data chunk; move it away or name another file")

    def _patch(self) -> None:
        os.pwrite(self._fd, struct.pack("<I", self._data_offset - 8 + self._data_bytes), 4)
        os.pwrite(self._fd, struct.pack("<I", self._data_bytes), self._data_offset - 4)

    def writeframes(self, data: bytes | bytearray | memoryview) -> None:
        """Append whole frames and patch the header's sizes."""
        view = memoryview(data).cast("B")
        while len(view):
            n = os.write(self._fd, view)
            view = view[n:]
            self._data_bytes += n
        self._patch()

    @property
    def frames(self) -> int:
        """Frames in the file (the continued ones included)."""
        return self._data_bytes // self.bytes_per_frame

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "PcmWav":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

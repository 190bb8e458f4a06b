"""PyAudio devices: listing, choosing by name or index, quiet initialisation.

PyAudio must be initialised in the process that uses it, after the PulseAudio daemon
is up (``default`` maps to pulse only then), and never inherited across fork.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import select
import threading
from typing import Any, Callable, Iterator

from engine.child import woken
from engine.errors import DeviceError

#: soxr quality for the streaming resamplers: "LQ" (16-bit, the depth of our PCM) hands out
#: output every chunk at 44.1/24 kHz (882 samples per 20 ms); "HQ" holds back ~30 ms blocks,
#: which delayed the first sample to the speaker and the mic audio to the socket. Even "LQ" hands
#: out 48 <-> 24 kHz in 2^10-frame DFT blocks (10.8 ms held back a stage on average); the native
#: backend's libsoxr streams use 2^8-frame ones (_native.c, SOXR_LOG2_DFT: 2.7 ms), which
#: python-soxr has no setting for
RESAMPLE_QUALITY = "LQ"


def resample_stream(in_rate_hz: int, out_rate_hz: int) -> Any:
    """A mono int16 soxr stream resampler (``resample_chunk``) at :data:`RESAMPLE_QUALITY`."""
    import soxr
    return soxr.ResampleStream(in_rate_hz, out_rate_hz, 1, dtype="int16", quality=RESAMPLE_QUALITY)

_alsa_handler = None  # keep the ctypes callback alive


def _silence_alsa() -> None:
    global _alsa_handler
    if _alsa_handler is not None:
        return
    try:
        asound = ctypes.cdll.LoadLibrary("libasound.so.2")
        proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p)
        _alsa_handler = proto(lambda *args: None)
        asound.snd_lib_error_set_handler(_alsa_handler)
    except OSError:
        pass


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """PortAudio's JACK probe prints to fd 2; hide it during init."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def open_pyaudio() -> Any:
    """A PyAudio instance with ALSA/JACK chatter silenced."""
    try:
        import pyaudio
    except ImportError as exc:
        raise DeviceError(f"PyAudio is not installed ({exc}); run: bash tools/setup-system.sh") from None
    _silence_alsa()
    with _stderr_to_devnull():
        return pyaudio.PyAudio()


def list_devices(pa: Any | None = None) -> list[dict[str, Any]]:
    """Every PyAudio device: index, name, input/output channels, default rate."""
    own = pa is None
    pa = pa or open_pyaudio()
    try:
        out = []
        for i in range(pa.get_device_count()):
            d = pa.get_device_info_by_index(i)
            out.append({"index": i, "name": d["name"], "inputs": int(d["maxInputChannels"]),
                        "outputs": int(d["maxOutputChannels"]), "default_rate_hz": int(d["defaultSampleRate"])})
        return out
    finally:
        if own:
            pa.terminate()


def describe_devices(devices: list[dict[str, Any]], kind: str) -> str:
    key = "inputs" if kind == "input" else "outputs"
    rows = [f"  [{d['index']}] {d['name']} ({d['default_rate_hz']} Hz)" for d in devices if d[key] > 0]
    return "\n".join(rows) if rows else "  (none: is PulseAudio running? try: bash tools/vaudio.sh start)"


def find_device(pa: Any, spec: str | int, kind: str) -> dict[str, Any]:
    """The device for ``spec`` (index, exact name, or unique name substring)."""
    devices = list_devices(pa)
    key = "inputs" if kind == "input" else "outputs"
    usable = [d for d in devices if d[key] > 0]
    if spec in ("default", None):
        try:
            info = pa.get_default_input_device_info() if kind == "input" else pa.get_default_output_device_info()
            return next(d for d in devices if d["index"] == info["index"])
        except (IOError, OSError, StopIteration):
            raise DeviceError(f"no default {kind} device. {kind.capitalize()} devices:\n"
                              + describe_devices(devices, kind)) from None
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        idx = int(spec)
        for d in usable:
            if d["index"] == idx:
                return d
        raise DeviceError(f"no {kind} device with index {idx}. {kind.capitalize()} devices:\n" + describe_devices(devices, kind))
    exact = [d for d in usable if d["name"] == spec]
    if exact:
        return exact[0]
    partial = [d for d in usable if str(spec).lower() in d["name"].lower()]
    if len(partial) == 1:
        return partial[0]
    why = "matches several" if partial else "matches no"
    raise DeviceError(f"{kind} device {spec!r} {why} {kind} device. {kind.capitalize()} devices:\n"
                      + describe_devices(devices, kind))


def keep_running(pa: Any, stream: Any, stop: threading.Event, chore: Callable[[], None], every_s: float,
                 wake_fd: int | None = None, watch: tuple[int, Callable[[], None]] | None = None) -> None:
    """Let a callback ``stream`` run until ``stop`` is set or it ends, doing ``chore`` every
    ``every_s`` on this (non-audio) thread, and at once whenever ``wake_fd`` (an eventfd the
    callback writes; whoever sets ``stop`` writes it too) becomes readable; then stop and close
    the stream and terminate ``pa``. ``watch``: (fd, take): ``take`` is called, then ``chore``,
    whenever ``fd`` becomes readable (a bus subscriber's ZeroMQ FD: ``take`` reads every message
    queued, so nothing polls the socket in between)."""
    poller = select.poll()
    if wake_fd is not None:
        poller.register(wake_fd, select.POLLIN)
    if watch is not None:
        poller.register(watch[0], select.POLLIN)
    try:
        while not stop.is_set() and stream.is_active():
            chore()
            if wake_fd is None and watch is None:
                stop.wait(every_s)
                continue
            for fd, _ in poller.poll(every_s * 1000):
                if fd == wake_fd:
                    woken(fd)
                elif watch is not None:
                    watch[1]()
    finally:
        stream.stop_stream()
        stream.close()
        pa.terminate()

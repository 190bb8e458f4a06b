"""The native audio backend's Python face: the C extension ``engine.audio._native`` (its rules
are written at the top of ``_native.c``), whether it is there, and the two objects the
processes use.

* :class:`NativeRenderer` is the playback renderer with :class:`engine.playback.renderer.Renderer`'s
  interface (and :class:`DeviceFeeder`'s ``fill``), run by a PortAudio output callback in C
  (``open``): prebuffer from the stream start stamp (the adaptive jitter buffer's target from the
  ring's ``target_frames``, plus the device's read-ahead spread it measures), end marks, the heard
  index, the flush fade and its report, underrun counting and prebuffer growth, time-stretching
  around half the headroom, soxr to the device rate,
  the reference, listen and level-tap copies, callback stamps and device underflows. Its stream
  events queue in C (an SPSC queue) and are read here, by the publishing thread, never by a call
  from the audio thread.
* :class:`NativeCapture` is the capture path: a PortAudio input callback in C writes the device's
  frames to a ring and wakes a worker thread; the worker's :meth:`NativeCapture.step` (one call
  per 20 ms chunk, with the GIL) resamples with libsoxr, makes the echo canceller's one Python
  call (WebRTC AEC3 through pywebrtc-audio, which has no C interface), keeps
  :class:`engine.capture.echo.EchoCanceller`'s statistics and guard in C, and writes the mic ring.

``audio.backend`` (config) picks ``native`` or ``pyaudio``; :func:`resolve_backend` says which
one runs and why. The extension is built by the package's own build (setup.py) when gcc and the
headers of PortAudio and libsoxr are there; ``REALTALK_NATIVE=0`` in the environment makes it
count as absent (build and run time). PyAudio stays for device listing and as the fallback.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np

from engine.audio.ring import Ring
from engine.pcm import RATE_HZ
from engine.stats import percentiles

_ext: Any
try:  # the extension is optional: a machine without a compiler installs without it
    import engine.audio._native as _ext
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _ext = None
    _IMPORT_ERROR = str(exc)

AEC_RATE_HZ = 32000                          # engine.capture.echo's and _native.c's (a test holds all three equal)
AEC_BLOCK_FRAMES = AEC_RATE_HZ // 100
BACKENDS = ("native", "pyaudio")


SOURCE = Path(__file__).with_name("_native.c")


@functools.lru_cache(maxsize=1)
def source_sha() -> str | None:
    """The first 16 hex digits of the SHA-256 of ``_native.c`` beside this module, as setup.py
    builds them into the extension (``source_sha``); None where the source is not installed."""
    try:
        return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def unavailable_reason() -> str | None:
    """Why the native backend cannot run here (None: it can). An extension built from another
    ``_native.c`` than the one beside it (an in-place build not redone after the source changed)
    is not run: its C would not be the behaviour the Python side and the tests expect."""
    if os.environ.get("REALTALK_NATIVE", "1") == "0":
        return "REALTALK_NATIVE=0 is set"
    if _ext is None:
        return (f"the extension engine.audio._native is not built ({_IMPORT_ERROR}); it needs gcc, portaudio19-dev "
                "and libsoxr-dev at install: bash tools/setup-system.sh")
    built, here = getattr(_ext, "source_sha", ""), source_sha()
    if here is not None and built != here:
        return (f"the extension engine.audio._native was built from another _native.c ({built or 'unknown'}, the "
                f"source is {here}); rebuild it: pip install -e . or python setup.py build_ext --inplace")
    return None


def versions() -> dict[str, str]:
    """The built extension's libraries and their versions (``pulse`` only in a build with libpulse)."""
    return dict(_ext_or_raise().versions())


def available() -> bool:
    """The native backend can run in this process."""
    return unavailable_reason() is None


def resolve_backend(requested: str) -> tuple[str, str | None]:
    """(the backend that runs, a one-line note when it is not the one asked for)."""
    if requested == "native":
        why = unavailable_reason()
        if why is not None:
            return "pyaudio", f"audio.backend native is not available ({why}); using pyaudio"
    return requested, None


def status_line() -> str:
    """One line for tools/setup-system.sh: built or not, and what that means."""
    why = unavailable_reason()
    if why is None:
        v = versions()
        pulse = (f", libpulse {v['pulse']} for PulseAudio devices" if "pulse" in v else
                 ", without libpulse: PortAudio for every device (libpulse-dev and libasound2-dev add it)")
        return f"native audio backend: built ({v['portaudio'].split(',')[0]}, {v['soxr']}{pulse})"
    return f"native audio backend: not available ({why}); audio.backend falls back to pyaudio"


def _ext_or_raise() -> Any:
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"the native audio backend is not available: {why}")
    return _ext


class FarReader(Protocol):
    """What the capture step takes the far end from (engine.capture.echo.FarEnd's face): ``take``
    n reference frames for the chunk whose first frame was captured at ``adc_ns``; then
    ``uncertain``: whether it had to guess (the guard holds)."""
    uncertain: bool

    def take(self, frames: int, adc_ns: int) -> np.ndarray: ...


class NativeClock:
    """The mic clock of a :class:`NativeFarEnd` (engine.capture.echo.MicClock's counters)."""

    def __init__(self, c: Any) -> None:
        self._c = c

    @property
    def jumps(self) -> int:
        return int(self._c.clock_jumps)

    @property
    def doubtful(self) -> bool:
        return bool(self._c.clock_doubtful)

    @property
    def settled(self) -> bool:
        return bool(self._c.clock_settled)

    @property
    def frames(self) -> int:
        return int(self._c.clock_frames)


class NativeFarEnd:
    """engine.capture.echo.FarEnd in C, with its face (``take``, ``uncertain``, the counters,
    ``clock``). :meth:`NativeCapture.step` reads it without a Python call. ``constants``:
    engine.capture.echo's by name (``far_constants()``): one source for both implementations."""

    def __init__(self, ring: Ring, constants: dict[str, int]) -> None:
        self.ring = ring
        self.native = _ext_or_raise().FarEnd(ring.mapping, constants)
        self.buf = np.frombuffer(self.native.buffer(), dtype=np.int16)
        self.clock = NativeClock(self.native)

    def take(self, frames: int, adc_ns: int) -> np.ndarray:
        """The reference for the next ``frames`` mic frames, the first captured at ``adc_ns``
        (CLOCK_MONOTONIC). A view, valid until the next take."""
        return self.buf[:self.native.take(frames, adc_ns)]

    @property
    def uncertain(self) -> bool:
        return bool(self.native.uncertain)

    @property
    def missing_frames(self) -> int:
        return int(self.native.missing_frames)

    @property
    def gap_frames(self) -> int:
        return int(self.native.gap_frames)

    @property
    def skipped_frames(self) -> int:
        return int(self.native.skipped_frames)

    @property
    def realignments(self) -> int:
        return int(self.native.realignments)

    @property
    def uncertain_frames(self) -> int:
        return int(self.native.uncertain_frames)


class NativeEvent(NamedTuple):
    """A stream event, with the fields of engine.playback.renderer.StreamEvent."""
    kind: str
    index: int  # type: ignore[assignment]  # shadows tuple.index, as StreamEvent's does
    start_index: int
    stretch_frames: int
    expanded_frames: int
    device_underflows: int


class NativeRenderer:
    """:class:`engine.playback.renderer.Renderer` in C (see the module docstring).

    ``device_rate_hz`` other than 24 kHz makes it its own :class:`DeviceFeeder` too (``fill``;
    the flush then fades at the device rate). ``tap`` is an object with ``arrays`` (engine.audio.levels'
    ``ExternalLevelTap``). The counters and fields the Python renderer has are attributes here
    (``prebuffer_frames``, ``expanded_frames``, ``first_sample_mono_ns``, ...), read from C.
    ``render`` and ``fill`` drive it without a device (tests, and only while no stream runs).
    """

    _OWN = frozenset({"ring", "control", "ref", "tap", "_c", "_events", "_listen", "stretch"})

    def __init__(self, ring: Ring, prebuffer_frames: int, max_prebuffer_frames: int = 7200,
                 ref: Ring | None = None, stretch: bool = True, device_rate_hz: int = RATE_HZ,
                 block_frames: int = RATE_HZ // 100, tap: Any = None) -> None:
        ext = _ext_or_raise()
        self._c = ext.Renderer(ring.mapping, prebuffer_frames, max_prebuffer_frames,
                               ref.mapping if ref is not None else None, stretch, device_rate_hz, block_frames,
                               tap.arrays if tap is not None else None)
        self.ring = ring
        self.control = ring.control
        self.ref = ref
        self.tap = tap
        self.stretch = stretch
        self._events: list[NativeEvent] = []
        self._listen: Ring | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in NativeRenderer._OWN or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            setattr(self._c, name, value)

    @property
    def events(self) -> list[NativeEvent]:
        """The stream events so far not popped (the C queue drained into this list)."""
        fresh = self._c.drain_events()
        if fresh:
            self._events.extend(NativeEvent(*e) for e in fresh)
        return self._events

    @property
    def listen(self) -> Ring | None:
        return self._listen

    @listen.setter
    def listen(self, ring: Ring | None) -> None:
        self._c.set_listen(ring.mapping if ring is not None else None)
        object.__setattr__(self, "_listen", ring)

    def render(self, out: np.ndarray, latency_frames: int, now: float) -> None:
        """Fill ``out`` (24 kHz int16), as Renderer.render. Not while a device stream runs."""
        self._c.render(out, latency_frames, now)

    def fill(self, frame_count: int, latency_frames: int, now: float) -> bytes:
        """``frame_count`` device-rate frames, as DeviceFeeder.fill. Not while a device stream runs."""
        out = np.empty(frame_count, dtype=np.int16)
        self._c.fill(out, latency_frames, now)
        return out.tobytes()

    def wake(self) -> None:
        """Wake the publishing thread (a stop signal's handler calls this)."""
        fd = self._c.wake_fd
        if fd >= 0:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass

    def open(self, device_index: int, rate_hz: int, frames_per_buffer: int) -> float:
        """Start the device stream (the C callback renders from now on); its output latency, s."""
        return float(self._c.open(device_index, float(rate_hz), frames_per_buffer))

    def close(self) -> None:
        """Stop and close the device stream (waits for the callback to return)."""
        self._c.close()

    def is_active(self) -> bool:
        return bool(self._c.is_active())

    def callback_stamps(self) -> np.ndarray:
        """When the latest callbacks ran (mono ns), oldest first."""
        return np.asarray(self._c.callback_stamps(), dtype=np.int64)


class NativeCapture:
    """The capture path in C (see the module docstring).

    ``aec``: cancel the echo (WebRTC AEC3 at AEC_RATE_HZ; ``guard_db`` as EchoCanceller's, None: no
    guard; ``echo``: the statistics' and the guard's constants, engine.capture.echo's by name, which
    the capture process hands in: one source for both implementations). The echo statistics are
    EchoCanceller's (``stats``, ``errors``, ``last_error``), so the process reports them the same way.

    :meth:`step` takes ``far_take``, the far end: a FarEnd (its ``take``, then its ``uncertain``,
    which makes the guard hold) or a plain function; either is called with n, the chunk's mic
    frames at 24 kHz, and with ``far_adc`` also with ``adc_ns``, when the first of them was
    captured (CLOCK_MONOTONIC: PortAudio's ADC time less what soxr held back), and returns n
    reference frames. ``extras``: None for the plain path (level taps and the mic ring in C), or a
    function ``extras(raw, far, sent)`` for what C does not do (the console's browser mic, the
    session recording, half duplex), which gets views of this chunk's device frames at 24 kHz, its
    reference frames and what echo handling made of them (None without echo cancellation; empty
    when the canceller has nothing to hand out yet), and writes the mic ring itself.
    """

    def __init__(self, mic: Ring, device_rate_hz: int, period_frames: int, aec: bool = False,
                 guard_db: float | None = -6.0, tap_in: Any = None, tap_out: Any = None, far_adc: bool = False,
                 echo: dict[str, float] | None = None) -> None:
        ext = _ext_or_raise()
        blocks = ext.MAX_AEC_BLOCKS
        self._near = np.zeros(blocks * AEC_BLOCK_FRAMES, dtype=np.int16)
        self._far_aec = np.zeros(blocks * AEC_BLOCK_FRAMES, dtype=np.int16)
        near_views = tuple(self._near[:k * AEC_BLOCK_FRAMES] for k in range(1, blocks + 1))
        far_views = tuple(self._far_aec[:k * AEC_BLOCK_FRAMES] for k in range(1, blocks + 1))
        cap24 = 4 * period_frames * RATE_HZ // device_rate_hz + 256 + blocks * AEC_BLOCK_FRAMES
        self.raw = np.zeros(cap24, dtype=np.int16)
        self.far = np.zeros(cap24, dtype=np.int16)
        self.sent = np.zeros(cap24, dtype=np.int16)
        self._c = ext.Capture(mic.mapping, mic.data_fd if mic.data_fd is not None else -1, device_rate_hz,
                              period_frames, aec, guard_db,
                              (self._near, self._far_aec, near_views, far_views, self.raw, self.far, self.sent),
                              tap_in.arrays if tap_in is not None else None,
                              tap_out.arrays if tap_out is not None else None, far_adc, echo)
        self.aec: Any = None
        if aec:
            from pywebrtc_audio import EchoCanceller as WebRtcAec
            self.aec = WebRtcAec(sample_rate=AEC_RATE_HZ, num_channels=1, stream_delay_ms=0)
        self.guard_on = guard_db is not None
        self.mic = mic

    # -- the worker -------------------------------------------------------------------
    def wait(self, timeout_s: float) -> bool:
        """Sleep (the GIL released) until the callback has written frames; False on timeout."""
        return bool(self._c.wait(timeout_s))

    def step(self, far_take: NativeFarEnd | FarReader | Callable[..., np.ndarray] | None,
             extras: Callable[[np.ndarray, np.ndarray, np.ndarray | None], None] | None = None) -> int:
        """Process every chunk the callback wrote since the last step; how many chunks."""
        if isinstance(far_take, NativeFarEnd):
            far_take = far_take.native   # read in C: no Python call
        if extras is None:
            return int(self._c.step(far_take, self.aec, None))
        raw, far, sent = self.raw, self.far, self.sent

        def call(n24: int, nsent: int, cancelled: bool) -> None:
            extras(raw[:n24], far[:n24], sent[:nsent] if cancelled else None)
        return int(self._c.step(far_take, self.aec, call))

    def push(self, frames: np.ndarray, adc_ns: int | None = None) -> None:
        """Device frames as the callback writes them (tests), the first captured at ``adc_ns``
        (CLOCK_MONOTONIC; None: the last one just now). Not while a device stream runs."""
        self._c.push(np.ascontiguousarray(frames, dtype=np.int16), adc_ns)

    # -- the device -------------------------------------------------------------------
    def open(self, device_index: int, rate_hz: int, frames_per_buffer: int) -> float:
        """Start the device stream; its input latency, s."""
        return float(self._c.open(device_index, float(rate_hz), frames_per_buffer))

    def close(self) -> None:
        self._c.close()

    def is_active(self) -> bool:
        return bool(self._c.is_active())

    @property
    def callbacks(self) -> int:
        return int(self._c.callbacks)

    @property
    def input_overflows(self) -> int:
        return int(self._c.input_overflows)

    @property
    def host(self) -> str:
        """Who runs the open device stream: "pulse" (libpulse), "portaudio", or "" (none is open)."""
        return str(self._c.host)

    @property
    def dropped_frames(self) -> int:
        """Device frames the worker was too late for (its ring was full)."""
        return int(self._c.dev_dropped)

    # -- EchoCanceller's face ---------------------------------------------------------
    @property
    def errors(self) -> int:
        """Failed AEC or reference calls (the mic went through uncancelled, or with a silent far end)."""
        return int(self._c.errors)

    @property
    def last_error(self) -> BaseException | None:
        err = self._c.last_error()
        return err if isinstance(err, BaseException) else None

    @property
    def near_energy(self) -> float:
        """The mic's energy (at AEC3's rate) over the blocks whose far end was active, as EchoCanceller's."""
        return float(self._c.near_energy)

    @property
    def out_energy(self) -> float:
        """AEC3's output energy over the same blocks (before the guard), as EchoCanceller's."""
        return float(self._c.out_energy)

    @property
    def busy_ns(self) -> int:
        return int(self._c.busy_ns)

    def cpu_split_ns(self) -> tuple[int, int, int]:
        """The worker thread's CPU time in :meth:`step` so far, and of it the time inside the echo
        canceller's Python call and inside ``far_take`` (bench/capture_step.py), ns."""
        c = self._c
        return int(c.step_cpu_ns), int(c.aec_call_cpu_ns), int(c.far_take_cpu_ns)

    def erle_total_db(self) -> float | None:
        c = self._c
        if c.far_active_blocks == 0 or c.near_energy <= 0:
            return None
        return round(10 * float(np.log10(c.near_energy / max(c.out_energy, 1.0))), 1)

    def _erle_percentiles_db(self) -> tuple[float | None, float | None]:
        windows = self._c.erle_windows()
        if not windows:
            return None, self.erle_total_db()
        p10, p50 = percentiles(windows, (10, 50))
        return round(p10, 1), round(p50, 1)

    def erle_db(self) -> float | None:
        return self._erle_percentiles_db()[1]

    def stats(self) -> dict[str, float | int | None]:
        """EchoCanceller.stats(), from the C counters."""
        c = self._c
        erle_p10_db, erle_db = self._erle_percentiles_db()
        return {"erle_db": erle_db, "erle_total_db": self.erle_total_db(), "erle_p10_db": erle_p10_db,
                "far_active_ms": c.far_active_blocks * 10, "blocks": c.blocks, "guarded_ms": c.guarded_blocks * 10,
                "talkers": c.talks if self.guard_on else 0,
                "guard_holds": c.holds if self.guard_on else 0,
                "guard_held_ms": c.held_blocks * 10 if self.guard_on else 0,
                "echo_path_db": round(float(c.erl_db), 1) if self.guard_on and c.erl_blocks else None,
                "errors": c.errors, "cpu_ms": round(c.busy_ns / 1e6, 1)}

    def cpu_stats(self) -> dict[str, float]:
        """The worker thread's CPU time in its steps so far, and of it inside AEC3's call and inside
        the far end's take, ms (``capture.echo`` on the native backend)."""
        step_ns, aec_ns, far_ns = self.cpu_split_ns()
        return {"step_cpu_ms": round(step_ns / 1e6, 1), "aec_cpu_ms": round(aec_ns / 1e6, 1),
                "far_take_cpu_ms": round(far_ns / 1e6, 1)}

    def take_held_back(self) -> dict[str, float | None]:
        """What the steps since the last take held the mic back, mean and most, ms (None without a
        step), and start afresh: after each chunk, what the resamplers hold and the frames waiting
        for a whole AEC3 block, from their state (``capture.echo`` on the native backend). The
        worker's thread, after a step."""
        mean_ms, max_ms, _ = self._c.take_held_back()
        return {"mic_held_back_ms": round(mean_ms, 1) if mean_ms is not None else None,
                "mic_held_back_ms_max": round(max_ms, 1) if max_ms is not None else None}


def window_levels(buffer: np.ndarray, pos: int, count: int, window: int) -> tuple[list[float], list[float]]:
    """The level meters' windows measured in C (``ExternalLevelTap(measure=...)``): energy, peak.
    Called every 200 ms by the chores of a native backend that runs, so the extension is there: no
    look at the environment each time (``_ext_or_raise`` only when it is not)."""
    energies, peaks = (_ext if _ext is not None else _ext_or_raise()).window_levels(buffer, pos, count, window)
    return energies, peaks


def talk_guard(constants: dict[str, float], loud_db: float,
               blocks: list[tuple[float, float, float, int]]) -> tuple[list[bool], dict[str, Any]]:
    """The C TalkGuard over blocks of (out_rms, far_peak, near_rms, hold_blocks), a hold
    (hold_blocks > 0) before its block; ``constants`` are engine.capture.echo's. Its decisions,
    and then its counters and state (talks, holds, held_blocks, erl_db, erl_blocks, state): the
    tests hold both against the Python one."""
    decisions, counts = _ext_or_raise().talk_guard(constants, loud_db, blocks)
    return list(decisions), dict(counts)

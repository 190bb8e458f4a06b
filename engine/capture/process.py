"""The capture process: microphone -> mic ring (PCM16 24 kHz).

Backends: for a device, ``audio.backend`` ``native`` (the default where it is built): a
PortAudio input callback in C writes the device's frames to a ring and wakes a worker thread,
whose one call per chunk (:meth:`engine.audio.native.NativeCapture.step`) resamples with
libsoxr, makes the echo canceller's call, keeps its statistics and guard in C and writes the
mic ring (what C does not do, the browser mic, the recording and half duplex, it hands to
:meth:`CaptureProcess._route`); or ``pyaudio``: a PyAudio input callback stream at the device's
rate (soxr to 24 kHz) running :meth:`CaptureProcess._write`. Or a WAV file played into the ring
in real time, then silence (scripted runs). The callbacks never block: a full ring counts
overrun frames.

Echo handling (``audio.echo``, see :mod:`engine.capture.echo`): ``aec`` runs WebRTC's echo
canceller with what playback actually played (the reference ring) as the far end;
``half_duplex`` writes silence while the model is audible; ``off`` passes the mic
through. ``auto`` is ``aec`` when the speaker is a device, else ``off``.

Recording (``record``): the mic as captured and the reference, side by side in one
stereo WAV (:mod:`engine.audio.record`).

Mic source (the debug console's talk switch, :mod:`engine.audio.listen_talk`): while a
``console.mic.source`` ``browser`` lease holds, each block the device (or the WAV file)
gives is replaced by as many frames of the browser ring, silence where it is short
(counted); the device stream keeps running and sets the pace. The browser's audio skips
the engine's echo handling (the browser cancels its own loudspeaker's echo; the canceller
keeps running on the device's frames, so it is converged when the device is back), and
feeds the meters, the recording and the mic ring like the device's. ``capture.source`` says which
source is on, at each switch and every 2 s, with the counts.

Restarts: the mic ring outlives the capture process (the supervisor owns it), and a WAV
mic is the ring's only writer, so a restarted capture continues the file at the ring's
write index: the user's words are not sent twice.

Failures: a mic file that cannot be read is a :class:`DeviceError` naming the file (the
engine stops with it; the supervisor checks its header before starting anything).
Exceptions inside the device callback or the echo canceller are counted, never raised; the
main thread publishes the counts on ``capture.echo`` (``callback_errors``, ``aec_errors``)
and each new kind of error once on ``engine.error`` (code ``callback_error`` /
``aec_error``) with its type and message.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import wave
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from bus import Publisher, Subscriber
from engine import child
from engine.child import error_text, every_period, next_due, run_reporting, stop_on_signals, wake
from engine.audio.preflight import mic_wav_format
from engine.codec import resample
from engine.capture.echo import EchoCanceller, EchoGate, FarEnd, far_constants, native_constants
from engine.audio.listen_talk import SOURCE_TOPIC, BrowserMicReader, SourceSwitch
from engine.audio.levels import ExternalLevelTap, LevelTap
from engine.errors import DeviceError
from engine.audio.record import Recorder
from engine.audio.ring import Ring
from engine.pcm import RATE_HZ
from engine.specs import CaptureSpec

if TYPE_CHECKING:
    from engine.audio.native import NativeCapture, NativeFarEnd

STATS_EVERY_S = 2.0
LEVELS_EVERY_S = 0.2          #: capture.levels: 20 ms windows, batched this often (the chores' schedule)
#: the native backend's main thread: how often it looks at the device and the worker (the chores are the
#: worker's, after a step) when no recording needs writing
NATIVE_MAIN_EVERY_S = 0.5


class CaptureProcess:
    backend: str = "pyaudio"                #: the device backend that runs: native or pyaudio (set by run)
    backend_note: str | None = None         #: why it is not the one asked for, if it is not

    def __init__(self, spec: CaptureSpec) -> None:
        self.spec = spec
        cfg = spec.config["audio"]
        self.mic = spec.mic_source
        self.period_ms = cfg["period_ms"]
        self.ring = Ring.attach(spec.mic_ring, spec.mic_fd)  # the eventfd wakes the sender
        speaker = Ring.attach(spec.speaker_ring) if spec.speaker_ring else None
        #: the reference, lined up with the mic (the native backend swaps in FarEnd's twin in C)
        self.far: FarEnd | NativeFarEnd | None = FarEnd(Ring.attach(spec.ref_ring)) if spec.ref_ring else None
        echo = cfg["echo"]
        if echo == "auto":
            echo = "aec" if speaker is not None and spec.speaker_is_device else "off"
        if echo == "aec" and self.far is None:
            echo = "half_duplex"  # no reference to cancel with
        self.echo_mode = echo
        self.aec = EchoCanceller(guard_db=cfg["echo_guard_db"]) if echo == "aec" else None
        self.gate = EchoGate(speaker) if echo == "half_duplex" else None
        self.recorder = Recorder(spec.record_path) if spec.record_path else None
        self.stop = threading.Event()
        self.pub = Publisher(spec.bus.publish, f"capture:{os.getpid()}")
        self.pub.join(spec.bus.subscribe)
        #: what the chores publish on: this one, or with the native backend the worker thread's own
        #: (each thread its own ZeroMQ socket)
        self.chores_pub = self.pub
        self.native_capture: NativeCapture | None = None   #: the native backend's capture path, once it runs
        self.worker_failure: BaseException | None = None   #: the native worker's chores failed (a bug)
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)   #: a stop signal wakes the main loop
        self.next_stats_at = time.monotonic() + STATS_EVERY_S
        self.callback_errors = 0                          #: exceptions in the device callback
        self.callback_error: BaseException | None = None  #: the latest one (kept, reported by the main thread)
        self._reported: set[str] = set()
        # level meters for the console: the mic as captured, and as sent (after echo handling)
        self.level_in = LevelTap(RATE_HZ)
        self.level_out = LevelTap(RATE_HZ)
        self.next_chores_at = time.monotonic() + LEVELS_EVERY_S
        # the mic source: the device, or the console's browser ring while its lease holds
        self.browser = BrowserMicReader(Ring.attach(spec.browser_ring)) if spec.browser_ring else None
        self.source_switch = SourceSwitch()
        self.use_browser = False      #: set by the main thread, read by the callback
        self._browser_on = False      #: the callback's own copy: a change starts the reader
        self.device_name: str | None = None
        self.next_source_at = 0.0
        self.console_sub = (Subscriber(spec.bus.subscribe, [SOURCE_TOPIC])
                            if self.browser is not None else None)

    def _report_errors(self) -> None:
        """The chores' thread: each new kind of callback or echo-canceller error once on ``engine.error``."""
        for code, exc in (("callback_error", self.callback_error),
                          ("aec_error", self.aec.last_error if self.aec is not None else None)):
            if exc is None:
                continue
            key = f"{code}:{type(exc).__name__}:{exc}"
            if key in self._reported:
                continue
            self._reported.add(key)
            what = ("the mic callback failed" if code == "callback_error"
                    else "the echo canceller failed; the mic goes through uncancelled (echo included)")
            self.chores_pub.publish("engine.error", {"source": "capture", "code": code, "exception": type(exc).__name__,
                                              "message": f"{what}: {type(exc).__name__}: {error_text(exc)}"})

    def _write(self, pcm: np.ndarray, adc_ns: int) -> None:
        """Audio path: mic frames (24 kHz), the first captured at ``adc_ns`` (CLOCK_MONOTONIC, as
        the device reports it) -> echo handling -> mic ring (and the recording).
        While the browser is the source, its frames replace the device's, as many as the
        device gave (the device keeps the time), and skip the echo handling."""
        reader = self.browser if self.use_browser else None
        if (reader is not None) != self._browser_on:
            self._browser_on = reader is not None
            if reader is not None:
                reader.start()
        device = pcm
        if reader is not None:
            pcm = reader.read(len(device))
        self.level_in.push(pcm)
        far_end = self.far
        far = far_end.take(len(pcm), adc_ns) if far_end is not None else None
        if self.recorder is not None:
            self.recorder.push(pcm, far if far is not None else np.zeros_like(pcm))
        if self.aec is not None and far_end is not None and far is not None:
            # with the browser as the source the canceller still runs on the device's frames (its
            # output unused: the browser cancels its own loudspeaker's echo), so it is converged on
            # the room's echo path when the device is the source again
            cancelled = self.aec.process(device, far, far_end.uncertain)
            if reader is None:
                pcm = cancelled
        elif self.gate is not None and reader is None:
            pcm = self.gate.apply(pcm)
        self.level_out.push(pcm)
        self.ring.write(pcm)

    def housekeeping(self) -> None:
        """The chores of the WAV and PyAudio backends' main thread (called every period, or every
        100 ms): write the recording, then :meth:`chores` when due."""
        self.drain_recording()
        now = time.monotonic()
        if self.console_sub is not None:
            self._take_source_messages()
            self._source_chores(now)
        if now >= self.next_chores_at:
            self.next_chores_at = next_due(self.next_chores_at, now, LEVELS_EVERY_S)
            self.chores(now)

    def drain_recording(self) -> None:
        """Write what the recording holds (the main thread's: a disk write never delays a chunk). A
        recording that cannot be written (a full disk) stops the engine: a DeviceError naming the file."""
        if self.recorder is not None:
            try:
                self.recorder.drain()
            except OSError as exc:
                raise DeviceError(f"cannot write the recording {self.recorder.path}: {error_text(exc)}; "
                                  "the session is stopped, what was written is kept") from None

    def chores(self, now: float) -> None:
        """Every LEVELS_EVERY_S, on the thread that owns :attr:`chores_pub` (the main thread's, or with
        the native backend the worker's, after a step: no wake-up of its own): ``capture.levels``,
        and every STATS_EVERY_S the errors and ``capture.echo``."""
        self.publish_levels()
        if now >= self.next_stats_at:
            self.next_stats_at = now + STATS_EVERY_S
            self._report_errors()
            stats: dict[str, Any] = {"mode": self.echo_mode, "callback_errors": self.callback_errors}
            if self.aec is not None:
                stats.update(self.aec.stats())
                stats["aec_errors"] = self.aec.errors
            if self.far is not None:
                far = self.far
                stats.update(far_missing_frames=far.missing_frames, far_gap_frames=far.gap_frames,
                             far_skipped_frames=far.skipped_frames, far_realignments=far.realignments,
                             far_uncertain_ms=far.uncertain_frames * 1000 // RATE_HZ,
                             mic_clock_jumps=far.clock.jumps)
            if self.native_capture is not None:
                stats.update(self.native_capture.cpu_stats())
                stats.update(self.native_capture.take_held_back())
            if self.gate is not None:
                stats["muted_frames"] = self.gate.muted_frames
            if self.recorder is not None:
                stats["record_dropped_frames"] = self.recorder.dropped_frames
            self.chores_pub.publish("capture.echo", stats)

    def _take_source_messages(self) -> None:
        """Main thread: apply every ``console.mic.source`` message queued. With the native backend
        only when the subscriber's socket signals (:func:`keep_running`'s ``watch``): a
        ``zmq.EVENTS`` query every 100 ms cost 50-60 µs of CPU on this machine (a system call on
        a cold cache)."""
        sub = self.console_sub
        assert sub is not None
        now = time.monotonic()
        while (msg := sub.recv(timeout_ms=0)) is not None:
            self.source_switch.on_message(msg[1], now)

    def _source_chores(self, now: float) -> None:
        """Main thread: the lease (the browser is the source while it holds: the flag the callback
        or the worker reads); ``capture.source`` at each switch and every STATS_EVERY_S."""
        br = self.browser
        assert br is not None
        source = self.source_switch.source(now)
        browser = source == "browser"
        if browser != self.use_browser:
            self.source_switch.switches += 1
            self.use_browser = browser
        elif now < self.next_source_at:
            return
        self.next_source_at = now + STATS_EVERY_S
        self.pub.publish("capture.source", {"source": source, "device": self.device_name,
                                            "switches": self.source_switch.switches,
                                            "browser_frames": br.frames, "browser_wait_frames": br.wait_frames,
                                            "browser_short_frames": br.short_frames, "browser_gaps": br.gaps,
                                            "browser_jitter_ms": br.jitter_frames * 1000 // RATE_HZ,
                                            "browser_dropped_frames": br.dropped_frames})

    def publish_levels(self) -> None:
        """The chores' thread: ``capture.levels``, the 20 ms windows the callback handed over since the
        last call, as captured (``mic_*``) and as sent to the API after echo handling (``sent_*``)."""
        raw, sent = self.level_in.drain(), self.level_out.drain()
        if raw.start_mono_ns is None:
            return
        # echo handling keeps the stream's length: both meters see the same frames, window for window
        self.chores_pub.publish("capture.levels", {"period_ms": self.level_in.window_ms, "start_mono_ns": raw.start_mono_ns,
                                            "mic_dbfs": raw.rms_dbfs, "mic_peak_dbfs": raw.peak_dbfs,
                                            "sent_dbfs": sent.rms_dbfs, "sent_peak_dbfs": sent.peak_dbfs,
                                            "echo": self.echo_mode, "lost_frames": raw.lost_frames})

    @staticmethod
    def read_wav(path: str) -> tuple[np.ndarray, int]:
        """The mic file's first channel at 24 kHz, and its own rate; :class:`DeviceError` naming
        the file and the problem when it cannot be used (the header as the supervisor checked it
        before starting anything, :func:`engine.audio.preflight.mic_wav_format`, then the
        data: any failure reading or converting it is the file's, never a crash)."""
        fmt = mic_wav_format(path)
        try:
            with wave.open(path, "rb") as w:
                data = w.readframes(fmt.frames)
            data = data[: len(data) - len(data) % (2 * fmt.channels)]   # a truncated last frame is cut
            pcm = np.frombuffer(data, dtype="<i2")
            if fmt.channels > 1:
                pcm = pcm.reshape(-1, fmt.channels)[:, 0].copy()
            return resample(pcm, fmt.rate_hz, RATE_HZ), fmt.rate_hz
        except Exception as exc:  # noqa: BLE001 - whatever a corrupt file makes fail, it is the file's fault
            raise DeviceError(f"mic file {path} cannot be read as a mic ({type(exc).__name__}: {error_text(exc)}); "
                              "use a 16-bit PCM WAV file") from None

    def run_wav(self, path: str) -> None:
        pcm, rate = self.read_wav(path)
        period = RATE_HZ * self.period_ms // 1000
        silence = np.zeros(period, dtype=np.int16)
        # a restart continues where the previous run was: the ring counts every frame written
        pos = self.ring.write_index
        self.device_name = path
        self.pub.publish("capture.device", {"name": path, "rate_hz": rate, "duration_ms": len(pcm) * 1000 // RATE_HZ,
                                            "resume_ms": pos * 1000 // RATE_HZ})
        for _ in every_period(self.stop, self.period_ms / 1000):
            chunk = pcm[pos:pos + period] if pos < len(pcm) else silence
            if len(chunk) < period:
                chunk = np.concatenate([chunk, silence[: period - len(chunk)]])
            pos += period
            if pos >= len(pcm) and pos - period < len(pcm):
                self.pub.publish("capture.file_done", {"name": path})
            self._write(chunk, time.monotonic_ns() - period * 1_000_000_000 // RATE_HZ)
            self.housekeeping()

    def run_pyaudio(self) -> None:
        import pyaudio
        from engine.audio.devices import find_device, keep_running, open_pyaudio, resample_stream
        pa = open_pyaudio()
        dev = find_device(pa, self.mic, "input")
        rate = self.spec.config["audio"]["device_rate_hz"] or dev["default_rate_hz"]
        frames = rate * self.period_ms // 1000
        resampler = resample_stream(rate, RATE_HZ) if rate != RATE_HZ else None

        device_frames = 0      # frames the device has given, and the 24 kHz frames made of them
        out_frames = 0

        def callback(in_data: bytes | None, frame_count: int, time_info: Any, status: int) -> tuple[None, int]:
            nonlocal device_frames, out_frames
            try:
                # when the block's first frame was captured: PortAudio's ADC time, as an age (its clock
                # need not be CLOCK_MONOTONIC); the stream's latency when the device gives none
                age_s = time_info.get("current_time", 0) - time_info.get("input_buffer_adc_time", 0)
                if not 0 < age_s < 2:
                    age_s = stream_latency_s + self.period_ms / 1000
                pcm = np.frombuffer(in_data or b"", dtype=np.int16)
                # soxr holds some frames back (0 to a block's worth): the first frame out is that much older
                held_s = (device_frames / rate - out_frames / RATE_HZ) if resampler is not None else 0.0
                adc_ns = time.monotonic_ns() - int((age_s + held_s) * 1e9)
                device_frames += len(pcm)
                if resampler is not None:
                    pcm = resampler.resample_chunk(pcm)
                out_frames += len(pcm)
                self._write(pcm, adc_ns)
            except Exception as exc:  # counted; the main thread reports it (housekeeping)
                self.callback_errors += 1
                self.callback_error = exc
            return None, pyaudio.paContinue

        stream_latency_s = 0.04
        stream = pa.open(format=pyaudio.paInt16, channels=1, rate=rate, input=True, input_device_index=dev["index"],
                         frames_per_buffer=frames, stream_callback=callback)
        stream_latency_s = stream.get_input_latency()
        self.device_name = dev["name"]
        self.pub.publish("capture.device", {"name": dev["name"], "rate_hz": rate, "period_frames": frames,
                                            "latency_ms": round(stream.get_input_latency() * 1000, 1),
                                            "echo": self.echo_mode, "backend": "pyaudio",
                                            "backend_note": self.backend_note})
        keep_running(pa, stream, self.stop, self.housekeeping, 0.1)

    def _route(self, raw: np.ndarray, far: np.ndarray, sent: np.ndarray | None) -> None:
        """The native backend's worker, for what its C step does not do (the browser mic, the
        recording, half duplex): ``raw`` is this chunk of the device at 24 kHz, ``far`` the
        reference frames taken with it, ``sent`` what the echo canceller made of ``raw`` (None
        without one). The same routing as :meth:`_write`, after the echo handling C did."""
        reader = self.browser if self.use_browser else None
        if (reader is not None) != self._browser_on:
            self._browser_on = reader is not None
            if reader is not None:
                reader.start()
        pcm = reader.read(len(raw)) if reader is not None else raw
        self.level_in.push(pcm)
        if self.recorder is not None:
            self.recorder.push(pcm, far)
        if reader is None:
            if sent is not None:
                pcm = sent
            elif self.gate is not None:
                pcm = self.gate.apply(pcm)
        self.level_out.push(pcm)
        self.ring.write(pcm)

    def run_native(self) -> None:
        """The device through the native backend: the C input callback writes the device's frames
        to a ring; the worker thread makes one step per chunk; this thread does the chores."""
        from engine.audio.devices import find_device, keep_running, open_pyaudio
        from engine.audio.native import NativeCapture, NativeFarEnd, window_levels
        # the worker does the chores after its step: one wake-up a chunk, none of the main thread's
        # every 100 ms; a thread of its own needs a socket of its own
        self.chores_pub = Publisher(self.spec.bus.publish, f"capture-worker:{os.getpid()}")
        self.chores_pub.join(self.spec.bus.subscribe)
        pa = open_pyaudio()   # device lookup (and the library PortAudio shares with PyAudio)
        try:
            dev = find_device(pa, self.mic, "input")
            rate = self.spec.config["audio"]["device_rate_hz"] or dev["default_rate_hz"]
            frames = rate * self.period_ms // 1000
            if isinstance(self.far, FarEnd):   # its twin in C: the step reads it without a Python call
                self.far = NativeFarEnd(self.far.ring, far_constants())
            self.level_in = ExternalLevelTap(RATE_HZ, measure=window_levels)
            self.level_out = ExternalLevelTap(RATE_HZ, measure=window_levels)
            cap = NativeCapture(self.ring, rate, frames, aec=self.aec is not None,
                                guard_db=self.spec.config["audio"]["echo_guard_db"],
                                tap_in=self.level_in, tap_out=self.level_out, far_adc=True,
                                echo=native_constants())
            self.native_capture = cap
            if self.aec is not None:
                self.aec = cap   # type: ignore[assignment]  # EchoCanceller's statistics, from C
            latency_s = cap.open(dev["index"], rate, frames)
        except BaseException:
            pa.terminate()
            raise
        self.device_name = dev["name"]
        self.pub.publish("capture.device", {"name": dev["name"], "rate_hz": rate, "period_frames": frames,
                                            "latency_ms": round(latency_s * 1000, 1), "echo": self.echo_mode,
                                            "backend": "native", "host": cap.host, "backend_note": self.backend_note})
        worker = threading.Thread(target=self._native_worker, args=(cap,), name="capture-worker", daemon=True)
        worker.start()
        watch = ((self.console_sub.socket.getsockopt(zmq.FD), self._take_source_messages)
                 if self.console_sub is not None else None)
        try:
            keep_running(pa, _NativeStream(cap), self.stop, self._native_main_chores,
                         LEVELS_EVERY_S if self.recorder is not None else NATIVE_MAIN_EVERY_S,
                         self.wake_fd if watch is not None else None, watch)
        finally:
            self.stop.set()
            worker.join(1.0)

    def _native_main_chores(self) -> None:
        """The native backend's main thread: write the recording, the console's mic source (its
        messages are read when they come); a failure of the worker's chores (a bug) ends the
        process as a crash, as it did when this thread ran them."""
        self.drain_recording()
        if self.console_sub is not None:
            self._source_chores(time.monotonic())
        if self.worker_failure is not None:
            raise self.worker_failure

    def _native_worker(self, cap: Any) -> None:
        """One step per chunk the C callback wrote: C does it all unless the browser mic, the
        recording or half duplex need :meth:`_route`. An exception in a step is counted, as the
        PyAudio callback's are, and reported by the chores. After a step (or 200 ms without one)
        the chores when due: the mic ring is written by then, so they delay no chunk."""
        far_take = self.far   # its take(n, adc_ns), then its uncertain flag (the guard holds)
        while not self.stop.is_set():
            if cap.wait(0.2):
                extras = self._route if (self.use_browser or self._browser_on or self.recorder is not None
                                         or self.gate is not None) else None
                try:
                    cap.step(far_take, extras)
                except Exception as exc:  # counted; the chores report it
                    self.callback_errors += 1
                    self.callback_error = exc
            now = time.monotonic()
            if now >= self.next_chores_at:
                self.next_chores_at = next_due(self.next_chores_at, now, LEVELS_EVERY_S)
                try:
                    self.chores(now)
                except Exception as exc:  # noqa: BLE001 - a bug: the main thread raises it (a crash)
                    self.worker_failure = exc
                    return

    def _wake(self) -> None:
        wake(self.wake_fd)

    def run(self) -> int:
        stop_on_signals(self.stop, self._wake)   # the native main loop sleeps on the console's socket and this
        try:
            if isinstance(self.mic, str) and self.mic.lower().endswith(".wav"):
                return run_reporting(self.pub, "capture", lambda: self.run_wav(str(self.mic)))
            from engine.audio.native import resolve_backend
            self.backend, self.backend_note = resolve_backend(self.spec.config["audio"].get("backend", "native"))
            return run_reporting(self.pub, "capture", self.run_native if self.backend == "native" else self.run_pyaudio)
        finally:
            if self.recorder is not None:
                try:
                    self.recorder.close()
                except OSError as exc:   # a full disk at the last write: said, never a traceback
                    self.pub.publish("engine.error", {"source": "capture", "code": "record_failed",
                                                      "message": f"the recording {self.recorder.path} could not be "
                                                                 f"finished: {error_text(exc)}"})


class _NativeStream:
    """What :func:`keep_running` needs of a stream, for the native capture's."""

    def __init__(self, cap: Any) -> None:
        self.cap = cap

    def is_active(self) -> bool:
        return bool(self.cap.is_active())

    def stop_stream(self) -> None:
        self.cap.close()

    def close(self) -> None:
        self.cap.close()


if __name__ == "__main__":
    sys.exit(child.main(CaptureProcess, CaptureSpec))

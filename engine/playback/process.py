"""The playback process: plays the playback ring on the speaker.

The renderer (engine/playback/renderer.py) is the consumer logic, run inside the device callback;
this module runs it on a device and publishes what it saw.

Backends: for a device, ``audio.backend`` ``native`` (the default where it is built): the same
renderer in C behind a PortAudio output callback (engine/audio/native.py; no Python runs per
period, the publishing thread reads its events and counters), or ``pyaudio``: a PyAudio callback
stream at the device's rate (soxr resampling from 24 kHz) running :class:`Renderer` and
:class:`DeviceFeeder`; a WAV file written in real time, or ``null`` (consumed in real time).

Listen (the debug console, :mod:`engine.audio.listen_talk`): while a ``console.listen`` lease
holds, the renderer also copies every block it hands out into the listen ring (a plain
copy, never blocking; a full ring counts overrun frames: frames not listened). The
publishing thread applies the lease and reports ``playback.listen``.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import numpy as np
import zmq

from bus import Publisher, Subscriber
from engine import child
from engine.child import every_period, run_reporting, stop_on_signals
from engine.audio.record import PcmWav
from engine.audio.ring import Ring
from engine.audio.listen_talk import LISTEN_TOPIC, ListenSwitch
from engine.audio.levels import ExternalLevelTap, LevelTap
from engine.playback.renderer import DeviceFeeder, Renderer
from engine.pcm import FRAMES_PER_MS, RATE_HZ
from engine.specs import PlaybackSpec
from engine.stats import percentiles

PUBLISH_EVERY_S = 0.2        # the publishing thread's chores run this often; a renderer event wakes it at once
POSITION_EVERY_S = 0.2       # playback.position while a stream plays
CADENCE_EVERY_S = 5.0        # playback.cadence: how regularly the device asks for audio
LEVELS_EVERY_S = 0.2         # playback.levels: 20 ms windows of what was played, batched this often
LISTEN_EVERY_S = 2.0         # playback.listen while a console listens (and at each change)


class PlaybackProcess:
    #: when playback.levels goes out next (never for an instance built without __init__, as tests do)
    next_levels_at: float = float("inf")
    console_sub: Subscriber | None = None   #: console.listen (None for an instance built without __init__)
    _listen_watched = False
    backend: str = "pyaudio"                #: the device backend that runs: native or pyaudio (set by run)
    backend_note: str | None = None         #: why it is not the one asked for, if it is not

    def __init__(self, spec: PlaybackSpec) -> None:
        self.spec = spec
        cfg = spec.config["audio"]
        self.speaker = spec.speaker_target
        self.period_ms = cfg.get("playback_period_ms") or cfg["period_ms"]
        self.ring = Ring.attach(spec.speaker_ring)
        #: playback processes that ran on this ring before this one (a restart continues the speaker WAV)
        self.earlier_starts = self.ring.control.count_consumer_start()
        # every frame handed to the device also goes to the reference ring (echo canceller, recording)
        self.ref = Ring.attach(spec.ref_ring) if spec.ref_ring else None
        self.renderer = Renderer(self.ring, cfg["prebuffer_ms"] * RATE_HZ // 1000, ref=self.ref,
                                 stretch=cfg.get("time_stretch", True))
        self.stop = threading.Event()
        self.pub = Publisher(spec.bus.publish, f"playback:{os.getpid()}")
        self.pub.join(spec.bus.subscribe)
        self.callback_errors = 0     # exceptions in the device callback (answered with silence)
        self.last_callback_error: BaseException | None = None   # the latest of them (set by the callback)
        self.reported_callback_errors = 0
        self.next_error_report_at = 0.0
        self.next_position_at = 0.0
        self.callback_ns = np.zeros(512, dtype=np.int64)  # when the latest device callbacks ran (a ring)
        self.callbacks = 0
        self.device_underflows = 0   # PortAudio's paOutputUnderflow: the device buffer ran dry
        self.next_cadence_at = time.monotonic() + CADENCE_EVERY_S
        self.renderer.tap = LevelTap(RATE_HZ)
        self.next_levels_at = time.monotonic() + LEVELS_EVERY_S
        # the console's listen switch: a ring to copy into, a lease from the bus
        self.renderer.listen = Ring.attach(spec.listen_ring) if spec.listen_ring else None
        self.listen_switch = ListenSwitch()
        self.next_listen_at = 0.0
        self.console_sub = Subscriber(spec.bus.subscribe, [LISTEN_TOPIC]) if self.renderer.listen else None
        self._listen_watched = False   #: the device loop reads console_sub when its socket signals

    def publish_events(self) -> None:
        """Publish what the renderer saw (from the loop thread, never the callback). Reports carry
        ring indices only (``start_index`` of the stream, ``index``); the realtime process maps
        them to items."""
        r = self.renderer
        ring = self.ring
        while r.events:
            kind, index, start, stretch_frames, expanded_frames, device_underflows = r.events.pop(0)
            payload: dict[str, Any] = {"start_index": start, "index": index,
                                       "underrun_frames": ring.underrun_frames}
            if kind == "started":
                payload["first_sample_mono_ns"] = r.first_sample_mono_ns
                payload["arrived_mono_ns"] = r.arrived_mono_ns
                payload["output_latency_ms"] = round(ring.control.device_latency_frames / FRAMES_PER_MS, 2)
                # the start delay this stream waited after its first frames arrived (target + growth)
                payload["prebuffer_ms"] = round(r.start_delay_frames / FRAMES_PER_MS, 1)
                payload["device_lead_ms"] = round(r.start_device_lead_frames / FRAMES_PER_MS, 1)
            else:
                payload["played_ms"] = (index - start) // FRAMES_PER_MS
                # how much longer (or shorter) the stream played than its audio: time-stretching
                payload["stretch_ms"] = round(stretch_frames / FRAMES_PER_MS, 1)
                payload["expanded_ms"] = round(expanded_frames / FRAMES_PER_MS, 1)
                payload["device_underflows"] = device_underflows
            if kind == "flushed":
                payload["flush_mono_ns"] = r.flush_mono_ns
            if kind == "underrun":
                payload["prebuffer_ms"] = r.prebuffer_frames * 1000 // RATE_HZ
            self.pub.publish(f"playback.{kind}", payload)
        self._report_callback_errors()
        now = time.monotonic()
        if self.console_sub is not None:
            self._listen_chores(now)
        levels = None
        if now >= self.next_levels_at:
            self.next_levels_at = now + LEVELS_EVERY_S
            levels = self.levels_payload()
        native = self.backend == "native"
        nr: Any = r
        if native:   # the C callback's counters (no Python runs in it)
            self.callbacks, self.device_underflows = nr.callbacks, nr.device_underflows
        if now >= self.next_cadence_at and self.callbacks > 2:
            self.next_cadence_at = now + CADENCE_EVERY_S
            if native:
                stamps = nr.callback_stamps()
                self.callback_ns[:len(stamps)] = stamps
            n = min(self.callbacks, len(self.callback_ns))
            gaps_ms = np.diff(np.sort(self.callback_ns[:n])) / 1e6  # the ring's stamps, back in time order
            p50, p99 = percentiles(gaps_ms, (50, 99))
            self.pub.publish("playback.cadence", {"callbacks": self.callbacks, "period_ms": self.period_ms,
                                                  "device_underflows": self.device_underflows,
                                                  "callback_errors": self.callback_errors,
                                                  "wake_errors": r.wake_errors,
                                                  "transition_errors": r.transition_errors,
                                                  "expanded_ms": r.expanded_frames // FRAMES_PER_MS,
                                                  "accelerated_ms": r.accelerated_frames // FRAMES_PER_MS,
                                                  "interval_ms_p50": round(p50, 2), "interval_ms_p99": round(p99, 2),
                                                  "interval_ms_max": round(float(gaps_ms.max()), 2),
                                                  **self._device_buffer(nr if native else None)})
        position = None
        if r.in_stream and now >= self.next_position_at:
            self.next_position_at = now + POSITION_EVERY_S
            # the callback's own number (the shared heard index), not a second estimate
            position = {"start_index": r.stream_start, "index": ring.control.heard_index}
        # the periodic messages back to back: ZeroMQ's I/O thread is most often woken once for both
        # (each wake-up costs the sender a system call and the machine an interrupt)
        if levels is not None:
            self.pub.publish("playback.levels", levels)
        if position is not None:
            self.pub.publish("playback.position", position)

    def _take_listen_messages(self) -> None:
        """Apply every ``console.listen`` message queued (publishing thread): with a device, when its
        socket signals (:func:`keep_running`'s ``watch``); nothing asks the socket in between."""
        sub = self.console_sub
        assert sub is not None
        now = time.monotonic()
        while (msg := sub.recv(timeout_ms=0)) is not None:
            self.listen_switch.on_message(msg[1], now)

    def _listen_chores(self, now: float) -> None:
        """The lease (publishing thread): the listen copy on while it holds; report
        ``playback.listen`` at each change and every LISTEN_EVERY_S while on. Without a device
        (the null and WAV speakers) the messages are read here too."""
        r = self.renderer
        assert r.listen is not None
        if not self._listen_watched:
            self._take_listen_messages()
        on = self.listen_switch.on(now)
        if on != r.listen_on or (on and now >= self.next_listen_at):
            r.listen_on = on
            self.next_listen_at = now + LISTEN_EVERY_S
            self.pub.publish("playback.listen", {"on": on, "written_frames": r.listen.write_index,
                                                 "not_listened_frames": r.listen.overrun_frames})

    def _listen_watch(self) -> tuple[int, Any] | None:
        """For :func:`keep_running`: the console subscriber's socket, watched beside the wake-up (a
        ``zmq.EVENTS`` query every 100 ms cost 50-70 µs of CPU on this machine: a system call on a
        cold cache), and what reads it."""
        if self.console_sub is None:
            return None
        self._listen_watched = True
        return self.console_sub.socket.getsockopt(zmq.FD), self._take_listen_messages

    def publish_levels(self) -> None:
        """Publish ``playback.levels`` (:meth:`levels_payload`) if there is one."""
        levels = self.levels_payload()
        if levels is not None:
            self.pub.publish("playback.levels", levels)

    def levels_payload(self) -> dict[str, Any] | None:
        """``playback.levels``: the 20 ms windows handed to the device since the last call (None
        while all of them are digital silence: the console draws a gap as silence)."""
        tap = self.renderer.tap
        if tap is None:
            return None
        lv = tap.drain()
        if lv.start_mono_ns is None or (max(lv.peak_dbfs) <= -90.0 and not lv.lost_frames):
            return None
        return {"period_ms": tap.window_ms, "start_mono_ns": lv.start_mono_ns, "dbfs": lv.rms_dbfs,
                "peak_dbfs": lv.peak_dbfs,
                "output_latency_ms": round(self.ring.control.device_latency_frames / FRAMES_PER_MS, 2),
                "lost_frames": lv.lost_frames}

    @staticmethod
    def _device_buffer(renderer: Any) -> dict[str, Any]:
        """playback.cadence's view of the libpulse speaker's buffer, which rises each time the sink
        runs dry (_native.c, "the device host"): empty on another host or backend."""
        buf = renderer.device_buffer if renderer is not None else None
        if buf is None:
            return {}
        target_ms, raises, lowers = buf
        return {"device_buffer_ms": round(target_ms, 1), "device_buffer_raises": raises,
                "device_buffer_lowers": lowers}

    def _report_callback_errors(self) -> None:
        """Say on ``engine.error`` what the device callback caught (it may not log): the latest
        exception's type and message and how many there were since the last report, at most
        once a second (a callback failing every period is one message a second, not a hundred)."""
        count = self.callback_errors
        now = time.monotonic()
        if count == self.reported_callback_errors or now < self.next_error_report_at:
            return
        self.next_error_report_at = now + 1.0
        exc = self.last_callback_error
        what = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown"
        self.pub.publish("engine.error", {"source": "playback", "code": "callback_error",
                                          "message": f"the speaker callback failed ({what}) and played silence "
                                                     f"instead; {count - self.reported_callback_errors} time(s) "
                                                     f"since the last report, {count} in all",
                                          "count": count})
        self.reported_callback_errors = count

    # ------------------------------------------------------------ backends
    def run_null(self, wav: PcmWav | None = None) -> None:
        period = self.period_ms * RATE_HZ // 1000
        out = np.zeros(period, dtype=np.int16)
        next_publish_s = 0.0
        for _ in every_period(self.stop, self.period_ms / 1000):
            now = time.monotonic()
            self.renderer.render(out, 0, now)
            if wav is not None:
                wav.writeframes(out.tobytes())
            if self.renderer.events or now >= next_publish_s:  # as with a device, whatever the period
                next_publish_s = now + PUBLISH_EVERY_S
                self.publish_events()

    def run_native(self) -> None:
        """The device through the native backend: the renderer in C behind a libpulse write
        callback (a PulseAudio device) or a PortAudio output callback (any other); this thread
        publishes what it saw and does the chores, woken by its events."""
        from engine.audio.devices import find_device, keep_running, open_pyaudio
        from engine.audio.native import NativeRenderer, window_levels
        pa = open_pyaudio()   # device lookup (and the library PortAudio shares with PyAudio)
        try:
            dev = find_device(pa, self.speaker, "output")
            rate = self.spec.config["audio"]["device_rate_hz"] or dev["default_rate_hz"]
            frames_dev = rate * self.period_ms // 1000
            old = self.renderer
            r = NativeRenderer(self.ring, old.base_prebuffer_frames, max_prebuffer_frames=old.max_prebuffer_frames,
                               ref=self.ref, stretch=old.stretch, device_rate_hz=rate,
                               block_frames=RATE_HZ * self.period_ms // 1000,
                               tap=ExternalLevelTap(RATE_HZ, measure=window_levels))
            r.listen = old.listen
            wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            r.wake_fd = wake_fd
            self.renderer = r   # type: ignore[assignment]  # the same interface, in C
            latency_s = r.open(dev["index"], rate, frames_dev)
        except BaseException:
            pa.terminate()
            raise
        self.pub.publish("playback.device", {"name": dev["name"], "rate_hz": rate, "period_frames": frames_dev,
                                             "latency_ms": round(latency_s * 1000, 1), "backend": "native",
                                             "host": r.host, "backend_note": self.backend_note})
        try:
            keep_running(pa, _NativeStream(r), self.stop, self.publish_events, PUBLISH_EVERY_S, wake_fd,
                         self._listen_watch())
        finally:
            r.wake_fd = -1
            os.close(wake_fd)

    def run_pyaudio(self) -> None:
        import pyaudio
        from engine.audio.devices import find_device, keep_running, open_pyaudio
        pa = open_pyaudio()
        dev = find_device(pa, self.speaker, "output")
        rate = self.spec.config["audio"]["device_rate_hz"] or dev["default_rate_hz"]
        frames_dev = rate * self.period_ms // 1000
        feeder = DeviceFeeder(self.renderer, RATE_HZ * self.period_ms // 1000, rate) if rate != RATE_HZ else None
        latency_frames = 0

        def callback(in_data: Any, frame_count: int, time_info: dict[str, float], status: int) -> tuple[bytes, int]:
            nonlocal latency_frames
            try:
                self.callback_ns[self.callbacks % len(self.callback_ns)] = time.monotonic_ns()
                self.callbacks += 1
                if status & pyaudio.paOutputUnderflow:
                    self.device_underflows += 1  # the device ran out before this callback: a click we caused
                    self.renderer.device_underflowed()
                latency_s = max(0.0, time_info.get("output_buffer_dac_time", 0) - time_info.get("current_time", 0))
                if latency_s <= 0 or latency_s > 1:
                    latency_s = stream_latency_s
                latency_frames = int(latency_s * RATE_HZ)
                if feeder is None:
                    out = np.empty(frame_count, dtype=np.int16)
                    self.renderer.render(out, latency_frames, time.monotonic())
                    return out.tobytes(), pyaudio.paContinue
                return feeder.fill(frame_count, latency_frames, time.monotonic()), pyaudio.paContinue
            except Exception as exc:  # a bug: answered with silence, counted, reported by publish_events
                self.callback_errors += 1
                self.last_callback_error = exc
                return bytes(frame_count * 2), pyaudio.paContinue

        stream_latency_s = 0.04
        stream = pa.open(format=pyaudio.paInt16, channels=1, rate=rate, output=True,
                         output_device_index=dev["index"], frames_per_buffer=frames_dev, stream_callback=callback)
        stream_latency_s = stream.get_output_latency()
        self.pub.publish("playback.device", {"name": dev["name"], "rate_hz": rate, "period_frames": frames_dev,
                                             "latency_ms": round(stream_latency_s * 1000, 1), "backend": "pyaudio",
                                             "backend_note": self.backend_note})
        # the publishing thread sleeps on this between chores; the renderer (and a stop signal) wakes it
        wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.renderer.wake_fd = wake_fd
        try:
            keep_running(pa, stream, self.stop, self.publish_events, PUBLISH_EVERY_S, wake_fd, self._listen_watch())
        finally:
            self.renderer.wake_fd = None
            os.close(wake_fd)

    def run(self) -> int:
        stop_on_signals(self.stop, lambda: self.renderer.wake())   # the renderer of whichever backend runs
        target = self.speaker
        try:
            if target is None or target == "null":
                return run_reporting(self.pub, "playback", self.run_null)
            if isinstance(target, str) and target.lower().endswith(".wav"):
                return run_reporting(self.pub, "playback", lambda: self._run_wav(target))
            from engine.audio.native import resolve_backend
            self.backend, self.backend_note = resolve_backend(self.spec.config["audio"].get("backend", "native"))
            return run_reporting(self.pub, "playback", self.run_native if self.backend == "native" else self.run_pyaudio)
        finally:
            self.publish_events()

    def _run_wav(self, path: str) -> None:
        """Play into a WAV file in real time; a restarted playback continues the file its
        predecessor wrote in this engine run (it never wipes what was played)."""
        with PcmWav(path, channels=1, sample_width_bytes=2, rate_hz=RATE_HZ,
                    append=self.earlier_starts > 0) as wav:
            self.run_null(wav)


class _NativeStream:
    """What :func:`keep_running` needs of a stream, for the native renderer's."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def is_active(self) -> bool:
        return bool(self.renderer.is_active())

    def stop_stream(self) -> None:
        self.renderer.close()

    def close(self) -> None:
        self.renderer.close()


if __name__ == "__main__":
    sys.exit(child.main(PlaybackProcess, PlaybackSpec))

"""The realtime process: holds the API websocket (websocket-client), streams the mic
ring to the API, writes response audio to the playback ring, publishes every server
event on the bus and takes commands from it.

Threads: the socket reader (server events), the mic sender (ring -> socket) and the
main thread (bus commands, timers, reconnects). One lock guards the protocol object;
each thread has its own bus publisher (ZeroMQ sockets are single-threaded).
"""
from __future__ import annotations

import base64
import bisect
import json
import math
import os
import sys
import threading
import time
from collections import deque
from typing import Any

import numpy as np

import websocket
import zmq

from bus import Publisher, Subscriber
from engine import child
from engine.child import stop_on_signals
from engine.realtime.protocol import (API_RATE_HZ, FRAMES_PER_MS, EndOfAudio, Flush, Play, Publish, RealtimeProtocol,
                                      Send)
from engine.ring import Ring

MIC_CHUNK_MIN_FRAMES = 480      # 20 ms
MIC_CHUNK_MAX_FRAMES = 960      # 40 ms
RECONNECT_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
MIC_LATENCY_REPORT_S = 5.0
IDLE_WAKE_S = 0.5               # the main thread sleeps until its next timer, at most this long


class InputClock:
    """Maps the server's input-buffer milliseconds (``audio_end_ms``) to local monotonic time.

    The mic sender records, per chunk, how many frames had been appended in total and when
    the chunk's last frame was captured (the mic ring's write stamp). Thread-safe enough:
    one writer (the sender), readers take a snapshot under the GIL.
    """

    def __init__(self, chunks: int = 4096) -> None:
        self.ends_frames: deque[int] = deque(maxlen=chunks)
        self.captured_at: deque[float] = deque(maxlen=chunks)
        self.sent_frames = 0

    def appended(self, frames: int, captured_at: float) -> None:
        self.sent_frames += frames
        self.ends_frames.append(self.sent_frames)
        self.captured_at.append(captured_at)

    def reset(self) -> None:
        """A new API session counts its input buffer from zero."""
        self.ends_frames.clear()
        self.captured_at.clear()
        self.sent_frames = 0

    def time_of(self, audio_ms: int) -> float | None:
        ends, times = list(self.ends_frames), list(self.captured_at)
        if not ends:
            return None
        frame = audio_ms * FRAMES_PER_MS
        i = bisect.bisect_left(ends, frame)
        if i >= len(ends):
            return times[-1] + (frame - ends[-1]) / API_RATE_HZ
        return times[i] - (ends[i] - frame) / API_RATE_HZ


class RealtimeProcess:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.url: str = spec["url"]
        self.headers: list[str] = spec.get("headers", [])
        self.pub_endpoint = spec["bus"]["publish"]
        self.sub_endpoint = spec["bus"]["subscribe"]
        self.mic = Ring.attach(spec["mic_ring"], spec.get("mic_fd")) if spec.get("mic_ring") else None
        self.speaker = Ring.attach(spec["speaker_ring"]) if spec.get("speaker_ring") else None
        self.lock = threading.Lock()
        cfg = spec["config"]
        heard = (lambda: self.speaker.heard_index) if self.speaker else (lambda: 1 << 62)
        self.input_clock = InputClock()
        self.mic_latency_us = np.zeros(4096, dtype=np.float64)  #: capture -> on the socket, per chunk (ring)
        self.mic_latency_count = 0
        self.proto = RealtimeProtocol(cfg["model"], spec["session"], heard_index=heard,
                                      input_time=self.input_clock.time_of,
                                      start_index=self.speaker.write_index if self.speaker else 0,
                                      barge_in=cfg["barge_in"]["enabled"],
                                      min_speech_ms=cfg["barge_in"]["min_speech_ms"],
                                      budget_usd=cfg.get("budget_usd"))
        self.ws: websocket.WebSocket | None = None
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.main_pub = Publisher(self.pub_endpoint, f"realtime:{os.getpid()}")
        #: wakes the main thread early: a stop signal, or a timer the reader set (see :meth:`_timers_changed`)
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.main_wakes_at = 0.0

    # -------------------------------------------------------------- actions
    def apply_audio(self, actions: list[Any]) -> None:
        """Apply the speaker ring's actions. Called under the protocol lock, with the actions just
        decided: the reader's writes and the main thread's flush reach the ring in the order the
        protocol decided them (a delta decided before a barge-in but written after its flush
        would survive the flush and play as a new response)."""
        speaker = self.speaker
        if speaker is None:
            return
        for act in actions:
            if isinstance(act, Play):
                if act.starts_item:
                    speaker.mark_start()
                speaker.write(act.pcm)
            elif isinstance(act, Flush):
                speaker.request_flush()
            elif isinstance(act, EndOfAudio):
                speaker.mark_end()

    def apply(self, actions: list[Any], pub: Publisher) -> None:
        """Apply the socket and bus actions (outside the lock; the ring's are :meth:`apply_audio`'s)."""
        for act in actions:
            if isinstance(act, Publish):
                pub.publish(act.topic, act.payload)
            elif isinstance(act, Send):
                self.send(act.event, pub)

    def send(self, event: dict[str, Any], pub: Publisher) -> None:
        ws = self.ws
        if ws is None or not self.connected.is_set():
            return
        try:
            ws.send(json.dumps(event))
        except (websocket.WebSocketException, OSError) as exc:
            pub.publish("engine.error", {"source": "socket", "code": "send_failed", "message": str(exc)})
        if event.get("type") != "input_audio_buffer.append":
            pub.publish("client." + event["type"], event)

    # -------------------------------------------------------------- socket
    def connect(self) -> bool:
        try:
            ws = websocket.create_connection(self.url, header=self.headers, timeout=10,
                                             enable_multithread=True, skip_utf8_validation=True)
        except Exception as exc:  # websocket-client raises many types
            self.main_pub.publish("engine.error", {"source": "socket", "code": "connect_failed",
                                                   "message": f"cannot connect to {self.url.split('?')[0]}: {exc}"})
            return False
        ws.settimeout(None)
        self.ws = ws
        self.connected.set()
        return True

    def reader(self) -> None:
        pub = Publisher(self.pub_endpoint, f"realtime-reader:{os.getpid()}")
        pub.join(self.sub_endpoint)
        reconnect = False
        while not self.stop.is_set():
            if not self.connected.is_set():
                if not self._reconnect(pub):
                    return
                reconnect = True
            self.input_clock.reset()
            with self.lock:
                acts = self.proto.on_connected(reconnect=reconnect)
                self.apply_audio(acts)
            self.apply(acts, pub)
            close_code = self._read_loop(pub)
            self.connected.clear()
            if self.stop.is_set():
                break
            if self.proto.protocol_refused or close_code == 4000:
                pub.publish("engine.error", {"source": "socket", "code": "protocol_refused", "fatal": True,
                                             "message": "the API refused the protocol; not reconnecting"})
                self.stop.set()
                break
            pub.publish("engine.status", {"state": "reconnecting", "close_code": close_code})
        pub.close()

    def _reconnect(self, pub: Publisher) -> bool:
        for delay in RECONNECT_DELAYS_S * 3:
            if self.stop.wait(delay):
                return False
            if self.connect():
                return True
        pub.publish("engine.error", {"source": "socket", "code": "gave_up", "fatal": True,
                                     "message": "could not reconnect to the API; giving up"})
        self.stop.set()
        return False

    def _read_loop(self, pub: Publisher) -> int | None:
        ws = self.ws
        assert ws is not None
        while not self.stop.is_set():
            try:
                opcode, data = ws.recv_data()
            except websocket.WebSocketConnectionClosedException:
                return ws.status if isinstance(ws.status, int) else 1006
            except (OSError, websocket.WebSocketException) as exc:
                pub.publish("engine.error", {"source": "socket", "code": "recv_failed", "message": str(exc)})
                return 1006
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                reason = data[2:].decode(errors="replace")
                pub.publish("engine.status", {"state": "disconnected", "close_code": code, "reason": reason})
                return code
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue
            try:
                event = json.loads(data)
                if not isinstance(event, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                pub.publish("engine.error", {"source": "api", "code": "bad_server_message", "message": f"unparseable server message: {exc}"})
                continue
            with self.lock:
                try:
                    acts = self.proto.on_server_event(event)
                except Exception as exc:  # never lose the conversation over one odd event
                    acts = [Publish("engine.error", {"source": "engine", "code": "event_handler_failed",
                                                     "message": f"{event.get('type')}: {type(exc).__name__}: {exc}"})]
                self.apply_audio(acts)
                due = self.proto.next_deadline()
                if due is not None and due < self.main_wakes_at:
                    self._wake_main()  # e.g. a barge-in delayed by min_speech_ms, a truncation fallback
            self.apply(acts, pub)
        return None

    # -------------------------------------------------------------- mic
    def mic_sender(self) -> None:
        if self.mic is None:
            return
        buf = np.empty(MIC_CHUNK_MAX_FRAMES, dtype=np.int16)
        mic = self.mic
        while not self.stop.is_set():
            if not mic.wait_readable(0.2):
                continue
            stamp_index, stamp_ns = mic.write_stamp
            n = mic.read_into(buf)
            if n == 0:
                continue
            if not self.connected.is_set():
                continue  # drop mic audio while the socket is down
            # capture time of the chunk's last frame, from the producer's stamp of its latest write
            last_index = mic.read_index
            captured_ns = stamp_ns - (stamp_index - last_index) * 1_000_000_000 // API_RATE_HZ
            payload = base64.b64encode(buf[:n].tobytes()).decode("ascii")
            ws = self.ws
            try:
                if ws is not None:
                    ws.send('{"type":"input_audio_buffer.append","audio":"' + payload + '"}')
            except (websocket.WebSocketException, OSError):
                continue  # the reader notices the broken socket and reconnects
            sent_ns = time.monotonic_ns()
            self.input_clock.appended(n, captured_ns / 1e9)
            self.mic_latency_us[self.mic_latency_count % len(self.mic_latency_us)] = (sent_ns - captured_ns) / 1000
            self.mic_latency_count += 1

    def mic_latency_report(self) -> dict[str, Any] | None:
        """p50/p99/max of capture -> socket over the recent chunks (engine-added mic latency)."""
        n = min(self.mic_latency_count, len(self.mic_latency_us))
        if n == 0:
            return None
        lat = self.mic_latency_us[:n]
        return {"chunks": self.mic_latency_count, "p50_ms": round(float(np.percentile(lat, 50)) / 1000, 3),
                "p99_ms": round(float(np.percentile(lat, 99)) / 1000, 3), "max_ms": round(float(lat.max()) / 1000, 3)}

    # -------------------------------------------------------------- main loop
    def _wake_main(self) -> None:
        try:
            os.eventfd_write(self.wake_fd, 1)
        except BlockingIOError:
            pass  # already due to wake

    def run(self) -> int:
        stop_on_signals(self.stop, self._wake_main)
        sub = Subscriber(self.sub_endpoint, ["cmd.", "engine.presence.gone", "playback.started", "playback.flushed"])
        self.main_pub.join(self.sub_endpoint)
        if not self.connect():
            if not self._reconnect(self.main_pub):
                return 1
        threads = [threading.Thread(target=self.reader, name="reader", daemon=True),
                   threading.Thread(target=self.mic_sender, name="mic", daemon=True)]
        for t in threads:
            t.start()
        poller = zmq.Poller()
        poller.register(sub.socket, zmq.POLLIN)
        poller.register(self.wake_fd, zmq.POLLIN)
        next_mic_report = time.monotonic() + MIC_LATENCY_REPORT_S
        while not self.stop.is_set():
            # sleep until the next timer (every wake-up costs CPU); the reader wakes us for new ones
            with self.lock:  # under the lock: a timer the reader sets is either seen here or wakes us
                due = self.proto.next_deadline()
                now = time.monotonic()
                self.main_wakes_at = min(now + IDLE_WAKE_S, next_mic_report, due if due is not None else math.inf)
            try:
                ready = dict(poller.poll(max(0, int((self.main_wakes_at - now) * 1000 + 0.999))))
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EINTR:
                    raise
                ready = {}
            self.main_wakes_at = 0.0  # awake: the reader need not wake us
            if self.wake_fd in ready:
                try:
                    os.eventfd_read(self.wake_fd)
                except BlockingIOError:
                    pass
            while (msg := sub.recv(timeout_ms=0)) is not None:
                topic, body = msg
                with self.lock:
                    acts = self.proto.on_command(topic, body)
                    self.apply_audio(acts)
                self.apply(acts, self.main_pub)
            if sub.malformed:
                self.main_pub.publish("engine.error", {"source": "bus", "code": "malformed_message",
                                                       "count": sub.malformed, "message": str(sub.last_error)})
                sub.malformed = 0
            with self.lock:
                acts = self.proto.on_tick()
                self.apply_audio(acts)
            self.apply(acts, self.main_pub)
            now = time.monotonic()
            if now >= next_mic_report:
                next_mic_report = now + MIC_LATENCY_REPORT_S
                report = self.mic_latency_report()
                if report is not None:
                    self.main_pub.publish("latency.mic", report)
        if self.ws is not None:
            try:
                self.ws.close(timeout=1)
            except Exception:
                pass
        sub.close()
        self.main_pub.close()
        return 0


if __name__ == "__main__":
    sys.exit(child.main(RealtimeProcess))

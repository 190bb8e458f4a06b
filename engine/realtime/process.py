"""The realtime process: holds the API websocket (websocket-client), streams the mic ring to
the API, writes response audio to the speaker ring, publishes every server event on the bus
and takes commands from it. All decisions are the core's (:mod:`engine.realtime.core`); this
module reads the clock and the ring's heard index, hands records in, and applies the actions.

Threads: the socket reader (server events, reconnects), the mic sender (ring -> core -> socket)
and the main thread (bus commands and playback reports, timers, session recycling). One lock
guards the core; each thread has its own bus publisher (ZeroMQ sockets are single-threaded).

Socket faults:
- a drop (1006 without a close frame, 1011, 1001 at the API's 60-minute limit, ...) is
  reconnected at once and then with backoff; the core replays config, tools and conversation;
- HTTP 401/403 at the handshake is fatal at once, with a message naming the key's variable;
- any other connect failure is published with its cause on the first try, then retried;
- before the session's age limit the socket is recycled at a turn boundary (``Reconnect``).
"""
from __future__ import annotations

import base64
import errno
import json
import math
import os
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import websocket
import zmq

from bus import Publisher, Subscriber
from bus.wire import INTAKE_TOPIC, STATE_TOPIC
from engine.supervisor import child
from engine.supervisor.child import stop_on_signals
from engine.realtime.core import RealtimeCore
from engine.realtime.records import (API_RATE_HZ, Action, Command, Connected, Disconnected, EndOfAudio, Flush,
                                     Input, MicAudio, Play, PlaybackReport, Publish, Reconnect, Send, SendAudio,
                                     ServerEvent, Tick)
from engine.audio.ring import Ring

MIC_CHUNK_MAX_FRAMES = 960      # 40 ms
RECONNECT_DELAYS_S = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
RECONNECT_TRIES = 18
MIC_LATENCY_REPORT_S = 5.0
IDLE_WAKE_S = 0.5               # the main thread sleeps until its next timer, at most this long
#: the API closes a session after 60 minutes; recycle before, at a turn boundary
SESSION_RECYCLE_S = 55 * 60.0
PLAYBACK_REPORTS = ("playback.started", "playback.stopped", "playback.underrun", "playback.flushed",
                    "playback.position")
#: how long a starting process waits for the broker's hand-over (it comes in milliseconds; the bound is for a
#: machine under heavy load, and a broker without an intake)
INTAKE_WAIT_S = 5.0


class AuthRefused(Exception):
    """The API refused the credentials (HTTP 401/403): retrying cannot help."""


class RealtimeProcess:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.url: str = spec["url"]
        self.headers: list[str] = list(spec.get("headers", []))
        key_env = spec.get("api_key_env")
        if key_env and os.environ.get(key_env):  # the key lives in this process's environment only
            self.headers.append(f"Authorization: Bearer {os.environ[key_env]}")
        self.key_env = key_env or "OPENAI_API_KEY"
        self.pub_endpoint = spec["bus"]["publish"]
        self.sub_endpoint = spec["bus"]["subscribe"]
        self.mic = Ring.attach(spec["mic_ring"], spec.get("mic_fd")) if spec.get("mic_ring") else None
        self.speaker = Ring.attach(spec["speaker_ring"]) if spec.get("speaker_ring") else None
        cfg = spec["config"]
        self.recycle_after_s = float(cfg.get("session_recycle_s") or SESSION_RECYCLE_S)
        #: reply_audio: each reply's audio as it was received, saved as <replies_dir>/<response id>.wav
        self.replies_dir = Path(spec["replies_dir"]) if spec.get("replies_dir") else None
        self.reply_pcm: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()
        self.mic_latency_us = np.zeros(4096, dtype=np.float64)  #: capture -> on the socket, per chunk (ring)
        self.mic_latency_count = 0
        self.core = RealtimeCore(cfg["model"], spec["session"],
                                 start_index=self.speaker.write_index if self.speaker else 0,
                                 barge_in=cfg["barge_in"]["enabled"], min_speech_ms=cfg["barge_in"]["min_speech_ms"],
                                 budget_usd=cfg.get("budget_usd"))
        self.ws: websocket.WebSocket | None = None
        self.connected_at = 0.0
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.recycle = threading.Event()
        self.restored = False                      #: a restarted process took its predecessor's conversation
        self.bus_sub: Subscriber | None = None     #: the main thread's subscriber (commands, reports, hand-overs)
        self.main_pub = Publisher(self.pub_endpoint, f"realtime:{os.getpid()}")
        #: wakes the main thread early: a stop signal, or a timer the reader set
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.main_wakes_at = 0.0

    # -------------------------------------------------------------- the core
    def heard_index(self) -> int:
        return self.speaker.heard_index if self.speaker is not None else 1 << 62

    def step(self, rec: Input, pub: Publisher) -> None:
        """Hand one record to the core and apply what it decided. The ring's actions are applied
        under the lock, in the order decided (a delta decided before a barge-in but written after
        its flush would survive the flush)."""
        with self.lock:
            acts = self.core.handle(rec, time.monotonic(), self.heard_index())
            self.apply_audio(acts)
            # mic audio (50 chunks a second) starts no timer: the deadlines stay as they were
            due = self.core.next_deadline() if not isinstance(rec, MicAudio) else None
            if due is not None and due < self.main_wakes_at:
                self._wake_main()
        self.apply(acts, pub)

    def apply_audio(self, actions: list[Action]) -> None:
        speaker = self.speaker
        if speaker is None:
            return
        for act in actions:
            if isinstance(act, Play):
                if act.starts_item:
                    speaker.mark_start()
                speaker.write(act.pcm)
                if self.replies_dir is not None:
                    self.reply_pcm.setdefault(act.response_id, []).append(act.pcm)
            elif isinstance(act, Flush):
                speaker.request_flush()
            elif isinstance(act, EndOfAudio):
                speaker.mark_end()

    def apply(self, actions: list[Action], pub: Publisher) -> None:
        """The socket and bus actions (outside the lock)."""
        for act in actions:
            if isinstance(act, Publish):
                if act.topic == "response.done" and self.replies_dir is not None:
                    self._save_reply(act.payload)
                pub.publish(act.topic, act.payload)
            elif isinstance(act, SendAudio):
                self.send_audio(act.pcm)
            elif isinstance(act, Send):
                self.send(act.event, pub)
            elif isinstance(act, Reconnect):
                self.recycle.set()
                self.send_close()

    def _save_reply(self, done: dict[str, Any]) -> None:
        """Write a finished reply's audio (24 kHz mono PCM16) and name the file on its response.done."""
        with self.lock:
            chunks = self.reply_pcm.pop(done.get("response_id") or "", None)
        if not chunks or self.replies_dir is None or done.get("status") == "failed":
            return
        path = self.replies_dir / f"{done['response_id']}.wav"
        try:
            self.replies_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            with wave.open(str(path), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(API_RATE_HZ)
                w.writeframes(b"".join(chunks))
            done["audio_path"] = str(path)
        except OSError as exc:
            done["audio_error"] = f"could not save the reply's audio to {path}: {exc.strerror}"

    def send(self, event: dict[str, Any], pub: Publisher) -> None:
        ws = self.ws
        if ws is None or not self.connected.is_set():
            return  # the core sends nothing while disconnected; a race with a drop is settled by Disconnected
        try:
            ws.send(json.dumps(event))
        except (websocket.WebSocketException, OSError) as exc:
            pub.publish("engine.error", {"source": "socket", "code": "send_failed",
                                         "message": f"sending {event.get('type')} failed: {exc}"})
        pub.publish("client." + event["type"], event)

    def send_audio(self, pcm: bytes) -> None:
        ws = self.ws
        if ws is None:
            return
        payload = base64.b64encode(pcm).decode("ascii")
        try:
            ws.send('{"type":"input_audio_buffer.append","audio":"' + payload + '"}')
        except (websocket.WebSocketException, OSError):
            pass  # the reader sees the broken socket and reconnects

    # -------------------------------------------------------------- socket
    def connect(self, pub: Publisher, first_try: bool) -> bool:
        try:
            ws = websocket.create_connection(self.url, header=self.headers, timeout=10,
                                             enable_multithread=True, skip_utf8_validation=True)
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code in (401, 403):
                raise AuthRefused(f"the API refused the credentials (HTTP {exc.status_code}) at "
                                  f"{self.url.split('?')[0]}: check ${self.key_env}, or run without a key: "
                                  "engine start --backend local") from None
            self._connect_failed(pub, f"HTTP {exc.status_code}", first_try)
            return False
        except Exception as exc:  # websocket-client and the socket layer raise many types
            self._connect_failed(pub, f"{type(exc).__name__}: {exc}", first_try)
            return False
        ws.settimeout(None)
        self.ws = ws
        self.connected_at = time.monotonic()
        self.connected.set()
        return True

    def _connect_failed(self, pub: Publisher, cause: str, first_try: bool) -> None:
        pub.publish("engine.error", {"source": "socket", "code": "connect_failed", "first_try": first_try,
                                     "message": f"cannot connect to {self.url.split('?')[0]}: {cause}"
                                                + ("; retrying with backoff" if first_try else "")})

    def _discard_socket(self) -> None:
        """The closed socket's file descriptor goes now, not when the garbage collector finds it
        (each reconnect and session recycle leaked one)."""
        ws = self.ws
        if ws is not None:
            try:
                ws.shutdown()
            except (websocket.WebSocketException, OSError):
                pass  # already gone

    def send_close(self) -> None:
        """Start a clean close (1000); the reader sees the server's close frame and reconnects."""
        ws = self.ws
        if ws is not None:
            try:
                ws.send_close(websocket.STATUS_NORMAL, b"session recycle")
            except (websocket.WebSocketException, OSError):
                pass  # already broken: the reader sees it and reconnects

    def close_socket(self) -> None:
        ws = self.ws
        if ws is not None:
            try:
                ws.close(timeout=1)
            except Exception:  # noqa: BLE001 - closing a broken socket: nothing to report
                pass

    def reader(self) -> None:
        pub = Publisher(self.pub_endpoint, f"realtime-reader:{os.getpid()}")
        pub.join(self.sub_endpoint)
        first = True
        try:
            while not self.stop.is_set():
                if not self.connected.is_set() and not self._reconnect(pub):
                    return
                reason = "start" if first else ("recycle" if self.recycle.is_set() else "reconnect")
                self.recycle.clear()
                self.step(Connected(reconnect=not first or self.restored, reason=reason), pub)
                first = False
                code, why = self._read_loop(pub)
                self.connected.clear()
                self._discard_socket()
                self.step(Disconnected(code, why), pub)
                if self.stop.is_set():
                    break
                if self.core.protocol_refused or code == 4000:
                    self._fatal(pub, "protocol_refused", "the API refused the protocol; not reconnecting")
                    break
                if not self.recycle.is_set():
                    pub.publish("engine.status", {"state": "reconnecting", "close_code": code})
        except AuthRefused as exc:
            self._fatal(pub, "auth_refused", str(exc))
        finally:
            pub.close()

    def _fatal(self, pub: Publisher, code: str, message: str) -> None:
        pub.publish("engine.error", {"source": "socket", "code": code, "fatal": True, "message": message})
        self.stop.set()
        self._wake_main()

    def _reconnect(self, pub: Publisher) -> bool:
        for attempt in range(RECONNECT_TRIES):
            delay = RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)]
            if delay and self.stop.wait(delay):
                return False
            if self.stop.is_set():
                return False
            if self.connect(pub, first_try=attempt == 0):
                return True
        self._fatal(pub, "gave_up", f"could not reconnect to the API after {RECONNECT_TRIES} tries; giving up")
        return False

    def _read_loop(self, pub: Publisher) -> tuple[int, str]:
        """Read server events until the socket closes; returns the close code and reason
        (1006 when the connection ended without a close frame)."""
        ws = self.ws
        assert ws is not None
        while not self.stop.is_set():
            try:
                opcode, data = ws.recv_data()
            except websocket.WebSocketConnectionClosedException:
                return 1006, "connection lost without a close frame"
            except (OSError, websocket.WebSocketException) as exc:
                return 1006, f"{type(exc).__name__}: {exc}"
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                return code, data[2:].decode(errors="replace")
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue
            try:
                event = json.loads(data)
                if not isinstance(event, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                pub.publish("engine.error", {"source": "api", "code": "bad_server_message",
                                             "message": f"unparseable server message: {exc}"})
                continue
            self.step(ServerEvent(event), pub)
        return 1000, "stopping"

    # -------------------------------------------------------------- mic
    def mic_sender(self) -> None:
        if self.mic is None:
            return
        pub = Publisher(self.pub_endpoint, f"realtime-mic:{os.getpid()}")
        buf = np.empty(MIC_CHUNK_MAX_FRAMES, dtype=np.int16)
        mic = self.mic
        while not self.stop.is_set():
            if not mic.wait_readable(0.2):
                continue
            stamp_index, stamp_ns = mic.write_stamp
            n = mic.read_into(buf)
            if n == 0 or not self.connected.is_set():
                continue  # mic audio while the socket is down is dropped
            # capture time of the chunk's last frame, from the producer's stamp of its latest write
            captured_ns = stamp_ns - (stamp_index - mic.read_index) * 1_000_000_000 // API_RATE_HZ
            self.step(MicAudio(buf[:n].tobytes(), captured_ns / 1e9), pub)
            sent_ns = time.monotonic_ns()
            self.mic_latency_us[self.mic_latency_count % len(self.mic_latency_us)] = (sent_ns - captured_ns) / 1000
            self.mic_latency_count += 1
        pub.close()

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

    def _bus_record(self, topic: str, body: dict[str, Any]) -> Input:
        if topic.startswith("playback."):
            start, index = body.get("start_index"), body.get("index")
            return PlaybackReport(topic[len("playback."):], start if isinstance(start, int) else None,
                                  index if isinstance(index, int) else None, body)
        return Command(topic, body)

    def _take_over(self, sub: Subscriber) -> None:
        """Start from what the broker holds: it answers our subscription to ``intake.realtime`` with
        the state our predecessor published (none at the engine's start) and the commands no
        realtime process has taken yet, in the order they came (bus/intake.py). Before the first
        socket opens: the conversation is replayed first, then what was held is sent. Messages
        that come live meanwhile are handled after them (copies are taken once: the core
        de-duplicates by command key)."""
        early: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + INTAKE_WAIT_S
        handover = None
        while handover is None:
            msg = sub.recv(timeout_ms=max(0, int((deadline - time.monotonic()) * 1000)))
            if msg is None:
                self.main_pub.publish("engine.error", {
                    "source": "realtime", "code": "no_handover", "benign": True,
                    "message": f"the broker handed over no state within {INTAKE_WAIT_S:g} s; starting without "
                               "the conversation and the commands it holds (they are offered again)"})
                break
            if msg[0] == INTAKE_TOPIC and msg[1].get("restore") is True:
                handover = msg[1]
            else:
                early.append(msg)
        state = self._accept_inner(sub, handover.get("state")) if handover else None
        previous_life = state is not None or (self.speaker is not None and self.speaker.write_index > 0) or \
            (self.mic is not None and self.mic.read_index > 0)
        if self.speaker is not None and previous_life:
            # what the dead process wrote is an answer reported failed: it stops now (faded), so the
            # next answer plays at once instead of after it (up to the ring's 87 s), then a new stream
            self.speaker.request_flush()
            self.speaker.mark_end()
        if state is not None and state[0] == STATE_TOPIC:
            with self.lock:
                acts = self.core.restore_history(state[1])
            self.restored = True
            self.apply(acts, self.main_pub)
        for frames in (handover or {}).get("commands") or []:
            held = self._accept_inner(sub, frames)
            if held is not None:
                self.step(self._bus_record(*held), self.main_pub)
        for topic, body in early:
            self._on_bus(topic, body)

    @staticmethod
    def _accept_inner(sub: Subscriber, frames: Any) -> tuple[str, dict[str, Any]] | None:
        """A message inside the broker's hand-over, checked as if read from the bus (signature included)."""
        if not isinstance(frames, list) or not all(isinstance(f, bytes) for f in frames):
            return None
        return sub.accept(frames)

    def _on_bus(self, topic: str, body: dict[str, Any]) -> None:
        """One bus message on the main thread: a command, a playback report, a hand-over of held commands."""
        if topic == INTAKE_TOPIC:   # held commands offered (again): the core takes each once
            for frames in body.get("commands") or []:
                held = self._accept_inner(self.bus_sub, frames) if self.bus_sub is not None else None
                if held is not None:
                    self.step(self._bus_record(*held), self.main_pub)
            return
        if topic == "engine.error":
            if body.get("code") == "child_exited" and body.get("child") == "broker":
                with self.lock:  # a new broker's last-value cache is empty: fill it again
                    acts = self.core.state_messages()
                self.apply(acts, self.main_pub)
            return
        self.step(self._bus_record(topic, body), self.main_pub)

    def run(self) -> int:
        stop_on_signals(self.stop, self._wake_main)
        sub = Subscriber(self.sub_endpoint, ["cmd.", "engine.presence.gone", "engine.error", *PLAYBACK_REPORTS])
        self.bus_sub = sub
        self.main_pub.join(self.sub_endpoint)
        sub.socket.setsockopt(zmq.SUBSCRIBE, INTAKE_TOPIC.encode())   # after the others: the broker answers it
        self.restored = False
        self._take_over(sub)
        try:
            if not self.connect(self.main_pub, first_try=True) and not self._reconnect(self.main_pub):
                return 1
        except AuthRefused as exc:
            self._fatal(self.main_pub, "auth_refused", str(exc))
            time.sleep(0.2)  # let the message leave before the process exits
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
            with self.lock:  # under the lock: a timer the reader sets is either seen here or wakes us
                due = self.core.next_deadline()
                now = time.monotonic()
                self.main_wakes_at = min(now + IDLE_WAKE_S, next_mic_report, due if due is not None else math.inf)
            try:
                ready = dict(poller.poll(max(0, int((self.main_wakes_at - now) * 1000 + 0.999))))
            except zmq.ZMQError as exc:
                if exc.errno != errno.EINTR:
                    raise
                ready = {}
            self.main_wakes_at = 0.0  # awake: the reader need not wake us
            if self.wake_fd in ready:
                try:
                    os.eventfd_read(self.wake_fd)
                except BlockingIOError:
                    pass
            while (msg := sub.recv(timeout_ms=0)) is not None:
                self._on_bus(*msg)
            sub.publish_reports(self.main_pub, "realtime")  # malformed or forged messages, drops: once a second
            self.step(Tick(), self.main_pub)
            now = time.monotonic()
            if self.connected.is_set() and not self.recycle.is_set() and now - self.connected_at >= self.recycle_after_s:
                with self.lock:
                    boundary = self.core.at_turn_boundary()
                if boundary:
                    self.apply([Reconnect("session age")], self.main_pub)
            if now >= next_mic_report:
                next_mic_report = now + MIC_LATENCY_REPORT_S
                report = self.mic_latency_report()
                if report is not None:
                    self.main_pub.publish("latency.mic", report)
        self.close_socket()
        sub.close()
        self.main_pub.close()
        return 0


if __name__ == "__main__":
    sys.exit(child.main(RealtimeProcess))

"""The realtime process: holds the API link (:mod:`engine.link`: one websocket, asyncio
``websockets``), streams the mic ring to the API, writes response audio to the speaker ring,
publishes every server event on the bus and takes commands from it. All decisions are the
core's (:mod:`engine.realtime.core`) and the link policy's (:mod:`engine.link.policy`); this
module reads the clock and the ring's heard index, hands records in, and applies the actions.

Threads:
- the link thread runs an asyncio loop that owns the core: the API socket (its reads, its
  reconnects), the mic ring (its eventfd watched by the loop: ring -> core -> socket in one
  callback), ``playout.position`` (the speaker ring's heard index handed to the core every 200 ms
  while an item plays, after a mic chunk: no wake-up of its own, and no ``playback.position``
  taken from the bus), the core's timers, and every action, applied in the order decided.
  Nothing else touches the core once the link runs, so nothing is decided in one order and sent
  in another.
- the main thread takes bus commands and the other playback reports and hands each to the link
  thread (``submit``); before the link starts it takes over from the broker (:meth:`_take_over`): the
  state a predecessor published and the commands the broker holds, into the core it still owns.
Each thread has its own bus publisher (ZeroMQ sockets are single-threaded).

Socket faults (the link policy's rules): a backend that cannot be reached at the first start is
fatal at once, naming the URL and the cause; HTTP 401/403 is fatal at once, naming the key's
variable; a drop after a session existed is reconnected at once and then with backoff, and the
core replays config, tools and conversation; before the session's age limit the socket is
recycled at a turn boundary.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import re
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from bus import Publisher, Subscriber
from bus.wire import INTAKE_TOPIC, STATE_TOPIC
from engine.link.backends import backend_for
from engine.link.policy import LinkRules
from engine.link.shell import ApiLink
from engine import child
from engine.child import next_due, stop_on_signals, wake, woken
from engine.realtime.dialects import dialect_for
from engine.realtime.jitter import JitterEstimator
from engine.realtime.live_core import SESSION_CLOSE_WAIT_S
from engine.realtime.records import (Action, Command, EndOfAudio, Flush, Input, MicAudio, Play,
                                     PlaybackReport, Publish)
from engine.audio.ring import Ring
from engine.pcm import CHANNELS, RATE_HZ, SAMPLE_WIDTH_BYTES
from engine.specs import RealtimeSpec

MIC_CHUNK_MAX_FRAMES = 960      # 40 ms
MIC_LATENCY_REPORT_S = 5.0
IDLE_WAKE_S = 0.5               # the main thread polls the bus at most this long before it looks at stop
#: the playback reports the main thread takes and hands to the link thread (not ``playback.position``:
#: the link thread reads the heard index from the speaker ring itself, see ``_position_due``)
PLAYBACK_REPORTS = ("playback.started", "playback.stopped", "playback.underrun", "playback.flushed")
POSITION_EVERY_S = 0.2          #: playout.position while an item plays
PLAYOUT_EDGES = frozenset({"playout.started", "playout.stopped", "playout.interrupted"})
#: the position is taken after a mic chunk when one is due; the loop's timer takes it only when no chunk came
#: this long after it was due (no mic, a capture restarting)
POSITION_SLACK_S = 0.03
#: how long a starting process waits for the broker's hand-over (it comes in milliseconds; the bound is for a
#: machine under heavy load, and a broker without an intake)
INTAKE_WAIT_S = 5.0
FATAL_LINGER_S = 1.0            # after a fatal link error, wait this long for the supervisor's stop
UNREACHABLE_HINT = "check openai_url in the config and the network, or run offline: engine start --backend local"


#: a response id that may name a file as it is: the API's ids (``resp_...``); anything else from a
#: server (``../x``, ``/tmp/x``, a NUL) names the file by a local counter instead
SAFE_FILE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def reply_wav_name(response_id: str, n: int) -> str:
    """The file a reply's audio is saved in, inside the replies folder: ``<response id>.wav``, or
    ``reply-<n>.wav`` when the server's id is not a plain name."""
    return f"{response_id}.wav" if SAFE_FILE_ID.fullmatch(response_id) else f"reply-{n}.wav"


class RealtimeProcess:
    def __init__(self, spec: RealtimeSpec) -> None:
        self.spec = spec
        self.url: str = spec.url
        # a hand-written spec's api_key_env: the key lives in this process's environment only
        self.headers: dict[str, str] = spec.api.header_map(os.environ)
        self.key_env = spec.api.key_name()
        #: the provider's dialect, translated at the wire by the link (engine/providers.py, realtime/dialects.py)
        self.dialect = dialect_for(spec.api.provider, spec.config["model"], spec.api.deployment)
        self.pub_endpoint = spec.bus.publish
        self.sub_endpoint = spec.bus.subscribe
        self.mic = Ring.attach(spec.mic_ring, spec.mic_fd) if spec.mic_ring else None
        self.speaker = Ring.attach(spec.speaker_ring) if spec.speaker_ring else None
        cfg = spec.config
        self.cfg = cfg
        self.backend = backend_for(cfg["model"])
        self.recycle_after_s = self.backend.recycle_after_s(cfg.get("session_recycle_s"))
        #: reply_audio: each reply's audio as it was received, saved as <replies_dir>/<response id>.wav
        self.replies_dir = Path(spec.replies_dir) if spec.replies_dir else None
        self.reply_pcm: dict[str, list[bytes]] = {}
        self.replies_saved = 0   #: replies saved: the counter that names a reply whose response id cannot
        #: the adaptive jitter buffer (audio.jitter_buffer: adaptive): each delta timed where it arrives,
        #: the target handed to playback in the speaker ring's target_frames; None: fixed, the ring has none
        self.jitter = JitterEstimator(cfg["audio"]["prebuffer_ms"]) \
            if cfg["audio"].get("jitter_buffer", "adaptive") == "adaptive" and self.speaker is not None else None
        self.core = self.backend.core(cfg["model"], spec.session,
                                      start_index=self.speaker.write_index if self.speaker else 0,
                                      barge_in=cfg["barge_in"]["enabled"], min_speech_ms=cfg["barge_in"]["min_speech_ms"],
                                      budget_usd=cfg.get("budget_usd"))
        self.stop = threading.Event()              #: the main loop ends (a signal, or the link ended)
        self.signalled = threading.Event()         #: SIGTERM / SIGINT: the supervisor stops this process
        self.restored = False                      #: a restarted process took its predecessor's conversation
        self.bus_sub: Subscriber | None = None     #: the main thread's subscriber (commands, reports, hand-overs)
        self.main_pub = Publisher(self.pub_endpoint, f"realtime:{os.getpid()}")
        #: wakes the main thread early: a stop signal, or the link thread ending
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # the link thread's, once it runs
        self.loop: asyncio.AbstractEventLoop | None = None
        self.link: ApiLink | None = None
        self.link_pub: Publisher | None = None
        #: playout.position: an item plays (between its playout.started and playout.stopped / .interrupted)
        self._playing = False
        self._next_position_at = 0.0
        self._position_timer: asyncio.TimerHandle | None = None
        self.link_ready = threading.Event()
        self.link_failure: BaseException | None = None   #: a bug that ended the link thread (re-raised: a crash)
        self.fatal = False
        self._mic_buf = np.empty(MIC_CHUNK_MAX_FRAMES, dtype=np.int16)

    # -------------------------------------------------------------- the link's host (link thread)
    def heard_index(self, now_s: float) -> int:
        return self.speaker.heard_index if self.speaker is not None else 1 << 62

    def perform(self, act: Play | Flush | EndOfAudio | Publish, now_s: float) -> Input | None:
        """The core's ring and bus actions, in the order decided."""
        if isinstance(act, Publish):
            if act.topic == "response.done" and self.replies_dir is not None:
                self._save_reply(act.payload)
            assert self.link_pub is not None
            self.link_pub.publish(act.topic, act.payload)
            if act.topic in PLAYOUT_EDGES:
                self._playout_edge(act.topic == "playout.started", now_s)
            return None
        self._ring_action(act, now_s)
        return None

    def _ring_action(self, act: Play | Flush | EndOfAudio, now_s: float) -> None:
        speaker = self.speaker
        if speaker is None:
            return
        if isinstance(act, Play):
            if self.jitter is not None:
                # this delta arrived now (the link hands each server event to the core, and its
                # actions here, in the callback that read it); the target covering this stream is
                # stored before its start mark (the ring's contract)
                self.jitter.audio(now_s, len(act.pcm) / (SAMPLE_WIDTH_BYTES * RATE_HZ), act.starts_item)
                # nothing measured yet: no target (0), playback waits its configured prebuffer
                speaker.control.set_target(self.jitter.target_frames(speaker.sample_rate) if self.jitter.measured else 0)
            if act.starts_item:
                speaker.control.set_continuous(act.continuous)   # before the start mark (the ring's contract)
                speaker.mark_start()
            speaker.write(act.pcm)
            if self.replies_dir is not None:
                self.reply_pcm.setdefault(act.response_id, []).append(act.pcm)
        elif isinstance(act, Flush):
            speaker.request_flush()
        elif isinstance(act, EndOfAudio):
            speaker.mark_end()

    def received(self, event: Any, in_s: float) -> None:
        pass   # the core stamps what it needs with now_s

    def _save_reply(self, done: dict[str, Any]) -> None:
        """Write a finished reply's audio (24 kHz mono PCM16) and name the file on its response.done."""
        chunks = self.reply_pcm.pop(done.get("response_id") or "", None)
        if not chunks or self.replies_dir is None or done.get("status") == "failed":
            return
        self.replies_saved += 1
        path = self.replies_dir / reply_wav_name(str(done.get("response_id") or ""), self.replies_saved)
        while path.name.startswith("reply-") and path.exists():   # a predecessor's (a restart): never overwritten
            self.replies_saved += 1
            path = self.replies_dir / reply_wav_name("", self.replies_saved)
        try:
            self.replies_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            with wave.open(str(path), "wb") as w:
                w.setnchannels(CHANNELS)
                w.setsampwidth(SAMPLE_WIDTH_BYTES)
                w.setframerate(RATE_HZ)
                w.writeframes(b"".join(chunks))
            done["audio_path"] = str(path)
        except OSError as exc:
            done["audio_error"] = f"could not save the reply's audio to {path}: {exc.strerror}"

    def apply(self, actions: list[Action], pub: Publisher) -> None:
        """Actions decided before the link runs (the take-over's: a restored conversation, held
        commands while no socket is open): bus and ring actions; the core sends nothing then."""
        for act in actions:
            if isinstance(act, Publish):
                pub.publish(act.topic, act.payload)
            elif isinstance(act, (Play, Flush, EndOfAudio)):
                self._ring_action(act, time.monotonic())

    def _step_before_link(self, rec: Input) -> None:
        """Hand a record to the core while the link does not run yet (this thread owns the core)."""
        self.apply(self.core.handle(rec, time.monotonic(), self.heard_index(0.0)), self.main_pub)

    # -------------------------------------------------------------- mic (link thread)
    def _on_mic(self) -> None:
        """The mic ring's eventfd signalled: hand every chunk in the ring to the core (and so to
        the socket), then ask to be signalled again."""
        mic, link = self.mic, self.link
        assert mic is not None and link is not None
        mic.take_wake()
        buf = self._mic_buf
        while True:
            stamp_index, stamp_ns = mic.write_stamp
            n = mic.read_into(buf)
            if n == 0:
                if mic.arm_wake():
                    if self._playing:
                        self._position_due(time.monotonic())
                    return
                continue
            if not link.connected:
                continue  # mic audio while the socket is down is dropped
            # capture time of the chunk's last frame: the producer's stamp of its latest write, paced
            # back over the frames written after it (the session clock maps the server's times to it).
            # The mic latency counts from the write itself: PulseAudio hands captures over in bursts
            # (periods 26.6 ms apart, then one at once), so a backlog's frames mostly came together,
            # and pacing them back charged up to 19 ms of that bunching to the engine
            # (bench/results/2026-12.md)
            captured_ns = stamp_ns - (stamp_index - mic.read_index) * 1_000_000_000 // RATE_HZ
            link.step(MicAudio(buf[:n].tobytes(), captured_ns / 1e9, stamp_ns / 1e9))

    # -------------------------------------------------------------- playout.position (link thread)
    def _playout_edge(self, started: bool, now_s: float) -> None:
        """An item started playing (its ``playout.started``): positions every POSITION_EVERY_S from
        now on; or it stopped or was interrupted: no more."""
        self._playing = started
        if self._position_timer is not None:
            self._position_timer.cancel()
            self._position_timer = None
        if started:
            self._next_position_at = now_s + POSITION_EVERY_S
            self._arm_position_timer(now_s)

    def _arm_position_timer(self, now_s: float) -> None:
        loop = self.loop
        if loop is not None:
            self._position_timer = loop.call_later(self._next_position_at + POSITION_SLACK_S - now_s,
                                                   self._guarded(self._on_position_timer))

    def _on_position_timer(self) -> None:
        self._position_timer = None
        self._position_due(time.monotonic())

    def _position_due(self, now_s: float) -> None:
        """Hand the core the heard index as a position report when one is due while an item plays.
        Called after each mic chunk (the link thread is awake then: no wake-up of its own) and by
        the loop's timer when no chunk came. The heard index is the speaker ring's, the number
        ``playback.position`` carries: this process reads it itself instead of taking that message
        from the bus (a wake-up, a receive, a signature check: about 280 µs of CPU each here)."""
        if not self._playing or now_s < self._next_position_at:
            return
        link, speaker = self.link, self.speaker
        if link is None or speaker is None:
            return
        self._next_position_at = next_due(self._next_position_at, now_s, POSITION_EVERY_S)
        if self._position_timer is not None:
            self._position_timer.cancel()
        self._arm_position_timer(now_s)
        index = speaker.heard_index
        link.step(PlaybackReport("position", None, index, {"index": index}))

    def _report_mic_latency(self) -> None:
        """p50/p99/max of capture -> socket over the recent chunks (engine-added mic latency), every 5 s."""
        assert self.link is not None and self.link_pub is not None and self.loop is not None
        report = self.link.audio_latency.report()
        if report is not None:
            self.link_pub.publish("latency.mic", report)
        self.loop.call_later(MIC_LATENCY_REPORT_S, self._report_mic_latency)

    # -------------------------------------------------------------- the link thread
    def _link_error(self, exc: BaseException) -> None:
        """A timer's or the mic's handling raised (a bug): the process ends as a crash."""
        if self.link_failure is None:
            self.link_failure = exc
        if self.link is not None:
            self.link.stop()

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported as the process's crash
                self._link_error(exc)
        return call

    async def _link_main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.link_pub = Publisher(self.pub_endpoint, f"realtime-link:{os.getpid()}")
        self.link_pub.join(self.sub_endpoint)
        self.link = ApiLink(self.backend, self.core, self, self.url, self.headers,
                            LinkRules(self.url.split("?")[0], key_env=self.key_env, resumed=self.restored,
                                      recycle_after_s=self.recycle_after_s, hint=UNREACHABLE_HINT),
                            name="realtime", on_error=self._link_error, dialect=self.dialect)
        if self.mic is not None and self.mic.data_fd is not None:
            on_mic = self._guarded(self._on_mic)
            self.loop.add_reader(self.mic.data_fd, on_mic)
            if not self.mic.arm_wake():
                self.loop.call_soon(on_mic)   # frames are waiting already
        self.loop.call_later(MIC_LATENCY_REPORT_S, self._report_mic_latency)
        self.link_ready.set()
        try:
            end = await self.link.run()
        finally:
            if self.mic is not None and self.mic.data_fd is not None:
                self.loop.remove_reader(self.mic.data_fd)
        if end is not None:
            self.fatal = True
            self.link_pub.publish("engine.error", {"source": "socket", "code": end.code, "fatal": True,
                                                   "message": end.message})

    def _link_thread(self) -> None:
        try:
            asyncio.run(self._link_main())
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread: a crash
            if self.link_failure is None:
                self.link_failure = exc
        finally:
            if self.link_pub is not None:
                self.link_pub.close()
            self.link_ready.set()
            self.stop.set()
            self._wake_main()

    def submit(self, rec: Input) -> None:
        """Hand a record to the core, on the link thread (applied there, in order with the rest)."""
        loop, link = self.loop, self.link
        if loop is not None and link is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._guarded(lambda: link.step(rec)))
            except RuntimeError:
                pass  # the loop just closed: the process is stopping

    def _close_session(self, link: ApiLink) -> None:
        """GPT-Live: ``session.close`` before the socket, so the session's last usage (up to 15 s
        since its last ``usage.updated``) is counted and the session is known finalized; waited
        for at most SESSION_CLOSE_WAIT_S. Nothing for Realtime."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:   # on the link thread, which owns the core; a little longer here for the hand-over
            asyncio.run_coroutine_threadsafe(link.end_session(SESSION_CLOSE_WAIT_S), loop).result(
                SESSION_CLOSE_WAIT_S + 0.5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass   # not closed in time, or the link's loop ended meanwhile: the link's stop follows

    def in_link(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the link thread (it owns the core)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._guarded(fn))
            except RuntimeError:
                pass

    # -------------------------------------------------------------- main loop
    def _wake_main(self) -> None:
        wake(self.wake_fd)

    def _bus_record(self, topic: str, body: dict[str, Any], offered: bool = False) -> Input:
        """A bus message as the core's record; ``offered``: a command the broker handed over."""
        if topic.startswith("playback."):
            start, index = body.get("start_index"), body.get("index")
            return PlaybackReport(topic[len("playback."):], start if isinstance(start, int) else None,
                                  index if isinstance(index, int) else None, body)
        return Command(topic, body, offered)

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
        if handover:
            self.core.restore_outcomes(handover.get("outcomes"))   # a re-send is answered as before
        if state is not None and state[0] == STATE_TOPIC:
            self.apply(self.core.restore_history(state[1]), self.main_pub)
            self.restored = True
        for owner in (handover or {}).get("gone_owners") or []:   # left while no realtime process ran
            if isinstance(owner, str) and owner:
                self._step_before_link(Command("engine.presence.gone", {"owner": owner}))
        for frames in (handover or {}).get("commands") or []:
            held = self._accept_inner(sub, frames)
            if held is not None:
                self._step_before_link(self._bus_record(*held, offered=True))
        for topic, body in early:
            self._on_bus(topic, body, before_link=True)

    @staticmethod
    def _accept_inner(sub: Subscriber, frames: Any) -> tuple[str, dict[str, Any]] | None:
        """A message inside the broker's hand-over, checked as if read from the bus (signature included)."""
        if not isinstance(frames, list) or not all(isinstance(f, bytes) for f in frames):
            return None
        return sub.accept(frames)

    def _on_bus(self, topic: str, body: dict[str, Any], before_link: bool = False) -> None:
        """One bus message on the main thread: a command, a playback report, a hand-over of held
        commands; handed to the link thread (or, before it runs, to the core here)."""
        hand = self._step_before_link if before_link else self.submit
        if topic == INTAKE_TOPIC:   # held commands offered (again): the core takes each once
            for frames in body.get("commands") or []:
                held = self._accept_inner(self.bus_sub, frames) if self.bus_sub is not None else None
                if held is not None:
                    hand(self._bus_record(*held, offered=True))
            return
        if topic == "engine.error":
            if body.get("code") == "child_exited" and body.get("child") == "broker":
                if before_link:   # a new broker's last-value cache is empty: fill it again
                    self.apply(self.core.state_messages(), self.main_pub)
                else:
                    self.in_link(self._republish_state)
            return
        hand(self._bus_record(topic, body))

    def _republish_state(self) -> None:
        """A new broker's last-value cache is empty: fill it again (on the link thread)."""
        assert self.link_pub is not None
        for act in self.core.state_messages():
            if isinstance(act, Publish):
                self.link_pub.publish(act.topic, act.payload)

    def run(self) -> int:
        def on_signal() -> None:
            self.stop.set()
            self._wake_main()
        stop_on_signals(self.signalled, on_signal)
        sub = Subscriber(self.sub_endpoint, ["cmd.", "engine.presence.gone", "engine.error", *PLAYBACK_REPORTS])
        self.bus_sub = sub
        self.main_pub.join(self.sub_endpoint)
        sub.socket.setsockopt(zmq.SUBSCRIBE, INTAKE_TOPIC.encode())   # after the others: the broker answers it
        self.restored = False
        self._take_over(sub)
        link_thread = threading.Thread(target=self._link_thread, name="link", daemon=True)
        link_thread.start()
        self.link_ready.wait()
        poller = zmq.Poller()
        poller.register(sub.socket, zmq.POLLIN)
        poller.register(self.wake_fd, zmq.POLLIN)
        while not self.stop.is_set():
            try:
                ready = dict(poller.poll(int(IDLE_WAKE_S * 1000)))
            except zmq.ZMQError as exc:
                if exc.errno != errno.EINTR:
                    raise
                ready = {}
            if self.wake_fd in ready:
                woken(self.wake_fd)
            while (msg := sub.recv(timeout_ms=0)) is not None:
                self._on_bus(*msg)
            sub.publish_reports(self.main_pub, "realtime")  # malformed or forged messages, drops: once a second
        if self.fatal:   # the supervisor stops the engine on the error: exit when it says so, or soon after
            self.signalled.wait(FATAL_LINGER_S)
        link = self.link
        if link is not None:
            if not self.fatal and link_thread.is_alive():
                self._close_session(link)
            self.in_link(link.stop)
        link_thread.join(3.0)
        sub.close()
        self.main_pub.close()
        if self.link_failure is not None:
            raise self.link_failure
        return 1 if self.fatal else 0


if __name__ == "__main__":
    sys.exit(child.main(RealtimeProcess, RealtimeSpec))

"""The phone bridge: Twilio Media Streams WebSockets in, one API session per call out, all in one
asyncio loop. Each call is driven by the engine's own pure core (the model's backend's, as the
engine's: RealtimeCore with ``audio_format="audio/pcmu"``) through the engine's own API link
(:mod:`engine.link`, as the realtime process): the phone side stands in for capture (caller
audio -> MicAudio) and playback (Play -> ``media`` messages as the audio arrives, never re-paced:
the phone side buffers and plays it; marks -> the heard index, Flush -> ``clear``).

I/O only; the decisions are the core's (:mod:`engine.realtime.core`), the link policy's
(:mod:`engine.link.policy`), the protocol's (:mod:`engine.phone.twilio`) and the heard clock's
(:mod:`engine.phone.heard`).

Rules:
- A call's sockets are written by one writer each (:class:`engine.wsio.Outgoing`): applying the
  core's actions never waits on a socket, and their order is kept.
- A call's API socket is its :class:`~engine.link.shell.ApiLink`: the same connect, reconnect,
  fatal-failure and recycle rules as the engine's (a call gives up sooner: a caller waits in
  silence). A call whose API cannot be reached at its start, or whose key is refused, ends at once.
- Every bus message of a call carries ``phone_call_id`` (``call_id`` is already the key of a
  tool call's id); commands name the call the same way. Tool registrations without a
  ``phone_call_id`` are for every call, present and future.
- Whatever goes wrong in one call (a bad phone message, a handler bug, a dead API socket) is
  reported with its ``phone_call_id`` and ends at most that call.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import time
from typing import Any, Mapping

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bus import Publisher, Subscriber
from engine.phone.heard import HeardClock
from engine.phone.hold import Out, StartHold
from engine.phone.twilio import (FRAME_BYTES, MEDIA_RATE_HZ, DtmfMsg, MarkMsg, MediaMsg, PhoneProtocolError, StartMsg,
                                 StopMsg, TwilioStream)
from engine.link.backends import ProtocolCore, backend_for
from engine.link.policy import LinkRules
from engine.link.shell import ApiLink
from engine.realtime.records import Command, EndOfAudio, Flush, Input, MicAudio, Play, PlaybackReport, Publish
from engine.wsio import LATE_S as LATE_S, OUTGOING_MAX as OUTGOING_MAX, Latency as Latency, Outgoing as Outgoing

STATUS_EVERY_S = 1.0
#: failed API connects in a row before a call gives up (about 8 s: 0, 0.2, 0.5, 1, 2, 4 s); the engine's is 18
API_RECONNECT_TRIES = 6
API_CLOSE_WAIT_S = 3.0         #: a call's end waits this long for its API link to close
#: topics whose name is the engine's single session: a call's go out under phone.call.*
CALL_TOPIC_RENAMES = {"engine.status": "phone.call.status"}
DTMF_MODES = ("off", "context", "reply")
#: what to do when a call's API cannot be reached at its start (named in its error)
UNREACHABLE_HINT = "check openai_url in the config and the network"


def call_session(session: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's session config with G.711 µ-law both ways (no resampling anywhere)."""
    out = json.loads(json.dumps(session))
    audio = out.setdefault("audio", {})
    audio.setdefault("input", {})["format"] = {"type": "audio/pcmu"}
    audio.setdefault("output", {})["format"] = {"type": "audio/pcmu"}
    return out


class Call:
    """One phone call: its Twilio stream, its core, its API socket."""

    def __init__(self, bridge: "PhoneBridge", ws: ServerConnection) -> None:
        self.bridge = bridge
        self.ws = ws
        self.stream = TwilioStream()
        self.clock = HeardClock(bridge.mark_every_frames)
        self.core: ProtocolCore | None = None
        self.link: ApiLink | None = None
        self.id: str = ""
        self.start: StartMsg | None = None
        self.started_at_s = time.monotonic()
        self.started_wall = time.time()
        self.phone_out = Outgoing("phone")
        self.api_task: asyncio.Task[None] | None = None
        self.hold = StartHold(bridge.prebuffer_ms)      #: each reply's start held audio.prebuffer_ms
        self.hold_timer: asyncio.TimerHandle | None = None
        self.item_start: int | None = None
        self.ended = False
        self.end_reason = ""
        self.media_in_frames = 0
        self.errors = 0
        self.truncations = 0
        #: phone frame in -> its audio handed to the API socket; API delta in -> each of its media frames
        #: handed to the phone socket; speech_started in -> clear handed to the phone socket
        self.in_latency = Latency()
        self.out_latency = Latency()
        self.clear_latency = Latency()

    # ------------------------------------------------------------ the phone side
    async def run(self) -> None:
        self.phone_out.start(self.ws)
        try:
            async for text in self.ws:
                self.on_phone(text)
                if self.ended:
                    break
            if not self.ended:
                self.end_reason = self.end_reason or "hangup"
        except ConnectionClosed:
            self.end_reason = self.end_reason or "hangup"
        except Exception as exc:  # noqa: BLE001 - one call's bug ends that call only
            self.fail(exc)
        finally:
            await self.end()

    def fail(self, exc: BaseException) -> None:
        """A bug in this call's handling (phone side, API side or a timer): ``engine.error``
        ``call_failed`` for this call, and this call ends (its phone socket closes); no other call
        is touched."""
        if self.end_reason == "error":
            return
        self.end_reason = "error"
        self.ended = True
        self.bridge.error(self, "call_failed", f"the call failed: {type(exc).__name__}: {exc}", fatal=True)
        if self.ws.state.name == "OPEN":
            asyncio.get_running_loop().create_task(self.ws.close(1011, "call failed"))

    def on_phone(self, text: str | bytes) -> None:
        now = time.monotonic()
        try:
            msg = self.stream.receive(text)
        except PhoneProtocolError as exc:
            self.errors += 1
            self.bridge.error(self, exc.code, f"phone message refused: {exc}", fatal=exc.fatal)
            if exc.fatal:
                self.end_reason = "bad_start"
                self.ended = True
            return
        if isinstance(msg, MediaMsg):
            if msg.track != "outbound" and self.core is not None:
                self.media_in_frames += 1
                self.step(MicAudio(msg.ulaw, now))
        elif isinstance(msg, MarkMsg):
            self.on_mark(msg.name, now)
        elif isinstance(msg, StartMsg):
            self.on_start(msg)
        elif isinstance(msg, DtmfMsg):
            self.on_dtmf(msg)
        elif isinstance(msg, StopMsg):
            self.end_reason = "stop"
            self.ended = True

    def on_start(self, msg: StartMsg) -> None:
        b = self.bridge
        self.start = msg
        self.id = msg.call_sid if msg.call_sid not in b.calls else f"{msg.call_sid}-{secrets.token_hex(3)}"
        b.calls[self.id] = self
        self.core = core = b.backend.core(b.model, b.session, barge_in=b.barge_in, min_speech_ms=b.min_speech_ms,
                                          budget_usd=b.budget_usd, audio_format="audio/pcmu")
        for body in b.global_tools.values():  # tools registered for every call
            core.handle(Command("cmd.tool.register", {k: v for k, v in body.items() if k != "id"}), 0.0, 0)
        self.link = ApiLink(b.backend, core, self, b.api_url, b.api_headers,
                            LinkRules(b.api_url.split("?")[0], key_env=b.key_env, max_tries=API_RECONNECT_TRIES,
                                      recycle_after_s=b.recycle_after_s, hint=UNREACHABLE_HINT),
                            name=f"api {self.id}", audio_latency=self.in_latency, on_error=self.fail)
        b.publish(self, "phone.call.started", {"call_sid": msg.call_sid, "stream_sid": msg.stream_sid,
                                               "account_sid": msg.account_sid, "tracks": list(msg.tracks),
                                               "custom_parameters": msg.custom_parameters})
        b.status_changed()
        self.api_task = asyncio.get_running_loop().create_task(self.api_loop(), name=f"api {self.id}")

    def on_dtmf(self, msg: DtmfMsg) -> None:
        b = self.bridge
        b.publish(self, "phone.dtmf", {"digit": msg.digit, "track": msg.track})
        if b.dtmf_to_model != "off" and self.core is not None:
            reply = b.dtmf_to_model == "reply"
            self.step(Command("cmd.say", {"text": f"The caller pressed the key {msg.digit} on the phone keypad.",
                                          "role": "user" if reply else "system", "respond": reply,
                                          "pub": "phone-dtmf"}))

    def on_mark(self, name: str, now: float) -> None:
        echo = self.clock.echoed(name, now)
        if echo is None:
            return  # a mark a clear dropped (Twilio echoes those at once), or not ours
        if echo.mark.end_of_item:
            self.hold.item_played()
            self.step(PlaybackReport("stopped", echo.mark.item_start, echo.mark.index, {}))
        else:
            self.step(PlaybackReport("position", None, echo.heard_index, {}))

    # ------------------------------------------------------------ the core (through the API link)
    def step(self, rec: Input) -> None:
        """Hand a record of this call's (a phone frame, a mark, a command) to its core; the link
        applies what it decides, in order."""
        if self.link is not None:
            self.link.step(rec)

    def heard_index(self, now_s: float) -> int:
        return self.clock.heard_index(now_s)

    def received(self, event: Mapping[str, Any], in_s: float) -> None:
        """A server event came in (before the core has it): when the caller started to speak, the
        start of the clear's latency."""
        if event.get("type") == "input_audio_buffer.speech_started":
            self.bridge.last_speech_started_s[self.id] = in_s

    def perform(self, act: Play | Flush | EndOfAudio | Publish, now: float) -> Input | None:
        """The core's actions that are not the API socket's (the link's host); returns the
        playback report an action makes (fed straight back to the core by the link)."""
        b = self.bridge
        if isinstance(act, Play):
            link = self.link
            event_in_s = (link.event_in_s if link is not None else 0.0) or now   #: when its API event came in
            outs = self.hold.audio(act.pcm, event_in_s, now, self.clock.drained(now))
            report: Input | None = None
            if act.starts_item:
                self.item_start = self.clock.sent_frames
                report = PlaybackReport("started", self.item_start, self.item_start,
                                        {"first_sample_mono_ns": time.monotonic_ns(),
                                         "output_latency_ms": self.hold.hold_ms if self.hold.holding else 0.0})
            self.send_out(outs, now)
            self.arm_hold()
            return report
        if isinstance(act, Publish):
            b.publish(self, CALL_TOPIC_RENAMES.get(act.topic, act.topic), act.payload)
            if act.topic == "playout.interrupted":
                self.truncations += 1
            return None
        if isinstance(act, Flush):
            dropped = self.hold.drop()   # counted by the core, never sent
            self._cancel_hold_timer()
            heard_at = b.last_speech_started_s.pop(self.id, None)
            if heard_at is not None:
                self.put_phone(self.stream.clear(), heard_at, self.clear_latency)
            else:
                self.put_phone(self.stream.clear())
            heard = self.clock.clear(now, unsent_frames=dropped)
            return PlaybackReport("flushed", self.item_start if self.item_start is not None else heard,
                                  heard, {"flush_mono_ns": time.monotonic_ns()})
        if isinstance(act, EndOfAudio):
            self.send_out(self.hold.end_of_item(now), now)
        return None

    def send_out(self, outs: list[Out], now: float) -> None:
        """Send what the hold let go, in order: audio as one media message up to each mark (not re-cut
        into 20 ms frames: Twilio buffers and paces it), the marks due after it; the item's end mark."""
        for out in outs:
            pcm = out.pcm
            if pcm is None:
                mark = self.clock.end_of_item(self.item_start)
                self.put_phone(self.stream.mark(mark.name))
                continue
            i = 0
            while i < len(pcm):
                chunk = pcm[i:i + self.clock.frames_to_next_mark()]
                i += len(chunk)
                self.put_phone(self.stream.media(chunk), out.since_s, self.out_latency, -(-len(chunk) // FRAME_BYTES))
                for mark in self.clock.sent(len(chunk), now):
                    self.put_phone(self.stream.mark(mark.name))
        for gap_ms, index in self.clock.take_gaps():   # the phone had run out: a gap; hold longer from now on
            self.hold.gap()
            self.bridge.publish(self, "phone.underrun", {"gap_ms": round(gap_ms, 1), "index": index,
                                                         "prebuffer_ms": self.hold.hold_ms})

    def arm_hold(self) -> None:
        """A timer for the hold's release, if it holds audio and none is armed."""
        due = self.hold.release_at_s
        if due is None or self.hold_timer is not None:
            return
        self.hold_timer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._release)

    def _cancel_hold_timer(self) -> None:
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None

    def _release(self) -> None:
        self.hold_timer = None
        if self.ended:
            return
        try:
            now = time.monotonic()
            self.send_out(self.hold.due(now), now)
            self.arm_hold()
        except Exception as exc:  # noqa: BLE001 - one call's bug ends that call only
            self.fail(exc)

    def put_phone(self, text: str, since_s: float = 0.0, latency: Latency | None = None, frames: int = 1) -> None:
        if not self.phone_out.put(text, since_s, latency, frames) and not self.ended:
            self.bridge.error(self, "phone_stuck", "the phone side does not read what is sent: ending the call")
            self.end_reason = "phone_stuck"
            self.ended = True
            asyncio.get_running_loop().create_task(self.ws.close(1011, "not reading"))

    # ------------------------------------------------------------ the API side
    async def api_loop(self) -> None:
        """The API socket's life; a bug in handling its events fails this call only (:meth:`fail`)."""
        try:
            await self._api_loop()
        except Exception as exc:  # noqa: BLE001 - one call's bug ends that call only
            self.fail(exc)

    async def _api_loop(self) -> None:
        assert self.link is not None
        end = await self.link.run()
        if end is None or self.ended:
            return
        self.bridge.error(self, end.code, f"{end.message}: ending the call", fatal=True)
        self.end_reason = "api_failed"
        self.ended = True
        await self.ws.close(1011, "api unavailable")

    # ------------------------------------------------------------ the end
    async def end(self) -> None:
        self.ended = True
        self.stream.closed()
        self._cancel_hold_timer()
        if self.link is not None:
            self.link.stop()
        if self.api_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.api_task), API_CLOSE_WAIT_S)
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - ending: nothing more to report
                self.api_task.cancel()
        self.phone_out.close()
        b = self.bridge
        if self.id and b.calls.get(self.id) is self:
            del b.calls[self.id]
            core = self.core
            b.publish(self, "phone.call.ended", {
                "reason": self.end_reason or "hangup", "duration_s": round(time.monotonic() - self.started_at_s, 3),
                "usd": round(core.total_usd(), 6) if core else 0.0,
                "custom_parameters": self.start.custom_parameters if self.start else {},
                "media_in_frames": self.media_in_frames,
                "media_out_frames": (self.clock.sent_frames - self.clock.skipped_frames) // FRAME_BYTES,
                "marks_sent": self.clock.marks_sent, "marks_echoed": self.clock.echoes,
                "truncations": self.truncations, "phone_errors": self.errors,
                # engine-added latency in this call (p99, ms), each up to its bytes handed to the socket: phone
                # frame in -> the API socket, API delta in -> each of its media frames, speech_started in -> clear;
                # and the frames of the first two that took over 20 ms
                "in_latency_p99_ms": self.in_latency.p99_ms(), "out_latency_p99_ms": self.out_latency.p99_ms(),
                "clear_latency_p99_ms": self.clear_latency.p99_ms(),
                "media_in_late_frames": self.in_latency.late, "media_out_late_frames": self.out_latency.late,
                # the start hold (engine.phone.hold): holds, those the item's end released early,
                # held audio a clear dropped, the longest it grew to; gaps at the phone (engine.phone.heard)
                "start_holds": self.hold.holds, "start_holds_released_early": self.hold.early_releases,
                "start_hold_dropped_bytes": self.hold.dropped_bytes, "start_hold_ms_max": self.hold.hold_ms_max,
                "phone_underruns": self.clock.gaps, "phone_underrun_ms": round(self.clock.gap_ms, 1),
                "api_errors": core.errors if core else 0})
            b.status_changed()
        if self.ws.state.name == "OPEN":
            await self.ws.close()

    def summary(self) -> dict[str, Any]:
        s = self.start
        return {"phone_call_id": self.id, "call_sid": s.call_sid if s else None,
                "stream_sid": s.stream_sid if s else None,
                "custom_parameters": s.custom_parameters if s else {},
                "started_ts": round(self.started_wall, 3), "duration_s": round(time.monotonic() - self.started_at_s, 1),
                "usd": round(self.core.total_usd(), 6) if self.core else 0.0,
                "api": "connected" if self.link is not None and self.link.connected else "disconnected"}


class PhoneBridge:
    """Listens for Media Streams calls; ``url`` once :meth:`listen` returned."""

    def __init__(self, spec: Mapping[str, Any], publisher: Publisher | None = None) -> None:
        cfg = spec["config"]
        phone = {**cfg.get("phone", {}), **(spec.get("phone") or {})}
        self.host: str = phone.get("host", "127.0.0.1")
        self.port: int = int(phone.get("port", 0))
        self.path: str = "/" + str(phone.get("path", "/twilio")).lstrip("/")
        self.dtmf_to_model: str = phone.get("dtmf_to_model", "off")
        self.max_calls: int = int(phone.get("max_calls", 100))
        #: one of many bridge processes on one bus (a process per call, bench/phone.py's comparison):
        #: commands for calls it does not hold are another process's, not refused; no status each second
        self.solo = bool(phone.get("solo", False))
        self.mark_every_frames = int(phone.get("mark_every_ms", 200)) * MEDIA_RATE_HZ // 1000
        #: each reply's start is held this long before it goes to the phone (engine.phone.hold)
        hold_ms = phone.get("prebuffer_ms")   # None: the speaker's own setting, audio.prebuffer_ms
        self.prebuffer_ms = int(hold_ms if hold_ms is not None else (cfg.get("audio") or {}).get("prebuffer_ms", 60))
        self.model: str = cfg["model"]
        self.backend = backend_for(self.model)
        self.recycle_after_s = float(cfg.get("session_recycle_s") or self.backend.session_recycle_s)
        self.session = call_session(spec["session"])
        self.barge_in = bool(cfg["barge_in"]["enabled"])
        self.min_speech_ms = int(cfg["barge_in"]["min_speech_ms"])
        self.budget_usd = cfg.get("budget_usd")
        self.api_url: str = spec["url"]
        self.api_headers: dict[str, str] = {}
        for h in spec.get("headers", []):
            k, _, v = h.partition(":")
            self.api_headers[k.strip()] = v.strip()
        key_env = spec.get("api_key_env")
        if key_env and os.environ.get(key_env):
            self.api_headers["Authorization"] = f"Bearer {os.environ[key_env]}"
        self.key_env: str = key_env or "OPENAI_API_KEY"
        self.sub_endpoint: str = spec["bus"]["subscribe"]
        self.pub = publisher or Publisher(spec["bus"]["publish"], f"phone:{os.getpid()}")
        self.calls: dict[str, Call] = {}
        self.global_tools: dict[str, dict[str, Any]] = {}
        self.last_speech_started_s: dict[str, float] = {}
        self.server: Server | None = None
        self.url = ""
        self.stop = asyncio.Event()
        self.calls_total = 0
        self.refused_calls = 0
        self._status_due = 0.0

    # ------------------------------------------------------------ bus out
    def publish(self, call: Call | None, topic: str, payload: Mapping[str, Any]) -> None:
        body = dict(payload)
        if call is not None:
            body["phone_call_id"] = call.id
        self.pub.publish(topic, body)

    def error(self, call: Call | None, code: str, message: str, fatal: bool = False) -> None:
        self.publish(call, "engine.error", {"source": "phone", "code": code, "message": message,
                                            "call_fatal": fatal})

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "calls": [c.summary() for c in list(self.calls.values())],
                "calls_total": self.calls_total, "refused_calls": self.refused_calls, "max_calls": self.max_calls}

    def status_changed(self) -> None:
        self.publish(None, "phone.status", self.status())

    # ------------------------------------------------------------ bus in
    def on_bus(self, topic: str, body: dict[str, Any]) -> None:
        try:
            self._on_bus(topic, body)
        except Exception as exc:  # noqa: BLE001 - one bad command never stops the bridge
            self.error(None, "bad_command", f"{topic}: {type(exc).__name__}: {exc}")

    def _ack(self, body: Mapping[str, Any], ok: bool, **extra: Any) -> None:
        if body.get("id"):
            self.pub.publish("cmd.ack", {"id": body["id"], "ok": ok, **extra})

    def _on_bus(self, topic: str, body: dict[str, Any]) -> None:
        if topic == "cmd.ack":
            return
        target = body.get("phone_call_id")
        if topic == "engine.presence.gone":
            owner = body.get("owner")
            self.global_tools = {k: v for k, v in self.global_tools.items()
                                 if (v.get("owner") or v.get("pub")) != owner}
            for call in list(self.calls.values()):
                call.step(Command(topic, body))
            return
        if target is None and topic in ("cmd.tool.register", "cmd.tool.unregister"):
            self._all_calls_tool(topic, body)
            return
        if target is None and topic == "cmd.tool.result":
            target = next((cid for cid, c in self.calls.items()
                           if c.core is not None and body.get("call_id") in c.core.tools.calls), None)
        found = self.calls.get(str(target)) if target is not None else None
        if (found is None or found.core is None) and self.solo:
            return
        if found is None or found.core is None:
            why = (f"no active call {target!r}" if target is not None else
                   f"{topic} needs 'phone_call_id': which call (active: {', '.join(self.calls) or 'none'})")
            self.error(None, "no_such_call", why)
            self._ack(body, False, error=why)
            return
        found.step(Command(topic, body))

    def _all_calls_tool(self, topic: str, body: dict[str, Any]) -> None:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            self._ack(body, False, error=f"{topic} needs 'name'")
            return
        if topic == "cmd.tool.register":
            self.global_tools[name] = {**body, "owner": body.get("owner") or body.get("pub")}
        else:
            self.global_tools.pop(name, None)
        quiet = {k: v for k, v in body.items() if k != "id"}
        for call in list(self.calls.values()):
            call.step(Command(topic, quiet))
        self._ack(body, True, calls=len(self.calls))

    def bus_thread(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        sub = Subscriber(self.sub_endpoint, ["cmd.", "engine.presence.gone"])
        try:
            while not stop.is_set():
                msg = sub.recv(timeout_ms=200)
                if msg is not None:
                    loop.call_soon_threadsafe(self.on_bus, *msg)
        finally:
            sub.close()

    # ------------------------------------------------------------ calls in
    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != self.path:
            return conn.respond(404, f"Media Streams calls are taken at {self.path}\n")
        if len(self.calls) >= self.max_calls:
            self.refused_calls += 1
            return conn.respond(503, f"at capacity ({self.max_calls} calls)\n")
        return None

    async def handle(self, ws: ServerConnection) -> None:
        self.calls_total += 1
        call = Call(self, ws)
        await call.run()

    async def listen(self) -> str:
        self.server = await serve(self.handle, self.host, self.port, process_request=self._check_request,
                                  max_size=1 << 20, compression=None, ping_interval=None)
        sockets = list(self.server.sockets)
        port = sockets[0].getsockname()[1] if sockets else self.port
        self.url = f"ws://{self.host}:{port}{self.path}"
        return self.url

    async def serve_forever(self) -> None:
        while not self.stop.is_set():
            if not self.solo:
                self.status_changed()
            try:
                await asyncio.wait_for(self.stop.wait(), STATUS_EVERY_S)
            except asyncio.TimeoutError:
                pass
        await self.close()

    async def close(self) -> None:
        for call in list(self.calls.values()):
            call.end_reason = "bridge_stopped"
            await call.ws.close(1001, "bridge stopping")
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

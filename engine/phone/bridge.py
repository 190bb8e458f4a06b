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
- The port is guarded (:mod:`engine.phone.guard`): the upgrade is authenticated (403) and held
  under ``max_calls`` (503); each socket's message rate, time to ``start`` and idleness are
  watched; ``start`` is admitted (authenticated, under ``max_calls``) before the API socket opens.
  A refused socket is closed with a code and a reason, counted (``phone.status`` ``refused``).
- A phone's malformed messages are counted and published at most once a second per call (the
  count since the last report and an example); the port's own refusals and the WebSocket
  layer's errors once a second per code. Nothing of them goes to stderr.
- A call ends when its core cannot go on: a session the API refused, a budget spent (GPT-Live
  closes its session; a Realtime core only refuses the responses the engine asks for while
  server VAD goes on making them, so its ``engine.budget`` ``exceeded`` ends the call).
- At a call's end its last figures are waited for, a bounded while: GPT-Live's ``session.closed``;
  on Realtime the ``response.done`` of a reply in flight (cancelled first), which carries its usage.
- The bridge's stop closes every call's phone socket at once, within one close timeout.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import time
from collections import Counter
from typing import Any, Mapping

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from bus import Publisher
from engine.once import AnsweredOnce
from engine.phone.guard import (CLOSE_TOO_BIG, TOKEN_PARAMETER, Close, ConnectionGuard, ErrorSampler, Report,
                                auth_from_config, check_upgrade, limits_from_config, token_ok)
from engine.phone.heard import HeardClock
from engine.phone.catchup import FRAMES_PER_MS, CatchUp
from engine.phone.cushion import Cushion, IndexMap, cushion_ms
from engine.phone.hold import CONTINUOUS_SETTLE_S, Out, StartHold
from engine.realtime.core import RealtimeCore
from engine.realtime.jitter import PHONE_QUANTILE, JitterEstimator
from engine.realtime.live_core import NETWORK_KEEPALIVE_S, SESSION_CLOSE_WAIT_S, LiveCore
from engine.phone.twilio import (FRAME_BYTES, MEDIA_RATE_HZ, DtmfMsg, MarkMsg, MediaMsg, PhoneProtocolError, StartMsg,
                                 StopMsg, TwilioStream, show)
from engine.link.backends import LIVE, ProtocolCore, backend_for
from engine.link.policy import LinkRules
from engine.link.shell import ApiLink
from engine.realtime.dialects import dialect_for
from engine.specs import PhoneSpec
from engine.realtime.records import Command, EndOfAudio, Flush, Input, MicAudio, Play, PlaybackReport, Publish
from engine.realtime.tools import registration_problem
from engine.wsio import LATE_S as LATE_S, OUTGOING_MAX as OUTGOING_MAX, Latency as Latency, Outgoing as Outgoing

#: what the bridge reads on the bus: commands, and the presence of the clients that sent them
BUS_TOPICS = ("cmd.", "engine.presence.gone")
STATUS_EVERY_S = 1.0
#: failed API connects in a row before a call gives up (about 8 s: 0, 0.2, 0.5, 1, 2, 4 s); the engine's is 18
API_RECONNECT_TRIES = 6
API_CLOSE_WAIT_S = 3.0         #: a call's end waits this long for its API link to close
#: a Realtime call's end waits this long for the cancelled reply's response.done (its usage), as
#: GPT-Live's end waits for session.closed
REPLY_DONE_WAIT_S = 1.0
#: a phone socket's close waits this long for the phone's close frame (the WebSocket layer's
#: close_timeout); the bridge's stop closes every call at once and waits this long, and a little more
PHONE_CLOSE_TIMEOUT_S = 10.0
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

    def __init__(self, bridge: "PhoneBridge", ws: ServerConnection, authenticated: bool) -> None:
        self.bridge = bridge
        self.ws = ws
        self.authenticated = authenticated     #: at the upgrade (a signature, a token in the URL, or auth none)
        self.guard = ConnectionGuard(bridge.limits, time.monotonic())
        self.guard_timer: asyncio.TimerHandle | None = None
        self.reports = ErrorSampler()          #: this call's malformed messages, published at most once a second
        self.report_timer: asyncio.TimerHandle | None = None
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
        #: audio.jitter_buffer adaptive: the hold follows the API delta jitter this call measures
        #: (no device period on top: the phone's player is the phone's, and the cushion follows the start)
        self.jitter = JitterEstimator(bridge.prebuffer_ms, margin_ms=0.0, quantile=PHONE_QUANTILE) \
            if bridge.adaptive and bridge.prebuffer_ms > 0 else None
        #: adaptive too: each stretch's first audio is slowed until the phone holds a cushion past the
        #: hold (engine.phone.cushion); the map takes the clock's phone frames back to the core's index
        self.cushion = Cushion() if self.jitter is not None else None
        #: a continuous track (GPT-Live) gives back the latency a stall added, by leaving out silent
        #: frames (engine.phone.catchup); half the hold's growth after gaps goes back every CONTINUOUS_SETTLE_S
        self.catch_up = CatchUp()
        self.continuous = False                #: this call's track is continuous (its first Play said so)
        self.settle_at_s = 0.0                 #: when the hold's growth is next halved (a continuous track)
        self.index_map = IndexMap()
        #: the cushion's frames (less those the catch-up left out) sent before the current item, and
        #: of the item the last clear cut
        self.item_start_inserted = 0
        self.cut_inserted_frames = 0
        self.hold_timer: asyncio.TimerHandle | None = None
        self.item_start: int | None = None
        self.ended = False
        self.pending = True                    #: waiting for its start (counted in bridge.pending)
        self.close_with: tuple[int, str] = (1000, "")   #: the close code and reason the phone socket ends with
        self.closing = False                   #: close_phone() began the close handshake
        self.end_reason = ""
        self.media_in_frames = 0
        self.errors = 0
        self.truncations = 0
        #: phone frame in -> its audio handed to the API socket; API delta in -> each of its media frames
        #: handed to the phone socket; speech_started in -> clear handed to the phone socket
        self.in_latency = Latency()
        self.out_latency = Latency()
        self.clear_latency = Latency()
        #: set at the response.done the end waits for (a Realtime reply in flight, cancelled)
        self.reply_done: asyncio.Event | None = None

    # ------------------------------------------------------------ the phone side
    async def run(self) -> None:
        self.phone_out.start(self.ws)
        self.arm_guard()
        try:
            async for text in self.ws:
                if self.closing:
                    continue   # our close is under way: what still comes is read and dropped, so it can finish
                close = self.guard.frame(time.monotonic())
                if close is not None:
                    self.refuse(close)
                    continue
                self.on_phone(text)
                if self.ended and not self.closing:
                    break
            if not self.ended:
                self.end_reason = self.end_reason or "hangup"
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == CLOSE_TOO_BIG:   # the WebSocket layer refused a frame
                self.refuse(Close("frame_too_big", CLOSE_TOO_BIG, exc.sent.reason), sent=True)
            self.end_reason = self.end_reason or "hangup"
        except Exception as exc:  # noqa: BLE001 - one call's bug ends that call only
            self.fail(exc)
        finally:
            await self.end()

    # ------------------------------------------------------------ the guard
    def refuse(self, close: Close, sent: bool = False) -> None:
        """Close this socket as the guard decided (unless the WebSocket layer already did,
        ``sent``): counted and reported port-wide, and the call's end reason."""
        b = self.bridge
        b.refused[close.code] += 1
        b.refused_calls += 1
        who = f"call {show(self.id)}" if self.id else "a connection"
        limit = {"frame_too_big": f" (phone.max_frame_bytes {b.limits.max_frame_bytes})",
                 "rate_limited": " (phone.max_messages_per_s)", "start_timeout": " (phone.start_timeout_s)",
                 "idle_timeout": " (phone.idle_timeout_s)", "at_capacity": " (phone.max_calls)",
                 "unauthenticated": f" (phone.auth {b.auth.mode})"}.get(close.code, "")
        b.port_event(close.code, f"{who} closed ({close.close_code}): {close.reason}{limit}")
        self.end_reason = self.end_reason or close.code
        self.ended = True
        if not sent:
            self.close_phone(close.close_code, close.reason)

    def close_phone(self, code: int, reason: str) -> None:
        """Close the phone socket with ``code`` and ``reason``. The reader goes on reading (and
        dropping) until the peer's close comes: a reader that stopped would leave a flooding peer's
        frames unread, the transport paused, and the close handshake stalled for its timeout."""
        self.close_with = (code, reason)
        if not self.closing and self.ws.state is State.OPEN:
            self.closing = True
            asyncio.get_running_loop().create_task(self.ws.close(code, reason))

    def arm_guard(self) -> None:
        due = self.guard.deadline()
        if due is None or self.ended:
            return
        self.guard_timer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._guard_tick)

    def _guard_tick(self) -> None:
        self.guard_timer = None
        if self.ended:
            return
        close = self.guard.tick(time.monotonic())
        if close is not None:
            self.refuse(close)
        else:
            self.arm_guard()

    def report(self, code: str, message: str, fatal: bool = False) -> None:
        """A malformed phone message: counted; published now, or summed into the next report."""
        self.errors += 1
        out = self.reports.note(code, message, time.monotonic(), fatal)
        if out is not None:
            self._publish_report(out)
        elif self.report_timer is None:
            due = self.reports.due_s()
            if due is not None:
                self.report_timer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()),
                                                                          self._flush_reports)

    def _flush_reports(self) -> None:
        self.report_timer = None
        out = self.reports.flush(time.monotonic())
        if out is not None:
            self._publish_report(out)

    def _publish_report(self, r: Report) -> None:
        self.bridge.error(self, r.code, f"phone message refused: {r.message}", fatal=r.fatal, count=r.count)

    def fail(self, exc: BaseException) -> None:
        """A bug in this call's handling (phone side, API side or a timer): ``engine.error``
        ``call_failed`` for this call, and this call ends (its phone socket closes); no other call
        is touched."""
        if self.end_reason == "error":
            return
        self.end_reason = "error"
        self.ended = True
        self.bridge.error(self, "call_failed", f"the call failed: {type(exc).__name__}: {exc}", fatal=True)
        self.close_phone(1011, "call failed")

    def on_phone(self, text: str | bytes) -> None:
        now = time.monotonic()
        try:
            msg = self.stream.receive(text)
        except PhoneProtocolError as exc:
            self.report(exc.code, str(exc), exc.fatal)
            if exc.fatal:
                self.end_reason = "bad_start"
                self.ended = True
                self.close_phone(1008, f"bad start: {exc.code}")
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
        params = msg.custom_parameters
        authenticated = self.authenticated
        if b.auth.mode == "token":   # the token never goes further than this
            authenticated = authenticated or token_ok(b.auth.secret, params.get(TOKEN_PARAMETER))
            msg = dataclasses.replace(msg, custom_parameters={k: v for k, v in params.items() if k != TOKEN_PARAMETER})
        self.id = msg.call_sid   # (named in the refusal's report; only an admitted call is in b.calls)
        close = self.guard.start(authenticated, len(b.calls), b.max_calls)
        if close is not None:
            self.refuse(close)
            self.id = ""
            return
        b.pending -= 1
        self.pending = False
        self.start = msg
        self.id = msg.call_sid if msg.call_sid not in b.calls else f"{msg.call_sid}-{secrets.token_hex(3)}"
        b.calls[self.id] = self
        self.core = core = b.backend.core(b.model, b.session, barge_in=b.barge_in, min_speech_ms=b.min_speech_ms,
                                          budget_usd=b.budget_usd, audio_format="audio/pcmu")
        if isinstance(core, LiveCore):   # the caller's audio comes over a network: late frames are not a stopped mic
            core.keepalive_s = NETWORK_KEEPALIVE_S
        for body in b.global_tools.values():  # tools registered for every call
            core.handle(Command("cmd.tool.register", {k: v for k, v in body.items() if k != "id"}), 0.0, 0)
        self.link = ApiLink(b.backend, core, self, b.api_url, b.api_headers,
                            LinkRules(b.api_url.split("?")[0], key_env=b.key_env, max_tries=API_RECONNECT_TRIES,
                                      recycle_after_s=b.recycle_after_s, hint=UNREACHABLE_HINT),
                            name=f"api {self.id}", audio_latency=self.in_latency, on_error=self.fail,
                            dialect=dialect_for(b.provider, b.model, b.deployment))
        b.publish(self, "phone.call.started", {"call_sid": msg.call_sid, "stream_sid": msg.stream_sid,
                                               "account_sid": msg.account_sid, "tracks": list(msg.tracks),
                                               "custom_parameters": msg.custom_parameters})
        b.status_changed()
        self.api_task = asyncio.get_running_loop().create_task(self.api_loop(), name=f"api {self.id}")

    def on_dtmf(self, msg: DtmfMsg) -> None:
        b = self.bridge
        b.publish(self, "phone.dtmf", {"digit": msg.digit, "track": msg.track})
        if b.dtmf_to_model != "off" and self.core is not None:
            # GPT-Live takes no user text: its digit goes as context, and the model decides to answer
            reply = b.dtmf_to_model == "reply" and b.backend is not LIVE
            self.step(Command("cmd.say", {"text": f"The caller pressed the key {msg.digit} on the phone keypad.",
                                          "role": "user" if reply else "system", "respond": reply,
                                          "pub": "phone-dtmf"}))

    def on_mark(self, name: str, now: float) -> None:
        echo = self.clock.echoed(name, now)
        if echo is None:
            return  # a mark a clear dropped (Twilio echoes those at once), or not ours
        if echo.mark.end_of_item:
            self.hold.item_played()
            self.step(PlaybackReport("stopped", echo.mark.item_start, self.index_map.core_index(echo.mark.index), {}))
        else:
            self.step(PlaybackReport("position", None, self.index_map.core_index(echo.heard_index), {}))

    # ------------------------------------------------------------ the core (through the API link)
    def step(self, rec: Input) -> None:
        """Hand a record of this call's (a phone frame, a mark, a command) to its core; the link
        applies what it decides, in order."""
        if self.link is not None:
            self.link.step(rec)

    def heard_index(self, now_s: float) -> int:
        """What the caller has heard, in the core's index (the reply's frames, not the cushion's)."""
        return self.index_map.core_index(self.clock.heard_by_caller(now_s))

    def received(self, event: Mapping[str, Any], in_s: float) -> None:
        """A server event came in (before the core has it): when the caller started to speak, the
        start of the clear's latency."""
        kind = event.get("type")
        if kind == "input_audio_buffer.speech_started":
            self.bridge.last_speech_started_s[self.id] = in_s
        elif kind == "input_audio_buffer.speech_stopped":   # no barge-in came of it (the core's comes before)
            self.bridge.last_speech_started_s.pop(self.id, None)

    def perform(self, act: Play | Flush | EndOfAudio | Publish, now: float) -> Input | None:
        """The core's actions that are not the API socket's (the link's host); returns the
        playback report an action makes (fed straight back to the core by the link)."""
        b = self.bridge
        if isinstance(act, Play):
            link = self.link
            event_in_s = (link.event_in_s if link is not None else 0.0) or now   #: when its API event came in
            if self.jitter is not None:   # µ-law 8 kHz: a byte a frame
                self.hold.retarget(self.jitter.audio(event_in_s, len(act.pcm) / MEDIA_RATE_HZ, act.starts_item))
            if act.continuous and not self.continuous:
                self.continuous, self.settle_at_s = True, now + CONTINUOUS_SETTLE_S
            elif self.continuous and now >= self.settle_at_s and not self.hold.holding \
                    and self.clock.ran_out_s(now) is None:   # the track's "reply played" (it has no end), not mid-gap
                self.hold.item_played()
                self.settle_at_s = now + CONTINUOUS_SETTLE_S
            outs = self.hold.audio(act.pcm, event_in_s, now, self.clock.drained(now))
            report: Input | None = None
            if act.starts_item:
                self.item_start = self.index_map.core_index(self.clock.sent_frames, next_sent=True)
                self.item_start_inserted = self.index_map.total_frames
                report = PlaybackReport("started", self.item_start, self.item_start,
                                        {"first_sample_mono_ns": time.monotonic_ns(),
                                         "output_latency_ms": self.hold.hold_ms if self.hold.holding else 0.0})
            self.send_out(outs, now)
            self.arm_hold()
            return report
        if isinstance(act, Publish):
            payload = act.payload
            if act.topic == "engine.error" and payload.get("fatal"):
                self.end_by_core(payload)
                return None
            if act.topic == "response.done" and self.reply_done is not None:
                self.reply_done.set()
            if act.topic == "engine.budget" and payload.get("exceeded") and not isinstance(self.core, LiveCore):
                b.publish(self, act.topic, payload)   # Realtime: server VAD would go on answering (module rules)
                self.end_by_core({"source": "engine", "code": "budget_exceeded", "message":
                                  f"budget_usd reached (${float(payload.get('usd') or 0.0):.4f} of "
                                  f"${float(payload.get('budget_usd') or 0.0):.4f})"})
                return None
            if act.topic == "playout.interrupted":
                self.truncations += 1
                # played_ms is the reply's audio the caller heard; the phone played the cushion's too
                payload = dict(payload, phone_played_ms=payload.get("played_ms", 0)
                               + round(self.cut_inserted_frames * 1000 / MEDIA_RATE_HZ))
            b.publish(self, CALL_TOPIC_RENAMES.get(act.topic, act.topic), payload)
            return None
        if isinstance(act, Flush):
            dropped = self.hold.drop()   # counted by the core, never sent
            self._cancel_hold_timer()
            heard_at = b.last_speech_started_s.pop(self.id, None)
            if heard_at is not None:
                self.put_phone(self.stream.clear(), heard_at, self.clear_latency)
            else:
                self.put_phone(self.stream.clear())
            heard_phone = self.clock.clear(now, unsent_frames=dropped)
            heard = self.index_map.core_index(heard_phone)
            # the cushion's frames the caller heard of this item (playout.interrupted's phone_played_ms)
            self.cut_inserted_frames = heard_phone - heard - self.item_start_inserted
            return PlaybackReport("flushed", self.item_start if self.item_start is not None else heard,
                                  heard, {"flush_mono_ns": time.monotonic_ns()})
        if isinstance(act, EndOfAudio):
            self.send_out(self.hold.end_of_item(now), now)
        return None

    def end_by_core(self, error: Mapping[str, Any]) -> None:
        """The call's core cannot go on (a session the API refused to start, a GPT-Live budget
        spent): its error is this call's, never the bridge's (a ``fatal`` engine.error would stop the
        engine and every call), and this call ends."""
        body = {k: v for k, v in error.items() if k != "fatal"}
        body["message"] = f"{body.get('message', '')}: ending the call"
        self.bridge.publish(self, "engine.error", {**body, "call_fatal": True})
        if not self.ended:
            self.end_reason = "budget" if body.get("code") == "budget_exceeded" else "api_refused"
            self.ended = True
            self.close_phone(1011, "budget reached" if self.end_reason == "budget" else "api refused")

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
                chunk = pcm[i:i + self.clock.frames_to_next_mark()]   # cut in the reply's frames
                i += len(chunk)
                inserted = 0
                if self.continuous:
                    chunk, inserted = self._catch_up(chunk, now)
                if self.cushion is not None:
                    if self.clock.ran_out_s(now) is not None:    # a new stretch: the phone heard all it was sent
                        self.cushion.start(cushion_ms(self.hold.hold_ms))
                    chunk, insertions = self.cushion.audio(chunk)
                    for ins in insertions:
                        self.index_map.inserted(self.clock.sent_frames + ins.offset, ins.frames)
                        inserted += ins.frames
                if chunk:   # (all of it may have been left out)
                    self.put_phone(self.stream.media(chunk), out.since_s, self.out_latency, -(-len(chunk) // FRAME_BYTES))
                for mark in self.clock.sent(len(chunk), now, inserted_frames=inserted):
                    self.put_phone(self.stream.mark(mark.name))
        for gap_ms, index in self.clock.take_gaps():   # the phone had run out: a gap; hold longer from now on
            self.hold.gap()
            self.bridge.publish(self, "phone.underrun", {"gap_ms": round(gap_ms, 1),
                                                         "index": self.index_map.core_index(index, next_sent=True),
                                                         "prebuffer_ms": self.hold.hold_ms})

    def _catch_up(self, chunk: bytes, now: float) -> tuple[bytes, int]:
        """A continuous track's ``chunk`` about to go: the phone's level goes to the catch-up, which
        may leave silent frames out (engine.phone.catchup); returns what to send and the frames it
        adds to the phone's index (minus those left out). Not while the phone has run dry (nothing
        to give back) or a cushion is still being built (the two would work against each other)."""
        hold_ms = self.hold.hold_ms
        keep_ms = hold_ms + (cushion_ms(hold_ms) if self.cushion is not None and hold_ms > 0 else 0.0)
        trip_s = self.clock.round_trip_s   # the level read from the echoes is high by it (engine.phone.heard)
        level = None if trip_s is None else \
            self.clock.sent_frames - self.clock.heard_index(now) - round(trip_s * MEDIA_RATE_HZ)
        self.catch_up.observe(level, round(keep_ms * FRAMES_PER_MS), now)
        if self.clock.ran_out_s(now) is not None or (self.cushion is not None and self.cushion.budget_frames > 0):
            return chunk, 0
        first = self.clock.sent_frames
        chunk, skips = self.catch_up.audio(chunk)
        for skip in skips:   # frames the phone never gets: the core's index runs past them
            self.index_map.inserted(first + skip.offset, -skip.frames)
        return chunk, -sum(skip.frames for skip in skips)

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
            self.close_phone(1011, "not reading")

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
    async def _close_session(self) -> None:
        """A GPT-Live session is closed with ``session.close`` before its socket: its
        ``session.closed`` brings the call's last usage (``usage.updated`` comes every 15 s, so a
        socket just closed left up to 15 s out of the call's ``usd``, and does not prove the session
        was finalized). Waited for at most SESSION_CLOSE_WAIT_S: the caller has gone. A Realtime
        reply in flight is cancelled and its ``response.done`` (its usage) waited for at most
        REPLY_DONE_WAIT_S (:meth:`_settle_reply`)."""
        if self.link is None:
            return
        try:
            await self._settle_reply()
            await self.link.end_session(SESSION_CLOSE_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - the call ends whatever its core did
            self.bridge.error(self, "call_failed", f"closing the session failed: {type(exc).__name__}: {exc}")

    async def _settle_reply(self) -> None:
        """A Realtime reply in flight: cancel it and wait for its ``response.done``, which carries
        its usage (a socket closed at once leaves that reply's cost out of the call's ``usd``)."""
        core, link = self.core, self.link
        if not isinstance(core, RealtimeCore) or link is None or not link.connected \
                or core.requests.active_response is None:
            return
        done = self.reply_done = asyncio.Event()
        try:
            link.step(Command("cmd.cancel", {}))
            await asyncio.wait_for(done.wait(), REPLY_DONE_WAIT_S)
        except asyncio.TimeoutError:   # (not the builtin before Python 3.11)
            pass
        finally:
            self.reply_done = None

    async def end(self) -> None:
        self.ended = True
        self.stream.closed()
        if self.pending:
            self.pending = False
            self.bridge.pending -= 1
        for timer in (self.guard_timer, self.report_timer):
            if timer is not None:
                timer.cancel()
        self._flush_reports()   # what waited, if its second has passed (phone_errors below counts them all)
        self._cancel_hold_timer()
        await self._close_session()
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
            b.last_speech_started_s.pop(self.id, None)
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
                # the cushion (engine.phone.cushion): audio inserted after each start, in all
                "cushion_ms": round((self.cushion.inserted_frames if self.cushion else 0) / MEDIA_RATE_HZ * 1000, 1),
                # the catch-up (engine.phone.catchup): silence left out of a continuous track, in all
                # and what the phone was meant to hold at the end (the hold and its cushion)
                "catch_up_skipped_ms": round(self.catch_up.skipped_frames / MEDIA_RATE_HZ * 1000, 1),
                "catch_up_keep_ms": round(self.catch_up.keep_frames / MEDIA_RATE_HZ * 1000, 1),
                # the least round trip to the phone and back the heard clock measured (engine.phone.heard)
                "phone_round_trip_ms": None if self.clock.round_trip_s is None else round(self.clock.round_trip_s * 1000, 1),
                "api_errors": core.errors if core else 0})
            b.status_changed()
        if self.ws.state.name == "OPEN":
            await self.ws.close(*self.close_with)

    def summary(self) -> dict[str, Any]:
        s = self.start
        return {"phone_call_id": self.id, "call_sid": s.call_sid if s else None,
                "stream_sid": s.stream_sid if s else None,
                "custom_parameters": s.custom_parameters if s else {},
                "started_ts": round(self.started_wall, 3), "duration_s": round(time.monotonic() - self.started_at_s, 1),
                "usd": round(self.core.total_usd(), 6) if self.core else 0.0,
                "api": "connected" if self.link is not None and self.link.connected else "disconnected"}


class _PortLog(logging.Handler):
    """The WebSocket layer's warnings and errors (a failed opening handshake, a failed write): to
    the port's rate-limited reports, as one line naming the peer and what failed, never a traceback."""

    def __init__(self, bridge: "PhoneBridge") -> None:
        super().__init__(logging.WARNING)
        self.bridge = bridge

    def emit(self, record: logging.LogRecord) -> None:
        try:
            what = record.getMessage()
            peer = getattr(getattr(record, "websocket", None), "remote_address", None)
            where = f" (from {peer[0]}:{peer[1]})" if isinstance(peer, tuple) and len(peer) >= 2 else ""
            exc: BaseException | None = record.exc_info[1] if record.exc_info else None
            causes: list[str] = []
            while exc is not None and len(causes) < 3:
                causes.append(str(exc) or type(exc).__name__)
                exc = exc.__cause__
            detail = f": {'; '.join(causes)}" if causes else ""
            code = "bad_handshake" if "handshake" in what else "websocket"
            self.bridge.port_event(code, f"{what}{where}{detail}")
        except Exception:  # noqa: BLE001 - a report must never raise into the WebSocket layer
            self.handleError(record)


class PhoneBridge:
    """Listens for Media Streams calls; ``url`` once :meth:`listen` returned. ConfigError at once
    when ``phone.auth`` cannot be met (its secret missing from ``environ``, ``none`` off loopback)."""

    def __init__(self, spec: PhoneSpec, publisher: Publisher | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        cfg = spec.config
        phone: Mapping[str, Any] = spec.phone
        self.auth = auth_from_config(phone, os.environ if environ is None else environ)
        if self.auth.mode == "twilio" and self.auth.public_url is None:   # allowed on loopback only
            logging.getLogger("realtalk.phone").warning(
                "phone.public_url is not set: Twilio's signature is checked against the request's own Host "
                "header; behind a proxy or a tunnel set it to the stream URL given to Twilio")
        self.limits = limits_from_config(phone)
        self.host: str = phone.get("host", "127.0.0.1")
        self.port: int = int(phone.get("port", 0))
        self.path: str = "/" + str(phone.get("path", "/twilio")).lstrip("/")
        self.dtmf_to_model: str = phone.get("dtmf_to_model", "off")
        self.max_calls: int = int(phone.get("max_calls", 100))
        #: one of many bridge processes on one bus (a process per call, bench/phone.py's comparison):
        #: commands for calls it does not hold are another process's, not refused; no status each second
        self.solo = spec.solo
        self.mark_every_frames = int(phone.get("mark_every_ms", 200)) * MEDIA_RATE_HZ // 1000
        #: each reply's start is held this long before it goes to the phone (engine.phone.hold)
        hold_ms = phone.get("prebuffer_ms")   # None: the speaker's own setting, audio.prebuffer_ms
        self.prebuffer_ms = int(hold_ms if hold_ms is not None else (cfg.get("audio") or {}).get("prebuffer_ms", 60))
        #: audio.jitter_buffer: adaptive (the hold's base follows each call's measured jitter) or fixed
        self.adaptive = (cfg.get("audio") or {}).get("jitter_buffer", "adaptive") == "adaptive"
        self.model: str = cfg["model"]
        self.backend = backend_for(self.model)
        self.recycle_after_s = self.backend.recycle_after_s(cfg.get("session_recycle_s"))
        self.session = call_session(spec.session)
        self.barge_in = bool(cfg["barge_in"]["enabled"])
        self.min_speech_ms = int(cfg["barge_in"]["min_speech_ms"])
        self.budget_usd = cfg.get("budget_usd")
        self.api_url: str = spec.url
        self.api_headers: dict[str, str] = spec.api.header_map(os.environ)
        self.key_env: str = spec.api.key_name()
        self.provider: str = spec.api.provider
        self.deployment: str | None = spec.api.deployment
        self.sub_endpoint: str = spec.bus.subscribe
        self.pub = publisher or Publisher(spec.bus.publish, f"phone:{os.getpid()}")
        self.calls: dict[str, Call] = {}
        self.global_tools: dict[str, dict[str, Any]] = {}
        #: the commands the bridge answers itself, each once by id
        self.once = AnsweredOnce(self.pub.publish)
        self.last_speech_started_s: dict[str, float] = {}
        self.server: Server | None = None
        self.url = ""
        self.stop = asyncio.Event()
        self.calls_total = 0
        self.refused_calls = 0
        self.refused: Counter[str] = Counter()       #: refusals by code (unauthenticated, at_capacity, …)
        self.pending = 0                             #: sockets open and not yet admitted at start
        self.port_reports: dict[str, ErrorSampler] = {}
        self.ws_logger = logging.Logger("realtalk.phone.websockets", logging.WARNING)
        self.ws_logger.addHandler(_PortLog(self))
        self.ws_logger.propagate = False
        self._status_due = 0.0

    # ------------------------------------------------------------ bus out
    def publish(self, call: Call | None, topic: str, payload: Mapping[str, Any]) -> None:
        body = dict(payload)
        if call is not None:
            body["phone_call_id"] = call.id
        self.pub.publish(topic, body)

    def error(self, call: Call | None, code: str, message: str, fatal: bool = False, count: int = 1) -> None:
        self.publish(call, "engine.error", {"source": "phone", "code": code, "message": message,
                                            "call_fatal": fatal, "count": count})

    def port_event(self, code: str, message: str) -> None:
        """Something the port refused or its WebSocket layer failed at: published at most once a
        second per ``code`` (the count since the last and this first example); the rest waits for
        :meth:`flush_port_reports`."""
        sampler = self.port_reports.setdefault(code, ErrorSampler())
        out = sampler.note(code, message, time.monotonic())
        if out is not None:
            self.error(None, out.code, out.message, count=out.count)

    def flush_port_reports(self) -> None:
        now = time.monotonic()
        for sampler in self.port_reports.values():
            out = sampler.flush(now)
            if out is not None:
                self.error(None, out.code, out.message, count=out.count)

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "calls": [c.summary() for c in list(self.calls.values())],
                "calls_total": self.calls_total, "refused_calls": self.refused_calls, "max_calls": self.max_calls,
                "refused": dict(self.refused), "pending": self.pending, "auth": self.auth.mode}

    def status_changed(self) -> None:
        self.publish(None, "phone.status", self.status())

    # ------------------------------------------------------------ bus in
    def on_bus(self, topic: str, body: dict[str, Any]) -> None:
        try:
            self._on_bus(topic, body)
        except Exception as exc:  # noqa: BLE001 - one bad command never stops the bridge
            self.error(None, "bad_command", f"{topic}: {type(exc).__name__}: {exc}")

    def _ack(self, body: Mapping[str, Any], ok: bool, **extra: Any) -> None:
        """The command's outcome (the broker acked it on cmd.ack when it came: bus protocol 2)."""
        self.once.answer(body, ok, **extra)

    def _on_bus(self, topic: str, body: dict[str, Any]) -> None:
        if topic in ("cmd.ack", "cmd.done"):
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
        if not self.once.first(body):   # a client's copy: its outcome again, not a second run
            return
        name = body.get("name")
        if not isinstance(name, str) or not name:
            self._ack(body, False, error=f"{topic} needs 'name'")
            return
        problem = registration_problem(body) if topic == "cmd.tool.register" else None
        if problem is not None:   # refused here, once, not stored and refused by every call
            self._ack(body, False, error=problem, code="bad_command")
            return
        if topic == "cmd.tool.register":
            self.global_tools[name] = {**body, "owner": body.get("owner") or body.get("pub")}
        else:
            self.global_tools.pop(name, None)
        quiet = {k: v for k, v in body.items() if k != "id"}
        for call in list(self.calls.values()):
            call.step(Command(topic, quiet))
        self._ack(body, True, calls=len(self.calls))

    # ------------------------------------------------------------ calls in
    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        """The upgrade: the path (404), who it is (403, no detail), room (503: the calls at
        max_calls, or as many sockets already waiting for their start)."""
        if request.path.split("?")[0] != self.path:
            return conn.respond(404, f"Media Streams calls are taken at {self.path}\n")
        verdict = check_upgrade(self.auth, request.headers, request.path)
        if verdict.status is not None:
            self.refused[verdict.code] += 1
            self.refused_calls += 1
            peer = conn.remote_address
            self.port_event(verdict.code, f"an upgrade from {peer[0] if peer else '?'} was refused (403): no valid "
                                          f"{'X-Twilio-Signature' if self.auth.mode == 'twilio' else 'token'} "
                                          f"(phone.auth {self.auth.mode})")
            return conn.respond(verdict.status, "Forbidden\n")
        if len(self.calls) >= self.max_calls or self.pending >= self.max_calls:
            self.refused["at_capacity"] += 1
            self.refused_calls += 1
            self.port_event("at_capacity", f"an upgrade was refused (503): {len(self.calls)} calls and "
                                           f"{self.pending} waiting for their start, phone.max_calls {self.max_calls}")
            return conn.respond(503, f"at capacity ({self.max_calls} calls)\n")
        return None

    async def handle(self, ws: ServerConnection) -> None:
        self.calls_total += 1
        request = ws.request
        authenticated = request is not None and check_upgrade(self.auth, request.headers, request.path).authenticated
        self.pending += 1      # from here until its start is admitted or it closes (Call.end)
        call = Call(self, ws, authenticated)
        await call.run()

    async def listen(self) -> str:
        self.server = await serve(self.handle, self.host, self.port, process_request=self._check_request,
                                  max_size=self.limits.max_frame_bytes, open_timeout=self.limits.start_timeout_s,
                                  close_timeout=PHONE_CLOSE_TIMEOUT_S, compression=None, ping_interval=None,
                                  logger=self.ws_logger)
        sockets = list(self.server.sockets)
        port = sockets[0].getsockname()[1] if sockets else self.port
        self.url = f"ws://{self.host}:{port}{self.path}"
        return self.url

    async def serve_forever(self) -> None:
        while not self.stop.is_set():
            self.flush_port_reports()
            if not self.solo:
                self.status_changed()
            try:
                await asyncio.wait_for(self.stop.wait(), STATUS_EVERY_S)
            except asyncio.TimeoutError:
                pass
        await self.close()

    async def close(self) -> None:
        """Close every call's phone socket at once (each waits up to its close timeout for the
        phone's close frame, then drops the connection); then the port."""
        calls = list(self.calls.values())
        for call in calls:
            call.end_reason = "bridge_stopped"
        if calls:
            closing = [asyncio.ensure_future(call.ws.close(1001, "bridge stopping")) for call in calls]
            done, late = await asyncio.wait(closing, timeout=PHONE_CLOSE_TIMEOUT_S + 1.0)
            for task in done:
                if not task.cancelled():
                    task.exception()   # ConnectionClosed and the like: the socket is closed either way
            for call, task in zip(calls, closing):
                if task in late:
                    task.cancel()
                    call.ws.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

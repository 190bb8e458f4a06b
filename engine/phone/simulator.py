"""A fake Twilio phone for tests and the bench, written from Twilio's Media Streams documentation.

It does what Twilio does on a bidirectional stream (``<Connect><Stream>``), in real time:
- sends ``connected``, then ``start`` (streamSid, callSid, accountSid, tracks ["inbound"],
  mediaFormat audio/x-mulaw 8000 Hz mono, customParameters), then a ``media`` frame every 20 ms
  (base64 µ-law, 160 bytes; ``track`` "inbound", ``chunk`` and ``timestamp`` counting up; silence
  when the caller says nothing), ``dtmf`` on a key press and ``stop`` on hang-up; every message
  but ``connected`` with a ``sequenceNumber`` (a string counting from "1");
- plays what it receives at real pace, 20 ms a tick (the caller's ear, kept for a WAV), and echoes
  each ``mark`` once the audio received before it has played;
- on ``clear`` drops the audio not yet played and echoes the pending marks at once;
- signs its WebSocket upgrade as Twilio does (``X-Twilio-Signature``: base64 HMAC-SHA1 of the
  URL it dials, keyed with ``auth_token``, by default ``$TWILIO_AUTH_TOKEN``); with ``token`` it
  carries a deployment's token in ``start.customParameters.token`` instead (``phone.auth: token``);
- once its socket has closed it stops talking and playing (its tasks end; nothing is written to a
  socket whose closing has begun).

``played_frames_at(t)`` is its own played position (frames of received audio heard by monotonic
time t); each ``clear`` is logged with the position at that instant, to check truncations against.
``media_in_s`` and ``audio_began_s`` say when each media message came and when the player began
each stretch of audio (the bench's first-delta figures, bench/README.md "phone").
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from engine.phone.guard import SIGNATURE_HEADER, TOKEN_PARAMETER, twilio_signature

FRAME_MS = 20
FRAME_BYTES = 160
UNDERRUN_MAX_FRAMES = 25        #: a dry spell up to 500 ms with audio after it is an underrun
ULAW_SILENCE = b"\xff"


class LineClosed(ConnectionClosed):
    """The phone's own socket is closing or closed: it writes nothing more."""


@dataclass
class ClearSeen:
    at_s: float
    played_frames: int        #: of received audio, when the clear arrived


@dataclass
class FakePhone:
    url: str
    custom_parameters: dict[str, str] = field(default_factory=dict)
    call_sid: str = field(default_factory=lambda: "CA" + secrets.token_hex(16))
    stream_sid: str = field(default_factory=lambda: "MZ" + secrets.token_hex(16))
    account_sid: str = "AC" + "0" * 32
    echo_marks: bool = True
    auth_token: str | None = None      #: signs the upgrade; None: $TWILIO_AUTH_TOKEN (if set); "": unsigned
    token: str | None = None           #: phone.auth token: sent as start.customParameters.token

    def __post_init__(self) -> None:
        self.ws: ClientConnection | None = None
        self.seq = 0
        self.chunk = 0
        self.t0 = 0.0
        self.speech: deque[bytes] = deque()     # caller frames still to send
        self.spoken = asyncio.Event()
        self.buffer = bytearray()               # received, not yet played
        self.buffer_start = 0                   # received-frame index of buffer[0]
        self.received_frames = 0
        self.played_frames = 0                  # frames of received audio handed to the ear
        self.tick_at = 0.0                      # when the frame now playing began
        self.playing_now = 0                    # frames of it that are audio
        self.marks: deque[tuple[int, str]] = deque()   # (received index, name) not yet echoed
        self.ear = bytearray()                  # every 20 ms of what the caller heard (silence included)
        self.clears: list[ClearSeen] = []
        self.marks_echoed = 0
        self.media_received = 0
        self.late_frames = 0                    # media we sent more than 20 ms after its time
        self.underruns = 0                      # gaps in what we heard: the buffer ran dry mid-audio, audio came back
        self.underrun_frames = 0                # 20 ms frames of those gaps
        self.long_silences = 0                  # dry spells over UNDERRUN_MAX_FRAMES that audio came after: a new
        self.long_silence_frames = 0            # reply, or a stall (where a call hears one reply); and their frames
        self._in_audio = False                  # audio has played since the call began or the last clear
        self._dry_frames = 0                    # ticks since the buffer ran dry while in audio
        self.media_in_s: list[float] = []       # when each media message came (monotonic s)
        self.audio_began_s: list[float] = []    # player ticks that began playing audio after none
        self._took_audio = False                # the last tick took audio
        self.messages: list[dict[str, Any]] = []  # every non-media message received
        self.closed = asyncio.Event()
        self.got_audio = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ call control
    def headers(self) -> dict[str, str]:
        """The upgrade's headers: Twilio's signature of :attr:`url`, when there is an auth token."""
        key = os.environ.get("TWILIO_AUTH_TOKEN", "") if self.auth_token is None else self.auth_token
        return {SIGNATURE_HEADER: twilio_signature(key, self.url)} if key else {}

    async def dial(self) -> "FakePhone":
        self.ws = await connect(self.url, max_size=None, compression=None, ping_interval=None,
                                additional_headers=self.headers())
        params = dict(self.custom_parameters)
        if self.token is not None:
            params[TOKEN_PARAMETER] = self.token
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"}, seq=False)
        await self._send({"event": "start", "start": {
            "streamSid": self.stream_sid, "accountSid": self.account_sid, "callSid": self.call_sid,
            "tracks": ["inbound"], "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
        self.t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._sender()), loop.create_task(self._receiver()),
                      loop.create_task(self._player())]
        return self

    async def say(self, ulaw: bytes) -> None:
        """Speak ``ulaw`` (8 kHz µ-law) at real pace; returns once it has all been sent."""
        self.spoken.clear()
        for i in range(0, len(ulaw), FRAME_BYTES):
            self.speech.append(ulaw[i:i + FRAME_BYTES].ljust(FRAME_BYTES, ULAW_SILENCE))
        await self.spoken.wait()

    async def press(self, digit: str) -> None:
        await self._send({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": digit}})

    async def hang_up(self, send_stop: bool = True) -> None:
        if send_stop and self.ws is not None:
            try:
                await self._send({"event": "stop", "stop": {"accountSid": self.account_sid,
                                                            "callSid": self.call_sid}})
            except ConnectionClosed:
                pass
        for t in self.tasks:
            t.cancel()
        if self.ws is not None:
            await self.ws.close()
        self.closed.set()

    async def send_raw(self, text: str) -> None:
        assert self.ws is not None
        await self.ws.send(text)

    # ------------------------------------------------------------ what the caller heard
    def played_frames_at(self, t: float) -> int:
        """Frames of received audio the caller has heard by monotonic time ``t``."""
        partial = min(self.playing_now, int(max(0.0, t - self.tick_at) * 8000))
        return self.played_frames - self.playing_now + partial

    def save_ear(self, path: str) -> None:
        with wave.open(path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            from engine.codec import decode_audio
            w.writeframes(decode_audio(bytes(self.ear), "audio/pcmu").tobytes())

    # ------------------------------------------------------------ internals
    async def _send(self, msg: dict[str, Any], seq: bool = True) -> None:
        assert self.ws is not None
        if self.ws.state is not State.OPEN:   # closing or closed: the line is dead
            raise LineClosed(None, None)
        if seq:
            self.seq += 1
            msg = {"event": msg["event"], "sequenceNumber": str(self.seq), **msg, "streamSid": self.stream_sid}
        await self.ws.send(json.dumps(msg))

    async def _sender(self) -> None:
        n = 0
        while True:
            due = self.t0 + n * FRAME_MS / 1000
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > FRAME_MS / 1000:
                self.late_frames += 1
            if self.speech:
                frame = self.speech.popleft()
                if not self.speech:
                    self.spoken.set()
            else:
                frame = ULAW_SILENCE * FRAME_BYTES
            self.chunk += 1
            try:
                await self._send({"event": "media", "media": {
                    "track": "inbound", "chunk": str(self.chunk), "timestamp": str(n * FRAME_MS),
                    "payload": base64.b64encode(frame).decode("ascii")}})
            except ConnectionClosed:
                return
            n += 1

    async def _receiver(self) -> None:
        assert self.ws is not None
        try:
            async for text in self.ws:
                msg = json.loads(text)
                event = msg.get("event")
                if event == "media":
                    data = base64.b64decode(msg["media"]["payload"])
                    self.buffer += data
                    self.received_frames += len(data)
                    self.media_received += 1
                    self.media_in_s.append(time.monotonic())
                    self.got_audio.set()
                    continue
                self.messages.append(msg)
                if event == "mark":
                    self.marks.append((self.received_frames, msg["mark"]["name"]))
                    await self._echo_played(self.buffer_start - self.playing_now)
                elif event == "clear":
                    now = time.monotonic()
                    heard = self.played_frames_at(now)
                    self.clears.append(ClearSeen(now, heard))
                    # what is playing now stops here; the rest of the buffer is dropped
                    self.played_frames, self.playing_now = heard, 0
                    self._in_audio, self._dry_frames = False, 0   # a cut reply is not an underrun
                    self.buffer_start += len(self.buffer)
                    self.buffer.clear()
                    while self.marks:   # Twilio echoes the marks of the dropped audio at once
                        await self._echo(self.marks.popleft()[1])
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            for task in self.tasks:           # the line is dead: stop talking and playing
                if task is not asyncio.current_task():
                    task.cancel()

    async def _echo(self, name: str) -> None:
        if not self.echo_marks:
            return
        self.marks_echoed += 1
        try:
            await self._send({"event": "mark", "mark": {"name": name}})
        except ConnectionClosed:
            pass

    async def _echo_played(self, finished: int) -> None:
        """Echo the marks whose audio has all played (``finished``: received frames played to the end)."""
        while self.marks and self.marks[0][0] <= finished:
            await self._echo(self.marks.popleft()[1])

    def _count_gap(self, got_bytes: int) -> None:
        """One 20 ms tick of the player. An underrun is the buffer running dry (a short or empty
        frame) while audio was playing, and audio coming back within UNDERRUN_MAX_FRAMES; a
        longer silence that audio comes after is counted apart (``long_silences``): the phone cannot
        tell a reply's end from a stall, a bench that knows its calls' replies can. A ``clear`` ends
        the audio too: what follows it is neither."""
        if got_bytes == FRAME_BYTES:
            if 0 < self._dry_frames <= UNDERRUN_MAX_FRAMES:
                self.underruns += 1
                self.underrun_frames += self._dry_frames
            elif self._dry_frames > UNDERRUN_MAX_FRAMES:
                self.long_silences += 1
                self.long_silence_frames += self._dry_frames
            self._dry_frames = 0
            self._in_audio = True
        elif self._in_audio:
            self._dry_frames += 1

    async def _player(self) -> None:
        n = 0
        start = time.monotonic()
        while True:
            due = start + n * FRAME_MS / 1000
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # the frame that was playing is over: marks up to it have played
            await self._echo_played(self.buffer_start)
            take = bytes(self.buffer[:FRAME_BYTES])
            self._count_gap(len(take))
            del self.buffer[:len(take)]
            self.buffer_start += len(take)
            self.tick_at = time.monotonic()
            if take and not self._took_audio:
                self.audio_began_s.append(self.tick_at)
            self._took_audio = bool(take)
            self.playing_now = len(take)
            self.played_frames += len(take)
            self.ear += take.ljust(FRAME_BYTES, ULAW_SILENCE)
            n += 1

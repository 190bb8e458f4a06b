"""The console's listen and talk WebSockets (asyncio, in the console's event loop).

* ``GET /listen?token=T``: the server sends ``{"op": "listen", "rate_hz": 24000, "format":
  "s16le"}``, then binary messages of int16 little-endian mono PCM at 24 kHz (what the
  speaker plays, read from the listen ring every 20 ms), and about once a second
  ``{"op": "stats", "dropped_frames", "not_listened_frames"}``. While at least one page
  listens, the console holds playback's ``console.listen`` lease.
* ``GET /talk?token=T``: the page sends ``{"op": "start", "rate_hz": R}``, then binary
  messages of int16 little-endian mono PCM at R (its microphone). The console resamples them
  to 24 kHz, writes them into the browser ring and holds capture's ``console.mic.source``
  ``browser`` lease until the socket closes (then ``device``). One page talks at a time.
  The server answers ``{"op": "talk", "rate_hz": 24000}`` and sends ``{"op": "stats",
  "in_frames", "written_frames", "overrun_frames"}`` about once a second.

Neither can hold the engine back: playback and capture only ever copy into or out of the
rings; a listening page that falls behind loses its oldest chunks (counted,
``dropped_frames``), and the listen ring itself drops what does not fit (playback counts
it, ``not_listened_frames``). :func:`audio_stats` is the console's own count of both
directions, published as ``console.audio`` every 2 s while a page listens or talks.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any, Callable

import numpy as np
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from engine.audio.ring import Ring, RingError
from engine.wsio import keeps_up
from engine.audio.listen_talk import LEASE_MS, LISTEN_TOPIC, RENEW_S, SOURCE_TOPIC
from engine.console.audio import ConsoleAudioError, TalkPcm, engine_ring_names, parse_talk_start
from engine.pcm import RATE_HZ

LISTEN_EVERY_TICKS = 2           #: the listen ring is read every other tick of the server (120 ms chunks)
LISTEN_QUEUE_CHUNKS = 10         #: chunks (about 1 s) waiting for one listener at most; the oldest go first
STATS_EVERY_S = 1.0
LATE_MESSAGE_S = 0.1             #: a talk message this long after the one before is counted late (they come every 20 ms)
POLICY_VIOLATION, INTERNAL_ERROR, TRY_AGAIN = 1008, 1011, 1013
WRITE_LIMIT_BYTES = 32768        #: the server's ``write_limit``: a page socket is behind past this much unsent

Publish = Callable[[str, dict[str, Any]], None]


def send_now(ws: ServerConnection, data: bytes | str) -> bool:
    """Write one whole WebSocket message to ``ws`` at once, from a plain callback (the server's
    tick). False, and nothing sent, when the socket does not keep up (:func:`engine.wsio.keeps_up`:
    not open, or its write buffer over the server's WRITE_LIMIT_BYTES): what waits for it stays in
    its bounded queue."""
    if not keeps_up(ws):
        return False
    broadcast((ws,), data)   # a failed write is logged by websockets; the connection's reader sees it close
    return ws.state is State.OPEN and not ws.transport.is_closing()


class Rings:
    """The engine's listen and browser rings, attached by name when a socket needs them: the
    names the supervisor handed the console (``given``), else the running engine's
    ``engine.json`` (``engine console`` attached to an engine that runs), looked up again
    each time so a restarted engine's new rings are found."""

    def __init__(self, given: dict[str, str] | None = None) -> None:
        self.given = dict(given or {})
        self._attached: dict[str, Ring] = {}

    def get(self, kind: str) -> Ring:
        """The ``kind`` ring (``listen`` or ``browser``); ConsoleAudioError saying why not."""
        names = self.given or engine_ring_names()
        name = names.get(kind)
        if name is None:
            why = "it has no mic (text-only?)" if kind == "browser" else "it has no speaker ring"
            raise ConsoleAudioError(f"this engine has no {kind} ring: {why}, or it is older than the console's "
                                    "listen and talk")
        ring = self._attached.get(kind)
        if ring is not None and ring.name == name:
            return ring
        if ring is not None:
            ring.close()
        try:
            ring = Ring.attach(name)
        except RingError as exc:
            raise ConsoleAudioError(f"cannot attach the {kind} ring: {exc}") from None
        self._attached[kind] = ring
        return ring

    def close(self) -> None:
        for ring in self._attached.values():
            ring.close()
        self._attached.clear()


class _Listener:
    """One listening page: its socket and what waits for it (bounded: the oldest chunks go first,
    counted in ``dropped_frames``)."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.chunks: deque[bytes] = deque(maxlen=LISTEN_QUEUE_CHUNKS)
        self.dropped_frames = 0
        self.next_stats_s = time.monotonic() + STATS_EVERY_S

    def put(self, chunk: bytes) -> None:
        if len(self.chunks) == self.chunks.maxlen:
            self.dropped_frames += len(self.chunks[0]) // 2
        self.chunks.append(chunk)


class ListenHub:
    """Every listening page; :meth:`pump` (the server's tick, every ``relay.BATCH_S`` while
    anyone listens) reads the listen ring for them all and sends each its chunk. Event loop's
    thread only."""

    def __init__(self, rings: Rings, publish: Publish) -> None:
        self.rings = rings
        self.publish = publish
        self.listeners: set[_Listener] = set()
        self._ring: Ring | None = None   # the listen ring while anyone listens (holding playback's lease)
        self._renew_at_s = 0.0
        self._ticks = 0
        self._buf = np.zeros(RATE_HZ, dtype=np.int16)   # 1 s: more than a pump round ever reads
        self.sent_frames = 0        #: read from the ring and handed to the listeners (since the console started)
        self.changes = 0            #: listeners that came or went
        self.dropped_frames = 0     #: dropped for listeners that fell behind, in all

    async def serve(self, ws: ServerConnection) -> None:
        try:
            ring = self.rings.get("listen")
        except ConsoleAudioError as exc:
            await ws.close(INTERNAL_ERROR, str(exc)[:120])
            return
        me = _Listener(ws)
        await ws.send(json.dumps({"op": "listen", "rate_hz": RATE_HZ, "format": "s16le"}))   # before any PCM
        if not self.listeners:
            ring.skip(ring.read_available)   # what an earlier listener left: stale
        self.listeners.add(me)
        self.changes += 1
        if self._ring is not ring:
            self._ring, self._renew_at_s = ring, 0.0
        try:
            self.pump(time.monotonic(), tick=False)   # the lease at once, not at the next tick
            async for _ in ws:   # the page sends nothing that matters; this ends when it closes
                pass
        except ConnectionClosed:
            pass
        finally:
            self.listeners.discard(me)
            self.dropped_frames += me.dropped_frames
            self.changes += 1

    def pump(self, now_s: float, tick: bool = True) -> None:
        """Renew playback's lease every RENEW_S and, every LISTEN_EVERY_TICKS ``tick``s (``tick``
        False: now), read what the listen ring holds (one chunk) and send it to every listener,
        while any listens; once the last one left, give the lease back. A listener whose socket
        is behind is not waited for: its chunks wait in its bounded queue (:func:`send_now`)."""
        ring = self._ring
        if ring is None:
            return
        if not self.listeners:
            self._ring = None
            self.publish(LISTEN_TOPIC, {"on": False})
            return
        if now_s >= self._renew_at_s:
            self._renew_at_s = now_s + RENEW_S
            self.publish(LISTEN_TOPIC, {"on": True, "lease_ms": LEASE_MS})
        self._ticks += tick
        if tick and self._ticks % LISTEN_EVERY_TICKS:
            return
        n = ring.read_into(self._buf)
        chunk = self._buf[:n].tobytes() if n else b""
        self.sent_frames += n
        for me in self.listeners:
            if chunk:
                me.put(chunk)
            while me.chunks and send_now(me.ws, me.chunks[0]):
                me.chunks.popleft()
            if now_s >= me.next_stats_s and send_now(me.ws, json.dumps({
                    "op": "stats", "dropped_frames": me.dropped_frames, "not_listened_frames": ring.overrun_frames})):
                me.next_stats_s = now_s + STATS_EVERY_S


class TalkHub:
    """The one talking page: its microphone into the browser ring, and capture's lease."""

    def __init__(self, rings: Rings, publish: Publish) -> None:
        self.rings = rings
        self.publish = publish
        self.talking: ServerConnection | None = None
        self.in_frames = 0          #: the pages' frames (at their rate), in all
        self.written_frames = 0     #: 24 kHz frames written into the browser ring
        self.overrun_frames = 0     #: 24 kHz frames the full ring dropped (capture not reading)
        self.changes = 0            #: talks that began or ended
        self.late_messages = 0      #: talk messages that came over LATE_MESSAGE_S after the one before
        self.max_gap_ms = 0.0       #: the longest wait between two talk messages

    async def serve(self, ws: ServerConnection) -> None:
        if self.talking is not None:
            await ws.close(TRY_AGAIN, "another page is talking; stop it there first")
            return
        try:
            ring = self.rings.get("browser")
        except ConsoleAudioError as exc:
            await ws.close(INTERNAL_ERROR, str(exc)[:120])
            return
        self.talking = ws
        self.changes += 1
        renew: asyncio.Task[None] | None = None
        try:
            try:
                pcm = TalkPcm(parse_talk_start(await asyncio.wait_for(ws.recv(), 10)))
            except (ConsoleAudioError, asyncio.TimeoutError) as exc:
                await ws.close(POLICY_VIOLATION, (str(exc) or "talk: no start message")[:120])
                return
            await ws.send(json.dumps({"op": "talk", "rate_hz": RATE_HZ}))
            renew = asyncio.create_task(self._renew(ws, pcm, ring))
            last = None
            async for msg in ws:
                if isinstance(msg, str):
                    continue   # nothing but audio is expected after the start
                now = time.monotonic()
                if last is not None:
                    gap = now - last
                    self.max_gap_ms = max(self.max_gap_ms, round(gap * 1000, 1))
                    self.late_messages += gap > LATE_MESSAGE_S
                last = now
                try:
                    frames = pcm.convert(msg)
                except ConsoleAudioError as exc:
                    await ws.close(POLICY_VIOLATION, str(exc)[:120])
                    return
                self.in_frames += len(msg) // 2
                if len(frames):
                    written = ring.write(frames)   # a full ring (capture not reading) counts overrun frames
                    self.written_frames += written
                    self.overrun_frames += len(frames) - written
        except ConnectionClosed:
            pass
        finally:
            if renew is not None:
                renew.cancel()
                await asyncio.gather(renew, return_exceptions=True)
            self.talking = None
            self.changes += 1
            self.publish(SOURCE_TOPIC, {"source": "device"})

    async def _renew(self, ws: ServerConnection, pcm: TalkPcm, ring: Ring) -> None:
        """Hold capture's lease while the page talks; report what went through."""
        start_index, start_overrun = ring.write_index, ring.overrun_frames
        while True:
            self.publish(SOURCE_TOPIC, {"source": "browser", "lease_ms": LEASE_MS})
            await ws.send(json.dumps({"op": "stats", "in_frames": pcm.in_frames,
                                      "written_frames": ring.write_index - start_index,
                                      "overrun_frames": ring.overrun_frames - start_overrun}))
            await asyncio.sleep(RENEW_S)


def audio_stats(listen: ListenHub, talk: TalkHub) -> dict[str, Any]:
    """``console.audio``: listeners now and the frames sent to them and dropped for them; whether
    a page talks, and its frames in, written into the browser ring and dropped there (all counts
    since the console started)."""
    return {"listeners": len(listen.listeners), "listen_sent_frames": listen.sent_frames,
            "listen_dropped_frames": listen.dropped_frames + sum(x.dropped_frames for x in listen.listeners),
            "talking": talk.talking is not None, "talk_in_frames": talk.in_frames,
            "talk_written_frames": talk.written_frames, "talk_overrun_frames": talk.overrun_frames,
            "talk_late_messages": talk.late_messages, "talk_max_gap_ms": talk.max_gap_ms}

"""Writing to a websockets (asyncio) connection from a plain callback, shared by the API link
(:mod:`engine.link.shell`), the phone bridge's phone sockets and the console's page sockets: no
await, so no task and no extra turn of the event loop, and every message in the order it was put.

- :func:`keeps_up`: whether a connection can take a message at once.
- :class:`Outgoing`: one socket's writer: at once when it keeps up and nothing waits, else queued
  in order for a task (backpressure), never reordered.
- :class:`Latency`: one path's latencies up to the bytes handed to the socket, and the late ones.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import broadcast
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from engine.stats import percentiles

OUTGOING_MAX = 20_000          #: messages queued for one socket before it counts as stuck
LATE_S = 0.020                 #: a frame handed to its socket later than this after it came in is late
LATENCY_SAMPLES = 4096         #: the latest this many frames are kept


def keeps_up(ws: Connection) -> bool:
    """Open, and its transport's write buffer not over the high-water mark (the connection's
    ``write_limit``): a message can be written at once with websockets' documented synchronous
    ``broadcast`` to this one connection, without piling up behind a peer that does not read."""
    transport = ws.transport
    return ws.state is State.OPEN and not transport.is_closing() \
        and transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]


class Latency:
    """One path's latencies (µs, the latest :data:`LATENCY_SAMPLES` frames'), how many frames were
    noted in all (``count``) and how many took over :data:`LATE_S` (``late``). Noting allocates
    nothing: a fixed ring."""

    def __init__(self) -> None:
        self._ring_us = np.zeros(LATENCY_SAMPLES, dtype=np.float64)
        self.count = 0
        self.late = 0

    def note(self, value_us: float, frames: int = 1) -> None:
        """``frames`` frames (one message may carry several) took ``value_us``."""
        ring, n = self._ring_us, self.count
        for i in range(min(frames, LATENCY_SAMPLES)):
            ring[(n + i) % LATENCY_SAMPLES] = value_us
        self.count = n + frames
        if value_us > LATE_S * 1e6:
            self.late += frames

    @property
    def samples_us(self) -> np.ndarray:
        """The kept samples (a copy, oldest first is not promised)."""
        return self._ring_us[:min(self.count, LATENCY_SAMPLES)].copy()

    def p99_ms(self) -> float | None:
        """The nearest-rank p99 in ms (as ``bench.run.pct``); None before the first sample."""
        samples = np.sort(self._ring_us[:min(self.count, LATENCY_SAMPLES)])
        if not len(samples):
            return None
        return round(float(samples[min(len(samples) - 1, int(len(samples) * 0.99))]) / 1000, 3)

    def report(self) -> dict[str, Any] | None:
        """``chunks`` (frames noted in all), p50 / p99 (numpy's interpolated percentiles, as
        ``latency.mic`` has always had them) / max in ms over the kept samples; None before the first."""
        samples = self.samples_us
        if not len(samples):
            return None
        p50, p99 = percentiles(samples, (50, 99))
        return {"chunks": self.count, "p50_ms": round(p50 / 1000, 3), "p99_ms": round(p99 / 1000, 3),
                "max_ms": round(float(samples.max()) / 1000, 3)}


class Outgoing:
    """One socket's writer; senders never wait. A message is written at once, in the sender's own
    callback, when nothing waits before it and the socket keeps up (open, its transport's write
    buffer under the high-water mark): websockets' documented synchronous ``broadcast`` to this one
    connection, with no task hop, so it does not wait behind every other socket's work in the
    loop's next turns. Otherwise it waits in a queue that a task drains in order (``ws.send``:
    backpressure). Messages go out in the order they were put, whichever way each takes.

    A message put with ``since_s`` (a monotonic instant: when what it carries came in) and a
    :class:`Latency` notes ``since_s`` -> the moment its bytes were handed to the socket, once per
    frame it carries (``frames``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: asyncio.Queue[tuple[str, float, Latency | None, int] | None] = asyncio.Queue()
        self.ws: Connection | None = None
        self.task: asyncio.Task[None] | None = None
        self._sending = False          #: the task is between taking a message and its send's end

    def start(self, ws: Connection) -> None:
        self.ws = ws
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(), name=f"writer {self.name}")

    def put(self, text: str, since_s: float = 0.0, latency: Latency | None = None, frames: int = 1) -> bool:
        """Write or queue ``text``; False when :data:`OUTGOING_MAX` messages already wait (a peer
        that does not read: the caller ends that socket)."""
        ws = self.ws
        if ws is not None and not self._sending and self.queue.empty() and keeps_up(ws):
            broadcast((ws,), text)   # a failed write is logged by websockets; the reader sees the close
            if latency is not None:
                latency.note((time.monotonic() - since_s) * 1e6, frames)
            return True
        if self.queue.qsize() >= OUTGOING_MAX:
            return False
        self.queue.put_nowait((text, since_s, latency, frames))
        return True

    async def _run(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            ws = self.ws
            if ws is None or ws.state is not State.OPEN:
                continue   # closing: the reader sees it (a send now would only abort a transport that is gone)
            text, since_s, latency, frames = item
            self._sending = True
            try:
                await ws.send(text)
            except ConnectionClosed:
                continue  # the reader sees it
            finally:
                self._sending = False
            if latency is not None:
                latency.note((time.monotonic() - since_s) * 1e6, frames)

    def close(self, drop: bool = False) -> None:
        """The task ends once what waits is written, or at once with ``drop`` (the socket is gone:
        what waits is dropped)."""
        if drop:
            self.ws = None
            while not self.queue.empty():
                self.queue.get_nowait()
        self.queue.put_nowait(None)

"""The console's bus side: one thread that reads every bus message and hands them, in
batches, to the web server's event loop; and publishes the few commands the page may send.

Bounded everywhere, and the engine never waits for it: the subscriber is one more ZeroMQ
SUB socket (the broker drops for it alone if it falls behind, never for the engine), the
relay keeps the latest :data:`BACKLOG` messages for pages that open later, and each page
has its own bounded queue (:class:`PageQueue`) whose oldest messages are dropped, and
counted, when that page is slow. Commands are re-sent every 0.5 s until their ``cmd.ack``
comes (the engine deduplicates by id), for at most 10 s. The listen and talk switches
(``console.listen``, ``console.mic.source``: leases the console renews every second, no
ack) go out once each (:meth:`BusRelay.publish`).
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable

import zmq

from bus import Endpoints, Publisher, Subscriber
from engine.errors import EngineError

BACKLOG = 3000              #: messages kept for a page that opens (or reloads) later
PAGE_QUEUE = 5000           #: messages waiting for one page at most; the oldest go first
BATCH_S = 0.025             #: the relay hands messages over this often
RESEND_S = 0.5
COMMAND_TIMEOUT_S = 10.0
HEADER_KEYS = ("v", "seq")   #: header keys the page does not need (it keeps pub, ts, mono_ns)


class ConsoleError(EngineError):
    """The console cannot start or was asked something it cannot do."""


def encode(topic: str, body: dict[str, Any]) -> str:
    """One bus message as the JSON text the page gets: ``{"topic", "body"}`` (bytes as their length)."""
    return json.dumps({"topic": topic, "body": body}, default=_json_default, separators=(",", ":"))


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": len(value)}
    return str(value)


class PageQueue:
    """What is waiting for one page: a bounded deque (oldest dropped, counted in ``dropped``)
    and an asyncio event for its writer task. Used from the event loop's thread only."""

    def __init__(self, limit: int = PAGE_QUEUE) -> None:
        self.items: deque[str] = deque(maxlen=limit)
        self.ready = asyncio.Event()
        self.dropped = 0

    def put_many(self, items: list[str]) -> None:
        over = len(self.items) + len(items) - (self.items.maxlen or 0)
        if over > 0:
            self.dropped += over
        self.items.extend(items)
        self.ready.set()

    def take(self) -> list[str]:
        items = list(self.items)
        self.items.clear()
        self.ready.clear()
        return items


class BusRelay:
    """Reads the bus on its own thread; ``deliver(batch)`` runs on ``loop`` with each batch of
    encoded messages. :meth:`command` publishes a page's command (from any thread)."""

    def __init__(self, endpoints: Endpoints, loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[list[str]], None], name: str | None = None) -> None:
        self.endpoints = endpoints
        self.loop = loop
        self.deliver = deliver
        self.name = name or f"console:{os.getpid()}"
        self.backlog: deque[str] = deque(maxlen=BACKLOG)   # read and written on the loop's thread
        self.received = 0
        self._commands: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self._stop = threading.Event()
        # wakes the bus thread for a command at once (it sleeps in poll until a message or a deadline)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="console-bus", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(3)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already due to wake (or closed: stopping)

    def command(self, topic: str, payload: dict[str, Any]) -> str:
        """Publish ``topic`` (a ``cmd.*``) with a fresh ``id``, re-sent until acknowledged; returns the id."""
        if not topic.startswith("cmd."):
            raise ConsoleError(f"the console publishes commands only, not {topic!r}")
        payload = dict(payload)
        payload.setdefault("id", uuid.uuid4().hex)
        self._commands.put((topic, payload))
        self._wake()
        return payload["id"]

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Publish ``topic`` (a ``console.*`` switch) once, from any thread: no id, no ack."""
        if not topic.startswith("console."):
            raise ConsoleError(f"the console publishes its switches on console.* only, not {topic!r}")
        self._commands.put((topic, dict(payload)))
        self._wake()

    def _hand_over(self, batch: list[str]) -> None:
        try:
            self.loop.call_soon_threadsafe(self._on_loop, batch)
        except RuntimeError:   # the loop is closed: the console is stopping
            self._stop.set()

    def _on_loop(self, batch: list[str]) -> None:
        self.backlog.extend(batch)
        self.deliver(batch)

    def _run(self) -> None:
        try:
            sub = Subscriber(self.endpoints, [""], verify_key=None)
            pub = Publisher(self.endpoints, self.name, curve=self.endpoints.curve, signing_key=None)
        except Exception as exc:  # reported by the server (it checks relay.error)
            self.error = exc
            return
        pending: dict[str, tuple[str, dict[str, Any], float, float]] = {}  # id -> topic, payload, next, give up
        try:
            batch: list[str] = []
            flush_at = time.monotonic() + BATCH_S
            poller = zmq.Poller()
            poller.register(sub.socket, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            msg: tuple[str, dict[str, Any]] | None = None
            while not self._stop.is_set():
                if msg is None:
                    # sleep until a message, a command, or the next deadline (no polling while idle)
                    deadlines = [due for _, _, due, _ in pending.values()]
                    if batch:
                        deadlines.append(flush_at)
                    wait_s = (min(deadlines) - time.monotonic()) if deadlines else 1.0
                    poller.poll(max(0, int(wait_s * 1000)) + 1)
                    try:
                        os.read(self._wake_r, 4096)
                    except (BlockingIOError, OSError):
                        pass
                msg = sub.recv(timeout_ms=0)
                now = time.monotonic()
                if msg is not None:
                    topic, body = msg
                    if not topic.startswith("_join."):
                        self.received += 1
                        if topic == "cmd.ack" and body.get("id") in pending:
                            pending.pop(body["id"], None)
                        batch.append(encode(topic, {k: v for k, v in body.items() if k not in HEADER_KEYS}))
                while not self._commands.empty():
                    topic, payload = self._commands.get_nowait()
                    if "id" not in payload:   # a switch: once, no ack
                        pub.publish(topic, payload)
                        continue
                    pending[payload["id"]] = (topic, payload, now, now + COMMAND_TIMEOUT_S)
                for cid, (topic, payload, due, give_up) in list(pending.items()):
                    if now >= give_up:
                        pending.pop(cid)
                        batch.append(encode("console.command_failed", {"id": cid, "topic": topic,
                                                                       "message": f"no cmd.ack for {topic} within "
                                                                                  f"{COMMAND_TIMEOUT_S:.0f} s: is the "
                                                                                  "engine connected?",
                                                                       "mono_ns": time.monotonic_ns()}))
                    elif now >= due:
                        pub.publish(topic, payload)
                        pending[cid] = (topic, payload, now + RESEND_S, give_up)
                if batch and (now >= flush_at or len(batch) >= 500):
                    self._hand_over(batch)
                    batch = []
                if now >= flush_at:
                    flush_at = now + BATCH_S
        except Exception as exc:
            self.error = exc
        finally:
            sub.close()
            pub.close()

"""Publisher and Subscriber sockets for the bus, and where to find the broker.

Each socket belongs to one thread (ZeroMQ sockets are not thread-safe). Publishers
connect to the broker's ``publish`` endpoint, subscribers to its ``subscribe`` endpoint;
both endpoints are in the engine's connection file (``engine status --json``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import zmq

from bus.wire import BusError, MalformedMessage, decode, encode


def runtime_dir() -> Path:
    """The per-user runtime directory (mode 0700) holding sockets and the connection file."""
    base = os.environ.get("REALTALK_RUNTIME_DIR")
    if base:
        path = Path(base)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "realtalk"
    else:
        path = Path(f"/tmp/realtalk-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def connection_file() -> Path:
    return runtime_dir() / "engine.json"


@dataclass(frozen=True)
class Endpoints:
    """Where clients publish (broker XSUB) and subscribe (broker XPUB)."""
    publish: str
    subscribe: str


def load_endpoints(path: str | os.PathLike[str] | None = None) -> Endpoints:
    """Read the endpoints from a connection file (default: the running engine's)."""
    file = Path(path) if path else connection_file()
    try:
        data = json.loads(file.read_text())
        return Endpoints(publish=data["publish"], subscribe=data["subscribe"])
    except FileNotFoundError:
        raise BusError(f"no engine is running: {file} does not exist (start one with `engine start`)") from None
    except (KeyError, ValueError) as exc:
        raise BusError(f"connection file {file} is unreadable ({exc}); restart the engine") from None


class Publisher:
    """Publishes messages to the broker. ``name`` identifies this publisher in every body."""

    def __init__(self, endpoint: str, name: str, context: zmq.Context | None = None, *, bind: bool = False) -> None:
        """Connect to the broker's publish endpoint (or, with ``bind``, serve subscribers directly)."""
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        if bind:
            self._sock.bind(endpoint)
        else:
            self._sock.connect(endpoint)
        self.name = name
        self.seq = 0

    def publish(self, topic: str, payload: Mapping[str, Any] | None = None) -> None:
        """Send one message; never blocks (drops at the high-water mark, as PUB does)."""
        self.seq += 1
        topic_frame, body_frame = encode(topic, payload or {}, self.name, self.seq)
        self._sock.send(topic_frame, zmq.SNDMORE)  # two sends: a third of send_multipart's cost
        self._sock.send(body_frame)

    def join(self, subscribe_endpoint: str, timeout_s: float = 5.0) -> bool:
        """Wait until this publisher's messages reach subscribers (ZeroMQ's slow joiner).

        Publishes a probe on a private topic until it comes back through the broker; by then
        the broker has handed this publisher the subscriptions it holds. True if it came back.
        """
        topic = f"_join.{self.name}.{os.getpid()}.{id(self)}"
        sub = Subscriber(subscribe_endpoint, [topic], context=self._ctx)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                self._sock.send_multipart(encode(topic, {}, self.name, 0))
                if sub.recv(timeout_ms=10) is not None:
                    return True
            return False
        finally:
            sub.close()

    def send_raw(self, frames: list[bytes]) -> None:
        """Send frames as they are (already encoded, or deliberately malformed in tests)."""
        if not frames:
            raise BusError("send_raw needs at least one frame")
        for frame in frames[:-1]:
            self._sock.send(frame, zmq.SNDMORE)
        self._sock.send(frames[-1])

    def close(self) -> None:
        self._sock.close()


class Subscriber:
    """Receives messages whose topic starts with one of ``prefixes`` (all if empty).

    Malformed messages are counted in ``malformed`` and skipped, never raised;
    ``last_error`` describes the latest one.
    """

    def __init__(self, endpoint: str, prefixes: list[str] | tuple[str, ...] = ("",),
                 context: zmq.Context | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        for p in prefixes or ("",):
            self.socket.setsockopt(zmq.SUBSCRIBE, p.encode())
        self.socket.connect(endpoint)
        self.malformed = 0
        self.last_error: MalformedMessage | None = None
        self._rcvtimeo_ms = -1

    def recv(self, timeout_ms: int | None = None) -> tuple[str, dict[str, Any]] | None:
        """Next well-formed message, or None when ``timeout_ms`` passes first."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        wait_ms = -1 if timeout_ms is None else max(0, int(timeout_ms))
        while True:
            if wait_ms == 0 and not self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return None  # a cheap check: raising zmq.Again costs more than the message
            if wait_ms != self._rcvtimeo_ms:  # a blocking recv with a timeout: no poll, no exception
                self.socket.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo_ms = wait_ms
            try:
                frames = self._recv_frames()
            except zmq.Again:
                return None
            try:
                return decode(frames)
            except MalformedMessage as exc:
                self.malformed += 1
                self.last_error = exc
                if deadline is not None:
                    wait_ms = int((deadline - time.monotonic()) * 1000)
                    if wait_ms <= 0:
                        return None

    def _recv_frames(self) -> list[Any]:
        """One whole message's frames (as buffers); half the cost of ``recv_multipart``."""
        first = self.socket.recv(copy=False)
        frames = [first.buffer]
        more = first.more
        while more:
            part = self.socket.recv(copy=False)
            frames.append(part.buffer)
            more = part.more
        return frames

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while True:
            msg = self.recv()
            if msg is not None:
                yield msg

    def close(self) -> None:
        self.socket.close()

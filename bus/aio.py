"""The bus for asyncio programs: a publisher, a subscriber, and a client that sends commands.

:class:`AsyncPublisher` and :class:`AsyncSubscriber` are :class:`bus.Publisher` and
:class:`bus.Subscriber` on ``zmq.asyncio`` sockets, with the same wire format, keys (CURVE on a
``tcp://`` endpoint, from the :class:`bus.Endpoints` given or the connection file) and checks
(signatures with a verify key, malformed messages and ``seq`` gaps counted).

:class:`BusClient` is one program's connection: a publisher, a subscriber of the prefixes it
needs, a reader task that hands each message to the waiters and listeners, and :meth:`BusClient.call`,
the one way to send a command (docs/bus-protocol.md, "Commands"):

- the command goes out with an ``id``; the engine's intake acks it at once on ``cmd.ack``
  (``queued``, ``accepted``, ``taken`` or ``refused``);
- it is sent again only while no ack came (every :data:`RESEND_S`: a message published before
  the broker knows the subscriptions is lost, ZeroMQ's slow joiner), at most for ``ack_timeout_s``;
- with ``outcome=True`` it then waits for the command's ``cmd.done`` (what the realtime process
  did with it: the item id of a say, a refusal), for as long as the engine holds it, sending the
  command again every :data:`OUTCOME_RESEND_S` meanwhile: an outcome lost with a broker that
  crashed comes again (``repeated: true``; the engine carries a command out once, by its ``id``).
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from typing import Any, AsyncIterator, Callable, Mapping

import zmq
import zmq.asyncio

from bus.client import FROM_ENV, Endpoints, MessageChecks, _connect, _keys
from bus.security import SIGNED_TOPICS, CurveClientKeys, sign
from bus.wire import ACK_TOPIC, DONE_TOPIC, BusError, encode

#: a command not acked this long after it was sent is sent again
RESEND_S = 0.5
#: how long a command waits for its ack, at most (the intake acks in milliseconds)
ACK_TIMEOUT_S = 10.0
#: while a command's outcome has not come, it is sent again this often (a copy only asks for it)
OUTCOME_RESEND_S = 3.0

Message = tuple[str, dict[str, Any]]


class NoAck(BusError):
    """A command got no ``cmd.ack``: no engine took it (none runs at these endpoints, or it is stuck)."""


class NoOutcome(BusError):
    """A command was acked but its ``cmd.done`` did not come in time."""


class AsyncPublisher:
    """Publishes to the broker from an event loop; ``publish`` never blocks (PUB drops at its high-water mark)."""

    def __init__(self, endpoint: str | Endpoints, name: str, context: zmq.asyncio.Context | None = None, *,
                 curve: CurveClientKeys | None = FROM_ENV, signing_key: bytes | str | None = FROM_ENV,
                 signed_topics: tuple[str, ...] = SIGNED_TOPICS) -> None:
        ctx = context or zmq.asyncio.Context.instance()
        self.curve, self._signing_key = _keys(endpoint, curve, signing_key)
        self._signed = tuple(signed_topics)
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 500)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.curve = _connect(self.socket, endpoint.publish if isinstance(endpoint, Endpoints) else endpoint,
                              self.curve, curve is FROM_ENV and not isinstance(endpoint, Endpoints))
        self.name = name
        self.seq = 0

    def publish(self, topic: str, payload: Mapping[str, Any] | None = None) -> None:
        """Send one message now (the socket queues it; nothing to await)."""
        self.seq += 1
        frames = encode(topic, payload or {}, self.name, self.seq)
        if self._signing_key is not None and topic.startswith(self._signed):
            frames.append(sign(self._signing_key, *frames))
        self.socket.send_multipart(frames, zmq.NOBLOCK)

    def close(self) -> None:
        self.socket.close()


class AsyncSubscriber(MessageChecks):
    """Receives messages whose topic starts with one of ``prefixes`` (all if empty), checked as
    :class:`bus.Subscriber` checks them."""

    def __init__(self, endpoint: str | Endpoints, prefixes: list[str] | tuple[str, ...] = ("",),
                 context: zmq.asyncio.Context | None = None, *, curve: CurveClientKeys | None = FROM_ENV,
                 verify_key: bytes | str | None = FROM_ENV, signed_topics: tuple[str, ...] = SIGNED_TOPICS) -> None:
        ctx = context or zmq.asyncio.Context.instance()
        defaulted = curve is FROM_ENV and not isinstance(endpoint, Endpoints)
        curve, key = _keys(endpoint, curve, verify_key)
        self._init_reading(key, signed_topics, prefixes)
        self.socket = ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.prefixes = list(prefixes) if prefixes else [""]
        for p in self.prefixes:
            self.socket.setsockopt(zmq.SUBSCRIBE, p.encode())
        _connect(self.socket, endpoint.subscribe if isinstance(endpoint, Endpoints) else endpoint, curve, defaulted)

    def subscribe(self, prefix: str) -> None:
        """Also take topics starting with ``prefix`` from now on (no effect if already taken)."""
        if prefix not in self.prefixes:
            self.prefixes.append(prefix)
            self.socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())

    async def recv(self, timeout_s: float | None = None) -> Message | None:
        """The next well-formed message, or None when ``timeout_s`` passes first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if deadline is not None:
                left_ms = max(0, int((deadline - time.monotonic()) * 1000))
                if not await self.socket.poll(left_ms):   # POLLIN
                    return None
            msg = self._checked(await self.socket.recv_multipart())
            if msg is not None:
                return msg

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            msg = await self.recv()
            if msg is not None:
                yield msg

    def close(self) -> None:
        self.socket.close()


class BusClient:
    """One program's connection to the engine's bus (see the module docstring). Make it with
    :meth:`connect`; ``prefixes``: the topics the program reads (``cmd.ack`` and ``cmd.done`` always).
    ``presence``: hold ``_presence.<name>`` while connected (the owner of tools, docs/bus-protocol.md)."""

    def __init__(self, endpoints: Endpoints, name: str, prefixes: list[str] | tuple[str, ...] = (), *,
                 presence: bool = False, context: zmq.asyncio.Context | None = None) -> None:
        self.endpoints = endpoints
        self.name = name
        self._probe = f"_join.{name}.{os.getpid()}.{id(self)}"
        wanted = [ACK_TOPIC, DONE_TOPIC, self._probe, *prefixes]
        if presence:
            wanted.append(f"_presence.{name}")
        self.pub = AsyncPublisher(endpoints, name, context)
        self.sub = AsyncSubscriber(endpoints, list(dict.fromkeys(wanted)), context)
        self._waiters: list[tuple[Callable[[str, dict[str, Any]], bool], asyncio.Future[Message]]] = []
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._reader: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None   #: set by :meth:`fail`: every waiter gets it at once

    @classmethod
    async def connect(cls, endpoints: Endpoints, name: str, prefixes: list[str] | tuple[str, ...] = (), *,
                      presence: bool = False, join_timeout_s: float = 5.0) -> "BusClient":
        """Connect, and return once this client's messages reach subscribers (its probe came back);
        :class:`NoAck` if they do not within ``join_timeout_s`` (no broker at these endpoints, or
        CURVE keys it does not accept)."""
        client = cls(endpoints, name, prefixes, presence=presence)
        client._reader = asyncio.get_running_loop().create_task(client._read())
        joined = client.expect(lambda t, b: t == client._probe)
        deadline = time.monotonic() + join_timeout_s
        while not joined.done():
            if time.monotonic() >= deadline:
                await client.close()
                raise NoAck(f"the bus at {endpoints.publish} does not answer within {join_timeout_s:g} s; "
                            "is the engine running (`engine status`)?")
            client.pub.publish(client._probe, {})
            await asyncio.wait([joined], timeout=0.05)
        return client

    async def _read(self) -> None:
        async for topic, body in self.sub:
            for listener in list(self._listeners):
                try:
                    listener(topic, body)
                except Exception as exc:  # noqa: BLE001 - one failing listener must not stop every waiter
                    print(f"realtalk: a bus listener failed on {topic}: {type(exc).__name__}: {exc}", file=sys.stderr)
            if self._waiters:
                for pred, fut in self._waiters:
                    if not fut.done() and pred(topic, body):
                        fut.set_result((topic, body))
                self._waiters = [(p, f) for p, f in self._waiters if not f.done()]

    def listen(self, callback: Callable[[str, dict[str, Any]], None]) -> None:
        """Call ``callback(topic, body)`` with every message read, before the waiters see it."""
        self._listeners.append(callback)

    def subscribe(self, prefix: str) -> None:
        self.sub.subscribe(prefix)

    def expect(self, pred: Callable[[str, dict[str, Any]], bool]) -> asyncio.Future[Message]:
        """A future for the first message from now on that ``pred(topic, body)`` accepts."""
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        if self.failure is not None:
            fut.set_exception(self.failure)
        else:
            self._waiters.append((pred, fut))
        return fut

    def fail(self, exc: BaseException) -> None:
        """Every waiter, now and later, gets ``exc`` (the engine stopped: nothing will come)."""
        self.failure = exc
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters = []

    def publish(self, topic: str, payload: Mapping[str, Any] | None = None) -> None:
        self.pub.publish(topic, payload)

    async def call(self, topic: str, payload: Mapping[str, Any], *, ack_timeout_s: float = ACK_TIMEOUT_S,
                   outcome: bool = False, outcome_timeout_s: float | None = None) -> dict[str, Any]:
        """Send a command and return its ``cmd.ack`` (with ``outcome``: its ``cmd.done``, or the ack
        if it was refused). Sent again while no ack came, then (with ``outcome``) every
        OUTCOME_RESEND_S until the outcome comes. :class:`NoAck`, :class:`NoOutcome` when they do not
        come in time; the engine carries a command out once by its ``id`` and answers a copy of one
        done with its outcome again (``repeated``)."""
        body = dict(payload)
        cmd_id = body.setdefault("id", uuid.uuid4().hex)
        acked = self.expect(lambda t, b: t == ACK_TOPIC and b.get("id") == cmd_id)
        done = self.expect(lambda t, b: t == DONE_TOPIC and b.get("id") == cmd_id) if outcome else None
        try:
            deadline = time.monotonic() + ack_timeout_s
            while not acked.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoAck(f"no cmd.ack for {topic} within {ack_timeout_s:g} s; is the engine running "
                                "(`engine status`)?")
                self.pub.publish(topic, body)
                await asyncio.wait([acked], timeout=min(RESEND_S, left))
            ack = acked.result()[1]
            if done is None or not ack.get("ok"):
                return ack
            until = None if outcome_timeout_s is None else time.monotonic() + outcome_timeout_s
            while True:
                wait = OUTCOME_RESEND_S if until is None else min(OUTCOME_RESEND_S, until - time.monotonic())
                if wait > 0:
                    await asyncio.wait([done], timeout=wait)
                if done.done():
                    return done.result()[1]
                if until is not None and time.monotonic() >= until:
                    raise NoOutcome(f"{topic} {cmd_id} was acked ({ack.get('state')}) but not carried out within "
                                    f"{outcome_timeout_s:g} s")
                self.pub.publish(topic, body)   # its outcome may have been lost: a copy asks for it again
        finally:
            for fut in (acked, done):
                if fut is not None and not fut.done():
                    fut.cancel()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, zmq.ZMQError):
                pass
        self.pub.close()
        self.sub.close()


def call_sync(endpoints: Endpoints, topic: str, payload: Mapping[str, Any], *, name: str | None = None,
              outcome: bool = False, ack_timeout_s: float = ACK_TIMEOUT_S,
              outcome_timeout_s: float | None = None) -> dict[str, Any]:
    """:meth:`BusClient.call` for a program without an event loop (the CLI, tests, benches): connect,
    send, wait, close."""
    async def run() -> dict[str, Any]:
        client = await BusClient.connect(endpoints, name or f"call:{os.getpid()}")
        try:
            return await client.call(topic, payload, ack_timeout_s=ack_timeout_s, outcome=outcome,
                                     outcome_timeout_s=outcome_timeout_s)
        finally:
            await client.close()
    return asyncio.run(run())

"""Publisher and Subscriber sockets for the bus, and where to find the broker.

Each socket belongs to one thread (ZeroMQ sockets are not thread-safe). Publishers
connect to the broker's ``publish`` endpoint, subscribers to its ``subscribe`` endpoint;
both endpoints are in the engine's connection file (``engine status --json``).

Keys (bus/security.py): pass an :class:`Endpoints` (from :func:`load_endpoints` or
:func:`endpoints_from`) and the sockets use what it carries: CURVE client keys on a
``tcp://`` endpoint, the signing key to sign (Publisher) and verify (Subscriber) the
control topics. Given a plain endpoint string, they take this process's keys: those
given to :func:`use_keys` (a child calls it with its spec's ``bus`` section), else
``$REALTALK_BUS_KEYS`` (how the broker gets them), else none; and a ``tcp://`` endpoint
with no CURVE keys from any of these takes them from the running engine's connection file
when that file names the endpoint (so ``Subscriber(conn["subscribe"])`` keeps working over
tcp). Keyword arguments override all of these.

Where the broker is: the runtime directory and the connection file (``runtime_dir``,
``connection_file``, :func:`load_endpoints`) are believed only when they are this user's own
and private (bus/runtime.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import zmq

from bus.security import (FORGED_REASON, REPLAYED_REASON, SIGNED_TOPICS, CurveClientKeys, ReplayGuard, Verdict,
                          apply_client_curve, curve_from, environment_keys, parse_signing_key, sign, verify)
from bus.runtime import connection_file as connection_file, runtime_dir as runtime_dir  # (where they were)
from bus.runtime import read_connection, read_private_json, running_engine
from bus.wire import BusError, MalformedMessage, decode, encode

#: malformed messages one ``Subscriber.recv`` call skips at most before it returns None
MAX_SKIPPED_PER_RECV = 1000
#: publishers whose seq a subscriber of every topic follows at most (the oldest is forgotten)
MAX_TRACKED_PUBLISHERS = 4096
#: the shortest interval between two reports of a Subscriber's malformed messages or drops
REPORT_PERIOD_S = 1.0
#: how often a socket on an ipc endpoint tries to reach a broker that is gone (ZeroMQ's default: 100 ms);
#: a local connect attempt costs next to nothing, and a restarted broker is found this much sooner
IPC_RECONNECT_IVL_MS = 10
#: "take it from the Endpoints given, else this process's keys (use_keys, $REALTALK_BUS_KEYS)"
FROM_ENV: Any = type("_FromEnv", (), {"__repr__": lambda self: "FROM_ENV"})()
_process_keys: dict[str, Any] | None = None


def use_keys(bus_spec: Mapping[str, Any] | None) -> None:
    """Make ``bus_spec``'s keys (``signing_key`` hex, ``curve_*`` Z85: a child spec's ``bus``
    section) the default of every Publisher and Subscriber this process makes from an
    endpoint string. None goes back to ``$REALTALK_BUS_KEYS``. Checked at once (BusError)."""
    global _process_keys
    if bus_spec is not None:
        curve_from(bus_spec)
        parse_signing_key(bus_spec.get("signing_key"))
    _process_keys = None if bus_spec is None else dict(bus_spec)


@dataclass(frozen=True)
class Endpoints:
    """Where clients publish (broker XSUB) and subscribe (broker XPUB), and the keys to use:
    ``curve`` for a tcp transport, ``signing_key`` only in the engine's own processes."""
    publish: str
    subscribe: str
    curve: CurveClientKeys | None = field(default=None, repr=False)
    signing_key: bytes | None = field(default=None, repr=False)


def endpoints_from(data: Mapping[str, Any]) -> Endpoints:
    """Endpoints and keys from a connection file's map or a child spec's ``bus`` section:
    ``publish``, ``subscribe``, optional ``curve_server_key`` / ``curve_public_key`` /
    ``curve_secret_key`` (Z85) and ``signing_key`` (hex). Raises BusError naming what is wrong."""
    missing = [k for k in ("publish", "subscribe") if not isinstance(data.get(k), str)]
    if missing:
        raise BusError(f"bus endpoints lack {', '.join(missing)}; restart the engine")
    return Endpoints(data["publish"], data["subscribe"], curve_from(data), parse_signing_key(data.get("signing_key")))


def load_endpoints(path: str | os.PathLike[str] | None = None) -> Endpoints:
    """Read the endpoints (and CURVE keys, with tcp) from a connection file: by default the one of
    this user's engine that runs now (bus/runtime.py: the file must be this user's own and private
    and its supervisor provably running), else the file at ``path`` (this user's own and private:
    a copy of another machine's is fine). Raises BusError naming the file and what to do."""
    if path:
        file = Path(path)
        data = read_connection(file)
    else:
        file = connection_file()
        data = running_engine(file)
    try:
        return endpoints_from(data)
    except BusError as exc:
        raise BusError(f"connection file {file}: {exc}") from None


def _keys(endpoint: str | Endpoints, curve: Any, key: Any) -> tuple[CurveClientKeys | None, bytes | None]:
    """The CURVE keys and signing key a socket uses (see the module docstring)."""
    if isinstance(endpoint, Endpoints):
        source_curve, source_key = endpoint.curve, endpoint.signing_key
    elif curve is FROM_ENV or key is FROM_ENV:
        env = _process_keys if _process_keys is not None else environment_keys()
        source_curve, source_key = curve_from(env), parse_signing_key(env.get("signing_key"))
    else:
        source_curve = source_key = None
    return (source_curve if curve is FROM_ENV else curve), (source_key if key is FROM_ENV else parse_signing_key(key))


def _connection_file_curve(endpoint: str) -> CurveClientKeys | None:
    """The CURVE keys of the running engine's connection file if it names ``endpoint``."""
    try:
        data = read_private_json(connection_file())   # this user's own private file only
        if endpoint in (data.get("publish"), data.get("subscribe")):
            return curve_from(data)
    except (OSError, ValueError, AttributeError, BusError):
        pass
    return None


def _connect(sock: zmq.Socket, endpoint: str, curve: CurveClientKeys | None,
             defaulted: bool) -> CurveClientKeys | None:
    """Connect ``sock``, as a CURVE client on tcp (``defaulted``: no keys were given, look them
    up), retrying every IPC_RECONNECT_IVL_MS on ipc; return the keys it uses."""
    if endpoint.startswith("tcp://"):
        if curve is None and defaulted:
            curve = _connection_file_curve(endpoint)
        if curve is not None:
            apply_client_curve(sock, curve)
    elif endpoint.startswith("ipc://"):
        sock.setsockopt(zmq.RECONNECT_IVL, IPC_RECONNECT_IVL_MS)
    sock.connect(endpoint)
    return curve


class _Publishes(Protocol):
    """What :meth:`MessageChecks.publish_reports` publishes through (a Publisher, an AsyncPublisher)."""
    name: str

    def publish(self, topic: str, payload: Mapping[str, Any] | None = None) -> None: ...


class Publisher:
    """Publishes messages to the broker. ``name`` identifies this publisher in every body.

    With a ``signing_key``, messages on ``signed_topics`` (prefixes) carry a signature frame;
    other topics cost nothing more.
    """

    def __init__(self, endpoint: str | Endpoints, name: str, context: zmq.Context | None = None, *,
                 bind: bool = False, curve: CurveClientKeys | None = FROM_ENV,
                 signing_key: bytes | str | None = FROM_ENV,
                 signed_topics: tuple[str, ...] = SIGNED_TOPICS) -> None:
        """Connect to the broker's publish endpoint (or, with ``bind``, serve subscribers directly)."""
        self._ctx = context or zmq.Context.instance()
        self._curve, self._signing_key = _keys(endpoint, curve, signing_key)
        self._subscribe_endpoint = endpoint.subscribe if isinstance(endpoint, Endpoints) else None
        address = endpoint.publish if isinstance(endpoint, Endpoints) else endpoint
        self._signed = tuple(signed_topics)
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        if bind:
            self._sock.bind(address)
        else:
            self._curve = _connect(self._sock, address, self._curve,
                                   curve is FROM_ENV and not isinstance(endpoint, Endpoints))
        self.name = name
        self.seq = 0

    @property
    def signs(self) -> bool:
        """True if this publisher signs its control topics."""
        return self._signing_key is not None

    def publish(self, topic: str, payload: Mapping[str, Any] | None = None) -> None:
        """Send one message; never blocks (drops at the high-water mark, as PUB does)."""
        self.seq += 1
        topic_frame, body_frame = encode(topic, payload or {}, self.name, self.seq)
        self._sock.send(topic_frame, zmq.SNDMORE)  # two sends: a third of send_multipart's cost
        if self._signing_key is not None and topic.startswith(self._signed):
            self._sock.send(body_frame, zmq.SNDMORE)
            self._sock.send(sign(self._signing_key, topic_frame, body_frame))
        else:
            self._sock.send(body_frame)

    def join(self, subscribe_endpoint: str | None = None, timeout_s: float = 5.0) -> bool:
        """Wait until this publisher's messages reach subscribers (ZeroMQ's slow joiner).

        Publishes a probe on a private topic until it comes back through the broker; by then
        the broker has handed this publisher the subscriptions it holds. True if it came back.
        ``subscribe_endpoint`` defaults to that of the Endpoints this publisher was given.
        """
        subscribe_endpoint = subscribe_endpoint or self._subscribe_endpoint
        if subscribe_endpoint is None:
            raise BusError("Publisher.join needs the subscribe endpoint (or build the Publisher from Endpoints)")
        topic = f"_join.{self.name}.{os.getpid()}.{id(self)}"
        sub = Subscriber(subscribe_endpoint, [topic], context=self._ctx, curve=self._curve, verify_key=None)
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


class MessageChecks:
    """What every subscriber does with a message it read, whatever its socket (threaded or asyncio):
    decode it, check a signed topic's signature and order (with a verify key), count a malformed
    one, count the gaps in each publisher's ``seq`` (a subscriber of every topic), and report
    both once a second. The rules are :class:`Subscriber`'s."""

    def _init_reading(self, verify_key: bytes | None, signed_topics: tuple[str, ...],
                      prefixes: list[str] | tuple[str, ...]) -> None:
        self._verify_key = verify_key
        self._signed = tuple(signed_topics)
        self._guard = ReplayGuard() if verify_key is not None else None
        self.duplicates = 0   #: copies of a state message already taken (last-value replays), skipped
        self.malformed = 0
        self.last_error: MalformedMessage | None = None
        self._malformed_reported = 0
        self._malformed_report_at = float("-inf")
        self._count_gaps = tuple(prefixes or ("",)) == ("",)
        self._created_ns = time.monotonic_ns()
        self._last_seq: dict[str, tuple[int, int]] = {}   # publisher -> (seq, mono_ns) last seen
        self.dropped: dict[str, int] = {}
        self._dropped_reported: dict[str, int] = {}
        self._drop_report_at = float("-inf")

    def _checked(self, frames: list[Any]) -> tuple[str, dict[str, Any]] | None:
        """A message read from the socket: (topic, body), or None when it is skipped (counted)."""
        try:
            topic, body = decode(frames)
            if self._take(topic, body, frames):
                if self._count_gaps:
                    self._count_gap(body)
                return topic, body
            self.duplicates += 1  # a copy of a state message already taken: skipped, not counted
        except MalformedMessage as exc:
            self._note_malformed(exc)
        return None

    def accept(self, frames: list[Any]) -> tuple[str, dict[str, Any]] | None:
        """A message that came inside another (the broker's hand-over of held commands) as if this
        subscriber had read it: decoded and checked by the same rules (a malformed one is counted,
        a copy of a state message taken is skipped); None when it is not taken."""
        try:
            topic, body = decode(frames)
            if self._take(topic, body, frames):
                return topic, body
            self.duplicates += 1
        except MalformedMessage as exc:
            self._note_malformed(exc)
        return None

    def _take(self, topic: str, body: dict[str, Any], frames: list[Any]) -> bool:
        """True to return the message, False to skip a duplicate; raises MalformedMessage for a
        signed topic whose signature fails or that is a replay (with a ``verify_key`` only)."""
        if self._guard is None or not topic.startswith(self._signed):
            return True
        assert self._verify_key is not None
        if not verify(self._verify_key, frames[0], frames[1], frames[2] if len(frames) == 3 else None):
            raise MalformedMessage(f"{FORGED_REASON}: {topic!r} from {body.get('pub')!r} "
                                   "(only the engine's own processes may publish it)", len(frames))
        verdict = self._guard.check(topic, body, time.monotonic_ns())
        if verdict is Verdict.ACCEPT:
            return True
        if verdict is Verdict.DUPLICATE:
            return False
        raise MalformedMessage(f"{REPLAYED_REASON} ({verdict.value}): {topic!r} from {body.get('pub')!r} "
                               f"seq {body.get('seq')!r} (taken before, or too old to be new)", len(frames))

    def _count_gap(self, body: dict[str, Any]) -> None:
        """Count the messages missing between this one and the last of its publisher."""
        seq, pub, mono = body.get("seq"), body.get("pub"), body.get("mono_ns")
        if type(seq) is not int or seq <= 0 or not isinstance(pub, str):
            return  # join probes (seq 0) and bodies without a usable header
        if type(mono) is not int:
            mono = 0
        last = self._last_seq.get(pub)
        if last is None:
            if mono and mono < self._created_ns:
                return  # sent before we subscribed: a last-value-cache replay, not a start point
            if len(self._last_seq) >= MAX_TRACKED_PUBLISHERS:
                del self._last_seq[next(iter(self._last_seq))]  # the one seen longest ago
            self._last_seq[pub] = (seq, mono)
            return
        last_seq, last_mono = last
        if seq > last_seq:
            if seq > last_seq + 1:
                self.dropped[pub] = self.dropped.get(pub, 0) + seq - last_seq - 1
            self._last_seq[pub] = (seq, mono)
        elif mono > last_mono:
            self._last_seq[pub] = (seq, mono)  # restarted under the same name: count from here
        # else: an older message again (a state replay for another subscriber): nothing lost

    def take_drop_report(self, now: float | None = None) -> list[dict[str, Any]] | None:
        """At most once a second: ``[{publisher, count}]`` of the messages lost since the last
        report (seq gaps, see the class docstring), or None if none were or it is too soon."""
        now = time.monotonic() if now is None else now
        if now - self._drop_report_at < REPORT_PERIOD_S:
            return None
        report = [{"publisher": pub, "count": n - self._dropped_reported.get(pub, 0)}
                  for pub, n in self.dropped.items() if n != self._dropped_reported.get(pub, 0)]
        if not report:
            return None
        self._dropped_reported = dict(self.dropped)
        self._drop_report_at = now
        return report

    def _note_malformed(self, error: MalformedMessage | str) -> None:
        self.malformed += 1
        self.last_error = error if isinstance(error, MalformedMessage) else MalformedMessage(error)

    def take_malformed_report(self, now: float | None = None) -> dict[str, Any] | None:
        """At most once a second (``now``: time.monotonic()): ``{count, total, reason}`` of the
        malformed messages since the last report, or None if there were none or it is too soon."""
        now = time.monotonic() if now is None else now
        if self.malformed == self._malformed_reported or now - self._malformed_report_at < REPORT_PERIOD_S:
            return None
        report = {"count": self.malformed - self._malformed_reported, "total": self.malformed,
                  "reason": self.last_error.reason if self.last_error else ""}
        self._malformed_reported = self.malformed
        self._malformed_report_at = now
        return report

    def publish_reports(self, pub: "Publisher | _Publishes", source: str) -> int:
        """Publish what :meth:`take_drop_report` has, one ``bus.dropped`` {subscriber (``pub``'s
        name), publisher, count, total} each, and what :meth:`take_malformed_report` has, as a
        benign ``engine.error`` (code ``malformed_bus_message``) from ``source`` (a subscriber of
        every topic only, see the class docstring); returns the
        number of messages published.
        Call it from the loop that reads this subscriber; it costs nothing when there is nothing."""
        sent = 0
        for drop in self.take_drop_report() or ():
            pub.publish("bus.dropped", {"subscriber": pub.name, "publisher": drop["publisher"], "count": drop["count"],
                                        "total": self.dropped[drop["publisher"]]})
            sent += 1
        # a prefix subscriber's malformed messages are the every-topic subscriber's too: it reports them
        report = self.take_malformed_report() if self._count_gaps else None
        if report is None:
            return sent
        pub.publish("engine.error", {"source": source, "code": "malformed_bus_message", "benign": True,
                                     "count": report["count"], "total": report["total"],
                                     "reason": report["reason"],
                                     "message": f"{source} dropped {report['count']} malformed bus message(s); "
                                                f"last: {report['reason']}"})
        return sent + 1



class Subscriber(MessageChecks):
    """Receives messages whose topic starts with one of ``prefixes`` (all if empty).

    Malformed messages are counted in ``malformed`` and skipped, never raised;
    ``last_error`` describes the latest one. With a ``verify_key``, a message on
    ``signed_topics`` without a valid signature is malformed too (reason
    "forged or unsigned control message") and never returned, and so is a validly signed one
    taken before, or too old to be new (reason "replayed control message"; a copy of the last
    state message taken is skipped without a count: :class:`bus.security.ReplayGuard`).
    Skipping costs no wait:
    ``recv`` goes on to the next message at once (at most :data:`MAX_SKIPPED_PER_RECV`
    per call, so a flood of bad input still gives the caller back control).
    :meth:`take_malformed_report` / :meth:`publish_reports` report them, once a second.
    :meth:`publish_reports` reports them only from a subscriber of every topic: a prefix
    subscriber's malformed message reaches the engine's subscriber of every topic (the
    supervisor's) too, which reports it, so each is reported once (the prefix subscriber still
    counts it in ``malformed``).

    Drops: a subscriber of every topic (``prefixes`` ``("",)``) counts the gaps in each
    publisher's ``seq`` in ``dropped`` (publisher name -> messages lost), which is how a
    drop at any high-water mark on the way shows (ZeroMQ's PUB and XPUB drop silently). A
    prefix subscriber cannot tell a drop from a message its filter left out, so it counts
    nothing. A message sent before this subscriber existed (a last-value-cache replay) does
    not start a count; a lower ``seq`` with a later ``mono_ns`` is a publisher restarted
    under the same name and starts it again. :meth:`take_drop_report` reports them.
    """

    def __init__(self, endpoint: str | Endpoints, prefixes: list[str] | tuple[str, ...] = ("",),
                 context: zmq.Context | None = None, *, curve: CurveClientKeys | None = FROM_ENV,
                 verify_key: bytes | str | None = FROM_ENV,
                 signed_topics: tuple[str, ...] = SIGNED_TOPICS) -> None:
        self._ctx = context or zmq.Context.instance()
        defaulted = curve is FROM_ENV and not isinstance(endpoint, Endpoints)
        curve, verify_key = _keys(endpoint, curve, verify_key)
        self._init_reading(verify_key, signed_topics, prefixes)
        self.socket = self._ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        for p in prefixes or ("",):
            self.socket.setsockopt(zmq.SUBSCRIBE, p.encode())
        _connect(self.socket, endpoint.subscribe if isinstance(endpoint, Endpoints) else endpoint, curve, defaulted)
        self._rcvtimeo_ms = -1

    def recv(self, timeout_ms: int | None = None) -> tuple[str, dict[str, Any]] | None:
        """Next well-formed message, or None when ``timeout_ms`` passes first."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        wait_ms = -1 if timeout_ms is None else max(0, int(timeout_ms))
        skipped = 0
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
                topic, body = decode(frames)
                if self._take(topic, body, frames):
                    if self._count_gaps:
                        self._count_gap(body)
                    return topic, body
                self.duplicates += 1  # a copy of a state message already taken: skipped, not counted
            except MalformedMessage as exc:
                self._note_malformed(exc)
            skipped += 1
            if skipped >= MAX_SKIPPED_PER_RECV:
                return None
            if deadline is not None:  # past the deadline: 0, what is already queued, no wait
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000))

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


class _Loop(Protocol):
    def call_soon_threadsafe(self, callback: Any, *args: Any) -> Any: ...


class _Flag(Protocol):
    def is_set(self) -> bool: ...


def deliver_to_loop(endpoint: str | Endpoints, prefixes: list[str] | tuple[str, ...], loop: _Loop,
                    handler: Any, stop: _Flag, poll_ms: int = 200) -> None:
    """Receive the topics under ``prefixes`` until ``stop`` is set, calling ``handler(topic, body)``
    on ``loop``'s thread for each: a thread's body for an asyncio service (zmq sockets stay on
    the thread that made them). ``stop`` is looked at every ``poll_ms``."""
    sub = Subscriber(endpoint, list(prefixes))
    try:
        while not stop.is_set():
            msg = sub.recv(timeout_ms=poll_ms)
            if msg is not None:
                loop.call_soon_threadsafe(handler, *msg)
    finally:
        sub.close()

"""The bus broker: an XSUB socket publishers connect to, an XPUB socket subscribers
connect to, and a last-value cache for state topics.

Forwarding is libzmq's own proxy (``zmq_proxy_steerable``), running in C in its own
thread: no Python touches a forwarded message. Beside it, the *keeper* (this module's
main loop) sees only two small streams, both filtered by ZeroMQ itself:

- the state topics (``LAST_VALUE_TOPICS``), through a SUB socket on the XPUB side, whose
  last message it keeps;
- every (un)subscription, through an XPUB socket connected to the XSUB side: the XSUB
  forwards subscriptions to every publisher, and the keeper is one. When a new
  subscription matches a kept state topic, the keeper publishes the kept message again,
  so a late subscriber sees the current engine status and session config at once (the
  zguide's last-value cache). When the last subscriber of ``_presence.<owner>`` leaves,
  the keeper publishes ``engine.presence.gone`` with that owner, and names it in every
  hand-over to the realtime process (``gone_owners``) until it subscribes again: a realtime
  process that was down when it left drops its tools all the same.

With an intake (:mod:`bus.intake`; ``engine start`` runs the broker with ``--intake hold``) the
keeper also takes every ``cmd.*``: it acks each command at once on ``cmd.ack`` and holds it
until the realtime process says it took it (in its state, ``conversation.history``, or on
``intake.taken`` when the command changed nothing in it); when that
process subscribes to ``intake.realtime`` (after a crash: its successor), the keeper hands it
every held command, the latest state and the outcomes the realtime process published
(``intake.taken``'s ``outcomes``) in one signed message, and offers again what stays untaken.
While no realtime process is subscribed, the keeper answers a re-send of a command whose
outcome it has with that ``cmd.done`` (``repeated: true``). The broker is the always-alive side
for this because every message passes it anyway: it sees a command the moment it is
published, without a hop, and it already keeps the state and sees the subscription that says
the realtime process is back (docs/architecture.md).

Because the keeper's XPUB holds the new subscription before it hands it up, the replay
cannot be dropped by PUB-side filtering.

Access (bus/security.py): on a tcp endpoint the XSUB and XPUB are CURVE servers and a ZAP
handler accepts only the engine's client key(s); the keeper signs ``engine.presence.gone`` and
``intake.realtime`` with the engine's signing key, keeps a signed state topic only when its
signature checks out (an unsigned copy from a client never replaces the engine's state), and
replays kept messages with the signature they came with.
``python -m bus.broker`` takes its keys from ``$REALTALK_BUS_KEYS``.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import zmq

from bus.intake import Intake, Mode
from bus.security import (SIGNED_TOPICS, apply_server_curve, environment_keys, parse_signing_key, sign,
                          start_authenticator, verify)
from bus.wire import (DONE_TOPIC, INTAKE_TOPIC, LAST_VALUE_TOPICS, STATE_TOPIC, TAKEN_TOPIC, MalformedMessage,
                      decode, encode)

_STATE_TOPICS = frozenset(t.encode() for t in LAST_VALUE_TOPICS)
_STATE = STATE_TOPIC.encode()
_TAKEN = TAKEN_TOPIC.encode()
_INTAKE_SUBSCRIBE = b"\x01" + INTAKE_TOPIC.encode()
_INTAKE_UNSUBSCRIBE = b"\x00" + INTAKE_TOPIC.encode()
#: a client that subscribes to ``_presence.<owner>`` is announced gone (``engine.presence.gone``)
#: when that subscription disappears, e.g. because the client's process ended
PRESENCE_PREFIX = b"_presence."
#: owners gone that a hand-over names at most (the newest)
GONE_OWNERS_KEPT = 256
#: per pipe (each publisher into the XSUB, each subscriber out of the XPUB): past it the XPUB
#: drops that subscriber's messages (it sees the gaps in ``seq``). A queued message costs the
#: broker far more than its size: libzmq decodes into shared 8 kB receive buffers, each with a
#: slot table beside it, and a buffer lives while any of its messages is queued. Measured with
#: 1 kB messages and a subscriber that stops reading: 2.3-4.7 kB a queued message, so at 10,000
#: the broker's peak grew 19-47 MB (tests/test_bus_slow.py); at 5,000, 11-23 MB (14 runs). A subscriber's
#: own process holds far more (bus.Subscriber's RCVHWM is 100,000).
_HWM = 5_000
#: after a crash, how long the new broker takes subscribers only: 2.5 reconnect intervals of a foreign
#: subscriber (ZeroMQ's default, 100 ms; the engine's own sockets retry every 10 ms on ipc)
RESTART_GRACE_S = 0.25
#: how often an idle keeper checks whether the queues' memory can go back to the system
TRIM_PERIOD_S = 5.0
#: RSS growth over the broker's start that makes the keeper call malloc_trim
TRIM_OVER_BYTES = 8 << 20
try:
    _libc: Any = ctypes.CDLL("libc.so.6")
except OSError:  # pragma: no cover (not glibc)
    _libc = None
_broker_ids = itertools.count()


def run_broker(publish_endpoint: str, subscribe_endpoint: str, *, ready_fd: int | None = None,
               context: zmq.Context | None = None, stop_endpoint: str | None = None,
               curve_server: tuple[bytes, bytes] | None = None, curve_clients: list[bytes] | None = None,
               signing_key: bytes | None = None, resubscribe_grace_s: float = 0.0,
               intake: Mode | None = None) -> None:
    """Forward messages until SIGTERM/SIGINT (or a message on ``stop_endpoint``).

    ``publish_endpoint`` is where clients publish (XSUB binds there), ``subscribe_endpoint``
    where they subscribe (XPUB). If ``ready_fd`` is given, one byte is written to it once
    both sockets are bound. ``curve_server`` (public, secret; Z85) makes tcp endpoints CURVE
    servers that accept only ``curve_clients`` (Z85 public keys); a tcp endpoint without it
    is open to anyone who can reach the port. ``signing_key`` signs what the broker publishes.
    ``resubscribe_grace_s`` (a restart): the subscribe side is bound that long before the
    publish side, so that subscribers are back before publishers send what they queued.
    ``intake``: take commands (:mod:`bus.intake`): ack each at once, and with ``Mode.HOLD``
    hold it for the realtime process.
    """
    ctx = context or zmq.Context.instance()
    auth = None
    if curve_server is not None:
        if not curve_clients:
            raise ValueError("run_broker: curve_server needs the client public keys to accept (curve_clients)")
        auth = start_authenticator(ctx, curve_clients)
    inproc = f"inproc://realtalk-broker-{os.getpid()}-{next(_broker_ids)}"
    xsub = ctx.socket(zmq.XSUB)
    xpub = ctx.socket(zmq.XPUB)
    control_out = ctx.socket(zmq.PAIR)
    control_in = ctx.socket(zmq.PAIR)
    keeper_pub = ctx.socket(zmq.XPUB)  # a publisher on the XSUB side: sees every subscription
    keeper_sub = ctx.socket(zmq.SUB)   # a subscriber on the XPUB side: sees the state topics
    stop = ctx.socket(zmq.PULL) if stop_endpoint else None
    sockets = [s for s in (xsub, xpub, control_out, control_in, keeper_pub, keeper_sub, stop) if s is not None]
    for s in sockets:
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, _HWM)
        s.setsockopt(zmq.RCVHWM, _HWM)
    xpub.setsockopt(zmq.XPUB_VERBOSE, 1)        # pass every subscription up, also repeated ones
    if curve_server is not None:
        for server, endpoint in ((xsub, publish_endpoint), (xpub, subscribe_endpoint)):
            if endpoint.startswith("tcp://"):
                apply_server_curve(server, *curve_server)
    keeper_pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # so that each new subscriber gets its replay
    xpub.bind(subscribe_endpoint)
    xpub.bind(inproc + "-sub")
    if resubscribe_grace_s > 0:
        # a restart: subscribers reconnect (every 100 ms) and subscribe again before the
        # publishers' queued messages may come in; else those went to no one (the XPUB drops
        # what matches no subscription yet): up to the whole outage, counted only as seq gaps
        time.sleep(resubscribe_grace_s)
    xsub.bind(publish_endpoint)
    xsub.bind(inproc + "-pub")
    control_in.bind(inproc + "-control")
    control_out.connect(inproc + "-control")
    if stop is not None:
        stop.bind(stop_endpoint)
    proxy = threading.Thread(target=_forward, args=(xsub, xpub, control_in), name="broker-proxy", daemon=True)
    proxy.start()
    keeper_pub.connect(inproc + "-pub")
    keeper_sub.connect(inproc + "-sub")
    for topic in LAST_VALUE_TOPICS:
        keeper_sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    if intake is not None:
        keeper_sub.setsockopt(zmq.SUBSCRIBE, b"cmd.")
        keeper_sub.setsockopt(zmq.SUBSCRIBE, _TAKEN)
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)

    running = True

    def _stop(_signo: int, _frame: object) -> None:
        nonlocal running
        running = False

    if stop is None:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    try:
        _keep(keeper_pub, keeper_sub, stop, lambda: running, signing_key,
              Intake(intake) if intake is not None else None)
    finally:
        control_out.send(b"TERMINATE")
        proxy.join(5)
        for s in sockets:
            s.close(0)
        if auth is not None:
            auth.stop()


def _forward(xsub: zmq.Socket, xpub: zmq.Socket, control: zmq.Socket) -> None:
    try:
        zmq.proxy_steerable(xsub, xpub, None, control)
    except zmq.ContextTerminated:
        pass


def _drain(recv: Callable[[int], Any]) -> Iterator[Any]:
    """What ``recv`` has waiting, without blocking."""
    while True:
        try:
            yield recv(zmq.NOBLOCK)
        except zmq.Again:
            return


class _Keeper:
    """The keeper's state: the last-value cache, the intake, its own publisher name and seq."""

    def __init__(self, keeper_pub: zmq.Socket, keeper_sub: zmq.Socket, signing_key: bytes | None,
                 intake: Intake | None) -> None:
        self.pub = keeper_pub
        self.sub = keeper_sub
        self.signing_key = signing_key
        self.intake = intake
        self.cache: dict[bytes, list[bytes]] = {}
        self.state_mark: tuple[Any, int] | None = None   #: (core, state_seq) of the kept state message
        self.intake_subscribed = False
        #: owners whose presence subscription ended and has not come back (the newest GONE_OWNERS_KEPT):
        #: in every hand-over, so a realtime process that was down when they left drops their tools
        self.gone_owners: dict[str, None] = {}
        self.seq = 0
        self.name = f"broker:{os.getpid()}"   # a restarted broker is another publisher (replay protection orders by it)

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.seq += 1
        frames = encode(topic, payload, self.name, self.seq)
        if self.signing_key is not None and topic.startswith(SIGNED_TOPICS):
            frames.append(sign(self.signing_key, *frames))
        self.pub.send_multipart(frames)

    def _genuine(self, frames: list[bytes]) -> bool:
        """A signed topic's message is kept only with a valid signature (when the broker has the key)."""
        if self.signing_key is None or not frames[0].decode(errors="replace").startswith(SIGNED_TOPICS):
            return True
        return len(frames) == 3 and verify(self.signing_key, frames[0], frames[1], frames[2])

    def take_messages(self) -> None:
        """Everything waiting on the keeper's SUB: state topics and (with an intake) commands."""
        for frames in _drain(self.sub.recv_multipart):
            if len(frames) not in (2, 3):   # 3: with its signature
                continue
            if frames[0] in _STATE_TOPICS:
                self._state(frames)
            elif self.intake is not None and frames[0].startswith(b"cmd."):
                self._command(frames)
            elif self.intake is not None and frames[0] == _TAKEN and self._genuine(frames):
                try:
                    self.intake.state(decode(frames)[1])
                except MalformedMessage:
                    pass

    def _state(self, frames: list[bytes]) -> None:
        if not self._genuine(frames):
            return   # a forged state message: never kept, never replayed (the engine's processes report it)
        if frames[0] != _STATE:
            self.cache[frames[0]] = frames
            return
        try:
            _, body = decode(frames)
        except MalformedMessage:
            return
        mark = (body.get("core"), body.get("state_seq"))
        if isinstance(mark[1], int) and self.state_mark is not None and mark[0] == self.state_mark[0] \
                and mark[1] < self.state_mark[1]:
            pass   # an older state of the same process, sent by another of its threads after a newer one
        else:
            self.cache[frames[0]] = frames
            self.state_mark = (mark[0], mark[1]) if isinstance(mark[1], int) else None
        if self.intake is not None:
            self.intake.state(body)

    def _command(self, frames: list[bytes]) -> None:
        assert self.intake is not None
        try:
            topic, body = decode(frames)
        except MalformedMessage:
            return   # the realtime process counts and reports it
        ack = self.intake.command(topic, body, frames, time.monotonic())
        if ack is not None:
            self.publish("cmd.ack", ack)
        done = None if self.intake_subscribed else self.intake.answer(topic, body)
        if done is not None:   # a re-send while the realtime process restarts: the outcome it published
            self.publish(DONE_TOPIC, done)

    def subscription(self, sub: bytes) -> None:
        """A (un)subscription the XSUB passed up."""
        if sub == _INTAKE_SUBSCRIBE and self.intake is not None:
            self.intake_subscribed = True
            self.take_messages()   # commands already forwarded to us are in the hand-over too
            for owner in self.gone_owners:   # a register of a gone owner that came after it left
                self.intake.drop_owner(owner)
            state = self.cache.get(_STATE)
            self.publish(INTAKE_TOPIC, {"restore": True, "state": state,
                                        "commands": self.intake.handover(time.monotonic()),
                                        "outcomes": dict(self.intake.outcomes),
                                        "gone_owners": list(self.gone_owners)})
        elif sub == _INTAKE_UNSUBSCRIBE:
            self.intake_subscribed = False
        elif sub[:1] == b"\x01":
            if sub[1:].startswith(PRESENCE_PREFIX):   # an owner (back) at its presence topic
                self.gone_owners.pop(sub[1 + len(PRESENCE_PREFIX):].decode(errors="replace"), None)
            for frames in list(self.cache.values()):
                if frames[0].startswith(sub[1:]):
                    self.pub.send_multipart(frames)
        elif sub[:1] == b"\x00" and sub[1:].startswith(PRESENCE_PREFIX):
            # the last subscriber of a presence topic left: its owner is gone
            owner = sub[1 + len(PRESENCE_PREFIX):].decode(errors="replace")
            self.gone_owners[owner] = None
            if self.intake is not None:
                self.intake.drop_owner(owner)   # a register it sent while no realtime process ran
            while len(self.gone_owners) > GONE_OWNERS_KEPT:
                del self.gone_owners[next(iter(self.gone_owners))]
            self.publish("engine.presence.gone", {"owner": owner})

    def serve(self, subscriptions: list[bytes]) -> None:
        """One poll's work, in the order that keeps both promises:

        1. the intake's (un)subscriptions, so that a command that came in the same poll is
           answered by the one side that is there (:meth:`Intake.answer`; the hand-over takes
           the commands waiting before it is sent);
        2. the messages waiting (state topics, commands);
        3. the other subscriptions, so that a replay is of the newest state: the proxy puts a
           state message in every subscriber's queue at once, so one a subscriber has already
           read may be waiting here behind the late subscription that asks for it.
        """
        intake = [s for s in subscriptions if s in (_INTAKE_SUBSCRIBE, _INTAKE_UNSUBSCRIBE)]
        for sub in intake:
            self.subscription(sub)
        self.take_messages()
        for sub in subscriptions:
            if sub not in intake:
                self.subscription(sub)
        self.offer_again()

    def offer_again(self) -> None:
        """Offer the held commands that are still not taken (the realtime process de-duplicates)."""
        if self.intake is None or not self.intake_subscribed:
            return
        due = self.intake.due(time.monotonic())
        if due:
            self.publish(INTAKE_TOPIC, {"restore": False, "state": None, "commands": due})

    def wait_ms(self) -> int:
        """How long the poll may wait: the next re-offer, at most 500 ms."""
        due = self.intake.next_due() if self.intake is not None and self.intake_subscribed else None
        if due is None:
            return 500
        return max(0, min(500, int((due - time.monotonic()) * 1000) + 1))


def _keep(keeper_pub: zmq.Socket, keeper_sub: zmq.Socket, stop: zmq.Socket | None,
          running: Callable[[], bool], signing_key: bytes | None = None, intake: Intake | None = None) -> None:
    """The last-value cache, presence and command intake loop (see the module docstring)."""
    keeper = _Keeper(keeper_pub, keeper_sub, signing_key, intake)
    base_rss = _rss_bytes()
    next_trim = time.monotonic() + TRIM_PERIOD_S
    poller = zmq.Poller()
    poller.register(keeper_pub, zmq.POLLIN)
    poller.register(keeper_sub, zmq.POLLIN)
    if stop is not None:
        poller.register(stop, zmq.POLLIN)
    while running():
        try:
            events = dict(poller.poll(keeper.wait_ms()))
        except zmq.ZMQError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if stop is not None and stop in events:
            return
        if not events and time.monotonic() >= next_trim:
            # a drained queue's memory stays in glibc's arenas (the proxy thread's) unless trimmed
            next_trim = time.monotonic() + TRIM_PERIOD_S
            if _libc is not None and _rss_bytes() > base_rss + TRIM_OVER_BYTES:
                _libc.malloc_trim(0)
        keeper.serve(list(_drain(keeper_pub.recv)) if keeper_pub in events else [])


def _rss_bytes() -> int:
    """This process's resident set size (0 if /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


USAGE = "usage: python -m bus.broker PUBLISH_ENDPOINT SUBSCRIBE_ENDPOINT [--restart] [--intake hold|ack]"


def main(argv: list[str] | None = None) -> int:
    """``python -m bus.broker PUBLISH_ENDPOINT SUBSCRIBE_ENDPOINT [--restart] [--intake hold|ack]``

    ``--restart``: the engine's broker is started again after a crash; it waits
    :data:`RESTART_GRACE_S` for the subscribers before it takes publishers' messages.
    ``--intake``: take commands (:mod:`bus.intake`): ``hold`` them for the realtime process
    (``engine start``), or only ``ack`` them (``engine phone``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    restart = "--restart" in args
    args = [a for a in args if a != "--restart"]
    intake = None
    if "--intake" in args:
        at = args.index("--intake")
        try:
            intake = Mode(args[at + 1])
        except (IndexError, ValueError):
            print(USAGE, file=sys.stderr)
            return 2
        del args[at:at + 2]
    if len(args) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    keys = environment_keys()
    server = (keys["curve_server_key"].encode(), keys["curve_server_secret"].encode()) \
        if keys.get("curve_server_secret") else None
    run_broker(args[0], args[1], curve_server=server,
               curve_clients=[keys["curve_public_key"].encode()] if server else None,
               signing_key=parse_signing_key(keys.get("signing_key")),
               resubscribe_grace_s=RESTART_GRACE_S if restart else 0.0, intake=intake)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
  the keeper publishes ``engine.presence.gone`` with that owner.

Because the keeper's XPUB holds the new subscription before it hands it up, the replay
cannot be dropped by PUB-side filtering.

Access (bus/security.py): on a tcp endpoint the XSUB and XPUB are CURVE servers and a ZAP
handler accepts only the engine's client key(s); the keeper signs ``engine.presence.gone``
with the engine's signing key, and replays kept messages with the signature they came with.
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

from bus.security import SIGNED_TOPICS, apply_server_curve, environment_keys, parse_signing_key, sign, start_authenticator
from bus.wire import LAST_VALUE_TOPICS, encode

_STATE_TOPICS = frozenset(t.encode() for t in LAST_VALUE_TOPICS)
#: a client that subscribes to ``_presence.<owner>`` is announced gone (``engine.presence.gone``)
#: when that subscription disappears, e.g. because the client's process ended
PRESENCE_PREFIX = b"_presence."
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
               signing_key: bytes | None = None, resubscribe_grace_s: float = 0.0) -> None:
    """Forward messages until SIGTERM/SIGINT (or a message on ``stop_endpoint``).

    ``publish_endpoint`` is where clients publish (XSUB binds there), ``subscribe_endpoint``
    where they subscribe (XPUB). If ``ready_fd`` is given, one byte is written to it once
    both sockets are bound. ``curve_server`` (public, secret; Z85) makes tcp endpoints CURVE
    servers that accept only ``curve_clients`` (Z85 public keys); a tcp endpoint without it
    is open to anyone who can reach the port. ``signing_key`` signs what the broker publishes.
    ``resubscribe_grace_s`` (a restart): the subscribe side is bound that long before the
    publish side, so that subscribers are back before publishers send what they queued.
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
        _keep(keeper_pub, keeper_sub, stop, lambda: running, signing_key)
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


def _keep(keeper_pub: zmq.Socket, keeper_sub: zmq.Socket, stop: zmq.Socket | None,
          running: Callable[[], bool], signing_key: bytes | None = None) -> None:
    """The last-value cache and presence loop (see the module docstring)."""
    cache: dict[bytes, list[bytes]] = {}
    seq = 0
    name = f"broker:{os.getpid()}"   # a restarted broker is another publisher (replay protection orders by it)
    base_rss = _rss_bytes()
    next_trim = time.monotonic() + TRIM_PERIOD_S
    poller = zmq.Poller()
    poller.register(keeper_pub, zmq.POLLIN)
    poller.register(keeper_sub, zmq.POLLIN)
    if stop is not None:
        poller.register(stop, zmq.POLLIN)
    while running():
        try:
            events = dict(poller.poll(500))
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
        if keeper_sub in events:
            for frames in _drain(keeper_sub.recv_multipart):
                if len(frames) in (2, 3) and frames[0] in _STATE_TOPICS:  # 3: with its signature
                    cache[frames[0]] = frames
        if keeper_pub in events:
            for sub in _drain(keeper_pub.recv):
                if sub[:1] == b"\x01":
                    for frames in list(cache.values()):
                        if frames[0].startswith(sub[1:]):
                            keeper_pub.send_multipart(frames)
                elif sub[:1] == b"\x00" and sub[1:].startswith(PRESENCE_PREFIX):
                    # the last subscriber of a presence topic left: its owner is gone
                    seq += 1
                    owner = sub[1 + len(PRESENCE_PREFIX):].decode(errors="replace")
                    frames = encode("engine.presence.gone", {"owner": owner}, name, seq)
                    if signing_key is not None and frames[0].decode().startswith(SIGNED_TOPICS):
                        frames.append(sign(signing_key, *frames))
                    keeper_pub.send_multipart(frames)


def _rss_bytes() -> int:
    """This process's resident set size (0 if /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bus.broker PUBLISH_ENDPOINT SUBSCRIBE_ENDPOINT [--restart]``

    ``--restart``: the engine's broker is started again after a crash; it waits
    :data:`RESTART_GRACE_S` for the subscribers before it takes publishers' messages."""
    args = sys.argv[1:] if argv is None else argv
    restart = "--restart" in args
    args = [a for a in args if a != "--restart"]
    if len(args) != 2:
        print("usage: python -m bus.broker PUBLISH_ENDPOINT SUBSCRIBE_ENDPOINT [--restart]", file=sys.stderr)
        return 2
    keys = environment_keys()
    server = (keys["curve_server_key"].encode(), keys["curve_server_secret"].encode()) \
        if keys.get("curve_server_secret") else None
    run_broker(args[0], args[1], curve_server=server,
               curve_clients=[keys["curve_public_key"].encode()] if server else None,
               signing_key=parse_signing_key(keys.get("signing_key")),
               resubscribe_grace_s=RESTART_GRACE_S if restart else 0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

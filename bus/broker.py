"""The bus broker: an XSUB socket publishers connect to, an XPUB socket subscribers
connect to, and a last-value cache for state topics.

Forwarding is stateless, as in the zguide's XSUB/XPUB proxy, except for state topics
(``LAST_VALUE_TOPICS``): the broker keeps the last message of each, and when a new
subscription arrives whose prefix matches one, re-sends it so that a late subscriber
sees the current engine status and session config at once.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Iterable

import zmq

from bus.wire import encode

#: topics whose last message is replayed to new subscribers (prefix match)
LAST_VALUE_TOPICS = ("engine.status", "session.config", "cost.session", "engine.tools")
_BATCH = 256
#: a client that subscribes to ``_presence.<owner>`` is announced gone (``engine.presence.gone``)
#: when that subscription disappears, e.g. because the client's process ended
PRESENCE_PREFIX = b"_presence."


def _is_state_topic(topic: bytes) -> bool:
    return any(topic == t.encode() for t in LAST_VALUE_TOPICS)


def run_broker(publish_endpoint: str, subscribe_endpoint: str, *, ready_fd: int | None = None,
               context: zmq.Context | None = None, stop_endpoint: str | None = None) -> None:
    """Forward messages until SIGTERM/SIGINT (or a message on ``stop_endpoint``).

    ``publish_endpoint`` is where clients publish (XSUB binds there), ``subscribe_endpoint``
    where they subscribe (XPUB). If ``ready_fd`` is given, one byte is written to it once
    both sockets are bound.
    """
    ctx = context or zmq.Context.instance()
    xsub = ctx.socket(zmq.XSUB)
    xpub = ctx.socket(zmq.XPUB)
    for s in (xsub, xpub):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
    xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscription, also repeated ones
    xsub.bind(publish_endpoint)
    xpub.bind(subscribe_endpoint)
    stop = ctx.socket(zmq.PULL) if stop_endpoint else None
    if stop is not None:
        stop.bind(stop_endpoint)
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

    cache: dict[bytes, list[bytes]] = {}
    seq = 0
    poller = zmq.Poller()
    poller.register(xsub, zmq.POLLIN)
    poller.register(xpub, zmq.POLLIN)
    if stop is not None:
        poller.register(stop, zmq.POLLIN)
    try:
        while running:
            try:
                events = dict(poller.poll(500))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    continue
                raise
            if stop is not None and stop in events:
                break
            if xsub in events:
                for _ in range(_BATCH):
                    try:
                        frames = xsub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frames and _is_state_topic(frames[0]):
                        cache[frames[0]] = frames
                    xpub.send_multipart(frames)
            if xpub in events:
                for _ in range(_BATCH):
                    try:
                        sub = xpub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    xsub.send(sub)  # forward (un)subscriptions upstream
                    if sub[:1] == b"\x01":
                        _replay(xpub, cache.values(), sub[1:])
                    elif sub[:1] == b"\x00" and sub[1:].startswith(PRESENCE_PREFIX):
                        # the last subscriber of a presence topic left: its owner is gone
                        seq += 1
                        owner = sub[1 + len(PRESENCE_PREFIX):].decode(errors="replace")
                        xpub.send_multipart(encode("engine.presence.gone", {"owner": owner}, "broker", seq))
    finally:
        for s in (xsub, xpub, stop):
            if s is not None:
                s.close(0)


def _replay(xpub: zmq.Socket, cached: Iterable[list[bytes]], prefix: bytes) -> None:
    for frames in list(cached):
        if frames[0].startswith(prefix):
            xpub.send_multipart(frames)


def main(argv: list[str] | None = None) -> int:
    """``python -m bus.broker PUBLISH_ENDPOINT SUBSCRIBE_ENDPOINT``"""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bus.broker PUBLISH_ENDPOINT SUBSCRIBE_ENDPOINT", file=sys.stderr)
        return 2
    run_broker(args[0], args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""realtalk's message bus: msgpack messages over ZeroMQ pub/sub, through a broker.

Wire format (stable, see docs/bus-protocol.md): a two-frame multipart message
``[topic (utf-8), body (msgpack map)]``. The body always carries ``v`` (protocol
version), ``ts`` (unix seconds, float), ``mono_ns`` (CLOCK_MONOTONIC ns), ``pub``
(publisher name) and ``seq`` (per-publisher sequence number); the rest of the
map is the topic's payload.

Control topics (``SIGNED_TOPICS``) carry a third frame, an HMAC signature, when the engine's
processes publish them; tcp transports need CURVE keys (bus/security.py).

Commands (``cmd.*``) are taken by the broker first (:mod:`bus.intake`): acked at once on
``cmd.ack``, held for the realtime process, their outcome on ``cmd.done``. For asyncio programs,
:mod:`bus.aio` has the publisher, the subscriber and ``BusClient.call``, the one way to send a
command (imported on its own: the engine's processes do not load asyncio).

Errors: every error this package raises is a :class:`BusError`.
"""
from bus.wire import PROTOCOL_VERSION, BusError, MalformedMessage, encode, decode
from bus.client import Publisher, Subscriber, Endpoints, load_endpoints, endpoints_from, use_keys
from bus.security import SIGNED_TOPICS, BusKeys, generate_keys

__all__ = [
    "PROTOCOL_VERSION", "BusError", "MalformedMessage", "encode", "decode",
    "Publisher", "Subscriber", "Endpoints", "load_endpoints", "endpoints_from", "use_keys",
    "SIGNED_TOPICS", "BusKeys", "generate_keys",
]

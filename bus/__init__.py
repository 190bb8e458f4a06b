"""realtalk's message bus: msgpack messages over ZeroMQ pub/sub, through a broker.

Wire format (stable, see docs/bus-protocol.md): a two-frame multipart message
``[topic (utf-8), body (msgpack map)]``. The body always carries ``v`` (protocol
version), ``ts`` (unix seconds, float), ``mono_ns`` (CLOCK_MONOTONIC ns), ``pub``
(publisher name) and ``seq`` (per-publisher sequence number); the rest of the
map is the topic's payload.

Errors: every error this package raises is a :class:`BusError`.
"""
from bus.wire import PROTOCOL_VERSION, BusError, MalformedMessage, encode, decode
from bus.client import Publisher, Subscriber, Endpoints, load_endpoints

__all__ = [
    "PROTOCOL_VERSION", "BusError", "MalformedMessage", "encode", "decode",
    "Publisher", "Subscriber", "Endpoints", "load_endpoints",
]

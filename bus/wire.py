"""Encode and decode bus messages. Pure functions, no sockets.

A message is ``[topic, body]``: topic is a UTF-8 string of dot-separated words
(``model.text.delta``), body a msgpack map. Readers ignore keys they do not know. A signed
control message has a third frame, its signature (bus/security.py); :func:`decode` accepts
and ignores it, verifying is the subscriber's job.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import msgpack

PROTOCOL_VERSION = 1
MAX_TOPIC_BYTES = 256

#: keys every body carries; payload keys must not collide with them
HEADER_KEYS = ("v", "ts", "mono_ns", "pub", "seq")
#: state topics: the broker keeps each one's last message and replays it to new subscribers (exact topic)
LAST_VALUE_TOPICS = ("engine.status", "session.config", "cost.session", "engine.tools", "conversation.history")


class BusError(Exception):
    """Base of every error raised by the bus package."""


class MalformedMessage(BusError):
    """A message that is not ``[utf-8 topic, msgpack map]``; ``reason`` says why."""

    def __init__(self, reason: str, frames: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frames = frames


def encode(topic: str, payload: Mapping[str, Any], publisher: str, seq: int) -> list[bytes]:
    """Return the two frames of a message; header keys are added in front of ``payload``."""
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "ts": time.time(),
        "mono_ns": time.monotonic_ns(),
        "pub": publisher,
        "seq": seq,
    }
    body.update(payload)
    return [topic.encode(), msgpack.packb(body, use_bin_type=True)]


def decode(frames: list[bytes]) -> tuple[str, dict[str, Any]]:
    """Parse ``[topic, body]`` or ``[topic, body, signature]``; raise :class:`MalformedMessage`
    naming the problem. The signature frame is not checked here."""
    if len(frames) not in (2, 3):
        raise MalformedMessage(f"expected 2 frames [topic, msgpack body] (3 with a signature), got {len(frames)}",
                               len(frames))
    raw_topic, raw_body = frames[0], frames[1]
    if len(raw_topic) > MAX_TOPIC_BYTES:
        raise MalformedMessage(f"topic longer than {MAX_TOPIC_BYTES} bytes", len(frames))
    try:
        topic = bytes(raw_topic).decode()
    except UnicodeDecodeError:
        raise MalformedMessage("topic is not valid UTF-8", len(frames)) from None
    try:
        body = msgpack.unpackb(raw_body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedMessage(f"body of {topic!r} is not msgpack ({type(exc).__name__})", len(frames)) from None
    if not isinstance(body, dict):
        raise MalformedMessage(f"body of {topic!r} is a {type(body).__name__}, expected a map", len(frames))
    return topic, body

"""Encode and decode bus messages. Pure functions, no sockets.

A message is ``[topic, body]``: topic is a UTF-8 string of dot-separated words
(``model.text.delta``), body a msgpack map. Readers ignore keys they do not know. A signed
control message has a third frame, its signature (bus/security.py); :func:`decode` accepts
and ignores it, verifying is the subscriber's job.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Mapping, TypeVar

import msgpack

#: 2: commands are acked at once by the broker's intake (``cmd.ack`` with a ``state``), their outcome comes
#: on ``cmd.done`` (docs/bus-protocol.md, "Changes"); readers take any version and ignore keys they do not know
PROTOCOL_VERSION = 2
MAX_TOPIC_BYTES = 256
#: a body nested deeper than this (maps and arrays inside each other) is malformed: msgpack decodes
#: about 1,000 levels, where Python's json (the event log) and recursive readers fail
MAX_DEPTH = 64

#: keys every body carries; payload keys must not collide with them
HEADER_KEYS = ("v", "ts", "mono_ns", "pub", "seq")
#: state topics: the broker keeps each one's last message and replays it to new subscribers (exact topic)
LAST_VALUE_TOPICS = ("engine.status", "session.config", "cost.session", "engine.tools", "conversation.history")
#: the commands the realtime process carries out (docs/bus-protocol.md, "Commands"); the broker's intake
#: acks each at once and holds it until that process has taken it
COMMAND_TOPICS = ("cmd.say", "cmd.respond", "cmd.cancel", "cmd.input.commit", "cmd.input.clear", "cmd.mic",
                  "cmd.session.update", "cmd.tool.register", "cmd.tool.unregister", "cmd.tool.result",
                  "cmd.instructions", "cmd.commentary",   # GPT-Live context (docs/live.md)
                  "cmd.sip.refer", "cmd.sip.hangup", "cmd.dtmf")   # a SIP call's control (engine sip, docs/sip.md)
#: a command's receipt, at once: ``id``, ``ok``, ``state`` (queued, accepted, taken, refused), ``topic``
ACK_TOPIC = "cmd.ack"
#: a command's outcome, from the process that carried it out: ``id``, ``ok``, ``item_id`` or ``error``, ...
DONE_TOPIC = "cmd.done"
#: the broker hands held commands (and the conversation state) to the realtime process on this topic
INTAKE_TOPIC = "intake.realtime"
#: the realtime process's state, a last-value topic: the conversation and the commands it has taken
STATE_TOPIC = "conversation.history"
#: the realtime process took commands that changed nothing in its state (signed): the broker lets them go
TAKEN_TOPIC = "intake.taken"
#: the longest command ``id`` taken (a longer one is refused)
MAX_ID_CHARS = 200


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
    if _too_deep(body):
        raise MalformedMessage(f"body of {topic!r} is nested more than {MAX_DEPTH} levels deep", len(frames))
    return topic, body


def _too_deep(body: dict[str, Any]) -> bool:
    """Whether maps and arrays nest more than MAX_DEPTH levels in ``body`` (no recursion)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False


def command_key(body: Mapping[str, Any]) -> str | None:
    """What identifies a command for de-duplication: its ``id``, else its publisher and ``seq``
    (``"<pub>#<seq>"``: one message, so a re-sent command without an id is a new one); None
    when it has neither."""
    cmd_id = body.get("id")
    if isinstance(cmd_id, str) and cmd_id:
        return cmd_id
    pub, seq = body.get("pub"), body.get("seq")
    if isinstance(pub, str) and type(seq) is int:
        return f"{pub}#{seq}"
    return None


def id_problem(body: Mapping[str, Any]) -> str | None:
    """Why a command's ``id`` cannot be taken (None: it is fine, or there is none)."""
    if "id" not in body or body["id"] is None:
        return None
    cmd_id = body["id"]
    if not isinstance(cmd_id, str) or not cmd_id:
        return f"'id' must be a non-empty string (got {type(cmd_id).__name__}); send a fresh one, e.g. a UUID"
    if len(cmd_id) > MAX_ID_CHARS:
        return f"'id' is {len(cmd_id)} characters; at most {MAX_ID_CHARS}"
    return None


def id_reused_error(cmd_id: str, first_topic: str, topic: str) -> str:
    """Why a command under an id a command of another topic took was not carried out."""
    return (f"the id {cmd_id!r} was taken already by a {first_topic} command, so this {topic} was not carried "
            "out: give each command an id of its own")


_K = TypeVar("_K")
_V = TypeVar("_V")


def remember_newest(table: OrderedDict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """``table[key] = value`` as the newest entry; the oldest past ``limit`` forgotten (the bounded
    memories of command ids and outcomes, on both sides of the intake)."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


def outcome_of(key: Any, rec: Any) -> dict[str, Any] | None:
    """The ``cmd.done`` of one ``outcomes`` entry of ``intake.taken`` (``key`` -> ``topic``,
    ``done``), or None when the entry is not one."""
    if not isinstance(key, str) or not isinstance(rec, Mapping):
        return None
    done, topic = rec.get("done"), rec.get("topic")
    if not isinstance(done, Mapping) or done.get("id") != key or not (topic is None or isinstance(topic, str)):
        return None
    return dict(done)

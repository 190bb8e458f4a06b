"""The console's bus side: one ZeroMQ SUB socket of every topic, read on the web server's event
loop by its tick (every :data:`BATCH_S`, 60 ms, while a page is open, :data:`IDLE_BATCH_S` otherwise:
the console wakes on a timer, not once per message), and the few commands the page may send.

Forwarding costs no decoding: each bus message goes to the page as it came, its topic and its
msgpack body, as one record of a binary batch (:func:`encode_record`, :func:`encode_batch`;
the format is in docs/console.md, "The events socket"). The page decodes msgpack itself
(``static/wire.js``). The relay decodes only ``cmd.ack`` bodies, and only while one of its
commands waits for its ack.

Bounded everywhere, and the engine never waits for it: the subscriber is one more SUB socket
(the broker drops for it alone if it falls behind, never for the engine), the relay keeps the
latest :data:`BACKLOG` messages for pages that open later, and each page has its own bounded
queue (:class:`PageQueue`) whose oldest messages are dropped, and counted, when that page is
slow. Commands are published at once and re-sent every 0.5 s until their ``cmd.ack`` comes
(the engine deduplicates by id), for at most 10 s. The listen and talk switches
(``console.listen``, ``console.mic.source``: leases the console renews every second, no ack)
go out once each (:meth:`BusRelay.publish`). Everything here runs on the event loop's thread.
"""
from __future__ import annotations

import os
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import msgpack
import zmq

from bus import Endpoints, Publisher, Subscriber
from bus.security import SIGNED_TOPICS
from bus.wire import LAST_VALUE_TOPICS, MAX_TOPIC_BYTES
from engine.errors import EngineError

_STATE_TOPICS = frozenset(t.encode() for t in LAST_VALUE_TOPICS)
_SIGNED = tuple(t.encode() for t in SIGNED_TOPICS)
SUPERVISOR_PREFIX = "supervisor:"   #: the supervisor's publisher name (engine/supervisor/process.py)
#: topics the session's log holds but a page's start does not read from it (many a second, nothing
#: the page draws): engine.console.lookback leaves them out, and none of them can be the relay's anchor
SKIPPED_TOPICS = ("server.response.output_audio.delta", "playback.position", "playout.position",
                  "server.rate_limits.updated", "server.input_audio_buffer.append", "_join.")
_SKIPPED = tuple(t.encode() for t in SKIPPED_TOPICS)
BACKLOG = 3000              #: messages kept for a page that opens (or reloads) later
PAGE_QUEUE = 5000           #: messages waiting for one page at most; the oldest go first
BATCH_S = 0.06              #: the tick's period while a page is open (or listens): one batch per page per tick
IDLE_BATCH_S = 0.25         #: the tick's period while no page is open (the backlog is kept up to date)
MAX_DRAIN = 5000            #: messages read in one tick at most (the rest wait for the next)
RESEND_S = 0.5
COMMAND_TIMEOUT_S = 10.0
BATCH_VERSION = 1
BATCH_HEADER = struct.Struct("<B3xIQ")    #: version, 3 zero bytes, dropped (u32), now_ns (u64); little-endian
RECORD_HEADER = struct.Struct("<HI")      #: topic length (u16), body length (u32); then topic, body


class ConsoleError(EngineError):
    """The console cannot start or was asked something it cannot do."""


def encode_record(topic: bytes, body: bytes) -> bytes:
    """One bus message as a batch record: its topic (UTF-8, at most MAX_TOPIC_BYTES) and its
    msgpack body, both as the bus carried them."""
    return RECORD_HEADER.pack(len(topic), len(body)) + topic + body


def encode_batch(records: Sequence[bytes], now_ns: int, dropped: int = 0) -> bytes:
    """One binary WebSocket message: the header (``now_ns``: the console's CLOCK_MONOTONIC;
    ``dropped``: messages this page lost since its last batch, capped at 2^32 − 1) and ``records``."""
    return BATCH_HEADER.pack(BATCH_VERSION, min(max(dropped, 0), 0xFFFF_FFFF), now_ns) + b"".join(records)


def decode_batch(data: bytes) -> tuple[int, int, list[tuple[str, dict[str, Any]]]]:
    """``(now_ns, dropped, [(topic, body)])`` of a batch (what the page's decodeBatch does, for
    tests and tools): a record whose body is not a msgpack map is left out (the page counts
    it); ValueError naming what is wrong with the batch itself. bin values stay bytes here."""
    if len(data) < BATCH_HEADER.size:
        raise ValueError("batch: shorter than its header")
    version, dropped, now_ns = BATCH_HEADER.unpack_from(data)
    if version != BATCH_VERSION:
        raise ValueError(f"batch: version {version}, expected {BATCH_VERSION}")
    out: list[tuple[str, dict[str, Any]]] = []
    pos = BATCH_HEADER.size
    while pos < len(data):
        if pos + RECORD_HEADER.size > len(data):
            raise ValueError(f"batch: a truncated record header at byte {pos}")
        tlen, blen = RECORD_HEADER.unpack_from(data, pos)
        t0 = pos + RECORD_HEADER.size
        end = t0 + tlen + blen
        if end > len(data):
            raise ValueError(f"batch: a truncated record at byte {pos}")
        try:
            body = msgpack.unpackb(data[t0 + tlen:end], raw=False, strict_map_key=False)
        except Exception:   # msgpack raises several unrelated types
            body = None
        if isinstance(body, dict):
            out.append((data[t0:t0 + tlen].decode(errors="replace"), body))
        pos = end
    return now_ns, dropped, out


MessageKey = tuple[str, str, int]


def message_key(topic: str, body: Any) -> MessageKey | None:
    """A bus message's identity: its topic, publisher and ``seq`` (None without them). A
    last-value replay keeps its original's, so it is the same message."""
    if isinstance(body, dict):
        pub, seq = body.get("pub"), body.get("seq")
        if isinstance(pub, str) and isinstance(seq, int) and not isinstance(seq, bool):
            return (topic, pub, seq)
    return None


def record_key(record: bytes) -> MessageKey | None:
    """:func:`message_key` of one batch record (None when it cannot be read)."""
    if len(record) < RECORD_HEADER.size:
        return None
    tlen, blen = RECORD_HEADER.unpack_from(record)
    t0 = RECORD_HEADER.size
    try:
        body = msgpack.unpackb(record[t0 + tlen:t0 + tlen + blen], raw=False, strict_map_key=False)
        return message_key(record[t0:t0 + tlen].decode(), body)
    except Exception:   # msgpack raises several unrelated types
        return None


def page_start(logged: Sequence[tuple[str, dict[str, Any]]], anchor: MessageKey | None, backlog: Sequence[bytes],
               limit: int = BACKLOG, state: Sequence[bytes] = (),
               joined_ns: int | None = None) -> tuple[list[bytes], set[MessageKey]]:
    """What a page starts with: the session's logged messages before ``anchor`` (the first the
    relay took that was published after it subscribed: the relay missed those before it), then
    the backlog in the bus's order less what came from the log (the broker's replays of state
    stay where they were first said); each message once, the newest ``limit`` in all, the log's
    cut first. Without ``anchor`` (none taken yet, or not in the log in time) the log's part ends
    at its first message published at or after ``joined_ns`` (when the relay subscribed, the
    bus's CLOCK_MONOTONIC ``mono_ns``), or at the log's end without it. Also the
    keys of the logged messages kept (what comes to the page later may be among them). The
    relay's latest ``state`` records (one a state topic) that the start does not hold go first:
    a state said once (``session.config``) may be older than the log's tail and the backlog. Pure;
    never raises for a logged body (one msgpack cannot hold is left out)."""
    keys = [record_key(r) for r in backlog]
    in_backlog = {k for k in keys if k is not None}
    earlier: list[tuple[bytes, MessageKey | None]] = []
    seen: set[MessageKey] = set()
    for topic, body in logged:
        key = message_key(topic, body)
        if anchor is not None and key == anchor:
            break
        if anchor is None and joined_ns is not None:
            mono_ns = body.get("mono_ns")
            if isinstance(mono_ns, int) and mono_ns >= joined_ns:
                break
        if key is not None and key in seen:
            continue
        try:
            earlier.append((encode_record(topic.encode(), msgpack.packb(body, use_bin_type=True)), key))
        except Exception:   # a hand-edited log: an int past 64 bits, a lone surrogate, ...
            continue
        if key is not None:
            seen.add(key)
    room = max(0, limit - len(backlog) + len(seen & in_backlog))
    kept = earlier[len(earlier) - room:] if room else []
    kept_keys = {k for _, k in kept if k is not None}
    rest = [r for r, k in zip(backlog, keys) if k is None or k not in kept_keys]
    start = ([r for r, _ in kept] + rest)[-limit:] if limit > 0 else []
    held = kept_keys | in_backlog
    missing = [r for r in state if record_key(r) not in held and r not in rest]
    return missing + start, kept_keys


class PageQueue:
    """What is waiting for one page: a bounded deque of records (oldest dropped, counted in
    ``dropped``), sent by the server's tick. Used from the event loop's thread only."""

    def __init__(self, limit: int = PAGE_QUEUE, held: bool = False) -> None:
        self.items: deque[bytes] = deque(maxlen=limit)
        self.dropped = 0
        self.held = held   #: collecting, not sent yet: the page's start is being put together

    def put_front(self, items: Sequence[bytes], known: set[MessageKey] | frozenset[MessageKey] = frozenset()) -> None:
        """``items`` (the page's start) before what waits, less what waits that is ``known`` to be
        among them already; the oldest dropped past the limit, counted."""
        waiting = [r for r in self.items if record_key(r) not in known] if known else list(self.items)
        merged = list(items) + waiting
        over = len(merged) - (self.items.maxlen or 0)
        if over > 0:
            self.dropped += over
            merged = merged[over:]
        self.items.clear()
        self.items.extend(merged)

    def put_many(self, items: Sequence[bytes]) -> None:
        over = len(self.items) + len(items) - (self.items.maxlen or 0)
        if over > 0:
            self.dropped += over
        self.items.extend(items)

    def take(self) -> list[bytes]:
        items = list(self.items)
        self.items.clear()
        return items


@dataclass
class _Pending:
    topic: str
    payload: dict[str, Any]
    due_s: float        #: the next re-send (time.monotonic())
    give_up_s: float


class BusRelay:
    """The console's subscriber and publisher. :meth:`open` connects; :meth:`drain` (the server's
    tick) reads every waiting message and hands their records to ``deliver`` in one list.
    Event loop's thread only; nothing here blocks."""

    def __init__(self, endpoints: Endpoints, deliver: Callable[[list[bytes]], None], name: str | None = None) -> None:
        self.endpoints = endpoints
        self.deliver = deliver
        self.name = name or f"console:{os.getpid()}"
        self.backlog: deque[bytes] = deque(maxlen=BACKLOG)
        self.received = 0       #: bus messages forwarded
        self.malformed = 0      #: messages skipped: not [topic, body(, signature)], or a topic too long or not UTF-8
        self.error: BaseException | None = None   #: set when the bus failed under the relay (the server reports it)
        self.opened_mono = 0.0  #: when :meth:`open` subscribed (time.monotonic())
        self.opened_ns = 0      #: the same, in ns (the bus's ``mono_ns``)
        #: the last record forwarded of each state topic: the broker's last-value cache sends its
        #: kept message again, byte for byte, to every subscriber of the topic whenever one more
        #: subscribes (a page has it already), and a page's start carries them when its log and
        #: backlog no longer do
        self.last_state: dict[bytes, bytes] = {}
        self.backlogged = 0     #: records ever put in the backlog (more than it holds: it dropped some)
        #: the first message taken that was published after the relay subscribed and that the log's
        #: tail holds where the bus had it: of a topic the broker never replays and the tail does not
        #: skip, signed if its topic is (the supervisor drops an unsigned one), not the supervisor's
        #: own (logged when emitted, not in the bus's order)
        self.anchor: MessageKey | None = None
        self.replays = 0        #: state messages left out as the last-value cache's replays
        self._sub: Subscriber | None = None
        self._pub: Publisher | None = None
        self._pending: dict[str, _Pending] = {}

    @property
    def waiting(self) -> bool:
        """A command waits for its ack (the tick keeps its fast period for its re-sends)."""
        return bool(self._pending)

    def open(self) -> None:
        """Connect to the bus; ConsoleError saying why not."""
        try:
            self._sub = Subscriber(self.endpoints, [""], verify_key=None)
            self.opened_ns = time.monotonic_ns()
            self.opened_mono = self.opened_ns / 1e9
            self._pub = Publisher(self.endpoints, self.name, curve=self.endpoints.curve, signing_key=None)
        except Exception as exc:
            self.close()
            raise ConsoleError(f"the console cannot reach the bus: {exc}") from None

    def close(self) -> None:
        for sock in (self._sub, self._pub):
            if sock is not None:
                sock.close()
        self._sub = self._pub = None

    def command(self, topic: str, payload: dict[str, Any]) -> str:
        """Publish ``topic`` (a ``cmd.*``) with a fresh ``id`` now, re-sent until acknowledged; returns the id."""
        if not topic.startswith("cmd."):
            raise ConsoleError(f"the console publishes commands only, not {topic!r}")
        payload = dict(payload)
        payload.setdefault("id", uuid.uuid4().hex)
        now = time.monotonic()
        self._send(topic, payload)
        self._pending[payload["id"]] = _Pending(topic, payload, now + RESEND_S, now + COMMAND_TIMEOUT_S)
        return str(payload["id"])

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Publish ``topic`` (a ``console.*`` switch) once: no id, no ack."""
        if not topic.startswith("console."):
            raise ConsoleError(f"the console publishes its switches on console.* only, not {topic!r}")
        self._send(topic, dict(payload))

    def _send(self, topic: str, payload: dict[str, Any]) -> None:
        if self._pub is None:
            raise ConsoleError("the console is not connected to the bus")
        self._pub.publish(topic, payload)

    def drain(self, now_s: float | None = None) -> int:
        """Read every message waiting (at most MAX_DRAIN), re-send the commands due, and hand the
        records to ``deliver`` (and the backlog); returns how many records. zmq errors propagate."""
        if self._sub is None:
            return 0
        sock = self._sub.socket
        records: list[bytes] = []
        ack_wait = bool(self._pending)
        for _ in range(MAX_DRAIN):
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:   # cheaper than raising zmq.Again
                break
            frames = sock.recv_multipart()   # the whole message is there with its first frame
            topic = frames[0]
            if len(frames) not in (2, 3) or len(topic) > MAX_TOPIC_BYTES:
                self.malformed += 1
                continue
            if topic.startswith(b"_join."):
                continue
            try:
                topic.decode()
            except UnicodeDecodeError:
                self.malformed += 1
                continue
            body = frames[1]
            if ack_wait and topic == b"cmd.ack":
                self._on_ack(body)
            record = encode_record(topic, body)
            if topic in _STATE_TOPICS:
                if self.last_state.get(topic) == record:   # the last-value cache's replay
                    self.replays += 1
                    continue
                self.last_state[topic] = record
            elif self.anchor is None and not topic.startswith(_SKIPPED) and \
                    (len(frames) == 3 or not topic.startswith(_SIGNED)):
                key = record_key(record)
                if key is not None and not key[1].startswith(SUPERVISOR_PREFIX):
                    self.anchor = key
            records.append(record)
        self.received += len(records)
        if self._pending:
            self._resend(time.monotonic() if now_s is None else now_s, records)
        if records:
            self.backlog.extend(records)
            self.backlogged += len(records)
            self.deliver(records)
        return len(records)

    def _on_ack(self, body: bytes) -> None:
        try:
            ack = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception:   # msgpack raises several unrelated types: the page shows it as malformed
            return
        if isinstance(ack, dict) and isinstance(ack.get("id"), str):
            self._pending.pop(ack["id"], None)

    def _resend(self, now: float, records: list[bytes]) -> None:
        for cid, p in list(self._pending.items()):
            if now >= p.give_up_s:
                del self._pending[cid]
                body = {"ts": time.time(), "mono_ns": time.monotonic_ns(), "pub": self.name, "id": cid,
                        "topic": p.topic, "message": f"no cmd.ack for {p.topic} within {COMMAND_TIMEOUT_S:.0f} s: "
                                                     "is the engine connected?"}
                records.append(encode_record(b"console.command_failed", msgpack.packb(body, use_bin_type=True)))
            elif now >= p.due_s:
                self._send(p.topic, p.payload)
                p.due_s = now + RESEND_S

"""The console's events socket (docs/console.md, "The events socket"): the binary batch the
relay builds from the bus's raw frames, the relay itself against a real broker (no decoding but
cmd.ack, commands re-sent and given up), and the page's own decoder (static/wire.js) in a real
headless Chromium on the same bytes."""
from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

from bus import Endpoints, Publisher
from engine.console import relay as relay_mod
from tests.helpers import thread_broker
from engine.console import lookback
from engine.console.relay import (BATCH_HEADER, BusRelay, ConsoleError, PageQueue, decode_batch, encode_batch,
                                  encode_record, page_start)

STATIC = Path(__file__).resolve().parent.parent / "engine" / "console" / "static"
CHROMIUM = "/usr/bin/chromium"

#: bodies that cover every msgpack type the decoder reads (and the widths of each)
BODIES: list[dict[str, Any]] = [
    {"v": 1, "ts": 1764640000.123456, "mono_ns": 123_456_789_012_345, "pub": "realtime:42", "seq": 7,
     "text": "héllo ✂ — 🎧", "none": None, "yes": True, "no": False},
    {"ints": [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53 - 1,
              -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**53 + 1]},
    {"floats": [0.5, -1.25, 1e300, -2.5e-300], "nested": {"a": [1, [2, [3, {"b": {}}]]], "empty": []}},
    {"s8": "x" * 40, "s16": "y" * 300, "s32": "z" * 70_000, "arr16": list(range(20)),
     "map16": {f"k{i}": i for i in range(20)}},
    {"delta_bytes": b"\x00\x01" * 10, "b16": b"\xff" * 300, "b32": b"\x00" * 70_000},
    {},
]


def _jsonish(value: Any) -> Any:
    """What the page makes of a value: bytes as {bytes: length}, tuples as lists."""
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": len(value)}
    if isinstance(value, dict):
        return {k: _jsonish(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    return value


def _records(bodies: list[dict[str, Any]]) -> list[bytes]:
    return [encode_record(f"test.t{i}.é".encode(), msgpack.packb(b, use_bin_type=True)) for i, b in enumerate(bodies)]


# ---------------------------------------------------------------- the batch format
@pytest.mark.timeout(10)
def test_a_batch_carries_the_bus_frames_as_they_came() -> None:
    records = _records(BODIES)
    data = encode_batch(records, now_ns=2**60 + 5, dropped=3)
    assert data[0] == 1 and data[1:4] == b"\0\0\0" and len(data) == BATCH_HEADER.size + sum(map(len, records))
    now_ns, dropped, events = decode_batch(data)
    assert (now_ns, dropped) == (2**60 + 5, 3)
    assert [t for t, _ in events] == [f"test.t{i}.é" for i in range(len(BODIES))]
    assert [b for _, b in events] == BODIES
    # a record is u16 topic length, u32 body length, the topic, the body: nothing re-encoded
    body = msgpack.packb({"x": 1})
    assert encode_record(b"a.b", body) == b"\x03\x00" + len(body).to_bytes(4, "little") + b"a.b" + body
    assert decode_batch(encode_batch([], 1))[2] == []
    assert decode_batch(encode_batch([], 1, dropped=2**40))[1] == 2**32 - 1   # capped, not wrapped
    for bad, words in [(data[:10], "shorter than its header"), (b"\x02" + data[1:], "version 2"),
                       (data[:-1], "truncated record"), (data + b"\x01", "truncated record header")]:
        with pytest.raises(ValueError, match=words):
            decode_batch(bad)


@pytest.mark.timeout(10)
def test_a_page_queue_drops_its_oldest_and_counts_them() -> None:
    q = PageQueue(limit=3)
    q.put_many([b"1", b"2"])
    q.put_many([b"3", b"4", b"5"])
    assert q.dropped == 2
    assert q.take() == [b"3", b"4", b"5"] and q.take() == []


def test_a_page_start_is_collected_while_held_and_goes_before_what_came_meanwhile() -> None:
    q = PageQueue(limit=4, held=True)
    q.put_many([b"new1", b"new2"])
    q.put_front([b"old1", b"old2", b"old3"])
    assert q.dropped == 1 and q.take() == [b"old2", b"old3", b"new1", b"new2"]


def _msg(topic: str, pub: str, seq: int | None, **rest: Any) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"pub": pub, **({"seq": seq} if seq is not None else {}), **rest}
    return topic, body


def _rec(topic: str, body: dict[str, Any]) -> bytes:
    return encode_record(topic.encode(), msgpack.packb(body))


def test_a_page_starts_with_what_the_relay_missed_then_the_backlog_each_message_once() -> None:
    """The console subscribed after ``session.config`` and ``playout.started``: the log has them.
    Its backlog starts with the broker's last-value replays (the same messages: the same
    publisher and seq), then ``capture.levels``, the first message published after it
    subscribed (its anchor), then newer ones."""
    config = _msg("session.config", "realtime:1", 1, session={"model": "gpt-live-1"})
    started = _msg("playout.started", "realtime:1", 2, item_id=None)
    status = _msg("engine.status", "supervisor:9", 7, state="ready")
    huge = _msg("app.odd", "r-client", 5, n=2**70)                      # a hand-edited log: msgpack cannot hold it
    levels = _msg("capture.levels", "capture:3", 40, mic_dbfs=[-20.0])
    later = _msg("user.text", "cli:1", 5, text="hi")                    # logged after the anchor, not yet taken
    foreign = _msg("app.note", "r-client", None, text="no seq")
    newer = _msg("model.transcript.delta", "realtime:1", 3, text="Hi")
    logged = [config, started, status, huge, levels, later, status]    # the supervisor logged a replay too
    backlog = [_rec(*config), _rec(*status), _rec(*levels), _rec(*foreign), _rec(*newer)]
    anchor = ("capture.levels", "capture:3", 40)

    def topics(records: list[bytes]) -> list[str]:
        return [t for t, _ in decode_batch(encode_batch(records, 0))[2]]
    start, known = page_start(logged, anchor, backlog)
    assert topics(start) == ["session.config", "playout.started", "engine.status", "capture.levels", "app.note",
                             "model.transcript.delta"]   # the replays where they were first said, each once
    assert decode_batch(encode_batch(start, 0))[2][1][1] == started[1]
    assert known == {("session.config", "realtime:1", 1), ("playout.started", "realtime:1", 2),
                     ("engine.status", "supervisor:9", 7)}
    start, known = page_start(logged, None, backlog)                    # the anchor not in the log yet
    assert topics(start) == ["session.config", "playout.started", "engine.status", "capture.levels", "user.text",
                             "app.note", "model.transcript.delta"] and ("user.text", "cli:1", 5) in known
    tight = topics(page_start(logged, anchor, backlog, limit=4)[0])     # the log's part is cut first
    assert len(tight) == 4 and tight[-3:] == ["capture.levels", "app.note", "model.transcript.delta"], tight
    assert page_start(logged, anchor, backlog, limit=3)[0] == backlog[-3:]
    assert page_start([], None, backlog) == (backlog, set())            # no log: the backlog as it is
    # the log's part ends where the relay subscribed when its anchor is not in the log in time
    stamped = [(t, {**b, "mono_ns": 100 + i}) for i, (t, b) in enumerate(logged)]
    assert topics(page_start(stamped, None, backlog, joined_ns=103)[0])[:3] == \
        ["session.config", "playout.started", "engine.status"]           # (102 is the odd body: left out)
    assert "user.text" not in topics(page_start(stamped, None, backlog, joined_ns=103)[0])
    # the engine's latest state goes first where neither the log's part nor the backlog holds it
    tools = _rec(*_msg("engine.tools", "realtime:1", 0, tools=[]))
    start, _ = page_start(logged, anchor, backlog, state=[_rec(*config), tools])
    assert topics(start)[:3] == ["engine.tools", "session.config", "playout.started"]
    assert topics(page_start([], None, backlog[-2:], state=[_rec(*config)])[0]) == \
        ["session.config", "app.note", "model.transcript.delta"]       # a wrapped backlog: the state kept
    # what came to the held page meanwhile and the start holds already goes once
    start, known = page_start(logged, None, backlog)
    page = PageQueue(held=True)
    page.put_many([_rec(*later), _rec(*_msg("model.transcript.done", "realtime:1", 4, text="Hi"))])
    page.put_front(start, known)
    assert topics(page.take())[-3:] == ["app.note", "model.transcript.delta", "model.transcript.done"]


def test_the_tail_of_a_live_log_skips_a_line_being_written_and_reads_from_the_end(tmp_path: Path,
                                                                                  monkeypatch: Any) -> None:
    monkeypatch.setattr(lookback, "TAIL_CHUNK_BYTES", 7)   # lines cross chunk boundaries
    lines = [json.dumps({"topic": "user.text", "body": {"pub": "p", "seq": i, "text": "x" * (i % 5)}})
             for i in range(1, 21)]
    lines.insert(5, json.dumps({"topic": "server.response.output_audio.delta", "body": {"seq": 99}}))   # firehose
    lines.insert(9, "{not json")
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n" + '{"topic": "user.text", "bo')
    events = lookback.tail_events(tmp_path, limit=100)
    assert [b["seq"] for _, b in events] == list(range(1, 21))
    assert [b["seq"] for _, b in lookback.tail_events(tmp_path, limit=3)] == [18, 19, 20]
    few = lookback.tail_events(tmp_path, limit=100, max_bytes=200)        # bounded whatever the log's length
    assert 0 < len(few) < 20 and few[-1][1]["seq"] == 20
    assert lookback.tail_events(tmp_path / "none", limit=5) == []


# ---------------------------------------------------------------- the relay on a real broker
@pytest.fixture
def endpoints(tmp_path: Path) -> Iterator[Endpoints]:
    with thread_broker(tmp_path, "console") as (pub_ep, sub_ep):
        yield Endpoints(pub_ep, sub_ep)

class Collected:
    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []

    def __call__(self, records: list[bytes]) -> None:
        self.batches.append(records)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return [ev for b in self.batches for ev in decode_batch(encode_batch(b, 0))[2]]


def _drain_until(relay: BusRelay, got: Collected, pred: Any, timeout_s: float = 5.0, tick_s: float = 0.01) -> None:
    """The server's tick, in short: drain until ``pred(events)`` holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        relay.drain()
        if pred(got.events()):
            return
        time.sleep(tick_s)   # (the tick's timer: nothing to await on a non-blocking drain)
    raise AssertionError(f"not within {timeout_s} s; got {got.events()}")


@pytest.mark.timeout(30)
def test_the_relay_forwards_raw_and_reads_only_acks(endpoints: Endpoints) -> None:
    got = Collected()
    relay = BusRelay(endpoints, got, name="console:test")
    relay.open()
    pub = Publisher(endpoints, "engine-fake", signing_key=None)
    try:
        # the subscription reaches the broker: ping until one comes through
        def pinged(evs: list[tuple[str, dict[str, Any]]]) -> bool:
            pub.publish("test.ping", {})
            return any(t == "test.ping" for t, _ in evs)
        _drain_until(relay, got, pinged)
        got.batches.clear()
        pub.publish("model.text.delta", {"text": "hé", "data": b"\x01\x02\x03"})
        pub.send_raw([b"_join.somebody", msgpack.packb({})])                # a join probe: not forwarded
        pub.send_raw([b"a", b"b", b"c", b"d"])                              # four frames: malformed, skipped
        pub.send_raw([b"\xff\xfe", msgpack.packb({})])                      # not UTF-8: skipped
        pub.send_raw([b"weird.body", b"\xc1"])                              # not msgpack: forwarded (the page counts it)
        pub.send_raw([b"signed.thing", msgpack.packb({"x": 1}), b"sig"])   # a signature frame: forwarded, without it
        pub.publish("test.last", {})
        _drain_until(relay, got, lambda evs: any(t == "test.last" for t, _ in evs))
        records = [r for b in got.batches for r in b if not r[6:].startswith(b"test.ping")]   # (late pings)
        topics = [bytes(r[6:6 + int.from_bytes(r[:2], "little")]) for r in records]
        assert topics == [b"model.text.delta", b"weird.body", b"signed.thing", b"test.last"], topics
        assert relay.malformed == 2 and relay.received >= 4
        body = records[0][6 + len(b"model.text.delta"):]
        assert msgpack.unpackb(body)["data"] == b"\x01\x02\x03"    # the bus's bytes, as published
        assert len(relay.backlog) == relay.received

        # a command: published at once, re-sent until its ack, which the relay reads
        cid = relay.command("cmd.say", {"text": "hi"})
        assert relay.waiting
        _drain_until(relay, got, lambda evs: sum(t == "cmd.say" for t, _ in evs) >= 1)
        relay.drain(now_s=time.monotonic() + relay_mod.RESEND_S + 0.01)   # due: sent again
        _drain_until(relay, got, lambda evs: sum(t == "cmd.say" and b.get("id") == cid for t, b in evs) >= 2)
        pub.publish("cmd.ack", {"id": "someone-else", "ok": True})
        pub.publish("cmd.ack", {"id": cid, "ok": True})
        _drain_until(relay, got, lambda evs: any(t == "cmd.ack" and b.get("id") == cid for t, b in evs))
        assert not relay.waiting
        # a command nobody acknowledges is given up, and the page told
        cid2 = relay.command("cmd.cancel", {})
        relay.drain(now_s=time.monotonic() + relay_mod.COMMAND_TIMEOUT_S + 1)
        failed = [b for t, b in got.events() if t == "console.command_failed"]
        assert [b["id"] for b in failed] == [cid2] and "no cmd.ack for cmd.cancel" in failed[0]["message"]
        assert failed[0]["pub"] == "console:test" and isinstance(failed[0]["mono_ns"], int)
        assert not relay.waiting
        with pytest.raises(ConsoleError, match="commands only"):
            relay.command("engine.error", {})
        with pytest.raises(ConsoleError, match="console"):
            relay.publish("cmd.say", {})
    finally:
        pub.close()
        relay.close()


@pytest.mark.timeout(30)
def test_the_relay_leaves_out_a_state_replay_of_what_it_forwarded(endpoints: Endpoints) -> None:
    """The broker's last-value cache sends ``session.config`` again to every subscriber of it when
    one more subscribes (`engine tail`, a client): the page has it already, and gets it once."""
    from bus import Subscriber
    got = Collected()
    relay = BusRelay(endpoints, got, name="console:test")
    relay.open()
    pub = Publisher(endpoints, "engine-fake", signing_key=b"k" * 32)   # the engine signs its state
    other = None
    try:
        def pinged(evs: list[tuple[str, dict[str, Any]]]) -> bool:
            pub.publish("playback.position", {"index": 1})   # skipped by the log's tail: never the anchor
            pub.send_raw([b"playback.started", msgpack.packb({"pub": "x", "seq": 1})])   # unsigned: dropped by the supervisor
            pub.publish("test.ping", {})
            return any(t == "test.ping" for t, _ in evs)
        _drain_until(relay, got, pinged)
        assert relay.anchor is not None and relay.anchor[:2] == ("test.ping", "engine-fake")   # the first it could take
        pub.publish("session.config", {"session": {"model": "m1"}})
        _drain_until(relay, got, lambda evs: any(t == "session.config" for t, _ in evs))
        other = Subscriber(endpoints, ["session.config"])        # the broker replays the kept config to all
        replayed = other.recv(timeout_ms=5000)
        assert replayed is not None and replayed[1]["session"] == {"model": "m1"}
        pub.publish("test.last", {})
        _drain_until(relay, got, lambda evs: any(t == "test.last" for t, _ in evs))
        assert sum(t == "session.config" for t, _ in got.events()) == 1 and relay.replays == 1
        pub.publish("session.config", {"session": {"model": "m2"}})    # a newer one goes through
        _drain_until(relay, got, lambda evs: sum(t == "session.config" for t, _ in evs) == 2)
        forger = Publisher(endpoints, "engine-fake", signing_key=None)      # a copy with a high seq hides nothing
        forger.seq = 10**6
        forger.publish("session.config", {"session": {"model": "forged"}})
        pub.publish("session.config", {"session": {"model": "m3"}})
        _drain_until(relay, got, lambda evs: any(b["session"] == {"model": "m3"} for t, b in evs if t == "session.config"))
        forger.close()
        assert relay.replays == 1
    finally:
        pub.close()
        relay.close()
        if other is not None:
            other.close()


# ---------------------------------------------------------------- the page's decoder (Chromium)
@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_the_page_decodes_a_batch_as_the_relay_builds_it() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run bash tools/setup-system.sh")
    from playwright.sync_api import sync_playwright
    bad = encode_record(b"weird.body", b"\xc1") + encode_record(b"not.a.map", msgpack.packb([1, 2]))
    records = _records(BODIES)
    data = encode_batch(records[:3] + [bad] + records[3:], now_ns=987_654_321_000, dropped=4)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.add_script_tag(content=(STATIC / "wire.js").read_text())
            out = page.evaluate("""(b64) => {
                const bin = atob(b64), u = new Uint8Array(bin.length);
                for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
                const t0 = performance.now(), batch = decodeBatch(u.buffer);
                let bad = 0;
                for (const x of [new Uint8Array([0xc1]), new Uint8Array([0x92, 0x01]), new Uint8Array([0xa5, 0x61])])
                  try { msgpackDecode(x); } catch (e) { bad++; }
                let badBatch = "";
                try { decodeBatch(u.slice(0, u.length - 1).buffer); } catch (e) { badBatch = e.message; }
                return JSON.stringify({ batch, bad, badBatch, ms: performance.now() - t0 });
            }""", base64.b64encode(data).decode())
            assert errors == [], errors
        finally:
            browser.close()
    got = json.loads(out)
    batch = got["batch"]
    assert batch["nowNs"] == 987_654_321_000 and batch["dropped"] == 4 and batch["malformed"] == 2
    assert [e["topic"] for e in batch["events"]] == [f"test.t{i}.é" for i in range(len(BODIES))]
    assert [e["body"] for e in batch["events"]] == [_jsonish(b) for b in BODIES]
    assert got["bad"] == 3 and "truncated" in got["badBatch"]


# ---------------------------------------------------------------- the tick's senders (no sockets)
class FakeWs:
    """A page's socket as :func:`engine.console.sound.send_now` sees it: websockets' ``broadcast``
    writes through its Sans-I/O ``protocol`` and ``send_data``; ``behind`` puts its transport's write
    buffer over the limit, as a page that does not read does. Records what is sent."""

    def __init__(self) -> None:
        from websockets.protocol import State
        self.sent: list[bytes | str] = []
        self.behind = False
        self.protocol = self
        self.transport = self
        self.state = State.OPEN
        self.fragmented_send_waiter = None
        self._out: list[bytes | str] = []

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        from engine.console.sound import WRITE_LIMIT_BYTES
        return WRITE_LIMIT_BYTES + 1 if self.behind else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        from engine.console.sound import WRITE_LIMIT_BYTES
        return WRITE_LIMIT_BYTES // 4, WRITE_LIMIT_BYTES   # as websockets sets them from write_limit

    def send_binary(self, data: bytes) -> None:
        self._out.append(bytes(data))

    def send_text(self, data: bytes) -> None:
        self._out.append(data.decode())

    def send_data(self) -> None:
        self.sent += self._out
        self._out.clear()


class FakeRing:
    """The listen ring: ``frames`` int16 frames waiting."""

    def __init__(self) -> None:
        self.frames = 0
        self.overrun_frames = 0

    def read_into(self, buf: Any) -> int:
        n = min(self.frames, len(buf))
        buf[:n] = 7
        self.frames -= n
        return n


@pytest.mark.timeout(10)
def test_listen_sends_a_chunk_every_other_tick_and_does_not_wait_for_a_slow_page() -> None:
    from engine.console import sound
    from engine.console.sound import LISTEN_EVERY_TICKS, LISTEN_QUEUE_CHUNKS, ListenHub, _Listener
    published: list[tuple[str, dict[str, Any]]] = []
    hub = ListenHub(sound.Rings({}), lambda t, p: published.append((t, p)))
    ring = FakeRing()
    fast, slow = FakeWs(), FakeWs()
    a, b = _Listener(fast), _Listener(slow)   # type: ignore[arg-type]
    hub.listeners |= {a, b}
    hub._ring = ring   # type: ignore[assignment]  # as serve() attaches it

    def ticks(n: int, frames_per_tick: int, t0: float) -> None:
        for i in range(n):
            ring.frames += frames_per_tick
            hub.pump(t0 + i * 0.05)

    assert LISTEN_EVERY_TICKS == 2
    ticks(4, 1200, 100.0)
    pcm = [x for x in fast.sent if isinstance(x, bytes)]
    assert [len(x) for x in pcm] == [4800, 4800]   # one chunk every other tick: 2 x 1200 frames of int16
    assert published == [("console.listen", {"on": True, "lease_ms": sound.LEASE_MS})]
    # a socket that is behind is not written to: its chunks wait (bounded, the oldest dropped and counted)
    slow.sent.clear()
    slow.behind = True
    ticks(2 * (LISTEN_QUEUE_CHUNKS + 3), 1200, 101.0)
    assert slow.sent == [] and len(b.chunks) == LISTEN_QUEUE_CHUNKS and b.dropped_frames == 3 * 2400
    assert sum(isinstance(x, bytes) for x in fast.sent) == 2 + LISTEN_QUEUE_CHUNKS + 3
    assert published[-1][1]["on"] is True and len(published) >= 2   # renewed every RENEW_S
    slow.behind = False
    ticks(2, 0, 103.0)
    assert sum(isinstance(x, bytes) for x in slow.sent) == LISTEN_QUEUE_CHUNKS   # caught up at once
    # the last listener gone: the lease is given back once
    hub.listeners.clear()
    ticks(3, 0, 104.0)
    assert published[-1] == ("console.listen", {"on": False})
    assert sum(p == {"on": False} for _, p in published) == 1


@pytest.mark.timeout(10)
def test_the_tick_sends_each_page_one_batch_and_skips_one_that_is_behind() -> None:
    from engine.console.server import ConsoleServer
    server = ConsoleServer(Endpoints("ipc:///nowhere-p", "ipc:///nowhere-s"))
    fast, slow = FakeWs(), FakeWs()
    slow.behind = True
    server.pages = {fast: PageQueue(), slow: PageQueue()}   # type: ignore[dict-item]
    records = _records(BODIES[:3])
    server._deliver(records[:2])
    server._deliver(records[2:])
    server._send_batches()
    assert len(fast.sent) == 1 and isinstance(fast.sent[0], bytes)
    assert [b for _, b in decode_batch(fast.sent[0])[2]] == BODIES[:3]
    assert slow.sent == [] and len(server.pages[slow].items) == 3   # type: ignore[index]
    server._send_batches()
    assert len(fast.sent) == 1   # nothing new: nothing sent
    slow.behind = False
    server._send_batches()
    assert len(slow.sent) == 1 and len(decode_batch(slow.sent[0])[2]) == 3   # type: ignore[arg-type]
    # a socket that is closing gets nothing (its handler ends and drops the page)
    from websockets.protocol import State
    fast.state = State.CLOSING
    server._deliver(records[:1])
    server._send_batches()
    assert len(fast.sent) == 1 and len(server.pages[fast].items) == 1   # type: ignore[index]

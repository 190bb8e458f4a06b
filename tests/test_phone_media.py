"""The bridge forwards the model's audio to the phone as it arrives: each API delta goes out in as
few ``media`` messages as the marks allow (one up to each mark), not re-cut into 20 ms frames; the
marks still fall every ``mark_every_ms`` of sent audio. The bridge in this test's own loop, the
local server in a thread, a fake phone."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from engine.phone.bridge import Latency, PhoneBridge
from engine.phone.heard import HeardClock
from engine.phone.simulator import FRAME_BYTES, FakePhone
from tests.helpers import RecordingPublisher, bridge_spec, set_twilio_token

pytestmark = pytest.mark.timeout(40)


@pytest.fixture(autouse=True)
def _twilio_token(monkeypatch: pytest.MonkeyPatch) -> str:
    return set_twilio_token(monkeypatch)


def test_the_heard_clock_says_how_far_the_next_mark_is() -> None:
    clock = HeardClock(mark_every_frames=1600)
    assert clock.frames_to_next_mark() == 1600
    assert clock.sent(1000, 0.0) == []
    assert clock.frames_to_next_mark() == 600
    assert [m.index for m in clock.sent(600, 0.0)] == [1600]
    assert clock.frames_to_next_mark() == 1600


def test_a_latency_counts_every_frame_a_message_carries() -> None:
    lat = Latency()
    lat.note(1000.0, 5)
    lat.note(30_000.0, 3)          # over 20 ms: 3 late frames
    assert len(lat.samples_us) == 8 and lat.late == 3


def one_reply(server: Any, pub: RecordingPublisher, timeout_s: float = 15) -> tuple[FakePhone, dict[str, Any]]:
    """One call through a bridge in this test's own loop: one reply, played to its end (each within
    ``timeout_s``), then a hang-up; the fake phone and its ``phone.call.ended``."""

    async def main() -> tuple[FakePhone, dict[str, Any]]:
        bridge = PhoneBridge(bridge_spec(server.base + "/realtime"), publisher=pub)  # type: ignore[arg-type]
        await bridge.listen()
        phone = await FakePhone(bridge.url).dial()
        await pub.wait("session.config", phone_call_id=phone.call_sid)
        bridge.on_bus("cmd.say", {"text": "Please tell me about the weather on the coast this weekend",
                                  "phone_call_id": phone.call_sid})
        await pub.wait("response.done", phone_call_id=phone.call_sid, timeout_s=timeout_s)
        await pub.wait("playout.stopped", phone_call_id=phone.call_sid, timeout_s=timeout_s)   # the end mark came back
        await phone.hang_up()
        ended = await pub.wait("phone.call.ended", phone_call_id=phone.call_sid)
        await bridge.close()
        return phone, ended
    try:
        return asyncio.run(main())
    finally:
        server.close()


def test_each_delta_goes_to_the_phone_whole_with_marks_every_200_ms() -> None:
    from tests.helpers import LocalServer
    pub = RecordingPublisher()
    phone, ended = one_reply(LocalServer(speed=4.0, asr=False), pub)
    frames = phone.received_frames // FRAME_BYTES
    deltas = len(pub.all("response.output_audio.delta", phone_call_id=phone.call_sid)) or None
    assert frames > 100 and ended["media_out_frames"] == frames
    # one reply: its start was held once (the start hold's counts go out with the call's end)
    assert ended["start_holds"] == 1 and ended["start_hold_dropped_bytes"] == 0, ended
    # the local server's deltas are 100 ms (5 frames) and marks every 200 ms fall between them:
    # one media message a delta (it was one a 20 ms frame)
    assert phone.media_received <= -(-frames // 5) + 1, (phone.media_received, frames, deltas)
    assert ended["marks_sent"] == phone.received_frames // 1600 + 1      # the periodic marks and the end's
    assert phone.underruns == 0


def test_a_gap_at_the_phone_is_counted_published_and_grows_the_start_hold() -> None:
    """The bridge cannot see the phone's buffer; its heard clock says when the phone ran out of what
    was sent. Deltas paced at real time with 150 ms of jitter leave the fake phone's buffer dry
    mid-reply (more than the 60 ms start hold covers): the bridge publishes ``phone.underrun`` and
    the hold grows, as the speaker's prebuffer does."""
    from engine.server.faults import Faults
    from tests.helpers import LocalServer
    pub = RecordingPublisher()
    server = LocalServer(speed=1.0, asr=False, faults=Faults(delta_jitter_ms=150.0, seed=3))
    phone, ended = one_reply(server, pub, timeout_s=30)
    heard_gaps = phone.underruns + phone.long_silences
    assert heard_gaps >= 1, "the jitter left no gap at the phone: this test shows nothing"
    seen = pub.all("phone.underrun", phone_call_id=phone.call_sid)
    # (not bounded by heard_gaps: this process runs the fake phone too, and its loop lagging moves the count)
    assert len(seen) >= 1 and all(m["gap_ms"] > 0 for m in seen), (seen, heard_gaps)
    assert ended["phone_underruns"] == len(seen) and ended["phone_underrun_ms"] > 0
    assert seen[-1]["prebuffer_ms"] == ended["start_hold_ms_max"] == 60 + 20 * len(seen), (seen, ended)


def test_a_barge_in_while_a_reply_start_is_held_leaves_the_next_reply_named_and_ended_right() -> None:
    """The core counts a Play's frames when it hands them over; a clear during the start hold drops
    them unsent. The bridge's index space must still move past them, or every later report names
    a ring index the core gave the interrupted item: the next reply's ``playout.started`` named
    the old item and its ``playout.stopped`` never came."""
    from tests.helpers import LocalServer
    server = LocalServer(speed=4.0, asr=False)
    pub = RecordingPublisher()
    spec = bridge_spec(server.base + "/realtime", prebuffer_ms=5000)   # the first reply is still held when it is cancelled

    async def main() -> tuple[FakePhone, dict[str, Any]]:
        bridge = PhoneBridge(spec, publisher=pub)  # type: ignore[arg-type]
        await bridge.listen()
        phone = await FakePhone(bridge.url).dial()
        call: dict[str, Any] = {"phone_call_id": phone.call_sid}
        await pub.wait("session.config", **call)
        bridge.on_bus("cmd.say", {"text": "Tell me a long story about the sea, please", **call})
        first = await pub.wait("playout.started", **call)
        bridge.on_bus("cmd.cancel", call)
        await pub.wait("playout.interrupted", **call)
        assert phone.received_frames == 0, "the reply's start was not held: this test shows nothing"
        bridge.on_bus("cmd.say", {"text": "Now just say yes", **call})
        second = (await pub.wait_many("playout.started", 2, **call))[1]
        assert second["item_id"] != first["item_id"], (first, second)
        stopped = await pub.wait("playout.stopped", item_id=second["item_id"], **call)
        await phone.hang_up()
        ended = await pub.wait("phone.call.ended", **call)
        await bridge.close()
        return phone, {"stopped": stopped, "ended": ended}
    try:
        phone, got = asyncio.run(main())
    finally:
        server.close()
    assert got["ended"]["media_out_frames"] == phone.received_frames // FRAME_BYTES, got["ended"]
    assert got["ended"]["start_hold_dropped_bytes"] > 0


class _FakeConn:
    """A websockets connection as Outgoing and websockets' ``broadcast`` see it: writes in order into
    ``wire``; ``send`` (the queue's path) waits for ``release``; ``buffered`` is the transport's write buffer."""

    def __init__(self) -> None:
        from websockets.protocol import State
        self.state = State.OPEN
        self.protocol = self
        self.transport = self
        self.fragmented_send_waiter = None
        self.wire: list[str] = []
        self.buffered = 0
        self.release = asyncio.Event()

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (8192, 32768)

    def send_text(self, data: bytes) -> None:
        self.wire.append(data.decode())

    def send_data(self) -> None:
        pass

    async def send(self, text: str) -> None:
        await self.release.wait()
        self.wire.append(text)


def test_a_socket_that_keeps_up_is_written_at_once_and_one_behind_is_queued_in_order() -> None:
    from engine.phone.bridge import Outgoing

    async def main() -> None:
        out, ws = Outgoing("phone"), _FakeConn()
        lat = Latency()
        out.start(ws)  # type: ignore[arg-type]
        assert out.put("a", time.monotonic(), lat) and ws.wire == ["a"] and len(lat.samples_us) == 1   # at once
        ws.buffered = 40_000                      # the peer reads slowly: over the high-water mark
        out.put("b")
        out.put("c")
        assert ws.wire == ["a"]                   # waiting, in the queue
        ws.buffered = 0                           # it caught up, but b and c wait first: d goes after them
        out.put("d")
        await asyncio.sleep(0)                    # one turn of the loop: the writer task runs
        assert ws.wire == ["a"]                   # the task holds b until its send returns
        ws.release.set()
        while len(ws.wire) < 4:
            await asyncio.sleep(0.001)            # the fake socket records sends; it has no event
        assert ws.wire == ["a", "b", "c", "d"]
        out.put("e")
        assert ws.wire[-1] == "e"                 # the queue is empty again: at once
        out.close()
        await asyncio.wait_for(out.task, 2)  # type: ignore[arg-type]
    asyncio.run(main())


def test_audio_that_starts_a_stretch_is_heard_only_once_it_reached_the_phone() -> None:
    """Audio sent to a phone that had played everything was taken as heard from its send, so a
    barge-in in a reply's first 200 ms truncated it at audio the caller never heard: the one-way
    trip's worth (the review). Once a round trip is measured, the caller hears it half a trip later."""
    clock = HeardClock(mark_every_frames=1600)
    (mark,) = clock.sent(1600, 0.0)                      # a reply's first 200 ms, to a quiet phone
    clock.echoed(mark.name, 0.3)                          # played by 0.2 s, echoed 0.1 s later
    assert clock.round_trip_s == pytest.approx(0.1)
    end = clock.end_of_item(None)
    clock.echoed(end.name, 0.31)
    start = clock.sent_frames
    clock.sent(1600, 2.0)                                 # the next reply, 1.7 s after the phone ran out
    assert clock.heard_by_caller(2.04) == start           # still on its way: nothing heard yet
    assert clock.heard_by_caller(2.10) == start + 400     # 50 ms of it played
    assert clock.heard_index(2.10) == start + 800         # the index the echoes run on is unchanged

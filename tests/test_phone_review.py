"""The phone bridge after review: a Realtime call over its budget ends, a call hung up mid-reply
keeps that reply's cost, the bridge's stop closes its calls at once, and the speech-start times
of calls do not pile up. The bridge in this test's own loop (a recording publisher instead of
the bus), the local server in a thread, fake phones."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from engine.phone.bridge import PhoneBridge
from engine.phone.simulator import FakePhone
from tests.helpers import RecordingPublisher, bridge_spec, set_twilio_token

pytestmark = pytest.mark.timeout(40)


@pytest.fixture(autouse=True)
def _twilio_token(monkeypatch: pytest.MonkeyPatch) -> str:
    return set_twilio_token(monkeypatch)


async def realtime_bridge(server: Any, pub: RecordingPublisher) -> PhoneBridge:
    bridge = PhoneBridge(bridge_spec(server.base + "/realtime"), publisher=pub)  # type: ignore[arg-type]
    await bridge.listen()
    return bridge


# ---------------------------------------------------------------------------------------- P3
def test_a_realtime_call_over_its_budget_ends(make_server: Any) -> None:
    """The Realtime core only refuses the responses the engine asks for; server VAD makes its own.
    A call whose core says the budget is spent must end (as a GPT-Live call does), as ``budget``."""
    server = make_server(speed=10.0)
    pub = RecordingPublisher()

    async def main() -> None:
        bridge = await realtime_bridge(server, pub)
        bridge.budget_usd = 1e-9                       # spent by the first reply
        phone = await FakePhone(bridge.url).dial()
        await pub.wait("session.config", phone_call_id=phone.call_sid)
        bridge.on_bus("cmd.say", {"text": "Hello", "phone_call_id": phone.call_sid, "id": "s1"})
        await pub.wait("engine.budget", phone_call_id=phone.call_sid, exceeded=True)
        ended = await pub.wait("phone.call.ended", phone_call_id=phone.call_sid, timeout_s=15)
        assert ended["reason"] == "budget"
        err = await pub.wait("engine.error", phone_call_id=phone.call_sid, code="budget_exceeded")
        assert err["call_fatal"] is True and "fatal" not in err
        await asyncio.wait_for(phone.closed.wait(), 10)   # the caller's line is closed
        assert phone.ws is not None and phone.ws.close_code == 1011
        bridge.stop.set()
        await bridge.close()
    asyncio.run(main())


# ---------------------------------------------------------------------------------------- P7
def test_a_call_hung_up_mid_reply_is_charged_for_that_reply(make_server: Any) -> None:
    """At a hang-up the reply in flight is cancelled and its ``response.done`` (its usage) waited
    for, a bounded while, before the socket closes: the call's usd includes it."""
    server = make_server(speed=1.0)
    pub = RecordingPublisher()

    async def main() -> None:
        bridge = await realtime_bridge(server, pub)
        phone = await FakePhone(bridge.url).dial()
        sid = phone.call_sid
        await pub.wait("session.config", phone_call_id=sid)
        bridge.on_bus("cmd.say", {"text": "Tell me a long story about the sea and its ships, please.",
                                  "phone_call_id": sid, "id": "s1"})
        await asyncio.wait_for(phone.got_audio.wait(), 15)
        assert not pub.all("response.done", phone_call_id=sid)       # still speaking
        await phone.hang_up()
        ended = await pub.wait("phone.call.ended", phone_call_id=sid)
        assert pub.all("client.response.cancel", phone_call_id=sid), "the reply in flight was not cancelled"
        done = pub.all("response.done", phone_call_id=sid)
        assert done and done[-1]["status"] == "cancelled" and done[-1]["usd"] > 0
        assert ended["usd"] == pytest.approx(pub.all("cost.session", phone_call_id=sid)[-1]["usd"], abs=1e-6)
        assert ended["usd"] >= done[-1]["usd"]
        assert not pub.all("engine.error", phone_call_id=sid)
        bridge.stop.set()
        await bridge.close()
    asyncio.run(main())


# ---------------------------------------------------------------------------------------- P9
def test_the_bridge_stop_closes_its_calls_at_once(make_server: Any) -> None:
    """Three calls whose phones never answer the close: each close waits its close timeout (1 s
    here). One after another the stop took 3 s; together it takes one."""
    server = make_server(speed=10.0)
    pub = RecordingPublisher()

    async def main() -> None:
        bridge = await realtime_bridge(server, pub)
        phones = [await FakePhone(bridge.url).dial() for _ in range(3)]
        for p in phones:
            await pub.wait("session.config", phone_call_id=p.call_sid)
        for p in phones:
            assert p.ws is not None
            for t in p.tasks:
                t.cancel()
            p.ws.transport.pause_reading()              # deaf: the bridge's close frame is never answered
        for call in bridge.calls.values():
            call.ws.close_timeout = 1.0
        bridge.stop.set()
        t0 = time.monotonic()
        await bridge.close()
        took = time.monotonic() - t0
        assert took < 2.5, f"the stop took {took:.1f} s"
        ended = await pub.wait_many("phone.call.ended", 3)
        assert {e["reason"] for e in ended} == {"bridge_stopped"}
        for p in phones:
            assert p.ws is not None
            p.ws.transport.abort()
    asyncio.run(main())


# ---------------------------------------------------------------------------------------- P10
def test_speech_start_times_are_dropped_at_speech_stopped_and_at_the_calls_end(make_server: Any) -> None:
    server = make_server(speed=10.0)
    pub = RecordingPublisher()

    async def main() -> None:
        bridge = await realtime_bridge(server, pub)
        a, b = FakePhone(bridge.url), FakePhone(bridge.url)
        for p in (a, b):
            await p.dial()
            await pub.wait("session.config", phone_call_id=p.call_sid)
        call_a, call_b = bridge.calls[a.call_sid], bridge.calls[b.call_sid]
        call_a.received({"type": "input_audio_buffer.speech_started"}, time.monotonic())
        call_b.received({"type": "input_audio_buffer.speech_started"}, time.monotonic())
        assert set(bridge.last_speech_started_s) == {a.call_sid, b.call_sid}
        call_a.received({"type": "input_audio_buffer.speech_stopped"}, time.monotonic())   # no barge-in came of it
        assert set(bridge.last_speech_started_s) == {b.call_sid}
        await b.hang_up()
        await pub.wait("phone.call.ended", phone_call_id=b.call_sid)
        assert bridge.last_speech_started_s == {}
        await a.hang_up()
        await pub.wait("phone.call.ended", phone_call_id=a.call_sid)
        bridge.stop.set()
        await bridge.close()
    asyncio.run(main())


def test_a_copy_of_a_tool_for_every_call_is_answered_not_run_again() -> None:
    """A client's copy of a tool registered for every call re-registered it in each call and got a
    second, unmarked cmd.done (the review of the clients' re-send)."""
    pub = RecordingPublisher()
    bridge = PhoneBridge(bridge_spec("ws://127.0.0.1:9/v1/realtime", auth="none"), publisher=pub)  # type: ignore[arg-type]
    tool = {"name": "lookup", "owner": "tools:1", "id": "t1"}
    bridge.on_bus("cmd.tool.register", tool)
    bridge.on_bus("cmd.tool.register", tool)
    dones = [b for t, b in pub.msgs if t == "cmd.done" and b.get("id") == "t1"]
    assert [d.get("repeated", False) for d in dones] == [False, True] and dones[1]["calls"] == 0
    bridge.on_bus("cmd.tool.register", {"name": "bad", "timeout_s": float("nan"), "id": "t2"})   # refused once, here
    (bad,) = [b for t, b in pub.msgs if t == "cmd.done" and b.get("id") == "t2"]
    assert bad["ok"] is False and bad["code"] == "bad_command" and list(bridge.global_tools) == ["lookup"]

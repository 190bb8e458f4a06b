"""A call that crashes takes no other call with it: the phone bridge in this test's own loop (a
recording publisher instead of the bus), the local server in a thread, fake phones; one call's
handler is made to raise, on the phone side and on the API side, and the other calls go on."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from engine.phone.bridge import Call, PhoneBridge, call_session
from engine.phone.simulator import FakePhone
from engine.realtime.records import Input, ServerEvent
from tests.helpers import RecordingPublisher, bridge_spec, set_twilio_token


@pytest.fixture(autouse=True)
def _twilio_token(monkeypatch: pytest.MonkeyPatch) -> str:
    return set_twilio_token(monkeypatch)


@pytest.mark.timeout(40)
def test_one_calls_crash_ends_that_call_only(make_server: Any) -> None:
    server = make_server(speed=10.0)
    pub = RecordingPublisher()

    async def main() -> None:
        bridge = PhoneBridge(bridge_spec(server.base + "/realtime"), publisher=pub)  # type: ignore[arg-type]
        url = await bridge.listen()
        phones = [await FakePhone(url).dial() for _ in range(3)]
        for p in phones:
            await pub.wait("session.config", phone_call_id=p.call_sid)
        a, b, c = phones
        calls: dict[str, Call] = dict(bridge.calls)

        # phone side: a's DTMF handler raises (as a bug would)
        def broken_dtmf(*_: Any) -> None:
            raise RuntimeError("injected fault")
        calls[a.call_sid].on_dtmf = broken_dtmf  # type: ignore[method-assign,assignment]
        # API side: b's handling of its first audio delta raises (in its API link, which reads the socket)
        b_link = calls[b.call_sid].link
        assert b_link is not None
        b_step = b_link.step

        def broken_step(rec: Input) -> None:
            if isinstance(rec, ServerEvent) and rec.event.get("type") == "response.output_audio.delta":
                raise RuntimeError("injected fault in the API side")
            b_step(rec)
        b_link.step = broken_step  # type: ignore[method-assign]

        await a.press("5")
        failed_a = await pub.wait("engine.error", code="call_failed", phone_call_id=a.call_sid)
        assert "injected fault" in failed_a["message"] and failed_a["call_fatal"]
        assert (await pub.wait("phone.call.ended", phone_call_id=a.call_sid))["reason"] == "error"
        await asyncio.wait_for(a.closed.wait(), 5)   # the crashed call's phone socket is closed

        bridge.on_bus("cmd.say", {"text": "Hello b", "phone_call_id": b.call_sid, "id": "b1"})
        bridge.on_bus("cmd.say", {"text": "Hello c", "phone_call_id": c.call_sid, "id": "c1"})
        await pub.wait("engine.error", code="call_failed", phone_call_id=b.call_sid)
        assert (await pub.wait("phone.call.ended", phone_call_id=b.call_sid))["reason"] == "error"
        await asyncio.wait_for(b.closed.wait(), 5)

        # c never noticed: its reply plays to the end, and it takes the next one
        await pub.wait("response.done", request_id="c1", phone_call_id=c.call_sid)
        await pub.wait("playout.stopped", phone_call_id=c.call_sid)
        bridge.on_bus("cmd.say", {"text": "Still there?", "phone_call_id": c.call_sid, "id": "c2"})
        await pub.wait("response.done", request_id="c2", phone_call_id=c.call_sid)
        assert c.played_frames > 0 and not c.closed.is_set()
        assert set(bridge.calls) == {c.call_sid}
        assert [e["phone_call_id"] for e in pub.all("engine.error", code="call_failed")] == [a.call_sid, b.call_sid]
        await c.hang_up()
        assert (await pub.wait("phone.call.ended", phone_call_id=c.call_sid))["reason"] == "stop"
        bridge.stop.set()
        await bridge.close()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_twenty_calls_at_once_are_each_answered_and_end_cleanly(make_server: Any) -> None:
    server = make_server(speed=4.0)
    pub = RecordingPublisher()

    async def main() -> None:
        bridge = PhoneBridge(bridge_spec(server.base + "/realtime"), publisher=pub)  # type: ignore[arg-type]
        url = await bridge.listen()
        phones = await asyncio.gather(*(FakePhone(url, custom_parameters={"n": str(i)}).dial() for i in range(20)))
        for p in phones:
            await pub.wait("session.config", phone_call_id=p.call_sid, timeout_s=30)
        for i, p in enumerate(phones):
            bridge.on_bus("cmd.say", {"text": f"Hello caller number {i}", "phone_call_id": p.call_sid,
                                      "id": f"s{i}"})
        for i, p in enumerate(phones):
            done = await pub.wait("response.done", request_id=f"s{i}", timeout_s=30)
            assert done["phone_call_id"] == p.call_sid and f"number {i}" in done["text"]
            await pub.wait("playout.stopped", phone_call_id=p.call_sid, timeout_s=30)
        assert all(p.played_frames == p.received_frames > 0 for p in phones)
        await asyncio.gather(*(p.hang_up() for p in phones))
        for p in phones:
            ended = await pub.wait("phone.call.ended", phone_call_id=p.call_sid)
            assert ended["reason"] == "stop" and ended["phone_errors"] == 0 and ended["api_errors"] == 0
            assert ended["custom_parameters"] == p.custom_parameters
        assert pub.all("engine.error") == [] and bridge.calls == {}
        bridge.stop.set()
        await bridge.close()
    asyncio.run(main())


@pytest.mark.timeout(40)
def test_a_session_the_api_refuses_ends_that_call_not_the_engine(make_server: Any) -> None:
    """A GPT-Live call whose ``session.start`` the API refuses: its core's error was published as
    the engine's ``fatal`` one, which stops the engine and every call on it (the supervisor stops
    on any fatal error from its children), while the refused call itself stayed up in silence.
    Now the error is that call's (``call_fatal``), the call ends (``api_refused``), and the next
    call on the same bridge starts its session."""
    server = make_server(speed=10.0)
    pub = RecordingPublisher()

    async def main() -> None:
        spec = bridge_spec(server.base + "/live/sessions", model="gpt-live-1")
        refused = dict(spec.session, delegation={"type": "responses"})   # the local server does not run it
        bridge = PhoneBridge(spec, publisher=pub)  # type: ignore[arg-type]
        good_session = bridge.session
        bridge.session = call_session(refused)
        url = await bridge.listen()
        a = await FakePhone(url).dial()
        err = await pub.wait("engine.error", code="unsupported_delegation", phone_call_id=a.call_sid)
        assert err["call_fatal"] is True and "fatal" not in err and "ending the call" in err["message"], err
        assert (await pub.wait("phone.call.ended", phone_call_id=a.call_sid))["reason"] == "api_refused"
        await asyncio.wait_for(a.closed.wait(), 5)
        bridge.session = good_session
        b = await FakePhone(url).dial()
        started = await pub.wait("session.config", phone_call_id=b.call_sid)
        assert started["session"]["audio"]["format"] == {"type": "audio/pcmu", "rate": 8000}
        await b.hang_up()
        await pub.wait("phone.call.ended", phone_call_id=b.call_sid)
        await bridge.close()
        assert not [m for t, m in pub.msgs if t == "engine.error" and m.get("fatal")], "a call's error stopped the engine"
    asyncio.run(main())


@pytest.mark.timeout(40)
@pytest.mark.parametrize("model, path, sent_as", [("gpt-live-1", "/live/sessions", "session.thinking.append"),
                                                  (None, "/realtime", "conversation.item.create")])
def test_a_keypad_digit_reaches_the_model_on_either_api(make_server: Any, model: str | None, path: str,
                                                        sent_as: str) -> None:
    """``phone.dtmf_to_model: reply`` sent the digit as a user message, which GPT-Live refuses (it
    takes no user text): every key press was an ``engine.error`` and the model never heard it. On
    GPT-Live it now goes as context; on Realtime it is still a user message."""
    server = make_server(speed=10.0)
    pub = RecordingPublisher()

    async def main() -> None:
        spec = bridge_spec(server.base + path, model=model, dtmf_to_model="reply")
        bridge = PhoneBridge(spec, publisher=pub)  # type: ignore[arg-type]
        url = await bridge.listen()
        phone = await FakePhone(url).dial()
        await pub.wait("session.config", phone_call_id=phone.call_sid)
        await phone.press("5")
        sent = await pub.wait("client." + sent_as, phone_call_id=phone.call_sid)
        assert "key 5" in json.dumps(sent)
        if model:   # GPT-Live places it on the session's timeline, which moves with the call's audio
            placed = await pub.wait("live.context", phone_call_id=phone.call_sid, timeout_s=10)
            assert "key 5" in placed["text"] and placed["kind"] == "thinking"
        await phone.hang_up()
        await pub.wait("phone.call.ended", phone_call_id=phone.call_sid)
        await bridge.close()
        assert not [m for t, m in pub.msgs if t == "engine.error"], [m for t, m in pub.msgs if t == "engine.error"]
    asyncio.run(main())

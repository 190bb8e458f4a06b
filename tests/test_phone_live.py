"""A GPT-Live call's end through the bridge: the session is closed with ``session.close`` before
its socket, so the call's cost includes its last seconds. The bridge in this test's own loop, the
local GPT-Live server in a thread, a fake phone."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.phone.bridge import PhoneBridge
from engine.phone.simulator import FakePhone
from tests.helpers import RecordingPublisher, bridge_spec, set_twilio_token

pytestmark = pytest.mark.timeout(40)


async def live_call(server: Any, pub: RecordingPublisher) -> tuple[PhoneBridge, FakePhone]:
    """A bridge to ``server``'s GPT-Live in this loop, and a fake phone that dialled it."""
    spec = bridge_spec(server.base + "/live/sessions", model="gpt-live-1")
    bridge = PhoneBridge(spec, publisher=pub)  # type: ignore[arg-type]
    return bridge, await FakePhone(await bridge.listen()).dial()


def test_a_call_that_hangs_up_is_charged_for_its_last_seconds(make_server: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-Live reports usage every 15 s of the session and in its ``session.closed``. The bridge
    closed the socket at a hang-up without ``session.close``: a call under 15 s reported $0 (and
    every call left up to 15 s out), and the session was not known to be finalized."""
    set_twilio_token(monkeypatch)
    server = make_server(speed=1.0)
    pub = RecordingPublisher()

    async def main() -> None:
        bridge, phone = await live_call(server, pub)
        await pub.wait("session.config", phone_call_id=phone.call_sid)
        await asyncio.wait_for(phone.got_audio.wait(), 10)
        await asyncio.sleep(2.5)   # the call's length: what it is charged for (no event marks it)
        await phone.hang_up()
        ended = await pub.wait("phone.call.ended", phone_call_id=phone.call_sid)
        await bridge.close()
        assert pub.all("client.session.close", phone_call_id=phone.call_sid), "the session was not closed"
        closed = await pub.wait("phone.call.status", phone_call_id=phone.call_sid, state="session_closed")
        assert closed["reason"] == "close_requested"
        (cost,) = pub.all("cost.session", phone_call_id=phone.call_sid)[-1:]
        assert cost["seconds"] >= 2 and ended["usd"] == pytest.approx(cost["usd"], abs=1e-6) and ended["usd"] > 0
    asyncio.run(main())


def test_a_session_near_its_expiry_is_renewed_at_a_quiet_moment(make_server: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A session of 125 s: RENEW_BEFORE_S (120 s) before its ``expires_at``, at the first quiet
    moment, the call's core closes it and a new one starts with the conversation; the server never
    expires it (it would cut the model mid-sentence)."""
    from engine.server.faults import Faults
    set_twilio_token(monkeypatch)
    monkeypatch.setattr("engine.realtime.live_core.RENEW_MIN_AGE_S", 3.0)   # (60 s: a real session's)
    server = make_server(speed=1.0, faults=Faults(max_session_s=125))
    pub = RecordingPublisher()

    async def main() -> None:
        bridge, phone = await live_call(server, pub)
        first, second = await pub.wait_many("server.session.started", 2, phone_call_id=phone.call_sid, timeout_s=15)
        assert first["session"]["id"] != second["session"]["id"]
        status = [m for t, m in pub.msgs if t == "phone.call.status" and m.get("phone_call_id") == phone.call_sid]
        assert [m["state"] for m in status if m.get("state") in ("renewing", "session_closed")] == \
            ["renewing", "session_closed"], status
        assert not [m for t, m in pub.msgs if t == "server.session.closed" and m.get("reason") == "expired"]
        await phone.hang_up()
        await pub.wait("phone.call.ended", phone_call_id=phone.call_sid)
        await bridge.close()
    asyncio.run(main())

"""The phone port is closed to strangers: the bridge in this test's own loop (a recording publisher
instead of the bus), the local server in a thread, fake phones and raw sockets. Unsigned upgrades
get a 403 and no API session; a token is checked at start before the API socket opens; max_calls
holds at start; sockets that never start or go quiet are closed; a 50 MB frame ends its call
cleanly; junk frames are reported once a second with a count, never a traceback."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine.phone.bridge import PhoneBridge
from engine.phone.guard import SIGNATURE_HEADER, twilio_signature
from engine.phone.simulator import FakePhone
from tests.helpers import RecordingPublisher, bridge_spec, set_twilio_token

pytestmark = pytest.mark.timeout(40)


@pytest.fixture(autouse=True)
def _twilio_token(monkeypatch: pytest.MonkeyPatch) -> str:
    return set_twilio_token(monkeypatch)


def run_bridge(server: Any, test: Any, **phone: Any) -> RecordingPublisher:
    """``await test(bridge, pub)`` with a bridge on a free port in this loop; closed after."""
    pub = RecordingPublisher()

    async def main() -> None:
        bridge = PhoneBridge(bridge_spec(server.base + "/realtime", **phone), publisher=pub)  # type: ignore[arg-type]
        await bridge.listen()
        try:
            await test(bridge, pub)
        finally:
            bridge.stop.set()
            await bridge.close()
    asyncio.run(main())
    return pub


async def raw(url: str, signed: bool = True, token: str | None = None) -> ClientConnection:
    """A WebSocket to the bridge that sends nothing by itself (signed as the fake phone signs)."""
    import os
    headers = {SIGNATURE_HEADER: twilio_signature(os.environ["TWILIO_AUTH_TOKEN"], url)} if signed else {}
    return await connect(url + (f"?token={token}" if token else ""), additional_headers=headers,
                         max_size=None, compression=None, ping_interval=None)


def start_msg(call_sid: str = "CA1", **params: str) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ" + call_sid,
                       "start": {"streamSid": "MZ" + call_sid, "accountSid": "AC1", "callSid": call_sid,
                                 "tracks": ["inbound"], "customParameters": params,
                                 "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})


async def closed_with(ws: ClientConnection, timeout_s: float = 10) -> tuple[int, str]:
    """The close code and reason the bridge sent."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout_s)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, exc
        return exc.rcvd.code, exc.rcvd.reason


def sessions(pub: RecordingPublisher) -> int:
    """API sessions the bridge opened (each publishes its session.config) or calls it started."""
    return len(pub.all("session.config")) + len(pub.all("phone.call.started"))


def test_an_unsigned_or_badly_signed_upgrade_gets_403_and_no_session(make_server: Any) -> None:
    server = make_server()

    async def test(bridge: PhoneBridge, pub: RecordingPublisher) -> None:
        for phone in (FakePhone(bridge.url, auth_token=""), FakePhone(bridge.url, auth_token="not-the-token")):
            with pytest.raises(InvalidStatus) as err:
                await phone.dial()
            assert err.value.response.status_code == 403
            assert err.value.response.body in (b"Forbidden\n", b"", None)       # no detail
        with pytest.raises(InvalidStatus):                                      # signed for another URL
            await connect(bridge.url + "?x=1", additional_headers=FakePhone(bridge.url).headers())
        good = await FakePhone(bridge.url).dial()
        await pub.wait("session.config", phone_call_id=good.call_sid)
        await good.hang_up()
        await pub.wait("phone.call.ended", phone_call_id=good.call_sid)
        assert bridge.refused["unauthenticated"] == 3 and sessions(pub) == 2     # the signed call's only
        bridge.flush_port_reports()
        reports = pub.all("engine.error", code="unauthenticated")
        assert reports and sum(r["count"] for r in reports) <= 3
        assert "X-Twilio-Signature" in reports[0]["message"] and bridge.auth.secret not in json.dumps(pub.msgs)
    run_bridge(server, test)


def test_a_token_is_checked_at_start_before_the_api_socket_and_never_published(make_server: Any,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_server()
    monkeypatch.setenv("REALTALK_PHONE_TOKEN", "deployment-s3cret")

    async def test(bridge: PhoneBridge, pub: RecordingPublisher) -> None:
        for token in (None, "wrong"):
            phone = FakePhone(bridge.url, auth_token="", token=token)
            await phone.dial()
            await asyncio.wait_for(phone.closed.wait(), 10)
            assert phone.ws is not None and phone.ws.close_code == 1008 and phone.ws.close_reason == "unauthorized"
        with pytest.raises(InvalidStatus):                   # a wrong token in the URL: refused at the upgrade
            await raw(bridge.url, signed=False, token="wrong")
        assert sessions(pub) == 0 and bridge.refused["unauthenticated"] == 3
        in_url = await raw(bridge.url, signed=False, token="deployment-s3cret")
        await in_url.send(start_msg("CAurl"))
        good = await FakePhone(bridge.url, auth_token="", token="deployment-s3cret",
                               custom_parameters={"booking": "ZX9"}).dial()
        started = await pub.wait("phone.call.started", phone_call_id=good.call_sid)
        assert started["custom_parameters"] == {"booking": "ZX9"}          # the token taken out
        await pub.wait("session.config", phone_call_id="CAurl")
        await good.hang_up()
        await in_url.close()
        await pub.wait("phone.call.ended", phone_call_id=good.call_sid)
        assert "deployment-s3cret" not in json.dumps(pub.msgs)
    run_bridge(server, test, auth="token")


def test_max_calls_holds_at_start_and_a_refused_call_is_closed_with_its_reason(make_server: Any) -> None:
    server = make_server()

    async def test(bridge: PhoneBridge, pub: RecordingPublisher) -> None:
        early = await raw(bridge.url)                         # connected before the calls, starts after them
        a, b = FakePhone(bridge.url), FakePhone(bridge.url)
        await a.dial()
        await b.dial()
        for p in (a, b):
            await pub.wait("session.config", phone_call_id=p.call_sid)
        await early.send(start_msg("CAlate"))
        assert await closed_with(early) == (1013, "at capacity (2 calls)")
        with pytest.raises(InvalidStatus) as err:             # the calls at max_calls: 503 at the upgrade
            await FakePhone(bridge.url).dial()
        assert err.value.response.status_code == 503
        assert len(bridge.calls) == 2 and bridge.refused["at_capacity"] == 2
        assert not pub.all("phone.call.started", phone_call_id="CAlate") and sessions(pub) == 4
        status = bridge.status()
        assert status["refused"]["at_capacity"] == 2 and status["refused_calls"] == 2
        bridge.flush_port_reports()
        assert any("CAlate" in r["message"] and "phone.max_calls" in r["message"]
                   for r in pub.all("engine.error", code="at_capacity"))
        await asyncio.gather(a.hang_up(), b.hang_up())
    run_bridge(server, test, max_calls=2)


def test_200_connections_that_each_send_start_open_no_more_than_max_calls(make_server: Any) -> None:
    server = make_server()

    async def test(bridge: PhoneBridge, pub: RecordingPublisher) -> None:
        async def one(i: int) -> ClientConnection | None:
            try:
                ws = await raw(bridge.url)
            except InvalidStatus:
                return None
            await ws.send(start_msg(f"CA{i}"))
            return ws
        conns = await asyncio.gather(*(one(i) for i in range(200)))
        await asyncio.sleep(1.0)   # every start handled: the counts must not move past 5 (no event for "no more")
        assert len(bridge.calls) == 5 and len(pub.all("phone.call.started")) == 5
        assert sum(bridge.refused.values()) == 195
        await asyncio.gather(*(c.close() for c in conns if c is not None))
    run_bridge(server, test, max_calls=5)


def test_a_socket_that_never_sends_start_is_closed_and_so_is_an_idle_call(make_server: Any) -> None:
    server = make_server()

    async def test(bridge: PhoneBridge, pub: RecordingPublisher) -> None:
        t0 = time.monotonic()
        silent = await raw(bridge.url)
        assert await closed_with(silent) == (1008, "no start within 0.5 s")
        assert 0.4 <= time.monotonic() - t0 < 5
        quiet = await raw(bridge.url)
        await quiet.send(start_msg("CAquiet"))               # then nothing: no media, no stop
        await pub.wait("session.config", phone_call_id="CAquiet")
        assert await closed_with(quiet) == (1008, "nothing for 1.5 s")
        ended = await pub.wait("phone.call.ended", phone_call_id="CAquiet")
        assert ended["reason"] == "idle_timeout"
        assert bridge.refused["start_timeout"] == 1 and bridge.refused["idle_timeout"] == 1 and bridge.pending == 0
    run_bridge(server, test, start_timeout_s=0.5, idle_timeout_s=1.5)


def test_a_50_mb_frame_ends_that_call_cleanly_and_leaves_no_error_behind(make_server: Any) -> None:
    server = make_server()
    loop_errors: list[dict[str, Any]] = []

    async def test(bridge: PhoneBridge, pub: RecordingPublisher) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
        phone = await FakePhone(bridge.url).dial()
        other = await FakePhone(bridge.url).dial()
        await pub.wait("session.config", phone_call_id=phone.call_sid)
        try:
            await phone.send_raw("x" * (50 << 20))
        except ConnectionClosed:
            pass
        await asyncio.wait_for(phone.closed.wait(), 10)
        ended = await pub.wait("phone.call.ended", phone_call_id=phone.call_sid)
        assert ended["reason"] == "frame_too_big"
        assert phone.ws is not None and phone.ws.close_code == 1009
        err = await pub.wait("engine.error", code="frame_too_big")
        assert "phone.max_frame_bytes 65536" in err["message"], err
        await asyncio.sleep(0.3)   # its tasks end on their own (they hold no event to await)
        # the phone stopped talking once its socket closed: none of its tasks died of a closed transport
        assert all(t.done() and (t.cancelled() or t.exception() is None) for t in phone.tasks), \
            [t.exception() for t in phone.tasks if t.done() and not t.cancelled()]
        assert other.call_sid in bridge.calls and not other.closed.is_set()   # the other call goes on
        await other.hang_up()
    run_bridge(server, test)
    assert loop_errors == []


def test_junk_frames_are_counted_and_reported_once_a_second_with_an_example(make_server: Any,
                                                                            capfd: pytest.CaptureFixture[str]) -> None:
    server = make_server()

    async def test(bridge: PhoneBridge, pub: RecordingPublisher) -> None:
        phone = await FakePhone(bridge.url).dial()
        await pub.wait("session.config", phone_call_id=phone.call_sid)
        t0 = time.monotonic()
        for i in range(3000):
            await phone.send_raw("{junk" if i % 3 else json.dumps({"event": "wobble", "n": i}))
        await asyncio.sleep(max(0.0, t0 + 2.2 - time.monotonic()))   # the last second's count has gone out
        reports = pub.all("engine.error", phone_call_id=phone.call_sid)
        elapsed_s = time.monotonic() - t0
        assert 1 <= len(reports) <= elapsed_s + 1, (len(reports), elapsed_s)
        assert sum(r["count"] for r in reports) == 3000
        assert reports[0]["message"].startswith("phone message refused: event: 'wobble' is not one of")
        assert all(len(r["message"]) < 200 for r in reports)
        await phone.hang_up()
        ended = await pub.wait("phone.call.ended", phone_call_id=phone.call_sid)
        assert ended["phone_errors"] == 3000 and ended["reason"] == "stop"
    run_bridge(server, test, max_messages_per_s=100_000)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_more_messages_than_the_rate_close_the_socket(make_server: Any) -> None:
    server = make_server()

    async def test(bridge: PhoneBridge, pub: RecordingPublisher) -> None:
        phone = await FakePhone(bridge.url).dial()
        await pub.wait("session.config", phone_call_id=phone.call_sid)
        try:
            for _ in range(400):
                await phone.send_raw('{"event": "dtmf", "dtmf": {"digit": "1"}}')
        except ConnectionClosed:
            pass
        await asyncio.wait_for(phone.closed.wait(), 10)
        assert phone.ws is not None and (phone.ws.close_code, phone.ws.close_reason) == \
            (1008, "over 100 messages a second")
        assert (await pub.wait("phone.call.ended", phone_call_id=phone.call_sid))["reason"] == "rate_limited"
    run_bridge(server, test, max_messages_per_s=100)


def test_a_start_with_a_bad_sample_rate_names_the_field_and_the_value(make_server: Any) -> None:
    server = make_server()

    async def test(bridge: PhoneBridge, pub: RecordingPublisher) -> None:
        ws = await raw(bridge.url)
        bad = json.loads(start_msg("CAbad"))
        bad["start"]["mediaFormat"]["sampleRate"] = "abc"
        await ws.send(json.dumps(bad))
        assert await closed_with(ws) == (1008, "bad start: media_format")
        err = await pub.wait("engine.error", code="media_format")
        assert err["message"] == ("phone message refused: start.mediaFormat.sampleRate: 'abc' is not an integer "
                                  "(only audio/x-mulaw at 8000 Hz mono is spoken)") and err["call_fatal"]
        assert pub.all("engine.error", code="call_failed") == [] and sessions(pub) == 0
    run_bridge(server, test)


def test_junk_that_is_not_a_websocket_is_reported_once_a_second_not_as_tracebacks(
        make_server: Any, capfd: pytest.CaptureFixture[str]) -> None:
    server = make_server()

    async def test(bridge: PhoneBridge, pub: RecordingPublisher) -> None:
        port = int(bridge.url.split(":")[2].split("/")[0])
        for _ in range(20):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"hello\r\n")
            await w.drain()
            w.close()
        await asyncio.sleep(1.1)   # reports go out once a second: the 20 land in one or two
        bridge.flush_port_reports()
        reports = pub.all("engine.error", code="bad_handshake")
        assert 1 <= len(reports) <= 2 and sum(r["count"] for r in reports) == 20, reports
        assert "did not receive a valid HTTP request" in reports[0]["message"]
    run_bridge(server, test)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "opening handshake failed" not in out + err

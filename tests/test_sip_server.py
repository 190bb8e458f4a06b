"""The local server's SIP stand-in, driven by the official SDK: webhooks it signs, the call
endpoints of both APIs with their documented errors, the Realtime call socket and the Live
sideband, every event validated against the SDK's types."""
from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from openai import AsyncOpenAI, ConflictError, InvalidWebhookSignatureError, NotFoundError

from engine.httpio import request
from tests.helpers import WebhookSink, call_report, place_call

SECRET = "whsec_" + base64.b64encode(b"stand-in test secret 0123456789").decode()
SPEED = 8.0


@pytest.fixture
def sip_server(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", SECRET)
    return make_server(speed=SPEED)


def base_of(server: Any) -> str:
    return f"http://127.0.0.1:{server.port}/v1"


def client_of(server: Any) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="sk-test", base_url=base_of(server), webhook_secret=SECRET, max_retries=0)


async def ring(server: Any, sink: WebhookSink, **body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Place a call; returns its ids and its two verified webhooks by API (unwrapped by the SDK)."""
    ids = await place_call(base_of(server), webhook_url=sink.url, **body)
    client = client_of(server)
    events = {}
    for req in await sink.take(len(body.get("webhooks", ["realtime", "live"]))):
        ev = client.webhooks.unwrap(req.body, req.headers)
        events["realtime" if ev.type == "realtime.call.incoming" else "live"] = ev
    return ids, events


@pytest.mark.timeout(60)
def test_realtime_call_socket_talks_sees_keys_and_the_caller_hangs_up(sip_server: Any, validator: Any) -> None:
    script = [{"pause_ms": 200}, {"say": "What is the capital of France?"}, {"wait": "reply"}, {"dtmf": "42"},
              {"pause_ms": 400}, {"hangup": True}]

    async def main() -> None:
        sink = WebhookSink()
        await sink.start()
        ids, ev = await ring(sip_server, sink, script=script)
        rt = ev["realtime"]
        assert rt.data.call_id == ids["call_id"] and ev["live"].data.session_id == ids["session_id"]
        assert {h.name: h.value for h in rt.data.sip_headers}["Call-ID"] == ids["sip_call_id"]
        client = client_of(sip_server)
        await client.realtime.calls.accept(rt.data.call_id, type="realtime", model="gpt-realtime",
                                           instructions="Answer briefly.")
        seen: list[dict[str, Any]] = []
        async with client.realtime.connect(call_id=rt.data.call_id) as conn:
            async for event in conn:
                raw = event.model_dump(mode="json", exclude_unset=True)
                validator.check(raw)
                seen.append(raw)
        types = [e["type"] for e in seen]
        assert types[0] == "session.created"
        assert "response.output_audio.delta" not in types           # audio stays on the SIP leg
        assert types.index("output_audio_buffer.started") < types.index("response.done") \
            < types.index("output_audio_buffer.stopped")
        keys = [e["event"] for e in seen if e["type"] == "input_audio_buffer.dtmf_event_received"]
        assert keys == ["4", "2"]
        done = next(e for e in seen if e["type"] == "response.output_audio_transcript.done")
        assert "capital of France" in done["transcript"]
        rep = await call_report(base_of(sip_server), ids["call_id"], wait_ended=True)
        assert (rep["phase"], rep["api"], rep["ended_by"]) == ("ended", "realtime", "caller")
        assert rep["caller"]["heard_replies"] == 1 and rep["caller"]["heard_speech_ms"] > 500
        sink.close()
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_live_sideband_dtmf_both_ways_and_hangup_from_the_application(sip_server: Any, live_validator: Any) -> None:
    script = [{"pause_ms": 200}, {"say": "Hello there."}, {"wait": "reply"}, {"dtmf": "7"}, {"wait": "dtmf"},
              {"say": "Goodbye."}, {"pause_ms": 5000}]

    async def main() -> None:
        sink = WebhookSink()
        await sink.start()
        ids, ev = await ring(sip_server, sink, script=script)
        sid = ev["live"].data.session_id
        assert ev["live"].data.type == "sip" and ev["live"].data.sip_media_security == "srtp"
        client = client_of(sip_server)
        await client.live.sessions.accept(sid, session={"type": "live", "model": "gpt-live-1"})
        types: list[str] = []
        async with client.live.sideband.connect(session_id=sid) as conn:
            async for event in conn:
                raw = event.model_dump(mode="json", exclude_unset=True)
                live_validator.check(raw, sideband=True)
                types.append(raw["type"])
                if raw["type"] == "transport.dtmf.received":
                    assert raw["event"] == "7"
                    await conn.transport.dtmf.send(event="9", event_id="k1")
                if raw["type"] == "transport.dtmf.sent":
                    assert (raw["event"], raw.get("client_event_id")) == ("9", "k1")
                if raw["type"] == "session.input_transcript.delta" and "Goodbye" in raw["delta"]:
                    await client.live.sessions.hangup(sid)
                if raw["type"] == "session.closed":
                    assert raw["reason"] == "close_requested"
                    break
        assert "session.output_transcript.delta" in types and "session.input_audio.append" in types
        rep = await call_report(base_of(sip_server), sid, wait_ended=True)
        assert (rep["api"], rep["ended_by"]) == ("live", "hangup")
        assert rep["caller"]["dtmf_received"] == ["9"] and not rep["caller"]["timeouts"]
        sink.close()
    asyncio.run(main())


@pytest.mark.timeout(30)
def test_one_accept_per_call_and_the_documented_errors(sip_server: Any) -> None:
    async def main() -> None:
        sink = WebhookSink()
        await sink.start()
        base = base_of(sip_server)
        client = client_of(sip_server)
        ids, ev = await ring(sip_server, sink, script=[{"pause_ms": 60000}])
        sid, cid = ids["session_id"], ids["call_id"]
        # a Live reject without status_code fails (the SDK would not send it: a raw request)
        resp = await request("POST", f"{base}/live/sessions/{sid}/reject", json_body={},
                             headers={"authorization": "Bearer x"})
        assert resp.status == 400 and resp.parsed()["error"]["param"] == "status_code"
        resp = await request("POST", f"{base}/live/sessions/{sid}/accept",
                             json_body={"session": {"type": "live", "model": "gpt-live-1",
                                                    "audio": {"format": {"type": "audio/pcmu", "rate": 8000}}}},
                             headers={"authorization": "Bearer x"})
        assert resp.status == 400 and resp.parsed()["error"]["param"] == "session.audio.format"
        resp = await request("POST", f"{base}/realtime/calls/{cid}/accept", json_body={"model": "gpt-realtime"},
                             headers={"authorization": "Bearer x"})
        assert resp.status == 400 and resp.parsed()["error"]["param"] == "type"
        await client.live.sessions.accept(sid, session={"type": "live", "model": "gpt-live-1"})
        with pytest.raises(ConflictError):   # the first accept picked Live: the Realtime id is dead
            await client.realtime.calls.accept(cid, type="realtime", model="gpt-realtime")
        with pytest.raises(ConflictError):
            await client.live.sessions.reject(sid, status_code=486)
        with pytest.raises(NotFoundError):
            await client.realtime.calls.accept("rtc_nope", type="realtime", model="gpt-realtime")
        resp = await request("POST", f"{base}/live/sessions/{sid}/refer", json_body={"target_uri": "mailto:x"},
                             headers={"authorization": "Bearer x"})
        assert resp.status == 400 and resp.parsed()["error"]["param"] == "target_uri"
        await client.live.sessions.refer(sid, target_uri="tel:+14155550123")
        rep = await call_report(base, sid, wait_ended=True)
        assert (rep["ended_by"], rep["refer_to"]) == ("refer", "tel:+14155550123")
        # a rejected Realtime call: 603 by default
        ids2, _ = await ring(sip_server, sink)
        await client.realtime.calls.reject(ids2["call_id"])
        rep = await call_report(base, ids2["call_id"])
        assert (rep["phase"], rep["reject_status"]) == ("rejected", 603)
        # not accepted within the ring time: gone
        ids3, _ = await ring(sip_server, sink, ring_timeout_s=0.2)
        await asyncio.sleep(0.3)
        with pytest.raises(NotFoundError) as err:
            await client.realtime.calls.accept(ids3["call_id"], type="realtime", model="gpt-realtime")
        assert "call_id_not_found" in str(err.value.body)
        sink.close()
    asyncio.run(main())


@pytest.mark.timeout(30)
def test_forged_stale_and_duplicate_deliveries(sip_server: Any) -> None:
    async def main() -> None:
        sink = WebhookSink()
        await sink.start()
        client = client_of(sip_server)
        await place_call(base_of(sip_server), webhook_url=sink.url, sign="forged", webhooks=["realtime"])
        [forged] = await sink.take(1)
        with pytest.raises(InvalidWebhookSignatureError):
            client.webhooks.unwrap(forged.body, forged.headers)
        await place_call(base_of(sip_server), webhook_url=sink.url, sign="stale", webhooks=["live"])
        [stale] = await sink.take(1)
        with pytest.raises(InvalidWebhookSignatureError):
            client.webhooks.unwrap(stale.body, stale.headers)
        await place_call(base_of(sip_server), webhook_url=sink.url, deliveries=2, webhooks=["realtime"])
        first, again = await sink.take(2)
        assert first.body == again.body and first.headers["webhook-id"] == again.headers["webhook-id"]
        client.webhooks.unwrap(again.body, again.headers)
        sink.close()
    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_webhook_answered_500_is_sent_again(sip_server: Any) -> None:
    async def main() -> None:
        sink = WebhookSink(status=500)
        await sink.start()
        ids = await place_call(base_of(sip_server), webhook_url=sink.url, webhooks=["live"])
        got = await sink.take(3)
        assert len({r.headers["webhook-id"] for r in got}) == 1
        rep = await call_report(base_of(sip_server), ids["call_id"])
        assert [d["status"] for d in rep["webhooks"]] == [500, 500, 500]
        sink.close()
    asyncio.run(main())


@pytest.mark.timeout(40)
def test_caller_hangs_up_mid_reply(sip_server: Any, validator: Any) -> None:
    script = [{"pause_ms": 200}, {"say": "Tell me a long story please."}, {"wait": "reply_start"}, {"hangup": True}]

    async def main() -> None:
        sink = WebhookSink()
        await sink.start()
        ids, ev = await ring(sip_server, sink, script=script, webhooks=["realtime"])
        client = client_of(sip_server)
        await client.realtime.calls.accept(ids["call_id"], type="realtime", model="gpt-realtime")
        types = []
        async with client.realtime.connect(call_id=ids["call_id"]) as conn:
            async for event in conn:
                raw = event.model_dump(mode="json", exclude_unset=True)
                validator.check(raw)
                types.append(raw["type"])
        assert "output_audio_buffer.started" in types and "output_audio_buffer.stopped" not in types
        rep = await call_report(base_of(sip_server), ids["call_id"], wait_ended=True)
        assert rep["ended_by"] == "caller" and rep["caller"]["heard_speech_ms"] < 2000
        sink.close()
    asyncio.run(main())


def test_the_stand_in_refuses_a_bad_script_and_needs_a_secret(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_WEBHOOK_SECRET", raising=False)
    server = make_server()

    async def main() -> None:
        base = base_of(server)
        resp = await request("POST", f"{base}/x/sip/calls", json_body={"webhook_url": "http://127.0.0.1:9/x"})
        assert resp.status == 400 and "OPENAI_WEBHOOK_SECRET" in resp.parsed()["error"]["message"]
        resp = await request("POST", f"{base}/x/sip/calls", json_body={"webhook_url": "http://127.0.0.1:9/x",
                                                                       "script": [{"sing": "la"}]})
        assert resp.status == 400 and "script[0]" in json.dumps(resp.parsed())
    asyncio.run(main())

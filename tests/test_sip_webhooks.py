"""Standard Webhooks as OpenAI signs them, against the official SDK's own check."""
from __future__ import annotations

import base64
import json
import time

import pytest
from openai import InvalidWebhookSignatureError, OpenAI

from engine.webhooks import (Dedup, Incoming, WebhookError, parse_incoming, secret_from_env, signed_headers,
                                 verify)

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def body_of(etype: str = "realtime.call.incoming", call_id: str = "rtc_1", **data: object) -> bytes:
    field = "call_id" if etype == "realtime.call.incoming" else "session_id"
    d = {field: call_id, "sip_headers": [{"name": "Call-ID", "value": "abc@host"},
                                         {"name": "To", "value": "<sip:+1 555 0100@sip.example>"}], **data}
    if etype == "live.transport.incoming":
        d["type"] = "sip"
    return json.dumps({"object": "event", "id": "evt_1", "type": etype, "created_at": 1791000000,
                       "data": d}, separators=(",", ":")).encode()


@pytest.mark.parametrize("secret", [SECRET, "plain-text-secret"])
def test_the_sdk_unwraps_what_we_sign(secret: str) -> None:
    body = body_of()
    now = int(time.time())
    headers = signed_headers(secret, "wh_1", now, body)
    event = OpenAI(api_key="x", webhook_secret=secret).webhooks.unwrap(body, headers)
    assert event.type == "realtime.call.incoming" and event.data.call_id == "rtc_1"
    assert verify(secret, headers, body, now) == "wh_1"


def test_a_changed_byte_or_another_secret_is_refused_by_both() -> None:
    body = body_of()
    now = int(time.time())
    headers = signed_headers(SECRET, "wh_1", now, body)
    reserialised = json.dumps(json.loads(body)).encode()   # same JSON, other bytes: the signature breaks
    client = OpenAI(api_key="x", webhook_secret=SECRET)
    for bad_body, bad_headers in ((reserialised, headers),
                                  (body, signed_headers("whsec_" + base64.b64encode(b"other").decode(), "wh_1", now,
                                                        body))):
        with pytest.raises(InvalidWebhookSignatureError):
            client.webhooks.unwrap(bad_body, bad_headers)
        with pytest.raises(WebhookError) as err:
            verify(SECRET, bad_headers, bad_body, now)
        assert err.value.code == "bad_signature"
        assert "rtc_1" not in str(err.value)   # never the body in a message


def test_any_matching_entry_of_several_signatures_accepts() -> None:
    body = body_of()
    now = int(time.time())
    good = signed_headers(SECRET, "wh_1", now, body)
    headers = {**good, "webhook-signature": "v1,AAAA " + good["webhook-signature"]}
    assert verify(SECRET, headers, body, now) == "wh_1"


@pytest.mark.parametrize("offset_s,ok,code", [(-300, True, ""), (-301, False, "stale"), (300, True, ""),
                                              (301, False, "future")])
def test_the_replay_window_is_300_s_both_ways(offset_s: int, ok: bool, code: str) -> None:
    body = body_of()
    now = 1_800_000_000
    headers = signed_headers(SECRET, "wh_1", now + offset_s, body)
    if ok:
        verify(SECRET, headers, body, now)
    else:
        with pytest.raises(WebhookError) as err:
            verify(SECRET, headers, body, now)
        assert err.value.code == code


def test_missing_headers_and_bad_timestamps_are_named() -> None:
    body = body_of()
    headers = signed_headers(SECRET, "wh_1", 100, body)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        with pytest.raises(WebhookError) as err:
            verify(SECRET, {k: v for k, v in headers.items() if k != name}, body, 100)
        assert err.value.code == "missing_header" and name in str(err.value)
    with pytest.raises(WebhookError) as err:
        verify(SECRET, {**headers, "webhook-timestamp": "soon"}, body, 100)
    assert err.value.code == "bad_timestamp"


def test_header_names_are_case_insensitive() -> None:
    body = body_of()
    headers = {k.upper(): v for k, v in signed_headers(SECRET, "wh_1", 100, body).items()}
    assert verify(SECRET, headers, body, 100) == "wh_1"


def test_the_secret_comes_from_the_environment_only() -> None:
    with pytest.raises(WebhookError) as err:
        secret_from_env({})
    assert err.value.code == "no_secret" and "OPENAI_WEBHOOK_SECRET" in str(err.value)
    assert secret_from_env({"OPENAI_WEBHOOK_SECRET": SECRET}) == SECRET
    with pytest.raises(WebhookError):
        secret_from_env({"OPENAI_WEBHOOK_SECRET": "whsec_not base64!"})


def test_dedup_remembers_ids_within_its_window_and_stays_bounded() -> None:
    d = Dedup(window_s=600, max_ids=3)
    assert not d.seen("a", 0) and d.seen("a", 10)
    assert not d.seen("b", 1) and not d.seen("c", 2) and not d.seen("e", 3)
    assert len(d) == 3                      # "a" went first
    assert not d.seen("a", 4)
    d2 = Dedup(window_s=600)
    d2.seen("x", 0)
    assert not d2.seen("x", 601)            # past the window: new again (the timestamp check refuses it anyway)


def test_parse_both_incoming_events_and_their_common_key() -> None:
    from openai.types.webhooks import LiveTransportIncomingWebhookEvent, RealtimeCallIncomingWebhookEvent
    rt_body = body_of(sip_media_security="srtp")
    live_body = body_of("live.transport.incoming", "live_1")
    RealtimeCallIncomingWebhookEvent.model_validate_json(rt_body, strict=True)
    LiveTransportIncomingWebhookEvent.model_validate_json(live_body, strict=True)
    rt, live = parse_incoming(rt_body), parse_incoming(live_body)
    assert isinstance(rt, Incoming) and isinstance(live, Incoming)
    assert (rt.api, rt.id, rt.media_security) == ("realtime", "rtc_1", "srtp")
    assert (live.api, live.id, live.media_security) == ("live", "live_1", None)
    assert rt.call_key == live.call_key == "call-id:abc@host"
    assert rt.header("call-id") == "abc@host"


def test_other_events_and_bad_bodies() -> None:
    assert parse_incoming(json.dumps({"type": "batch.completed", "data": {}}).encode()) == "batch.completed"
    for bad in (b"not json", b"[]", json.dumps({"type": "realtime.call.incoming", "data": {}}).encode()):
        with pytest.raises(WebhookError) as err:
            parse_incoming(bad)
        assert err.value.code == "bad_body"

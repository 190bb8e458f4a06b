"""engine sip's webhook endpoint and its REST answers, in the test's loop against the local
server's stand-in: verification, duplicates, the accept policy, refer and hangup."""
from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from engine.config import load_config
from engine.httpio import request
from engine.sip.service import SipService
from engine.specs import ApiAccess, BusSpec, SipSpec
from engine.webhooks import WebhookError
from tests.helpers import RecordingPublisher, call_report, place_call

SECRET = "whsec_" + base64.b64encode(b"engine sip service test secret!!").decode()


@pytest.fixture
def stand_in(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", SECRET)
    return make_server(speed=8.0)


def service(stand_in: Any, control: bool = False, **sip: Any) -> tuple[SipService, RecordingPublisher]:
    """The service; ``control``: with the socket base its calls' control sockets attach to."""
    cfg = load_config(None, {})
    pub = RecordingPublisher()
    spec = SipSpec(config=cfg, sip={**cfg["sip"], "host": "127.0.0.1", "port": 0, **sip},  # type: ignore[typeddict-item]
                   bus=BusSpec(publish="inproc://unused", subscribe="inproc://unused"),
                   rest_base=f"http://127.0.0.1:{stand_in.port}/v1",
                   ws_base=f"ws://127.0.0.1:{stand_in.port}/v1" if control else "",
                   api=ApiAccess(headers=("Authorization: Bearer sk-test",)))
    return SipService(spec, publisher=pub), pub


def test_no_secret_stops_the_start(stand_in: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_WEBHOOK_SECRET")
    with pytest.raises(WebhookError) as err:
        service(stand_in)
    assert "OPENAI_WEBHOOK_SECRET" in str(err.value)


@pytest.mark.timeout(30)
def test_accepts_once_refuses_forgeries_ignores_duplicates(stand_in: Any) -> None:
    async def main() -> None:
        svc, pub = service(stand_in, routes=[{"api": "realtime", "instructions": "Be brief."}])
        url = await svc.listen()
        base = f"http://127.0.0.1:{stand_in.port}/v1"
        ids = await place_call(base, webhook_url=url, deliveries=2, script=[{"pause_ms": 60000}])
        accepted = await pub.wait("sip.call.accepted", sip_call_id=ids["call_id"])
        assert accepted["api"] == "realtime" and accepted["accept_ms"] < 5000
        rep = await call_report(base, ids["call_id"])
        assert (rep["phase"], rep["api"], rep["accepted_with"]["instructions"]) == ("answered", "realtime", "Be brief.")
        assert rep["accepted_with"].get("audio", {}).get("input") is None      # no pinned format
        await pub.wait("sip.webhook.duplicate")
        assert svc.counts["accepted"] == 1 and svc.counts["duplicates"] >= 1
        incoming = pub.all("sip.call.incoming")
        assert {m["api"] for m in incoming} == {"realtime", "live"}
        assert [m["decision"] for m in incoming if m["api"] == "live"] == ["ignore"]
        # a forged delivery: 400, nothing accepted, the body never logged
        forged = await place_call(base, webhook_url=url, sign="forged")
        refused = await pub.wait("sip.webhook.refused")
        assert refused["code"] == "bad_signature"
        rep = await call_report(base, forged["call_id"])
        assert rep["phase"] == "ringing" and {d["status"] for d in rep["webhooks"]} == {400}
        # hang up from the service: the stand-in's call ends
        run = svc.run_of(ids["call_id"])
        assert run is not None
        assert await svc.hangup(run) == (True, "")
        rep = await call_report(base, ids["call_id"], wait_ended=True)
        assert rep["ended_by"] == "hangup"
        svc.server.close() if svc.server else None
    asyncio.run(main())


@pytest.mark.timeout(30)
def test_no_route_capacity_and_live_routes(stand_in: Any) -> None:
    async def main() -> None:
        svc, pub = service(stand_in, max_calls=1, no_route_status=603,
                           routes=[{"match": {"to": "+1 555 0100"}, "api": "live", "model": "gpt-live-1"}])
        url = await svc.listen()
        base = f"http://127.0.0.1:{stand_in.port}/v1"
        nobody = await place_call(base, webhook_url=url, to="+15559999")
        rejected = await pub.wait("sip.call.rejected")
        rep = await call_report(base, nobody["call_id"])
        assert rep["phase"] == "rejected" and rep["reject_status"] == 603 == rejected["status"]
        first = await place_call(base, webhook_url=url, to="+15550100", script=[{"pause_ms": 60000}])
        await pub.wait("sip.call.accepted", sip_call_id=first["session_id"])
        rep = await call_report(base, first["session_id"])
        assert rep["api"] == "live" and rep["accepted_with"]["session"]["type"] == "live"
        busy = await place_call(base, webhook_url=url, to="+15550100")
        await pub.wait("sip.call.rejected", status=486)
        assert (await call_report(base, busy["call_id"]))["reject_status"] == 486
        run = svc.run_of(first["session_id"])
        assert run is not None
        ok, _ = await svc.refer(run, "sip:agent@example.com")
        assert ok
        rep = await call_report(base, first["session_id"], wait_ended=True)
        assert (rep["ended_by"], rep["refer_to"]) == ("refer", "sip:agent@example.com")
        resp = await request("GET", url)
        assert resp.status == 405
        svc.server.close() if svc.server else None
    asyncio.run(main())


def test_a_live_call_that_spends_the_budget_ends_alone(stand_in: Any) -> None:
    """``budget_usd`` on a GPT-Live SIP call closes its session (the call) from the sideband. The
    core's error at the spent budget is the engine's ``fatal`` kind, which would stop the engine
    and every call; on a call it is that call's (``call_fatal``), and the call ends as ``budget``."""
    async def main() -> None:
        svc, pub = service(stand_in, control=True,
                           routes=[{"match": {"to": "+1 555 0100"}, "api": "live", "model": "gpt-live-1"}])
        svc.cfg = {**svc.cfg, "budget_usd": 0.0001}    # spent at the first usage (15 s of the call)
        from engine.sip.control import attach           # the calls' control sockets, as engine.sip.process sets
        svc.attacher = lambda run: attach(svc, run)
        url = await svc.listen()
        base = f"http://127.0.0.1:{stand_in.port}/v1"
        call = await place_call(base, webhook_url=url, to="+15550100", script=[{"pause_ms": 60000}])
        sid = call["session_id"]
        err = await pub.wait("engine.error", code="budget_exceeded", sip_call_id=sid, timeout_s=20)
        assert err["call_fatal"] is True and "fatal" not in err, err
        assert (await pub.wait("sip.call.ended", sip_call_id=sid, timeout_s=20))["how"] == "budget"
        assert not [m for t, m in pub.msgs if t == "engine.error" and m.get("fatal")]
        svc.server.close() if svc.server else None
    asyncio.run(main())

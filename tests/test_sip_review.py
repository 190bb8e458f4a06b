"""engine sip after review: capacity at the second webhook, calls never accepted are rejected,
abandoned calls are hung up (a control socket that cannot be opened, a failure, a budget, the
engine stopping), the first attach is retried, unpriced route models are refused, and refused
webhooks are reported sampled. The service in the test's loop, its REST calls faked, its control
sockets against a small WebSocket endpoint of the test's."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from engine.child import EXIT_DEVICE_FAILED
from engine.config import load_config
from engine.errors import ConfigError
from engine.httpio import HttpRequest, HttpResponse
from engine.sip.calls import OFFER_WAIT_S, Accept, Ignore, Reject, State, parse_routes
from engine.sip.service import SipService
from engine.specs import ApiAccess, BusSpec, SipSpec
from tests.helpers import RecordingPublisher
from tests.helpers import SIP_DEFAULTS as DEFAULTS
from tests.helpers import sip_offer as offer
from tests.helpers import sip_table as table

pytestmark = pytest.mark.timeout(30)
SECRET = "whsec_" + base64.b64encode(b"engine sip review test secret!!!").decode()


# ---------------------------------------------------------------------------------------- helpers
class FakeRest:
    """Stands in for the service's REST calls: records each ``(api, id, action, body)`` and answers
    the next status queued for its action (200 when none is)."""

    def __init__(self, **answers: list[int]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, str, Any]] = []
        self._changed = asyncio.Event()

    async def __call__(self, api: str, call_id: str, action: str, body: Any = None) -> HttpResponse:
        self.calls.append((api, call_id, action, body))
        self._changed.set()
        queued = self.answers.get(action) or []
        return HttpResponse(queued.pop(0) if queued else 200)

    def of(self, action: str) -> list[tuple[str, str, str, Any]]:
        return [c for c in self.calls if c[2] == action]

    async def wait(self, action: str, count: int = 1, timeout_s: float = 10.0) -> list[tuple[str, str, str, Any]]:
        async def until() -> list[tuple[str, str, str, Any]]:
            while len(self.of(action)) < count:
                self._changed.clear()
                await self._changed.wait()
            return self.of(action)
        return await asyncio.wait_for(until(), timeout_s)


class CallSocket:
    """A call's control-socket endpoint: answers the first ``refuse`` upgrades with ``status``
    (the API not ready for the call yet), then accepts; keeps what each socket sent."""

    def __init__(self, refuse: int = 0, status: int = 503) -> None:
        self.refuse, self.status = refuse, status
        self.tries = 0
        self.sockets: list[ServerConnection] = []
        self.got: list[dict[str, Any]] = []
        self.opened = asyncio.Event()
        self.server: Server | None = None

    async def start(self) -> str:
        self.server = await serve(self._handler, "127.0.0.1", 0, process_request=self._check)
        return f"ws://127.0.0.1:{list(self.server.sockets)[0].getsockname()[1]}/v1"

    def _check(self, conn: ServerConnection, request: Request) -> Response | None:
        self.tries += 1
        return conn.respond(self.status, "the call is not ready\n") if self.tries <= self.refuse else None

    async def _handler(self, ws: ServerConnection) -> None:
        self.sockets.append(ws)
        self.opened.set()
        async for text in ws:
            self.got.append(json.loads(text))

    async def send(self, event: dict[str, Any]) -> None:
        await self.sockets[-1].send(json.dumps(event))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def make_service(ws_base: str = "", rest: FakeRest | None = None, control: bool = True,
                 **sip: Any) -> tuple[SipService, RecordingPublisher, FakeRest]:
    """The service with its REST calls faked; ``control``: it attaches a control socket to each call."""
    cfg = load_config(None, {})
    pub = RecordingPublisher()
    spec = SipSpec(config=cfg, sip={**cfg["sip"], "host": "127.0.0.1", "port": 0, **sip},  # type: ignore[typeddict-item]
                   bus=BusSpec(publish="inproc://unused", subscribe="inproc://unused"),
                   rest_base="http://127.0.0.1:9/v1", ws_base=ws_base,
                   api=ApiAccess(headers=("Authorization: Bearer sk-test",)))
    svc = SipService(spec, publisher=pub, environ={"OPENAI_WEBHOOK_SECRET": SECRET})
    fake = rest if rest is not None else FakeRest()
    svc.rest = fake  # type: ignore[method-assign]
    if control:
        from engine.sip.control import attach
        svc.attacher = lambda run: attach(svc, run)
    return svc, pub, fake


async def accepted_call(svc: SipService, api: str = "realtime", call: str = "abc") -> str:
    """Offer a call (its route's API), accept it through the fake REST; its sip_call_id."""
    inc = offer(api, call)
    d = svc.table.offer(inc, time.monotonic())
    assert isinstance(d, Accept), d
    await svc._accept(d, inc, time.monotonic())
    return d.id


# ---------------------------------------------------------------------------------------- P2
def test_capacity_is_checked_again_when_a_waiting_call_is_accepted() -> None:
    """max_calls 1: two calls offered first on the API the route does not use, then on its own.
    The second must be refused busy on its own webhook, not accepted as a second live call."""
    t = table([{"api": "realtime"}], max_calls=1)
    assert isinstance(t.offer(offer("live", "1"), 0.0), Ignore)
    assert isinstance(t.offer(offer("live", "2"), 0.0), Ignore)
    first = t.offer(offer("realtime", "1"), 0.1)
    second = t.offer(offer("realtime", "2"), 0.1)
    assert isinstance(first, Accept)
    assert isinstance(second, Reject) and (second.status, second.api, second.id) == (486, "realtime", "rtc_2")
    assert t.active == 1
    c = t.get("rtc_2")
    assert c is not None and c.state is State.REJECTING


# ---------------------------------------------------------------------------------------- P5
def test_a_failed_accept_and_a_missed_call_are_rejected_by_the_table() -> None:
    t = table([{"api": "realtime"}])
    a = t.offer(offer("realtime", "1"), 0.0)
    assert isinstance(a, Accept)
    c = t.accept_failed(a.key, 500, "server_error")
    r = c.reject
    assert isinstance(r, Reject) and (r.api, r.id, r.status) == ("realtime", "rtc_1", 503)
    assert c.state is State.FAILED and "accept_failed" in (c.how or "") and c.status == 500
    gone = t.offer(offer("realtime", "2"), 0.0)
    assert isinstance(gone, Accept)
    assert t.accept_failed(gone.key, 404, "call_id_not_found").reject is None   # the call is gone: nothing to reject
    live = table([{"api": "live"}])
    assert isinstance(live.offer(offer("realtime", "3"), 0.0), Ignore)
    [m] = live.tick(OFFER_WAIT_S)
    assert m.reject is not None and (m.reject.api, m.reject.id, m.reject.status) == ("realtime", "rtc_3", 503)
    missed = live.get("rtc_3")
    assert missed is not None and missed.state is State.FAILED and missed.how == "missed" and missed.reject == m.reject


def test_the_service_rejects_a_call_it_failed_to_accept_and_one_its_route_missed() -> None:
    async def main() -> None:
        svc, pub, rest = make_service(control=False, rest=FakeRest(accept=[500]))
        sid = await accepted_call(svc)
        await rest.wait("reject")
        assert rest.of("reject") == [("realtime", sid, "reject", {"status_code": 503})]
        assert (await pub.wait("sip.call.ended", sip_call_id=sid))["how"] == "accept_failed"
        await pub.wait("sip.call.rejected", sip_call_id=sid, status=503)
        # a call whose route answers on live, offered on realtime only: given up, and rejected there
        svc.table.routes = parse_routes({"routes": [{"api": "live"}]}, DEFAULTS)
        svc.table.offer(offer("realtime", "missed"), time.monotonic() - OFFER_WAIT_S - 1)
        svc._tick()
        await rest.wait("reject", 2)
        assert rest.of("reject")[1] == ("realtime", "rtc_missed", "reject", {"status_code": 503})
        await pub.wait("sip.call.rejected", sip_call_id="rtc_missed")
        await svc.tasks.wait(5.0)
    asyncio.run(main())


# ---------------------------------------------------------------------------------------- P1
def test_a_route_model_without_a_price_is_refused_with_the_config() -> None:
    with pytest.raises(ConfigError) as err:
        parse_routes({"routes": [{"api": "realtime", "model": "gpt-realtime-unpriced"}]}, DEFAULTS)
    assert "sip.routes[0].model" in str(err.value) and "price" in str(err.value)
    with pytest.raises(ConfigError):
        parse_routes({"routes": [{"api": "live", "model": "gpt-live-9"}]}, DEFAULTS)
    parse_routes({"routes": [{"match": {"to": "1"}, "reject": 603}]}, {"model": "gpt-realtime-unpriced"})


def test_the_first_attach_is_retried_and_a_stopping_engine_hangs_its_calls_up() -> None:
    """The call's socket answers 503 at first (the API not ready right after the accept): the
    attach is tried again, not given up. Then the engine stops: the call is hung up, not left to
    run on at OpenAI with nothing steering it."""
    async def main() -> None:
        sock = CallSocket(refuse=1)
        svc, pub, rest = make_service(await sock.start())
        sid = await accepted_call(svc)
        await pub.wait("client.session.update", sip_call_id=sid, timeout_s=10)
        assert sock.tries == 2 and not pub.all("sip.call.ended")
        await svc.close()
        assert rest.of("hangup") == [("realtime", sid, "hangup", None)]
        ended = await pub.wait("sip.call.ended", sip_call_id=sid)
        assert ended["how"] == "engine_stopped" and ended["hung_up"] is True
        sock.close()
    asyncio.run(main())


def test_a_control_socket_that_never_opens_ends_the_call_as_an_error_and_hangs_it_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engine.sip.control.CONTROL_BACKOFF_S", (0.0,), raising=False)   # no waits between tries

    async def main() -> None:
        sock = CallSocket(refuse=1000)
        svc, pub, rest = make_service(await sock.start())
        sid = await accepted_call(svc)
        ended = await pub.wait("sip.call.ended", sip_call_id=sid, timeout_s=20)
        assert ended["how"] == "error", ended
        assert rest.of("hangup") == [("realtime", sid, "hangup", None)] and ended["hung_up"] is True
        errors = pub.all("engine.error", sip_call_id=sid, call_fatal=True)
        assert errors and "503" in errors[-1]["message"], pub.all("engine.error")
        assert sock.tries > 1
        assert not [m for t, m in pub.msgs if t == "engine.error" and m.get("fatal")]
        sock.close()
    asyncio.run(main())


def test_a_call_whose_control_fails_is_hung_up_with_retries() -> None:
    async def main() -> None:
        svc, pub, rest = make_service(rest=FakeRest(hangup=[503, 429]))

        async def broken(run: Any) -> str:
            raise ConfigError("model 'x' has no price")
        svc.attacher = broken
        sid = await accepted_call(svc)
        ended = await pub.wait("sip.call.ended", sip_call_id=sid)
        assert ended["how"] == "error" and ended["hung_up"] is True
        assert len(rest.of("hangup")) == 3                   # 503, 429, then 200
        assert pub.all("engine.error", sip_call_id=sid, code="call_failed")
    asyncio.run(main())


# ---------------------------------------------------------------------------------------- P3
def test_a_realtime_call_over_its_budget_is_hung_up() -> None:
    """The Realtime core only refuses responses the engine asks for; server VAD makes its own, so
    a call over budget_usd must end (hung up), as a GPT-Live call does."""
    async def main() -> None:
        sock = CallSocket()
        svc, pub, rest = make_service(await sock.start())
        svc.cfg = {**svc.cfg, "budget_usd": 0.0001}
        sid = await accepted_call(svc)
        await pub.wait("client.session.update", sip_call_id=sid, timeout_s=10)
        await sock.send({"type": "response.done", "event_id": "e1", "response": {
            "id": "resp_1", "status": "completed", "output": [],
            "usage": {"input_token_details": {"audio_tokens": 5000}, "output_token_details": {"audio_tokens": 5000}}}})
        ended = await pub.wait("sip.call.ended", sip_call_id=sid, timeout_s=10)
        assert ended["how"] == "budget" and rest.of("hangup") == [("realtime", sid, "hangup", None)]
        err = await pub.wait("engine.error", sip_call_id=sid, code="budget_exceeded")
        assert err["call_fatal"] is True and "fatal" not in err
        sock.close()
    asyncio.run(main())


# ---------------------------------------------------------------------------------------- T4
def test_refused_webhooks_are_counted_and_reported_once_a_second_per_code(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        svc, pub, _ = make_service(control=False)
        forged = HttpRequest("POST", svc.path, {"webhook-id": "msg_1", "webhook-timestamp": str(int(time.time())),
                                                "webhook-signature": "v1,AAAA"}, b"{}", "203.0.113.9:4000")
        unsigned = HttpRequest("POST", svc.path, {}, b"{}", "203.0.113.9:4001")
        with caplog.at_level(logging.WARNING, logger="realtalk.sip"):
            for _ in range(200):
                assert (await svc.handle(forged)).status == 400
                assert (await svc.handle(unsigned)).status == 400
        assert svc.counts["refused"] == 400
        first = pub.all("sip.webhook.refused")
        assert len(first) == 2 and {m["count"] for m in first} == {1}   # one a code, at once
        assert len([r for r in caplog.records if r.name == "realtalk.sip"]) <= 2
        svc.flush_refusals(time.monotonic() + 1.0)                      # the second after: the rest, counted
        reports = pub.all("sip.webhook.refused")
        assert len(reports) == 4 and sum(m["count"] for m in reports) == 400
        assert {m["code"] for m in reports} == {"bad_signature", "missing_header"}
    asyncio.run(main())


@pytest.mark.e2e
def test_engine_sip_refuses_an_unpriced_route_model_at_its_start(tmp_path: Path) -> None:
    """The process stops at once with the route's error (a setting: no restart), not a traceback."""
    from engine.specs import encode
    from tests.helpers import REPO, thread_broker
    cfg = load_config(None, {})
    with thread_broker(tmp_path) as (publish, subscribe):
        spec = SipSpec(config=cfg, sip={**cfg["sip"], "host": "127.0.0.1", "port": 0,
                                        "routes": [{"api": "realtime", "model": "gpt-realtime-unpriced"}]},
                       bus=BusSpec(publish=publish, subscribe=subscribe), rest_base="http://127.0.0.1:9/v1",
                       api=ApiAccess(headers=("Authorization: Bearer sk-test",)))
        path = tmp_path / "spec.json"
        path.write_bytes(encode(spec))
        done = subprocess.run([sys.executable, "-m", "engine.sip.process", str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=30, env={**os.environ, "OPENAI_WEBHOOK_SECRET": SECRET})
    assert done.returncode == EXIT_DEVICE_FAILED, done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------- copies of a command
def test_a_copy_of_a_hangup_or_a_tool_for_every_call_is_answered_not_run_again() -> None:
    """Clients send a command again while they wait for its outcome: engine sip carried out a
    transfer or a hang-up twice, and piled up a tool registered for every call with each copy
    (never answering it) (the review of the clients' re-send)."""
    async def main() -> None:
        svc, pub, rest = make_service(control=False)
        sid = await accepted_call(svc)
        hangup = {"sip_call_id": sid, "id": "h1"}
        svc.on_bus("cmd.sip.hangup", hangup)
        svc.on_bus("cmd.sip.hangup", hangup)                   # a copy while the first is on its way
        await pub.wait("cmd.done", timeout_s=5, where=lambda b: b.get("id") == "h1")
        svc.on_bus("cmd.sip.hangup", hangup)                   # a copy after it was answered
        run = svc.run_of(sid)
        assert run is not None
        svc.call_ended(run, "hangup")
        svc.on_bus("cmd.sip.hangup", hangup)                   # and one after the call ended: not "no such call"
        assert len(rest.of("hangup")) == 1
        dones = [b for t, b in pub.msgs if t == "cmd.done" and b.get("id") == "h1"]
        assert [d.get("repeated", False) for d in dones] == [False, True, True] and all(d["ok"] for d in dones)
        tool = {"name": "lookup", "owner": "tools:1", "id": "t1"}
        svc.on_bus("cmd.tool.register", tool)
        svc.on_bus("cmd.tool.register", tool)
        assert len(svc.global_commands) == 1
        assert [b.get("repeated", False) for t, b in pub.msgs if t == "cmd.done" and b.get("id") == "t1"] == [False, True]
        svc.on_bus("cmd.tool.register", {"name": "bad", "timeout_s": float("nan"), "id": "t2"})   # refused once, here
        (bad,) = [b for t, b in pub.msgs if t == "cmd.done" and b.get("id") == "t2"]
        assert bad["ok"] is False and bad["code"] == "bad_command" and len(svc.global_commands) == 1
    asyncio.run(main())

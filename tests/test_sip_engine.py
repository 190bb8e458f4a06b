"""`engine sip` end to end: the engine (its local backend: the local server, whose stand-in plays
OpenAI's SIP side) takes calls from the stand-in's scripted callers on Realtime and on GPT-Live,
with the car-rental back office (examples/car_rental_sip.py) in a process of its own feeding each
call's booking and answering the model's tool; control from the bus; 20 calls at once."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from bus import Publisher, Subscriber
from bus.client import load_endpoints
from tests.helpers import RunningEngine
from tests.helpers import call_report, place_call

REPO = Path(__file__).resolve().parent.parent
SECRET = "whsec_" + base64.b64encode(b"engine sip end to end secret 123").decode()
ROUTES = """
sip:
  port: 0
  routes:
    - match: {to: "+15550100"}
      api: realtime
      instructions: "You are the car-rental desk."
      tools: [{name: collection_point, description: "Where the caller collects the car.",
               parameters: {type: object, properties: {}}}]
    - match: {to: "+15550200"}
      api: live
      model: gpt-live-1
      delegation: {type: client}
    - match: {to: "+15550999"}
      reject: 603
"""
ADA = "+15550001111"                  # examples/car_rental_sip.py: booking ZX9, Northern Train Station


class SipEngine(RunningEngine):
    def status(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "engine.api.cli", "status", "--json"], capture_output=True,
                             text=True, timeout=30, env=self.env)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "REALTALK_RUNTIME_DIR": str(self.runtime)}

    def find_urls(self) -> None:
        st = self.status()
        self.base = "http://" + st["server_url"].removeprefix("ws://").removesuffix("/realtime")
        self.webhook_url = st["sip"]["url"]
        self.key = json.loads((self.runtime / "engine.json").read_text())["server_key"]


@pytest.fixture
def sip_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SipEngine]:
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", SECRET)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    cfg = tmp_path / "sip.yaml"
    cfg.write_text(ROUTES + "local_server:\n  asr: false\n")
    env = {**os.environ, "REALTALK_RUNTIME_DIR": str(run), "XDG_DATA_HOME": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "sip", "--backend", "local", "--speed", "8",
                             "--config", str(cfg), "--scenario", str(REPO / "scenarios" / "car_rental_sip.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path))
    eng = SipEngine(proc, run, tmp_path / "data")
    try:
        assert eng.ready.wait(30), "engine sip did not become ready:\n" + "".join(eng.lines)
        eng.find_urls()
        yield eng
    finally:
        eng.stop()


@pytest.fixture
def back_office(sip_engine: SipEngine) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, str(REPO / "examples" / "car_rental_sip.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=sip_engine.env, cwd=str(REPO))
    assert proc.stdout is not None
    assert "serving SIP calls" in proc.stdout.readline()
    yield proc
    proc.terminate()
    proc.wait(10)


class Bus:
    """The test's own view of the engine's bus (a third process: the test)."""

    def __init__(self, eng: SipEngine) -> None:
        ep = load_endpoints(str(eng.runtime / "engine.json"))
        self.sub = Subscriber(ep, ["sip.", "tool.call", "cmd.done", "user.transcript", "model.transcript"])
        self.pub = Publisher(ep, "test")
        assert self.pub.join(timeout_s=10)
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def wait(self, topic: str, timeout_s: float = 30, **match: Any) -> dict[str, Any]:
        for t, b in self.seen:
            if t == topic and all(b.get(k) == v for k, v in match.items()):
                return b
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.sub.recv(timeout_ms=100)
            if msg is None:
                continue
            self.seen.append(msg)
            t, b = msg
            if t == topic and all(b.get(k) == v for k, v in match.items()):
                return b
        raise AssertionError(f"no {topic} {match} in {timeout_s} s; saw {[t for t, _ in self.seen][-30:]}")

    def close(self) -> None:
        self.sub.close()
        self.pub.close()


def ring(eng: SipEngine, **body: Any) -> dict[str, Any]:
    return asyncio.run(place_call(eng.base, key=eng.key, webhook_url=eng.webhook_url, **body))


def report(eng: SipEngine, call_id: str, wait_ended: bool = True) -> dict[str, Any]:
    return asyncio.run(call_report(eng.base, call_id, wait_ended=wait_ended, key=eng.key))


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_realtime_call_with_the_back_office_dtmf_and_a_transfer(sip_engine: SipEngine,
                                                                back_office: Any) -> None:
    bus = Bus(sip_engine)
    try:
        ids = ring(sip_engine, to="+15550100", **{"from": ADA}, script=[
            {"pause_ms": 300}, {"say": "Where is the collection point?"}, {"wait": "reply", "max_s": 240},
            {"dtmf": "1#"}, {"pause_ms": 60000}])
        cid = ids["call_id"]
        accepted = bus.wait("sip.call.accepted", sip_call_id=cid)
        assert accepted["api"] == "realtime"
        bus.wait("tool.call", sip_call_id=cid, name="collection_point")       # answered by the back office
        assert bus.wait("sip.dtmf", sip_call_id=cid, key="#")["from"] == "caller"
        heard = " ".join(report(sip_engine, cid, wait_ended=False)["caller"]["heard_words"])
        assert "Northern Train Station" in heard, heard
        bus.pub.publish("cmd.sip.refer", {"sip_call_id": cid, "target_uri": "tel:+14155550123", "id": "r1"})
        assert bus.wait("cmd.done", id="r1")["ok"] is True
        ended = bus.wait("sip.call.ended", sip_call_id=cid)
        assert ended["how"] == "transferred" and ended["refer_to"] == "tel:+14155550123"
        rep = report(sip_engine, cid)
        assert (rep["ended_by"], rep["refer_to"]) == ("refer", "tel:+14155550123")
        # Realtime has no way to send keys: refused, naming the alternative
        ids2 = ring(sip_engine, to="+15550100", script=[{"pause_ms": 60000}])
        bus.wait("sip.call.started", sip_call_id=ids2["call_id"])
        bus.pub.publish("cmd.dtmf", {"sip_call_id": ids2["call_id"], "keys": "1", "id": "d1"})
        done = bus.wait("cmd.done", id="d1")
        assert done["ok"] is False and "live" in done["error"]
        bus.pub.publish("cmd.sip.hangup", {"sip_call_id": ids2["call_id"], "id": "h1"})
        assert bus.wait("sip.call.ended", sip_call_id=ids2["call_id"])["how"] == "hangup"
    finally:
        bus.close()


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_live_call_with_the_back_office_dtmf_both_ways_and_hangup(sip_engine: SipEngine, back_office: Any) -> None:
    bus = Bus(sip_engine)
    try:
        ids = ring(sip_engine, to="+15550200", **{"from": ADA}, script=[
            {"pause_ms": 300}, {"say": "Where is the collection point?"}, {"wait": "reply", "max_s": 240},
            {"dtmf": "5"}, {"wait": "dtmf", "max_s": 240}, {"pause_ms": 60000}])
        sid = ids["session_id"]
        assert bus.wait("sip.call.accepted", sip_call_id=sid)["api"] == "live"
        bus.wait("tool.call", sip_call_id=sid, name="collection_point")
        assert bus.wait("sip.dtmf", sip_call_id=sid, key="5")["from"] == "caller"
        bus.pub.publish("cmd.dtmf", {"sip_call_id": sid, "keys": "42", "id": "d2"})
        assert bus.wait("cmd.done", id="d2")["ok"] is True
        bus.pub.publish("cmd.sip.hangup", {"sip_call_id": sid, "id": "h2"})
        assert bus.wait("sip.call.ended", sip_call_id=sid)["how"] == "hangup"
        rep = report(sip_engine, sid)
        assert rep["caller"]["dtmf_received"] == ["4", "2"] and rep["ended_by"] == "hangup"
        assert "Northern Train Station" in "".join(rep["caller"]["heard_words"])
    finally:
        bus.close()


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_rejected_forged_mid_reply_hangup_and_twenty_calls_at_once(sip_engine: SipEngine) -> None:
    bus = Bus(sip_engine)
    try:
        no = ring(sip_engine, to="+15550999")
        assert bus.wait("sip.call.rejected", sip_call_id=no["call_id"])["status"] == 603
        forged = ring(sip_engine, to="+15550100", sign="forged")
        assert bus.wait("sip.webhook.refused")["code"] == "bad_signature"
        assert report(sip_engine, forged["call_id"], wait_ended=False)["phase"] == "ringing"
        mid = ring(sip_engine, to="+15550100", script=[{"pause_ms": 300}, {"say": "What car did I book?"},
                                                        {"wait": "reply_start"}, {"hangup": True}])
        ended = bus.wait("sip.call.ended", sip_call_id=mid["call_id"])
        assert ended["how"] == "remote_ended", ended
        script = [{"pause_ms": 300}, {"say": "Hello."}, {"wait": "reply", "max_s": 240}, {"hangup": True}]

        async def twenty() -> list[dict[str, Any]]:    # rung in the same instant
            return list(await asyncio.gather(*[place_call(sip_engine.base, key=sip_engine.key, webhook_url=sip_engine.webhook_url,
                                                          to="+15550100", script=script) for _ in range(20)]))
        calls = asyncio.run(twenty())
        for c in calls:
            bus.wait("sip.call.ended", timeout_s=60, sip_call_id=c["call_id"])

        async def reports() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*[call_report(sip_engine.base, c["call_id"], key=sip_engine.key) for c in calls]))
        reps = asyncio.run(reports())
        assert all(r["api"] == "realtime" and r["caller"]["heard_replies"] >= 1 for r in reps)
        st = bus.wait("sip.status", active=0, accepted=21)        # every call counted, none left
        assert st["refused"] >= 1 and st["rejected"] == 1
        assert sip_engine.status()["sip"]["url"] == sip_engine.webhook_url
    finally:
        bus.close()


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_call_through_azure_openai(tmp_path: Path, make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`engine sip` with provider azure: the accept goes to the resource's /openai/v1/realtime/calls,
    the call socket to /openai/v1/realtime?call_id= with the api-key header (the stand-in speaking
    Azure's dialect refuses anything else)."""
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", SECRET)
    server = make_server(dialect="azure", api_key="az-key", speed=8.0)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    cfg = tmp_path / "azure.yaml"
    cfg.write_text(f"provider: azure\nazure:\n  endpoint: http://127.0.0.1:{server.port}\n  deployment: rt-prod\n"
                   "sip:\n  port: 0\n")
    env = {**os.environ, "REALTALK_RUNTIME_DIR": str(run), "XDG_DATA_HOME": str(tmp_path / "data"),
           "AZURE_OPENAI_API_KEY": "az-key"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "sip", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path))
    eng = SipEngine(proc, run, tmp_path / "data")
    try:
        assert eng.ready.wait(30), "engine sip did not become ready:\n" + "".join(eng.lines)
        bus = Bus(eng)
        base = f"http://127.0.0.1:{server.port}/openai/v1"
        ids = asyncio.run(place_call(base, key="az-key", webhook_url=eng.status()["sip"]["url"], script=[
            {"pause_ms": 300}, {"say": "Hello there."}, {"wait": "reply", "max_s": 240}, {"pause_ms": 60000}]))
        cid = ids["call_id"]
        bus.wait("sip.call.started", sip_call_id=cid)
        status = bus.wait("sip.call.status", sip_call_id=cid, state="connected")
        assert status["model"] == "gpt-realtime"            # the deployment named back to the model
        bus.wait("model.transcript.done", sip_call_id=cid)
        bus.pub.publish("cmd.sip.hangup", {"sip_call_id": cid, "id": "az-h"})
        assert bus.wait("sip.call.ended", sip_call_id=cid)["how"] == "hangup"
        rep = asyncio.run(call_report(base, cid, wait_ended=True, key="az-key"))
        assert rep["api"] == "realtime" and rep["ended_by"] == "hangup" and rep["caller"]["heard_replies"] >= 1
        bus.close()
    finally:
        eng.stop()

"""`engine serve --dialect xai|azure` against the engine's client-side adapters
(engine.realtime.dialects): every event the adapter hands on validates as GA."""
from __future__ import annotations

import json
from typing import Any, cast

import pytest
import websocket

from engine.config import DEFAULTS, session_payload
from engine.config_types import Config
from engine.realtime.dialects import AzureDialect, XaiDialect


def recv(ws: Any) -> dict[str, Any]:
    return json.loads(ws.recv())


def until(ws: Any, etype: str, seen: list[dict[str, Any]], limit: int = 400) -> dict[str, Any]:
    for _ in range(limit):
        ev = recv(ws)
        seen.append(ev)
        if ev["type"] == etype:
            return ev
    raise AssertionError(f"no {etype} in {limit} events: {[e['type'] for e in seen][-20:]}")


@pytest.mark.timeout(30)
def test_xai_dialect_round_trip_through_the_adapter(make_server: Any, validator: Any) -> None:
    server = make_server(dialect="xai", speed=50.0)
    model = "grok-voice-think-fast-1.0"
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/v1/realtime?model={model}",
                                     header=["Authorization: Bearer x"], timeout=10)
    d = XaiDialect(model=model)
    now = [100.0]
    wire: list[dict[str, Any]] = []
    ga: list[dict[str, Any]] = []

    def take(ev: dict[str, Any]) -> None:
        wire.append(ev)
        for g in d.incoming(ev, now[0]):
            if g["type"] == "response.done":     # billed_seconds is the adapter's own (per-minute billing)
                usage = {k: v for k, v in g["response"]["usage"].items() if k != "billed_seconds"}
                validator.check({**g, "response": {**g["response"], "usage": usage}})
            elif g["type"] not in ("session.created", "session.updated"):   # xAI's sessions lack GA's fields
                validator.check(g)
            ga.append(g)
        now[0] += 0.5

    first = recv(ws)
    assert first["type"] == "conversation.created"
    take(first)
    assert ga[0]["type"] == "session.created" and ga[0]["session"]["model"] == model
    session = session_payload(cast(Config, {**DEFAULTS, "model": model}))
    ws.send(json.dumps({"type": "session.update", "event_id": "raw", "session": session}))   # GA shape: refused
    err = recv(ws)
    assert err["type"] == "error" and err["error"]["code"] == "unknown_parameter" and "flat" in err["error"]["message"]
    ws.send(json.dumps(d.outgoing({"type": "session.update", "event_id": "e1", "session": session})))
    updated = recv(ws)
    take(updated)
    assert updated["session"]["voice"] == "marin" and "type" not in updated["session"]
    assert ga[-1]["session"]["audio"]["output"]["voice"] == "marin"
    ws.send(json.dumps(d.outgoing({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the capital of France?"}]}})))
    ws.send(json.dumps(d.outgoing({"type": "response.create", "response": {"output_modalities": ["audio"]}})))
    seen: list[dict[str, Any]] = []
    done = until(ws, "response.done", seen)
    for ev in seen:
        take(ev)
    assert done["response"]["usage"] == {} and done["total_tokens"] > 0
    usage = ga[-1]["response"]["usage"]
    assert usage["total_tokens"] == done["total_tokens"] and usage["billed_seconds"] > 0
    assert not any(e["type"] == "rate_limits.updated" for e in wire)
    assert d.outgoing({"type": "conversation.item.truncate", "item_id": "x", "content_index": 0,
                       "audio_end_ms": 10}) is None
    ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": "x", "content_index": 0, "audio_end_ms": 1}))
    ev = until(ws, "error", [])
    assert "truncate" in ev["error"]["message"]
    until(ws, "ping", [])            # the keep-alive comes, and the adapter drops it
    assert d.incoming({"type": "ping", "timestamp": 1}, 0.0) == []
    ws.close()


@pytest.mark.timeout(30)
def test_azure_dialect_urls_key_and_deployment(make_server: Any, validator: Any) -> None:
    server = make_server(dialect="azure", api_key="az-key")
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(f"ws://127.0.0.1:{server.port}/v1/realtime?model=rt-prod",
                                    header=["api-key: az-key"], timeout=10)
    assert err.value.status_code == 404
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(f"ws://127.0.0.1:{server.port}/openai/v1/realtime?model=rt-prod",
                                    header=["api-key: wrong"], timeout=10)
    assert err.value.status_code == 401
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/openai/v1/realtime?model=rt-prod",
                                     header=["api-key: az-key"], timeout=10)
    created = recv(ws)
    validator.check(created)
    assert created["session"]["model"] == "rt-prod"
    [named] = AzureDialect(model="gpt-realtime", deployment="rt-prod").incoming(created, 0.0)
    assert named["session"]["model"] == "gpt-realtime"
    ws.close()
    live = websocket.create_connection(f"ws://127.0.0.1:{server.port}/openai/v1/live/sessions",
                                       header=["Authorization: Bearer az-key"], timeout=10)
    live.send(json.dumps({"type": "session.start", "session": {"model": "gpt-live-1"}}))
    assert recv(live)["type"] == "session.started"
    live.close()

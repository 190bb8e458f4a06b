"""Providers (where the API is, how to sign in) and the xAI / Azure dialects: pure."""
from __future__ import annotations

import copy
from typing import Any

import pytest

from engine.config import DEFAULTS, resolve_backend, session_payload
from engine.config_types import Config
from engine.cost import response_cost_usd
from engine.errors import ConfigError
from engine.providers import api_target, provider_of, refused
from engine.realtime.dialects import AzureDialect, DialectError, XaiDialect, dialect_for


def cfg(**over: object) -> Config:
    c: Any = copy.deepcopy(DEFAULTS)
    for k, v in over.items():
        node = c
        parts = k.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return c


def test_openai_default_base_url_env_and_another_server() -> None:
    t = api_target(cfg(), {"OPENAI_API_KEY": "sk-1"})
    assert (t.url, t.headers, t.rest_base) == ("wss://api.openai.com/v1/realtime?model=gpt-realtime",
                                               ["Authorization: Bearer sk-1"], "https://api.openai.com/v1")
    t = api_target(cfg(), {"OPENAI_API_KEY": "sk-1", "OPENAI_BASE_URL": "http://127.0.0.1:9000/v1/"})
    assert (t.url, t.rest_base) == ("ws://127.0.0.1:9000/v1/realtime?model=gpt-realtime", "http://127.0.0.1:9000/v1")
    t = api_target(cfg(openai_url="wss://voice.example/v1/realtime", auth_header="X-API-Key: {key}"),
                   {"OPENAI_API_KEY": "k"})
    assert (t.url, t.headers) == ("wss://voice.example/v1/realtime?model=gpt-realtime", ["X-API-Key: k"])
    t = api_target(cfg(model="gpt-live-1"), {"OPENAI_API_KEY": "k"})
    assert t.url == "wss://api.openai.com/v1/live/sessions"


def test_azure_urls_and_both_ways_to_sign_in() -> None:
    c = cfg(provider="azure", azure__endpoint="https://res1.openai.azure.com/", azure__deployment="rt-prod")
    t = api_target(c, {"AZURE_OPENAI_API_KEY": "az"})
    assert t.url == "wss://res1.openai.azure.com/openai/v1/realtime?model=rt-prod"
    assert t.headers == ["api-key: az"] and t.rest_base == "https://res1.openai.azure.com/openai/v1"
    c["azure"]["auth"] = "entra"
    t = api_target(c, {"AZURE_OPENAI_AD_TOKEN": "tok"})
    assert t.headers == ["Authorization: Bearer tok"]
    t = api_target(c, {"AZURE_OPENAI_AD_TOKEN": "tok"}, model="gpt-live-1")
    assert t.url == "wss://res1.openai.azure.com/openai/v1/live/sessions"
    with pytest.raises(ConfigError) as err:
        api_target(cfg(provider="azure"), {})
    assert "azure.endpoint" in str(err.value)


def test_xai_and_missing_keys_name_the_provider_and_the_fix() -> None:
    c = cfg(provider="xai", model="grok-voice-think-fast-1.0")
    t = api_target(c, {"XAI_API_KEY": "x"})
    assert (t.url, t.dialect) == ("wss://api.x.ai/v1/realtime?model=grok-voice-think-fast-1.0", "xai")
    for provider, var in (("xai", "XAI_API_KEY"), ("openai", "OPENAI_API_KEY")):
        with pytest.raises(ConfigError) as err:
            api_target(cfg(provider=provider, model="grok-voice-think-fast-1.0"), {})
        assert f"provider {provider}" in str(err.value) and var in str(err.value)
    with pytest.raises(ConfigError) as err:
        api_target(cfg(provider="xai", model="gpt-live-1"), {"XAI_API_KEY": "x"})
    assert "GPT-Live" in str(err.value)
    assert "provider xai refused the key (HTTP 401)" in refused(t, 401) and "XAI_API_KEY" in refused(t, 401)


def test_provider_null_follows_backend() -> None:
    assert provider_of(cfg(), {}) == "local" and provider_of(cfg(), {"OPENAI_API_KEY": "k"}) == "openai"
    assert provider_of(cfg(backend="openai"), {}) == "openai"
    assert resolve_backend(cfg(provider="xai")) == "openai" and resolve_backend(cfg(provider="local")) == "local"


def test_xai_session_update_is_flat() -> None:
    d = XaiDialect(model="grok-voice-think-fast-1.0")
    ga = session_payload(cfg(session__reasoning={"effort": "low"}))
    out = d.outgoing({"type": "session.update", "event_id": "e1", "session": ga})
    assert out is not None
    s = out["session"]
    assert "type" not in s and "model" not in s and "output_modalities" not in s
    assert s["voice"] == "marin" and s["instructions"] == ga["instructions"]
    assert s["turn_detection"]["type"] == "server_vad" and "create_response" not in s["turn_detection"]
    assert s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert "voice" not in s["audio"].get("output", {}) and s["reasoning"] == {"effort": "high"}
    semantic = d.outgoing({"type": "session.update", "session": {"audio": {"input": {
        "turn_detection": {"type": "semantic_vad", "eagerness": "low"}}}}})
    assert semantic is not None and semantic["session"]["turn_detection"] == {"type": "server_vad"}
    r = d.outgoing({"type": "response.create", "response": {"output_modalities": ["text"]}})
    assert r == {"type": "response.create", "response": {"modalities": ["text"]}}
    assert d.outgoing({"type": "conversation.item.truncate", "item_id": "i", "audio_end_ms": 5}) is None
    assert d.counts["not_sent.conversation.item.truncate"] == 1


def test_xai_incoming_first_event_ping_usage_and_unknown() -> None:
    d = XaiDialect(model="grok-voice-think-fast-1.0")
    [created] = d.incoming({"type": "conversation.created", "event_id": "e",
                            "conversation": {"id": "conv_1", "object": "realtime.conversation"}}, 100.0)
    assert created["type"] == "session.created" and created["session"]["model"] == "grok-voice-think-fast-1.0"
    [created2] = XaiDialect(model="m").incoming({"type": "session.created", "session": {
        "id": "s", "voice": "eve", "instructions": "x", "turn_detection": {"type": "server_vad"}}}, 0.0)
    assert created2["session"]["audio"]["output"]["voice"] == "eve"
    assert created2["session"]["audio"]["input"]["turn_detection"] == {"type": "server_vad"}
    assert d.incoming({"type": "ping", "timestamp": 1}, 101.0) == [] and d.counts["ping"] == 1
    [done] = d.incoming({"type": "response.done", "response": {"id": "r", "status": "completed", "usage": {}},
                         "total_tokens": 30, "input_tokens": 10, "output_tokens": 20}, 130.0)
    assert "total_tokens" not in done and done["response"]["usage"]["output_tokens"] == 20
    assert done["response"]["usage"]["billed_seconds"] == 30.0
    assert response_cost_usd("grok-voice-think-fast-1.0", done["response"]["usage"]) == pytest.approx(0.025)
    with pytest.raises(DialectError) as err:
        d.incoming({"type": "conversation.item.teleported"}, 131.0)
    assert "xai" in str(err.value) and "provider" in str(err.value)


def test_azure_names_the_model_back_and_openai_is_the_identity() -> None:
    d = dialect_for("azure", "gpt-realtime", "rt-prod")
    assert isinstance(d, AzureDialect)
    [ev] = d.incoming({"type": "session.created", "session": {"model": "rt-prod", "id": "s"}}, 0.0)
    assert ev["session"]["model"] == "gpt-realtime"
    ident = dialect_for("openai", "gpt-realtime")
    e = {"type": "session.update", "session": {"type": "realtime"}}
    assert ident.outgoing(e) == e and ident.incoming(e, 0.0) == [e]


def test_azure_endpoint_over_plain_http_is_a_local_stand_in() -> None:
    c = cfg(provider="azure", azure__endpoint="http://127.0.0.1:8765")
    t = api_target(c, {"AZURE_OPENAI_API_KEY": "az"})
    assert t.url == "ws://127.0.0.1:8765/openai/v1/realtime?model=gpt-realtime"
    assert t.rest_base == "http://127.0.0.1:8765/openai/v1"

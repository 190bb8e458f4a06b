"""The engine holds a conversation against the local server speaking xAI's and Azure's dialects
(`engine serve --dialect`): the provider's URL, sign-in and dialect, end to end through the API link."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bus import Subscriber
from tests.helpers import wait_topic


def converse(eng: Any) -> dict[str, Any]:
    conn = eng.conn
    sub = Subscriber(conn["subscribe"], ["model.", "response.done", "cost.session", "engine.error"])
    try:
        out = eng.cli("say", "What is the capital of France?")
        assert out.returncode == 0, out.stderr
        done = wait_topic(sub, "response.done")   # xAI's session has no output_modalities: the reply may be spoken
        assert "capital of France" in done["text"], done
        return wait_topic(sub, "cost.session")
    finally:
        sub.close()


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_conversation_on_xai(start_engine: Any, make_server: Any, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_server(dialect="xai", api_key="xai-key")
    monkeypatch.setenv("XAI_API_KEY", "xai-key")
    cfg = tmp_path / "xai.yaml"
    cfg.write_text(f"provider: xai\nmodel: grok-voice-think-fast-1.0\nsession:\n  voice: eve\n"
                   f"xai:\n  url: ws://127.0.0.1:{server.port}/v1/realtime\n")
    eng = start_engine("--config", str(cfg), "--text-only")
    cost = converse(eng)
    assert cost["usd"] > 0                      # per minute of connection: the dialect's billed_seconds


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_conversation_on_azure(start_engine: Any, make_server: Any, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    server = make_server(dialect="azure", api_key="az-key")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-key")
    cfg = tmp_path / "azure.yaml"
    cfg.write_text(f"provider: azure\nmodel: gpt-realtime\nazure:\n  endpoint: http://127.0.0.1:{server.port}\n"
                   "  deployment: rt-prod\n")
    eng = start_engine("--config", str(cfg), "--text-only")
    cost = converse(eng)
    assert cost["usd"] > 0                      # priced as the model the deployment serves

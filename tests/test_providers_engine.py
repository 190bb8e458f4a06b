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


#: dialect -> (the key's variable, the engine's config with {port}: the local server's). Cost is
#: counted either way: xAI per minute of connection (its dialect's billed_seconds), Azure priced as
#: the model its deployment serves.
PROVIDERS = {
    "xai": ("XAI_API_KEY", "provider: xai\nmodel: grok-voice-think-fast-1.0\nsession:\n  voice: eve\n"
                           "xai:\n  url: ws://127.0.0.1:{port}/v1/realtime\n"),
    "azure": ("AZURE_OPENAI_API_KEY", "provider: azure\nmodel: gpt-realtime\nazure:\n"
                                      "  endpoint: http://127.0.0.1:{port}\n  deployment: rt-prod\n"),
}


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("dialect", sorted(PROVIDERS))
def test_a_conversation_on_the_providers_dialect(dialect: str, start_engine: Any, make_server: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    key_env, config = PROVIDERS[dialect]
    server = make_server(dialect=dialect, api_key=f"{dialect}-key")
    monkeypatch.setenv(key_env, f"{dialect}-key")
    cfg = tmp_path / f"{dialect}.yaml"
    cfg.write_text(config.format(port=server.port))
    eng = start_engine("--config", str(cfg), "--text-only")
    cost = converse(eng)
    assert cost["usd"] > 0

"""engine.presence.gone is signed by the broker, so the realtime process (which verifies it)
still unregisters the tools of a client that went away."""
from __future__ import annotations

from typing import Any

import pytest

from bus import Subscriber
from bus.aio import call_sync
from bus.client import endpoints_from
from tests.helpers import subscribed, wait_topic

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_a_gone_owners_tool_is_unregistered(start_engine: Any) -> None:
    eng = start_engine("--text-only")
    conn = eng.conn
    tools = Subscriber(conn["subscribe"], ["engine.tools"])
    owner = "presence-test-1"
    presence = Subscriber(conn["subscribe"], [f"_presence.{owner}"])
    done = call_sync(endpoints_from(conn), "cmd.tool.register", {
        "name": "probe_tool", "description": "d", "owner": owner, "parameters": {"type": "object", "properties": {}}},
        outcome=True, outcome_timeout_s=10)
    assert done["ok"], done
    assert "probe_tool" in wait_topic(tools, "engine.tools", where=lambda b: "probe_tool" in b["tools"])["tools"]
    subscribed(presence, conn["publish"])   # the broker holds the presence subscription: now it can go
    presence.close()  # the owner goes: the broker publishes engine.presence.gone (signed)
    body = wait_topic(tools, "engine.tools", timeout=10, where=lambda b: "probe_tool" not in b["tools"])
    assert "probe_tool" not in body["tools"]
    assert eng.stop() == 0

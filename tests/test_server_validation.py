"""Items and response parameters are validated in one place (engine/server/protocol.py),
the same way wherever they arrive; bad ones get an error and the session goes on."""
from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import RawClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(server: Any, validator: Any) -> Any:
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    c.until("session.created")
    yield c
    c.close()


def _still_alive(c: RawClient) -> None:
    c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                         "content": [{"type": "input_text", "text": "still there?"}]}})
    assert c.until("conversation.item.done")["item"]["role"] == "user"


@pytest.mark.parametrize("response, param", [
    ({"audio": {"output": {"format": "pcm16"}}}, "response.audio.output.format"),
    ({"audio": {"output": {"format": {"type": "audio/flac"}}}}, "response.audio.output.format.type"),
    ({"audio": {"output": {"voice": "robot"}}}, "response.audio.output.voice"),
    ({"audio": "loud"}, "response.audio"),
    ({"audio": {"output": {"volume": 3}}}, "response.audio.output.volume"),
    ({"input": [{"type": "message", "role": "robot", "content": []}]}, "item.role"),
    ({"input": [{"type": "item_reference", "id": "item_nope"}]}, "response.input[0].id"),
    ({"input": ["text"]}, "response.input[0]"),
])
def test_bad_response_params_get_an_error_and_the_session_survives(client: RawClient, response: dict[str, Any],
                                                                     param: str) -> None:
    client.send({"type": "response.create", "event_id": "bad", "response": response})
    err = client.until("error")["error"]
    assert err["param"] == param and err["event_id"] == "bad", err
    _still_alive(client)


def test_item_inside_response_input_is_checked_like_a_created_item(client: RawClient) -> None:
    bad = {"type": "message", "role": "user", "content": [{"type": "output_text", "text": "x"}]}
    client.send({"type": "conversation.item.create", "item": bad})
    created = client.until("error")["error"]
    client.send({"type": "response.create", "response": {"conversation": "none", "input": [bad]}})
    inline = client.until("error")["error"]
    assert (created["code"], created["message"], created["param"]) == (inline["code"], inline["message"], inline["param"])


def test_retrieve_returns_a_copy() -> None:
    """Changing what retrieve returned must not change the item."""
    import json
    from engine.server.session import ServerSession
    s = ServerSession("gpt-realtime")
    acts = s.receive_text(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
    item_id = acts.send[0]["item"]["id"]
    got = s.receive_text(json.dumps({"type": "conversation.item.retrieve", "item_id": item_id})).send[0]["item"]
    got["content"][0]["text"] = "changed"
    assert s.by_id[item_id].data["content"][0]["text"] == "hi"

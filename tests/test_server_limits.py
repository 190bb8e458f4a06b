"""The local server's limits on what a client sends: each breach gets an error that names the
limit, and the session goes on."""
from __future__ import annotations

from typing import Any

import pytest

from engine.server.app import MAX_JSON_DEPTH, json_depth_exceeds
from tests.helpers import RawClient

pytestmark = pytest.mark.timeout(60)


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    assert not json_depth_exceeds('{"a": [1, {"b": 2}]}', 3)
    assert json_depth_exceeds('{"a": [1, {"b": 2}]}', 2)
    # brackets inside strings (escaped quotes included) are text, not nesting
    assert not json_depth_exceeds('{"text": "[[[[{{{{ \\" ]]]] [[[["}', 1)
    assert json_depth_exceeds("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), MAX_JSON_DEPTH)
    assert not json_depth_exceeds("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, MAX_JSON_DEPTH)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_deeply_nested_json_gets_an_error_naming_the_limit_and_the_session_goes_on(server: Any, validator: Any,
                                                                                   depth: int) -> None:
    """Issue 23 point 5: JSON nested deeper than Python's recursion limit closed the socket with a
    traceback (RecursionError in the handler)."""
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    c.until("session.created")
    c.send('{"type": "session.update", "session": ' + "[" * depth + "]" * depth + "}")
    err = c.until("error")["error"]
    assert err["code"] == "invalid_json" and f"{MAX_JSON_DEPTH} levels" in err["message"], err
    c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                         "content": [{"type": "input_text", "text": "still there?"}]}})
    assert c.until("conversation.item.done")["item"]["role"] == "user"
    c.close()


def test_json_depth_of_a_binary_message() -> None:
    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    assert json_depth_exceeds(deep) and not json_depth_exceeds(b'{"a": "\xff[[["}', 1)

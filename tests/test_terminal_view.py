"""The pure terminal views (engine/view.py) fed a recorded session, and the terminal writer's
TTY rule (engine/supervisor/terminal.py).

tests/data/terminal_session.jsonl is the bus of a real session (engine start on the virtual
devices, the local server): a spoken question ("what is the capital of france"), an injected API
error, a typed question answered through a tool (get_weather, answered by the process
tool-weather), system context, and a story cancelled with cmd.cancel 1.5 s into its audio. The
engine's large state messages (conversation.history, session.config, server.* but the audio
deltas) were left out of the recording."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from engine.view import ConversationView, TerminalView, power_dbfs
from engine.supervisor.terminal import CLEAR, Terminal

pytestmark = pytest.mark.timeout(10)
SESSION = Path(__file__).parent / "data" / "terminal_session.jsonl"


def session() -> list[tuple[str, dict[str, Any]]]:
    return [(m["topic"], m["body"]) for m in map(json.loads, SESSION.read_text().splitlines())]


def conversation(messages: list[tuple[str, dict[str, Any]]]) -> list[str]:
    view = ConversationView(clock=False)
    lines = [line for topic, body in messages for line in view.feed(topic, body)]
    return lines + view.flush()


def test_the_conversation_reads_in_order_without_the_firehose() -> None:
    lines = conversation(session())
    assert lines == [
        "engine  ready",
        "user    (speaking…)",
        "user    (stopped speaking)",
        "user    “what is the capital of france”",
        "model   The capital of France is Paris.",
        "turn    cost $0.0037 (session $0.0038)",
        "turn    latency from speech end: first delta 29 ms, speaker 114 ms",
        "error   api: Invalid value for 'voice': a test error. (invalid_value)",
        "user    What is the weather like?  (said by tool-weather)",
        "tool    call get_weather({\"city\": \"Paris\"})  [call_e7zFgetLQggxyOts]",
        "turn    cost $0.0020 (session $0.0058)",
        "tool    result [call_e7zFgetLQggxyOts] from tool-weather: Sunny, 21 degrees.",
        "model   Thanks.",
        "model   Sunny, 21 degrees.",
        "turn    cost $0.0061 (session $0.0119)",
        "turn    latency from request: first delta 16 ms, speaker 100 ms",
        "system  The user is Ada.  (from tool-weather)",
        "user    Tell me a story.  (said by tool-weather)",
        "turn    response cancelled: client_cancelled; cost $0.0052 (session $0.0171)",
        "turn    latency from request: first delta 25 ms, speaker 104 ms",
        "model   Once upon a time there was",
        "model   ✂ interrupted (cmd.cancel) at 1515 ms of 1600 ms received",
        "model   (heard up to the cut: no words)",
    ], "\n".join(lines)
    # the session had 471 messages, 112 of them mic levels and 125 positions
    assert len(session()) == 471


def test_streamed_words_are_joined_into_lines() -> None:
    view = ConversationView(clock=False)
    words = "The sea is wide. And the ships are many, and every sailor knows the way home across the water " \
            "when the evening comes down over the harbour wall and the gulls go quiet"
    out: list[str] = []
    for i in range(0, len(words), 7):   # deltas of 7 characters, as the API streams them
        out += view.feed("model.transcript.delta", {"text": words[i:i + 7], "item_id": "i1"})
    assert out[0] == "model   The sea is wide."
    assert len(out) == 2 and len(out[1]) <= 8 + 100 and not out[1].endswith(" ")
    out += view.feed("model.transcript.done", {"text": words, "item_id": "i1"})
    assert " ".join(line[8:] for line in out) == words
    assert view.flush() == []


def test_a_late_subscriber_gets_the_whole_text_at_done_and_odd_bodies_do_not_raise() -> None:
    view = ConversationView(clock=False)
    assert view.feed("model.text.done", {"text": "Hello there.", "item_id": "x"}) == ["model   Hello there."]
    assert view.feed("capture.levels", {"mic_dbfs": [-20.0]}) == []
    assert view.feed("engine.status", {"pub": "supervisor:1", "state": "ready"}) == ["engine  ready"]
    assert view.feed("engine.status", {"pub": "supervisor:1", "state": "ready"}) == []   # the heartbeat
    assert view.feed("engine.status", {"pub": "realtime:2", "state": "disconnected", "close_code": 1006}) == [
        "engine  API disconnected (close code 1006)"]
    assert view.feed("latency.turn", {"to_first_delta_ms": "soon"}) == []
    assert view.feed("response.done", {"usd": None, "status": 3}) == ["turn    response 3; cost ?"]
    assert view.feed("engine.error", {"source": "bus", "message": None}) == ["error   bus: no message"]
    assert view.feed("engine.error", {"source": "api", "code": "x", "message": "m", "benign": True}) == [
        "note    api: m (x)"]
    assert view.feed("cmd.ack", {"id": "a", "ok": False, "error": "nope"}) == ["error   command a refused: nope"]
    assert view.feed("user.text", "not a map") == []  # type: ignore[arg-type]
    assert view.feed("input.mic", {"open": False}) == ["engine  mic closed (muted)"]
    assert ConversationView.shows("model.text.delta") and not ConversationView.shows("playout.position")


def test_the_live_line_follows_the_session() -> None:
    term = TerminalView()
    assert term.live_line() == "speaking: nobody | mic         – | last turn       – | $0.0000"
    seen: dict[str, str] = {}
    errors: list[str] = []
    for topic, body in session():
        errors += term.feed(topic, body)
        if topic in ("user.speech.started", "playout.started", "playout.interrupted"):
            seen.setdefault(topic, term.live_line())
    assert errors == ["error: api: Invalid value for 'voice': a test error. (invalid_value)"]
    assert seen["user.speech.started"].startswith("speaking: user ")
    assert seen["playout.started"].startswith("speaking: model ")
    assert seen["playout.interrupted"].startswith("speaking: nobody ")
    assert term.live_line() == "speaking: nobody | mic  -90 dBFS | last turn  104 ms | $0.0171 | errors 1"
    term.feed("user.speech.started", {})
    term.feed("playout.started", {"item_id": "a"})
    assert term.speaking() == "both"
    term.feed("input.mic", {"open": False})
    assert "mic     muted" in term.live_line()
    assert term.feed("engine.error", {"source": "api", "message": "late", "benign": True}) == []
    term.feed("engine.status", {"pub": "realtime:3", "state": "reconnecting", "close_code": 1006})
    assert term.live_line().endswith("| API reconnecting | errors 1")
    term.feed("engine.status", {"pub": "realtime:3", "state": "reconnected"})
    assert "API" not in term.live_line()


def test_levels_are_averaged_as_power() -> None:
    assert power_dbfs([-20.0, -20.0]) == pytest.approx(-20.0)
    assert power_dbfs([-10.0, -90.0]) == pytest.approx(-13.0, abs=0.05)   # half the power of -10 dBFS
    assert power_dbfs([]) is None and power_dbfs("x") is None and power_dbfs([None, True]) is None


class FakeTty(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_the_live_line_is_drawn_on_a_tty_only_and_at_most_four_times_a_second() -> None:
    pipe = FakeTty(False)
    t = Terminal(pipe)
    t.draw("speaking: user", 0.0)
    t.line("error: api: boom")
    t.draw("speaking: model", 1.0)
    t.clear()
    assert pipe.getvalue() == "error: api: boom\n"
    tty = FakeTty(True)
    t = Terminal(tty)
    t.draw("a", 0.0)
    t.draw("b", 0.1)      # too soon: not drawn
    t.draw("a", 0.3)      # unchanged: not drawn
    t.line("error: x: y")  # clears the line first
    t.draw("a", 0.31)     # back at once after another line
    t.draw("c", 0.4)      # too soon again
    t.draw("c", 0.6)
    t.clear()
    assert tty.getvalue() == CLEAR + "a" + CLEAR + "error: x: y\n" + CLEAR + "a" + CLEAR + "c" + CLEAR


def test_live_instructions_are_named_as_such_and_thinking_reads_as_system_context() -> None:
    """`engine tail` on GPT-Live printed instructions as plain system context: system.text's
    ``kind`` (thinking or instructions) was ignored."""
    view = ConversationView(clock=False)
    assert view.feed("system.text", {"text": "Be brief.", "kind": "instructions"}) == ["system  [instructions] Be brief."]
    assert view.feed("system.text", {"text": "The caller is Ada.", "kind": "thinking"}) == ["system  The caller is Ada."]
    assert view.feed("system.text", {"text": "x", "kind": 5}) == ["system  x"]

"""The Python async API and tools answered by other processes, against the local server."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

QUESTION = "Where is the collection point for the reservation?"
ANSWER = "The collection point is the Northern Train Station office."
ASK_CLIENT_SCENARIO = """
turns:
  - match: {regex: "collection point"}
    call: {name: ask_client, arguments: {question: "Where is the collection point for the reservation?"}}
    then: "{output}"
"""


def test_text_chatbot_without_audio_devices(runtime_dir: Path) -> None:
    """The old library's 'realtime text chatbot': no audio device at all."""
    from engine import create_session

    async def main() -> None:
        session = await create_session({"instructions": "You are a cat.", "output_modalities": ["text"]},
                                       {"model": "gpt-realtime", "api_key": None, "debug": False, "mic": "null",
                                        "speaker": "null"})
        try:
            seen, watcher = _collect(session, "model.text.done")
            await session.system("Speak with a Scottish accent.")
            reply = await session.user("What is the capital of France?")
            assert reply.status == "completed"
            assert "capital of France" in reply.text
            assert reply.usd > 0 and reply.usage["input_tokens"] > 0
            second = await session.user("And of Spain?")
            assert "Spain" in second.text
            assert session.cost == pytest.approx(reply.usd + second.usd)
            await session.audio_done()  # no audio: resolves at once
            await asyncio.sleep(0.2)   # the watcher's stream runs beside the replies: it gets its events, and no third
            assert [ev.text for ev in seen] == [reply.text, second.text]
            watcher.cancel()
        finally:
            await session.close()
        assert session.process is not None and session.process.returncode == 0
        assert not (runtime_dir / "engine.json").exists()
    asyncio.run(main())


def test_ask_client_answered_from_another_process(runtime_dir: Path, tmp_path: Path) -> None:
    """The R package's side channel: the model asks the client program for a fact mid-call."""
    from engine import create_session
    scenario = tmp_path / "ask.yaml"
    scenario.write_text(ASK_CLIENT_SCENARIO)
    helper = tmp_path / "client_tool.py"
    helper.write_text(textwrap.dedent('''
        import asyncio, sys
        from engine import connect

        async def main():
            session = await connect()

            @session.tool(description="Ask the client program for a fact the model does not know")
            def ask_client(question: str) -> str:
                return "The collection point is the Northern Train Station office."
            await session.register_tools()
            print("registered", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    '''))

    async def main() -> None:
        session = await create_session({"output_modalities": ["text"]}, {"scenario": str(scenario)})
        proc = subprocess.Popen([sys.executable, str(helper)], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        try:
            await _expect_line(proc, "registered", 30)
            calls, watcher = _collect(session, "tool.call")
            reply = await session.user(QUESTION)
            # user() returns the answer that follows the tool's output, not the function-call response
            assert reply.text == ANSWER
            assert calls and calls[0].body["name"] == "ask_client" and calls[0].body["registered"]
            watcher.cancel()
            await _owner_goes_and_its_tool_too(session, proc)
        finally:
            proc.kill()
            await session.close()
    asyncio.run(main())


def test_node_tool_example_answers_the_model(runtime_dir: Path, tmp_path: Path, node: str) -> None:
    """clients/node/tool-example.js registers ask_client; the model's call is answered from Node."""
    from engine import create_session
    scenario = tmp_path / "ask.yaml"
    scenario.write_text(ASK_CLIENT_SCENARIO)

    async def main() -> None:
        session = await create_session({"output_modalities": ["text"]}, {"scenario": str(scenario)})
        proc = subprocess.Popen([node, str(REPO / "clients" / "node" / "tool-example.js")], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
        try:
            await _expect_line(proc, "ask_client registered", 30)
            reply = await session.user(QUESTION)
            assert reply.text == ANSWER
            await _expect_line(proc, f"model asks: {QUESTION}", 10)
            await _owner_goes_and_its_tool_too(session, proc)
        finally:
            proc.kill()
            await session.close()
    asyncio.run(main())


def _collect(session: Any, prefix: str) -> tuple[list[Any], asyncio.Task[None]]:
    """Every event under ``prefix`` from now on, appended to the list by the returned task."""
    events: list[Any] = []

    async def watch() -> None:
        async for ev in session.events(prefix):
            events.append(ev)
    return events, asyncio.create_task(watch())


async def _expect_line(proc: subprocess.Popen[str], want: str, timeout_s: float) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout_s)
    assert line.strip() == want, line


async def _owner_goes_and_its_tool_too(session: Any, proc: subprocess.Popen[str]) -> None:
    """Kill the process that registered ask_client: the engine unregisters its tool."""
    tools_gone = asyncio.create_task(_wait_tools(session, lambda names: "ask_client" not in names))
    proc.kill()
    await asyncio.wait_for(tools_gone, 15)


async def _wait_tools(session: Any, pred: Any) -> None:
    async for ev in session.events("engine.tools"):
        if pred(ev.body["tools"]):
            return


def test_tool_that_never_answers_gets_an_error_output(runtime_dir: Path, tmp_path: Path) -> None:
    from engine import create_session
    scenario = tmp_path / "ask.yaml"
    scenario.write_text(ASK_CLIENT_SCENARIO)

    async def main() -> None:
        session = await create_session({"output_modalities": ["text"]}, {"scenario": str(scenario)})
        try:
            ack = await session.command("cmd.tool.register", {"name": "ask_client", "timeout_s": 0.5,
                                                              "parameters": {"type": "object", "properties": {}}})
            assert ack["ok"]
            errors, watcher = _collect(session, "engine.error")
            reply = await session.user("Where is the collection point?")
            assert "did not answer in time" in reply.text
            assert any(e.body.get("code") == "tool_timeout" for e in errors)
            watcher.cancel()
        finally:
            await session.close()
    asyncio.run(main())


def test_readme_tool_example_calls_its_tool_offline(runtime_dir: Path) -> None:
    """README.md's Python section, as written: the tool is registered after the session starts and the
    local server calls it when the user names it (no scenario), with the booking from the context."""
    from engine import create_session

    async def main() -> None:
        session = await create_session({"instructions": "You are a helpful travel agent.", "turn_detection": None},
                                       {"mic": "null", "speaker": "null", "speed": 4})
        try:
            await session.system("The customer's booking is Avis ZX9, collection at 10:00.")
            asked: list[str] = []

            @session.tool
            def collection_point(booking: str) -> str:
                """Where a booking's car is collected."""
                asked.append(booking)
                return "Northern Train Station, desk 4"
            reply = await session.user("Where exactly is the collection point?")
            assert asked == ["Avis ZX9"]
            assert "Northern Train Station, desk 4" in reply.text
        finally:
            await session.close()
    asyncio.run(main())

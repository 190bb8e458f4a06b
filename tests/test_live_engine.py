"""The engine on GPT-Live, end to end: `engine start --model gpt-live-1` against the local server's
Live endpoint (engine/server/live_*.py), through the same processes and API link as Realtime
(docs/live.md). A spoken question gets a spoken answer, context from another process reaches the
reply, a bus tool in another process answers a delegation, the model yields when talked over, and a
phone call runs on Live."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import EngineError, create_session
from engine.phone.simulator import FakePhone
from tests.helpers import REPO, BusRecorder, car_rental_office, caller_speech, set_twilio_token, write_wav

STORY = ("Once upon a time a small red car lived in a garage by the sea, and every morning it drove along "
         "the coast road to the market, where it carried bread, apples and fish for the people of the "
         "village, until one day a storm came.")


def speech(*parts: tuple[str, float]) -> np.ndarray:
    """Speech in the local server's own voice: (text, seconds of silence before it), then 1 s of
    silence (after the WAV the engine streams silence in place of the mic: GPT-Live's clock needs it)."""
    from engine.server.voice import synthesize
    chunks = []
    for text, pad_s in parts:
        chunks += [np.zeros(int(24000 * pad_s), dtype=np.int16), synthesize(text, "marin", 1.0)]
    return np.concatenate([*chunks, np.zeros(24000, dtype=np.int16)])


def live_options(runtime_dir: Path, **more: Any) -> dict[str, Any]:
    return {"model": "gpt-live-1", "runtime_dir": str(runtime_dir), **more}


def cli(runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`engine ARGS` in another process, on the engine in ``runtime_dir``."""
    return subprocess.run([sys.executable, "-m", "engine.api.cli", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "REALTALK_RUNTIME_DIR": str(runtime_dir)})


def loud_ms(path: Path) -> int:
    """Milliseconds of ``path`` (a 24 kHz WAV) louder than -40 dBFS, in 20 ms windows."""
    with wave.open(str(path)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
    windows = pcm[: len(pcm) // 480 * 480].reshape(-1, 480)
    return int((np.sqrt((windows ** 2).mean(axis=1)) > 328).sum()) * 20


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_context_goes_in_as_context_user_text_is_refused_and_commentary_is_said(runtime_dir: Path) -> None:
    async def main() -> None:
        async with await create_session({"instructions": "You help with car rentals."},
                                        live_options(runtime_dir, text_only=True, speed=4)) as s:
            assert s.live
            placed = await s.system("The booking is Avis ZX9.")   # silent context: placed on the timeline
            assert placed["ok"] and isinstance(placed["start_ms"], int)
            with pytest.raises(EngineError, match="GPT-Live takes no user text"):
                await s.user("What time is it?")
            with pytest.raises(EngineError, match="turn.. is not available on GPT-Live"):
                async with s.turn():
                    pass
            turn = asyncio.ensure_future(s.model_turn(20))
            await s.commentary("Tell the customer the car is ready.")
            assert "car is ready" in await turn
    asyncio.run(main())
    out = cli(runtime_dir, "say", "hello")   # the engine is gone: refused, not hung
    assert out.returncode != 0
    # the stop closed the session first (its last usage counted, the session known finalized)
    (log,) = (runtime_dir.parent / "data").glob("realtalk/sessions/*/events.jsonl")
    topics = [json.loads(line).get("topic") for line in log.read_text().splitlines() if line.strip()]
    assert "client.session.close" in topics and "server.session.closed" in topics, topics[-20:]
    assert topics.index("server.session.closed") > topics.index("client.session.close")


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_a_spoken_question_is_delegated_to_a_bus_tool_and_answered_aloud_with_context(
        runtime_dir: Path, tmp_path: Path) -> None:
    """The car-rental case on GPT-Live: the booking comes as context from another process (the
    CLI), the model delegates the caller's question, a bus tool answers it, the model says it."""
    scenario = tmp_path / "rental.yaml"
    scenario.write_text('expect: ["Where is the collection point?"]\n'
                        'turns:\n'
                        '  - match: {regex: "collect(ion)? point"}\n'
                        '    delegate: {ack: "Let me check."}\n'
                        '    then: "For booking {context}, the car is at {output}."\n')
    mic = write_wav(tmp_path / "question.wav", speech(("Where is the collection point?", 2.5)))
    out = tmp_path / "speaker.wav"
    calls: list[str] = []

    async def main() -> None:
        async with await create_session({"instructions": "You help with car rentals."},
                                        live_options(runtime_dir, mic=str(mic), speaker=str(out),
                                                     scenario=str(scenario), speed=1)) as s:
            @s.tool
            def collection_point(booking: str) -> str:
                """Where a booking's car is collected."""
                calls.append(booking)
                return "Northern Train Station, desk 4"
            await s.register_tools()
            said = await asyncio.to_thread(cli, runtime_dir, "say", "--system", "Avis ZX9")  # another process
            assert said.returncode == 0 and "placed at" in said.stdout, said
            answer = ""
            while "Northern Train Station" not in answer:
                answer = await s.model_turn(40)
            assert "Avis ZX9" in answer, answer
    asyncio.run(main())
    assert calls and "collection point" in calls[0].lower()
    assert loud_ms(out) > 1500   # the answer was played at the speaker


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_the_model_yields_when_the_user_talks_over_it(runtime_dir: Path, tmp_path: Path) -> None:
    scenario = tmp_path / "story.yaml"
    scenario.write_text(json.dumps({"expect": ["Tell me a story.", "Stop please."],
                                    "turns": [{"match": {"text": "story"}, "reply": STORY}]}))
    # the question, then, while the 14 s story plays, the user talks over it
    mic = write_wav(tmp_path / "talk_over.wav", speech(("Tell me a story.", 1.0), ("Stop please.", 3.5)))

    async def main() -> None:
        async with await create_session({}, live_options(runtime_dir, mic=str(mic), speaker="null",
                                                         scenario=str(scenario), speed=1)) as s:
            first = await s.model_turn(40)
            assert first and STORY.startswith(first.rstrip(".")[:20]), first
            assert len(first) < len(STORY) // 2, f"the model did not yield: {first!r}"
    asyncio.run(main())


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_phone_call_on_live_passes_mulaw_straight_through_and_the_back_office_answers(
        phone_engine: Any, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_twilio_token(monkeypatch)
    eng = phone_engine("--model", "gpt-live-1", "--speed", "1", "--scenario", str(REPO / "scenarios" / "car_rental.yaml"))
    question = caller_speech("Where is the collection point?")

    async def main() -> None:
        phone = await FakePhone(eng.url, custom_parameters={"booking": "ZX9"}).dial()
        started = await bus.wait("session.config", timeout_s=20, phone_call_id=phone.call_sid)
        assert started["session"]["audio"]["format"] == {"type": "audio/pcmu", "rate": 8000}   # no resampling
        await bus.wait("system.text", timeout_s=20, phone_call_id=phone.call_sid)   # the booking, placed
        await phone.say(question)
        call = await bus.wait("tool.call", timeout_s=30, phone_call_id=phone.call_sid)
        assert call["name"] == "collection_point" and call["delegation"] is True
        await bus.wait("model.transcript.done", timeout_s=30, phone_call_id=phone.call_sid,
                       where=lambda d: "Northern Train Station" in d.get("text", ""))
        assert phone.media_received > 50   # the caller heard the answer (µ-law media back)
        await phone.hang_up()
        await bus.wait("phone.call.ended", timeout_s=20, phone_call_id=phone.call_sid)
    with car_rental_office(), BusRecorder(json.loads((runtime_dir / "engine.json").read_text())) as bus:
        try:
            asyncio.run(main())
        except AssertionError:   # what the call's bus said, for the failure's report
            for t, b in bus.msgs:
                if t not in ("phone.status", "engine.status", "playback.position", "capture.levels"):
                    print(t, {k: v for k, v in b.items() if k not in ("v", "ts", "mono_ns", "pub", "seq")},
                          file=sys.stderr)
            raise

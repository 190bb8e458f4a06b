"""The Python API's conversation control, end to end against the local server: the old
JavaScript quick start's examples ported (a translator, streaming, out-of-band replies, sessions
talking to each other) and a push-to-talk turn with a WAV mic."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TEXT = {"output_modalities": ["text"]}
TEXT_OPTS: dict[str, Any] = {"mic": "null", "speaker": "null", "text_only": True}


def test_translator_streaming_and_an_out_of_band_reply(runtime_dir: Path, tmp_path: Path) -> None:
    from engine import create_session
    scenario = tmp_path / "sc.yaml"
    scenario.write_text('turns:\n  - match: {text: "Translate"}\n    reply: "Bonjour tout le monde."\n'
                        '  - match: {text: "Classify"}\n    reply: "positive"\n')

    async def main() -> None:
        async with await create_session({"instructions": "You translate English to French.", **TEXT},
                                        {**TEXT_OPTS, "scenario": str(scenario)}) as session:
            await session.system("Answer with the translation only.")
            reply = await session.user("Translate: hello everyone")
            assert reply.text == "Bonjour tout le monde." and reply.status == "completed"
            deltas = [d async for d in session.stream("Translate: hello everyone, again")]
            assert len(deltas) > 1 and "".join(deltas) == "Bonjour tout le monde."
            # an out-of-band classification: tagged, not in the conversation
            oob = await session.response(conversation="none", instructions="Classify the sentiment.",
                                         input=[{"type": "message", "role": "user",
                                                 "content": [{"type": "input_text", "text": "Classify: I love it"}]}],
                                         metadata={"kind": "sentiment"})
            assert oob.text == "positive"
            with pytest.raises(Exception, match="unknown response option 'colour'"):
                await session.user("hi", colour="red")
            context = await session.system("What did we say?", respond=True)
            assert context.status == "completed"
    asyncio.run(asyncio.wait_for(main(), 90))


def test_unknown_options_are_refused_naming_the_known_ones(runtime_dir: Path) -> None:
    from engine import EngineError, create_session
    with pytest.raises(EngineError, match=r"unknown option 'spekaer' \(known: .*speaker"):
        asyncio.run(create_session(TEXT, {"spekaer": "null"}))


def test_two_sessions_in_one_program_talk_to_each_other(runtime_dir: Path) -> None:
    """The old library's ensemble: each session has its own engine and runtime directory."""
    from engine import create_session

    async def main() -> None:
        a, b = await asyncio.gather(create_session(TEXT, TEXT_OPTS), create_session(TEXT, TEXT_OPTS))
        try:
            assert a.conn["publish"] != b.conn["publish"]
            line = "Hello from Ada"
            for _ in range(2):
                line = (await a.user(line)).text
                line = (await b.user(line)).text
            assert line.count("You said") == 4  # each engine's local server echoed what the other said
        finally:
            await asyncio.gather(a.close(), b.close())
    asyncio.run(asyncio.wait_for(main(), 90))


def test_push_to_talk_turn_with_a_wav_mic(runtime_dir: Path, tmp_path: Path, speech_wav: Any) -> None:
    """turn_detection null: nothing answers until the turn is committed (issue 12: speech was
    buffered and never answered, nothing could commit it)."""
    import time
    import wave
    import yaml
    from engine import create_session
    scenario = tmp_path / "sc.yaml"
    scenario.write_text('turns:\n  - match: {turn: 1}\n    reply: "Paris."\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"session": {"turn_detection": None, "output_modalities": ["text"]}}))
    wav = speech_wav("What is the capital of France?", pad_s=8.0)  # speech starts 8 s in
    with wave.open(str(wav)) as w:
        wav_s = w.getnframes() / w.getframerate()

    async def main() -> None:
        t0 = time.monotonic()
        async with await create_session({}, {"config": str(cfg), "mic": str(wav), "speaker": "null",
                                             "scenario": str(scenario), "text_only": False}) as session:
            assert time.monotonic() - t0 < 7.5, "the engine took too long to start: the speech was missed"
            done: list[Any] = []
            watcher = asyncio.get_running_loop().create_task(_collect(session, "response.done", done))
            async with session.turn() as turn:
                # the mic is a WAV playing in real time: the turn lasts until its speech is over
                await asyncio.sleep(max(0.0, t0 + wav_s - 2.0 - time.monotonic()))
                assert done == []  # no VAD: nothing is answered while the user holds the turn
            assert turn.reply is not None and turn.reply.text == "Paris."
            watcher.cancel()
    asyncio.run(asyncio.wait_for(main(), 90))


async def _collect(session: Any, prefix: str, into: list[Any]) -> None:
    async for event in session.events(prefix):
        into.append(event)


def test_engine_ptt_in_a_terminal(start_engine: Any, tmp_path: Path, speech_wav: Any) -> None:
    """`engine ptt`: Enter opens the mic, Enter sends the turn; the answer is printed."""
    import subprocess
    import sys
    import time
    import wave
    scenario = tmp_path / "sc.yaml"
    scenario.write_text('turns:\n  - match: {turn: 1}\n    reply: "Paris."\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("session:\n  turn_detection: null\n  output_modalities: [text]\n")
    wav = speech_wav("What is the capital of France?", pad_s=8.0)
    with wave.open(str(wav)) as w:
        wav_s = w.getnframes() / w.getframerate()
    t0 = time.monotonic()
    eng = start_engine("--config", str(cfg), "--mic", str(wav), "--speaker", "null", "--scenario", str(scenario))
    ptt = subprocess.Popen([sys.executable, "-m", "engine.api.cli", "ptt", "--turns", "1", "--timeout", "30"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert ptt.stdin is not None
    ptt.stdin.write("\n")      # talk
    ptt.stdin.flush()
    time.sleep(max(0.0, t0 + wav_s - 2.0 - time.monotonic()))  # the WAV mic plays in real time
    ptt.stdin.write("\n")      # send
    ptt.stdin.flush()
    out, _ = ptt.communicate(timeout=40)
    assert ptt.returncode == 0 and "Paris." in out, out
    assert eng.proc.poll() is None


def test_repeat_after_me_saves_each_reply_as_a_wav(runtime_dir: Path, tmp_path: Path) -> None:
    """The old quick start's repeat-after-me voice, with each reply's audio saved (save_deltas_as_wav)."""
    import wave
    from engine import create_session
    from engine.server.voice import synthesize

    async def main() -> None:
        async with await create_session({"instructions": "Repeat after me."},
                                        {"mic": "null", "speaker": str(tmp_path / "spk.wav"), "speed": 4.0}) as s:
            for i, line in enumerate(["Hello there.", "Good morning."]):
                reply = await s.user(line)
                assert reply.text == f"You said: {line}"
                out = reply.save_wav(tmp_path / f"reply{i}.wav")
                with wave.open(str(out)) as w:
                    assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
                    frames = w.getnframes()
                assert frames == len(synthesize(reply.text, "marin", 1.0))  # every sample the server sent
                assert len(reply.audio) == frames * 2
    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_script_that_raises_leaves_no_engine_behind(runtime_dir: Path, tmp_path: Path) -> None:
    """Issue 12: the engine dies with its parent; a script that raises must not leave an orphaned
    engine, or hang on exit."""
    import json
    import os
    import subprocess
    import sys
    import time
    script = tmp_path / "boom.py"
    script.write_text(
        "import asyncio, json, sys\n"
        "from engine import create_session\n"
        "async def main():\n"
        "    s = await create_session({'output_modalities': ['text']}, {'text_only': True})\n"
        "    print(json.dumps({'pid': s.process.pid, 'dir': str(s.runtime_dir)}), flush=True)\n"
        "    raise RuntimeError('the user script fails')\n"
        "asyncio.run(main())\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 1 and "the user script fails" in out.stderr, out.stderr[-2000:]
    assert time.monotonic() - t0 < 40, "the script hung on exit"
    info = json.loads(out.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{info['pid']}").exists():
        time.sleep(0.1)   # polling /proc: the engine is not our child, no event says it ended
    assert not Path(f"/proc/{info['pid']}").exists(), "the engine outlived the script"
    conn = Path(info["dir"]) / "engine.json"
    while time.monotonic() < deadline and conn.exists():
        time.sleep(0.1)   # polling the file: no event says it was removed
    assert not conn.exists(), "the engine did not clean up its runtime directory"


def test_create_session_with_a_missing_mic_fails_naming_the_device(runtime_dir: Path, vaudio: Any) -> None:
    """Issue 15 point 18: with a wrong mic create_session said ready and the first user() raised a bare
    TimeoutError 21 s later."""
    import time
    from engine import EngineError, create_session

    async def main() -> None:
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="no-such-mic") as info:
            s = await create_session({}, {"mic": "no-such-mic", "speaker": "null"})
            try:
                await s.user("hello", timeout_s=30)
            finally:
                await s.close()
        assert time.monotonic() - t0 < 15, info.value
    asyncio.run(asyncio.wait_for(main(), 60))

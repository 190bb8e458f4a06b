"""The server's errors sit under EngineError, and speech recognition that fails once is
reported and tried again, never switched off for good (issue 14 points 6 and 9)."""
from __future__ import annotations

import sys
import types
from typing import Any, Iterator

import numpy as np
import pytest

from tests.helpers import RawClient, chunks_b64, read_wav

pytestmark = pytest.mark.timeout(60)


def test_server_errors_are_engine_errors() -> None:
    from engine.errors import EngineError
    from engine.server.errors import ServeError, ServerError
    from engine.server.protocol import ProtocolError
    from engine.server.scenario import ScenarioError
    from engine.server.voice import VoiceError
    for cls in (ProtocolError, ScenarioError, VoiceError, ServeError):
        assert issubclass(cls, ServerError) and issubclass(cls, EngineError), cls
    assert issubclass(ScenarioError, ValueError)  # what config's YAML reader and older callers catch


class FlakyDecoder:
    """A pocketsphinx stand-in: the first ``fail_loads`` constructions raise."""
    loads = 0
    fail_loads = 1

    def __init__(self, **_: Any) -> None:
        FlakyDecoder.loads += 1
        if FlakyDecoder.loads <= FlakyDecoder.fail_loads:
            raise RuntimeError("model files missing")

    def start_utt(self) -> None: ...
    def process_raw(self, data: bytes, full_utt: bool = False) -> None: ...
    def end_utt(self) -> None: ...

    def hyp(self) -> Any:
        return types.SimpleNamespace(hypstr="hello there")


@pytest.fixture
def recognizer(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from engine.server.voice import Recognizer
    monkeypatch.setitem(sys.modules, "pocketsphinx", types.SimpleNamespace(Decoder=FlakyDecoder))
    FlakyDecoder.loads = 0
    for attr, value in (("_decoder", None), ("_load_failed_at", None), ("failures", 0), ("last_error", None)):
        monkeypatch.setattr(Recognizer, attr, value)
    yield Recognizer


def test_recognition_failure_is_reported_and_retried(recognizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.server.voice import VoiceError
    pcm = np.zeros(24000, dtype=np.int16)
    with pytest.raises(VoiceError, match="model files missing"):
        recognizer.transcribe(pcm)
    assert recognizer.failures == 1 and "model files missing" in recognizer.last_error
    with pytest.raises(VoiceError, match="retrying"):   # within the back-off: says so, does not reload
        recognizer.transcribe(pcm)
    assert FlakyDecoder.loads == 1
    monkeypatch.setattr(recognizer, "RETRY_S", 0.0)
    assert recognizer.transcribe(pcm) == "hello there"  # not disabled for good


def test_failed_recognition_sends_the_failed_event_and_still_answers(
        make_server: Any, validator: Any, speech_wav: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.server.voice import Recognizer, VoiceError

    def broken(pcm: Any, phrases: Any = ()) -> str:
        raise VoiceError("speech recognition failed (decoding failed: RuntimeError: boom)")
    monkeypatch.setattr(Recognizer, "transcribe", staticmethod(broken))
    server = make_server(asr=True)
    c = RawClient(server.url + "?model=gpt-realtime", validator)
    c.until("session.created")
    c.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "transcription": {"model": "whisper-1"}, "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}}})
    c.until("session.updated")
    for b64 in chunks_b64(read_wav(speech_wav("Hello there", pad_s=0.6)), 100):
        c.send({"type": "input_audio_buffer.append", "audio": b64})
    failed = c.until("conversation.item.input_audio_transcription.failed")
    assert "boom" in failed["error"]["message"] and failed["item_id"].startswith("item_")
    assert c.until("response.done")["response"]["status"] == "completed"
    c.close()


def test_concurrent_requests_for_the_same_speech_share_one_synthesis(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 phone calls asking for the same reply at once ran espeak-ng 40 times, and every call's
    first deltas came late: now the calls in flight wait for the one synthesis (a failure reaches
    each of them as a VoiceError)."""
    import threading
    from engine.server import voice
    runs: list[str] = []
    release = threading.Event()

    def slow_espeak(text: str, v: str, speed: float) -> np.ndarray:
        runs.append(text)
        release.wait(10)   # every caller is in flight before the first synthesis ends
        if text == "fails":
            raise voice.VoiceError("espeak-ng failed (1): no voice")
        out = np.full(2400, len(runs), dtype=np.int16)
        out.setflags(write=False)
        return out
    monkeypatch.setattr(voice, "_espeak", slow_espeak)
    waiting = threading.Condition()
    waiters = [0]

    class CountedEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            with waiting:
                waiters[0] += 1
                waiting.notify_all()
            return super().wait(timeout)

    class CountedFlight(voice._Flight):
        def __init__(self) -> None:
            super().__init__()
            self.done = CountedEvent()
    monkeypatch.setattr(voice, "_Flight", CountedFlight)
    for text in (f"a reply nobody asked for yet {id(runs)}", "fails"):
        results: list[Any] = []

        def ask(text: str = text, results: list[Any] = results) -> None:
            try:
                results.append(voice.synthesize(text, "marin", 1.0))
            except voice.VoiceError as exc:
                results.append(exc)
        waiters[0] = 0
        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        with waiting:   # one caller synthesizes, the seven others wait for it
            assert waiting.wait_for(lambda: waiters[0] == 7, timeout=10), waiters
        release.set()
        for t in threads:
            t.join(10)
        release.clear()
        assert len(results) == 8 and runs.count(text) == 1, (runs, results)
        if text == "fails":
            assert all(isinstance(r, voice.VoiceError) for r in results), results
        else:
            assert all(r is results[0] for r in results)
    assert voice._flights == {}


def test_text_that_looks_like_an_option_is_spoken_not_obeyed(tmp_path: Any) -> None:
    """Any local user could start a session on the local server and have espeak-ng read this
    user's files: a commentary of ``-f<path>`` was taken as espeak-ng's option (the trust review)."""
    from engine.server.voice import _espeak
    secret = tmp_path / "secret.txt"
    secret.write_text("hi")
    read_out = _espeak("hi", "cedar", 1.0)
    spoken = _espeak(f"-f{secret}", "cedar", 1.0)
    assert len(spoken) > 2 * len(read_out)           # the path's characters, spoken: not the file's word

"""Phone calls over Twilio Media Streams: the pure protocol machine, the heard clock, and
`engine phone` end to end against the fake phone (engine/phone/simulator.py) and the local server."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import REPO, BusRecorder, car_rental_office, caller_speech, set_twilio_token

from engine.codec import encode_audio
from engine.phone.heard import HeardClock
from engine.phone.simulator import FakePhone
from engine.phone.twilio import MediaMsg, PhoneProtocolError, StartMsg, StreamState, TwilioStream

START = {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
         "start": {"streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound"],
                   "customParameters": {"booking": "ZX9"},
                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}


@pytest.fixture(autouse=True)
def _twilio_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """`engine phone` checks Twilio's signature (phone.auth twilio): a token for the engines and phones here."""
    return set_twilio_token(monkeypatch)


# ================================================================ the pure machine
@pytest.mark.timeout(5)
def test_stream_follows_the_documented_sequence() -> None:
    s = TwilioStream()
    s.receive(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    assert s.state is StreamState.CONNECTED
    start = s.receive(json.dumps(START))
    assert isinstance(start, StartMsg) and start.call_sid == "CA1" and start.custom_parameters == {"booking": "ZX9"}
    media = s.receive(json.dumps({"event": "media", "sequenceNumber": "2", "streamSid": "MZ1",
                                  "media": {"track": "inbound", "chunk": "1", "timestamp": "5",
                                            "payload": "//8="}}))
    assert isinstance(media, MediaMsg) and media.ulaw == b"\xff\xff" and media.timestamp_ms == 5
    assert json.loads(s.media(b"\x00"))["media"]["payload"] == "AA=="
    assert json.loads(s.mark("m1")) == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "m1"}}
    assert json.loads(s.clear()) == {"event": "clear", "streamSid": "MZ1"}
    s.receive(json.dumps({"event": "stop", "sequenceNumber": "3", "streamSid": "MZ1", "stop": {"callSid": "CA1"}}))
    assert s.state is StreamState.STOPPED


@pytest.mark.timeout(5)
@pytest.mark.parametrize("text,code", [
    ("not json", "not_json"), ("[1]", "not_an_object"), ('{"event": "hello"}', "unknown_event"),
    ('{"event": "media", "media": {"payload": "AA=="}}', "out_of_order"),
])
def test_bad_messages_are_refused_and_change_nothing(text: str, code: str) -> None:
    s = TwilioStream()
    with pytest.raises(PhoneProtocolError) as err:
        s.receive(text)
    assert err.value.code == code and s.state is StreamState.OPEN


@pytest.mark.timeout(5)
def test_bad_media_and_format() -> None:
    s = TwilioStream()
    bad = json.loads(json.dumps(START))
    bad["start"]["mediaFormat"]["encoding"] = "audio/l16"
    with pytest.raises(PhoneProtocolError) as err:
        s.receive(json.dumps(bad))
    assert err.value.code == "media_format" and err.value.fatal and s.state is StreamState.OPEN
    s.receive(json.dumps(START))
    with pytest.raises(PhoneProtocolError) as err:
        s.receive(json.dumps({"event": "media", "media": {"payload": "***"}}))
    assert err.value.code == "bad_payload" and not err.value.fatal and s.state is StreamState.STREAMING
    with pytest.raises(PhoneProtocolError, match="dtmf.digit"):
        s.receive(json.dumps({"event": "dtmf", "dtmf": {"digit": "x"}}))
    with pytest.raises(PhoneProtocolError, match="before the stream"):
        TwilioStream().media(b"\x00")


# ================================================================ the heard clock
@pytest.mark.timeout(5)
def test_heard_index_interpolates_between_marks_and_never_passes_one() -> None:
    c = HeardClock(mark_every_frames=1600)
    marks = c.sent(1600, 10.0)                       # 200 ms sent at t=10: it plays from now
    assert [m.index for m in marks] == [1600]
    marks += c.sent(1600, 10.0)
    assert c.heard_index(10.1) == 800                # 100 ms later: 800 frames
    assert c.heard_index(10.5) == 1600               # not past the first mark not yet echoed
    echo = c.echoed(marks[0].name, 10.6)             # the phone played it later than we thought
    assert echo is not None and echo.heard_index == 1600
    assert c.heard_index(10.7) == 2400               # interpolated from the echo
    assert c.heard_index(20.0) == 3200               # never past the mark / what was sent
    assert c.clear(10.65) == 2000                    # what was heard when clear went out
    assert c.echoed(marks[1].name, 10.66) is None    # a mark clear dropped: ignored
    assert c.heard_index(10.7) == 3200 == c.sent_frames   # everything sent is gone from the ear


@pytest.mark.timeout(5)
def test_audio_after_silence_starts_playing_when_sent() -> None:
    c = HeardClock()
    c.sent(800, 0.0)
    end = c.end_of_item(0)
    assert c.echoed(end.name, 0.1) is not None
    c.sent(800, 5.0)                                  # the next reply, seconds later
    assert c.heard_index(5.05) == 800 + 400


# ================================================================ end to end


class Bus(BusRecorder):
    """The bus of the running engine, read on a thread (the tests' own asyncio loop drives the phones)."""

    def __init__(self, runtime: Path) -> None:
        super().__init__(json.loads((runtime / "engine.json").read_text()))


def ulaw_speech(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return encode_audio(pcm, "audio/pcmu")


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_a_call_from_start_to_hang_up(phone_engine: Any, runtime_dir: Path) -> None:
    eng = phone_engine("--speed", "4")
    bus = Bus(runtime_dir)

    async def main() -> None:
        phone = await FakePhone(eng.url, custom_parameters={"booking": "ZX9"}).dial()
        started = await bus.wait("phone.call.started", phone_call_id=phone.call_sid)
        assert started["custom_parameters"] == {"booking": "ZX9"} and started["stream_sid"] == phone.stream_sid
        await bus.wait("phone.call.status", state="connected", phone_call_id=phone.call_sid)
        # the supervisor's engine.status lists the call once it has taken the phone's status (it goes
        # out at once, but on a loaded machine after the call's own messages): wait for that one
        await bus.wait("engine.status", 10, where=lambda b: phone.call_sid in [
            c.get("phone_call_id") for c in (b.get("phone") or {}).get("calls") or []])
        status = json.loads(subprocess.run([sys.executable, "-m", "engine.api.cli", "status", "--json"],
                                           capture_output=True, text=True, timeout=30).stdout)
        assert status["phone"] is not None, status
        assert status["phone"]["url"] == eng.url
        assert [c["phone_call_id"] for c in status["phone"]["calls"]] == [phone.call_sid]
        bus.pub.publish("cmd.say", {"text": "Good morning to you", "phone_call_id": phone.call_sid, "id": "s1"})
        done = await bus.wait("response.done", request_id="s1")
        assert done["phone_call_id"] == phone.call_sid and done["usd"] > 0
        await bus.wait("playout.stopped", phone_call_id=phone.call_sid)   # the end mark came back: all played
        assert phone.received_frames > 8000 and phone.played_frames == phone.received_frames
        assert phone.marks_echoed >= phone.received_frames // 1600
        await phone.press("7")
        dtmf = await bus.wait("phone.dtmf", phone_call_id=phone.call_sid)
        assert dtmf["digit"] == "7"
        await phone.hang_up()
        ended = await bus.wait("phone.call.ended", phone_call_id=phone.call_sid)
        assert ended["reason"] == "stop" and ended["usd"] == pytest.approx(done["session_usd"])
        assert ended["duration_s"] > 0.5 and ended["phone_errors"] == 0
        assert [e for e in bus.all("engine.error") if not e.get("benign")] == []
    with bus:
        asyncio.run(main())


@pytest.mark.e2e
@pytest.mark.timed   # the cut is measured at real time within 40 ms: beside the niced lane it read 60 once
@pytest.mark.timeout(120)
def test_barge_in_truncates_at_what_the_caller_heard(phone_engine: Any, runtime_dir: Path, speech_wav: Any) -> None:
    eng = phone_engine()                         # real time: the truncation is measured
    bus = Bus(runtime_dir)
    speech = ulaw_speech(speech_wav("stop please wait a moment", pad_s=0.1))

    async def main() -> None:
        phone = await FakePhone(eng.url).dial()
        await bus.wait("phone.call.status", state="connected", phone_call_id=phone.call_sid)
        bus.pub.publish("cmd.say", {"text": "Tell me a long story about the sea and the ships that sail on it, "
                                            "with many details, please, one after the other",
                                    "phone_call_id": phone.call_sid, "id": "long"})
        await asyncio.wait_for(phone.got_audio.wait(), 20)
        while phone.played_frames < 8000 * 1.5:      # 1.5 s of the reply heard
            await asyncio.sleep(0.02)                # (the fake phone plays in real time: no event per frame)
        await phone.say(speech)
        cut = await bus.wait("playout.interrupted", phone_call_id=phone.call_sid)
        assert phone.clears, "the bridge sent no clear"
        heard_ms = phone.clears[0].played_frames / 8
        # what the phone played of the item, the cushion's inserted periods too (docs/phone.md); the
        # reply's own audio heard is that less those (played_ms, the truncation's audio_end_ms)
        assert cut["measured"] and abs(cut["phone_played_ms"] - heard_ms) <= 40, (cut, heard_ms)
        assert 0 <= cut["phone_played_ms"] - cut["played_ms"] <= 60, cut
        await asyncio.sleep(0.5)   # a window for an error that must not come (no event says it will not)
        errors = [e for e in bus.all("engine.error") if "shorter" in str(e.get("message"))]
        assert errors == []
        await bus.wait("server.conversation.item.truncated", phone_call_id=phone.call_sid)
        await phone.hang_up()
    with bus:
        asyncio.run(main())


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_a_bad_message_is_that_calls_error_only_and_a_hang_up_mid_reply_leaks_nothing(
        phone_engine: Any, runtime_dir: Path) -> None:
    eng = phone_engine("--speed", "2")
    bus = Bus(runtime_dir)

    async def main() -> None:
        a = await FakePhone(eng.url).dial()
        b = await FakePhone(eng.url).dial()
        await bus.wait("phone.call.status", state="connected", phone_call_id=a.call_sid)
        await bus.wait("phone.call.status", state="connected", phone_call_id=b.call_sid)
        await a.send_raw("{not json")
        await a.send_raw(json.dumps({"event": "wobble", "streamSid": a.stream_sid}))
        err = await bus.wait("engine.error", code="not_json")
        assert err["phone_call_id"] == a.call_sid
        assert (await bus.wait("engine.error", code="unknown_event"))["phone_call_id"] == a.call_sid
        bus.pub.publish("cmd.say", {"text": "Hello b", "phone_call_id": b.call_sid, "id": "b1"})
        bus.pub.publish("cmd.say", {"text": "Hello a, tell me a long tale please", "phone_call_id": a.call_sid,
                                    "id": "a1"})
        await bus.wait("response.done", request_id="b1")
        await asyncio.wait_for(a.got_audio.wait(), 20)
        await a.hang_up(send_stop=False)                     # mid-reply, no stop: the socket just goes
        ended = await bus.wait("phone.call.ended", phone_call_id=a.call_sid)
        assert ended["reason"] == "hangup" and ended["phone_errors"] == 2
        bus.pub.publish("cmd.say", {"text": "Still there?", "phone_call_id": b.call_sid, "id": "b2"})
        assert (await bus.wait("response.done", request_id="b2"))["phone_call_id"] == b.call_sid
        await b.hang_up()
        await bus.wait("phone.call.ended", phone_call_id=b.call_sid)
        assert bus.all("engine.error", code="call_failed") == []
    with bus:
        asyncio.run(main())


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_car_rental_example_calls_its_tool_offline_when_asked_by_voice(phone_engine: Any, runtime_dir: Path) -> None:
    """The caller asks aloud (espeak-ng, µ-law); with the example's scenario (expected sentences, no
    rules) the local server hears the question (docs/local-server.md, "What it hears"), the tool's name
    in it makes it call collection_point, and the back office answers."""
    eng = phone_engine("--speed", "4", "--scenario", str(REPO / "scenarios" / "car_rental.yaml"))
    question = caller_speech("Where is the collection point?")   # the server's own voice, as a caller at 8 kHz

    async def main() -> None:
        phone = await FakePhone(eng.url, custom_parameters={"booking": "ZX9"}).dial()
        await bus.wait("system.text", phone_call_id=phone.call_sid)
        await phone.say(question)
        call = await bus.wait("tool.call", timeout_s=30, phone_call_id=phone.call_sid)
        assert call["name"] == "collection_point"
        await bus.wait("response.done", 30, where=lambda d: "Northern Train Station" in (d.get("text") or ""))
        await phone.hang_up()
        await bus.wait("phone.call.ended", phone_call_id=phone.call_sid)
    with car_rental_office(), Bus(runtime_dir) as bus:
        asyncio.run(main())


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_car_rental_back_office_serves_two_calls_at_once(phone_engine: Any, runtime_dir: Path,
                                                         tmp_path: Path) -> None:
    scenario = tmp_path / "rental.yaml"
    scenario.write_text('turns:\n  - match: {regex: "collection point"}\n'
                        '    call: {name: collection_point, arguments: {}}\n'
                        '    then: "Your car is waiting at {output}."\n')
    eng = phone_engine("--speed", "4", "--scenario", str(scenario))

    async def main() -> None:
        a, b = FakePhone(eng.url, custom_parameters={"booking": "ZX9"}), FakePhone(eng.url, custom_parameters={
            "booking": "QK2"})
        await asyncio.gather(a.dial(), b.dial())
        ctx_a = await bus.wait("system.text", phone_call_id=a.call_sid)
        ctx_b = await bus.wait("system.text", phone_call_id=b.call_sid)
        assert "Ada Lovelace" in ctx_a["text"] and "Alan Turing" in ctx_b["text"]
        for p in (a, b):
            bus.pub.publish("cmd.say", {"text": "Where is the collection point?", "phone_call_id": p.call_sid,
                                        "id": "q-" + p.call_sid})
        texts: dict[str, str] = {}
        for p in (a, b):
            texts[p.call_sid] = (await bus.wait("response.done", 30, where=lambda d: "waiting at" in (d.get("text") or ""),
                                                phone_call_id=p.call_sid))["text"]
        assert "Northern Train Station" in texts.get(a.call_sid, ""), texts
        assert "Airport Terminal 2" in texts.get(b.call_sid, ""), texts
        calls = {c["phone_call_id"] for c in bus.all("tool.call")}
        assert calls == {a.call_sid, b.call_sid}
        await asyncio.gather(a.hang_up(), b.hang_up())
        await bus.wait("phone.call.ended", phone_call_id=a.call_sid)
        await bus.wait("phone.call.ended", phone_call_id=b.call_sid)
    with car_rental_office(), Bus(runtime_dir) as bus:
        asyncio.run(main())


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_engine_phone_without_its_auth_token_stops_at_once_naming_the_variable(
        runtime_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "engine.api.cli", "phone", "--backend", "local", "--port", "0"],
                          capture_output=True, text=True, timeout=45, env=os.environ.copy(), cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "$TWILIO_AUTH_TOKEN is empty" in out, out
    assert "Traceback" not in out and time.monotonic() - t0 < 20

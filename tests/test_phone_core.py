"""The realtime core counting G.711 (audio/pcmu): 8 kHz, one byte a frame; truncation in those ms."""
from __future__ import annotations

import base64

import pytest

from engine.errors import ConfigError
from engine.realtime.core import RealtimeCore
from engine.realtime.records import Connected, Flush, Play, PlaybackReport, Send, ServerEvent

pytestmark = pytest.mark.timeout(10)


def _core() -> RealtimeCore:
    core = RealtimeCore("gpt-realtime", {"type": "realtime"}, audio_format="audio/pcmu")
    core.handle(Connected(), 0.0, 0)
    core.handle(ServerEvent({"type": "response.created", "response": {"id": "r1", "conversation_id": "c"}}), 0.0, 0)
    return core


def test_pcmu_frames_are_bytes_at_8_khz() -> None:
    core = _core()
    acts = core.handle(ServerEvent({"type": "response.output_audio.delta", "response_id": "r1", "item_id": "i1",
                                    "delta": base64.b64encode(b"\xff" * 8000).decode()}), 0.1, 0)
    play = [a for a in acts if isinstance(a, Play)]
    assert len(play) == 1 and len(play[0].pcm) == 8000 and play[0].starts_item
    assert core.playout.frames_written == 8000          # one second of µ-law
    item = core.playout.items["i1"]
    assert item.heard_ms(4000) == 500                   # 4000 bytes heard = 500 ms


def test_pcmu_truncation_counts_8_frames_a_ms() -> None:
    core = _core()
    core.handle(ServerEvent({"type": "response.output_audio.delta", "response_id": "r1", "item_id": "i1",
                             "delta": base64.b64encode(b"\xff" * 16000).decode()}), 0.1, 0)
    acts = core.handle(ServerEvent({"type": "input_audio_buffer.speech_started", "item_id": "u1",
                                    "audio_start_ms": 0}), 1.0, 7200)
    assert any(isinstance(a, Flush) for a in acts)
    acts = core.handle(PlaybackReport("flushed", 0, 7200), 1.01, 7200)
    trunc = [a.event for a in acts if isinstance(a, Send) and a.event["type"] == "conversation.item.truncate"]
    assert trunc and trunc[0]["audio_end_ms"] == 900


def test_unknown_audio_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="audio/opus"):
        RealtimeCore("gpt-realtime", {"type": "realtime"}, audio_format="audio/opus")


def test_the_fake_phone_counts_a_gap_in_the_audio_as_an_underrun_and_a_reply_end_not() -> None:
    """The fake phone's player: a dry buffer mid-audio that audio follows within 500 ms is an
    underrun; a longer silence (the reply ended) and a clear are not."""
    from engine.phone.simulator import FRAME_BYTES, UNDERRUN_MAX_FRAMES, FakePhone
    phone = FakePhone("ws://unused")
    ticks = [FRAME_BYTES] * 10 + [0, 0] + [FRAME_BYTES] * 5 + [80] + [FRAME_BYTES] * 3   # two gaps
    ticks += [0] * (UNDERRUN_MAX_FRAMES + 5) + [FRAME_BYTES] * 4                           # a reply ends, another begins
    for got in ticks:
        phone._count_gap(got)
    assert (phone.underruns, phone.underrun_frames) == (2, 3)
    # the longer silence is not lost: a bench whose calls hear one reply each counts it as a stall
    assert (phone.long_silences, phone.long_silence_frames) == (1, UNDERRUN_MAX_FRAMES + 5)
    phone._in_audio, phone._dry_frames = False, 0       # what a clear does
    for got in [0, 0, FRAME_BYTES]:
        phone._count_gap(got)
    assert phone.underruns == 2
    for got in [0] * (UNDERRUN_MAX_FRAMES + 1):          # the call's audio ended: silence with no audio after it
        phone._count_gap(got)
    assert (phone.long_silences, phone.long_silence_frames) == (1, UNDERRUN_MAX_FRAMES + 5)
